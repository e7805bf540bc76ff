"""Held-out evaluation on the semi-real cohort: trained models against the training-free floor.

Reads participant-level outputs (run with the cohort's rim annotations, ``--no-classify`` is fine) of a
training and a held-out cohort, predicts every held-out lesion with each model directory given
(``model.json`` of ``group --train``, its comparators, the bundled model) and scores them with the
same metric code as ``group --train``: ROC AUC, pROC AUC (FPR < 0.1), PR AUC, F1, and the per-unit
(participant x session, i.e. x grid) rim+ count agreement at each model's own F1 threshold. The
floor, the mean QSM of the lesion's inner shell minus its core, needs no training; its threshold is
the F1-optimal one on the training cohort. Everything is broken down by QSM grid (the session label).

    python benchmarks/bench_semireal.py --train-out TRAIN_OUT --test-out TEST_OUT \
        --model qsmrim_app/data/model --model TRAIN_OUT/models/qsmrimnet-* --out benchmarks/results/semireal.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from qsmrim_app.model.inputs import FLOOR_COLUMN
from qsmrim_app.model.metrics import f1_optimal_threshold, lesion_and_subject_metrics, paired_bootstrap
from qsmrim_app.model.predict import load_ensemble
from qsmrim_app.workflows.training import collect_lesion_set

KEYS = ("roc_auc_pooled", "pauc_fpr_0.1_pooled", "pr_auc_pooled", "f1", "sensitivity", "ppv", "count_mse",
        "count_pearson_r")


def collect(output_dir: Path) -> list[dict]:
    """Per scan (participant x session): the annotated lesions as ``group --train`` reads them."""
    lesions = collect_lesion_set(output_dir)
    if lesions is None:
        return []
    units = []
    for subject, session in dict.fromkeys(zip(lesions.subjects, lesions.sessions)):
        part = lesions.subset(np.flatnonzero((lesions.subjects == subject) & (lesions.sessions == session)))
        units.append({"unit": f"{subject}_ses-{session}" if session else str(subject), "subject": str(subject),
                      "grid": session or "n/a",
                      "patches": part.patches, "reference": part.reference, "features": part.features,
                      "names": list(part.feature_names), "labels": part.labels})
    return units


def _score(units: list[dict], probability: list[np.ndarray], threshold: float) -> dict:
    y = np.concatenate([u["labels"] for u in units])
    p = np.concatenate(probability)
    ids = np.concatenate([[u["unit"]] * len(u["labels"]) for u in units])
    m = lesion_and_subject_metrics(y, p, np.zeros(y.size, int), ids, thresholds_per_fold={0: threshold})
    return {k: m.get(k) for k in KEYS} | {"n_lesions": int(y.size), "n_rimplus": int(y.sum()),
                                          "n_units": int(np.unique(ids).size), "threshold": threshold}


def evaluate(predict, units: list[dict], threshold: float) -> tuple[dict, np.ndarray]:
    """Scores on all held-out lesions and per grid; and the pooled probabilities (for the paired test)."""
    probs = [predict(u) for u in units]
    out = {"all": _score(units, probs, threshold)}
    for grid in sorted({u["grid"] for u in units}):
        sel = [i for i, u in enumerate(units) if u["grid"] == grid]
        out[grid] = _score([units[i] for i in sel], [probs[i] for i in sel], threshold)
    return out, np.concatenate(probs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-out", type=Path, required=True)
    parser.add_argument("--test-out", type=Path, required=True)
    parser.add_argument("--model", type=Path, action="append", default=[], help="model directory (repeat)")
    parser.add_argument("--comparators", action="store_true", help="also each model's comparators/*")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    train, test = collect(args.train_out), collect(args.test_out)
    if not train or not test:
        print("no annotated units found", file=sys.stderr)
        return 1

    def floor(u: dict) -> np.ndarray:
        return np.nan_to_num(u["features"][:, u["names"].index(FLOOR_COLUMN)].astype(float))

    y_train = np.concatenate([u["labels"] for u in train])
    s_train = np.concatenate([floor(u) for u in train])
    floor_name = "floor: shell minus core (training-free)"
    results = {}
    results[floor_name], p_floor = evaluate(floor, test, f1_optimal_threshold(y_train, s_train))
    y_test = np.concatenate([u["labels"] for u in test])
    participants = np.concatenate([[u["subject"]] * len(u["labels"]) for u in test])
    model_dirs = list(args.model)
    if args.comparators:
        model_dirs += [c for m in args.model for c in sorted((m / "comparators").glob("*")) if (c / "model.json").is_file()]
    for model_dir in model_dirs:
        ens = load_ensemble(model_dir, device="cpu")

        def predict(u: dict, ens=ens) -> np.ndarray:
            if not len(u["labels"]):
                return np.zeros(0)
            return ens.predict(u["patches"], u["features"], u["names"], reference=u["reference"]).probability

        name = f"{ens.method} ({model_dir.name})"
        results[name], p_model = evaluate(predict, test, ens.thresholds["f1"])
        # model minus floor on the same lesions, participants resampled (6 held-out people: a wide interval)
        results[name]["paired_vs_floor"] = paired_bootstrap(y_test, p_model, p_floor, participants)
    summary = {"train_units": len(train), "train_lesions": int(y_train.size), "train_rimplus": int(y_train.sum()),
               "test_units": len(test), "test_grids": sorted({u["grid"] for u in test}), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, default=float))
    rows = [{"method": name, **{k: res["all"][k] for k in KEYS}} for name, res in results.items()]
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    paired = [{"method": name, "metric": m, **{k: res["paired_vs_floor"][m][k] for k in
                                               ("difference", "ci_low", "ci_high", "p_value")}}
              for name, res in results.items() if "paired_vs_floor" in res for m in ("roc_auc", "pauc", "pr_auc")]
    if paired:
        print("\nmodel minus the floor (pooled, paired bootstrap over held-out participants):")
        print(pd.DataFrame(paired).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
