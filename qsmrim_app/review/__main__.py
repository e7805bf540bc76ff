"""``python -m qsmrim_app.review OUTPUT_DIR``: the same as the ``qsmrim-review`` console script."""
import sys

from .cli import main

sys.exit(main())
