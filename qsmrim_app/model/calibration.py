"""Calibration of the ensemble's rim+ probability: a monotone map fitted on out-of-fold predictions.

Why: the ensemble's mean probability ranks lesions well but its scale is not a frequency (issue 18: on
a cohort made another way, rim+ lesions averaged 0.44 and the F1 point called half of them). Counts
with intervals (``counts.py``) and a site's operating point need probabilities that mean what they say.

Candidates, all monotone non-decreasing in the raw probability (so ranking and AUCs are kept, up to
ties for isotonic):

- ``identity``: the raw mean probability;
- ``temperature``: ``sigmoid(logit(p) / T)``, one parameter (sharpness only);
- ``platt``: ``sigmoid(a * logit(p) + b)`` with ``a >= 0``, two parameters (sharpness and base rate);
- ``isotonic``: pool-adjacent-violators on the raw probability, kept inside ``[1/(2n), 1 - 1/(2n)]`` (a
  map that says 0 or 1 has infinite log loss on the next lesion that proves it wrong), with knots at
  the centres of its blocks and linear interpolation between them, so it rises strictly and keeps the
  ranking (constant beyond the first and last centre).

:func:`fit_cv_calibration` chooses among them by **cross-fitted log loss**: for each training fold,
every candidate is fitted on the other folds' out-of-fold probabilities and scored on this fold's;
the candidate with the lowest pooled log loss wins (identity included, so a map is only used where
it helps), and is then refitted on all out-of-fold probabilities. Log loss is a proper scoring rule;
ECE is reported beside it but is not used to choose (it can be driven to zero by a map that says the
base rate for every lesion). The cross-fitted probabilities are what ``oof_predictions.tsv`` reports,
so metrics.json's ECE is out of sample.

A site map (``workflows/recalibrate.py``) is a ``platt`` map over the model's own map (``base``),
fitted on a rater's reviewed lesions with a weak prior towards the model's map.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize

METHODS = ("identity", "temperature", "platt", "isotonic")
CANDIDATES = ("identity", "temperature", "platt", "isotonic")
ECE_BINS = 10
_EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=float)))  # overflow-free logistic


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean negative log-likelihood of 0/1 labels (probabilities clipped to [1e-6, 1 - 1e-6])."""
    y = np.asarray(y, dtype=float)
    p = np.clip(np.asarray(p, dtype=float), _EPS, 1.0 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if y.size else float("nan")


def brier(y: np.ndarray, p: np.ndarray) -> float:
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def equal_mass_bins(p: np.ndarray, n_bins: int = ECE_BINS) -> list[np.ndarray]:
    """Indices of ``n_bins`` bins of (as near as possible) equal numbers of lesions, by increasing p.

    Equal-mass rather than equal-width: with ~5 % rim+ lesions most probabilities sit near 0, and
    equal-width bins would leave the upper bins with a handful of lesions each.
    """
    order = np.argsort(np.asarray(p, dtype=float), kind="mergesort")
    n_bins = max(1, min(int(n_bins), order.size))
    return [b for b in np.array_split(order, n_bins) if b.size]


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: sum over equal-mass bins of (bin share) x |observed rim+ fraction - mean probability|."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    if not y.size:
        return float("nan")
    return float(sum(b.size / y.size * abs(y[b].mean() - p[b].mean()) for b in equal_mass_bins(p, n_bins)))


def reliability_table(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Per equal-mass bin: lesions, mean probability, observed rim+ fraction and its 95 % Wilson interval."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    rows = []
    for b in equal_mass_bins(p, n_bins):
        n, k = b.size, float(y[b].sum())
        z = 1.959963984540054
        centre = (k + z * z / 2) / (n + z * z)
        half = z * np.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
        rows.append({"n": int(n), "mean_probability": float(p[b].mean()), "observed": k / n,
                     "observed_low": float(max(0.0, centre - half)), "observed_high": float(min(1.0, centre + half))})
    return rows


@dataclass(frozen=True)
class CalibrationMap:
    """A monotone map from the ensemble's raw mean probability to a calibrated one.

    ``params``: ``temperature`` {temperature}; ``platt`` {slope, intercept} on the logit; ``isotonic``
    {x, y} knots (raw probability -> calibrated), interpolated linearly, constant outside. ``base``: a
    map applied first (a site's map over the model's own). ``fitted_on``: what it was fitted on.
    """

    method: str = "identity"
    params: dict = field(default_factory=dict)
    fitted_on: dict = field(default_factory=dict)
    base: "CalibrationMap | None" = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r} (known: {', '.join(METHODS)})")

    @property
    def is_identity(self) -> bool:
        return self.method == "identity" and (self.base is None or self.base.is_identity)

    def apply(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=float)
        if self.base is not None:
            p = self.base.apply(p)
        if self.method == "identity":
            return p.copy()
        if self.method == "temperature":
            return sigmoid(logit(p) / float(self.params["temperature"]))
        if self.method == "platt":
            return sigmoid(float(self.params["slope"]) * logit(p) + float(self.params["intercept"]))
        x, y = np.asarray(self.params["x"], float), np.asarray(self.params["y"], float)
        return np.interp(p, x, y)

    def describe(self) -> str:
        """One line for logs and reports."""
        if self.method == "identity" and self.base is None:
            return "none (identity: the ensemble's raw mean probability)"
        own = {"identity": "identity", "temperature": f"temperature T={self.params.get('temperature', 0):.3g}",
               "platt": f"Platt slope {self.params.get('slope', 0):.3g}, intercept {self.params.get('intercept', 0):.3g}",
               "isotonic": f"isotonic ({len(self.params.get('x', []))} knots)"}[self.method]
        return own + (f" over {self.base.describe()}" if self.base is not None else "")

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"method": self.method, "params": _plain(self.params), "fitted_on": _plain(self.fitted_on)}
        if self.base is not None:
            out["base"] = self.base.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> "CalibrationMap":
        """The map stored in model.json; a model without one (qsmrim before calibration) gets identity."""
        if not data:
            return cls("identity", {}, {"note": "the model directory has no calibration map"})
        base = cls.from_dict(data["base"]) if data.get("base") else None
        return cls(str(data["method"]), dict(data.get("params", {})), dict(data.get("fitted_on", {})), base)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


# ----------------------------------------------------------------------------- fitting
def _fit_logistic(z: np.ndarray, y: np.ndarray, slope_only: bool, prior: float = 0.0,
                  prior_mean: tuple[float, float] = (1.0, 0.0)) -> tuple[float, float]:
    """Maximum (penalised) likelihood of ``sigmoid(a z + b)``; ``a >= 0`` keeps the map monotone.

    ``prior`` > 0 adds ``prior/2 * ((a - a0)^2 + b^2)``: a Gaussian prior towards ``prior_mean`` that keeps a
    fit on a few reviewed lesions (possibly perfectly separated) finite and near the starting map.
    """
    y = np.asarray(y, dtype=float)
    a0, b0 = prior_mean

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = (theta[0], 0.0) if slope_only else (theta[0], theta[1])
        s = a * z + b
        # log(1 + e^s) stably; d/ds = sigmoid(s)
        soft = np.logaddexp(0.0, s)
        value = float(np.sum(soft - y * s)) + 0.5 * prior * ((a - a0) ** 2 + (0.0 if slope_only else (b - b0) ** 2))
        r = sigmoid(s) - y
        grad = [float(np.sum(r * z)) + prior * (a - a0)]
        if not slope_only:
            grad.append(float(np.sum(r)) + prior * (b - b0))
        return value, np.asarray(grad)

    start = np.array([a0] if slope_only else [a0, b0], dtype=float)
    bounds = [(0.0, 50.0)] + ([] if slope_only else [(-50.0, 50.0)])
    res = minimize(nll, start, jac=True, method="L-BFGS-B", bounds=bounds)
    a = float(res.x[0])
    return a, (0.0 if slope_only else float(res.x[1]))


def fit_map(method: str, y: np.ndarray, p: np.ndarray, fitted_on: dict | None = None) -> CalibrationMap:
    """Fit one calibration method on labels ``y`` and raw probabilities ``p``."""
    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    info = {"lesions": int(y.size), "rim_positive": int(y.sum()), **(fitted_on or {})}
    if method == "identity" or np.unique(y).size < 2:
        return CalibrationMap("identity", {}, info)
    if method == "temperature":
        a, _ = _fit_logistic(logit(p), y, slope_only=True)
        return CalibrationMap("temperature", {"temperature": 1.0 / max(a, 1e-3)}, info)
    if method == "platt":
        a, b = _fit_logistic(logit(p), y, slope_only=False)
        return CalibrationMap("platt", {"slope": a, "intercept": b}, info)
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        floor = 1.0 / (2 * y.size)
        iso = IsotonicRegression(y_min=floor, y_max=1.0 - floor, increasing=True, out_of_bounds="clip").fit(p, y)
        # Knots at the centre (mean raw probability) of each PAV block, not at its ends: the map then rises
        # strictly between blocks and keeps the ensemble's ranking. With sklearn's step knots, ties cost the
        # bundled model's out-of-fold PR AUC 0.045 (0.536 -> 0.491, fold mean) for the same log loss.
        fitted = iso.predict(p)
        values = np.unique(fitted)
        centres = np.array([p[fitted == v].mean() for v in values])
        return CalibrationMap("isotonic", {"x": centres.tolist(), "y": values.tolist()}, info)
    raise ValueError(f"unknown calibration method {method!r}")


@dataclass
class CVCalibration:
    """The chosen map, the cross-fitted calibrated out-of-fold probabilities and the comparison."""

    map: CalibrationMap
    crossfit: np.ndarray  # (N,) each lesion calibrated by the chosen method fitted without its fold
    selection: dict  # method -> {log_loss, ece, brier} of its cross-fitted probabilities


def crossfit(method: str, y: np.ndarray, p: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Calibrate each fold's probabilities with ``method`` fitted on the other folds only."""
    out = np.empty(p.size, dtype=float)
    for k in np.unique(fold):
        test = fold == k
        out[test] = fit_map(method, y[~test], p[~test]).apply(p[test])
    return out


def fit_cv_calibration(y: np.ndarray, p: np.ndarray, fold: np.ndarray,
                       candidates: tuple[str, ...] = CANDIDATES, n_bins: int = ECE_BINS) -> CVCalibration:
    """Choose a calibration method by cross-fitted log loss over the training folds and fit it on all
    out-of-fold probabilities (see the module docstring)."""
    y = np.asarray(y, dtype=int)
    p = np.asarray(p, dtype=float)
    fold = np.asarray(fold)
    scores, fitted = {}, {}
    for method in candidates:
        q = crossfit(method, y, p, fold) if np.unique(fold).size > 1 else p
        fitted[method] = q
        scores[method] = {"log_loss": log_loss(y, q), "ece": expected_calibration_error(y, q, n_bins),
                          "brier": brier(y, q)}
    best = min(candidates, key=lambda m: (scores[m]["log_loss"], CANDIDATES.index(m)))
    info = {"source": "out-of-fold mean probability of the cross-validation (each lesion predicted by the "
                      "members that did not train on it)",
            "selection": "lowest cross-fitted log loss over the training folds",
            "candidates": scores, "ece_bins": n_bins, "ece_binning": "equal-mass"}
    return CVCalibration(fit_map(best, y, p, info), fitted[best], scores)


def fit_site_map(base: CalibrationMap, y: np.ndarray, p_raw: np.ndarray, prior: float = 1.0,
                 fitted_on: dict | None = None) -> CalibrationMap:
    """A site's map: Platt over the model's own calibrated probability, fitted on reviewed lesions.

    The prior (Gaussian, ``prior`` per parameter, centred on the identity slope 1 and intercept 0) is
    worth about a couple of lesions: with few reviews the site map stays near the model's own.
    Reviewed lesions are chosen by the queue (high probability first), but the map models P(rim+ | score),
    which selection on the score alone does not bias.
    """
    y = np.asarray(y, dtype=int)
    z = logit(base.apply(p_raw))
    a, b = _fit_logistic(z, y, slope_only=False, prior=prior)
    info = {"lesions": int(y.size), "rim_positive": int(y.sum()), "prior": prior, **(fitted_on or {})}
    return CalibrationMap("platt", {"slope": a, "intercept": b}, info, base)


# ----------------------------------------------------------------------------- figure
def reliability_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], n_bins: int = ECE_BINS):
    """Reliability diagram (equal-mass bins) of one or more named (labels, probabilities) pairs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    for name, (y, p) in curves.items():
        rows = reliability_table(y, p, n_bins)
        x = [r["mean_probability"] for r in rows]
        obs = np.array([r["observed"] for r in rows])
        err = np.array([[r["observed"] - r["observed_low"] for r in rows],
                        [r["observed_high"] - r["observed"] for r in rows]])
        ece = expected_calibration_error(y, p, n_bins)
        ax.errorbar(x, obs, yerr=err, marker="o", ms=4, capsize=2, lw=1, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("Mean predicted rim+ probability (bin)")
    ax.set_ylabel("Observed rim+ fraction (bin, 95 % Wilson)")
    ax.set_title(f"Reliability ({n_bins} equal-mass bins, out of fold)")
    ax.legend(loc="upper left", fontsize="small")
    return fig


def calibration_metrics(y: np.ndarray, p: np.ndarray, p_raw: np.ndarray | None = None,
                        n_bins: int = ECE_BINS) -> dict:
    """metrics.json's calibration keys: ECE (equal-mass bins), log loss and Brier score, of the reported
    probability and, when given, of the raw one."""
    out = {"ece": expected_calibration_error(y, p, n_bins), "ece_bins": n_bins, "ece_binning": "equal-mass",
           "log_loss": log_loss(y, p), "brier": brier(y, p), "reliability": reliability_table(y, p, n_bins)}
    if p_raw is not None:
        out.update({"ece_raw": expected_calibration_error(y, p_raw, n_bins), "log_loss_raw": log_loss(y, p_raw),
                    "brier_raw": brier(y, p_raw)})
    return out


# ----------------------------------------------------------------------------- operating points from probabilities
def expected_operating_points(p: np.ndarray, max_sensitivity: float = 0.95) -> dict[str, float]:
    """F1 and high-sensitivity thresholds that calibrated probabilities imply for a set of lesions, no labels.

    Flagging every lesion with ``p >= t`` expects ``TP = sum of p over flagged``, ``FP = flagged - TP`` and
    ``FN = sum(p) - TP``; the F1 point maximises ``2 TP / (flagged + sum(p))``, the high-sensitivity point is
    the highest threshold whose expected sensitivity ``TP / sum(p)`` is as large as possible but at most
    ``max_sensitivity``. Recorded by ``group --recalibrate`` beside the thresholds it uses (those of the
    reviewed lesions): measured, a site map fitted on the queue's most probable lesions extrapolates too
    poorly below them for these to be the better choice (docs/calibration.md).
    """
    p = np.sort(np.asarray(p, dtype=float)[np.isfinite(p)])[::-1]
    if not p.size or p.sum() <= 0:
        return {"f1": float(p.max(initial=1.0)) + 1e-9, "high-sensitivity": float(p.max(initial=1.0)) + 1e-9}
    total = p.sum()
    last = np.r_[np.flatnonzero(np.diff(p) != 0), p.size - 1]  # flag whole groups of tied probabilities
    tp, flagged = np.cumsum(p)[last], last + 1.0
    f1 = 2 * tp / (flagged + total)
    sens = tp / total
    ok = np.flatnonzero(sens <= max_sensitivity + 1e-12)
    hs = last[ok[np.argmax(sens[ok])]] if ok.size else last[0]
    return {"f1": float(p[last[int(np.argmax(f1))]]), "high-sensitivity": float(p[hs])}


def add_calibrated_column(oof_tsv, calibrated: np.ndarray) -> None:
    """Add ``probability_calibrated`` (cross-fitted) after ``probability`` in ``oof_predictions.tsv``.

    ``probability`` stays the ensemble's raw mean, what the AUCs and paired comparisons rank: one global
    monotone map does not change a ranking, a map per fold would move pooled AUCs."""
    import pandas as pd

    from .. import derivatives as drv

    table = pd.read_csv(oof_tsv, sep="\t", dtype={"session": str}, keep_default_na=False)
    table.insert(int(table.columns.get_loc("probability")) + 1, "probability_calibrated",
                 np.round(np.asarray(calibrated, dtype=float), 6))
    drv.write_tsv(oof_tsv, table)
