"""How many reviewed lesions a site needs before its F1 point is back within 0.05 of in-family.

Input: the participant outputs of a cohort on which the model is off (``*_desc-rim_lesions.tsv`` with the
model's raw probability) and that cohort's truth (``*_desc-annotations_lesions.tsv``, the phantom's own rim
annotation standing in for a rater). The model's in-family recall and precision at its F1 point are those of
its own out-of-fold evaluation (``metrics.json`` in the model directory).

For each number of reviewed lesions n and each draw (a site: the cohort's scans resampled with replacement;
n of its lesions reviewed), the site map of ``group --recalibrate`` (``calibration.fit_site_map``) and its
operating point are fitted exactly as the app does, and recall / precision / F1 at the site's F1 point are
measured on all the site's lesions (the calls the site gets; with ~30 rim+ a half-cohort left for judging
made one lesion worth more than the 0.05 tolerance). Two ways a rater picks lesions: ``random``
(uniform) and ``queue`` (qsmrim-review's order: most probable first). Variants measured: the prior towards the
model's map (1.0, the app's, vs 0: plain maximum likelihood) and the threshold rule (``empirical``: the
F1-optimal threshold of the reviewed lesions under the site map, the app's since this measurement;
``expected``: the F1 point the site map implies for all the site's lesions). "Within 0.05" means recall >= in-family recall - 0.05 and precision >= in-family
precision - 0.05; beside it, "F1 within 0.05 of the oracle": the best F1 any threshold reaches on the site
with every label known (ranking, not calibration, limits that one).

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
from typing import Callable, Iterator

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
from qsmrim_app.workflows.recalibrate import MIN_RIMMINUS, MIN_RIMPLUS, below_point, site_lesions  # noqa: E402


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


def review_draws(units: np.ndarray, scores: np.ndarray, n: int, draws: int, scenario: str,
                 keep: Callable[[np.ndarray], bool] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Simulated sites of one cohort, as both recalibration benchmarks draw them: per draw, a site (the
    cohort's scans ``units`` resampled with replacement: ``idx``, lesion rows) and the ``n`` lesions its
    rater reviewed (``rev``, positions in ``idx``): uniformly (``random``) or in qsmrim-review's queue order,
    most probable by ``scores`` first (``queue``). ``rev`` is None for a site with fewer than ``n`` lesions
    or one ``keep`` rejects. The generator is seeded by ``n``, so every variant of a scenario sees the same sites."""
    names = np.unique(units)
    members = {u: np.flatnonzero(units == u) for u in names}
    rng = np.random.default_rng(1000 + n)
    for _ in range(draws):
        idx = np.concatenate([members[u] for u in rng.choice(names, names.size, replace=True)])
        if n > idx.size or (keep is not None and not keep(idx)):
            yield idx, None
            continue
        if scenario == "random":
            yield idx, rng.choice(idx.size, n, replace=False)
        else:  # ties in random order
            yield idx, np.lexsort((rng.random(idx.size), -scores[idx]))[:n]


def one_cohort(outputs: Path, args, meta: dict, base: CalibrationMap, target_r: float, target_p: float) -> dict:
    """Everything measured on one cohort's outputs."""
    data = cohort(outputs)
    y_all, raw_all = data["label"].to_numpy(int), data["probability_raw"].to_numpy(float)
    p_model = base.apply(raw_all)
    units = (data["participant_id"] + "_" + data["session"]).to_numpy()
    names = np.unique(units)
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

    # -- site recalibration from n reviewed lesions: the site = the cohort's scans resampled with replacement
    variants = {"prior1_expected": (1.0, "expected"), "prior0_expected": (0.0, "expected"),
                "prior1_empirical": (1.0, "empirical"), "prior0_empirical": (0.0, "empirical")}
    model_t = float(meta["thresholds"]["f1"])
    results: dict = {}
    for scenario in ("random", "queue"):
        for name, (prior, rule) in variants.items():
            rows = []
            for n in args.sizes:
                recs = []
                for idx, rev in review_draws(units, p_model, n, args.draws, scenario,
                                             keep=lambda idx: 0 < y_all[idx].sum() < idx.size):
                    if rev is None:
                        continue
                    y, raw = y_all[idx], raw_all[idx]
                    n_pos = int(y[rev].sum())
                    best = at(y, base.apply(raw), f1_optimal_threshold(y, base.apply(raw)))  # all labels known
                    as_is = at(y, base.apply(raw), model_t)
                    if n_pos < MIN_RIMPLUS or n - n_pos < MIN_RIMMINUS:
                        recs.append({"refused": True, "oracle_f1": best["f1"], "as_is_f1": as_is["f1"]})
                        continue
                    site = fit_site_map(base, y[rev], raw[rev], prior=prior)
                    p_site = site.apply(raw)
                    t = (expected_operating_points(p_site)["f1"] if rule == "expected"
                         else below_point(f1_optimal_threshold(y[rev], p_site[rev]), p_site[rev]))
                    m = at(y, p_site, t)  # the site's calls on all its lesions
                    m.update(ece=expected_calibration_error(y, p_site), oracle_f1=best["f1"], as_is_f1=as_is["f1"],
                             refused=False)
                    recs.append(m)
                fitted = [r for r in recs if not r["refused"]]
                ok = [np.nan_to_num(r["recall"]) >= target_r and np.nan_to_num(r["precision"]) >= target_p
                      for r in fitted]
                near = [np.nan_to_num(r["f1"]) >= r["oracle_f1"] - args.tolerance for r in fitted]
                row = {"reviewed": n, "draws": len(recs), "refused": len(recs) - len(fitted),
                       "within_tolerance_of_in_family": float(np.sum(ok) / max(len(recs), 1)),
                       "f1_within_tolerance_of_oracle": float(np.sum(near) / max(len(recs), 1)),
                       "oracle_f1_median": float(np.median([r["oracle_f1"] for r in recs])),
                       "as_is_f1_median": float(np.median([r["as_is_f1"] for r in recs]))}
                for key in ("recall", "precision", "f1", "ece"):
                    vals = np.array([r[key] for r in fitted], float)
                    vals = vals[np.isfinite(vals)]
                    row[key] = ({"median": float(np.median(vals)), "p10": float(np.quantile(vals, 0.1)),
                                 "p90": float(np.quantile(vals, 0.9))} if vals.size else None)
                rows.append(row)
                print(scenario, name, json.dumps(row), flush=True)
            needed = {key: next((r["reviewed"] for r in rows if r[key] >= 0.8), None)
                      for key in ("within_tolerance_of_in_family", "f1_within_tolerance_of_oracle")}
            results.setdefault(scenario, {})[name] = {"prior": prior, "threshold_rule": rule, "by_size": rows,
                                                      "reviewed_needed_for_80pct_of_draws": needed}
    return {"outputs": str(outputs), "site": summary, "calibration": calibration, "recalibration": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outputs", type=Path, nargs="+", required=True, help="one participant output dir per cohort")
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

    cohorts = {Path(o).parent.name or str(o): one_cohort(Path(o), args, meta, base, target_r, target_p)
               for o in args.outputs}
    out = {"command": " ".join(sys.argv), "model_id": meta["model_id"],
           "in_family": in_family, "tolerance": args.tolerance,
           "criterion": "at the site's F1 point, on all the (resampled) site's lesions: recall >= in-family - tol "
                        "and precision >= in-family - tol; and F1 >= the oracle's F1 - tol (the best threshold "
                        "with every label known). A refused draw (too few rim+/rim-) counts as a miss",
           "minimum_reviewed": {"rim_positive": MIN_RIMPLUS, "rim_negative": MIN_RIMMINUS},
           "cohorts": cohorts,
           "draws": args.draws, "seconds": round(time.time() - start, 1),
           "machine": {"platform": platform.platform(), "python": platform.python_version()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=float) + "\n")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
