"""QSM map conventions: units and the brain mask a reconstructed map implies."""
from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

LOGGER = logging.getLogger(__name__)
PPB_PER_PPM = 1000.0


def to_ppb(data: np.ndarray, units: str) -> np.ndarray:
    """Susceptibility in ppb: the radiomic bin width (25) and the model assume ppb."""
    if units not in ("ppm", "ppb"):
        raise ValueError(f"unknown QSM units {units!r}: expected 'ppm' or 'ppb'")
    scale = PPB_PER_PPM if units == "ppm" else 1.0
    return np.asarray(data, dtype=np.float32) * np.float32(scale)


def guess_units(data: np.ndarray) -> str | None:
    """'ppm' or 'ppb' from the robust value range of a map, None when it is ambiguous.

    Brain susceptibility spans roughly -0.2..+0.4 ppm (veins and deep grey matter the extremes),
    so a robust range well inside +-2 reads as ppm and one beyond +-20 as ppb.
    """
    values = np.asarray(data)
    values = values[np.isfinite(values) & (values != 0)]
    if values.size == 0:
        return None
    spread = float(np.percentile(np.abs(values), 99))
    if spread < 2.0:
        return "ppm"
    if spread > 20.0:
        return "ppb"
    return None


def brain_mask(data: np.ndarray) -> np.ndarray:
    """Reconstructed QSM maps are zero (or NaN) outside the brain: the support is the mask."""
    support = np.isfinite(data) & (data != 0)
    if not support.any():
        return support
    support = ndimage.binary_closing(support, structure=np.ones((3, 3, 3)), iterations=1)
    filled = np.zeros_like(support)
    for k in range(support.shape[2]):  # fill holes slice-wise: robust to open top/bottom slices
        filled[..., k] = ndimage.binary_fill_holes(support[..., k])
    return filled
