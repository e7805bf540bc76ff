"""The lesion dataset the model sees (arrays only) and the feature scaler stored with each fold model.

The group workflow builds a :class:`LesionSet` from the participants' patches and feature tables; the
model code never reads BIDS paths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .inputs import PATCH_SPACING_MM

# Raw patch channels (patches.RAW_CHANNELS): QSM ppb, FLAIR, signed distance (mm), other lesions.
# model/inputs.py turns them into the network's channels.
PATCH_CHANNELS = 4


@dataclass
class LesionSet:
    """All lesions of a study: raw patches, their references, feature table and (for training) rim labels.

    ``labels`` is None for unlabelled data (inference). ``features`` may hold NaN (a feature pyradiomics
    could not compute); :class:`FeatureScaler` imputes them. ``features`` holds every feature column of
    the tables (pyradiomics, radial, the floor score); each method selects its own by name.
    ``voxel_size_mm`` is the patches' physical sampling and ``extent_mm`` their size.
    """

    patches: np.ndarray  # (N, 4, X, Y, Z) float32
    features: np.ndarray  # (N, F) float32
    feature_names: list[str]
    labels: np.ndarray | None  # (N,) int64 0/1
    subjects: np.ndarray  # (N,) str
    lesion_ids: np.ndarray  # (N,) int
    voxel_size_mm: np.ndarray = field(default_factory=lambda: np.asarray(PATCH_SPACING_MM, np.float32))
    reference: np.ndarray | None = None  # (N, 2) local reference (median, scale) in ppb
    extent_mm: np.ndarray | None = None  # (3,)
    sessions: np.ndarray | None = None  # (N,) str, "" without sessions: a count belongs to one scan, not a person
    # (N,) str: the unit cross-validation keeps together (a site, a scanner, a generator family); None: the
    # participant. Folds by site make the out-of-fold predictions, and so the calibration map and the
    # operating points fitted on them, out-of-site.
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.patches = np.asarray(self.patches, dtype=np.float32)
        n = self.patches.shape[0]
        if self.reference is None:
            self.reference = np.tile(np.asarray([[0.0, 1.0]], np.float32), (n, 1))
        self.reference = np.asarray(self.reference, dtype=np.float32).reshape(n, 2)
        self.features = np.asarray(self.features, dtype=np.float32).reshape(n, -1)
        self.feature_names = [str(x) for x in self.feature_names]
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.subjects = np.asarray(self.subjects, dtype=str).reshape(-1)
        self.lesion_ids = np.asarray(self.lesion_ids, dtype=np.int64).reshape(-1)
        if self.sessions is None:
            self.sessions = np.full(n, "")
        self.sessions = np.asarray(self.sessions, dtype=str).reshape(-1)
        if self.groups is not None:
            self.groups = np.asarray(self.groups, dtype=str).reshape(-1)
        self.voxel_size_mm = np.asarray(self.voxel_size_mm, dtype=np.float32).reshape(3)
        if self.patches.ndim != 5 or self.patches.shape[1] != PATCH_CHANNELS:
            raise ValueError(f"patches must be (N, {PATCH_CHANNELS}, X, Y, Z) raw patches, got {self.patches.shape}")
        if self.extent_mm is None:
            self.extent_mm = self.voxel_size_mm * np.asarray(self.patches.shape[2:], np.float32)
        self.extent_mm = np.asarray(self.extent_mm, dtype=np.float32).reshape(3)
        if self.features.shape[1] != len(self.feature_names):
            raise ValueError(
                f"{self.features.shape[1]} feature columns but {len(self.feature_names)} feature names")
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError("feature names must be unique")
        for name, arr in (("subjects", self.subjects), ("lesion_ids", self.lesion_ids),
                          ("labels", self.labels), ("sessions", self.sessions), ("groups", self.groups)):
            if arr is not None and arr.shape[0] != n:
                raise ValueError(f"{name} has {arr.shape[0]} entries for {n} patches")
        if self.labels is not None and not np.isin(self.labels, (0, 1)).all():
            raise ValueError("labels must be 0 (rim-) or 1 (rim+)")

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def fold_units(self) -> np.ndarray:
        """What a cross-validation fold keeps whole: the groups when given, else the participants."""
        return self.subjects if self.groups is None else self.groups

    def subset(self, idx: np.ndarray | Sequence[int]) -> "LesionSet":
        """The lesions at ``idx`` (a fold), as a new set sharing nothing mutable with this one."""
        idx = np.asarray(idx, dtype=np.int64)
        return LesionSet(
            patches=self.patches[idx], features=self.features[idx], feature_names=list(self.feature_names),
            labels=None if self.labels is None else self.labels[idx], subjects=self.subjects[idx],
            lesion_ids=self.lesion_ids[idx], voxel_size_mm=self.voxel_size_mm.copy(),
            reference=self.reference[idx], extent_mm=self.extent_mm.copy(), sessions=self.sessions[idx],
            groups=None if self.groups is None else self.groups[idx])

    def summary(self) -> dict:
        """Counts stored in model.json so a model says what it was trained on."""
        out = {"lesions": len(self), "subjects": int(np.unique(self.subjects).size),
               "features": self.n_features, "patch_shape": list(self.patches.shape[1:]),
               "patch_spacing_mm": [float(v) for v in self.voxel_size_mm],
               "patch_extent_mm": [float(v) for v in self.extent_mm]}
        if self.labels is not None:
            out["rim_positive"] = int(self.labels.sum())
            out["rim_negative"] = int(len(self) - self.labels.sum())
        if self.groups is not None:
            names, counts = np.unique(self.groups, return_counts=True)
            out["fold_groups"] = {str(g): int(c) for g, c in zip(names, counts)}
        return out


def concat(sets: Sequence[LesionSet]) -> LesionSet:
    """Join per-participant sets into one study set (same features in the same order, same grid)."""
    if not sets:
        raise ValueError("nothing to concatenate")
    names = sets[0].feature_names
    for s in sets[1:]:
        if s.feature_names != names:
            raise ValueError("feature names differ between lesion sets")
        if not (np.allclose(s.voxel_size_mm, sets[0].voxel_size_mm, rtol=1e-3)
                and np.allclose(s.extent_mm, sets[0].extent_mm, rtol=1e-3)):
            raise ValueError("patch grids (mm) differ between lesion sets; rerun the participant level with one "
                             "--patch-extent-mm/--patch-spacing-mm")
    labelled = [s.labels is not None for s in sets]
    if any(labelled) and not all(labelled):
        raise ValueError("cannot mix labelled and unlabelled lesion sets")
    grouped = [s.groups is not None for s in sets]
    if any(grouped) and not all(grouped):
        raise ValueError("cannot mix lesion sets with and without fold groups")
    return LesionSet(
        patches=np.concatenate([s.patches for s in sets]),
        features=np.concatenate([s.features for s in sets]),
        feature_names=list(names),
        labels=np.concatenate([s.labels for s in sets]) if all(labelled) else None,
        subjects=np.concatenate([s.subjects for s in sets]),
        lesion_ids=np.concatenate([s.lesion_ids for s in sets]),
        voxel_size_mm=sets[0].voxel_size_mm.copy(),
        reference=np.concatenate([s.reference for s in sets]), extent_mm=sets[0].extent_mm.copy(),
        sessions=np.concatenate([s.sessions for s in sets]),
        groups=np.concatenate([s.groups for s in sets]) if all(grouped) else None)


@dataclass
class FeatureScaler:
    """Median imputation of missing values, then z-scoring; fitted on a training fold only.

    Stored per fold in model.json so inference applies exactly the training-time transform.
    """

    median: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> "FeatureScaler":
        x = np.asarray(features, dtype=np.float64)
        x = np.where(np.isfinite(x), x, np.nan)
        all_missing = np.isnan(x).all(axis=0) if x.shape[0] else np.ones(x.shape[1], bool)
        median = np.zeros(x.shape[1])
        if (~all_missing).any():
            median[~all_missing] = np.nanmedian(x[:, ~all_missing], axis=0)
        filled = np.where(np.isnan(x), median, x)
        mean = filled.mean(axis=0) if x.shape[0] else np.zeros(x.shape[1])
        std = filled.std(axis=0) if x.shape[0] else np.ones(x.shape[1])
        std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)  # constant column -> 0
        return cls(median=median, mean=mean, std=std)

    def transform(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.median.size:
            raise ValueError(f"expected (N, {self.median.size}) features, got {x.shape}")
        x = np.where(np.isfinite(x), x, self.median)
        return ((x - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict:
        return {"median": self.median.tolist(), "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureScaler":
        return cls(**{k: np.asarray(data[k], dtype=np.float64) for k in ("median", "mean", "std")})
