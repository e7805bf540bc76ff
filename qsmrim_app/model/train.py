"""``train``: cross-validate one method and write its model directory.

The pieces live at their seams: the method registry (``methods.py``), one member's training loop
(``loop.py``), cross-validation (``cv.py``), the scikit-learn members (``comparators.py``) and the model
directory (``modeldir.py``: model.json, the model id, the out-of-fold table). A method's feature columns
are worked out once here, from this run's own configuration, and handed to every step that needs them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from .config import TrainConfig
from .calibration import add_calibrated_column, fit_cv_calibration
from .cv import CVResult, EpochCallback, cross_validate, ensemble_thresholds, safe_threshold, with_data_grid
from .data import LesionSet
from .metrics import f1_optimal_threshold
from .loop import binary_auc, estimate_training_seconds, lr_milestones, train_fold
from .methods import FeatureColumns, get as get_method, select_features
from .modeldir import (MODEL_FORMAT, OOF_TSV, created_now, model_id as make_model_id, versions, write_model_json,
                       write_oof_predictions)

__all__ = ["train", "cross_validate", "estimate_training_seconds", "lr_milestones", "train_fold", "input_meta",
           "CVResult"]


def input_meta(features: FeatureColumns, config: TrainConfig) -> dict:
    """What model.json says about the network's inputs (the keys finetune.INPUT_KEYS compares)."""
    return {"feature_names": features.names, "inputs": config.input_spec().to_dict()}


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _model_meta(lesions: LesionSet, config: TrainConfig, cv: CVResult, inputs: dict, model_id: str) -> dict:
    return {
        "format_version": MODEL_FORMAT,
        "model_id": model_id,
        "method": config.method,
        "config": config.to_dict(),
        **inputs,
        "protocol": config.protocol,
        "folds": [{"fold": k, "n_train": int(len(tr)), "n_test": int(len(te)),
                   "threshold": cv.fold_thresholds[k], "scaler": cv.scalers[k].to_dict()}
                  for k, (tr, te) in enumerate(cv.folds)],
        "members": cv.members,
        "thresholds": cv.thresholds,
        "cv": {"auc": _finite_or_none(binary_auc(lesions.labels, cv.probability))},
        "versions": versions(),
        "created": created_now(),
        "training_data": lesions.summary(),
    }


def train(lesions: LesionSet, config: TrainConfig, out_dir: Path, progress: bool = True,
          epoch_callback: EpochCallback | None = None, features: FeatureColumns | None = None,
          model_id: str | None = None, trained: Mapping[str, Path] | None = None) -> Path:
    """Cross-validate, then write the model directory (model.json, weights/, oof_predictions.tsv).

    ``features``: the method's columns when the caller has worked them out already (from this config);
    ``model_id``: the id the caller named the directory with (default: :func:`modeldir.model_id` of this
    configuration and these lesions); ``trained``: for a fusion, component directories this run has
    trained already (fusion.py).
    """
    method = get_method(config.method)  # an unknown method fails here, before any work
    config = with_data_grid(config, lesions)
    if method.kind == "fusion":
        from .fusion import train_fusion

        model_id = model_id or make_model_id(config.method, config.to_dict(), lesions)
        return train_fusion(lesions, config, out_dir, progress, epoch_callback, model_id=model_id, trained=trained)
    features = features or select_features(lesions, config)
    inputs = input_meta(features, config)
    if config.init_model:
        from .finetune import check_init_model, read_init_model

        check_init_model(read_init_model(Path(config.init_model)), inputs, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cv = cross_validate(lesions, config, out_dir, progress, epoch_callback, features)
    # A monotone calibration map of the OOF probability (calibration.py); the operating points on its scale.
    calibration = fit_cv_calibration(lesions.labels, cv.probability, cv.fold)
    cv.thresholds = calibrated_thresholds(lesions.labels, calibration.map.apply(cv.probability), cv.fold)
    model_id = model_id or make_model_id(config.method, config.to_dict(), lesions)
    write_model_json(out_dir, {**_model_meta(lesions, config, cv, inputs, model_id),
                               "calibration": calibration.map.to_dict()})
    write_oof_predictions(out_dir / OOF_TSV, lesions, cv.probability, cv.member_probability, cv.fold, cv.vote,
                          cv.vote_fraction)
    add_calibrated_column(out_dir / OOF_TSV, calibration.crossfit)
    return out_dir


def calibrated_thresholds(labels: np.ndarray, calibrated: np.ndarray, fold_of: np.ndarray) -> dict[str, float]:
    """The operating points of :func:`cv.ensemble_thresholds` chosen on the calibrated probability."""
    fold_thr = [safe_threshold(f1_optimal_threshold(labels[fold_of == k], calibrated[fold_of == k]))
                for k in np.unique(fold_of)]
    return ensemble_thresholds(labels, calibrated, fold_of, fold_thr)
