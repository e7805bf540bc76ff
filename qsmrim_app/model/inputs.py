"""What the network sees of a lesion: the cumulative input levels of the ablation.

The participant level stores raw ingredients per lesion (``patches.RAW_CHANNELS``: QSM in ppb, FLAIR,
signed distance to the boundary in mm, other lesions) and the lesion's local reference (median, scale
in ppb). A model's :class:`InputSpec` (stored in ``model.json``) turns them into network inputs:

- ``paper``: the paper's patch: QSM (ppb) and FLAIR inside the lesion only, zero elsewhere; the 527
  pyradiomics features;
- ``margin``: + tissue within ``margin_mm`` of the boundary (other lesions excluded) and an outline
  channel (the signed distance, clipped to +-margin and scaled to +-1), since a FLAIR mask registered to
  the QSM often leaves the rim on or just outside its edge;
- ``radial``: + the radial-profile features (:mod:`qsmrim_app.radial`) in the radiomic branch;
- ``referenced``: + the QSM channel relative to the local reference ((ppb - median) / scale) and
  contrast augmentation (scale, noise) in training, so reconstructions with other offsets and scales
  give the same inputs;
- ``tissue``: + the pyradiomics first-order features in ppb referenced to the same local tissue
  (:func:`tissue_referenced_features`): a lesion's mean, percentiles, extremes and spreads say how it
  differs from its own surroundings, not what the reconstruction's offset and scale were. Measured leave-
  one-family-out on the bundled model's corpus (docs/families.md) it does not help (features alone: pooled PR
  AUC 0.482 against 0.516 at ``referenced``; the radial features, already referenced, carry most of the
  signal), so ``referenced`` stays the default.

The pyradiomics texture features (GLCM, GLRLM) stay on absolute ppb at every level: their bin width of
25 ppb is applied when the participant level computes them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

LEVELS: tuple[str, ...] = ("paper", "margin", "radial", "referenced", "tissue")
DEFAULT_LEVEL = "referenced"
DEFAULT_MARGIN_MM = 3.0
PYRADIOMICS_PREFIXES = ("original_", "wavelet-", "log-sigma", "square_", "squareroot_", "logarithm_",
                        "exponential_", "gradient_", "lbp-")
RADIAL_PREFIX = "radial_"


FLOOR_COLUMN = "shell_minus_core_ppb"  # the training-free score (qsmrim_app.radial)


def is_pyradiomics_feature(name: str) -> bool:
    return str(name).startswith(PYRADIOMICS_PREFIXES)


# Which pyradiomics columns a method may read: "all" (the paper's 527), or "no-voxel-counts": without the
# features that count voxels of the scan's own grid, the run-length matrix (GLRLM: run lengths in voxels) and
# first-order Energy (a sum over voxels; TotalEnergy, scaled by the voxel volume, is physical and stays).
# The other texture and wavelet features still see the native grid (coif1 and GLCM work at one voxel), so
# this is not invariance: it removes what a model leant on. Measured on the nine-family corpus
# (docs/families.md): a fusion on all columns moved a rim-less lesion's probability 0.15 -> 0.31 between
# grids, one without the voxel counts 0.147 -> 0.151, and its left-out PR AUC did not drop.
FEATURE_SETS: tuple[str, ...] = ("all", "no-voxel-counts")


def counts_voxels(name: str) -> bool:
    """A pyradiomics feature that counts voxels of the native grid (see :data:`FEATURE_SETS`)."""
    name = str(name)
    return is_pyradiomics_feature(name) and ("_glrlm_" in name or name.endswith("_firstorder_Energy"))


def check_feature_set(feature_set: str) -> None:
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {feature_set!r} (one of {', '.join(FEATURE_SETS)})")


def in_feature_set(name: str, feature_set: str) -> bool:
    """Whether column ``name`` belongs to ``feature_set`` (checked where the set is chosen: TrainConfig)."""
    return feature_set == "all" or not counts_voxels(name)


def is_feature_column(name: str) -> bool:
    """Columns of the lesion tables that a method may use (not geometry, ids or bookkeeping)."""
    return is_pyradiomics_feature(name) or str(name).startswith(RADIAL_PREFIX) or str(name) == FLOOR_COLUMN


# First-order statistics that move with the reconstruction's offset and scale (pyradiomics' names)
_LOCATION = ("Mean", "Median", "Minimum", "Maximum", "10Percentile", "90Percentile")
_SPREAD = ("InterquartileRange", "MeanAbsoluteDeviation", "RobustMeanAbsoluteDeviation", "Range")
# The coif1 low-pass filter sums to sqrt(2) per axis: the LLL band carries 2*sqrt(2) times the local level.
_LLL_GAIN = 2.0 * np.sqrt(2.0)


def _first_order(name: str) -> tuple[str, str] | None:
    """(image type, statistic) of a pyradiomics first-order feature name, else None."""
    image, _, rest = str(name).partition("_firstorder_")
    return (image, rest) if rest and is_pyradiomics_feature(name) else None


def tissue_referenced_features(names: Sequence[str], values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """First-order pyradiomics features relative to each lesion's local reference (median m, scale s, ppb).

    Location statistics of the original image become (x - m) / s; spreads x / s; variance x / s^2. The
    wavelet bands: LLL carries the local level times its gain g, so (x - g m) / (g s); the other bands are
    high-pass (the level cancels), so x / s. Other features (shape, texture, energy) are returned as they are.
    """
    out = np.array(values, dtype=np.float32, copy=True)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1, 2)
    median, scale = ref[:, 0], np.where(ref[:, 1] > 0, ref[:, 1], 1.0)
    for j, name in enumerate(names):
        parsed = _first_order(name)
        if parsed is None:
            continue
        image, stat = parsed
        gain = _LLL_GAIN if image == "wavelet-LLL" else 1.0
        level = median * gain if image in ("original", "wavelet-LLL") else 0.0
        if stat in _LOCATION:
            out[:, j] = (out[:, j] - level) / (scale * gain)
        elif stat in _SPREAD:
            out[:, j] = out[:, j] / (scale * gain)
        elif stat == "Variance":
            out[:, j] = out[:, j] / (scale * gain) ** 2
    return out


#: The default patch grid (the bundled model's): extent and sampling in mm along the world axes.
PATCH_EXTENT_MM: tuple[float, float, float] = (24.0, 24.0, 24.0)
PATCH_SPACING_MM: tuple[float, float, float] = (0.75, 0.75, 1.5)


@dataclass(frozen=True)
class InputSpec:
    level: str = DEFAULT_LEVEL
    extent_mm: tuple[float, float, float] = PATCH_EXTENT_MM
    spacing_mm: tuple[float, float, float] = PATCH_SPACING_MM
    margin_mm: float = DEFAULT_MARGIN_MM

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"unknown inputs {self.level!r} (one of {', '.join(LEVELS)})")
        object.__setattr__(self, "extent_mm", tuple(float(v) for v in self.extent_mm))
        object.__setattr__(self, "spacing_mm", tuple(float(v) for v in self.spacing_mm))
        if self.margin_mm <= 0:
            raise ValueError("the margin must be positive (mm)")

    @property
    def rank(self) -> int:
        return LEVELS.index(self.level)

    @property
    def channels(self) -> tuple[str, ...]:
        return ("qsm", "flair") if self.rank < 1 else ("qsm", "flair", "outline")

    @property
    def uses_radial(self) -> bool:
        return self.rank >= 2

    @property
    def referenced(self) -> bool:
        return self.rank >= 3

    @property
    def tissue_features(self) -> bool:
        return self.rank >= 4

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(round(e / s)) for e, s in zip(self.extent_mm, self.spacing_mm))

    def select_features(self, names: Sequence[str]) -> list[str]:
        """The table columns this input level feeds the radiomic branch, in table order."""
        return [n for n in names if is_pyradiomics_feature(n) or (self.uses_radial and str(n).startswith(RADIAL_PREFIX))]

    def feature_values(self, names: Sequence[str], values: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
        """The radiomic branch's feature values at this level (``names``: the selected columns, in order)."""
        if not self.tissue_features or reference is None:
            return np.asarray(values, dtype=np.float32)
        return tissue_referenced_features(names, values, reference)

    def check_patches(self, extent_mm: Sequence[float], spacing_mm: Sequence[float]) -> None:
        """Refuse patches sampled on another physical grid than this model's."""
        if not (np.allclose(extent_mm, self.extent_mm, atol=1e-4) and np.allclose(spacing_mm, self.spacing_mm, atol=1e-4)):
            raise ValueError(
                f"the patches are {list(extent_mm)} mm at {list(spacing_mm)} mm but the model needs "
                f"{list(self.extent_mm)} mm at {list(self.spacing_mm)} mm: rerun the participant level with "
                f"--patch-extent-mm {' '.join(f'{v:g}' for v in self.extent_mm)} "
                f"--patch-spacing-mm {' '.join(f'{v:g}' for v in self.spacing_mm)}")

    def network_inputs(self, raw: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """(N, len(channels), X, Y, Z) float32 from raw patches (N, 4, X, Y, Z) and (N, 2) references."""
        raw = np.asarray(raw, dtype=np.float32)
        if raw.ndim != 5 or raw.shape[1] != 4:
            raise ValueError(f"raw patches must be (N, 4, X, Y, Z), got {raw.shape}")
        sd, other = raw[:, 2], raw[:, 3] > 0.5
        qsm = raw[:, 0]
        if self.referenced:
            ref = np.asarray(reference, dtype=np.float32).reshape(-1, 2)
            qsm = (qsm - ref[:, 0, None, None, None]) / ref[:, 1, None, None, None]
        if self.rank == 0:
            keep = sd < 0
            return np.stack([np.where(keep, qsm, 0), np.where(keep, raw[:, 1], 0)], axis=1).astype(np.float32)
        keep = (sd <= self.margin_mm) & ~other
        outline = np.clip(sd, -self.margin_mm, self.margin_mm) / self.margin_mm
        return np.stack([np.where(keep, qsm, 0), np.where(keep, raw[:, 1], 0), outline], axis=1).astype(np.float32)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(extent_mm=list(self.extent_mm), spacing_mm=list(self.spacing_mm),
                   channels=list(self.channels), shape=list(self.shape))
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        return cls(level=data["level"], extent_mm=tuple(data["extent_mm"]), spacing_mm=tuple(data["spacing_mm"]),
                   margin_mm=float(data.get("margin_mm", DEFAULT_MARGIN_MM)))
