"""``python -m qsmrim_app.synthetic.blind OUT --participants N --seed S --data-dir DIR``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import generate_blind_family, truth_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qsmrim_app.synthetic.blind",
                                     description="Write the blind family (docs/blind_family.md) as BIDS.")
    parser.add_argument("out_dir", type=Path, help="output BIDS folder (truth goes to <OUT>_truth)")
    parser.add_argument("--participants", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[3].parent / "shared" / "data",
                        help="the shared real data (open_ms_data, qsm_challenge_2016, qsm_ich)")
    parser.add_argument("--small", action="store_true", help="a thin slab with 6-9 lesions (tests)")
    args = parser.parse_args(argv)
    if args.participants < 1:
        parser.error("--participants must be >= 1")
    if not (args.data_dir / "open_ms_data").is_dir():
        parser.error(f"{args.data_dir}: no open_ms_data folder; pass --data-dir")
    generate_blind_family(args.out_dir, args.data_dir, args.participants, args.seed, small=args.small)
    print(f"wrote {args.out_dir} (truth: {truth_dir(args.out_dir)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
