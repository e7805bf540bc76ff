"""Acquisition geometry: the QSM grid and the FLAIR grid of one participant.

Frames (all mm): the *head* frame of the background (backgrounds.py); the QSM session's scanner frame
(world of the stored QSM and magnitude), reached from the head by a rigid pose; the FLAIR session's
scanner frame (world of the stored FLAIR and lesion maps), reached from the QSM world by a rigid offset
of at most 8 degrees and 15 mm (the head moved between sessions). B0 is the QSM scanner's z axis.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backgrounds import Background
from .geometry import apply, homogeneous, random_unit, rigid, rotation

#: Common protocol grids the family must not fall on (in-plane, slice) in mm.
AVOID = ((0.75, 3.0), (0.6, 2.0), (1.0, 1.0))


@dataclass(frozen=True)
class Grid:
    """A stored image grid: shape and affine (index -> its world frame)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def voxel_mm(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def index_of(self, world: np.ndarray) -> np.ndarray:
        return apply(np.linalg.inv(self.affine), world)


@dataclass(frozen=True)
class Acquisition:
    """Both grids of a participant and the transforms between head and scanner frames."""

    qsm: Grid
    flair: Grid
    qsm_from_head: np.ndarray      # rigid: head -> QSM world
    flair_from_qsm: np.ndarray     # rigid: QSM world -> FLAIR world
    b0_index: np.ndarray           # unit B0 direction along the QSM grid's (physical) index axes
    params: dict

    @property
    def flair_from_head(self) -> np.ndarray:
        return self.flair_from_qsm @ self.qsm_from_head

    def in_slab(self, head_pts: np.ndarray, margin_mm: float = 3.0) -> bool:
        """All points inside the QSM grid, ``margin_mm`` from its first/last slice and sides."""
        idx = self.qsm.index_of(apply(self.qsm_from_head, head_pts))
        margin = margin_mm / self.qsm.voxel_mm
        shape = np.array(self.qsm.shape)
        return bool(np.all(idx >= margin) and np.all(idx <= shape - 1 - margin))


def _grid_from_extent(axes: np.ndarray, voxel: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                      flips: tuple[bool, bool, bool]) -> Grid:
    """A grid whose index axes point along ``axes`` columns (world), covering lo..hi (axis frame)."""
    shape = np.maximum(np.ceil((hi - lo) / voxel).astype(int) + 1, 8)
    directions = axes.copy()
    origin = lo.copy()
    for i, flip in enumerate(flips):
        if flip:  # stored the other way round (e.g. radiological order): same voxels, reversed index
            origin[i] = lo[i] + (shape[i] - 1) * voxel[i]
            directions[:, i] = -directions[:, i]
    linear = directions @ np.diag(voxel)
    start = axes @ origin
    return Grid(tuple(int(s) for s in shape), homogeneous(linear, start))


def _voxel_size(rng: np.random.Generator, small: bool) -> tuple[float, float]:
    while True:
        inplane = float(rng.uniform(0.9, 1.0) if small else rng.uniform(0.55, 1.0))
        slice_mm = float(rng.uniform(1.8, 3.0) if small else rng.uniform(1.0, 3.0))
        if inplane * inplane * slice_mm < 0.65:
            continue
        if any(abs(inplane - a) < 0.04 and abs(slice_mm - b) < 0.15 for a, b in AVOID):
            continue
        return round(inplane, 3), round(slice_mm, 3)


def draw_acquisition(rng: np.random.Generator, bg: Background, small: bool = False) -> Acquisition:
    """Pose, QSM grid (voxel size, slab angulation, coverage, storage order) and FLAIR grid."""
    lo_head, hi_head = bg.head_bounds()
    idx = np.argwhere(bg.mask)[:: 25]
    brain_head = apply(bg.head_from_vox, idx.astype(float))

    pose_angles = (rng.uniform(-10, 10), rng.uniform(-4, 4), rng.uniform(-4, 4))
    qsm_from_head = rigid(pose_angles, rng.uniform(-10, 10, 3))
    inplane, slice_mm = _voxel_size(rng, small)
    slab_angle = float(rng.uniform(-12, 12))
    axes = rotation((slab_angle, 0.0, 0.0))
    brain_q = apply(qsm_from_head, brain_head) @ axes  # coordinates along the grid's axes
    lo, hi = brain_q.min(axis=0) - [5, 5, 0], brain_q.max(axis=0) + [5, 5, 0]
    extent = hi[2] - lo[2]
    if small:
        centre = brain_q[:, 2].mean() + rng.uniform(0, 15)
        thickness = rng.uniform(36, 44)
        lo[2], hi[2], coverage = centre - thickness / 2, centre + thickness / 2, "small_slab"
    else:
        u = rng.random()
        if u < 0.45:
            coverage = "full"
            lo[2], hi[2] = lo[2] - 3, hi[2] + 3
        elif u < 0.75:
            coverage = "top_cut"
            hi[2] = hi[2] - rng.uniform(0.1, 0.3) * extent
        else:
            coverage = "bottom_cut"
            lo[2] = lo[2] + rng.uniform(0.1, 0.3) * extent
    flips = (bool(rng.random() < 0.5), bool(rng.random() < 0.5), False)
    qsm = _grid_from_extent(axes, np.array([inplane, inplane, slice_mm]), lo, hi, flips)
    unit_axes = qsm.affine[:3, :3] / qsm.voxel_mm
    b0_index = unit_axes.T @ np.array([0.0, 0.0, 1.0])

    # FLAIR session: the head moved by a rigid offset (<= 8 deg about a random axis, <= 15 mm).
    angle = float(rng.uniform(0, 8))
    axis = random_unit(rng)
    offset_rot = _axis_angle(axis, angle)
    shift = random_unit(rng) * rng.uniform(0, 15)
    flair_from_qsm = homogeneous(offset_rot, shift)
    mode = ("3d_sagittal", "3d_axial", "2d_axial")[int(rng.choice(3, p=[0.35, 0.35, 0.30]))]
    if mode == "2d_axial":
        fv = np.array([rng.uniform(0.86, 0.94)] * 2 + [3.0])
    else:
        fv = np.full(3, rng.uniform(0.9, 1.2))
    faxes = np.eye(3) if mode != "3d_sagittal" else np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0.0]])
    faxes = rotation((rng.uniform(-5, 5), 0.0, 0.0)) @ faxes
    brain_f = apply(flair_from_qsm @ qsm_from_head, brain_head) @ faxes
    flair = _grid_from_extent(faxes, fv, brain_f.min(axis=0) - 12, brain_f.max(axis=0) + 12,
                              (bool(rng.random() < 0.5), False, False))
    params = {
        "qsm_voxel_mm": [inplane, inplane, slice_mm], "qsm_shape": list(qsm.shape),
        "slab_angulation_deg": slab_angle, "qsm_coverage": coverage, "qsm_storage_flips": list(flips[:2]),
        "head_pose_deg": [float(a) for a in pose_angles], "b0_in_qsm_index_frame": b0_index.tolist(),
        "flair_mode": mode, "flair_voxel_mm": fv.tolist(), "flair_shape": list(flair.shape),
        "flair_offset_deg": angle, "flair_offset_mm": float(np.linalg.norm(shift)),
    }
    return Acquisition(qsm, flair, qsm_from_head, flair_from_qsm, b0_index, params)


def _axis_angle(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)
