"""Inference with a trained model directory: every fold x seed member, combined into one prediction.

``probability`` is the model's calibration map (``model.json`` ``calibration``, model/calibration.py;
identity when the model has none) applied to the mean of the members' rim+ probabilities
(``probability_raw``; for a fusion, model/fusion.py, the mean of its components' member means), and ``uncertainty`` the members' standard deviation. ``votes`` is the fraction of
members whose probability reaches their own fold's F1-optimal threshold. ``rim_positive`` is, by default, the paper's majority vote (votes > 0.5); when a threshold is
given (the app's ``--threshold`` or an operating point from :attr:`Ensemble.thresholds`) it is instead
``probability >= threshold`` on the mean, because the operating points are fitted on the mean
out-of-fold probability.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ContextManager, Sequence

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .data import FeatureScaler
from .methods import NETWORK_METHODS, get as get_method
from .modeldir import MODEL_FORMAT, MODEL_JSON, read_model_json
from .network import build_network



def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return device


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """Mixed-precision dtype on CUDA (bf16 where supported, else fp16); None (full fp32) on CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None) -> ContextManager:
    """torch.autocast on CUDA with a dtype; a no-op otherwise (CPU runs stay in fp32)."""
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


@torch.inference_mode()
def predict_probabilities(net: nn.Module, patches: np.ndarray | torch.Tensor, features: np.ndarray | torch.Tensor,
                          device: torch.device, batch_size: int = 256, amp_dtype: torch.dtype | None = None
                          ) -> np.ndarray:
    """Rim+ probabilities of one network in eval mode, batch by batch (inputs may live on any device)."""
    net.eval()
    n = len(patches)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, batch_size):
        x = torch.as_tensor(patches[start:start + batch_size]).to(device, torch.float32, non_blocking=True)
        f = torch.as_tensor(features[start:start + batch_size]).to(device, torch.float32, non_blocking=True)
        with autocast_context(device, amp_dtype):
            logits, _ = net(x, f)
        out[start:start + len(x)] = torch.sigmoid(logits.float()).cpu().numpy()
    return out


def load_state(path: Path, net: nn.Module) -> nn.Module:
    """Load a member's state dict (possibly stored as fp16) into ``net`` as fp32."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net


@dataclass
class EnsemblePrediction:
    probability: np.ndarray  # (N,) the model's calibration map applied to the mean member probability
    votes: np.ndarray  # (N,) fraction of members above their fold threshold
    rim_positive: np.ndarray  # (N,) bool
    uncertainty: np.ndarray  # (N,) std of member probabilities
    member_probabilities: np.ndarray  # (M, N)
    probability_raw: np.ndarray | None = None  # (N,) mean member (a fusion: component) probability, uncalibrated

    def __len__(self) -> int:
        return int(self.probability.size)


@dataclass
class Member:
    fold: int
    seed: int
    model: Any  # nn.Module for the networks, a fitted estimator with predict_proba for aprl-rf
    scaler: FeatureScaler
    threshold: float
    method: str = ""  # a fusion's component method ("" : the model's own method)


@dataclass
class Ensemble:
    """All members of a model directory, ready to predict on arrays."""

    model_dir: Path
    meta: dict
    members: list[Member]
    device: torch.device
    feature_names: list[str] = field(default_factory=list)

    @property
    def model_id(self) -> str:
        return str(self.meta["model_id"])

    @property
    def method(self) -> str:
        return str(self.meta["method"])

    @property
    def thresholds(self) -> dict[str, float]:
        """Operating points on the mean probability: {'f1': ..., 'high-sensitivity': ...}."""
        return {k: float(v) for k, v in self.meta["thresholds"].items()}

    def _ordered_features(self, features: np.ndarray, feature_names: Sequence[str]) -> np.ndarray:
        features = np.asarray(features, dtype=np.float32)
        n = features.shape[0] if features.ndim else 0
        if not self.feature_names:
            return np.zeros((n, 0), np.float32)
        if features.ndim != 2:
            raise ValueError(f"features must be (N, F), got shape {features.shape}")
        names = list(feature_names)
        if features.shape[1] != len(names):
            raise ValueError(f"{features.shape[1]} feature columns but {len(names)} feature names")
        where = {name: i for i, name in enumerate(names)}
        missing = [name for name in self.feature_names if name not in where]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise ValueError(f"{len(missing)} feature(s) the model needs are missing: {shown}")
        return features[:, [where[name] for name in self.feature_names]]

    @property
    def calibration(self):
        """The model's calibration map (model.json ``calibration``; identity for a model without one)."""
        from .calibration import CalibrationMap

        return CalibrationMap.from_dict(self.meta.get("calibration"))

    @property
    def inputs(self):
        from .inputs import InputSpec

        return InputSpec.from_dict(self.meta["inputs"])

    def predict(self, patches: np.ndarray, features: np.ndarray, feature_names: Sequence[str],
                batch_size: int = 256, threshold: float | None = None, reference: np.ndarray | None = None
                ) -> EnsemblePrediction:
        """Ensemble prediction for N lesions from raw patches (N, 4, X, Y, Z) and their (N, 2) local
        references; see the module docstring for what each output means."""
        patches = np.asarray(patches, dtype=np.float32)
        feats = self._ordered_features(features, feature_names)
        n = patches.shape[0]
        if feats.shape[0] != n:
            raise ValueError(f"{n} patches but {feats.shape[0]} feature rows")
        if n == 0:
            empty = np.zeros(0, np.float32)
            return EnsemblePrediction(empty, empty.copy(), np.zeros(0, bool), empty.copy(),
                                      np.zeros((len(self.members), 0), np.float32), empty.copy())
        spec = self.inputs
        expected = (4, *spec.shape)
        if patches.shape[1:] != expected:
            raise ValueError(f"patches must be (N, {', '.join(map(str, expected))}), got {patches.shape}")
        if reference is None:
            reference = np.tile(np.asarray([[0.0, 1.0]], np.float32), (n, 1))
        groups = self._component_probabilities(patches, feats, reference, batch_size)
        probs = np.concatenate(list(groups.values()))
        thr = np.array([m.threshold for g in groups for m in self.members if (m.method or self.method) == g],
                       dtype=np.float32)[:, None]
        votes = (probs >= thr).mean(axis=0).astype(np.float32)
        raw = np.mean([g.mean(axis=0) for g in groups.values()], axis=0).astype(np.float32)  # fusion.py
        mean = self.calibration.apply(raw).astype(np.float32)  # thresholds live on this scale (train.py)
        positive = mean >= threshold if threshold is not None else votes > 0.5
        return EnsemblePrediction(mean, votes, positive, probs.std(axis=0).astype(np.float32), probs, raw)

    def _component_probabilities(self, patches: np.ndarray, feats: np.ndarray, reference: np.ndarray,
                                 batch_size: int) -> dict[str, np.ndarray]:
        """(members, N) probabilities per method: one group for a model, one per component of a fusion,
        each fed its own feature columns and inputs as its training did (select_features)."""
        spec, groups = self.inputs, {}
        for method in dict.fromkeys(m.method or self.method for m in self.members):
            names = self.component_features(method)
            index = {n: i for i, n in enumerate(self.feature_names)}
            mine = feats[:, [index[n] for n in names]]
            if get_method(method).features == "inputs":
                mine = spec.feature_values(names, mine, reference)
            x = spec.network_inputs(patches, reference) if method in NETWORK_METHODS else patches
            groups[method] = np.stack([self._member_probability(m, x, mine, batch_size) for m in self.members
                                       if (m.method or self.method) == method])
        return groups

    def component_features(self, method: str) -> list[str]:
        """The feature columns a method of this model reads (the model's own, or a component's)."""
        components = self.meta.get("components") or {}
        return list(components[method]["feature_names"]) if method in components else self.feature_names

    def _member_probability(self, member: Member, patches: np.ndarray, feats: np.ndarray,
                            batch_size: int) -> np.ndarray:
        scaled = member.scaler.transform(feats) if feats.shape[1] else feats
        if isinstance(member.model, nn.Module):
            return predict_probabilities(member.model, patches, scaled, self.device, batch_size)
        return member.model.predict_proba(scaled)[:, 1].astype(np.float32)


def load_ensemble(model_dir: Path, device: str = "auto") -> Ensemble:
    """Read ``model.json`` and every member's weights from a directory written by ``train.train``."""
    model_dir = Path(model_dir)
    meta_path = model_dir / MODEL_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"no {MODEL_JSON} in {model_dir}")
    meta = read_model_json(model_dir)
    if int(meta.get("format_version", 1)) != MODEL_FORMAT:
        raise ValueError(
            f"{meta_path} is a model of format {meta.get('format_version', 1)} (qsmrim 0.1: 32x32x16 voxel "
            f"windows of the lesion only); this qsmrim reads format {MODEL_FORMAT} (patches in mm with their "
            "surrounding tissue). Retrain it with `qsmrim BIDS OUT group --train` on this version's "
            "participant outputs, or use the bundled model")
    config = TrainConfig.from_dict(meta["config"])
    dev = resolve_device(device)
    components = meta.get("components") or {}
    scalers = {(config.method, int(f["fold"])): FeatureScaler.from_dict(f["scaler"]) for f in meta["folds"]
               if "scaler" in f}
    scalers |= {(m, int(f["fold"])): FeatureScaler.from_dict(f["scaler"])
                for m, c in components.items() for f in c["folds"]}
    members = []
    for entry in meta["members"]:
        path = model_dir / entry["weights"]
        method = str(entry.get("method") or config.method)
        n_features = len(components[method]["feature_names"]) if method in components else len(meta["feature_names"])
        if method not in NETWORK_METHODS:
            import joblib  # only the scikit-learn comparators and floors are pickled

            model: Any = joblib.load(path)
        else:
            model = load_state(path, build_network(replace(config, method=method), n_features,
                                                   len(meta["inputs"]["channels"]))).to(dev).eval()
        members.append(Member(int(entry["fold"]), int(entry["seed"]), model, scalers[(method, int(entry["fold"]))],
                              float(entry["threshold"]), method if method != config.method else ""))
    if not members:
        raise ValueError(f"{meta_path} lists no members")
    return Ensemble(model_dir, meta, members, dev, list(meta["feature_names"]))
