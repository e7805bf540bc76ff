"""The paper's metrics against hand-computed cases and scikit-learn/scipy where they apply."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from qsmrim_app.model import metrics as M


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """20 rim-, 2 rim+. Descending: neg 0.95, pos 0.9, neg 0.8, pos 0.6, then 18 low negatives.

    ROC: (0,0) -> (0.05,0) -> (0.05,0.5) -> (0.10,0.5) -> (0.10,1) -> (1,1).
    Area for FPR <= 0.1: 0.05 * 0.5 = 0.025 -> /0.1 = 0.25; McClish 0.5 * (1 + (0.025-0.005)/0.095).
    """
    neg = np.r_[0.95, 0.8, np.linspace(0.5, 0.01, 18)]
    y = np.r_[np.zeros(20, int), 1, 1]
    p = np.r_[neg, 0.9, 0.6]
    return y, p


def test_partial_roc_auc_by_hand() -> None:
    y, p = _hand_case()
    assert M.partial_roc_auc(y, p, normalise="none") == pytest.approx(0.025)
    assert M.partial_roc_auc(y, p) == pytest.approx(0.25)
    mcclish = 0.5 * (1 + (0.025 - 0.005) / (0.1 - 0.005))
    assert M.partial_roc_auc(y, p, normalise="mcclish") == pytest.approx(mcclish)
    assert M.partial_roc_auc(y, p, normalise="mcclish") == pytest.approx(roc_auc_score(y, p, max_fpr=0.1))


def test_partial_roc_auc_scale_for_random_and_perfect() -> None:
    y = np.array([0, 1])
    tied = np.array([0.5, 0.5])  # the chance diagonal
    assert M.partial_roc_auc(y, tied) == pytest.approx(0.05)
    assert M.partial_roc_auc(y, tied, normalise="mcclish") == pytest.approx(0.5)
    assert M.partial_roc_auc(y, np.array([0.1, 0.9])) == pytest.approx(1.0)
    assert np.isnan(M.partial_roc_auc(np.zeros(4, int), np.arange(4.0)))
    with pytest.raises(ValueError):
        M.partial_roc_auc(y, tied, normalise="bogus")


def test_partial_roc_interpolates_crossing_segment() -> None:
    # 4 negatives (FPR steps of 0.25) and a tie: ROC (0,0)->(0.25,1) straight, TPR(0.1) = 0.4.
    y = np.array([1, 0, 0, 0, 0])
    p = np.array([0.7, 0.7, 0.2, 0.1, 0.0])
    assert M.partial_roc_auc(y, p, normalise="none") == pytest.approx(0.5 * 0.1 * 0.4)
    rng = np.random.default_rng(0)
    y2 = rng.integers(0, 2, 300)
    p2 = y2 * 0.5 + rng.random(300)
    assert M.partial_roc_auc(y2, p2, normalise="mcclish") == pytest.approx(roc_auc_score(y2, p2, max_fpr=0.1))


def test_pr_auc_step_equals_average_precision_and_differs_from_trapezoid() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.1).astype(int)
    p = y * 0.6 + rng.random(400)
    assert M.pr_auc(y, p) == pytest.approx(average_precision_score(y, p))
    # Hand: y=[1,0,1] by decreasing score. PR points (R,P): (.5,1), (.5,.5), (1,2/3) + sklearn's (0,1).
    # Step (AP): .5*1 + .5*2/3 = 5/6. Trapezoid joins (1,2/3)-(.5,.5)-(.5,1)-(0,1): .5*(2/3+.5)/2 + .5 = 19/24.
    y3, p3 = np.array([1, 0, 1]), np.array([0.9, 0.8, 0.7])
    assert M.pr_auc(y3, p3) == pytest.approx(5 / 6)
    assert M.pr_auc(y3, p3, method="trapezoid") == pytest.approx(19 / 24)
    assert np.isnan(M.pr_auc(np.zeros(3, int), p3))
    y_h, p_h = _hand_case()
    # Hand: recall 0.5 at precision 1/2, recall 1 at precision 2/4 -> AP = 0.5*0.5 + 0.5*0.5 = 0.5.
    assert M.pr_auc(y_h, p_h) == pytest.approx(0.5)


def test_step_curves_by_hand() -> None:
    y, p = _hand_case()
    grid = np.array([0.0, 0.04, 0.05, 0.07, 0.1, 0.5])
    assert np.allclose(M.roc_step(y, p, grid), [0, 0, 0.5, 0.5, 1, 1])
    rec = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    assert np.allclose(M.pr_step(y, p, rec), [0.5, 0.5, 0.5, 0.5, 0.5])
    y2, p2 = np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])
    assert np.allclose(M.pr_step(y2, p2, np.array([0.3, 0.5, 0.6, 1.0])), [1, 1, 2 / 3, 2 / 3])


def test_cv_curves_average_folds_piecewise_constant() -> None:
    # Fold 0: perfect. Fold 1: one negative above both positives (FPR 1/3 before any TPR).
    y = np.array([1, 1, 0, 0, 0, 1, 1, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.1, 0.7, 0.6, 0.95, 0.2, 0.1])
    fold = np.repeat([0, 1], 5)
    cv = M.cv_curve_aucs(y, p, fold, max_fpr=0.5)
    at = lambda g: cv.mean_tpr[np.searchsorted(cv.fpr_grid, g)]  # noqa: E731
    assert at(0.0) == pytest.approx(0.5)  # (1 + 0) / 2
    assert at(0.3) == pytest.approx(0.5)
    assert at(1 / 3) == pytest.approx(1.0)
    assert cv.fold_roc_auc == pytest.approx((1.0, 2 / 3))
    assert cv.roc_auc == pytest.approx(np.mean(cv.fold_roc_auc))
    # pROC (FPR<=0.5): fold 0 area 0.5, fold 1 area 0.5 - 1/3 -> mean raw area / 0.5.
    assert cv.pauc == pytest.approx(((0.5 + (0.5 - 1 / 3)) / 2) / 0.5)
    assert cv.fold_pr_auc[1] == pytest.approx(average_precision_score(y[5:], p[5:]))
    assert cv.pr_auc == pytest.approx(np.mean(cv.fold_pr_auc))


def test_cv_curves_match_sklearn_per_fold_and_skip_single_class_fold() -> None:
    rng = np.random.default_rng(2)
    n = 600
    y = (rng.random(n) < 0.15).astype(int)
    p = y * 0.8 + rng.random(n)  # continuous, no ties
    fold = rng.integers(0, 4, n)
    y[fold == 3] = 0  # a fold without rim+
    cv = M.cv_curve_aucs(y, p, fold)
    assert cv.valid_folds == (0, 1, 2)
    assert np.isnan(cv.fold_roc_auc[3]) and np.isnan(cv.fold_tpr[3]).all()
    for f in range(3):
        m = fold == f
        assert cv.fold_roc_auc[f] == pytest.approx(roc_auc_score(y[m], p[m]))
        assert cv.fold_pr_auc[f] == pytest.approx(average_precision_score(y[m], p[m]))
        assert cv.fold_pauc[f] == pytest.approx(M.partial_roc_auc(y[m], p[m]))
    assert cv.roc_auc == pytest.approx(np.mean(cv.fold_roc_auc[:3]))
    assert cv.pauc == pytest.approx(np.mean(cv.fold_pauc[:3]))
    assert np.all(np.diff(cv.mean_tpr) >= -1e-12)


def test_cv_curves_with_ties_follow_the_chance_segment() -> None:
    # Random-forest-like scores: many ties. Per fold the areas must equal sklearn / partial_roc_auc.
    rng = np.random.default_rng(8)
    y = (rng.random(500) < 0.2).astype(int)
    p = np.round(np.clip(0.3 * y + rng.random(500) * 0.7, 0, 1) * 20) / 20
    fold = rng.integers(0, 5, 500)
    cv = M.cv_curve_aucs(y, p, fold)
    for f in range(5):
        m = fold == f
        assert cv.fold_roc_auc[f] == pytest.approx(roc_auc_score(y[m], p[m]))
        assert cv.fold_pauc[f] == pytest.approx(M.partial_roc_auc(y[m], p[m]))
    assert cv.pauc == pytest.approx(np.mean(cv.fold_pauc))
    # a tie between one rim+ and one rim- out of 2 x 2: ROC (0,0)->(0,.5)->(.5,1)->(1,1)
    left, right = M.roc_on_grid(np.array([1, 1, 0, 0]), np.array([0.9, 0.5, 0.5, 0.1]), np.array([0, 0.25, 0.5]))
    assert np.allclose(left, [0, 0.75, 1]) and np.allclose(right, [0.5, 0.75, 1])
    assert np.all(cv.mean_tpr_left <= cv.mean_tpr + 1e-12)


def test_f1_optimal_threshold_by_hand() -> None:
    y = np.array([1, 1, 0, 1, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.2])  # F1 at 0.9/0.8/0.7/0.6/0.2 = .5/.8/.667/.857/.75
    t = M.f1_optimal_threshold(y, p)
    assert t == pytest.approx(0.6)
    assert f1_score(y, p >= t) == pytest.approx(6 / 7)
    assert M.f1_optimal_threshold(np.zeros(3, int), np.array([0.1, 0.5, 0.2])) > 0.5  # flags nothing
    assert M.f1_optimal_threshold(np.ones(3, int), np.array([0.1, 0.5, 0.2])) == pytest.approx(0.1)


def test_f1_optimal_threshold_is_best_among_all_cuts() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(200) < 0.2).astype(int)
    p = np.round(y * 0.3 + rng.random(200), 2)  # with ties
    t = M.f1_optimal_threshold(y, p)
    best = max(f1_score(y, p >= c, zero_division=0) for c in np.unique(p))
    assert f1_score(y, p >= t) == pytest.approx(best)


def test_high_sensitivity_threshold_and_workload() -> None:
    # 20 rim+ at 0.50..0.69 and 80 rim- at 0.00..0.79: sensitivity 19/20 = 0.95 is allowed.
    pos = 0.50 + 0.01 * np.arange(20)
    neg = np.linspace(0.0, 0.79, 80)
    y = np.r_[np.ones(20, int), np.zeros(80, int)]
    p = np.r_[pos, neg]
    t = M.high_sensitivity_threshold(y, p, max_sensitivity=0.95)
    assert t == pytest.approx(0.51)
    w = M.review_workload(y, p, t)
    assert w["sensitivity"] == pytest.approx(0.95)
    n_neg_flagged = int((neg >= 0.51).sum())
    assert w["lesions_to_review"] == 19 + n_neg_flagged
    assert w["review_time_saved"] == pytest.approx(1 - (19 + n_neg_flagged) / 100)
    assert w["missed_rimplus"] == 1
    # strictly below 0.95 when asked: 18/20 = 0.9
    assert M.high_sensitivity_threshold(y, p, max_sensitivity=0.94) == pytest.approx(0.52)


def test_confusion_by_hand_and_degenerate() -> None:
    y = np.array([1, 1, 0, 0, 0, 1])
    pred = np.array([1, 0, 1, 0, 0, 1])
    c = M.confusion(y, pred)
    assert (c["tp"], c["fp"], c["fn"], c["tn"]) == (2, 1, 1, 2)
    assert c["sensitivity"] == pytest.approx(2 / 3)
    assert c["specificity"] == pytest.approx(2 / 3)
    assert c["ppv"] == pytest.approx(2 / 3)
    assert c["f1"] == pytest.approx(f1_score(y, pred))
    assert c["accuracy"] == pytest.approx(4 / 6)
    none = M.confusion(np.zeros(3, int), np.zeros(3, int))
    assert np.isnan(none["sensitivity"]) and np.isnan(none["ppv"]) and none["specificity"] == 1.0


def test_count_agreement_ci_matches_scipy() -> None:
    rng = np.random.default_rng(4)
    true = rng.poisson(2.0, 40)
    pred = true + rng.integers(-1, 2, 40)
    out = M.count_agreement(pred, true)
    ref = stats.pearsonr(pred, true)
    ci = ref.confidence_interval(0.95)
    assert out["count_pearson_r"] == pytest.approx(ref.statistic)
    assert out["count_pearson_ci"] == pytest.approx([ci.low, ci.high])
    assert out["count_mse"] == pytest.approx(np.mean((pred - true) ** 2))
    const = M.count_agreement(np.zeros(5), np.arange(5))
    assert np.isnan(const["count_pearson_r"]) and const["count_mse"] == pytest.approx(6.0)


def _cohort(seed: int, signal: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    subjects = np.repeat([f"sub-{i:02d}" for i in range(30)], 20)
    y = (rng.random(subjects.size) < 0.08).astype(int)
    p = 1 / (1 + np.exp(-(signal * (y - 0.5) + rng.normal(0, 1, y.size))))
    fold = np.repeat(np.arange(30) % 5, 20)
    return y, p, fold, subjects


def test_lesion_and_subject_metrics_keys_and_consistency() -> None:
    y, p, fold, subjects = _cohort(5, 3.0)
    out = M.lesion_and_subject_metrics(y, p, fold, subjects)
    for key in ("roc_auc", "pauc_fpr_0.1", "pr_auc", "f1", "sensitivity", "specificity", "ppv", "accuracy",
                "tp", "fp", "fn", "tn", "count_pearson_r", "count_pearson_ci", "count_mse",
                "threshold_f1", "threshold_high_sensitivity", "high_sensitivity"):
        assert key in out, key
    assert out["tp"] + out["fp"] + out["fn"] + out["tn"] == y.size
    assert 0.5 < out["roc_auc"] <= 1 and 0.05 < out["pauc_fpr_0.1"] <= 1
    # binary metrics = per-fold F1-optimal thresholds applied to each fold, then pooled
    pred = np.zeros(y.size, int)
    for f in range(5):
        m = fold == f
        pred[m] = p[m] >= M.f1_optimal_threshold(y[m], p[m])
    assert out["f1"] == pytest.approx(f1_score(y, pred))
    assert out["threshold_f1"] == pytest.approx(np.mean(list(out["thresholds_f1_per_fold"].values())))
    _, pc, tc = M.subject_counts(subjects, y, pred)
    assert out["count_mse"] == pytest.approx(np.mean((pc - tc) ** 2))
    assert out["high_sensitivity"]["sensitivity"] <= 0.95 + 1e-9
    assert out["high_sensitivity"]["lesions_to_review"] >= out["tp"]
    json.dumps(out)  # JSON-serialisable as is


def test_lesion_and_subject_metrics_perfect_and_given_thresholds() -> None:
    y, _, fold, subjects = _cohort(6, 3.0)
    perfect = y * 0.9 + 0.05
    out = M.lesion_and_subject_metrics(y, perfect, fold, subjects)
    assert out["pauc_fpr_0.1"] == pytest.approx(1.0)
    assert out["pr_auc"] == pytest.approx(1.0)
    assert out["f1"] == pytest.approx(1.0) and out["count_mse"] == 0.0
    assert out["count_pearson_r"] == pytest.approx(1.0)
    fixed = M.lesion_and_subject_metrics(y, perfect, fold, subjects, thresholds_per_fold={f: 2.0 for f in range(5)})
    assert fixed["tp"] == 0 and fixed["fn"] == y.sum()
    with pytest.raises(ValueError, match="fold"):
        M.lesion_and_subject_metrics(y, perfect, fold, subjects, thresholds_per_fold={0: 0.5})


def test_lesion_and_subject_metrics_constant_predictions_and_empty_fold() -> None:
    y, _, fold, subjects = _cohort(7, 0.0)
    y[fold == 2] = 0
    const = np.full(y.size, 0.3)
    out = M.lesion_and_subject_metrics(y, const, fold, subjects)
    assert out["roc_auc_pooled"] == pytest.approx(0.5)
    assert out["pauc_fpr_0.1_pooled"] == pytest.approx(0.05)
    assert out["roc_auc"] == pytest.approx(0.5) and out["pauc_fpr_0.1"] == pytest.approx(0.05)
    assert out["n_valid_folds"] == 4 and np.isnan(out["fold_roc_auc"][2])
    # constant scores: rim+ folds flag everything (F1 > 0 beats flagging nothing), the empty fold nothing
    assert out["tp"] == y.sum() and out["fp"] == int(((fold != 2) & (y == 0)).sum())


def test_bootstrap_aucs_equal_the_reference_ones_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(100):
        n = int(rng.integers(4, 200))
        y = (rng.random(n) < 0.2).astype(int)
        y[:2] = [0, 1]
        p = np.round(rng.random(n) * rng.integers(2, 40)) / 10  # many ties
        expected = [M.roc_auc(y, p), M.partial_roc_auc(y, p, max_fpr=0.1), M.pr_auc(y, p)]
        assert M._three_aucs(y, p, 0.1) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(M._three_aucs(np.zeros(5, int), np.arange(5.0), 0.1)).all()


def test_paired_bootstrap_is_paired_and_by_cluster() -> None:
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(30).astype(str), 20)
    y = (rng.random(clusters.size) < 0.1).astype(int)
    a = y * 2.0 + rng.normal(size=y.size)
    same = M.paired_bootstrap(y, a, a, clusters, n_boot=300)
    assert same["roc_auc"]["difference"] == 0 and same["roc_auc"]["ci_low"] == same["roc_auc"]["ci_high"] == 0
    assert same["roc_auc"]["p_value"] == 1.0 and same["n_clusters"] == 30
    # a - b is the negative of b - a, interval mirrored (same replicates: same seed)
    b = y * 0.5 + rng.normal(size=y.size)
    ab, ba = M.paired_bootstrap(y, a, b, clusters, n_boot=300), M.paired_bootstrap(y, b, a, clusters, n_boot=300)
    for m in ("roc_auc", "pauc", "pr_auc"):
        assert ab[m]["difference"] == pytest.approx(-ba[m]["difference"])
        assert ab[m]["ci_low"] == pytest.approx(-ba[m]["ci_high"])
    assert ab["roc_auc"]["a"] == pytest.approx(M.roc_auc(y, a))
    assert ab["pr_auc"]["b"] == pytest.approx(M.pr_auc(y, b))
    assert ab["roc_auc"]["ci_low"] > 0
    # one participant's lesions move together: with all of a cluster's lesions copied 10 times the point
    # estimate is unchanged but the lesion count no longer narrows the interval (resampling is by cluster)
    few = np.arange(0, 600, 10)
    small = M.paired_bootstrap(y[few], a[few], b[few], clusters[few], n_boot=400, seed=1)
    copied = np.repeat(few, 10)
    big = M.paired_bootstrap(y[copied], a[copied], b[copied], clusters[copied], n_boot=400, seed=1)
    width = {k: r["roc_auc"]["ci_high"] - r["roc_auc"]["ci_low"] for k, r in (("small", small), ("big", big))}
    assert big["roc_auc"]["difference"] == pytest.approx(small["roc_auc"]["difference"])
    assert width["big"] == pytest.approx(width["small"], rel=1e-9)


def test_expert_count_agreement_says_why_r_or_its_interval_is_missing() -> None:
    """r from 3 varying units, its Fisher interval from 4; otherwise None with the reason, never NaN."""
    two = M.expert_count_agreement([1, 2], [1, 3])
    assert two["count_pearson_r"] is None and "at least 3" in two["r_not_computed"] and two["count_mse"] == 0.5
    flat = M.expert_count_agreement([0, 0, 0], [3, 2, 3])
    assert flat["count_pearson_r"] is None and "model's rim+ count is 0 for every" in flat["r_not_computed"]
    assert flat["mean_difference"] == pytest.approx(-8 / 3) and flat["exact_matches"] == 0
    three = M.expert_count_agreement([1, 2, 4], [1, 3, 3])
    assert three["count_pearson_r"] == pytest.approx(stats.pearsonr([1, 2, 4], [1, 3, 3]).statistic)
    assert three["count_pearson_ci"] is None and "at least 4" in three["ci_not_computed"]
    pred, true = np.array([0, 1, 3, 2, 5]), np.array([0, 2, 2, 3, 6])
    five = M.expert_count_agreement(pred, true)
    assert five["count_pearson_ci"] == pytest.approx(M.count_agreement(pred, true)["count_pearson_ci"])
    assert five["r_not_computed"] is None and five["ci_not_computed"] is None
