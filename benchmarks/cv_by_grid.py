"""Cross-validated figures of trained models, broken down by QSM grid (the model card's per-grid table).

``group --train`` reports one pooled table. A cohort that mixes scanners (here: semi-real sessions on two
grids and phantoms on two more) can hide a grid on which a model loses to the floor, so this splits each
model's own out-of-fold predictions (``oof_predictions.tsv``, same folds for every model) by the QSM voxel
size of the scan each lesion came from (read from the participant level's QSM-space lesion map). Within a
grid: pooled ROC / pROC (FPR < 0.1) / PR AUC, and F1 and per-scan rim+ count agreement at each model's own
per-fold F1 thresholds (the thresholds ``group --train`` chose on all grids together). Then every model
against the first one on all lesions: pooled AUC differences with a paired participant-bootstrap 95 % interval
(``evaluation.paired_differences``), since a few dozen rim+ lesions leave differences of 0.01-0.02 in noise.

    python benchmarks/cv_by_grid.py --output-dir TRAIN_OUT --model TRAIN_OUT/models/qsmrimnet-* \
        --model TRAIN_OUT/models/logreg-* ... --out benchmarks/results/cv_by_grid.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from qsmrim_app import derivatives as drv
from qsmrim_app.model.evaluation import count_units, paired_differences
from qsmrim_app.model.metrics import lesion_and_subject_metrics

KEYS = ("roc_auc_pooled", "pauc_fpr_0.1_pooled", "pr_auc_pooled", "f1", "count_mse", "count_pearson_r")


def unit_grids(output_dir: Path) -> dict[tuple[str, str], str]:
    """(participant_id, session or "n/a") -> QSM voxel size as "AxBxC" mm."""
    grids = {}
    for unit, path in drv.find_units(output_dir, "lesions_dseg").items():
        zooms = nib.load(str(path)).header.get_zooms()[:3]
        grids[(unit.participant_id, unit.session or "n/a")] = "x".join(f"{z:g}" for z in np.round(zooms, 2))
    return grids


def by_grid(oof: pd.DataFrame, grids: dict[tuple[str, str], str]) -> dict[str, dict]:
    session = oof["session"].fillna("n/a").astype(str) if "session" in oof else pd.Series("n/a", index=oof.index)
    keys = list(zip(oof["subject"].astype(str), session))
    missing = sorted({k for k in keys if k not in grids})
    if missing:
        raise SystemExit(f"no QSM-space lesion map for {missing[:3]} in the output dir")
    grid = np.array([grids[k] for k in keys])
    units = count_units(oof)  # the scans rim+ counts are compared on, as group --train does
    out = {}
    for name, sel in [("all", np.ones(len(oof), bool)), *[(g, grid == g) for g in sorted(set(grid))]]:
        part = oof[sel]
        m = lesion_and_subject_metrics(part["label"].to_numpy(int), part["probability"].to_numpy(float),
                                       part["fold"].to_numpy(int), units[sel])
        out[name] = {k: m.get(k) for k in KEYS} | {"n_lesions": int(sel.sum()),
                                                   "n_rimplus": int(part["label"].sum()),
                                                   "n_scans": int(np.unique(units[sel]).size)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="the training cohort's output dir")
    parser.add_argument("--model", type=Path, action="append", required=True, help="model directory (repeat)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    grids = unit_grids(args.output_dir)
    results, oofs = {}, {}
    for model_dir in args.model:
        meta = json.loads((model_dir / "model.json").read_text())
        name = f"{meta['method']} ({model_dir.name})"
        oofs[name] = drv.read_tsv(model_dir / "oof_predictions.tsv")
        results[name] = by_grid(oofs[name], grids)
    paired = paired_differences(oofs, next(iter(oofs))) if len(oofs) > 1 else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stored = {"by_grid": results, "paired_vs_first": [] if paired is None else paired.to_dict("records")}
    args.out.write_text(json.dumps(stored, indent=1, default=float) + "\n")
    rows = [{"method": name, "grid": g, **{k: v[k] for k in (*KEYS, "n_lesions", "n_rimplus")}}
            for name, res in results.items() for g, v in res.items()]
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if paired is not None:
        print(f"\npaired against {paired['reference'].iloc[0]} (pooled, participant bootstrap):")
        print(paired.drop(columns=["reference"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
