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
  give the same inputs.

The 527 pyradiomics features stay on absolute ppb at every level (their bin width of 25 ppb is defined
there).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

LEVELS: tuple[str, ...] = ("paper", "margin", "radial", "referenced")
DEFAULT_LEVEL = "referenced"
DEFAULT_MARGIN_MM = 3.0
PYRADIOMICS_PREFIXES = ("original_", "wavelet-", "log-sigma", "square_", "squareroot_", "logarithm_",
                        "exponential_", "gradient_", "lbp-")
RADIAL_PREFIX = "radial_"


FLOOR_COLUMN = "shell_minus_core_ppb"  # the training-free score (qsmrim_app.radial)


def is_pyradiomics_feature(name: str) -> bool:
    return str(name).startswith(PYRADIOMICS_PREFIXES)


def is_feature_column(name: str) -> bool:
    """Columns of the lesion tables that a method may use (not geometry, ids or bookkeeping)."""
    return is_pyradiomics_feature(name) or str(name).startswith(RADIAL_PREFIX) or str(name) == FLOOR_COLUMN


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
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(round(e / s)) for e, s in zip(self.extent_mm, self.spacing_mm))

    def select_features(self, names: Sequence[str]) -> list[str]:
        """The table columns this input level feeds the radiomic branch, in table order."""
        return [n for n in names if is_pyradiomics_feature(n) or (self.uses_radial and str(n).startswith(RADIAL_PREFIX))]

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
