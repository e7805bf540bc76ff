"""The rater's loop: ``qsmrim-review OUTPUT_DIR`` serves the participant-level candidates to a browser.

It reads a qsmrim output directory (and the QSM maps its sidecars name), never recomputes the
pipeline, and writes only the review dataset: per participant/session a ``desc-rim_dseg`` (the
majority of all raters) and a decisions table, which ``qsmrim ... participant --rim-annotations``
then turns into training labels.
"""
from __future__ import annotations

from .cli import main

__all__ = ["main"]
