"""The rim consensus criterion, judged on what was simulated as seen on the QSM grid.

A lesion is rim+ when a paramagnetic band covers at least 2/3 of its edge in plane on at least 2 slices
(the consensus criterion of the paramagnetic-rim-lesion literature). Here, per slice (the QSM grid's third
axis) of the lesion's own mask on the QSM grid: the *edge* is the cross-section's inner boundary
(4-connected erosion); a QSM voxel *shows the rim* when the reconstructed rim component reaches half of
the lesion's drawn visible amplitude (and at least 2 ppb); an edge voxel is covered when a rim-showing
voxel lies within ``REACH_MM`` in plane (bands sit up to ~1 mm inside or outside the FLAIR edge).
Slices with fewer than ``MIN_EDGE_VOXELS`` edge voxels (lesion caps) do not count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MIN_COVERAGE = 2.0 / 3.0
MIN_SLICES = 2
REACH_MM = 1.5
MIN_EDGE_VOXELS = 4
MIN_VISIBLE_PPB = 2.0


@dataclass(frozen=True)
class RuleResult:
    positive: bool
    slices_covered: int
    coverage: tuple[float, ...]   # per slice with an edge, in slice order

    @property
    def max_coverage(self) -> float:
        return max(self.coverage, default=0.0)


def visible_threshold(amplitude_ppb: float) -> float:
    return max(MIN_VISIBLE_PPB, 0.5 * amplitude_ppb)


def judge(lesion: np.ndarray, rim_visible: np.ndarray, voxel_mm: tuple[float, float, float] | np.ndarray,
          min_coverage: float = MIN_COVERAGE, min_slices: int = MIN_SLICES) -> RuleResult:
    """Apply the criterion to a lesion mask and a rim-showing mask (same grid, slices along axis 2)."""
    lesion = np.asarray(lesion, dtype=bool)
    rim_visible = np.asarray(rim_visible, dtype=bool)
    if lesion.shape != rim_visible.shape:
        raise ValueError(f"lesion {lesion.shape} and rim {rim_visible.shape} differ in shape")
    ri = max(1, int(round(REACH_MM / float(voxel_mm[0]))))
    rj = max(1, int(round(REACH_MM / float(voxel_mm[1]))))
    yy, xx = np.mgrid[-ri:ri + 1, -rj:rj + 1]
    disk = (yy * float(voxel_mm[0])) ** 2 + (xx * float(voxel_mm[1])) ** 2 <= REACH_MM ** 2 + 1e-6
    cross = ndimage.generate_binary_structure(2, 1)
    coverage: list[float] = []
    for k in range(lesion.shape[2]):
        section = lesion[:, :, k]
        if not section.any():
            continue
        edge = section & ~ndimage.binary_erosion(section, cross, border_value=0)
        if edge.sum() < MIN_EDGE_VOXELS:
            continue
        near = ndimage.binary_dilation(rim_visible[:, :, k], disk) if rim_visible[:, :, k].any() else rim_visible[:, :, k]
        coverage.append(float((edge & near).sum() / edge.sum()))
    covered = sum(c >= min_coverage for c in coverage)
    return RuleResult(covered >= min_slices, int(covered), tuple(coverage))
