"""Per-lesion two-channel patches (QSM ppb, normalised FLAIR) and FLAIR intensity normalisation.

QSMRim-Net looks at each lesion through a fixed 32x32x16 window centred on it with everything
outside that lesion zeroed, so the network sees the lesion and its rim, not its neighbours.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

DEFAULT_PATCH_SIZE: tuple[int, int, int] = (32, 32, 16)


@dataclass(frozen=True)
class PatchSet:
    """Patches (N, 2, *size) float32 in ``lesion_ids`` order; ``cropped`` lists lesions that lost voxels."""

    patches: np.ndarray
    lesion_ids: np.ndarray
    cropped: list[int] = field(default_factory=list)
    voxel_size_mm: np.ndarray | None = None


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


def _window(center: int, size: int) -> tuple[int, int]:
    """Start/stop of a ``size`` window around ``center`` (the centre voxel at index size // 2)."""
    start = center - size // 2
    return start, start + size


def extract_patches(
    qsm_ppb: np.ndarray,
    flair_norm: np.ndarray,
    instances: np.ndarray,
    lesion_ids: Sequence[int],
    size: tuple[int, int, int] = DEFAULT_PATCH_SIZE,
) -> PatchSet:
    """Cut a masked two-channel patch around each lesion's (rounded) centre of mass.

    Only the voxels of that lesion are kept (a confluent neighbour with another id is zeroed),
    the volume edge is zero-padded, and lesions that do not fit (bounding box larger than the
    patch, or so lopsided that voxels fall outside the centred window) are cropped around the
    centre and listed in ``cropped`` for the caller to warn about. Work is done per
    lesion on its own slice, never on the full volume.
    """
    qsm_ppb = np.asarray(qsm_ppb)
    flair_norm = np.asarray(flair_norm)
    instances = np.asarray(instances)
    if not (qsm_ppb.shape == flair_norm.shape == instances.shape):
        raise ValueError(
            f"QSM {qsm_ppb.shape}, FLAIR {flair_norm.shape} and instances {instances.shape} must share the QSM grid"
        )
    size = tuple(int(s) for s in size)
    ids = np.asarray(list(lesion_ids), dtype=np.int32)
    out = np.zeros((ids.size, 2, *size), dtype=np.float32)
    cropped: list[int] = []
    if ids.size == 0:
        return PatchSet(patches=out, lesion_ids=ids, cropped=cropped)

    # One pass over the volume for all bounding boxes (find_objects indexes by label value).
    boxes = ndimage.find_objects(instances, max_label=int(ids.max()))
    shape = instances.shape
    for n, lesion_id in enumerate(ids.tolist()):
        box = boxes[lesion_id - 1] if 0 < lesion_id <= len(boxes) else None
        if box is None:
            raise ValueError(f"lesion {lesion_id} is not in the instance map")
        inside = instances[box] == lesion_id
        com = ndimage.center_of_mass(inside)
        center = [int(np.floor(c + 0.5)) + sl.start for c, sl in zip(com, box)]
        src, dst = [], []
        for c, s, dim in zip(center, size, shape):
            start, stop = _window(c, s)
            lo, hi = max(start, 0), min(stop, dim)
            src.append(slice(lo, hi))
            dst.append(slice(lo - start, hi - start))
        src_t, dst_t = tuple(src), tuple(dst)
        keep = instances[src_t] == lesion_id
        out[(n, 0, *dst_t)] = np.where(keep, qsm_ppb[src_t], 0.0)
        out[(n, 1, *dst_t)] = np.where(keep, flair_norm[src_t], 0.0)
        if np.count_nonzero(keep) < np.count_nonzero(inside):
            cropped.append(int(lesion_id))
    return PatchSet(patches=out, lesion_ids=ids, cropped=cropped)


def save_patches(path: str | os.PathLike, patchset: PatchSet, voxel_size_mm: Sequence[float]) -> Path:
    """Write the ``.npz`` patches contract atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"patches file must end in .npz: {path}")
    patches = np.asarray(patchset.patches, dtype=np.float32)
    ids = np.asarray(patchset.lesion_ids, dtype=np.int32)
    if patches.ndim != 5 or patches.shape[1] != 2 or patches.shape[0] != ids.size:
        raise ValueError(f"patches must be (N, 2, X, Y, Z) matching {ids.size} lesion ids, got {patches.shape}")
    voxel = np.asarray(voxel_size_mm, dtype=np.float32)
    if voxel.shape != (3,):
        raise ValueError(f"voxel_size_mm must have 3 values, got {voxel.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, patches=patches, lesion_id=ids, voxel_size_mm=voxel)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_patches(path: str | os.PathLike) -> PatchSet:
    """Read a patches ``.npz`` written by :func:`save_patches`, checking the contract."""
    with np.load(Path(path), allow_pickle=False) as data:
        missing = {"patches", "lesion_id", "voxel_size_mm"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: patches file lacks {sorted(missing)}")
        patches = data["patches"].astype(np.float32, copy=False)
        ids = data["lesion_id"].astype(np.int32, copy=False)
        voxel = data["voxel_size_mm"].astype(np.float32, copy=False)
    if patches.ndim != 5 or patches.shape[0] != ids.size:
        raise ValueError(f"{path}: patches {patches.shape} do not match {ids.size} lesion ids")
    return PatchSet(patches=patches, lesion_ids=ids, cropped=[], voxel_size_mm=voxel)
