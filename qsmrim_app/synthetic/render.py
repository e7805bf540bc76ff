"""Sample the continuous anatomy into a voxel grid: tissue labels, vein fraction, lesion instances, rims."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import Anatomy, Lesion

# Tissue codes of the rendered label map.
OUTSIDE, SCALP, SKULL, CSF, GM, WM, VENTRICLE = 0, 1, 2, 3, 4, 5, 6
DEEP_CODES = {"thalamus": 7, "caudate": 8, "putamen": 9, "pallidum": 10, "nigra": 11, "ventricle": VENTRICLE}
N_TISSUES = 12
BRAIN_CODES = (CSF, GM, WM, VENTRICLE, 7, 8, 9, 10, 11)
LESION_TISSUES = (GM, WM)


@dataclass(frozen=True)
class Grid:
    """A voxel grid: `affine` maps indices to its own world (mm); `to_head` maps that world to the head frame."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    to_head: np.ndarray

    @property
    def voxel_sizes(self) -> np.ndarray:
        return np.sqrt(np.sum(self.affine[:3, :3] ** 2, axis=0))

    @property
    def index_to_head(self) -> np.ndarray:
        return self.to_head @ self.affine

    def box(self, center: np.ndarray, radius: float) -> tuple[slice, slice, slice] | None:
        """Index slices covering a head-frame ball, or None when it lies outside the grid."""
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * radius + center
        ijk = (np.linalg.inv(self.index_to_head) @ np.c_[corners, np.ones(8)].T)[:3]
        lo = np.maximum(np.floor(ijk.min(axis=1)).astype(int), 0)
        hi = np.minimum(np.ceil(ijk.max(axis=1)).astype(int) + 1, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]

    def _points(self, matrix: np.ndarray, sl: tuple[slice, slice, slice] | None) -> np.ndarray:
        sl = sl or tuple(slice(0, n) for n in self.shape)
        axes = [np.arange(s.start, s.stop, dtype=np.float32) for s in sl]
        m = matrix.astype(np.float32)
        out = np.empty((3,) + tuple(len(a) for a in axes), dtype=np.float32)
        for r in range(3):
            out[r] = (m[r, 0] * axes[0][:, None, None] + m[r, 1] * axes[1][None, :, None]
                      + m[r, 2] * axes[2][None, None, :] + m[r, 3])
        return out

    def head_points(self, sl: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """Head-frame coordinates (3, ...) float32 of the voxel centres in `sl` (default: all)."""
        return self._points(self.index_to_head, sl)

    def world_points(self) -> np.ndarray:
        """The grid's own world coordinates (3, ...) of every voxel: where scanner effects live."""
        return self._points(self.affine, None)


def render_tissue(anat: Anatomy, grid: Grid) -> np.ndarray:
    """uint8 tissue label map (codes above) of the head sampled at voxel centres."""
    pts = grid.head_points()
    q = anat.brain_q(pts)
    head_r = anat.brain_radii.reshape(3, 1, 1, 1).astype(np.float32)
    tissue = np.zeros(grid.shape, np.uint8)
    tissue[np.sqrt(np.sum((pts / (head_r + 11.0)) ** 2, axis=0)) < 1] = SCALP
    tissue[np.sqrt(np.sum((pts / (head_r + 6.0)) ** 2, axis=0)) < 1] = SKULL
    tissue[q < 1.0] = CSF
    tissue[q < 0.955] = GM
    tissue[q < 0.87] = WM
    fissure = (np.abs(pts[0]) < 1.2) & (q > 0.55) & (q < 1.0) & (pts[2] > 0)
    tissue[fissure] = CSF
    del pts, q
    for name, ell in anat.structures:
        sl = grid.box(ell.center, ell.bound)
        if sl is None:
            continue
        inside = ell.q(grid.head_points(sl)) < 1.0
        region = tissue[sl]
        region[inside & np.isin(region, BRAIN_CODES)] = DEEP_CODES[name]
    return tissue


def render_veins(anat: Anatomy, grid: Grid) -> np.ndarray:
    """float32 vein volume fraction: a soft tube profile one voxel wide, so thin veins partial-volume."""
    frac = np.zeros(grid.shape, np.float32)
    h = float(np.mean(grid.voxel_sizes))
    for tube in anat.veins:
        for a, b in zip(tube.points[:-1], tube.points[1:]):
            mid, half = 0.5 * (a + b), 0.5 * float(np.linalg.norm(b - a)) + tube.radius + h
            sl = grid.box(mid, half)
            if sl is None:
                continue
            p = grid.head_points(sl)
            ab = (b - a).astype(np.float32)
            t = np.clip(np.tensordot(ab, p - a.reshape(3, 1, 1, 1).astype(np.float32), axes=1) / float(ab @ ab), 0, 1)
            closest = a.reshape(3, 1, 1, 1).astype(np.float32) + ab.reshape(3, 1, 1, 1) * t
            dist = np.sqrt(np.sum((p - closest) ** 2, axis=0))
            f = np.clip((tube.radius + 0.5 * h - dist) / h, 0.0, 1.0)
            np.maximum(frac[sl], f, out=frac[sl])
    return frac


MIDLINE_MM = 1.2  # half-width of the interhemispheric fissure drawn by render_tissue


def render_lesions(anat: Anatomy, grid: Grid, tissue: np.ndarray) -> np.ndarray:
    """int32 instance map, lesion k labelled k+1; overlapping lesions split where each is 'deeper'.

    A lesion stays in its centre's hemisphere (MS lesions do not cross the midline's fissure) and, where
    tissue or a neighbour cuts it, only its largest connected piece is kept: one lesion, one blob.
    """
    ids = np.zeros(grid.shape, np.int32)
    best = np.full(grid.shape, np.inf, np.float32)
    allowed = np.isin(tissue, LESION_TISSUES)
    for k, lesion in enumerate(anat.lesions):
        sl = grid.box(lesion.center, lesion.bound)
        if sl is None:
            continue
        pts = grid.head_points(sl)
        side = 1.0 if lesion.center[0] >= 0 else -1.0
        level = lesion.level(pts)
        win = (level < 1.0) & (level < best[sl]) & allowed[sl] & (side * pts[0] >= MIDLINE_MM)
        ids[sl][win] = k + 1
        best[sl][win] = level[win]
    return _largest_pieces(ids)


def _largest_pieces(ids: np.ndarray) -> np.ndarray:
    """Keep each label's largest 6-connected piece (ties: the first in scan order)."""
    for label, sl in enumerate(ndimage.find_objects(ids), start=1):
        if sl is None:
            continue
        pieces, n = ndimage.label(ids[sl] == label)
        if n > 1:
            largest = int(np.argmax(np.bincount(pieces.ravel())[1:])) + 1
            ids[sl][(pieces > 0) & (pieces != largest)] = 0
    return ids


def lesion_boxes(ids: np.ndarray) -> dict[int, tuple[slice, slice, slice]]:
    """Bounding box (padded by 2 voxels) of every label present."""
    out: dict[int, tuple[slice, slice, slice]] = {}
    for label, sl in enumerate(ndimage.find_objects(ids), start=1):
        if sl is not None:
            out[label] = tuple(slice(max(s.start - 2, 0), min(s.stop + 2, n)) for s, n in zip(sl, ids.shape))
    return out


def inner_depth(mask: np.ndarray) -> np.ndarray:
    """Distance (voxels) of each lesion voxel to the outside: 1 on the edge."""
    return ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]


def rim_voxels(lesion: Lesion, mask: np.ndarray, depth: np.ndarray, grid: Grid,
               sl: tuple[slice, slice, slice]) -> np.ndarray:
    """Edge voxels (depth <= thickness) inside the covered sector around `lesion.rim_direction`."""
    pts = grid.head_points(sl)
    centroid = pts[:, mask].mean(axis=1)
    v = pts - centroid.reshape(3, 1, 1, 1).astype(np.float32)
    norm = np.sqrt(np.sum(v ** 2, axis=0)) + 1e-6
    cosine = np.tensordot(lesion.rim_direction.astype(np.float32), v, axes=1) / norm
    return mask & (depth <= lesion.rim_thickness) & (cosine >= 1.0 - 2.0 * lesion.rim_coverage)
