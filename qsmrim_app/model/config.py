"""Training and network hyper-parameters: one frozen object, stored with every model."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from .inputs import DEFAULT_LEVEL, PATCH_EXTENT_MM, PATCH_SPACING_MM

PROTOCOLS: tuple[str, ...] = ("paper", "fast")


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are the paper's protocol (Zhang et al. 2022); the CLI overrides a few."""

    method: str = "qsmrimnet"  # a name in model/methods.py METHODS
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 1e-4
    lr_milestones: tuple[float, ...] = (0.5, 0.7, 0.9)  # fractions of epochs
    lr_gamma: float = 0.1
    folds: int = 5
    # The participants.tsv column whose values the folds keep whole (a site, a scanner, a generator family;
    # --cv-group-by); None: the participant. The lesion set carries the values (LesionSet.groups).
    fold_groups_by: str | None = None
    seeds: int = 3
    width_multiplier: float = 1.0
    fusion: Literal["concat", "add"] = "concat"
    # Image-branch stem stride per axis: (1, 1, 1) is the paper's full-resolution stem; (2, 2, 1) turns a
    # 0.75 x 0.75 x 1.5 mm patch into a 1.5 mm isotropic map after the first convolution (which still reads
    # every input voxel) and makes a CPU step ~3x cheaper.
    stem_stride: tuple[int, int, int] = (1, 1, 1)
    # Wide & deep: a linear term on the (scaled) radiomic features added to the network's logit. It is a
    # penalised logistic regression fitted (LBFGS, C by inner cross-validation) on the member's training
    # lesions and then frozen; the deep part starts at zero and learns what the linear model misses. With
    # ~40 rim+ per fold, SGD through the MLP does not find the linear signal a fitted model has.
    wide: bool = False
    deepsmote: bool = True
    deepsmote_neighbours: int = 2
    radiomics_dropout: float = 0.3
    classifier_dropout: float = 0.5
    augment: bool = True
    # What the network sees (model/inputs.py): the input level and the physical patch grid.
    input_level: str = DEFAULT_LEVEL
    patch_extent_mm: tuple[float, float, float] = PATCH_EXTENT_MM
    patch_spacing_mm: tuple[float, float, float] = PATCH_SPACING_MM
    margin_mm: float = 3.0
    # The pyradiomics columns the features are drawn from (model/inputs.py FEATURE_SETS): "all" (the paper's
    # 527) or "no-voxel-counts" (without those counted in native voxels: GLRLM, first-order Energy).
    feature_set: str = "all"
    n_radiomic_features: int = 527
    base_seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True  # only ever used on CUDA
    augment_probability: float = 0.5  # per transform (flip, affine, blur), per sample
    blur_sigma_units: Literal["voxel", "mm"] = "voxel"  # paper: sigmas in voxels
    weights_fp16: bool = False  # store member state dicts as fp16 (smaller bundled model)
    checkpoint: bool = True  # per-epoch checkpoints under out_dir/checkpoints (resumable)
    # The recipe. 'paper': epochs with step decay. 'fast' (see protocol_config): a fixed number of
    # optimisation steps, one-cycle LR, rim+-enriched batches and early stopping on an inner split.
    protocol: str = "paper"
    max_steps: int | None = None  # None: epochs x batches per epoch
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    lr_schedule: Literal["step", "onecycle"] = "step"
    positive_fraction: float | None = None  # rim+ share of every batch (sampled with replacement)
    inner_val_fraction: float = 0.0  # training subjects held out for early stopping (0: none)
    eval_every: int = 0  # steps between inner-validation checks (0: once per epoch)
    contrast_augment: bool | None = None  # QSM scale/noise augmentation; None: on for referenced inputs
    init_model: str | None = None  # fine-tuning: model directory whose members start the networks
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .inputs import check_feature_set

        check_feature_set(self.feature_set)

    def input_spec(self):
        from .inputs import InputSpec

        return InputSpec(self.input_level, self.patch_extent_mm, self.patch_spacing_mm, self.margin_mm)

    @property
    def uses_contrast_augment(self) -> bool:
        return self.input_spec().referenced if self.contrast_augment is None else bool(self.contrast_augment)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("lr_milestones", "patch_extent_mm", "patch_spacing_mm", "stem_stride"):  # JSON turns tuples into lists
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


# Our CPU recipe (docs/training.md): a narrow network whose stem strides 2 in-plane (a step of 32
# patches ~0.5 s on 2 CPU cores instead of ~2 s), a fixed budget of optimisation steps independent of the
# cohort size, one-cycle LR at 1e-3 with AdamW, a quarter of every batch rim+ (DeepSMOTE still
# interpolates them), a wide linear term fitted on the member's training lesions (the deep part learns a
# correction to it), and each member kept at its best inner-validation AUC (checked every 25 steps on a
# fifth of its training subjects; the fitted start is a candidate), and no pyradiomics feature that counts
# native voxels (a model trained on one grid must give the same answer on another's).
FAST_PROTOCOL: dict = dict(protocol="fast", width_multiplier=0.125, folds=5, seeds=1, batch_size=32,
                           learning_rate=1e-3, optimizer="adamw", weight_decay=1e-4, lr_schedule="onecycle",
                           max_steps=200, positive_fraction=0.25, inner_val_fraction=0.2, eval_every=25,
                           epochs=40, stem_stride=(2, 2, 1), wide=True, feature_set="no-voxel-counts")
PAPER_PROTOCOL: dict = dict(protocol="paper")


def protocol_config(protocol: str, **overrides) -> TrainConfig:
    """The TrainConfig of a protocol, with explicit values (not None) taking precedence."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
    base = dict(FAST_PROTOCOL if protocol == "fast" else PAPER_PROTOCOL)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**base)
