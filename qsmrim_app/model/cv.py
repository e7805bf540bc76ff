"""Cross-validation: subject-stratified K folds x S seeds, the members kept as the ensemble.

Fold thresholds: each fold's F1-optimal threshold is fitted on that fold's held-out (mean over seeds)
probabilities, as in the paper's cross-validation protocol; out-of-fold majority votes use them and so
are optimistic. The overall operating points ('f1', 'high-sensitivity') are fitted on the mean
out-of-fold probability of all lesions (see :func:`ensemble_thresholds`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .comparators import fit_sklearn_member
from .config import TrainConfig
from .data import FeatureScaler, LesionSet
from .folds import stratified_subject_folds
from .loop import train_fold
from .methods import FeatureColumns, get as get_method, select_features
from .metrics import f1_optimal_threshold, high_sensitivity_threshold
from .network import build_network
from .predict import autocast_dtype, load_state, predict_probabilities, resolve_device

EpochCallback = Callable[[int, int, int, dict], None]  # (fold, seed, epoch, record)


def member_seed(base_seed: int, fold: int, seed: int) -> int:
    """One torch seed per ensemble member, distinct across folds and seeds."""
    return int(base_seed) * 1_000_003 + 1_000 * int(fold) + int(seed)


def member_name(fold: int, seed: int) -> str:
    return f"fold{fold}_seed{seed}"


def with_data_grid(config: TrainConfig, lesions: LesionSet) -> TrainConfig:
    """The model's patch grid is the one its training patches were sampled on."""
    return replace(config, patch_extent_mm=tuple(float(v) for v in lesions.extent_mm),
                   patch_spacing_mm=tuple(float(v) for v in lesions.voxel_size_mm))


def safe_threshold(value: float) -> float:
    return float(value) if np.isfinite(value) else 0.5


@dataclass
class CVResult:
    """Out-of-fold results of a K x S cross-validation (all arrays in the lesion set's order)."""

    probability: np.ndarray  # (N,) mean over seeds of the held-out probability
    member_probability: np.ndarray  # (S, N)
    vote_fraction: np.ndarray  # (N,) fraction of seeds above the fold threshold
    vote: np.ndarray  # (N,) int majority vote
    fold: np.ndarray  # (N,) fold in which the lesion was held out
    fold_thresholds: list[float]
    thresholds: dict[str, float]
    scalers: list[FeatureScaler]
    members: list[dict]
    folds: list[tuple[np.ndarray, np.ndarray]]


@dataclass
class _Run:
    """What every member of one cross-validation shares."""

    lesions: LesionSet
    config: TrainConfig
    out_dir: Path
    features: FeatureColumns
    x_all: np.ndarray | None  # network inputs (networks only)
    init_meta: dict | None  # --init-model's model.json (fine-tuning only)
    n_folds: int
    seeds: int
    progress: bool
    epoch_callback: EpochCallback | None


def _member_probability(run: _Run, k: int, s: int, train_idx: np.ndarray, test_idx: np.ndarray,
                        scaler: FeatureScaler) -> tuple[Path, np.ndarray]:
    """Train (or reuse the stored weights of) member (fold k, seed s); its held-out probabilities."""
    name, torch_seed = member_name(k, s), member_seed(run.config.base_seed, k, s)
    if run.x_all is None:
        return fit_sklearn_member(run.config.method, run.features, run.lesions.labels, train_idx, test_idx, scaler,
                                  torch_seed, run.out_dir / "weights" / f"{name}.joblib")
    weights = run.out_dir / "weights" / f"{name}.pt"
    if weights.is_file():
        return weights, _stored_member_probability(weights, run, test_idx, scaler)
    callback = None
    if run.epoch_callback is not None:
        callback = (lambda kk, ss: lambda e, rec: run.epoch_callback(kk, ss, e, rec))(k, s)
    init = None
    if run.init_meta is not None:
        from .finetune import member_weights

        init = member_weights(Path(run.config.init_model), run.init_meta, k, s)
    result = train_fold(run.lesions, run.x_all, run.features.values, train_idx, test_idx, run.config, torch_seed,
                        scaler, weights, run.out_dir / "checkpoints" / f"{name}.pt", run.progress,
                        f"fold {k + 1}/{run.n_folds} seed {s + 1}/{run.seeds}", callback, init)
    return weights, result.val_probability


def _stored_member_probability(weights: Path, run: _Run, test_idx: np.ndarray, scaler: FeatureScaler) -> np.ndarray:
    device = resolve_device(run.config.device)
    cols = run.features.values
    net = load_state(weights, build_network(run.config, cols.shape[1], run.x_all.shape[1])).to(device)
    feats = scaler.transform(cols[test_idx]) if cols.shape[1] else cols[test_idx]
    return predict_probabilities(net, run.x_all[test_idx], feats, device, 256,
                                 autocast_dtype(device, run.config.mixed_precision))


def _start(lesions: LesionSet, config: TrainConfig, out_dir: Path, features: FeatureColumns | None,
           progress: bool, epoch_callback: EpochCallback | None) -> _Run:
    method = get_method(config.method)
    network = method.kind == "network"
    init_meta = None
    if config.init_model and network:
        from .finetune import read_init_model

        init_meta = read_init_model(Path(config.init_model))
    return _Run(lesions, config, Path(out_dir), features or select_features(lesions, config),
                config.input_spec().network_inputs(lesions.patches, lesions.reference) if network else None,
                init_meta, config.folds, config.seeds if method.kind != "floor" else 1,  # a training-free score needs one
                progress, epoch_callback)


def cv_folds(lesions: LesionSet, config: TrainConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (training, held-out) indices of every fold of this configuration's cross-validation."""
    folds = stratified_subject_folds(lesions.fold_units, lesions.labels, config.folds, config.base_seed)
    return [(np.asarray(a), np.asarray(b)) for a, b in folds]


def train_members(lesions: LesionSet, config: TrainConfig, out_dir: Path, members: list[tuple[int, int]],
                  progress: bool = False) -> dict[tuple[int, int], np.ndarray]:
    """Train only the listed (fold, seed) members of ``cross_validate(lesions, config, out_dir)``.

    Same folds, torch seeds, feature scalers, weight and checkpoint paths as the whole run, so several
    processes (GPUs, SLURM tasks) can share one cross-validation: each trains its members, then one
    ``train()`` in the same directory finds every member's weights and only collects their predictions.
    Returns each member's held-out probabilities (in the fold's held-out order).
    """
    if lesions.labels is None:
        raise ValueError("cross-validation needs labels")
    if get_method(config.method).kind == "fusion":
        raise ValueError("a fusion trains its components (fusion.py); train their members instead")
    config = with_data_grid(config, lesions)
    folds = cv_folds(lesions, config)
    run = _start(lesions, config, out_dir, None, progress, None)
    bad = [(k, s) for k, s in members if not (0 <= k < len(folds) and 0 <= s < run.seeds)]
    if bad:
        raise ValueError(f"members {bad} are outside {len(folds)} folds x {run.seeds} seeds")
    out = {}
    for k, s in members:
        train_idx, test_idx = folds[k]
        scaler = FeatureScaler.fit(run.features.values[train_idx])
        out[(k, s)] = _member_probability(run, k, s, train_idx, test_idx, scaler)[1]
    return out


def cross_validate(lesions: LesionSet, config: TrainConfig, out_dir: Path, progress: bool = True,
                   epoch_callback: EpochCallback | None = None, features: FeatureColumns | None = None) -> CVResult:
    """Train every (fold, seed) member under ``out_dir/weights`` and collect out-of-fold predictions.

    Members whose weights already exist are not retrained (their held-out predictions are recomputed
    from the stored weights), and unfinished members resume from their checkpoint. ``features``: the
    method's columns when the caller has worked them out already.
    """
    if lesions.labels is None:
        raise ValueError("cross-validation needs labels")
    config = with_data_grid(config, lesions)
    folds = cv_folds(lesions, config)
    run = _start(lesions, config, out_dir, features, progress, epoch_callback)
    member_prob = np.full((run.seeds, len(lesions)), np.nan, dtype=np.float64)
    fold_of = np.full(len(lesions), -1, dtype=np.int64)
    scalers, members, fold_thresholds = [], [], []
    for k, (train_idx, test_idx) in enumerate(folds):
        fold_of[test_idx] = k
        scalers.append(FeatureScaler.fit(run.features.values[train_idx]))
        for s in range(run.seeds):
            weights, member_prob[s, test_idx] = _member_probability(run, k, s, train_idx, test_idx, scalers[-1])
            members.append({"fold": k, "seed": s, "torch_seed": member_seed(config.base_seed, k, s),
                            "weights": str(weights.relative_to(run.out_dir))})
        y_k = lesions.labels[test_idx]
        fold_thresholds.append(safe_threshold(f1_optimal_threshold(y_k, member_prob[:, test_idx].mean(0))))
    for m in members:
        m["threshold"] = fold_thresholds[m["fold"]]
    prob = member_prob.mean(axis=0)
    thr = np.asarray(fold_thresholds)[fold_of]
    vote_fraction = (member_prob >= thr[None, :]).mean(axis=0)  # p >= t is rim+ (metrics.py)
    thresholds = ensemble_thresholds(lesions.labels, prob, fold_of, fold_thresholds)
    return CVResult(prob, member_prob, vote_fraction, (vote_fraction > 0.5).astype(np.int64), fold_of,
                    fold_thresholds, thresholds, scalers, members, folds)


def ensemble_thresholds(labels: np.ndarray, prob: np.ndarray, fold_of: np.ndarray,
                        fold_thresholds: list[float]) -> dict[str, float]:
    """Operating points on the ensemble's mean probability: the mean of the per-fold thresholds.

    Each fold's threshold is fitted on that fold's held-out predictions of its own members; at
    inference the ensemble averages members whose calibrations differ (their F1 thresholds ranged
    0.39-0.99 on the semi-real cohort), and one threshold fitted on the pooled out-of-fold
    probabilities called far too few lesions there (held-out F1 0.21). The mean of the fold
    thresholds is the deployable value ``metrics.lesion_and_subject_metrics`` reports. The pooled
    values are kept under ``*-pooled`` for reference.
    """
    hs = [safe_threshold(high_sensitivity_threshold(labels[fold_of == k], prob[fold_of == k]))
          for k in range(len(fold_thresholds))]
    return {"f1": float(np.mean(fold_thresholds)), "high-sensitivity": float(np.mean(hs)),
            "f1-pooled": safe_threshold(f1_optimal_threshold(labels, prob)),
            "high-sensitivity-pooled": safe_threshold(high_sensitivity_threshold(labels, prob))}
