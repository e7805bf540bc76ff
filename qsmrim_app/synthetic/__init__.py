"""Phantom MS datasets (`qsmrim-synth`): QSM made through the dipole physics, FLAIR on its own grid.

The phantom is defined in continuous head coordinates (anatomy.py), sampled into each image grid
(render.py), imaged (physics.py, simulate.py) and written as BIDS with truth outside it (dataset.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .anatomy import SIZES, sample_lesion_counts
from .breakage import HOWS, break_participant
from .dataset import generate_dataset

__all__ = ["SIZES", "HOWS", "break_participant", "generate_dataset", "main", "sample_lesion_counts"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qsmrim-synth", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output BIDS directory (must be empty or absent)")
    parser.add_argument("--subjects", type=int, default=3, help="number of subjects (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same arrays")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="small: fast test phantom; full: benchmark-sized grids, 50-80 lesions")
    parser.add_argument("--sessions", type=int, default=1, help="sessions per subject (ses-01.. when > 1)")
    parser.add_argument("--no-magnitude", action="store_true", help="skip the part-mag T2starw image")
    parser.add_argument("--truth-dir", type=Path, default=None, help="ground truth folder (default <OUT>_truth)")
    parser.add_argument("--rimplus-fraction", type=float, default=0.0425,
                        help="expected share of rim+ lesions (default 0.0425, as in Zhang et al. 2022)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing phantom dataset in OUT")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subjects < 1 or args.sessions < 1:
        parser.error("--subjects and --sessions must be >= 1")
    if not 0.0 <= args.rimplus_fraction <= 1.0:
        parser.error("--rimplus-fraction must be within [0, 1]")
    try:
        truth = generate_dataset(args.out, args.subjects, seed=args.seed, size=args.size, sessions=args.sessions,
                                 magnitude=not args.no_magnitude, truth_dir=args.truth_dir,
                                 rimplus_fraction=args.rimplus_fraction, overwrite=args.overwrite)
    except FileExistsError as exc:
        print(f"qsmrim-synth: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} (truth: {truth})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
