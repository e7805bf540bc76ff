"""Each lesion's local reference tissue on the QSM: what a rater compares a rim against.

QSM values are relative by nature: reconstructions differ in offset (the reference region of the
dipole inversion) and in scale (TKD underestimates, MEDI regularises). A rater judges a rim against the
surrounding white matter, so the model does too: the reference of a lesion is the lesion-free brain in
a shell ``inner_mm``..``outer_mm`` from its boundary, with vein-like outliers removed, summarised by a
median and a robust scale (1.4826 x MAD). The app has no tissue segmentation; the shell around a
white-matter lesion is mostly white matter, which is what the rater looks at.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

INNER_MM = 3.0
OUTER_MM = 10.0
MIN_VOXELS = 30  # fewer reference voxels than this: fall back to the whole brain's reference
OUTLIER_SIGMAS = 3.0  # veins (strongly paramagnetic) and streaks beyond this are not reference tissue
MIN_SCALE_PPB = 1.0  # below any real QSM's precision; keeps noise-free phantoms finite


def robust_location_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 x MAD after removing outliers beyond ``OUTLIER_SIGMAS`` (one pass)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    median = float(np.median(values))
    mad = 1.4826 * float(np.median(np.abs(values - median)))
    if mad > 0:
        values = values[np.abs(values - median) <= OUTLIER_SIGMAS * mad]
        median = float(np.median(values))
        mad = 1.4826 * float(np.median(np.abs(values - median)))
    return median, max(mad, MIN_SCALE_PPB)


def brain_reference(qsm_ppb: np.ndarray, brain_mask: np.ndarray, instances: np.ndarray) -> tuple[float, float]:
    """The whole lesion-free brain's reference (the fallback for lesions with too little tissue around)."""
    region = (np.asarray(brain_mask) > 0) & (np.asarray(instances) == 0) & np.isfinite(qsm_ppb)
    if not region.any():
        region = np.isfinite(qsm_ppb) & (qsm_ppb != 0)
    return robust_location_scale(np.asarray(qsm_ppb)[region])


def local_references(
    qsm_ppb: np.ndarray,
    instances: np.ndarray,
    brain_mask: np.ndarray,
    lesion_ids: Sequence[int],
    voxel_size_mm: Sequence[float],
    inner_mm: float = INNER_MM,
    outer_mm: float = OUTER_MM,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) reference (median, scale) in ppb per lesion, and (N,) the number of voxels it used.

    Work is per lesion on its bounding box plus ``outer_mm`` (distances in mm, so the shell is the
    same on any grid); lesions whose shell has fewer than ``MIN_VOXELS`` voxels get the brain's.
    """
    qsm_ppb = np.asarray(qsm_ppb, dtype=np.float32)
    instances = np.asarray(instances)
    brain = np.asarray(brain_mask) > 0
    spacing = np.asarray(voxel_size_mm, dtype=np.float64)
    ids = [int(i) for i in lesion_ids]
    out = np.zeros((len(ids), 2), dtype=np.float32)
    counts = np.zeros(len(ids), dtype=np.int64)
    if not ids:
        return out, counts
    pad = np.ceil(outer_mm / spacing).astype(int) + 1
    boxes = ndimage.find_objects(instances.astype(np.int32, copy=False), max_label=max(ids))
    fallback: tuple[float, float] | None = None
    for n, lesion_id in enumerate(ids):
        box = boxes[lesion_id - 1]
        crop = tuple(slice(max(s.start - p, 0), min(s.stop + p, dim))
                     for s, p, dim in zip(box, pad, instances.shape))
        labels = instances[crop]
        distance = ndimage.distance_transform_edt(labels != lesion_id, sampling=spacing)
        shell = (distance >= inner_mm) & (distance <= outer_mm) & (labels == 0) & brain[crop]
        values = qsm_ppb[crop][shell]
        values = values[np.isfinite(values)]
        counts[n] = values.size
        if values.size >= MIN_VOXELS:
            out[n] = robust_location_scale(values)
        else:
            if fallback is None:
                fallback = brain_reference(qsm_ppb, brain, instances)
            out[n] = fallback
    return out, counts
