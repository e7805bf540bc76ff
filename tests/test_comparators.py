"""APRL(RF): first-order column choice, learning on a separable table, determinism, few positives."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from qsmrim_app.model.comparators import aprl_rf_out_of_fold, first_order_columns, fit_aprl_rf

NAMES = [
    "original_shape_Elongation", "original_firstorder_Mean", "original_firstorder_Variance",
    "wavelet-LLH_firstorder_Mean", "original_glcm_Contrast", "original_firstorder_Skewness",
]


def _table(seed: int, n: int = 300, shift: float = 2.0, signal_col: str = "original_firstorder_Mean"):
    """Rim+ lesions (10 %) differ only in ``signal_col``; a few NaNs as pyradiomics leaves them."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(int)
    x = rng.normal(size=(n, len(NAMES)))
    x[:, NAMES.index(signal_col)] += shift * y
    x[rng.random(x.shape) < 0.01] = np.nan
    return x, y


def test_first_order_columns() -> None:
    assert first_order_columns(NAMES) == [
        "original_firstorder_Mean", "original_firstorder_Variance", "original_firstorder_Skewness"]


def test_first_order_columns_on_pyradiomics_names(shared_data) -> None:
    """pyradiomics' own baseline tables: 18 first-order features, no diagnostics, GLCM or shape."""
    names = []
    for cls in ("firstorder", "glcm", "shape"):
        with open(shared_data / "pyradiomics_baseline" / "baseline" / f"baseline_{cls}.csv") as fh:
            names += [row[0] for row in csv.reader(fh)][1:]
    chosen = first_order_columns(names)
    assert len(chosen) == 18
    assert all(c.startswith("original_firstorder_") for c in chosen)
    assert "original_firstorder_Kurtosis" in chosen


def test_aprl_rf_beats_chance_and_is_deterministic() -> None:
    x, y = _table(0)
    xt, yt = _table(1)
    a = fit_aprl_rf(x, y, NAMES, seed=3, n_estimators=100)
    b = fit_aprl_rf(x, y, NAMES, seed=3, n_estimators=100)
    pa, pb = a.predict_proba(xt)[:, 1], b.predict_proba(xt)[:, 1]
    assert np.array_equal(pa, pb)
    assert roc_auc_score(yt, pa) > 0.85


def test_aprl_rf_ignores_non_first_order_features() -> None:
    # All the signal sits in a GLCM column that APRL does not use: held-out AUC stays near chance.
    x, y = _table(2, n=400, shift=4.0, signal_col="original_glcm_Contrast")
    xt, yt = _table(3, n=400, shift=4.0, signal_col="original_glcm_Contrast")
    model = fit_aprl_rf(x, y, NAMES, seed=0, n_estimators=100)
    assert abs(roc_auc_score(yt, model.predict_proba(xt)[:, 1]) - 0.5) < 0.15


def test_aprl_rf_few_positives_and_errors() -> None:
    x, y = _table(4, n=60)
    y[:] = 0
    y[:2] = 1  # SMOTE with k_neighbors=1
    model = fit_aprl_rf(x, y, NAMES, seed=0, n_estimators=20)
    assert model.predict_proba(x).shape == (60, 2)
    y[1] = 0  # one rim+: SMOTE skipped
    assert fit_aprl_rf(x, y, NAMES, n_estimators=20).predict_proba(x).shape == (60, 2)
    with pytest.raises(ValueError, match="both"):
        fit_aprl_rf(x, np.zeros(60, int), NAMES)
    with pytest.raises(ValueError, match="firstorder"):
        fit_aprl_rf(x[:, :1], y, ["original_shape_Elongation"])


def test_aprl_rf_out_of_fold_table() -> None:
    x, y = _table(5, n=300)
    subjects = np.repeat([f"sub-{i:02d}" for i in range(30)], 10)
    oof = aprl_rf_out_of_fold(x, y, NAMES, subjects, n_folds=5, seed=0, n_estimators=50)
    assert list(oof.columns) == ["subject", "lesion_id", "label", "fold", "probability"]
    assert oof["probability"].between(0, 1).all()
    assert (oof.groupby("subject")["fold"].nunique() == 1).all()
    assert roc_auc_score(oof["label"], oof["probability"]) > 0.8
