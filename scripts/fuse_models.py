#!/usr/bin/env python3
"""Fuse already-trained component model directories into one ``fusion`` model directory.

`group --train --method fusion` trains the components and fuses them in one run; this script does the
second half for components trained by separate runs through the same folds (e.g. the bundled model's
`--cv-group-by family` runs of image-only and features-only, scripts/make_bundled_model.sh), with the
same code (qsmrim_app/model/fusion.py) and the same evaluation report as a training run.

Usage: fuse_models.py OUT_DIR --component image-only=DIR --component features-only=DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from qsmrim_app.model.evaluation import write_evaluation
from qsmrim_app.model.fusion import FusionError, fuse
from qsmrim_app.model.modeldir import OOF_TSV


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--component", action="append", required=True, metavar="METHOD=DIR",
                        help="a component model directory (in the fusion's order: image-only, features-only)")
    args = parser.parse_args(argv)
    try:
        dirs = {m: Path(d) for m, d in (c.split("=", 1) for c in args.component)}
        out = fuse(dirs, args.out_dir)
    except (FusionError, ValueError) as err:
        print(f"fuse_models: {err}", file=sys.stderr)
        return 1
    def table(d: Path) -> pd.DataFrame:
        t = pd.read_csv(d / OOF_TSV, sep="\t", dtype={"session": str}, keep_default_na=False)
        return t.sort_values(["subject", "session", "lesion_id"]).reset_index(drop=True)

    # the fusion first (its report's primary method), each component beside it on the same lesions
    results = {"fusion": table(out)} | {m: table(out / "components" / m) for m in dirs}
    write_evaluation(results, out, title=f"qsmrim cross-validation (fusion of {', '.join(dirs)})")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
