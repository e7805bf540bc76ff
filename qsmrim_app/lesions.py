"""Lesion instances, rim labels and the per-lesion geometry table, on arrays in the QSM grid.

Everything downstream (patches, radiomics, the classifier, the tables) is keyed by ``lesion_id``;
this module is the one place that decides what a lesion is.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage

#: Lesions (connected components in the QSM grid) smaller than this are ignored (``--min-lesion-voxels``).
MIN_LESION_VOXELS = 10

LOGGER = logging.getLogger(__name__)

GEOMETRY_COLUMNS: tuple[str, ...] = (
    "lesion_id",
    "voxels",
    "volume_mm3",
    "centroid_x_mm",
    "centroid_y_mm",
    "centroid_z_mm",
)
#: Identifier columns of every per-lesion table (geometry first, then where a split lesion came from);
#: every other column of the radiomics table is a feature.
SPLIT_COLUMN = "split_from"
ID_COLUMNS: tuple[str, ...] = GEOMETRY_COLUMNS + (SPLIT_COLUMN,)
#: Rim annotation values (``desc-rim_dseg``): 1 = rim- lesion, 2 = rim+ lesion.
RIM_NEGATIVE, RIM_POSITIVE = 1, 2


class LesionMaskError(ValueError):
    """A lesion mask whose values make no sense (the caller adds the file name)."""


@dataclass(frozen=True)
class LesionInstances:
    """Lesion instance map: int32, 0 background, each lesion one positive id."""

    labels: np.ndarray
    dropped: int
    lesion_ids: tuple[int, ...]


@dataclass(frozen=True)
class RimLabels:
    """Per-lesion rim labels carried from a rim annotation onto the instance map.

    ``labels[id]`` is 1 for rim+, 0 for rim-, absent for lesions with no annotated voxel
    (listed in ``missing``); ``agreement[id]`` is the fraction of annotated voxels that voted
    for the majority; ``disagreeing`` lists lesions with agreement < 1 so the caller can report them.
    """

    labels: dict[int, int]
    agreement: dict[int, float]
    disagreeing: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)

    def label_for(self, lesion_id: int) -> int | None:
        """The 0/1 label of a lesion, None when it had no annotated voxel."""
        return self.labels.get(int(lesion_id))


def _structure_26() -> np.ndarray:
    return np.ones((3, 3, 3), dtype=bool)


def label_instances(mask: np.ndarray, min_voxels: int = MIN_LESION_VOXELS, is_instance_map: bool = False) -> LesionInstances:
    """Turn a lesion mask into an instance map, dropping lesions below ``min_voxels``.

    Binary masks are split into 26-connected components (diagonal neighbours join, as raters draw
    them), numbered 1..n in scan order so ids are deterministic. Instance maps (integer dsegs) keep
    their ids: two touching instances stay two lesions and a disconnected instance stays one.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise LesionMaskError(f"lesion mask must be 3-D, got shape {mask.shape}")
    if min_voxels < 0:
        raise ValueError(f"min_voxels must be >= 0, got {min_voxels}")

    if is_instance_map:
        if not np.issubdtype(mask.dtype, np.integer):
            rounded = np.rint(mask)
            if not np.array_equal(rounded, mask):
                raise LesionMaskError("instance map has non-integer values")
            mask = rounded
        if np.any(mask < 0):
            negative = np.unique(mask[mask < 0]).tolist()[:10]
            raise LesionMaskError(f"instance map has negative values: {negative}")
        labels = mask.astype(np.int32, copy=True)
    else:
        values = np.unique(mask)
        extra = [v for v in values.tolist() if v not in (0, 1)]
        if extra:
            shown = ", ".join(f"{v:g}" for v in extra[:10]) + (" ..." if len(extra) > 10 else "")
            raise LesionMaskError(
                f"binary lesion mask has values other than 0/1: {shown} "
                "(pass it as an instance map if it holds lesion ids)"
            )
        labels, _ = ndimage.label(mask.astype(bool), structure=_structure_26())
        labels = labels.astype(np.int32, copy=False)

    counts = np.bincount(labels.ravel())
    present = np.flatnonzero(counts)
    present = present[present > 0]
    small = present[counts[present] < min_voxels]
    if small.size:
        labels[np.isin(labels, small)] = 0
    kept = present[counts[present] >= min_voxels]

    if not is_instance_map and small.size:
        # Renumber 1..n keeping scan order (ndimage.label numbers in scan order already).
        lut = np.zeros(counts.size, dtype=np.int32)
        lut[kept] = np.arange(1, kept.size + 1, dtype=np.int32)
        labels = lut[labels]
        kept = np.arange(1, kept.size + 1)
    return LesionInstances(labels=labels, dropped=int(small.size), lesion_ids=tuple(int(i) for i in kept))


def carry_rim_labels(instances: np.ndarray, rim_dseg: np.ndarray) -> RimLabels:
    """Give each lesion the majority rim label (1/2 in ``rim_dseg``) of its voxels.

    Annotations are drawn on a different mask than the one we label, so voxels of one lesion may
    disagree; the majority wins (ties go to rim+, the rarer and clinically relevant class) and
    the disagreement is reported rather than hidden.
    """
    instances = np.asarray(instances)
    rim_dseg = np.asarray(rim_dseg)
    if instances.shape != rim_dseg.shape:
        raise ValueError(f"instance map {instances.shape} and rim dseg {rim_dseg.shape} differ in shape")
    unknown = sorted(set(np.unique(rim_dseg).tolist()) - {0, RIM_NEGATIVE, RIM_POSITIVE})
    if unknown:
        raise LesionMaskError(f"rim dseg has values other than 0/1/2: {unknown[:10]}")

    ids = np.asarray(instances, dtype=np.int64).ravel()
    rim = rim_dseg.ravel()
    n = int(ids.max(initial=0)) + 1
    size = np.bincount(ids, minlength=n)
    neg = np.bincount(ids[rim == RIM_NEGATIVE], minlength=n)
    pos = np.bincount(ids[rim == RIM_POSITIVE], minlength=n)

    labels: dict[int, int] = {}
    agreement: dict[int, float] = {}
    disagreeing: list[int] = []
    missing: list[int] = []
    for lesion_id in (int(i) for i in np.flatnonzero(size) if i > 0):
        annotated = int(neg[lesion_id] + pos[lesion_id])
        if annotated == 0:
            missing.append(lesion_id)
            continue
        label = 1 if pos[lesion_id] >= neg[lesion_id] else 0
        labels[lesion_id] = label
        agreement[lesion_id] = float(max(pos[lesion_id], neg[lesion_id]) / annotated)
        if agreement[lesion_id] < 1.0:
            disagreeing.append(lesion_id)
    return RimLabels(labels=labels, agreement=agreement, disagreeing=disagreeing, missing=missing)


def lesion_geometry(instances: np.ndarray, affine: np.ndarray) -> pd.DataFrame:
    """Voxel count, volume and world-space centroid per lesion (the first columns of every table).

    The centroid is the mean voxel index mapped through the NIfTI affine, so it is in the
    scanner/world coordinates that viewers show.
    """
    instances = np.asarray(instances)
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    coords = np.nonzero(instances)  # only lesion voxels: cheap on a mostly empty volume
    ids_per_voxel = instances[coords].astype(np.int64)
    n = int(ids_per_voxel.max(initial=0)) + 1
    counts = np.bincount(ids_per_voxel, minlength=n)
    ids = np.flatnonzero(counts)
    if ids.size == 0:
        return pd.DataFrame(
            {c: pd.Series(dtype="int64" if c in ("lesion_id", "voxels") else "float64") for c in GEOMETRY_COLUMNS}
        )
    index_sums = np.stack([np.bincount(ids_per_voxel, weights=axis, minlength=n) for axis in coords], axis=1)
    centroid_ijk = index_sums[ids] / counts[ids, None]
    centroid_xyz = centroid_ijk @ affine[:3, :3].T + affine[:3, 3]
    voxel_volume = float(abs(np.linalg.det(affine[:3, :3])))
    return pd.DataFrame(
        {
            "lesion_id": ids.astype(np.int64),
            "voxels": counts[ids].astype(np.int64),
            "volume_mm3": counts[ids] * voxel_volume,
            "centroid_x_mm": centroid_xyz[:, 0],
            "centroid_y_mm": centroid_xyz[:, 1],
            "centroid_z_mm": centroid_xyz[:, 2],
        },
        columns=list(GEOMETRY_COLUMNS),
    )


def with_split_from(geometry: pd.DataFrame, split_from: dict[int, int]) -> pd.DataFrame:
    """The geometry table plus ``split_from``: the connected component a split lesion was cut from.

    Lesions that were not split (and every lesion of a rater's instance map) get n/a, so users can
    filter the automatically split lesions in any table.
    """
    table = geometry.copy()
    values = [split_from.get(int(i)) for i in table["lesion_id"]]
    table[SPLIT_COLUMN] = pd.array(values, dtype="Int64")
    return table
