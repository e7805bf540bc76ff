"""Leave-one-family-out from models trained with ``group --train --cv-group-by family``.

When the folds of ``group --train`` keep each generator family (or site) whole and there is one fold per
family, every out-of-fold prediction in ``oof_predictions.tsv`` is a prediction on a family the member
never saw: the model's own training *is* the leave-one-family-out evaluation, at the full training budget
and at no extra cost. This script turns those tables into the headline table of docs/families.md:

* per left-out family F and method: ROC / PR AUC on F's lesions (the member's raw probability);
* the probability a user would read: a calibration map chosen and fitted the app's way
  (``calibration.fit_cv_calibration``) on the *other* families' out-of-fold predictions, applied to F;
  its expected calibration error (ECE) on F;
* the F1 operating point the app would store (``train.calibrated_thresholds`` on the other families),
  recall and precision on F at it; per-scan count r and MSE (counts at that threshold) and the r of the
  expected counts (sum of calibrated probabilities);
* the first method minus every other by the paired participant bootstrap, per family and pooled over all
  families (pooled on the calibrated out-of-family probabilities: what a user's table would rank), and on
  the mean of the families' own PR/ROC AUC (ranking within each family, participants resampled within it);
* the obvious alternative to a rater's recalibration, measured on the first method: re-estimating each
  left-out family's rim+ share from its own unlabelled lesions (EM under label shift, Saerens et al., Neural
  Computation 2002) and moving the calibrated probabilities to it (``prior_shift``).

Caveat, stated in the JSON: the other families' predictions that fit F's map and threshold come from
members that did train on F (a nested leave-two-out would avoid it at 5x the cost).

``--test-family NAME=OUT`` adds families never trained on (the blind family), scored by each model
directory as a user would use it (all members, its stored calibration map and F1 threshold).

    python benchmarks/bench_lofo_models.py --participants BIDS/participants.tsv --column family \\
        --model qsmrimnet=OUT/models/qsmrimnet-... --model logreg=OUT/models/logreg-... \\
        --test-family blind=BLIND_OUT --out benchmarks/results/lofo_models.json --predictions lofo_models.tsv
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmarks, run as scripts or loaded by tests
from bench_recalibration import review_draws  # noqa: E402
from qsmrim_app.model.calibration import CalibrationMap, calibration_metrics, fit_cv_calibration, fit_site_map
from qsmrim_app.model.metrics import confusion, f1_optimal_threshold, lesion_and_subject_metrics, paired_bootstrap
from qsmrim_app.model.train import calibrated_thresholds

KEYS = ("roc_auc_pooled", "pr_auc_pooled", "sensitivity", "ppv", "f1", "count_pearson_r", "count_mse")
CAVEAT = ("the other families' out-of-fold predictions that fit a left-out family's calibration map and F1 "
          "threshold come from members that trained on that family (leave-one-out, not nested)")


def scan_ids(subjects, sessions) -> np.ndarray:
    """One id per scan (``sub-X`` or ``sub-X_ses-Y``): counts are per scan, not per person."""
    return np.asarray([f"{s}_ses-{t}" if isinstance(t, str) and t not in ("", "n/a") else str(s)
                       for s, t in zip(subjects, sessions)])


def expected_counts(y: np.ndarray, p_cal: np.ndarray, scans: np.ndarray) -> dict:
    """Per scan, the true rim+ count against the expected one (sum of calibrated probabilities)."""
    counts = pd.DataFrame({"scan": scans, "y": y, "p": p_cal}).groupby("scan").agg(true=("y", "sum"), expected=("p", "sum"))
    r = (float(np.corrcoef(counts["true"], counts["expected"])[0, 1])
         if len(counts) > 2 and counts["true"].std() > 0 and counts["expected"].std() > 0 else None)
    return {"n_scans": int(len(counts)), "expected_count_r": r,
            "expected_count_mse": float(((counts["expected"] - counts["true"]) ** 2).mean())}


def read_oof(model_dir: Path, family_of: dict[str, str]) -> pd.DataFrame:
    """A model directory's out-of-fold table with each lesion's family; one family per fold is required."""
    oof = pd.read_csv(Path(model_dir) / "oof_predictions.tsv", sep="\t", dtype={"session": str})
    oof["family"] = oof["subject"].map(family_of)
    if oof["family"].isna().any():
        missing = sorted(oof.loc[oof["family"].isna(), "subject"].unique())
        raise SystemExit(f"{model_dir}: no family for {', '.join(missing[:5])}")
    per_fold = oof.groupby("fold")["family"].nunique()
    if (per_fold != 1).any():
        raise SystemExit(f"{model_dir}: folds mix families ({per_fold.to_dict()}); train with --cv-group-by "
                         "family and --folds equal to the number of families")
    oof["scan"] = scan_ids(oof["subject"], oof["session"])
    return oof.sort_values(["subject", "session", "lesion_id"]).reset_index(drop=True)


def out_of_family(oof: pd.DataFrame, family: str) -> tuple[np.ndarray, float, CalibrationMap]:
    """F's calibrated probabilities and the F1 threshold, both fitted the app's way on the other families."""
    other = oof[oof["family"] != family]
    y_o, p_o = other["label"].to_numpy(int), other["probability"].to_numpy(float)
    fold_o = np.unique(other["fold"].to_numpy(), return_inverse=True)[1]  # 0..K-2, as the app numbers folds
    calibration = fit_cv_calibration(y_o, p_o, fold_o)
    threshold = calibrated_thresholds(y_o, calibration.map.apply(p_o), fold_o)["f1"]
    mine = oof["family"] == family
    return calibration.map.apply(oof.loc[mine, "probability"].to_numpy(float)), float(threshold), calibration.map


def score(y: np.ndarray, p_raw: np.ndarray, p_cal: np.ndarray, threshold: float, scans: np.ndarray) -> dict:
    """Ranking on the raw probability; calibration, operating point and counts on the calibrated one."""
    ranked = lesion_and_subject_metrics(y, p_raw, np.zeros(y.size, int), scans, thresholds_per_fold={0: 0.5})
    called = lesion_and_subject_metrics(y, p_cal, np.zeros(y.size, int), scans, thresholds_per_fold={0: threshold})
    out = {k: called.get(k) for k in KEYS}
    out.update({"roc_auc_pooled": ranked.get("roc_auc_pooled"), "pr_auc_pooled": ranked.get("pr_auc_pooled"),
                "threshold_f1": threshold, "n_lesions": int(y.size), "n_rimplus": int(y.sum()),
                **expected_counts(y, p_cal, scans)})
    cal = calibration_metrics(y, p_cal, p_raw)
    out.update({k: cal[k] for k in ("ece", "ece_raw", "log_loss", "brier")})
    return out


def pooled_scores(y: np.ndarray, p_cal: np.ndarray, scans: np.ndarray) -> dict:
    """All left-out families at once, each lesion at its own family's out-of-family calibration."""
    from qsmrim_app.model.metrics import pr_auc, roc_auc

    cal = calibration_metrics(y, p_cal)
    return {"roc_auc_pooled": roc_auc(y, p_cal), "pr_auc_pooled": pr_auc(y, p_cal), "ece": cal["ece"],
            "log_loss": cal["log_loss"], "brier": cal["brier"], "n_lesions": int(y.size), "n_rimplus": int(y.sum()),
            **expected_counts(y, p_cal, scans)}


def lofo(tables: dict[str, pd.DataFrame], n_boot: int) -> tuple[dict, pd.DataFrame]:
    """Per left-out family and pooled: every method's scores and the first method minus each other."""
    methods = list(tables)
    reference = tables[methods[0]]
    for m, t in tables.items():
        if not t[["subject", "session", "lesion_id", "label"]].equals(reference[["subject", "session", "lesion_id", "label"]]):
            raise SystemExit(f"{m}: its out-of-fold table lists other lesions than {methods[0]}'s")
    results, rows, calibrated = {}, [], {m: np.zeros(len(reference)) for m in methods}
    for family in sorted(reference["family"].unique()):
        mine = (reference["family"] == family).to_numpy()
        y, scans = reference.loc[mine, "label"].to_numpy(int), reference.loc[mine, "scan"].to_numpy()
        entry = {"methods": {}}
        for m, t in tables.items():
            p_cal, thr, cmap = out_of_family(t, family)
            calibrated[m][mine] = p_cal
            entry["methods"][m] = score(y, t.loc[mine, "probability"].to_numpy(float), p_cal, thr, scans) | {
                "calibration": cmap.method}
            rows += [{"family": family, "method": m, "subject": s, "session": ses, "lesion_id": int(i),
                      "label": int(yy), "probability_raw": round(float(pr), 6), "probability": round(float(pc), 6),
                      "threshold_f1": round(thr, 6)}
                     for s, ses, i, yy, pr, pc in zip(t.loc[mine, "subject"], t.loc[mine, "session"],
                                                     t.loc[mine, "lesion_id"], y, t.loc[mine, "probability"], p_cal)]
        if 0 < y.sum() < y.size and len(methods) > 1:
            people = reference.loc[mine, "subject"].to_numpy()
            entry["paired_vs_" + methods[0]] = {
                m: paired_bootstrap(y, tables[methods[0]].loc[mine, "probability"].to_numpy(float),
                                    tables[m].loc[mine, "probability"].to_numpy(float), people, n_boot=n_boot)
                for m in methods[1:]}
        results[family] = entry
    y_all, people = reference["label"].to_numpy(int), reference["subject"].to_numpy()
    pooled = {"paired_vs_" + methods[0]: {m: paired_bootstrap(y_all, calibrated[methods[0]], calibrated[m], people,
                                                              n_boot=n_boot) for m in methods[1:]},
              "methods": {m: pooled_scores(y_all, calibrated[m], reference["scan"].to_numpy()) for m in methods}}
    return {"lofo": results, "pooled": pooled}, pd.DataFrame(rows)


def adapt_to_prior(p: np.ndarray, prior_train: float, iterations: int = 200, tol: float = 1e-7
                   ) -> tuple[np.ndarray, float]:
    """Saerens et al. (2002): calibrated probabilities ``p`` (fitted where rim+ were ``prior_train``) moved to
    the rim+ share that their own mean implies, by EM; right only when the lesions of each class look the
    same as in training (label shift), which leaving a family out does not promise. Returns (p', prior)."""
    p = np.clip(np.asarray(p, float), 1e-9, 1 - 1e-9)
    if not 0 < prior_train < 1 or not p.size:
        return p, float(prior_train)

    def moved(prior: float) -> np.ndarray:
        up, down = prior / prior_train * p, (1 - prior) / (1 - prior_train) * (1 - p)
        return up / (up + down)

    prior = float(prior_train)
    for _ in range(iterations):
        new = float(moved(prior).mean())
        done = abs(new - prior) < tol
        prior = new
        if done:
            break
    return moved(prior), prior


def prior_shift(table: pd.DataFrame, predictions: pd.DataFrame, method: str) -> dict:
    """Per left-out family: its calibrated probabilities as they are and moved to the rim+ share EM
    estimates from its unlabelled lesions; ECE, expected rim+ total, recall and precision at the stored F1
    threshold, per-scan expected-count r, both ways."""
    from qsmrim_app.model.calibration import expected_calibration_error

    rows = predictions[predictions["method"] == method]
    out = {}
    for family, mine in rows.groupby("family", sort=True):
        y, p = mine["label"].to_numpy(int), mine["probability"].to_numpy(float)
        threshold = float(mine["threshold_f1"].iloc[0])
        prior_train = float(table.loc[table["family"] != family, "label"].mean())
        q, prior = adapt_to_prior(p, prior_train)
        scans = scan_ids(mine["subject"], mine["session"])
        entry = {"rimplus_share": float(y.mean()), "prior_train": prior_train, "prior_estimated": prior,
                 "rimplus_total": int(y.sum())}
        for key, v in (("before", p), ("after", q)):
            recall, precision, _ = _at(y, v, threshold)
            entry[key] = {"ece": float(expected_calibration_error(y, v)), "expected_total": float(v.sum()),
                          "recall": recall, "precision": precision if (v >= threshold).any() else None,
                          "expected_count_r": expected_counts(y, v, scans)["expected_count_r"]}
        out[family] = entry
    return out


def per_family_mean(tables: dict[str, pd.DataFrame], n_boot: int, seed: int = 0) -> dict:
    """The mean over left-out families of each family's PR and ROC AUC on the raw probabilities (ranking
    *within* a family, as a site with its own threshold meets it), the first method minus each other with
    participants resampled within each family (paired). The pooled table instead ranks all families on one
    calibrated scale, which also charges a method for scales that differ between families."""
    from qsmrim_app.model.metrics import pr_auc, roc_auc

    methods = list(tables)
    ref = tables[methods[0]]
    y = ref["label"].to_numpy(int)
    prob = {m: t["probability"].to_numpy(float) for m, t in tables.items()}
    fams = sorted(ref["family"].unique())
    whole = [np.flatnonzero((ref["family"] == f).to_numpy()) for f in fams]
    subject = ref["subject"].to_numpy()
    people = [{s: i[subject[i] == s] for s in np.unique(subject[i])} for i in whole]

    def means(idx: list[np.ndarray]) -> dict[str, tuple[float, float]]:
        return {m: (float(np.mean([pr_auc(y[i], prob[m][i]) for i in idx])),
                    float(np.mean([roc_auc(y[i], prob[m][i]) for i in idx]))) for m in methods}

    point = means(whole)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[tuple[float, float]]] = {m: [] for m in methods[1:]}
    for _ in range(n_boot):
        idx = []
        for i, groups in zip(whole, people):
            subs = list(groups)
            pick = np.concatenate([groups[subs[k]] for k in rng.choice(len(subs), len(subs), replace=True)])
            idx.append(pick if 0 < y[pick].sum() < pick.size else i)  # a draw without both classes: the family as is
        got = means(idx)
        for m in methods[1:]:
            draws[m].append((got[methods[0]][0] - got[m][0], got[methods[0]][1] - got[m][1]))
    out = {"families": fams, "n_boot": n_boot,
           "methods": {m: {"pr_auc_mean": v[0], "roc_auc_mean": v[1]} for m, v in point.items()},
           "paired_vs_" + methods[0]: {}}
    for m, d in draws.items():
        d = np.asarray(d)
        out["paired_vs_" + methods[0]][m] = {
            k: {"difference": point[methods[0]][j] - point[m][j], "ci_low": float(np.percentile(d[:, j], 2.5)),
                "ci_high": float(np.percentile(d[:, j], 97.5))} for j, k in enumerate(("pr_auc", "roc_auc"))}
    return out


def in_family(model_dir: Path, family_of: dict[str, str]) -> dict:
    """Each family scored by a model trained with participant folds over all families (its other
    participants were in training): the in-family reference, at the model's stored map and F1 point."""
    oof = pd.read_csv(Path(model_dir) / "oof_predictions.tsv", sep="\t", dtype={"session": str})
    meta = json.loads((Path(model_dir) / "model.json").read_text())
    cmap, thr = CalibrationMap.from_dict(meta.get("calibration")), float(meta["thresholds"]["f1"])
    oof["family"] = oof["subject"].map(family_of)
    scans = scan_ids(oof["subject"], oof["session"])
    out = {}
    for fam in sorted(oof["family"].dropna().unique()):
        mine = (oof["family"] == fam).to_numpy()
        raw = oof.loc[mine, "probability"].to_numpy(float)
        out[fam] = score(oof.loc[mine, "label"].to_numpy(int), raw, cmap.apply(raw), thr, scans[mine])
    return out


def _at(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float, float]:
    c = confusion(y, (p >= t).astype(int))
    return tuple(float(np.nan_to_num(c[k])) for k in ("sensitivity", "ppv", "f1"))


def recalibration(table: pd.DataFrame, family: str, target: tuple[float, float], sizes: Sequence[int],
                  draws: int, tolerance: float = 0.05) -> dict:
    """A left-out family as a site whose rater reviewed n lesions (``group --recalibrate``'s site map and
    F1 point, fitted exactly as the app does, over the out-of-family map): the share of draws whose recall
    and precision on all the site's lesions come within ``tolerance`` of the in-family ones. A draw is a
    site (the family's scans resampled with replacement); lesions reviewed at random or in qsmrim-review's
    queue order (most probable first); fewer than the app's minimum of reviewed rim+/rim- is a miss."""
    from qsmrim_app.workflows.recalibrate import MIN_RIMMINUS, MIN_RIMPLUS, below_point

    _, thr, base = out_of_family(table, family)
    mine = table[table["family"] == family]
    y_all, raw_all = mine["label"].to_numpy(int), mine["probability"].to_numpy(float)
    units, scores = mine["scan"].to_numpy(), base.apply(raw_all)
    out = {"target_recall": target[0], "target_precision": target[1], "tolerance": tolerance,
           "before": dict(zip(("recall", "precision", "f1"), _at(y_all, base.apply(raw_all), thr)))}
    for scenario in ("random", "queue"):
        rows = []
        for n in sizes:
            ok = fitted = 0
            recalls, precisions = [], []
            for idx, rev in review_draws(units, scores, n, draws, scenario):
                if rev is None:
                    continue
                y, raw = y_all[idx], raw_all[idx]
                if y[rev].sum() < MIN_RIMPLUS or n - y[rev].sum() < MIN_RIMMINUS:
                    continue
                site = fit_site_map(base, y[rev], raw[rev])
                p_site = site.apply(raw)
                r, p, _ = _at(y, p_site, below_point(f1_optimal_threshold(y[rev], p_site[rev]), p_site[rev]))
                fitted += 1
                recalls.append(r)
                precisions.append(p)
                ok += r >= target[0] - tolerance and p >= target[1] - tolerance
            rows.append({"reviewed": n, "draws": draws, "fitted": fitted, "within": ok / draws,
                         "recall_median": float(np.median(recalls)) if recalls else None,
                         "precision_median": float(np.median(precisions)) if precisions else None})
        out[scenario] = {"by_size": rows,
                         "reviewed_for_80pct": next((r["reviewed"] for r in rows if r["within"] >= 0.8), None)}
    return out


def test_families(models: dict[str, Path], dirs: dict[str, Path]) -> dict:
    """Families never trained on, scored by each model directory as a user runs it."""
    from qsmrim_app.model.predict import load_ensemble
    from qsmrim_app.workflows.training import collect_lesion_set

    out = {}
    for name, path in dirs.items():
        lesions = collect_lesion_set(Path(path))
        scans = scan_ids(lesions.subjects, lesions.sessions)
        out[name] = {}
        for m, model_dir in models.items():
            ens = load_ensemble(Path(model_dir), device="cpu")
            pred = ens.predict(lesions.patches, lesions.features, lesions.feature_names, reference=lesions.reference)
            raw = pred.probability_raw if pred.probability_raw is not None else pred.probability
            out[name][m] = score(lesions.labels, np.asarray(raw, float), np.asarray(pred.probability, float),
                                 float(ens.thresholds["f1"]), scans) | {"calibration": ens.calibration.method}
    return out


def table(summary: dict, methods: Sequence[str]) -> pd.DataFrame:
    rows = []
    for fam, entry in {**summary["lofo"], **{f"{k} (never trained on)": {"methods": v}
                                            for k, v in summary.get("test_only", {}).items()}}.items():
        for m in methods:
            r = entry["methods"][m]
            rows.append({"left out": fam, "method": m, "n/rim+": f"{r['n_lesions']}/{r['n_rimplus']}",
                         "ROC": r["roc_auc_pooled"], "PR": r["pr_auc_pooled"], "recall": r["sensitivity"],
                         "precision": r["ppv"], "ECE": r["ece"], "count r": r["count_pearson_r"],
                         "E-count r": r["expected_count_r"],
                         "in-family PR": summary.get("in_family", {}).get(m, {}).get(fam, {}).get("pr_auc_pooled")})
    return pd.DataFrame(rows)


def _f(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def _interval(d: dict) -> str:
    """A paired difference as the tables and the log print it: '+0.012 [-0.022, +0.028]'."""
    return f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def markdown(summary: dict, methods: Sequence[str]) -> str:
    """The headline table (per left-out family, in-family PR beside), the pooled paired differences and
    the recalibration table, as docs/families.md and the model card show them."""
    t = table(summary, methods)
    lines = ["| left out (lesions/rim+) | method | ROC AUC | PR AUC | in-family PR | recall @F1 | precision @F1 | ECE | count r | expected-count r |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in t.iterrows():
        lines.append(f"| {r['left out']} ({r['n/rim+']}) | {r['method']} | {_f(r['ROC'])} | {_f(r['PR'])} | "
                     f"{_f(r['in-family PR'])} | {_f(r['recall'])} | {_f(r['precision'])} | {_f(r['ECE'])} | "
                     f"{_f(r['count r'])} | {_f(r['E-count r'])} |")
    ref = methods[0]
    lines += ["", f"Pooled over the left-out families (calibrated out-of-family probabilities): {ref} minus each "
              "method, paired participant bootstrap, 95 % interval:", "",
              "| method | pooled PR AUC | pooled ROC AUC | ECE | PR AUC difference | ROC AUC difference |", "|---|---|---|---|---|---|"]
    pooled = summary["pooled"]
    for m in methods:
        p = pooled["methods"][m]
        if m == ref:
            lines.append(f"| {m} | {_f(p['pr_auc_pooled'])} | {_f(p['roc_auc_pooled'])} | {_f(p['ece'])} | | |")
            continue
        d = pooled["paired_vs_" + ref][m]
        cells = [_interval(d[k]) for k in ("pr_auc", "roc_auc")]
        lines.append(f"| {m} | {_f(p['pr_auc_pooled'])} | {_f(p['roc_auc_pooled'])} | {_f(p['ece'])} | {cells[0]} | {cells[1]} |")
    within = summary.get("per_family_mean")
    if within:
        lines += ["", f"Mean over the left-out families of each family's own PR and ROC AUC (ranking within a family, "
                  f"raw probabilities): {ref} minus each method, participants resampled within each family, 95 % interval:", "",
                  "| method | mean PR AUC | mean ROC AUC | PR AUC difference | ROC AUC difference |", "|---|---|---|---|---|"]
        for m in methods:
            w = within["methods"][m]
            if m == ref:
                lines.append(f"| {m} | {_f(w['pr_auc_mean'])} | {_f(w['roc_auc_mean'])} | | |")
                continue
            d = within["paired_vs_" + ref][m]
            cells = [_interval(d[k]) for k in ("pr_auc", "roc_auc")]
            lines.append(f"| {m} | {_f(w['pr_auc_mean'])} | {_f(w['roc_auc_mean'])} | {cells[0]} | {cells[1]} |")
    shift = summary.get("prior_shift")
    if shift:
        lines += ["", f"Without a rater: {ref}'s calibrated probabilities moved to the rim+ share EM estimates from each "
                  "left-out family's own unlabelled lesions (label shift, Saerens et al. 2002), before -> after:", "",
                  "| left out | rim+ share (training) | estimated | ECE | expected rim+ (true) | recall @F1 | precision @F1 | expected-count r |",
                  "|---|---|---|---|---|---|---|---|"]
        for fam, e in shift.items():
            b, a = e["before"], e["after"]
            lines.append(f"| {fam} | {e['rimplus_share']:.3f} ({e['prior_train']:.3f}) | {e['prior_estimated']:.3f} | "
                         f"{b['ece']:.3f} -> {a['ece']:.3f} | {b['expected_total']:.0f} -> {a['expected_total']:.0f} "
                         f"({e['rimplus_total']}) | {b['recall']:.2f} -> {a['recall']:.2f} | {_f(b['precision'])} -> "
                         f"{_f(a['precision'])} | {_f(b['expected_count_r'])} -> {_f(a['expected_count_r'])} |")
    for fam, rec in summary.get("recalibration", {}).items():
        sizes = [r["reviewed"] for r in rec["random"]["by_size"]]
        lines += ["", f"Recalibration on {fam} (left out; before: recall {rec['before']['recall']:.2f}, precision "
                  f"{rec['before']['precision']:.2f}; in-family {rec['target_recall']:.2f} / {rec['target_precision']:.2f}): "
                  "share of draws within 0.05 of in-family", "",
                  "| reviewed lesions | " + " | ".join(map(str, sizes)) + " |", "|---|" + "---|" * len(sizes)]
        for scenario in ("random", "queue"):
            lines.append(f"| {scenario} | " + " | ".join(f"{r['within']:.2f}" for r in rec[scenario]["by_size"]) + " |")
    return "\n".join(lines) + "\n"


def _pairs(items: Sequence[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=PATH, got {item!r}")
        out[name] = Path(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=Path, required=True, help="the training dataset's participants.tsv")
    parser.add_argument("--column", default="family", help="the participants.tsv column the folds kept whole")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="a model directory trained with --cv-group-by COLUMN (the first is compared with the others)")
    parser.add_argument("--test-family", action="append", default=[], metavar="NAME=OUT")
    parser.add_argument("--in-family", action="append", default=[], metavar="NAME=DIR",
                        help="the same method trained with participant folds over all families: the in-family "
                             "reference (NAME must be one of --model's)")
    parser.add_argument("--recalibrate", type=lambda t: t.split(","), default=[], metavar="FAMILIES",
                        help="left-out families on which to measure a rater's recalibration (needs --in-family "
                             "for the first model)")
    parser.add_argument("--sizes", type=lambda t: [int(v) for v in t.split(",")], default=[10, 20, 30, 40, 60, 80, 120])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables as Markdown (docs, model card)")
    args = parser.parse_args(argv)
    participants = pd.read_csv(args.participants, sep="\t", dtype=str)
    family_of = dict(zip(participants["participant_id"], participants[args.column]))
    models = _pairs(args.model)
    tables = {m: read_oof(d, family_of) for m, d in models.items()}
    summary, rows = lofo(tables, args.n_boot)
    if len(tables) > 1:
        summary["per_family_mean"] = per_family_mean(tables, args.n_boot)
    first = list(models)[0]
    summary["prior_shift"] = prior_shift(tables[first], rows, first)
    if args.test_family:
        summary["test_only"] = test_families(models, _pairs(args.test_family))
    for name, model_dir in _pairs(args.in_family).items():
        summary.setdefault("in_family", {})[name] = in_family(model_dir, family_of)
    ref = list(models)[0]
    for fam in args.recalibrate:
        target = summary["in_family"][ref][fam]
        summary.setdefault("recalibration", {})[fam] = recalibration(
            tables[ref], fam, (target["sensitivity"], target["ppv"]), args.sizes, args.draws)
    summary = {"command": " ".join(sys.argv), "models": {m: str(d) for m, d in models.items()}, "caveat": CAVEAT,
               **summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, default=float))
    if args.predictions:
        rows.to_csv(args.predictions, sep="\t", index=False)
    print(table(summary, list(models)).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\n{ref} minus each method, pooled over left-out families (participant bootstrap, PR AUC):")
    for m, v in summary["pooled"]["paired_vs_" + ref].items():
        d = v["pr_auc"]
        print(f"  {m}: {_interval(d)}")
    if "per_family_mean" in summary:
        print(f"{ref} minus each method, mean of the left-out families' own PR AUC (within-family bootstrap):")
        for m, v in summary["per_family_mean"]["paired_vs_" + ref].items():
            d = v["pr_auc"]
            print(f"  {m}: {_interval(d)}")
    if args.markdown:
        args.markdown.write_text(markdown(summary, list(models)))
    for fam, e in summary["prior_shift"].items():
        print(f"prior shift on {fam}: rim+ share {e['rimplus_share']:.3f}, estimated {e['prior_estimated']:.3f}; ECE "
              f"{e['before']['ece']:.3f} -> {e['after']['ece']:.3f}")
    for fam, rec in summary.get("recalibration", {}).items():
        print(f"recalibration on {fam}: before recall/precision {rec['before']['recall']:.2f}/{rec['before']['precision']:.2f}; "
              f"target {rec['target_recall']:.2f}/{rec['target_precision']:.2f} - {rec['tolerance']}; reviewed lesions for "
              f"80% of draws: random {rec['random']['reviewed_for_80pct']}, queue {rec['queue']['reviewed_for_80pct']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
