"""Train the bundled model from several participant-level output directories (cohorts) at once.

``group --train`` trains on one output directory; the bundled model is trained on more than one cohort
(the semi-real cohort on two QSM grids and the phantoms on a third), whose participant labels overlap.
This script gathers the annotated lesions of each directory exactly as ``group --train`` does, keeps
the cohorts' participants apart (``<cohort>:<participant>``, so folds never split a participant), and
trains with the same code and the protocol given, then writes the evaluation report.

    python scripts/train_bundled_model.py --cohort semireal=/path/train_out --cohort phantoms=/path/ph_out \
        --protocol fast --weights-fp16 --out /path/bundled_model
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from qsmrim_app import derivatives as drv
from qsmrim_app.model.config import protocol_config
from qsmrim_app.model.data import LesionSet, concat
from qsmrim_app.model.evaluation import write_evaluation
from qsmrim_app.model.train import estimate_training_seconds, method_feature_names, train
from qsmrim_app.workflows.training import collect_lesion_set


def _cohort(text: str) -> tuple[str, Path]:
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=OUTPUT_DIR, got {text!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=_cohort, action="append", required=True, metavar="NAME=OUTPUT_DIR")
    parser.add_argument("--protocol", choices=["paper", "fast"], default="fast")
    parser.add_argument("--method", default="qsmrimnet")
    parser.add_argument("--inputs", default="referenced")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--width-multiplier", type=float, default=None)
    parser.add_argument("--folds", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--weights-fp16", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("train_bundled_model")

    sets = []
    for name, output_dir in args.cohort:
        lesions = collect_lesion_set(output_dir)
        if lesions is None:
            log.error("%s: no annotated lesions under %s", name, output_dir)
            return 1
        lesions.subjects = np.asarray([f"{name}:{s}" for s in lesions.subjects])
        log.info("%s: %s", name, lesions.summary())
        sets.append(lesions)
    lesions: LesionSet = concat(sets)
    config = protocol_config(args.protocol, method=args.method, input_level=args.inputs, max_steps=args.max_steps,
                             width_multiplier=args.width_multiplier, folds=args.folds, seeds=args.seeds,
                             weights_fp16=args.weights_fp16 or None, device="cpu")
    estimate = estimate_training_seconds(config, len(lesions),
                                         len(method_feature_names(args.method, config, list(lesions.feature_names))))
    log.info("training %s on %s; estimated %.1f min", args.method, lesions.summary(), estimate["seconds"] / 60)
    train(lesions, config, args.out)
    write_evaluation({args.method: drv.read_tsv(args.out / "oof_predictions.tsv")}, args.out,
                     title=f"qsmrim bundled model cross-validation ({', '.join(n for n, _ in args.cohort)})")
    log.info("model written to %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
