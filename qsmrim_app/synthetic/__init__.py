"""Phantom and semi-real MS datasets (`qsmrim-synth`): QSM made through the dipole physics, FLAIR on its own grid.

The phantom is defined in continuous head coordinates (anatomy.py), sampled into each image grid
(render.py), imaged (physics.py, simulate.py) and written as BIDS with truth outside it (dataset.py).
`--semi-real` builds participants from real images instead (semireal_head.py, semireal_lesions.py,
semireal.py): the COSMOS QSM, the Ljubljana lesion masks and FLAIRs, rims simulated through the same physics.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .anatomy import SIZES, sample_lesion_counts
from .breakage import HOWS, break_participant
from .dataset import generate_dataset
from .families import FAMILIES
from .semireal import GRIDS, generate_semireal

__all__ = ["GRIDS", "SIZES", "HOWS", "break_participant", "generate_dataset", "generate_semireal", "main",
           "sample_lesion_counts"]


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
    parser.add_argument("--longitudinal", action="store_true",
                        help="lesions followed over --sessions (>= 2) sessions: grown/shrunk, new, no longer seen, "
                             "rims persisting/fading/appearing, masks redrawn per session; track truth in the "
                             "truth folder (synthetic/longitudinal.py)")
    semi = parser.add_argument_group("semi-real cohort (real COSMOS QSM, real lesion masks and FLAIR)")
    semi.add_argument("--semi-real", action="store_true",
                      help="one participant per Ljubljana patient, one session per QSM grid (needs --data-dir)")
    semi.add_argument("--data-dir", type=Path, default=None,
                      help="the shared data folder (open_ms_data/, qsm_challenge_2016/)")
    semi.add_argument("--patients", type=_patients, default=None, metavar="LIST",
                      help="patients to make, e.g. 1-14 or 3,7,15 (default: all 20)")
    semi.add_argument("--grids", nargs="+", choices=list(GRIDS), default=None,
                      help="QSM grids, one session each (default: all three); 0.6x0.6x2 is held out for judging")
    semi.add_argument("--family", choices=list(FAMILIES), default=None,
                      help="generator family (docs/families.md): background, rim physics and reconstruction drawn "
                           "together; implies --semi-real; its grids are the default --grids")
    semi.add_argument("--head-cache", type=Path, default=None, metavar="DIR",
                      help="where the semi-real head's registration is cached (default <truth>/head; ~1.5 min "
                           "to make once, shareable between cohorts)")
    return parser


def _patients(text: str) -> list[int]:
    """'1-14' / '3,7,15' / '1-3,9' -> sorted patient numbers."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a patient list: {text!r} (e.g. 1-14 or 3,7,15)") from None
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subjects < 1 or args.sessions < 1:
        parser.error("--subjects and --sessions must be >= 1")
    if not 0.0 <= args.rimplus_fraction <= 1.0:
        parser.error("--rimplus-fraction must be within [0, 1]")
    if args.semi_real or args.family:
        return _semireal(parser, args)
    if args.longitudinal:
        return _longitudinal(parser, args)
    return _phantom(generate_dataset, args)


def _phantom(generate, args: argparse.Namespace) -> int:
    """Run a phantom generator (plain or longitudinal) with the command line's common arguments."""
    try:
        truth = generate(args.out, args.subjects, seed=args.seed, size=args.size, sessions=args.sessions,
                         magnitude=not args.no_magnitude, truth_dir=args.truth_dir,
                         rimplus_fraction=args.rimplus_fraction, overwrite=args.overwrite)
    except FileExistsError as exc:
        print(f"qsmrim-synth: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} (truth: {truth})")
    return 0


def _longitudinal(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .longitudinal import generate_longitudinal

    if args.sessions < 2:
        parser.error("--longitudinal needs --sessions 2 or more")
    return _phantom(generate_longitudinal, args)


def _semireal(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.data_dir is None:
        parser.error("--semi-real needs --data-dir (the shared data folder)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        truth = generate_semireal(args.out, args.data_dir, patients=args.patients, grids=args.grids,
                                  seed=args.seed, truth_dir=args.truth_dir, overwrite=args.overwrite,
                                  head_cache=args.head_cache, family=args.family)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"qsmrim-synth: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} (truth: {truth})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
