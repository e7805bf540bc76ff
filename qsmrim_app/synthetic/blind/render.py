"""Rendering lesion edits into an acquisition grid by fine sub-sampling (the slice-averaging model).

A lesion's edge is the zero level of a signed distance function (SDF) of its 1 mm MNI mask (voxel-centre
distances, +-0.5 mm, smoothed with sigma 0.6 mm, scaled to head millimetres by the MNI->head affine's mean
scale). Each target voxel is the mean of a regular sub-lattice of points no further apart than
``FINE_MM`` along every axis: a box slice profile and a box in-plane footprint, exactly what an
acquisition voxel averages. The in-plane point-spread of the reconstruction is added afterwards, for the
whole grid, by physics.py. Values are ppb of susceptibility *added* to the background.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
from scipy import ndimage

from .geometry import apply, sample, smooth_field

FINE_MM = 0.5
SDF_SMOOTH_VOX = 0.6
OUTSIDE_MM = 99.0
MAX_FINE_PPB = 150.0


@dataclass
class Shape:
    """A lesion (or a confluent union) as an SDF crop in MNI voxel space, with the maps to it."""

    sdf: np.ndarray                # MNI-voxel units, negative inside
    crop_lo: np.ndarray            # MNI voxel index of sdf[0, 0, 0]
    head_from_mni_vox: np.ndarray  # 4x4
    scale: float                   # head mm per MNI voxel
    centroid_head: np.ndarray
    radius_mm: float               # equivalent-sphere radius in head mm
    voxels: np.ndarray             # (N, 3) MNI voxel indices

    @property
    def mni_vox_from_head(self) -> np.ndarray:
        return np.linalg.inv(self.head_from_mni_vox)

    def distance_mm(self, head_pts: np.ndarray) -> np.ndarray:
        local = apply(self.mni_vox_from_head, head_pts) - self.crop_lo
        return sample(self.sdf, local, cval=OUTSIDE_MM) * np.float32(self.scale)


def make_shape(voxels: np.ndarray, head_from_mni_vox: np.ndarray, margin_vox: int) -> Shape:
    lo = voxels.min(axis=0) - margin_vox
    hi = voxels.max(axis=0) + margin_vox + 1
    mask = np.zeros(tuple(hi - lo), dtype=bool)
    mask[tuple((voxels - lo).T)] = True
    outside = ndimage.distance_transform_edt(~mask)
    inside = ndimage.distance_transform_edt(mask)
    sdf = np.where(mask, -(inside - 0.5), outside - 0.5).astype(np.float32)
    sdf = ndimage.gaussian_filter(sdf, SDF_SMOOTH_VOX)
    scale = float(abs(np.linalg.det(head_from_mni_vox[:3, :3])) ** (1 / 3))
    volume = len(voxels) * scale ** 3
    return Shape(sdf, lo.astype(float), head_from_mni_vox, scale,
                 apply(head_from_mni_vox, voxels.mean(axis=0)[None])[0],
                 float((3 * volume / (4 * np.pi)) ** (1 / 3)), voxels)


def target_crop(shape: Shape, world_from_head: np.ndarray, grid_affine: np.ndarray, grid_shape, margin_mm: float
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """Index bounds [lo, hi) of the target grid around the shape plus ``margin_mm``; None if outside."""
    pts = apply(np.linalg.inv(grid_affine) @ world_from_head @ shape.head_from_mni_vox, shape.voxels.astype(float))
    voxel = np.sqrt((grid_affine[:3, :3] ** 2).sum(axis=0))
    lo = np.floor(pts.min(axis=0) - margin_mm / voxel).astype(int)
    hi = np.ceil(pts.max(axis=0) + margin_mm / voxel).astype(int) + 1
    lo, hi = np.maximum(lo, 0), np.minimum(hi, np.array(grid_shape))
    if np.any(hi <= lo):
        return None
    return lo, hi


def fine_offsets(voxel_mm: np.ndarray) -> list[np.ndarray]:
    """Sub-voxel offsets (in voxel units) of a lattice no coarser than FINE_MM."""
    counts = [max(1, int(np.ceil(v / FINE_MM - 1e-6))) for v in voxel_mm]
    axes = [(np.arange(n) + 0.5) / n - 0.5 for n in counts]
    return [np.array(o) for o in product(*axes)]


def crop_points(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (np.indices(tuple(hi - lo)).reshape(3, -1).T + lo).astype(np.float64)


def fraction_inside(shape: Shape, world_from_head: np.ndarray, grid_affine: np.ndarray, grid_shape,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(lo, hi, fraction of each voxel inside the lesion) on a target grid; None if it misses it."""
    crop = target_crop(shape, world_from_head, grid_affine, grid_shape, 2.0)
    if crop is None:
        return None
    lo, hi = crop
    base = crop_points(lo, hi)
    head_from_index = np.linalg.inv(world_from_head) @ grid_affine
    voxel = np.sqrt((grid_affine[:3, :3] ** 2).sum(axis=0))
    offsets = fine_offsets(voxel)
    acc = np.zeros(len(base), dtype=np.float32)
    for off in offsets:
        acc += shape.distance_mm(apply(head_from_index, base + off)) < 0
    return lo, hi, (acc / len(offsets)).reshape(tuple(hi - lo))


@dataclass
class Edit:
    """A group's rendered edit on the QSM grid crop [lo, hi): rim and everything else, in ppb."""

    lo: np.ndarray
    hi: np.ndarray
    rim: np.ndarray
    other: np.ndarray
    info: dict


def _coverage(head: np.ndarray, centre: np.ndarray, axis: np.ndarray, coverage: float) -> np.ndarray:
    """Soft cap of solid-angle fraction ``coverage`` around ``axis`` seen from the lesion centre."""
    if coverage >= 0.999:
        return np.ones(len(head), dtype=np.float32)
    n = head - centre
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-6)
    cos_edge = 1.0 - 2.0 * coverage
    return (1.0 / (1.0 + np.exp(-np.clip((n @ axis - cos_edge) / 0.08, -30, 30)))).astype(np.float32)


def _vein(head: np.ndarray, params: dict, shape: Shape, rng_point: np.ndarray) -> np.ndarray:
    """A thin straight-or-slightly-bent cylinder through (central) or along (edge) the lesion."""
    a = np.asarray(params["vein_direction"], dtype=float)
    b = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
    b /= np.linalg.norm(b)
    centre = shape.centroid_head.copy()
    if "vein_edge_offset_mm" in params:
        centre = centre + (shape.radius_mm + params["vein_edge_offset_mm"]) * b
    else:
        centre = centre + rng_point * 0.3 * shape.radius_mm
    half = shape.radius_mm + params["vein_extra_length_mm"] / 2
    rel = head - centre
    s = rel @ a
    lateral = rel - np.outer(s, a) - np.outer(params["vein_bend_mm"] * (s / half) ** 2, b)
    dist = np.linalg.norm(lateral, axis=1)
    taper = np.clip((half - np.abs(s)) / 1.5, 0, 1)
    return ((dist <= params["vein_radius_mm"]) * taper * params["vein_ppb"]).astype(np.float32)


def render_edit(rng: np.random.Generator, shape: Shape, params: dict, qsm_affine: np.ndarray, qsm_shape,
                qsm_from_head: np.ndarray, psf_sigma_vox: float) -> Edit | None:
    """Core, rim, vessel and focus of one lesion group on the QSM grid (see the module docstring)."""
    vein = "vein_ppb" in params
    margin = 4.0 + (params.get("vein_extra_length_mm", 0) / 2 + 1.0 if vein else 0.0)
    crop = target_crop(shape, qsm_from_head, qsm_affine, qsm_shape, margin)
    if crop is None:
        return None
    lo, hi = crop
    dims = tuple(hi - lo)
    base = crop_points(lo, hi)
    head_from_index = np.linalg.inv(qsm_from_head) @ qsm_affine
    voxel = np.sqrt((qsm_affine[:3, :3] ** 2).sum(axis=0))
    offsets = fine_offsets(voxel)
    noise_core = smooth_field(rng, shape.sdf.shape, 1.5)
    noise_rim = smooth_field(rng, shape.sdf.shape, 2.0)
    vein_point = rng.uniform(-1, 1, 3)
    focus_centre = None
    if "focus_ppb" in params:
        depth = sample(shape.sdf, shape.voxels - shape.crop_lo) * shape.scale
        deep = shape.voxels[depth <= -params["focus_radius_mm"]]
        pick = deep[rng.integers(len(deep))] if len(deep) else shape.voxels[int(np.argmin(depth))]
        focus_centre = apply(shape.head_from_mni_vox, pick[None].astype(float))[0]
    ring_k = None
    if "ring_height_mm" in params:
        centre_index = apply(np.linalg.inv(head_from_index), shape.centroid_head[None])[0]
        ring_k = float(np.round(centre_index[2]))
    rim_sum = np.zeros(len(base), dtype=np.float32)
    other_sum = np.zeros(len(base), dtype=np.float32)
    for off in offsets:
        idx = base + off
        head = apply(head_from_index, idx)
        d = shape.distance_mm(head)
        inside = d < 0
        local = apply(shape.mni_vox_from_head, head) - shape.crop_lo
        other = inside * (params["core_ppb"] + params["core_heterogeneity_ppb"] * sample(noise_core, local))
        if "rim_visible_ppb" in params:
            band = np.abs(d - params["rim_shift_mm"]) <= params["rim_thickness_mm"] / 2
            strength = np.maximum(1.0 + params["rim_variation"] * sample(noise_rim, local), 0.0)
            rim = band * strength * _coverage(head, shape.centroid_head, np.asarray(params["rim_axis"]),
                                              params["rim_coverage"])
            if ring_k is not None:
                rim = rim * (np.abs(idx[:, 2] - ring_k) * voxel[2] <= params["ring_height_mm"] / 2)
            rim_sum += rim
        if vein:
            other = other + _vein(head, params, shape, vein_point)
        if focus_centre is not None:
            other = other + (np.linalg.norm(head - focus_centre, axis=1) <= params["focus_radius_mm"]) \
                * params["focus_ppb"]
        other_sum += other
    rim_img = (rim_sum / len(offsets)).reshape(dims)
    other_img = (other_sum / len(offsets)).reshape(dims).astype(np.float32)
    info: dict = {}
    if "rim_visible_ppb" in params and rim_img.max() > 0:
        seen = ndimage.gaussian_filter(rim_img, (psf_sigma_vox, psf_sigma_vox, 0))
        peak = float(np.percentile(seen[seen > 0.05 * seen.max()], 95))
        # A band that partial volume all but erases is not boosted beyond MAX_FINE_PPB (tissue bound).
        scale = min(params["rim_visible_ppb"] / peak, MAX_FINE_PPB)
        rim_img = rim_img * np.float32(scale)
        info["rim_fine_ppb"] = scale
    return Edit(lo, hi, rim_img.astype(np.float32), other_img, info)
