"""Cross-validated evaluation report: the paper's Table 2 / figures for several methods at once.

Input is one out-of-fold table per method (columns ``subject, lesion_id, label, fold, probability``,
extra columns ignored). Output, all written atomically into ``out_dir``: ``metrics.json`` (per method,
the keys of :func:`metrics.lesion_and_subject_metrics`, NaN as null), ``table2.tsv``, the figures
``proc``, ``roc``, ``pr`` and ``counts`` as PNG and SVG, and a self-contained ``report.html`` (inline
SVG, no external files) that reads offline.
"""
from __future__ import annotations

import html
import io
import json
import logging
import math
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..atomic import write_bytes
from .calibration import ECE_BINS, calibration_metrics, reliability_figure
from .metrics import CVCurves, cv_curve_aucs, lesion_and_subject_metrics, paired_bootstrap, subject_counts

LOGGER = logging.getLogger(__name__)
REQUIRED_COLUMNS = ("subject", "lesion_id", "label", "fold", "probability")
MAX_FPR = 0.1
FIGURES = ("proc", "roc", "pr", "counts", "reliability")
PAIRED_BOOTSTRAP = 2000  # replicates of the paired participant bootstrap
PAIRED_LABELS = {"roc_auc": "ROC AUC", "pauc": f"pROC AUC (FPR<{MAX_FPR:g})", "pr_auc": "PR AUC"}
TABLE_COLUMNS = (
    "method", "pROC AUC (FPR<0.1)", "PR AUC", "ROC AUC", "F1", "Sensitivity", "Specificity", "PPV",
    "TP", "FP", "FN", "TN", "Count MSE", "Pearson r [95% CI]",
)


# ----------------------------------------------------------------------------- atomic writes
def _json_ready(value):
    """NaN/inf -> None and numpy scalars -> Python, so metrics.json is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# ----------------------------------------------------------------------------- table
def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def table2(metrics: Mapping[str, Mapping]) -> pd.DataFrame:
    """Rows = methods, columns in the layout of the paper's Table 2 (formatted strings)."""
    rows = []
    for method, m in metrics.items():
        lo, hi = m["count_pearson_ci"]
        rows.append({
            "method": method,
            "pROC AUC (FPR<0.1)": _fmt(m[f"pauc_fpr_{MAX_FPR:g}"]),
            "PR AUC": _fmt(m["pr_auc"]),
            "ROC AUC": _fmt(m["roc_auc"]),
            "F1": _fmt(m["f1"]),
            "Sensitivity": _fmt(m["sensitivity"]),
            "Specificity": _fmt(m["specificity"]),
            "PPV": _fmt(m["ppv"]),
            "TP": str(m["tp"]), "FP": str(m["fp"]), "FN": str(m["fn"]), "TN": str(m["tn"]),
            "Count MSE": _fmt(m["count_mse"]),
            "Pearson r [95% CI]": f"{_fmt(m['count_pearson_r'])} [{_fmt(lo)}, {_fmt(hi)}]",
        })
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


# ----------------------------------------------------------------------------- figures
def _roc_figure(curves: Mapping[str, CVCurves], max_fpr: float | None) -> Figure:
    fig = Figure(figsize=(5.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for method, c in curves.items():
        keep = c.fpr_grid <= (max_fpr if max_fpr else 1.0)
        auc_txt = f"pROC AUC {c.pauc:.3f}" if max_fpr else f"AUC {c.roc_auc:.3f}"
        # bottom then top of every grid point: vertical jumps drawn vertical, tie segments diagonal
        x = np.repeat(c.fpr_grid[keep], 2)
        t = np.column_stack([c.mean_tpr_left[keep], c.mean_tpr[keep]]).ravel()
        ax.plot(x, t, label=f"{method} ({auc_txt})")
    if not max_fpr:
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlim(0, max_fpr or 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(f"ROC, FPR \u2264 {max_fpr:g} (mean of folds)" if max_fpr else "ROC (mean of folds)")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def _pr_figure(curves: Mapping[str, CVCurves], reference_points: Mapping[str, tuple[float, float]] | None) -> Figure:
    fig = Figure(figsize=(5.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for method, c in curves.items():
        ax.plot(c.recall_grid, c.mean_precision, drawstyle="steps-pre", label=f"{method} (AUC {c.pr_auc:.3f})")
    for name, (recall, precision) in (reference_points or {}).items():
        ax.plot([recall], [precision], marker="*", ms=11, ls="none", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("Recall (sensitivity)")
    ax.set_ylabel("Precision (PPV)")
    ax.set_title("Precision-recall (mean of folds)")
    ax.legend(loc="lower left", fontsize="small")
    return fig


def _counts_figure(counts: Mapping[str, tuple[np.ndarray, np.ndarray]], metrics: Mapping[str, Mapping]) -> Figure:
    n = len(counts)
    fig = Figure(figsize=(3.2 * n, 3.8), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    top = max([1] + [int(max(p.max(initial=0), t.max(initial=0))) for p, t in counts.values()]) + 1
    for ax, (method, (pred, true)) in zip(axes, counts.items()):
        pairs, mult = np.unique(np.column_stack([true, pred]), axis=0, return_counts=True)
        ax.scatter(pairs[:, 0], pairs[:, 1], s=18 * np.sqrt(mult), alpha=0.6)  # area ~ subjects per point
        ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
        ax.set_xlim(-0.5, top)
        ax.set_ylim(-0.5, top)
        ax.set_aspect("equal")
        ax.set_xlabel("Expert rim+ count")
        ax.set_ylabel("Predicted rim+ count")
        ax.set_title(f"{method}\nr = {_fmt(metrics[method]['count_pearson_r'])}", fontsize="medium")
    return fig


def _save_figure(fig: Figure, out_dir: Path, stem: str) -> str:
    """Write PNG and SVG; return the SVG markup for inlining in the report."""
    buffers = {}
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=150 if fmt == "png" else None)
        buffers[fmt] = buf.getvalue()
        write_bytes(out_dir / f"{stem}.{fmt}", buffers[fmt])
    svg = buffers["svg"].decode("utf-8")
    return svg[svg.index("<svg"):]


# ----------------------------------------------------------------------------- report
def _paired_html(paired: pd.DataFrame | None) -> str:
    if paired is None or paired.empty:
        return ""
    shown = pd.DataFrame({
        "method": paired["method"], "metric": paired["metric"],
        str(paired["reference"].iloc[0]): paired["reference_value"].map(_fmt),
        "method value": paired["method_value"].map(_fmt),
        "difference [95% CI]": [f"{_fmt(d)} [{_fmt(lo)}, {_fmt(hi)}]"
                                for d, lo, hi in zip(paired["difference"], paired["ci_low"], paired["ci_high"])],
        "p": paired["p_value"].map(lambda v: _fmt(v, 4))})
    ref = html.escape(str(paired["reference"].iloc[0]))
    return (f"<h2>Paired differences against {ref}</h2>\n"
            f"{shown.to_html(index=False, escape=True, na_rep='n/a', classes='paired')}\n"
            f"<p>Pooled out-of-fold AUCs on the lesions both methods scored; difference = {ref} minus the "
            f"method, 95 % interval and two-sided p from {paired['n_participants'].iloc[0]} participants "
            f"resampled with replacement ({PAIRED_BOOTSTRAP} paired bootstrap replicates). An interval that "
            f"contains 0 means the table cannot tell the two apart.</p>")


def _html(title: str, table: pd.DataFrame, svgs: Mapping[str, str], notes: list[str],
          paired: pd.DataFrame | None = None) -> str:
    figures = "\n".join(
        f'<figure id="fig-{name}">{svg}<figcaption>{html.escape(caption)}</figcaption></figure>'
        for name, (svg, caption) in svgs.items()
    )
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:1em;vertical-align:top}}figure svg{{max-width:100%;height:auto}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<h2>Lesion- and subject-level metrics (layout of Zhang et al. 2022, Table 2)</h2>
{table.to_html(index=False, escape=True, na_rep="n/a", classes="table2")}
<ul>{items}</ul>
{_paired_html(paired)}
<h2>Figures</h2>
{figures}
</body></html>
"""


def _validated(method: str, table: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"results of {method!r} lack column(s) {missing}")
    table = table.loc[:, [*REQUIRED_COLUMNS, *(["session"] if "session" in table.columns else [])]]
    usable = table["label"].notna() & table["probability"].notna()
    if not usable.all():
        LOGGER.warning("%s: %d lesion(s) without label or probability left out", method, int((~usable).sum()))
    table = table.loc[usable]
    if table.empty:
        raise ValueError(f"results of {method!r} have no lesion with both label and probability")
    return table


def paired_differences(results: Mapping[str, pd.DataFrame], reference: str, n_boot: int = PAIRED_BOOTSTRAP,
                       seed: int = 0) -> pd.DataFrame:
    """Each other method against ``reference`` on the lesions both scored: pooled AUCs, difference and its
    participant-bootstrap confidence interval (``metrics.paired_bootstrap``), one row per method and metric."""
    def keyed(method: str, table: pd.DataFrame) -> pd.DataFrame:  # one scan + lesion id per row
        t = _validated(method, table)
        return t.assign(scan=count_units(t), lesion_id=t["lesion_id"].astype(str))

    ref = keyed(reference, results[reference])
    rows = []
    for method, raw in results.items():
        if method == reference:
            continue
        other = keyed(method, raw)
        both = ref.merge(other[["scan", "lesion_id", "label", "probability"]], on=["scan", "lesion_id"],
                         suffixes=("", "_other"))
        if not (both["label"].astype(int) == both["label_other"].astype(int)).all():
            raise ValueError(f"{reference!r} and {method!r} disagree on lesion labels: not the same cohort")
        res = paired_bootstrap(both["label"].to_numpy(int), both["probability"].to_numpy(float),
                               both["probability_other"].to_numpy(float), both["subject"].to_numpy(),
                               n_boot=n_boot, seed=seed, max_fpr=MAX_FPR)
        for metric, label in PAIRED_LABELS.items():
            r = res[metric]
            rows.append({"reference": reference, "method": method, "metric": label, "n_lesions": len(both),
                         "n_participants": res["n_clusters"], "reference_value": r["a"], "method_value": r["b"],
                         "difference": r["difference"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                         "p_value": r["p_value"]})
    return pd.DataFrame(rows, columns=["reference", "method", "metric", "n_lesions", "n_participants",
                                       "reference_value", "method_value", "difference", "ci_low", "ci_high",
                                       "p_value"])


def count_units(t: pd.DataFrame) -> np.ndarray:
    """What a rim+ count belongs to: one scan (participant x session), the participant when there are no sessions.

    Folds stay by participant (model/folds.py); counting two sessions of one participant as one sum would
    compare the sum of two scans' counts.
    """
    subject = t["subject"].astype(str)
    if "session" not in t.columns:
        return subject.to_numpy()
    session = t["session"].fillna("n/a").astype(str)
    return np.where(session.isin(["n/a", ""]), subject, subject + "_ses-" + session)


@dataclass
class _Evaluated:
    """What write_evaluation gathers per method before writing: metrics, validated tables, curves, counts and
    the reliability inputs (calibrated, and the primary method's raw mean)."""

    metrics: dict[str, dict] = field(default_factory=dict)
    valid: dict[str, pd.DataFrame] = field(default_factory=dict)
    curves: dict[str, CVCurves] = field(default_factory=dict)
    counts: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    reliability: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    reliability_raw: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _evaluate_method(ev: _Evaluated, method: str, raw: pd.DataFrame) -> None:
    """One method's lesion and subject metrics, calibration metrics, curves and per-subject counts."""
    t = ev.valid[method] = _validated(method, raw)
    y = t["label"].to_numpy().astype(int)
    p = t["probability"].to_numpy(dtype=float)
    fold = t["fold"].to_numpy().astype(int)
    subj = count_units(t)
    m = lesion_and_subject_metrics(y, p, fold, subj, max_fpr=MAX_FPR)
    m["n_excluded"] = int(len(raw) - len(t))
    # calibration metrics on the calibrated (cross-fitted) probability when the table has one, beside the raw
    if "probability_calibrated" in raw.columns:
        p_cal = raw.loc[t.index, "probability_calibrated"].to_numpy(float)
        m.update(calibration_metrics(y, p_cal, p))
        if not ev.reliability_raw:
            ev.reliability_raw[f"{method}, raw"] = (y, p)
    else:
        p_cal = p
        m.update(calibration_metrics(y, p))
    ev.reliability[method] = (y, p_cal)
    ev.metrics[method] = m
    ev.curves[method] = cv_curve_aucs(y, p, fold, max_fpr=MAX_FPR)
    thr = {int(k): v for k, v in m["thresholds_f1_per_fold"].items()}
    pred = np.array([p_i >= thr[f_i] for p_i, f_i in zip(p, fold)], dtype=int)
    _, pred_c, true_c = subject_counts(subj, y, pred)
    ev.counts[method] = (pred_c, true_c)


def _evaluation_figures(ev: _Evaluated, out_dir: Path,
                        reference_points: Mapping[str, tuple[float, float]] | None) -> dict[str, tuple[str, str]]:
    """The report's figures (saved beside it) with their captions."""
    return {
        "proc": (_save_figure(_roc_figure(ev.curves, MAX_FPR), out_dir, "proc"),
                 f"Mean ROC curves for FPR \u2264 {MAX_FPR:g}; pROC AUC = area / {MAX_FPR:g}."),
        "roc": (_save_figure(_roc_figure(ev.curves, None), out_dir, "roc"), "Mean ROC curves over the folds."),
        "pr": (_save_figure(_pr_figure(ev.curves, reference_points), out_dir, "pr"),
               "Mean precision-recall curves over the folds (step curves; area = mean average precision)."),
        "counts": (_save_figure(_counts_figure(ev.counts, ev.metrics), out_dir, "counts"),
                   "Predicted vs expert rim+ lesions per subject at the per-fold F1-optimal thresholds; "
                   "dashed: identity; marker area ~ number of subjects."),
        "reliability": (_save_figure(reliability_figure({**ev.reliability_raw, **ev.reliability}), out_dir,
                                     "reliability"),
                        f"Reliability of the rim+ probability out of fold: {ECE_BINS} equal-mass bins of lesions, "
                        "observed rim+ fraction (95 % Wilson interval) against the mean probability; dotted: "
                        "perfect calibration. Calibrated probabilities are cross-fitted (each fold's map fitted "
                        "without it); 'raw' is the ensemble's mean before calibration."),
    }


def _evaluation_notes(metrics: dict[str, dict]) -> list[str]:
    """The report's notes: how each metric is computed, calibration, and each method's review workload."""
    notes = [
        f"pROC AUC: area under the ROC curve for FPR < {MAX_FPR:g} divided by {MAX_FPR:g} "
        f"(perfect 1.0, random {MAX_FPR / 2:g}); not McClish-standardised.",
        "AUCs: per-fold out-of-fold curves as step functions on a common grid, averaged over the folds "
        "with both classes; PR AUC is the step (average-precision) area.",
        "Binary metrics: F1-optimal threshold chosen per fold on its out-of-fold predictions, counts pooled "
        "over the folds. Subject counts: lesions predicted rim+ vs expert rim+ per subject; Pearson r with "
        "a 95 % Fisher-z confidence interval.",
    ]
    notes.append(f"Calibration: expected calibration error (ECE) over {ECE_BINS} equal-mass bins of the "
                 "calibrated (cross-fitted) probability, raw ensemble mean in brackets; AUCs and thresholds above "
                 "rank the raw mean (the model's one monotone map does not change a ranking)" + "; ".join(
                     [""] + [f"{k}: {_fmt(m['ece'])}" + (f" (raw {_fmt(m['ece_raw'])})" if "ece_raw" in m else "")
                             for k, m in metrics.items()]))
    for method, m in metrics.items():
        hs = m["high_sensitivity"]
        notes.append(
            f"{method}: {m['n_lesions']} lesions ({m['n_rimplus']} rim+), {m['n_folds']} folds; at the "
            f"high-sensitivity point (sensitivity {_fmt(hs['sensitivity'])}) experts review "
            f"{hs['lesions_to_review']} lesions, saving {_fmt(100 * hs['review_time_saved'], 1)} % of review time."
        )
    return notes


def write_evaluation(
    results: dict[str, pd.DataFrame],
    out_dir: Path,
    title: str = "qsmrim cross-validated evaluation",
    reference_points: Mapping[str, tuple[float, float]] | None = None,
) -> dict:
    """Compute every method's metrics and write metrics.json, table2.tsv, figures and report.html.

    ``reference_points`` (name -> (recall, precision)) are drawn on the PR figure, e.g. published
    operating points. Returns ``{method: metrics}``.
    """
    if not results:
        raise ValueError("no method results to evaluate")
    out_dir = Path(out_dir)
    ev = _Evaluated()
    for method, raw in results.items():
        _evaluate_method(ev, method, raw)
    write_bytes(out_dir / "metrics.json", (json.dumps(_json_ready(ev.metrics), indent=2) + "\n").encode())
    table = table2(ev.metrics)
    write_bytes(out_dir / "table2.tsv", table.to_csv(sep="\t", index=False).encode())
    paired = None
    if len(results) > 1:  # the first method (the primary one) against each other, same lesions
        paired = paired_differences(ev.valid, next(iter(ev.valid)))  # validated once, above
        write_bytes(out_dir / "paired_differences.tsv",
                     paired.to_csv(sep="\t", index=False, float_format="%.4f").encode())
    svgs = _evaluation_figures(ev, out_dir, reference_points)
    write_bytes(out_dir / "report.html",
                _html(title, table, svgs, _evaluation_notes(ev.metrics), paired).encode("utf-8"))
    return ev.metrics
