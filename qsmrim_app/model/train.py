"""Training: subject-stratified K-fold cross-validation x S seeds, the members kept as the ensemble.

The whole fold (patches and features) lives as tensors on the training device and is augmented there,
so the epoch loop has no per-sample Python data loading. Each member (fold, seed) checkpoints every
epoch (model, optimiser, scheduler, grad scaler, RNG states, history) under ``out_dir/checkpoints`` and
an interrupted run resumes from the last finished epoch with the same result as an uninterrupted one
(on CPU, where the run is deterministic for a given seed).

Fold thresholds: each fold's F1-optimal threshold is fitted on that fold's held-out (mean over seeds)
probabilities, as in the paper's cross-validation protocol; out-of-fold majority votes use them and so
are optimistic. The overall operating points ('f1', 'high-sensitivity') are fitted on the mean
out-of-fold probability of all lesions.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from .augment import augment_batch, contrast_jitter
from .config import TrainConfig
from .data import FeatureScaler, LesionSet
from .folds import stratified_subject_folds
from .inputs import FLOOR_COLUMN, is_pyradiomics_feature
from .metrics import f1_optimal_threshold, high_sensitivity_threshold
from .network import NETWORK_METHODS, build_network
from .predict import MODEL_FORMAT, MODEL_JSON, autocast_context, autocast_dtype, load_state, predict_probabilities, resolve_device

EpochCallback = Callable[[int, int, int, dict], None]  # (fold, seed, epoch, record)
FEATURELESS_METHODS = ("image-only", "rimnet")
SKLEARN_METHODS = ("aprl-rf", "rf", "logreg")
FLOOR_METHODS = ("shell-core",)


def member_seed(base_seed: int, fold: int, seed: int) -> int:
    """One torch seed per ensemble member, distinct across folds and seeds."""
    return int(base_seed) * 1_000_003 + 1_000 * int(fold) + int(seed)


def member_name(fold: int, seed: int) -> str:
    return f"fold{fold}_seed{seed}"


def lr_milestones(config: TrainConfig) -> list[int]:
    """Epochs (1-based scheduler steps) at which the LR drops: fractions of ``config.epochs``."""
    return sorted({max(1, int(round(f * config.epochs))) for f in config.lr_milestones})


def uses_features(method: str) -> bool:
    return method not in FEATURELESS_METHODS


def method_feature_names(method: str, config: TrainConfig, names: list[str]) -> list[str]:
    """The feature columns a method uses: none (image only), the floor score, the 527 pyradiomics
    features (random forests, logistic regression) or what the input level feeds the networks."""
    if method in FEATURELESS_METHODS:
        return []
    if method in FLOOR_METHODS:
        if FLOOR_COLUMN not in names:
            raise ValueError(f"method {method!r} needs the {FLOOR_COLUMN!r} column; rerun the participant level")
        return [FLOOR_COLUMN]
    if method in SKLEARN_METHODS:
        return [n for n in names if is_pyradiomics_feature(n)]
    return config.input_spec().select_features(names)


def _columns(lesions: LesionSet, method: str, config: TrainConfig) -> tuple[list[str], np.ndarray]:
    wanted = method_feature_names(method, config, list(lesions.feature_names))
    index = {n: i for i, n in enumerate(lesions.feature_names)}
    return wanted, lesions.features[:, [index[n] for n in wanted]]


def inner_split(subjects: np.ndarray, labels: np.ndarray, fraction: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of the training subjects (stratified by rim+ content) for early stopping."""
    if fraction <= 0:
        return np.arange(len(labels)), np.zeros(0, np.int64)
    n_folds = max(2, int(round(1.0 / fraction)))
    uniq = np.unique(subjects)
    if uniq.size < n_folds:
        return np.arange(len(labels)), np.zeros(0, np.int64)
    folds = stratified_subject_folds(subjects, labels, n_folds, seed)
    fit, held = folds[0]
    return np.asarray(fit), np.asarray(held)


@dataclass
class MemberResult:
    """One trained ensemble member and its held-out predictions."""

    seed: int
    weights: Path
    val_probability: np.ndarray
    history: list[dict] = field(default_factory=list)


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _binary_auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def _state_for_storage(net: torch.nn.Module, fp16: bool) -> dict:
    return {k: (v.detach().half() if fp16 and v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in net.state_dict().items()}


def _steps_plan(config: TrainConfig, n_train: int) -> tuple[int, int]:
    """(rounds, steps per round). A round ends with validation and a checkpoint: one epoch for the
    paper's protocol, ``eval_every`` steps for a step-budget protocol."""
    per_epoch = max(1, n_train // config.batch_size + (1 if n_train % config.batch_size >= 2 else 0))
    if config.max_steps is None:
        return config.epochs, per_epoch
    every = max(1, min(config.eval_every or per_epoch, int(config.max_steps)))
    return max(1, -(-int(config.max_steps) // every)), every


def _batches(config: TrainConfig, labels: torch.Tensor, n_steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Index batches for one round: a shuffled epoch, or rim+-enriched draws with replacement."""
    n = int(labels.numel())
    if config.positive_fraction is None:
        batches = list(torch.randperm(n, generator=gen).split(config.batch_size))
        if len(batches) > 1 and len(batches[-1]) < 2:  # BatchNorm needs two samples
            batches = batches[:-1]
        return batches[:n_steps] if config.max_steps is not None else batches
    pos = torch.nonzero(labels.cpu() == 1).reshape(-1)
    neg = torch.nonzero(labels.cpu() == 0).reshape(-1)
    n_pos = min(config.batch_size - 1, max(1, int(round(config.batch_size * config.positive_fraction))))
    out = []
    for _ in range(n_steps):
        parts = []
        if pos.numel():
            parts.append(pos[torch.randint(0, pos.numel(), (n_pos,), generator=gen)])
        if neg.numel():
            parts.append(neg[torch.randint(0, neg.numel(), (config.batch_size - sum(len(p) for p in parts),),
                                           generator=gen)])
        batch = torch.cat(parts)
        out.append(batch[torch.randperm(batch.numel(), generator=gen)])
    return out


def train_fold(lesions: LesionSet, x_all: np.ndarray, f_all: np.ndarray, train_idx: np.ndarray,
               val_idx: np.ndarray, config: TrainConfig, seed: int, scaler: FeatureScaler, weights_path: Path,
               checkpoint_path: Path | None = None, progress: bool = True, desc: str = "",
               epoch_callback: Callable[[int, dict], None] | None = None,
               init_weights: Path | None = None) -> MemberResult:
    """Train one network on ``train_idx`` (validated on ``val_idx``) and store its weights.

    ``x_all`` are the network inputs of every lesion (``InputSpec.network_inputs``) and ``f_all`` the
    method's feature columns. ``seed`` fixes weight initialisation, shuffling, augmentation, dropout and
    DeepSMOTE draws. With ``inner_val_fraction`` > 0 some training subjects are held out and the member
    keeps the weights of its best inner-validation AUC (early stopping). When ``checkpoint_path`` holds
    a checkpoint of this member, training resumes after its last round. ``init_weights`` (fine-tuning)
    are loaded before the first step instead of a random initialisation.
    """
    if lesions.labels is None:
        raise ValueError("training needs labels")
    device = resolve_device(config.device)
    amp = autocast_dtype(device, config.mixed_precision)
    n_features = f_all.shape[1]
    if config.method not in FEATURELESS_METHODS and n_features == 0:
        raise ValueError(f"method {config.method!r} needs radiomic features; the lesion set has none")
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)  # shuffling + augmentation, on CPU
        in_channels = x_all.shape[1]
        net = build_network(config, n_features, in_channels)
        if init_weights is not None:
            _load_initial(init_weights, net)
        fit_rel, stop_rel = inner_split(lesions.subjects[train_idx], lesions.labels[train_idx],
                                        config.inner_val_fraction, seed)
        fit_idx, stop_idx = np.asarray(train_idx)[fit_rel], np.asarray(train_idx)[stop_rel]
        wide = getattr(net, "wide", None)
        if wide is not None and init_weights is None:
            # Fine-tuning keeps the starting model's linear term (fitted on its own, larger cohort) and lets
            # gradient descent adapt it with the rest; a fresh model fits it here on all the member's
            # training lesions: with ~40 rim+ a fold, leaving the inner split out of the
            # linear model cost 0.08 PR AUC out of fold on the semi-real cohort (README, "Training protocols").
            fit_wide_term(wide, scaler.transform(f_all[train_idx]), lesions.labels[train_idx], seed)
        net = net.to(device)
        trainable = [q for q in net.parameters() if q.requires_grad]
        if config.optimizer == "adamw":
            opt = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        else:
            opt = torch.optim.Adam(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        rounds, steps_per_round = _steps_plan(config, len(fit_idx))
        if config.lr_schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.learning_rate,
                                                        total_steps=rounds * steps_per_round, pct_start=0.2)
        else:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, lr_milestones(config), gamma=config.lr_gamma)
        grad_scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

        def to_dev(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(a).to(device=device, dtype=dtype)

        def feats(idx: np.ndarray) -> torch.Tensor:
            return to_dev(scaler.transform(f_all[idx]) if n_features else f_all[idx], torch.float32)

        x_train, f_train = to_dev(x_all[fit_idx], torch.float32), feats(fit_idx)
        y_train = to_dev(lesions.labels[fit_idx], torch.long)
        x_val, f_val, y_val = to_dev(x_all[val_idx], torch.float32), feats(val_idx), lesions.labels[val_idx]
        x_stop, f_stop, y_stop = to_dev(x_all[stop_idx], torch.float32), feats(stop_idx), lesions.labels[stop_idx]
        spacing = lesions.voxel_size_mm.tolist()

        start_round, history, best = 0, [], {"auc": -np.inf, "round": -1, "state": None}
        if checkpoint_path is not None and checkpoint_path.is_file():
            ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            net.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            grad_scaler.load_state_dict(ckpt["grad_scaler"])
            gen.set_state(ckpt["generator"])
            torch.set_rng_state(ckpt["torch_rng"])
            if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
            start_round, history = int(ckpt["epoch"]) + 1, list(ckpt["history"])
            if ckpt.get("best_state") is not None:
                best = {"auc": float(ckpt["best_auc"]), "round": int(ckpt["best_round"]), "state": ckpt["best_state"]}

        def inner_check(round_: int) -> tuple[float, float]:
            """Inner-split AUC and loss of the net as it is now; it becomes ``best`` when it scores higher."""
            nonlocal best
            p_stop = predict_probabilities(net, x_stop, f_stop, device, 256, amp)
            auc, bce = _binary_auc(y_stop, p_stop), _bce(y_stop, p_stop)
            score = auc if np.isfinite(auc) else -bce
            if score > best["auc"]:
                best = {"auc": float(score), "round": round_,
                        "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}
            return auc, bce

        if len(stop_idx) and start_round == 0 and (init_weights is not None or wide is not None):
            # The starting point (the fitted linear term, or the model being fine-tuned) is a candidate too:
            # a member keeps it when no trained round does better on the inner split.
            inner_check(-1)
        bar = tqdm(range(start_round, rounds), desc=desc or "train", disable=not progress,
                   initial=start_round, total=rounds, leave=False)
        step_schedule = config.lr_schedule == "onecycle"
        for epoch in bar:
            net.train()
            total, count = torch.zeros((), device=device), 0  # summed on device: no sync per step
            for bidx in _batches(config, y_train, steps_per_round, gen):
                bidx = bidx.to(device)
                x = x_train[bidx]
                if config.augment:
                    x = augment_batch(x, spacing, gen, config.augment_probability, config.blur_sigma_units)
                    if config.uses_contrast_augment:
                        x = contrast_jitter(x, gen)
                with autocast_context(device, amp):
                    logits, y = net(x, f_train[bidx], y_train[bidx])
                loss = F.binary_cross_entropy_with_logits(logits.float(), y.float())
                opt.zero_grad(set_to_none=True)
                grad_scaler.scale(loss).backward()
                grad_scaler.step(opt)
                grad_scaler.update()
                if step_schedule:
                    sched.step()
                total += loss.detach() * len(bidx)
                count += len(bidx)
            if not step_schedule:
                sched.step()
            p_val = predict_probabilities(net, x_val, f_val, device, 256, amp)
            record = {"epoch": epoch, "loss": float(total) / max(count, 1), "lr": opt.param_groups[0]["lr"],
                      "val_loss": _bce(y_val, p_val), "val_auc": _binary_auc(y_val, p_val)}
            if len(stop_idx):
                record["inner_auc"], record["inner_loss"] = inner_check(epoch)
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", val_auc=f"{record['val_auc']:.3f}")
            if checkpoint_path is not None and config.checkpoint:
                checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
                _atomic_torch_save({
                    "epoch": epoch, "model": net.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "grad_scaler": grad_scaler.state_dict(),
                    "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "history": history, "best_state": best["state"], "best_auc": best["auc"],
                    "best_round": best["round"]}, checkpoint_path)
            if epoch_callback is not None:
                epoch_callback(epoch, record)
        bar.close()
        if best["state"] is not None:  # early stopping: the best inner-validation round
            net.load_state_dict(best["state"])
            history.append({"selected_round": best["round"], "inner_auc": best["auc"]})

        weights_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(_state_for_storage(net, config.weights_fp16), weights_path)
        # Held-out predictions from the stored weights, so a resumed run and fp16 storage agree.
        stored = load_state(weights_path, build_network(config, n_features, in_channels)).to(device)
        p_val = predict_probabilities(stored, x_val, f_val, device, 256, amp)
        if checkpoint_path is not None and checkpoint_path.is_file():
            checkpoint_path.unlink()
        return MemberResult(seed, weights_path, p_val, history)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


def fit_wide_term(layer: torch.nn.Linear, features: np.ndarray, labels: np.ndarray, seed: int) -> None:
    """Set the wide network's linear term to a penalised logistic regression of the (scaled) features and
    freeze it: the same estimator as the ``logreg`` floor (class-balanced, C by inner CV), fitted here on
    the member's own training lesions, so the deep part only has to learn what it misses."""
    from .comparators import fit_comparator

    y = np.asarray(labels).astype(int)
    if np.unique(y).size == 2:
        model = fit_comparator("logreg", features, y, [], seed=seed)
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(model.coef_, dtype=layer.weight.dtype).reshape(layer.weight.shape))
            layer.bias.copy_(torch.as_tensor(model.intercept_, dtype=layer.bias.dtype).reshape(layer.bias.shape))
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)


def _bce(y: np.ndarray, p: np.ndarray) -> float:
    if len(y) == 0:
        return float("nan")
    return float(F.binary_cross_entropy(torch.as_tensor(p, dtype=torch.float64).clamp(1e-7, 1 - 1e-7),
                                        torch.as_tensor(y, dtype=torch.float64)))


def _load_initial(path: Path, net: torch.nn.Module) -> None:
    """Fine-tuning: a member of another model starts this network (same architecture, checked before)."""
    from .finetune import InitModelError

    try:
        load_state(path, net)
    except RuntimeError as err:  # shapes differ: the architecture check missed something
        raise InitModelError(f"--init-model weights {path} do not fit this network: {err}") from None


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


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _safe_threshold(value: float) -> float:
    return float(value) if np.isfinite(value) else 0.5


def with_data_grid(config: TrainConfig, lesions: LesionSet) -> TrainConfig:
    """The model's patch grid is the one its training patches were sampled on."""
    return replace(config, patch_extent_mm=tuple(float(v) for v in lesions.extent_mm),
                   patch_spacing_mm=tuple(float(v) for v in lesions.voxel_size_mm))


def cross_validate(lesions: LesionSet, config: TrainConfig, out_dir: Path, progress: bool = True,
                   epoch_callback: EpochCallback | None = None) -> CVResult:
    """Train every (fold, seed) member under ``out_dir/weights`` and collect out-of-fold predictions.

    Members whose weights already exist are not retrained (their held-out predictions are recomputed
    from the stored weights), and unfinished members resume from their checkpoint.
    """
    if lesions.labels is None:
        raise ValueError("cross-validation needs labels")
    config = with_data_grid(config, lesions)
    out_dir = Path(out_dir)
    folds = stratified_subject_folds(lesions.subjects, lesions.labels, config.folds, config.base_seed)
    n = len(lesions)
    _, feature_cols = _columns(lesions, config.method, config)
    network = config.method in NETWORK_METHODS
    x_all = config.input_spec().network_inputs(lesions.patches, lesions.reference) if network else None
    seeds = config.seeds if config.method not in FLOOR_METHODS else 1  # a training-free score needs one
    member_prob = np.full((seeds, n), np.nan, dtype=np.float64)
    fold_of = np.full(n, -1, dtype=np.int64)
    scalers, members, fold_thresholds = [], [], []
    init_meta = None
    if config.init_model and network:
        from .finetune import read_model_json

        init_meta = read_model_json(Path(config.init_model))
    for k, (train_idx, test_idx) in enumerate(folds):
        train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
        fold_of[test_idx] = k
        scaler = FeatureScaler.fit(feature_cols[train_idx])
        scalers.append(scaler)
        for s in range(seeds):
            name, torch_seed = member_name(k, s), member_seed(config.base_seed, k, s)
            if not network:
                weights, p = _fit_sklearn_member(config.method, lesions, feature_cols, train_idx, test_idx, scaler,
                                                 torch_seed, out_dir / "weights" / f"{name}.joblib")
            else:
                weights = out_dir / "weights" / f"{name}.pt"
                callback = None
                if epoch_callback is not None:
                    callback = (lambda kk, ss: lambda e, rec: epoch_callback(kk, ss, e, rec))(k, s)
                if weights.is_file():
                    p = _stored_member_probability(weights, config, x_all, feature_cols, test_idx, scaler)
                else:
                    init = None
                    if init_meta is not None:
                        from .finetune import member_weights

                        init = member_weights(Path(config.init_model), init_meta, k, s)
                    p = train_fold(lesions, x_all, feature_cols, train_idx, test_idx, config, torch_seed, scaler,
                                   weights, out_dir / "checkpoints" / f"{name}.pt", progress,
                                   f"fold {k + 1}/{len(folds)} seed {s + 1}/{seeds}", callback,
                                   init).val_probability
            member_prob[s, test_idx] = p
            members.append({"fold": k, "seed": s, "torch_seed": torch_seed,
                            "weights": str(weights.relative_to(out_dir))})
        y_k = lesions.labels[test_idx]
        fold_thresholds.append(_safe_threshold(f1_optimal_threshold(y_k, member_prob[:, test_idx].mean(0))))
    for m in members:
        m["threshold"] = fold_thresholds[m["fold"]]
    prob = member_prob.mean(axis=0)
    thr = np.asarray(fold_thresholds)[fold_of]
    vote_fraction = (member_prob >= thr[None, :]).mean(axis=0)  # p >= t is rim+ (metrics.py)
    thresholds = ensemble_thresholds(lesions.labels, prob, fold_of, fold_thresholds)
    return CVResult(prob, member_prob, vote_fraction, (vote_fraction > 0.5).astype(np.int64), fold_of,
                    fold_thresholds, thresholds, scalers, members,
                    [(np.asarray(a), np.asarray(b)) for a, b in folds])


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
    hs = [_safe_threshold(high_sensitivity_threshold(labels[fold_of == k], prob[fold_of == k]))
          for k in range(len(fold_thresholds))]
    return {"f1": float(np.mean(fold_thresholds)), "high-sensitivity": float(np.mean(hs)),
            "f1-pooled": _safe_threshold(f1_optimal_threshold(labels, prob)),
            "high-sensitivity-pooled": _safe_threshold(high_sensitivity_threshold(labels, prob))}


def calibrated_thresholds(labels: np.ndarray, calibrated: np.ndarray, fold_of: np.ndarray) -> dict[str, float]:
    """The operating points of :func:`ensemble_thresholds` chosen on the calibrated probability."""
    fold_thr = [_safe_threshold(f1_optimal_threshold(labels[fold_of == k], calibrated[fold_of == k]))
                for k in np.unique(fold_of)]
    return ensemble_thresholds(labels, calibrated, fold_of, fold_thr)


def _stored_member_probability(weights: Path, config: TrainConfig, x_all: np.ndarray,
                               feature_cols: np.ndarray, test_idx: np.ndarray, scaler: FeatureScaler
                               ) -> np.ndarray:
    device = resolve_device(config.device)
    net = load_state(weights, build_network(config, feature_cols.shape[1], x_all.shape[1])).to(device)
    feats = scaler.transform(feature_cols[test_idx]) if feature_cols.shape[1] else feature_cols[test_idx]
    return predict_probabilities(net, x_all[test_idx], feats, device, 256,
                                 autocast_dtype(device, config.mixed_precision))


def _fit_sklearn_member(method: str, lesions: LesionSet, feature_cols: np.ndarray, train_idx: np.ndarray,
                        test_idx: np.ndarray, scaler: FeatureScaler, seed: int, path: Path
                        ) -> tuple[Path, np.ndarray]:
    """APRL(RF), the floors (RF and logistic regression on the 527 features, the shell-minus-core score)
    on the same folds, stored with joblib."""
    import joblib

    from .comparators import fit_comparator

    if path.is_file():
        model = joblib.load(path)
    else:
        model = fit_comparator(method, scaler.transform(feature_cols[train_idx]), lesions.labels[train_idx],
                               method_feature_names(method, TrainConfig(), list(lesions.feature_names)), seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        joblib.dump(model, path)
    return path, model.predict_proba(scaler.transform(feature_cols[test_idx]))[:, 1].astype(np.float64)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        qsmrim_version = version("qsmrim")
    except PackageNotFoundError:
        qsmrim_version = "unknown"
    return {"qsmrim": qsmrim_version, "torch": torch.__version__, "numpy": np.__version__}


def _model_id(config: TrainConfig, out_dir: Path, members: list[dict]) -> str:
    """Content hash of the config and every member's weights: same training -> same id."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for m in members:
        h.update((out_dir / m["weights"]).read_bytes())
    return f"{config.method}-{h.hexdigest()[:12]}"


def write_oof_predictions(path: Path, lesions: LesionSet, cv: CVResult, calibrated: np.ndarray | None = None) -> None:
    """``oof_predictions.tsv``: one row per lesion with its held-out probability and vote.

    ``probability`` is the ensemble's mean (what the discrimination metrics rank: one global monotone map
    does not change a ranking, but a map per fold would change pooled AUCs); ``probability_calibrated`` the
    calibrated one, cross-fitted (each fold's map fitted without it), which the calibration metrics use."""
    tmp = path.with_name(path.name + ".tmp")
    calibrated = cv.probability if calibrated is None else np.asarray(calibrated, dtype=float)
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["subject", "session", "lesion_id", "label", "fold", "probability", "probability_calibrated",
                    "vote", "vote_fraction", "uncertainty"])
        spread = cv.member_probability.std(axis=0)
        for i in range(len(lesions)):
            w.writerow([lesions.subjects[i], lesions.sessions[i] or "n/a", int(lesions.lesion_ids[i]),
                        int(lesions.labels[i]), int(cv.fold[i]), f"{cv.probability[i]:.6f}",
                        f"{calibrated[i]:.6f}", int(cv.vote[i]), f"{cv.vote_fraction[i]:.4f}",
                        f"{spread[i]:.6f}"])
    os.replace(tmp, path)


def input_meta(lesions: LesionSet, config: TrainConfig) -> dict:
    """What model.json says about the network's inputs (the keys finetune.INPUT_KEYS compares)."""
    return {"feature_names": _columns(lesions, config.method, config)[0],
            "inputs": config.input_spec().to_dict()}


def train(lesions: LesionSet, config: TrainConfig, out_dir: Path, progress: bool = True,
          epoch_callback: EpochCallback | None = None) -> Path:
    """Cross-validate, then write the model directory (model.json, weights/, oof_predictions.tsv)."""
    if config.method not in NETWORK_METHODS + SKLEARN_METHODS + FLOOR_METHODS:
        raise ValueError(f"unknown method {config.method!r}")
    config = with_data_grid(config, lesions)
    inputs = input_meta(lesions, config)
    if config.init_model:
        from .finetune import check_init_model, read_model_json

        check_init_model(read_model_json(Path(config.init_model)), inputs, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cv = cross_validate(lesions, config, out_dir, progress, epoch_callback)
    from .calibration import fit_cv_calibration  # a monotone map of the OOF probability; thresholds on its scale

    calibration = fit_cv_calibration(lesions.labels, cv.probability, cv.fold)
    cv.thresholds = calibrated_thresholds(lesions.labels, calibration.map.apply(cv.probability), cv.fold)
    meta = {
        "format_version": MODEL_FORMAT,
        "model_id": _model_id(config, out_dir, cv.members),
        "method": config.method,
        "config": config.to_dict(),
        **inputs,
        "protocol": config.protocol,
        "folds": [{"fold": k, "n_train": int(len(tr)), "n_test": int(len(te)),
                   "threshold": cv.fold_thresholds[k], "scaler": cv.scalers[k].to_dict()}
                  for k, (tr, te) in enumerate(cv.folds)],
        "members": cv.members,
        "thresholds": cv.thresholds,
        "calibration": calibration.map.to_dict(),
        "cv": {"auc": _finite_or_none(_binary_auc(lesions.labels, cv.probability))},
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "training_data": lesions.summary(),
    }
    tmp = out_dir / (MODEL_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, allow_nan=False))
    os.replace(tmp, out_dir / MODEL_JSON)
    write_oof_predictions(out_dir / "oof_predictions.tsv", lesions, cv, calibration.crossfit)
    return out_dir


def estimate_training_seconds(config: TrainConfig, n_lesions: int, n_features: int, n_steps_timed: int = 5
                              ) -> dict:
    """Time a few training steps of this configuration on its device and extrapolate to the whole run.

    A timed step is what the trainer does per step (augmentation included); each round's evaluation of
    the validation and inner-split lesions is timed as a forward pass and added (on a CPU with the fast
    protocol it is about half of the run: without it the estimate was 2.4 min for a 4.5 min run).
    Returns seconds per step, steps per member, members and the estimate in seconds. Used to warn
    before a paper-protocol run that would take hours on a CPU.
    """
    import time

    if config.method not in NETWORK_METHODS:
        return {"seconds": 0.0, "seconds_per_step": 0.0, "steps_per_member": 0, "members": config.folds}
    device = resolve_device(config.device)
    spec = config.input_spec()
    bs = min(config.batch_size, max(2, n_lesions))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = build_network(config, n_features, len(spec.channels)).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    x = torch.randn(bs, len(spec.channels), *spec.shape, device=device)
    f = torch.randn(bs, n_features, device=device)
    y = (torch.arange(bs, device=device) % 4 == 0).long()
    spacing = list(config.patch_spacing_mm)
    timings = []
    for i in range(n_steps_timed + 1):  # the first step warms up (allocations, kernels)
        start = time.perf_counter()
        xb = x
        if config.augment:
            xb = augment_batch(x, spacing, gen, config.augment_probability, config.blur_sigma_units)
            if config.uses_contrast_augment:
                xb = contrast_jitter(xb, gen)
        logits, yy = net(xb, f, y)
        loss = F.binary_cross_entropy_with_logits(logits.float(), yy.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            timings.append(time.perf_counter() - start)
    per_step = float(np.median(timings))
    n_eval_batch = min(256, max(2, n_lesions))
    xe, fe = torch.randn(n_eval_batch, *x.shape[1:], device=device), torch.randn(n_eval_batch, n_features, device=device)
    start = time.perf_counter()
    predict_probabilities(net, xe, fe, device, 256, None)
    per_eval_lesion = (time.perf_counter() - start) / n_eval_batch
    n_fit = int(n_lesions * (1 - 1 / max(config.folds, 2)))
    n_train = int(n_fit * (1 - config.inner_val_fraction))
    rounds, per_round = _steps_plan(config, max(n_train, 2))
    steps = rounds * per_round
    members = config.folds * config.seeds
    evaluated = (n_lesions - n_fit) + (n_fit - n_train)  # validation fold + inner split, every round
    eval_seconds = per_eval_lesion * evaluated * (rounds + 1)
    return {"seconds": (per_step * steps + eval_seconds) * members * 1.1, "seconds_per_step": per_step,
            "steps_per_member": steps, "members": members, "device": device.type}
