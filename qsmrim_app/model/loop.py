"""The training loop of one ensemble member: one optimisation step, rounds, early stopping, checkpoints.

The whole fold (patches and features) lives as tensors on the training device and is augmented there,
so the loop has no per-sample Python data loading. A member checkpoints every round (model, optimiser,
scheduler, grad scaler, RNG states, history) and an interrupted run resumes from the last finished
round with the same result as an uninterrupted one (on CPU, where the run is deterministic for a seed).
:func:`training_step` is the one step: the trainer and :func:`estimate_training_seconds` both run it.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from ..atomic import atomic_path
from .augment import augment_batch, contrast_jitter
from .config import TrainConfig
from .data import FeatureScaler, LesionSet
from .folds import stratified_subject_folds
from .methods import get as get_method
from .network import build_network
from .predict import autocast_context, autocast_dtype, load_state, predict_probabilities, resolve_device


CHANNELS_LAST_ENV = "QSMRIM_CUDA_CHANNELS_LAST"


def training_memory_format(device: torch.device) -> torch.memory_format:
    """Layout of the network and its batches while training: channels-last (NDHWC) on a GPU when
    ``QSMRIM_CUDA_CHANNELS_LAST=1``, where cuDNN may run 3D convolutions faster in it (whether it does depends
    on the GPU and cuDNN: benchmarks/bench_paper_protocol.py times both); the default layout otherwise.
    A layout changes speed, not the computed function."""
    if device.type == "cuda" and os.environ.get(CHANNELS_LAST_ENV, "0") == "1":
        return torch.channels_last_3d
    return torch.contiguous_format


@dataclass
class MemberResult:
    """One trained ensemble member and its held-out predictions."""

    seed: int
    weights: Path
    val_probability: np.ndarray
    history: list[dict] = field(default_factory=list)


def lr_milestones(config: TrainConfig) -> list[int]:
    """Epochs (1-based scheduler steps) at which the LR drops: fractions of ``config.epochs``."""
    return sorted({max(1, int(round(f * config.epochs))) for f in config.lr_milestones})


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


def binary_auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def bce(y: np.ndarray, p: np.ndarray) -> float:
    if len(y) == 0:
        return float("nan")
    return float(F.binary_cross_entropy(torch.as_tensor(p, dtype=torch.float64).clamp(1e-7, 1 - 1e-7),
                                        torch.as_tensor(y, dtype=torch.float64)))


def save_torch(obj: object, path: Path) -> None:
    """``torch.save`` through the atomic-write helper."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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


def _load_initial(path: Path, net: torch.nn.Module) -> None:
    """Fine-tuning: a member of another model starts this network (same architecture, checked before)."""
    from .finetune import InitModelError

    try:
        load_state(path, net)
    except RuntimeError as err:  # shapes differ: the architecture check missed something
        raise InitModelError(f"--init-model weights {path} do not fit this network: {err}") from None


def training_step(net: torch.nn.Module, opt: torch.optim.Optimizer, grad_scaler: torch.amp.GradScaler,
                  x: torch.Tensor, f: torch.Tensor, y: torch.Tensor, config: TrainConfig, gen: torch.Generator,
                  spacing: list[float], device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    """One optimisation step on one batch (augmentation included); returns the batch's loss (on device)."""
    if config.augment:
        x = augment_batch(x, spacing, gen, config.augment_probability, config.blur_sigma_units)
        if config.uses_contrast_augment:
            x = contrast_jitter(x, gen)
    x = x.contiguous(memory_format=training_memory_format(device))
    with autocast_context(device, amp):
        logits, y = net(x, f, y)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y.float())
    opt.zero_grad(set_to_none=True)
    grad_scaler.scale(loss).backward()
    grad_scaler.step(opt)
    grad_scaler.update()
    return loss.detach()


@dataclass
class Split:
    """Network inputs, scaled features and labels of one set of lesions, on the training device."""

    x: torch.Tensor
    f: torch.Tensor
    y: torch.Tensor | np.ndarray

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class Best:
    """The best inner-validation score so far, its round and the weights it had (early stopping)."""

    auc: float = -np.inf
    round: int = -1
    state: dict | None = None


class MemberTraining:
    """One member's network, optimiser, LR schedule, grad scaler and RNG, trained round by round."""

    def __init__(self, net: torch.nn.Module, config: TrainConfig, device: torch.device, gen: torch.Generator,
                 n_fit: int, spacing: list[float]) -> None:
        self.net, self.config, self.device, self.gen, self.spacing = net.to(device), config, device, gen, spacing
        self.net.to(memory_format=training_memory_format(device))
        self.amp = autocast_dtype(device, config.mixed_precision)
        trainable = [q for q in self.net.parameters() if q.requires_grad]
        optimiser = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        self.opt = optimiser(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.rounds, self.steps_per_round = _steps_plan(config, n_fit)
        if config.lr_schedule == "onecycle":
            self.sched = torch.optim.lr_scheduler.OneCycleLR(
                self.opt, max_lr=config.learning_rate, total_steps=self.rounds * self.steps_per_round, pct_start=0.2)
        else:
            self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, lr_milestones(config), gamma=config.lr_gamma)
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.history: list[dict] = []
        self.best = Best()
        self.start_round = 0

    def step(self, x: torch.Tensor, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return training_step(self.net, self.opt, self.grad_scaler, x, f, y, self.config, self.gen, self.spacing,
                             self.device, self.amp)

    def train_round(self, fit: Split) -> float:
        """One round of steps; returns the mean training loss."""
        self.net.train()
        step_schedule = self.config.lr_schedule == "onecycle"
        total, count = torch.zeros((), device=self.device), 0  # summed on device: no sync per step
        for bidx in _batches(self.config, fit.y, self.steps_per_round, self.gen):
            bidx = bidx.to(self.device)
            total += self.step(fit.x[bidx], fit.f[bidx], fit.y[bidx]) * len(bidx)
            count += len(bidx)
            if step_schedule:
                self.sched.step()
        if not step_schedule:
            self.sched.step()
        return float(total) / max(count, 1)

    def predict(self, split: Split) -> np.ndarray:
        return predict_probabilities(self.net, split.x, split.f, self.device, 256, self.amp)

    def inner_check(self, round_: int, stop: Split) -> tuple[float, float]:
        """Inner-split AUC and loss of the net as it is now; it becomes ``best`` when it scores higher."""
        p_stop = self.predict(stop)
        auc, loss = binary_auc(stop.y, p_stop), bce(stop.y, p_stop)
        score = auc if np.isfinite(auc) else -loss
        if score > self.best.auc:
            self.best = Best(float(score), round_, {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()})
        return auc, loss

    def save_checkpoint(self, path: Path, round_: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cuda = self.device.type == "cuda"
        save_torch({
            "epoch": round_, "model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "grad_scaler": self.grad_scaler.state_dict(),
            "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
            "history": self.history, "best_state": self.best.state, "best_auc": self.best.auc,
            "best_round": self.best.round}, path)

    def resume(self, path: Path) -> None:
        """Continue after the last round stored in the checkpoint ``path``."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.grad_scaler.load_state_dict(ckpt["grad_scaler"])
        self.gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        if self.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
        self.start_round, self.history = int(ckpt["epoch"]) + 1, list(ckpt["history"])
        if ckpt.get("best_state") is not None:
            self.best = Best(float(ckpt["best_auc"]), int(ckpt["best_round"]), ckpt["best_state"])

    def keep_best(self) -> None:
        """Early stopping: go back to the weights of the best inner-validation round, if any."""
        if self.best.state is not None:
            self.net.load_state_dict(self.best.state)
            self.history.append({"selected_round": self.best.round, "inner_auc": self.best.auc})


@contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic algorithms on CPU for the duration of one member's training."""
    before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@dataclass
class MemberData:
    """What one member trains and is validated on: every lesion's network inputs and feature columns,
    the fold's training and held-out indices, and the fold's feature scaler."""

    lesions: LesionSet
    x_all: np.ndarray
    f_all: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    scaler: FeatureScaler

    def split(self, idx: np.ndarray, device: torch.device) -> Split:
        feats = self.scaler.transform(self.f_all[idx]) if self.f_all.shape[1] else self.f_all[idx]
        return Split(torch.as_tensor(self.x_all[idx]).to(device=device, dtype=torch.float32),
                     torch.as_tensor(feats).to(device=device, dtype=torch.float32), self.lesions.labels[idx])


def _prepare(data: MemberData, config: TrainConfig, seed: int, device: torch.device,
             init_weights: Path | None) -> tuple[MemberTraining, Split, Split, Split, bool]:
    """Build (or start from ``init_weights``) the network, split off the inner early-stopping subjects,
    fit the wide term and move the fold to the device: (training state, fit, validation, inner split,
    whether the starting point is a candidate for early stopping)."""
    lesions = data.lesions
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # shuffling + augmentation, on CPU
    net = build_network(config, data.f_all.shape[1], data.x_all.shape[1])
    if init_weights is not None:
        _load_initial(init_weights, net)
    fit_rel, stop_rel = inner_split(lesions.subjects[data.train_idx], lesions.labels[data.train_idx],
                                    config.inner_val_fraction, seed)
    fit_idx, stop_idx = np.asarray(data.train_idx)[fit_rel], np.asarray(data.train_idx)[stop_rel]
    wide = getattr(net, "wide", None)
    if wide is not None and init_weights is None:
        # Fine-tuning keeps the starting model's linear term (fitted on its own, larger cohort) and lets
        # gradient descent adapt it with the rest; a fresh model fits it here on all the member's
        # training lesions: with ~40 rim+ a fold, leaving the inner split out of the
        # linear model cost 0.08 PR AUC out of fold on the semi-real cohort (docs/training.md).
        fit_wide_term(wide, data.scaler.transform(data.f_all[data.train_idx]), lesions.labels[data.train_idx], seed)
    member = MemberTraining(net, config, device, gen, len(fit_idx), lesions.voxel_size_mm.tolist())
    fit = data.split(fit_idx, device)
    fit.y = torch.as_tensor(lesions.labels[fit_idx]).to(device=device, dtype=torch.long)
    start_is_candidate = init_weights is not None or wide is not None
    return member, fit, data.split(data.val_idx, device), data.split(stop_idx, device), start_is_candidate


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
    if get_method(config.method).features != "none" and f_all.shape[1] == 0:
        raise ValueError(f"method {config.method!r} needs radiomic features; the lesion set has none")
    device = resolve_device(config.device)
    with _deterministic(device):
        data = MemberData(lesions, x_all, f_all, train_idx, val_idx, scaler)
        member, fit, val, stop, start_is_candidate = _prepare(data, config, seed, device, init_weights)
        if checkpoint_path is not None and checkpoint_path.is_file():
            member.resume(checkpoint_path)
        if len(stop) and member.start_round == 0 and start_is_candidate:
            # The starting point (the fitted linear term, or the model being fine-tuned) is a candidate too:
            # a member keeps it when no trained round does better on the inner split.
            member.inner_check(-1, stop)
        _run_rounds(member, fit, val, stop, checkpoint_path, progress, desc, epoch_callback)
        member.keep_best()
        weights_path.parent.mkdir(parents=True, exist_ok=True)
        save_torch(_state_for_storage(member.net, config.weights_fp16), weights_path)
        # Held-out predictions from the stored weights, so a resumed run and fp16 storage agree.
        stored = load_state(weights_path, build_network(config, f_all.shape[1], x_all.shape[1])).to(device)
        p_val = predict_probabilities(stored, val.x, val.f, device, 256, member.amp)
        if checkpoint_path is not None and checkpoint_path.is_file():
            checkpoint_path.unlink()
        return MemberResult(seed, weights_path, p_val, member.history)


def _run_rounds(member: MemberTraining, fit: Split, val: Split, stop: Split, checkpoint_path: Path | None,
                progress: bool, desc: str, epoch_callback: Callable[[int, dict], None] | None) -> None:
    """Every remaining round: train, validate, check the inner split, checkpoint, report."""
    bar = tqdm(range(member.start_round, member.rounds), desc=desc or "train", disable=not progress,
               initial=member.start_round, total=member.rounds, leave=False)
    for epoch in bar:
        loss = member.train_round(fit)
        p_val = member.predict(val)
        record = {"epoch": epoch, "loss": loss, "lr": member.opt.param_groups[0]["lr"],
                  "val_loss": bce(val.y, p_val), "val_auc": binary_auc(val.y, p_val)}
        if len(stop):
            record["inner_auc"], record["inner_loss"] = member.inner_check(epoch, stop)
        member.history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", val_auc=f"{record['val_auc']:.3f}")
        if checkpoint_path is not None and member.config.checkpoint:
            member.save_checkpoint(checkpoint_path, epoch)
        if epoch_callback is not None:
            epoch_callback(epoch, record)
    bar.close()


def estimate_training_seconds(config: TrainConfig, n_lesions: int, n_features: int, n_steps_timed: int = 5
                              ) -> dict:
    """Time a few training steps of this configuration on its device and extrapolate to the whole run.

    A timed step is :func:`training_step`, the trainer's own (augmentation included); each round's
    evaluation of the validation and inner-split lesions is timed as a forward pass and added (on a CPU
    with the fast protocol it is about half of the run: without it the estimate was 2.4 min for a 4.5 min
    run). Returns seconds per step, steps per member, members and the estimate in seconds. Used to warn
    before a paper-protocol run that would take hours on a CPU.
    """
    method = get_method(config.method)
    networks = [c for c in method.components if get_method(c).kind == "network"]
    if networks:  # a fusion: its network components' time (the scikit-learn ones take seconds)
        from dataclasses import replace

        parts = [estimate_training_seconds(replace(config, method=c), n_lesions,
                                           n_features if get_method(c).features != "none" else 0, n_steps_timed)
                 for c in networks]
        return {**parts[0], "seconds": sum(p["seconds"] for p in parts),
                "members": sum(p["members"] for p in parts)}
    if not method.kind == "network":
        return {"seconds": 0.0, "seconds_per_step": 0.0, "steps_per_member": 0, "members": config.folds}
    device = resolve_device(config.device)
    spec = config.input_spec()
    bs = min(config.batch_size, max(2, n_lesions))
    torch.manual_seed(0)
    net = build_network(config, n_features, len(spec.channels))
    member = MemberTraining(net, config, device, torch.Generator().manual_seed(0), bs, list(config.patch_spacing_mm))
    member.net.train()
    x = torch.randn(bs, len(spec.channels), *spec.shape, device=device)
    f = torch.randn(bs, n_features, device=device)
    y = (torch.arange(bs, device=device) % 4 == 0).long()
    timings = []
    for i in range(n_steps_timed + 1):  # the first step warms up (allocations, kernels)
        start = time.perf_counter()
        member.step(x, f, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            timings.append(time.perf_counter() - start)
    per_step = float(np.median(timings))
    n_eval_batch = min(256, max(2, n_lesions))
    xe, fe = torch.randn(n_eval_batch, *x.shape[1:], device=device), torch.randn(n_eval_batch, n_features, device=device)
    start = time.perf_counter()
    predict_probabilities(member.net, xe, fe, device, 256, None)
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
