#!/usr/bin/env python3
"""BIDS App entrypoint (the container's ENTRYPOINT): ``run.py bids_dir output_dir {participant,group}``."""
import sys

from qsmrim_app.cli.run import main

if __name__ == "__main__":
    sys.exit(main())
