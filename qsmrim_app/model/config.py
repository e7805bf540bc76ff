"""Training and network hyper-parameters: one frozen object, stored with every model."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Method = Literal["qsmrimnet", "aprl-rf", "aprl-nn", "rimnet", "image-only", "image-radiomics"]
ALL_METHODS: tuple[str, ...] = ("qsmrimnet", "aprl-rf", "aprl-nn", "rimnet", "image-only", "image-radiomics")


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are the paper's protocol (Zhang et al. 2022); the CLI overrides a few."""

    method: str = "qsmrimnet"
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 1e-4
    lr_milestones: tuple[float, ...] = (0.5, 0.7, 0.9)  # fractions of epochs
    lr_gamma: float = 0.1
    folds: int = 5
    seeds: int = 3
    width_multiplier: float = 1.0
    fusion: Literal["concat", "add"] = "concat"
    deepsmote: bool = True
    deepsmote_neighbours: int = 2
    radiomics_dropout: float = 0.3
    classifier_dropout: float = 0.5
    augment: bool = True
    patch_size: tuple[int, int, int] = (32, 32, 16)
    n_radiomic_features: int = 527
    base_seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True  # only ever used on CUDA
    augment_probability: float = 0.5  # per transform (flip, affine, blur), per sample
    blur_sigma_units: Literal["voxel", "mm"] = "voxel"  # paper: sigmas in voxels
    weights_fp16: bool = False  # store member state dicts as fp16 (smaller bundled model)
    checkpoint: bool = True  # per-epoch checkpoints under out_dir/checkpoints (resumable)
    init_model: str | None = None  # fine-tuning: model directory whose members start the networks
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("lr_milestones", "patch_size"):  # JSON turns tuples into lists
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)
