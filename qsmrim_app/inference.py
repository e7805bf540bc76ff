"""Participant-level classification: the bundled (or given) ensemble applied to one participant's lesions."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .lesions import ID_COLUMNS
from .patches import load_patches

LOGGER = logging.getLogger("qsmrim")
GEOMETRY_COLUMNS = ["lesion_id", "voxels", "volume_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]
#: Columns of the radiomics table that are not features (``split_from``: see lesions.with_split_from).
NON_FEATURE_COLUMNS = list(ID_COLUMNS)


@dataclass(frozen=True)
class Classification:
    table: pd.DataFrame  # GEOMETRY_COLUMNS + probability, uncertainty, votes, rim_positive, threshold
    threshold: float
    operating_point: str
    model_id: str
    calibration: str = "none"  # the calibration map, in words (CalibrationMap.describe)


def choose_threshold(thresholds: dict[str, float], threshold: float | None, operating_point: str) -> tuple[float, str]:
    """An explicit --threshold wins; else the model's stored threshold for the operating point."""
    if threshold is not None:
        return float(threshold), "user"
    if operating_point not in thresholds:
        raise ValueError(f"the model has no {operating_point!r} threshold (it has {sorted(thresholds)})")
    return float(thresholds[operating_point]), operating_point


_ENSEMBLES: dict[tuple, object] = {}
#: How many times this process read a model directory from disk (tests check it stays at one per model).
LOADS: dict[str, int] = {}


def cached_ensemble(model_dir: Path, device: str = "auto"):
    """The model of ``model_dir``, read once per process and reused for every unit it classifies.

    A MultiProc worker classifies many units one after another; loading 5-15 networks each time
    cost more than the inference. The key includes model.json's modification time, so a model
    retrained in place is read again.
    """
    from .model.modeldir import MODEL_JSON
    from .model.predict import load_ensemble  # torch is imported only when classification runs

    model_dir = Path(model_dir).resolve()
    key = (str(model_dir), device, (model_dir / MODEL_JSON).stat().st_mtime_ns)
    if key not in _ENSEMBLES:
        _ENSEMBLES.clear()  # one model at a time: a process never needs two
        _ENSEMBLES[key] = load_ensemble(model_dir, device=device)
        LOADS[str(model_dir)] = LOADS.get(str(model_dir), 0) + 1
        LOGGER.info("model %s loaded in process %d (%d members)", model_dir, os.getpid(),
                    len(_ENSEMBLES[key].members))
    return _ENSEMBLES[key]


def classify_lesions(patches_file: Path, features_file: Path, model_dir: Path, *, threshold: float | None = None,
                     operating_point: str = "f1", device: str = "auto") -> Classification:
    """Probability per lesion = mean over the fold/seed models; rim+ when it reaches the threshold.

    Thresholding the ensemble's mean probability (rather than counting member votes) keeps one rule
    for every operating point, so `rim+ mask == lesions with probability >= threshold` holds exactly.
    The member votes are kept as a column for review.
    """
    features = pd.read_csv(features_file, sep="\t", na_values=["n/a"], keep_default_na=False)
    patchset = load_patches(patches_file)
    if list(patchset.lesion_ids) != features["lesion_id"].tolist():
        raise RuntimeError(f"{patches_file} and {features_file} list different lesions")
    ensemble = cached_ensemble(Path(model_dir), device=device)
    cutoff, point = choose_threshold(ensemble.thresholds, threshold, operating_point)
    # The probabilities are float32; compared and written at that precision, a lesion exactly at a threshold
    # fitted on float64 values gets the call its written numbers say (probability >= threshold).
    cutoff = float(np.float32(cutoff))
    from .model.inputs import is_feature_column

    ensemble.inputs.check_patches(patchset.grid.extent_mm, patchset.grid.spacing_mm)
    feature_names = [c for c in features.columns if is_feature_column(c)]
    prediction = ensemble.predict(patchset.patches, features[feature_names].to_numpy(np.float32), feature_names,
                                  reference=patchset.reference)
    table = features[[c for c in NON_FEATURE_COLUMNS if c in features.columns]].copy()
    table["probability"] = np.asarray(prediction.probability, dtype=float)
    table["probability_raw"] = np.asarray(prediction.probability_raw, dtype=float)
    table["uncertainty"] = np.asarray(prediction.uncertainty, dtype=float)
    table["votes"] = np.asarray(prediction.votes, dtype=float)
    table["rim_positive"] = (table["probability"] >= cutoff).astype(int)
    table["threshold"] = cutoff
    calibration = ensemble.calibration
    if calibration.is_identity:
        LOGGER.info("model %s has no calibration map: probabilities are the ensemble's raw mean", ensemble.model_id)
    return Classification(table=table, threshold=cutoff, operating_point=point, model_id=ensemble.model_id,
                          calibration=calibration.describe())


def paint_lesions(instances: np.ndarray, lesion_ids, values) -> np.ndarray:
    """A map with each lesion filled with its value (0 elsewhere), by a lookup table not a loop."""
    lookup = np.zeros(int(instances.max(initial=0)) + 1, dtype=np.float32)
    lookup[np.asarray(lesion_ids, dtype=int)] = np.asarray(values, dtype=np.float32)
    return lookup[instances]
