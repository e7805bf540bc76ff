"""How many reviewed lesions a site needs before its F1 point is back within 0.05 of in-family.

Input: the participant outputs of a cohort on which the model is off (``*_desc-rim_lesions.tsv`` with the
model's raw probability) and that cohort's truth (``*_desc-annotations_lesions.tsv``, the phantom's own rim
annotation standing in for a rater). The model's in-family recall and precision at its F1 point are those of
its own out-of-fold evaluation (``metrics.json`` in the model directory).

For each number of reviewed lesions n and each draw (the cohort's scans split at random into a site's
current half and its future half; n lesions of the current half reviewed), the site map of
``group --recalibrate`` (``calibration.fit_site_map``) and its operating point are fitted exactly as the app
does, and recall / precision at the F1 point are measured on the future half's lesions. Two ways a rater picks lesions: ``random``
(uniform) and ``queue`` (qsmrim-review's order: most probable first). Variants measured: the prior towards the
model's map (1.0, the app's, vs 0: plain maximum likelihood) and the threshold rule (``expected``: the F1
point the site map implies for all the site's lesions, the app's; ``empirical``: the F1-optimal threshold on
the reviewed lesions). "Within 0.05" means recall >= in-family recall - 0.05 and precision >= in-family
precision - 0.05. The ceiling: the best F1 point with every label known (``oracle``).

Also measured: the calibration methods of ``group --train`` on the model's own out-of-fold predictions
(cross-fitted log loss / ECE) and how the chosen map transfers to this cohort.

    python benchmarks/bench_recalibration.py --outputs /tmp/18calib/cohort/out [--draws 200]
Writes ``benchmarks/results/recalibration.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qsmrim_app import derivatives as drv  # noqa: E402
from qsmrim_app.config import BUNDLED_MODEL_DIR  # noqa: E402
from qsmrim_app.model.calibration import (CANDIDATES, CalibrationMap, expected_calibration_error,  # noqa: E402
                                          expected_operating_points, fit_cv_calibration, fit_map, fit_site_map,
                                          log_loss)
from qsmrim_app.model.metrics import confusion, f1_optimal_threshold, pr_auc, roc_auc  # noqa: E402
from qsmrim_app.workflows.recalibrate import MIN_RIMMINUS, MIN_RIMPLUS, site_lesions  # noqa: E402


def cohort(outputs: Path) -> pd.DataFrame:
    lesions = site_lesions(outputs)
    truth = []
    for unit, path in drv.find_units(outputs, "annotations").items():
        t = drv.read_tsv(path)[["lesion_id", "rim_positive"]].dropna()
        truth.append(t.assign(participant_id=unit.participant_id, session=unit.session or "n/a"))
    truth = pd.concat(truth, ignore_index=True).rename(columns={"rim_positive": "label"})
    truth["label"] = truth["label"].astype(int)
    merged = lesions.merge(truth, on=["participant_id", "session", "lesion_id"], how="inner")
    merged["probability_raw"] = merged["probability_raw"].fillna(merged["probability"])
    return merged


def at(y: np.ndarray, p: np.ndarray, t: float) -> dict:
    c = confusion(y, (p >= t).astype(int))
    return {"recall": c["sensitivity"], "precision": c["ppv"], "f1": c["f1"], "flagged": int((p >= t).sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outputs", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=BUNDLED_MODEL_DIR)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 30, 40, 60, 80, 100, 120])
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "recalibration.json")
    args = ap.parse_args()
    start = time.time()

    meta = json.loads((args.model / "model.json").read_text())
    metrics = json.loads((args.model / "metrics.json").read_text())
    metrics = metrics.get(meta["method"], metrics)
    base = CalibrationMap.from_dict(meta.get("calibration"))
    in_family = {"recall": metrics["sensitivity"], "precision": metrics["ppv"], "f1": metrics["f1"],
                 "source": f"{args.model}/metrics.json (out of fold, per-fold F1 thresholds)"}
    target_r, target_p = in_family["recall"] - args.tolerance, in_family["precision"] - args.tolerance

    data = cohort(args.outputs)
    y_all, raw_all = data["label"].to_numpy(int), data["probability_raw"].to_numpy(float)
    p_model = base.apply(raw_all)
    units = data["participant_id"] + "_" + data["session"]
    names = np.unique(units)
    members = {u: np.flatnonzero(units.to_numpy() == u) for u in names}
    oracle_t = f1_optimal_threshold(y_all, p_model)
    summary = {
        "lesions": int(y_all.size), "rim_positive": int(y_all.sum()), "scans": int(names.size),
        "roc_auc": roc_auc(y_all, p_model), "pr_auc": pr_auc(y_all, p_model),
        "ece_model": expected_calibration_error(y_all, p_model),
        "at_model_f1_threshold": {"threshold": float(meta["thresholds"]["f1"]),
                                  **at(y_all, p_model, float(meta["thresholds"]["f1"]))},
        "oracle_f1_point": {"threshold": oracle_t, **at(y_all, p_model, oracle_t)},
    }
    print(json.dumps(summary, indent=1), flush=True)

    # -- calibration at training time: the candidates on the model's own out-of-fold predictions
    oof = drv.read_tsv(args.model / "oof_predictions.tsv")
    oof_raw = oof["probability"].to_numpy(float)  # the ensemble mean (calibrated: probability_calibrated)
    cv = fit_cv_calibration(oof["label"].to_numpy(int), oof_raw, oof["fold"].to_numpy(int))
    transfer = {}
    for method in CANDIDATES:
        m = fit_map(method, oof["label"].to_numpy(int), oof_raw)
        q = m.apply(raw_all)
        transfer[method] = {"ece": expected_calibration_error(y_all, q), "log_loss": log_loss(y_all, q),
                            "mean_probability": float(q.mean())}
    calibration = {"in_family_cross_fitted": cv.selection, "chosen": cv.map.method,
                   "off_family_with_map_fitted_on_all_oof": transfer,
                   "observed_rim_positive_fraction_off_family": float(y_all.mean())}

    # -- site recalibration from n reviewed lesions: review half of the scans, judge on the other half
    variants = {"prior1_expected": (1.0, "expected"), "prior0_expected": (0.0, "expected"),
                "prior1_empirical": (1.0, "empirical"), "prior0_empirical": (0.0, "empirical")}
    results: dict = {}
    for scenario in ("random", "queue"):
        for name, (prior, rule) in variants.items():
            rows = []
            for n in args.sizes:
                rng = np.random.default_rng(1000 + n)
                recs = []
                for _ in range(args.draws):
                    order = rng.permutation(names)
                    site_idx = np.concatenate([members[u] for u in order[: names.size // 2]])
                    new_idx = np.concatenate([members[u] for u in order[names.size // 2:]])
                    if n > site_idx.size:
                        continue
                    y, raw = y_all[site_idx], raw_all[site_idx]
                    if scenario == "random":
                        rev = rng.choice(site_idx.size, n, replace=False)
                    else:  # qsmrim-review's queue: most probable first (ties in random order)
                        rev = np.lexsort((rng.random(site_idx.size), -base.apply(raw)))[:n]
                    n_pos = int(y[rev].sum())
                    if n_pos < MIN_RIMPLUS or n - n_pos < MIN_RIMMINUS:
                        recs.append({"refused": True})
                        continue
                    site = fit_site_map(base, y[rev], raw[rev], prior=prior)
                    p_site = site.apply(raw)
                    t = (expected_operating_points(p_site)["f1"] if rule == "expected"
                         else f1_optimal_threshold(y[rev], p_site[rev]))
                    y_new, p_new = y_all[new_idx], site.apply(raw_all[new_idx])
                    m = at(y_new, p_new, t)
                    m["ece"] = expected_calibration_error(y_new, p_new)
                    best = at(y_new, p_new, f1_optimal_threshold(y_new, p_new))  # every label of the new scans known
                    m["oracle_ok"] = bool(np.nan_to_num(m["recall"]) >= best["recall"] - args.tolerance
                                          and np.nan_to_num(m["precision"]) >= best["precision"] - args.tolerance)
                    m["refused"] = False
                    recs.append(m)
                fitted = [r for r in recs if not r["refused"]]
                ok = [np.nan_to_num(r["recall"]) >= target_r and np.nan_to_num(r["precision"]) >= target_p
                      for r in fitted]
                row = {"reviewed": n, "draws": len(recs), "refused": len(recs) - len(fitted),
                       "within_tolerance_of_in_family": float(np.sum(ok) / max(len(recs), 1)),
                       "within_tolerance_of_oracle": float(sum(r["oracle_ok"] for r in fitted) / max(len(recs), 1))}
                for key in ("recall", "precision", "f1", "ece"):
                    vals = np.array([r[key] for r in fitted], float)
                    vals = vals[np.isfinite(vals)]
                    row[key] = ({"median": float(np.median(vals)), "p10": float(np.quantile(vals, 0.1)),
                                 "p90": float(np.quantile(vals, 0.9))} if vals.size else None)
                rows.append(row)
                print(scenario, name, json.dumps(row), flush=True)
            needed = {key: next((r["reviewed"] for r in rows if r[f"within_tolerance_of_{key}"] >= 0.8), None)
                      for key in ("in_family", "oracle")}
            results.setdefault(scenario, {})[name] = {"prior": prior, "threshold_rule": rule, "by_size": rows,
                                                      "reviewed_needed_for_80pct_of_draws": needed}
    out = {"command": " ".join(sys.argv), "outputs": str(args.outputs), "model_id": meta["model_id"],
           "in_family": in_family, "tolerance": args.tolerance,
           "criterion": "recall >= reference - tol and precision >= reference - tol at the site's F1 point, on the "
                        "scans of the other half (reference: in-family out-of-fold, or the oracle F1 point of "
                        "those scans with every label known); a refused draw (too few rim+/rim-) counts as a miss",
           "minimum_reviewed": {"rim_positive": MIN_RIMPLUS, "rim_negative": MIN_RIMMINUS},
           "site": summary, "calibration": calibration, "recalibration": results,
           "draws": args.draws, "seconds": round(time.time() - start, 1),
           "machine": {"platform": platform.platform(), "python": platform.python_version()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=float) + "\n")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
