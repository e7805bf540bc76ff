"""The blind family through the app's participant level: counts, carried labels, floor and bundled model.

Generates the blind family (docs/blind_family.md), runs ``run.py BIDS OUT participant`` on it with the
bundled model (default), and scores per lesion against the generator's truth:
- counts: lesions, lesions of >= 10 QSM voxels, rim+ (truth), lesions in the app's tables, rim labels the
  app carried from ``desc-rim_dseg`` (annotations table) and their agreement with the truth;
- the training-free floor: ROC AUC / PR AUC of ``shell_minus_core_ppb`` (radiomics table);
- the bundled model: ROC AUC / PR AUC of ``probability`` and recall / precision of its own ``rim_positive``
  call (its stored threshold), from ``desc-rim_lesions.tsv``.
Labels are the app's carried labels (majority of desc-rim_dseg voxels on its QSM-grid instances).
Nothing here is tuned: the family is generated once with a fixed seed and scored as it comes out.

    nice -n 10 python benchmarks/bench_blind_family.py --participants 6 --seed 1 \
        --root /tmp/18blind/bench --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)


def _aucs(labels: np.ndarray, scores: np.ndarray) -> dict:
    ok = np.isfinite(scores)
    labels, scores = labels[ok], scores[ok]
    if labels.min(initial=0) == labels.max(initial=0):
        return {"roc_auc": None, "pr_auc": None, "n": int(ok.sum())}
    return {"roc_auc": float(roc_auc_score(labels, scores)), "pr_auc": float(average_precision_score(labels, scores)),
            "n": int(ok.sum()), "prevalence": float(labels.mean())}


def score(bids: Path, out: Path) -> dict:
    truth = _read(Path(f"{bids}_truth") / "lesions.tsv")
    rows, per_subject = [], {}
    missing, thresholds = [], set()
    for subject in sorted(truth["subject"].unique()):
        anat = out / f"sub-{subject}" / "anat"
        if not (anat / f"sub-{subject}_space-QSM_desc-radiomics_lesions.tsv").is_file():
            missing.append(subject)  # the app has not (yet) published this participant
            continue
        radiomics = _read(anat / f"sub-{subject}_space-QSM_desc-radiomics_lesions.tsv")
        rim = _read(anat / f"sub-{subject}_space-QSM_desc-rim_lesions.tsv")
        ann = _read(anat / f"sub-{subject}_space-QSM_desc-annotations_lesions.tsv")
        thresholds.add(float(_read(anat / f"sub-{subject}_desc-rim_summary.tsv")["threshold"].iloc[0]))
        t = truth[truth["subject"] == subject]
        table = (radiomics[["lesion_id", "voxels", "shell_minus_core_ppb"]]
                 .merge(rim[["lesion_id", "probability", "rim_positive"]].rename(columns={"rim_positive": "predicted"}),
                        on="lesion_id")
                 .merge(ann[["lesion_id", "rim_positive"]].rename(columns={"rim_positive": "label"}), on="lesion_id", how="left")
                 .merge(t[["lesion_id", "rim_positive", "kind"]].rename(columns={"rim_positive": "truth"}), on="lesion_id",
                        how="left"))
        table["subject"] = subject
        rows.append(table)
        per_subject[subject] = {
            "truth_lesions": int(len(t)), "truth_lesions_ge10_qsm_voxels": int((t["qsm_voxels"] >= 10).sum()),
            "truth_rim_positive": int(t["rim_positive"].sum()),
            "app_lesions": int(len(table)), "app_rim_positive_labels": int(table["label"].fillna(0).sum()),
            "app_predicted_rim_positive": int(table["predicted"].sum()),
        }
    lesions = pd.concat(rows, ignore_index=True)
    labelled = lesions[lesions["label"].notna()]
    y = labelled["label"].astype(int).to_numpy()
    predicted = labelled["predicted"].astype(int).to_numpy()
    tp = int(((predicted == 1) & (y == 1)).sum())
    truth = truth[truth["subject"].isin(per_subject)]
    summary = {
        "participants": len(per_subject), "participants_without_app_outputs": missing,
        "truth_lesions": int(len(truth)), "truth_rim_positive": int(truth["rim_positive"].sum()),
        "truth_rim_positive_ge10_qsm_voxels": int(truth.loc[truth["qsm_voxels"] >= 10, "rim_positive"].sum()),
        "app_lesions": int(len(lesions)), "app_lesions_labelled": int(len(labelled)),
        "app_rim_positive_labels": int(y.sum()),
        "carried_label_agrees_with_truth": float((labelled["label"] == labelled["truth"]).mean()),
        "kinds_in_app_table": {k: int(v) for k, v in lesions["kind"].value_counts().items()},
        "by_kind_and_label": {f"{kind}/{'rim+' if lab else 'rim-'}": {
            "n": int(len(g)), "mean_probability": float(g["probability"].mean()),
            "median_shell_minus_core_ppb": float(g["shell_minus_core_ppb"].median())}
            for (kind, lab), g in labelled.groupby(["kind", "label"])},
        "floor_shell_minus_core_ppb": _aucs(y, labelled["shell_minus_core_ppb"].to_numpy(dtype=float)),
        "bundled_model_probability": _aucs(y, labelled["probability"].to_numpy(dtype=float)),
        "bundled_model_at_stored_threshold": {
            "threshold": sorted(thresholds)[0] if len(thresholds) == 1 else sorted(thresholds),
            "recall": tp / max(int(y.sum()), 1), "precision": tp / max(int(predicted.sum()), 1),
            "predicted_positive": int(predicted.sum()), "true_positive": tp},
        "per_subject": per_subject,
    }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--root", type=Path, default=Path("/tmp/blind_bench"))
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--skip-app", action="store_true")
    parser.add_argument("--result", type=Path, default=REPO / "benchmarks" / "results" / "blind_family.json")
    args = parser.parse_args()
    bids, out, work = args.root / "bids", args.root / "out", args.root / "work"
    timings = {}
    if not args.skip_generate:
        from qsmrim_app.synthetic.blind import generate_blind_family

        start = time.time()
        generate_blind_family(bids, args.data_dir, args.participants, args.seed)
        timings["generate_s"] = time.time() - start
    if not args.skip_app:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        start = time.time()
        subprocess.run([sys.executable, str(REPO / "run.py"), str(bids), str(out), "participant", "-w", str(work),
                        "--nprocs", "1"], check=True, env=env)
        timings["app_participant_level_s"] = time.time() - start
    result = {"command": f"python benchmarks/bench_blind_family.py --participants {args.participants} "
                         f"--seed {args.seed}", "seed": args.seed, **score(bids, out), "wall_seconds": timings,
              "load_average_at_end": os.getloadavg()[0]}
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_subject"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
