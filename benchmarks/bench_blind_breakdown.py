"""Where a model fails on a test family: its probabilities by the generator's lesion kind and by lesion volume.

The blind family's truth (``<bids>_truth/lesions.tsv``: ``kind`` per lesion: plain, rim_positive,
central_vein, edge_vein, short_arc, diamagnetic_focus, near_haemorrhage, ...) joined to the app's participant
outputs, each model directory scored as a user runs it (all members, its stored calibration map and F1
threshold). Beside the kinds: rim+ share and mean probability in lesion-volume bins, in the test family and in
a training corpus (``--train-outputs``), because a model that learnt "large lesions are rim+" from its training
families fails on a family whose rim+ lesions are small; and each model's ROC/PR AUC within each volume bin
beside lesion volume alone as a score, which separates a size prior from a failure to see small rims; each
radial feature's AUC within each bin; and, among rim+ lesions per bin, the test generator's rim attributes
(amplitude, thickness, coverage, slices) beside each model's median probability.

    python benchmarks/bench_blind_breakdown.py --outputs BLIND_OUT --truth BIDS1_truth --truth BIDS2_truth \\
        --model bundled=qsmrim_app/data/model --model former=OLD_MODEL --train-outputs TRAIN_OUT \\
        --out benchmarks/results/blind_breakdown.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qsmrim_app import derivatives as drv  # noqa: E402

VOLUME_BINS_MM3 = (0.0, 140.0, 310.0, np.inf)  # about the blind family's terciles
#: the blind generator's rim attributes (its truth ``lesions.tsv``), summarised among rim+ lesions per volume bin
RIM_TRUTH_COLUMNS = ("rim_visible_ppb", "rim_seen_p95_ppb", "rim_thickness_mm", "rim_coverage", "rule_slices_covered")


def volumes(outputs: Path) -> pd.DataFrame:
    """Per labelled lesion of a participant output directory: subject, session, lesion id, volume, label."""
    rows = []
    for unit, path in drv.find_units(outputs, "radiomics").items():
        geometry = drv.read_tsv(path)[["lesion_id", "volume_mm3"]]
        labels = drv.read_tsv(drv.output_path(outputs, unit, "annotations"))[["lesion_id", "rim_positive"]]
        table = geometry.merge(labels.dropna(), on="lesion_id")
        rows.append(table.assign(subject=unit.participant_id, session=unit.session or "n/a"))
    out = pd.concat(rows, ignore_index=True)
    out["rim_positive"] = out["rim_positive"].astype(int)
    return out


def volume_bins(table: pd.DataFrame):
    """(label, rows) per non-empty bin of ``VOLUME_BINS_MM3``, labelled like "0-140"."""
    bins = pd.cut(table["volume_mm3"], VOLUME_BINS_MM3)
    for b, g in table.groupby(bins, observed=True):
        yield f"{b.left:g}-{b.right:g}", g


def by_volume(table: pd.DataFrame, value: str) -> list[dict]:
    return [{"volume_mm3": name, "n": int(len(g)), "mean": float(g[value].mean())} for name, g in volume_bins(table)]


def ranking(g: pd.DataFrame, score: str, label: str = "label") -> dict:
    """n, rim+ count, ROC and PR AUC of `score` over the rows `g` (None where they hold one class only)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    both = g[label].nunique() == 2
    return {"n": int(len(g)), "rim_positive": int(g[label].sum()),
            "roc_auc": float(roc_auc_score(g[label], g[score])) if both else None,
            "pr_auc": float(average_precision_score(g[label], g[score])) if both else None}


def ranking_by_volume(table: pd.DataFrame, score: str, label: str = "label") -> list[dict]:
    """:func:`ranking` within each volume bin: whether a model tells rim+ from rim- among lesions of one size,
    apart from the size prior that a calibrated model may rightly carry (the rim+ share rises with volume in
    the test family too)."""
    return [{"volume_mm3": name, **ranking(g, score, label)} for name, g in volume_bins(table)]


def features_by_volume(table: pd.DataFrame, features: pd.DataFrame) -> dict[str, list[dict]]:
    """ROC AUC of each radial feature alone within each volume bin (an AUC under 0.5 means the feature points
    the wrong way there: e.g. rim minus core in small lesions, whose whole core lies within the rim's blur)."""
    out = {}
    for name in [c for c in features.columns if c.startswith("radial_")]:
        ranked = ranking_by_volume(table.assign(_f=features[name].to_numpy()).dropna(subset=["_f"]), "_f")
        out[name] = [{k: r[k] for k in ("volume_mm3", "n", "roc_auc")} for r in ranked]
    return out


def truth_by_volume(rimplus: pd.DataFrame, columns: list[str]) -> list[dict]:
    """Medians of the test generator's rim attributes (and of each model's probability) among rim+ lesions per
    volume bin: whether small rim+ lesions are fainter, thinner or shorter than large ones."""
    return [{"volume_mm3": name, "n": int(len(g)),
             **{c: float(pd.to_numeric(g[c], errors="coerce").median()) for c in columns}}
            for name, g in volume_bins(rimplus)]


def main(argv: list[str] | None = None) -> int:
    from bench_lofo_models import _pairs, scan_ids, score

    from qsmrim_app.model.predict import load_ensemble
    from qsmrim_app.workflows.training import collect_lesion_set

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, required=True, help="the test family's participant outputs")
    parser.add_argument("--truth", type=Path, action="append", required=True, help="a <bids>_truth directory")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--train-outputs", type=Path, default=None, help="a training corpus's participant outputs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    truth = pd.concat([pd.read_csv(t / "lesions.tsv", sep="\t", dtype={"subject": str}) for t in args.truth])
    truth["subject"] = "sub-" + truth["subject"].str.removeprefix("sub-")
    lesions = collect_lesion_set(args.outputs)
    table = pd.DataFrame({"subject": lesions.subjects, "session": [s or "n/a" for s in lesions.sessions],
                          "lesion_id": lesions.lesion_ids, "label": lesions.labels})
    geometry = volumes(args.outputs)[["subject", "session", "lesion_id", "volume_mm3"]]
    table = table.merge(geometry, on=["subject", "session", "lesion_id"], how="left")
    rim_columns = [c for c in RIM_TRUTH_COLUMNS if c in truth]
    table = table.merge(truth[["subject", "lesion_id", "kind", *rim_columns]], on=["subject", "lesion_id"], how="left")
    assert len(table) == len(lesions.labels), "one truth row per lesion (the truth has no sessions)"
    scans = scan_ids(lesions.subjects, lesions.sessions)
    result = {"command": " ".join(sys.argv), "outputs": str(args.outputs), "lesions": int(len(table)),
              "rim_positive": int(table["label"].sum()), "models": {}}
    for name, model_dir in _pairs(args.model).items():
        ens = load_ensemble(model_dir, device="cpu")
        pred = ens.predict(lesions.patches, lesions.features, lesions.feature_names, reference=lesions.reference)
        p = np.asarray(pred.probability, float)
        raw = np.asarray(pred.probability_raw if pred.probability_raw is not None else p, float)
        threshold = float(ens.thresholds["f1"])
        table[name], table[name + "_called"] = p, p >= threshold
        kinds = [{"kind": kind, "label": int(label), "n": int(len(g)), "mean_probability": float(g[name].mean()),
                  "called": float(g[name + "_called"].mean())}
                 for (kind, label), g in table.groupby(["kind", "label"])]
        rimplus = table[table["label"] == 1]
        result["models"][name] = {
            "model_id": ens.meta.get("model_id"),
            "scores": score(lesions.labels, raw, p, threshold, scans),
            "by_kind": kinds,
            "rimplus_by_volume": by_volume(rimplus, name),
            "rimplus_probability_volume_spearman": float(rimplus[name].corr(rimplus["volume_mm3"], method="spearman")),
            "ranking_by_volume": ranking_by_volume(table, name),
        }
        if "rim_seen_p95_ppb" in rim_columns:
            seen = pd.to_numeric(rimplus["rim_seen_p95_ppb"], errors="coerce")
            result["models"][name]["rimplus_probability_rim_seen_spearman"] = float(
                rimplus[name].corr(seen, method="spearman"))
        print(name, pd.DataFrame(kinds).round(3).to_string(index=False), sep="\n")
        print(name, "rim+ by volume:", result["models"][name]["rimplus_by_volume"])
        print(name, "ranking within volume bins:", result["models"][name]["ranking_by_volume"])
    result["rimplus_share_by_volume"] = {"test": by_volume(table, "label")}
    features = pd.DataFrame(np.asarray(lesions.features, float), columns=list(lesions.feature_names))
    result["radial_by_volume"] = features_by_volume(table, features)
    if rim_columns:
        result["rimplus_truth_by_volume"] = truth_by_volume(
            table[table["label"] == 1], rim_columns + list(result["models"]))
    # the training-free size floor: lesion volume alone as the score
    result["volume_alone"] = ranking_by_volume(table, "volume_mm3")
    result["volume_alone_pooled"] = {"volume_mm3": "all", **ranking(table, "volume_mm3")}
    if args.train_outputs:
        train = volumes(args.train_outputs)
        result["rimplus_share_by_volume"]["train"] = by_volume(train, "rim_positive")
        result["median_volume_mm3"] = {
            "train": {"rim+": float(train.loc[train["rim_positive"] == 1, "volume_mm3"].median()),
                      "rim-": float(train.loc[train["rim_positive"] == 0, "volume_mm3"].median())},
            "test": {"rim+": float(table.loc[table["label"] == 1, "volume_mm3"].median()),
                     "rim-": float(table.loc[table["label"] == 0, "volume_mm3"].median())}}
    print(json.dumps({k: result[k] for k in ("rimplus_share_by_volume", "median_volume_mm3", "volume_alone",
                                              "volume_alone_pooled") if k in result}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
