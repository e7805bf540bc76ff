"""Per-lesion patches in physical space (mm), and FLAIR intensity normalisation.

A lesion's neighbourhood is resampled onto a fixed grid in millimetres centred on its centroid, so a
model trained on one scanner's voxel grid sees the same anatomy on another's (a 32x32x16 voxel window
covers 51x51x42 mm on a 1.6x1.6x2.6 mm grid but 24x24x48 mm on the paper's 0.75x0.75x3 mm grid). The
patch axes are the world (RAS+) axes, so head orientation in the file does not matter either.

The stored patch keeps the ingredients, not one masked view: the QSM (ppb) and FLAIR unmasked, the
signed distance to this lesion's boundary (mm, negative inside) and a mask of the other lesions. Which
view the network gets (the paper's lesion-only patch, a margin of tissue, an outline channel, a
referenced QSM) is decided by the model's inputs (:mod:`qsmrim_app.model.inputs`), so one
participant-level run serves every ablation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from .atomic import atomic_path
from .model.inputs import PATCH_EXTENT_MM, PATCH_SPACING_MM

# Extent chosen so that lesions up to ~18 mm across keep a 3 mm margin (most MS lesions are far
# smaller), isotropic so that the acquisition orientation does not matter; the in-plane spacing is
# the paper's 0.75 mm and the through-plane spacing half its 3 mm slice. That gives a 32x32x16 grid:
# the paper's network input size and compute.
DEFAULT_EXTENT_MM: tuple[float, float, float] = PATCH_EXTENT_MM  # defined once, with the model's inputs
DEFAULT_SPACING_MM: tuple[float, float, float] = PATCH_SPACING_MM
RAW_CHANNELS: tuple[str, ...] = ("qsm_ppb", "flair", "signed_distance_mm", "other_lesions")
PATCHES_FORMAT = 2  # 1: voxel windows, 2 channels, masked (qsmrim 0.1)


@dataclass(frozen=True)
class PatchGrid:
    """A patch of ``extent_mm`` sampled every ``spacing_mm`` along the world axes (x, y, z)."""

    extent_mm: tuple[float, float, float] = DEFAULT_EXTENT_MM
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM

    def __post_init__(self) -> None:
        extent = tuple(float(v) for v in self.extent_mm)
        spacing = tuple(float(v) for v in self.spacing_mm)
        object.__setattr__(self, "extent_mm", extent)
        object.__setattr__(self, "spacing_mm", spacing)
        if len(extent) != 3 or len(spacing) != 3 or min(extent) <= 0 or min(spacing) <= 0:
            raise ValueError(f"patch extent {extent} and spacing {spacing} need 3 positive values in mm")
        ratio = np.asarray(extent) / np.asarray(spacing)
        if np.any(np.abs(ratio - np.round(ratio)) > 1e-6) or np.any(np.round(ratio) < 4):
            raise ValueError(f"patch extent {extent} mm must be a whole multiple (>= 4) of the spacing {spacing} mm")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(round(e / s)) for e, s in zip(self.extent_mm, self.spacing_mm))

    def offsets_mm(self) -> np.ndarray:
        """(3, X, Y, Z) sample positions relative to the centre, symmetric about it."""
        axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(self.shape, self.spacing_mm)]
        return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float64)

    def to_dict(self) -> dict:
        return {"extent_mm": list(self.extent_mm), "spacing_mm": list(self.spacing_mm), "shape": list(self.shape)}


@dataclass(frozen=True)
class PatchSet:
    """Patches (N, 4, *grid.shape) float32 in ``lesion_ids`` order (channels: ``RAW_CHANNELS``).

    ``reference`` (N, 2) is each lesion's local reference tissue (median, robust scale) in ppb;
    ``cropped`` lists lesions with voxels outside the patch extent.
    """

    patches: np.ndarray
    lesion_ids: np.ndarray
    grid: PatchGrid = field(default_factory=PatchGrid)
    reference: np.ndarray | None = None
    cropped: list[int] = field(default_factory=list)

    @property
    def voxel_size_mm(self) -> np.ndarray:
        """The patch's own sampling (what augmentation and blur sigmas in mm refer to)."""
        return np.asarray(self.grid.spacing_mm, dtype=np.float32)


def normalise_flair(
    flair: np.ndarray, brain_mask: np.ndarray | None = None, lesion_mask: np.ndarray | None = None
) -> np.ndarray:
    """Robust z-score of FLAIR against normal-appearing tissue.

    FLAIR intensities are in arbitrary scanner units, so the paper normalises per subject. We use
    the median and the IQR-derived scale (IQR / 1.349, the normal-consistent sigma) of the brain
    excluding lesions: lesions and the skull-stripping edge are outliers a mean/std would chase.
    Without a brain mask, non-zero finite voxels stand in for the brain (skull-stripped input).
    """
    flair = np.asarray(flair, dtype=np.float32)
    finite = np.isfinite(flair)
    if brain_mask is None:
        reference = finite & (flair != 0)
    else:
        if brain_mask.shape != flair.shape:
            raise ValueError(f"brain mask {brain_mask.shape} and FLAIR {flair.shape} differ in shape")
        reference = finite & (np.asarray(brain_mask) > 0)
    if lesion_mask is not None:
        if lesion_mask.shape != flair.shape:
            raise ValueError(f"lesion mask {lesion_mask.shape} and FLAIR {flair.shape} differ in shape")
        reference &= np.asarray(lesion_mask) == 0
    values = flair[reference]
    if values.size < 2:
        raise ValueError("FLAIR normalisation needs normal-appearing tissue, but the reference region is empty")
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    scale = (q75 - q25) / 1.349
    if not np.isfinite(scale) or scale <= 0:
        # Degenerate (e.g. constant) tissue: fall back to the median absolute deviation, then 1.
        scale = 1.4826 * float(np.median(np.abs(values - median)))
        if scale <= 0:
            scale = 1.0
    out = (flair - np.float32(median)) / np.float32(scale)
    out[~finite] = 0.0
    return out.astype(np.float32, copy=False)


def lesion_centroids_vox(instances: np.ndarray, lesion_ids: Sequence[int]) -> np.ndarray:
    """(N, 3) centre of mass of each lesion in voxel indices (one pass over the volume)."""
    ids = np.asarray(list(lesion_ids), dtype=np.int64)
    if ids.size == 0:
        return np.zeros((0, 3))
    present = set(np.unique(instances).tolist())
    missing = [int(i) for i in ids if int(i) not in present]
    if missing:
        raise ValueError(f"lesions {missing} are not in the instance map")
    return np.asarray(ndimage.center_of_mass(np.ones(instances.shape, np.float32), instances, ids.tolist()),
                      dtype=np.float64).reshape(-1, 3)


def _sample(volume: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    return ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0, prefilter=False)


def signed_distance_mm(inside: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """Distance to the boundary of ``inside`` in mm: positive outside, negative inside."""
    if not inside.any():
        return np.full(inside.shape, np.inf, np.float32)
    outside_d = ndimage.distance_transform_edt(~inside, sampling=spacing_mm)
    inside_d = ndimage.distance_transform_edt(inside, sampling=spacing_mm)
    return (outside_d - inside_d).astype(np.float32)


def extract_patches(
    qsm_ppb: np.ndarray,
    flair_norm: np.ndarray,
    instances: np.ndarray,
    lesion_ids: Sequence[int],
    affine: np.ndarray,
    grid: PatchGrid = PatchGrid(),
) -> PatchSet:
    """Resample each lesion's neighbourhood onto ``grid`` around its centroid (world axes, mm).

    QSM and FLAIR are interpolated linearly; the lesion is the 0.5 level of its linearly interpolated
    indicator (smoother than nearest neighbour when 3 mm slices are sampled at 1.5 mm), the other
    lesions likewise. Each lesion is sampled from a crop around its patch, never the whole volume.
    """
    qsm_ppb = np.asarray(qsm_ppb, dtype=np.float32)
    flair_norm = np.asarray(flair_norm, dtype=np.float32)
    instances = np.asarray(instances)
    if not (qsm_ppb.shape == flair_norm.shape == instances.shape) or qsm_ppb.ndim != 3:
        raise ValueError(
            f"QSM {qsm_ppb.shape}, FLAIR {flair_norm.shape} and instances {instances.shape} must share the QSM grid")
    affine = np.asarray(affine, dtype=np.float64)
    ids = np.asarray(list(lesion_ids), dtype=np.int32)
    out = np.zeros((ids.size, len(RAW_CHANNELS), *grid.shape), dtype=np.float32)
    cropped: list[int] = []
    if ids.size == 0:
        return PatchSet(out, ids, grid, np.zeros((0, 2), np.float32), cropped)
    centroids = lesion_centroids_vox(instances, ids)
    to_vox = np.linalg.inv(affine)
    offsets = grid.offsets_mm().reshape(3, -1)
    half = np.asarray(grid.extent_mm) / 2.0
    boxes = ndimage.find_objects(instances.astype(np.int32, copy=False), max_label=int(ids.max()))
    shape = np.asarray(instances.shape)
    for n, (lesion_id, cvox) in enumerate(zip(ids.tolist(), centroids)):
        centre = affine[:3, :3] @ cvox + affine[:3, 3]
        coords = to_vox[:3, :3] @ (centre[:, None] + offsets) + to_vox[:3, 3:4]
        lo = np.clip(np.floor(coords.min(axis=1)).astype(int) - 1, 0, shape - 1)
        hi = np.clip(np.ceil(coords.max(axis=1)).astype(int) + 2, lo + 1, shape)
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        local = coords - lo[:, None]
        labels = instances[crop]
        this = (labels == lesion_id).astype(np.float32)
        other = ((labels > 0) & (labels != lesion_id)).astype(np.float32)
        inside = _sample(this, local, 1) >= 0.5
        if not inside.any():  # a lesion thinner than the sampling: nearest neighbour, then the centre
            inside = _sample(this, local, 0) >= 0.5
            if not inside.any():
                inside[np.argmin(np.sum(offsets ** 2, axis=0))] = True
        inside = inside.reshape(grid.shape)
        out[n, 0] = _sample(qsm_ppb[crop], local, 1).reshape(grid.shape)
        out[n, 1] = _sample(flair_norm[crop], local, 1).reshape(grid.shape)
        out[n, 2] = signed_distance_mm(inside, grid.spacing_mm)
        out[n, 3] = ((_sample(other, local, 1) >= 0.5).reshape(grid.shape) & ~inside).astype(np.float32)
        box = boxes[lesion_id - 1]
        vox = np.argwhere(instances[box] == lesion_id) + np.asarray([s.start for s in box])
        world = vox @ affine[:3, :3].T + affine[:3, 3]
        if np.any(np.abs(world - centre) > half):
            cropped.append(int(lesion_id))
    return PatchSet(out, ids, grid, None, cropped)


def save_patches(path: str | os.PathLike, patchset: PatchSet, qsm_voxel_size_mm: Sequence[float]) -> Path:
    """Write the ``.npz`` patches contract atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"patches file must end in .npz: {path}")
    patches = np.asarray(patchset.patches, dtype=np.float32)
    ids = np.asarray(patchset.lesion_ids, dtype=np.int32)
    if patches.ndim != 5 or patches.shape[1] != len(RAW_CHANNELS) or patches.shape[0] != ids.size:
        raise ValueError(f"patches must be (N, {len(RAW_CHANNELS)}, X, Y, Z) matching {ids.size} lesion ids, "
                         f"got {patches.shape}")
    if tuple(patches.shape[2:]) != patchset.grid.shape:
        raise ValueError(f"patches {patches.shape[2:]} do not match the grid {patchset.grid.shape}")
    reference = patchset.reference
    if reference is None or np.asarray(reference).shape != (ids.size, 2):
        raise ValueError("patches need each lesion's reference (median, scale) in ppb")
    voxel = np.asarray(qsm_voxel_size_mm, dtype=np.float32)
    if voxel.shape != (3,):
        raise ValueError(f"voxel size must have 3 values, got {voxel.shape}")
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(
            handle, patches=patches, lesion_id=ids, reference=np.asarray(reference, np.float32),
            extent_mm=np.asarray(patchset.grid.extent_mm, np.float32),
            spacing_mm=np.asarray(patchset.grid.spacing_mm, np.float32), qsm_voxel_size_mm=voxel,
            channels=np.asarray(RAW_CHANNELS), format_version=np.int32(PATCHES_FORMAT))
    return path


def load_patches(path: str | os.PathLike) -> PatchSet:
    """Read a patches ``.npz`` written by :func:`save_patches`, refusing older formats clearly."""
    with np.load(Path(path), allow_pickle=False) as data:
        if "format_version" not in data.files:
            raise ValueError(f"{path} holds voxel-window patches from qsmrim 0.1; rerun the participant level "
                             "(the patches are now resampled in mm with their surrounding tissue)")
        missing = {"patches", "lesion_id", "reference", "extent_mm", "spacing_mm"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: patches file lacks {sorted(missing)}")
        patches = data["patches"].astype(np.float32, copy=False)
        ids = data["lesion_id"].astype(np.int32, copy=False)
        reference = data["reference"].astype(np.float32, copy=False)
        grid = PatchGrid(tuple(data["extent_mm"].tolist()), tuple(data["spacing_mm"].tolist()))
    if patches.ndim != 5 or patches.shape[0] != ids.size or patches.shape[1] != len(RAW_CHANNELS):
        raise ValueError(f"{path}: patches {patches.shape} do not match {ids.size} lesion ids")
    return PatchSet(patches, ids, grid, reference, [])
