"""Subject-level cross-validation folds stratified by each subject's rim+ burden.

The paper (Zhang et al. 2022) runs a 5-fold cross validation in which all lesions of one subject stay in
the same fold, so a network never sees a lesion of a test subject. We stratify the *subjects* by their
rim+ count stratum (0, 1-3, 4-6, >6 rim+ lesions) so that every fold gets a similar mix of rim-free and
rim-heavy patients.

Why ``StratifiedKFold`` over subjects rather than ``StratifiedGroupKFold`` over lesions: the quantity we
want balanced is a property of the subject (its stratum), not of the lesion. ``StratifiedKFold`` applied to
one row per subject with the stratum as class gives, per stratum, fold sizes that differ by at most one
subject (sklearn allocates each class round-robin), exactly and deterministically. ``StratifiedGroupKFold``
balances the *lesion-level* label distribution greedily, which with a few rim-heavy subjects can put two
of them in one fold and leaves the subject strata unbalanced. ``tests/test_folds.py`` measures the balance.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

# Upper bounds (inclusive) of the rim+ count strata 0, 1-3, 4-6; anything above is stratum 3.
_STRATUM_BOUNDS: tuple[int, ...] = (0, 3, 6)


def rim_stratum(n_rimplus: int) -> int:
    """Stratum of a subject's rim+ lesion count: 0 (none), 1 (1-3), 2 (4-6), 3 (>6)."""
    n = int(n_rimplus)
    if n < 0:
        raise ValueError(f"a rim+ count cannot be negative, got {n_rimplus}")
    for stratum, bound in enumerate(_STRATUM_BOUNDS):
        if n <= bound:
            return stratum
    return len(_STRATUM_BOUNDS)


def subject_strata(subjects: Sequence[str], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique subjects and the rim+ stratum of each (from the per-lesion 0/1 labels)."""
    subj = np.asarray(subjects).astype(str)
    lab = np.asarray(labels)
    if subj.ndim != 1 or lab.shape != subj.shape:
        raise ValueError(f"subjects and labels must be 1-D of equal length, got {subj.shape} and {lab.shape}")
    if lab.size and not np.isin(lab, (0, 1)).all():
        raise ValueError("labels must be 0 (rim-) or 1 (rim+)")
    unique, inverse = np.unique(subj, return_inverse=True)
    counts = np.bincount(inverse, weights=lab.astype(float), minlength=unique.size).astype(int)
    return unique, np.array([rim_stratum(c) for c in counts], dtype=int)


def _subject_fold_ids(strata: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold id per subject; coarsens the strata only when sklearn cannot stratify them at all."""
    placeholder = np.zeros((strata.size, 1))
    # sklearn refuses when *every* stratum is smaller than n_folds (tiny cohorts); then fall back to
    # rim-free vs rim+ subjects, and finally to an unstratified shuffled split.
    candidates = (strata, (strata > 0).astype(int))
    for classes in candidates:
        if np.bincount(classes).max() < n_folds:
            continue
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        fold_ids = np.empty(strata.size, dtype=int)
        with warnings.catch_warnings():
            # "least populated class has only k members": expected for rare rim-heavy subjects.
            warnings.simplefilter("ignore", UserWarning)
            for fold, (_, test) in enumerate(splitter.split(placeholder, classes)):
                fold_ids[test] = fold
        return fold_ids
    fold_ids = np.empty(strata.size, dtype=int)
    for fold, (_, test) in enumerate(KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(placeholder)):
        fold_ids[test] = fold
    return fold_ids


def fold_assignments(subjects: Sequence[str], labels: np.ndarray, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Test-fold id (0..n_folds-1) of every lesion; all lesions of a subject share one fold.

    Deterministic for a seed and independent of the order in which lesions are listed.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    unique, strata = subject_strata(subjects, labels)
    if unique.size < n_folds:
        raise ValueError(
            f"cannot make {n_folds} subject-level folds from {unique.size} subject(s): "
            f"every fold needs at least one subject (use fewer folds or more subjects)"
        )
    subject_fold = _subject_fold_ids(strata, n_folds, seed)
    inverse = np.searchsorted(unique, np.asarray(subjects).astype(str))
    return subject_fold[inverse]


def stratified_subject_folds(
    subjects: Sequence[str], labels: np.ndarray, n_folds: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) LESION index arrays per fold, subjects stratified by rim+ count stratum."""
    fold_of = fold_assignments(subjects, labels, n_folds=n_folds, seed=seed)
    return [(np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)) for k in range(n_folds)]
