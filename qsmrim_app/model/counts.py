"""A participant's rim+ count from calibrated lesion probabilities: expected value and a 95 % interval.

If each lesion is rim+ independently with its calibrated probability p_i, the number of rim+ lesions
follows a Poisson-binomial distribution. Its mean is sum(p_i); its probability mass function comes
from an exact dynamic programme (one convolution with [1 - p_i, p_i] per lesion, O(n^2) for n lesions:
a 400-lesion participant takes well under a millisecond's worth of vector operations per lesion), so no
normal approximation is needed even for a handful of lesions. The interval is the equal-tailed one of
that distribution: the smallest count whose cumulative probability reaches 2.5 % and the smallest
reaching 97.5 %. It states what the probabilities imply; it is only as good as their calibration, and it
ignores that lesions of one scan are not independent.
"""
from __future__ import annotations

import numpy as np

LEVEL = 0.95


def poisson_binomial_pmf(p: np.ndarray) -> np.ndarray:
    """P(K = k) for k = 0..n, K the number of successes of independent Bernoulli(p_i) trials."""
    p = np.clip(np.asarray(p, dtype=float).ravel(), 0.0, 1.0)
    pmf = np.zeros(p.size + 1)
    pmf[0] = 1.0
    for i, q in enumerate(p, start=1):
        # after i lesions, counts 0..i: pmf[k] <- pmf[k](1 - q) + pmf[k - 1] q
        pmf[1:i + 1] = pmf[1:i + 1] * (1.0 - q) + pmf[0:i] * q
        pmf[0] *= 1.0 - q
    return pmf


def count_interval(p: np.ndarray, level: float = LEVEL) -> tuple[float, int, int]:
    """(expected count, lower, upper): the mean and the equal-tailed ``level`` interval of the count."""
    p = np.asarray(p, dtype=float).ravel()
    p = p[np.isfinite(p)]
    if not p.size:
        return 0.0, 0, 0
    cdf = np.cumsum(poisson_binomial_pmf(p))
    alpha = (1.0 - level) / 2.0
    tol = 1e-12  # a cumulative sum that should equal the tail exactly may fall short by rounding
    low = int(np.searchsorted(cdf, alpha - tol, side="left"))
    high = int(np.searchsorted(cdf, 1.0 - alpha - tol, side="left"))
    return float(p.sum()), low, min(high, p.size)


def count_columns(p: np.ndarray, level: float = LEVEL) -> dict:
    """The summary/group-table columns of one unit (see derivatives.SUMMARY_DICTIONARY)."""
    expected, low, high = count_interval(p, level)
    return {"n_rimplus_expected": round(expected, 3), "n_rimplus_ci_low": low, "n_rimplus_ci_high": high}
