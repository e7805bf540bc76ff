"""`python -m qsmrim_app.synthetic` = `qsmrim-synth`."""
import sys

from . import main

sys.exit(main())
