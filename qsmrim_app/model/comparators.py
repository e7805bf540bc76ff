"""APRL(RF): the radiomics random-forest comparator of the paper's Table 2 (Lou et al. 2021, "APRL").

APRL classifies a lesion from first-order radiomic features of the original (unfiltered) QSM, balances
the training set with SMOTE and fits a random forest. We keep exactly that recipe: select the
``original_firstorder_*`` columns of our 527-feature table, impute missing values with the training
median (pyradiomics gives NaN for a few degenerate lesions), SMOTE, RandomForest. The networks APRL(NN)
and RimNet are trained by ``model.train`` and are not here.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from imblearn.over_sampling import SMOTE
from imblearn.pipeline import Pipeline
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import RandomForestClassifier
from sklearn.impute import SimpleImputer

from .data import FeatureScaler
from .folds import fold_assignments

if TYPE_CHECKING:
    from .methods import FeatureColumns

FIRST_ORDER_PREFIX = "original_firstorder_"
N_TREES = 500
SMOTE_NEIGHBOURS = 5


def first_order_columns(feature_names: Sequence[str]) -> list[str]:
    """The first-order features of the original image, in table order."""
    return [name for name in feature_names if str(name).startswith(FIRST_ORDER_PREFIX)]


def fit_aprl_rf(
    features: np.ndarray,
    labels: np.ndarray,
    feature_names: Sequence[str],
    seed: int = 0,
    n_estimators: int = N_TREES,
    n_jobs: int = 1,
) -> Pipeline:
    """Fit APRL(RF) on the full feature table; the returned pipeline selects its columns itself.

    ``predict_proba`` takes a table with the same ``feature_names`` columns; column 1 is P(rim+).
    SMOTE's neighbour count shrinks to the number of rim+ lesions minus one (SMOTE is skipped with a
    single rim+). Deterministic for a seed.
    """
    x = np.asarray(features, dtype=float)
    y = np.asarray(labels).astype(int).ravel()
    names = [str(n) for n in feature_names]
    if x.ndim != 2 or x.shape[0] != y.size or x.shape[1] != len(names):
        raise ValueError(f"features {x.shape} must be (n_lesions={y.size}, n_features={len(names)})")
    if not np.isin(y, (0, 1)).all() or y.min() == y.max():
        raise ValueError("APRL(RF) needs both rim+ (1) and rim- (0) lesions to train")
    wanted = first_order_columns(names)
    if not wanted:
        raise ValueError(f"no '{FIRST_ORDER_PREFIX}*' columns among the {len(names)} features")
    columns = [names.index(c) for c in wanted]
    n_pos = int(y.sum())
    smote = (
        SMOTE(k_neighbors=min(SMOTE_NEIGHBOURS, n_pos - 1), random_state=seed) if n_pos >= 2 else "passthrough"
    )
    model = Pipeline([
        ("first_order", ColumnTransformer([("keep", "passthrough", columns)], remainder="drop")),
        ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
        ("smote", smote),
        ("forest", RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs)),
    ])
    model.fit(x, y)
    model.feature_names_ = names  # the columns predict_proba expects, in order
    return model


def aprl_rf_out_of_fold(
    features: np.ndarray,
    labels: np.ndarray,
    feature_names: Sequence[str],
    subjects: Sequence[str],
    lesion_ids: Sequence[int] | None = None,
    n_folds: int = 5,
    seed: int = 0,
    n_estimators: int = N_TREES,
) -> pd.DataFrame:
    """Out-of-fold APRL(RF) probabilities on the shared subject-stratified folds.

    Returns the table ``model.evaluation`` reads: subject, lesion_id, label, fold, probability.
    """
    x = np.asarray(features, dtype=float)
    y = np.asarray(labels).astype(int).ravel()
    subj = np.asarray(subjects).astype(str)
    fold_of = fold_assignments(subj, y, n_folds=n_folds, seed=seed)
    prob = np.full(y.size, np.nan)
    for k in range(n_folds):
        test = fold_of == k
        model = fit_aprl_rf(x[~test], y[~test], feature_names, seed=seed, n_estimators=n_estimators)
        prob[test] = model.predict_proba(x[test])[:, 1]
    ids = np.arange(y.size) if lesion_ids is None else np.asarray(lesion_ids)
    return pd.DataFrame({"subject": subj, "lesion_id": ids, "label": y, "fold": fold_of, "probability": prob})


class ShellCoreScore:
    """The training-free floor as an estimator: P(rim+) is a logistic of the (z-scored) rim-minus-core score.

    Nothing is learnt; the ensemble's per-fold scaler z-scores the score on the training fold, so the
    out-of-fold threshold logic is the same as for every other method.
    """

    def fit(self, x: np.ndarray, y: np.ndarray | None = None) -> "ShellCoreScore":
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = np.nan_to_num(np.asarray(x, dtype=float)[:, 0])
        p = 1.0 / (1.0 + np.exp(-z))
        return np.stack([1 - p, p], axis=1)


def fit_shell_core(features: np.ndarray, labels: np.ndarray, feature_names: Sequence[str], seed: int = 0
                   ) -> ShellCoreScore:
    """The training-free floor (nothing is fitted)."""
    return ShellCoreScore().fit(np.asarray(features, dtype=float), labels)


def fit_rf(features: np.ndarray, labels: np.ndarray, feature_names: Sequence[str], seed: int = 0
           ) -> RandomForestClassifier:
    """Floor: a class-balanced random forest on the 527 features."""
    model = RandomForestClassifier(n_estimators=N_TREES, class_weight="balanced_subsample", min_samples_leaf=2,
                                   random_state=seed, n_jobs=1)
    return _fit_quietly(model, features, labels)


def fit_logreg(features: np.ndarray, labels: np.ndarray, feature_names: Sequence[str], seed: int = 0):
    """Floor: class-balanced penalised logistic regression on the 527 features, C by inner CV."""
    from sklearn.linear_model import LogisticRegressionCV

    y = np.asarray(labels).astype(int).ravel()
    folds = max(2, min(3, int(y.sum()), int((1 - y).sum())))
    model = LogisticRegressionCV(Cs=6, cv=folds, scoring="roc_auc", class_weight="balanced", max_iter=3000,
                                 random_state=seed)
    return _fit_quietly(model, features, y)


def _fit_quietly(model, features: np.ndarray, labels: np.ndarray):
    x = np.nan_to_num(np.asarray(features, dtype=float))
    y = np.asarray(labels).astype(int).ravel()
    with warnings.catch_warnings():  # sklearn's API-transition notices (FutureWarning) say nothing to a user
        warnings.simplefilter("ignore", FutureWarning)
        return model.fit(x, y)


def fit_comparator(method: str, features: np.ndarray, labels: np.ndarray, feature_names: Sequence[str],
                   seed: int = 0):
    """Fit one non-network member with the registry's builder: ``aprl-rf``, ``rf`` / ``logreg`` (the 527
    features, class-balanced: the floors every model must beat) or ``shell-core`` (training-free)."""
    from .methods import get, names_of_kind

    entry = get(method)
    if entry.kind == "network":
        raise ValueError(f"{method!r} is not a comparator ({', '.join(names_of_kind('sklearn', 'floor'))})")
    return entry.build()(np.asarray(features, dtype=float), np.asarray(labels).astype(int).ravel(),
                         feature_names, seed)


def fit_sklearn_member(method: str, features: "FeatureColumns", labels: np.ndarray, train_idx: np.ndarray,
                       test_idx: np.ndarray, scaler: FeatureScaler, seed: int, path: Path
                       ) -> tuple[Path, np.ndarray]:
    """One cross-validation member of a scikit-learn method or floor, on the same folds as the networks,
    stored with joblib (an existing file is reused); returns its path and held-out probabilities."""
    import joblib

    if path.is_file():
        model = joblib.load(path)
    else:
        model = fit_comparator(method, scaler.transform(features.values[train_idx]), labels[train_idx],
                               features.names, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        joblib.dump(model, path)
    return path, model.predict_proba(scaler.transform(features.values[test_idx]))[:, 1].astype(np.float64)
