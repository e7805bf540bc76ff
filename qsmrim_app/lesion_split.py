"""Automatic splitting of confluent lesions into "lesion centres" (Dworkin et al., AJNR 2018).

Binary masks and probability maps from automatic segmenters merge neighbouring lesions into a few
large blobs. Dworkin et al. find the lesion centres as the places where the Gaussian-smoothed lesion
map is locally peaked: no eigenvalue of its Hessian is positive. Clusters of such voxels larger
than a minimum size are centres; every other voxel of a connected component takes the label of
its nearest centre; a component with fewer than two centres stays one lesion.

Everything is in physical units (sigma in mm, centre size in mm^3, distances in mm) so the same
lesions give the same split on a 0.5 mm and on a 1 mm grid. The Hessian is computed per connected
component on its bounding box plus the filter's reach, never on the whole volume: at 0.5 mm a
whole-brain Hessian alone would be gigabytes. Within the box the result is identical to filtering
the whole volume (the box holds every voxel the filter reads). A rater's instance map is never
passed here: it is kept as drawn.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

#: Probability maps (and soft 0-1 masks): lesion where the value is >= this (``--lesion-threshold``).
LESION_THRESHOLD = 0.5

#: Gaussian truncation (in sigmas) of the smoothing and derivative filters.
TRUNCATE = 4.0
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


@dataclass(frozen=True)
class SplitParams:
    """The method's knobs, in physical units.

    ``curvature_tolerance`` is in units of 1/sigma^2 of the map's amplitude: an eigenvalue must
    exceed it to count as positive, so flat plateaus inside large binary blobs (where the
    curvature is zero up to rounding) are centres rather than a speckle of rounding noise.
    """

    sigma_mm: float = 1.25
    min_centre_mm3: float = 10.0
    curvature_tolerance: float = 1e-3

    def __post_init__(self) -> None:
        if not self.sigma_mm > 0 or self.min_centre_mm3 < 0 or self.curvature_tolerance < 0:
            raise ValueError(f"invalid split parameters {self}")


@dataclass(frozen=True)
class SplitResult:
    """The lesion instance map (int32, ids 1..n) and which component each split lesion came from.

    ``split_from[lesion_id]`` is the connected-component id (1..n_components in scan order of the
    mask's grid) for lesions cut out of a confluent component; lesions that were not split are absent.
    """

    labels: np.ndarray
    n_components: int
    split_from: dict[int, int] = field(default_factory=dict)

    @property
    def n_lesions(self) -> int:
        return int(self.labels.max(initial=0))

    @property
    def n_split_components(self) -> int:
        return len(set(self.split_from.values()))


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel edge lengths (mm) from a NIfTI affine: the norms of its first three columns."""
    sizes = np.sqrt(np.sum(np.asarray(affine, dtype=float)[:3, :3] ** 2, axis=0))
    return tuple(float(s) for s in sizes)  # type: ignore[return-value]


def _reach(sigma_vox: np.ndarray) -> np.ndarray:
    """Voxels a truncated Gaussian filter reads on each side (scipy's radius), plus one."""
    return np.array([int(TRUNCATE * float(s) + 0.5) + 1 for s in sigma_vox])


def hessian_max_eigenvalue(values: np.ndarray, inside: np.ndarray, zooms: tuple[float, float, float],
                           sigma_mm: float) -> np.ndarray:
    """Largest Hessian eigenvalue (1/mm^2 per map unit) of the Gaussian-smoothed map at ``inside``.

    Derivatives are Gaussian derivative filters (the smoothing and differentiation in one exact
    step) divided by the voxel sizes, so they are per mm whatever the grid.
    """
    zooms_a = np.asarray(zooms, dtype=float)
    sigma_vox = sigma_mm / zooms_a
    data = np.asarray(values, dtype=np.float64)
    hessian = np.empty((int(np.count_nonzero(inside)), 3, 3))
    for a, b in _PAIRS:
        order = [0, 0, 0]
        order[a] += 1
        order[b] += 1
        entry = ndimage.gaussian_filter(data, sigma_vox, order=order, truncate=TRUNCATE)[inside]
        entry /= zooms_a[a] * zooms_a[b]
        hessian[:, a, b] = entry
        hessian[:, b, a] = entry
    if hessian.shape[0] == 0:
        return np.empty(0)
    return np.linalg.eigvalsh(hessian)[:, -1]


def _split_component(values: np.ndarray, component: np.ndarray, zooms: tuple[float, float, float],
                     params: SplitParams, amplitude: float) -> tuple[np.ndarray, int]:
    """Labels 1..k of one component's voxels (0 outside it) inside its padded box, and k."""
    max_eig = hessian_max_eigenvalue(values, component, zooms, params.sigma_mm)
    tolerance = params.curvature_tolerance * amplitude / params.sigma_mm ** 2
    peaks = np.zeros(component.shape, dtype=bool)
    peaks[component] = max_eig <= tolerance
    centres, n = ndimage.label(peaks, structure=_STRUCTURE_26)
    if n >= 2:
        voxel_mm3 = float(np.prod(zooms))
        sizes = np.bincount(centres.ravel(), minlength=n + 1) * voxel_mm3
        keep = np.flatnonzero(sizes >= params.min_centre_mm3)
        keep = keep[keep > 0]
        lut = np.zeros(n + 1, dtype=np.int32)
        lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
        centres = lut[centres]
        n = int(keep.size)
    if n < 2:
        return component.astype(np.int32), 1
    # Every voxel takes the label of its nearest centre voxel (Euclidean, in mm).
    nearest = ndimage.distance_transform_edt(centres == 0, sampling=zooms, return_distances=False,
                                             return_indices=True)
    assigned = centres[tuple(nearest)]
    assigned[~component] = 0
    return assigned.astype(np.int32), n


def split_lesions(values: np.ndarray, zooms: tuple[float, float, float], threshold: float = LESION_THRESHOLD,
                  params: SplitParams = SplitParams()) -> SplitResult:
    """Split the lesion map ``values`` (binary 0/1 or probability 0..1) into lesion centres.

    Lesion voxels are ``values >= threshold`` (for a binary mask any threshold in (0, 1] gives the
    mask); components are 26-connected, as raters draw them. The smoothing runs on ``values`` itself,
    so a probability map splits on its own peaks, which is where the method works best.
    """
    values = np.asarray(values)
    if values.ndim != 3:
        raise ValueError(f"lesion map must be 3-D, got shape {values.shape}")
    values = np.nan_to_num(values.astype(np.float32, copy=False), nan=0.0)
    mask = values >= threshold if threshold > 0 else values > 0
    components, n_components = ndimage.label(mask, structure=_STRUCTURE_26)
    out = np.zeros(values.shape, dtype=np.int32)
    split_from: dict[int, int] = {}
    amplitude = float(values.max(initial=0.0)) or 1.0
    sigma_vox = params.sigma_mm / np.asarray(zooms, dtype=float)
    reach = _reach(sigma_vox)
    next_id = 1
    for comp_id, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        padded = tuple(slice(max(s.start - r, 0), min(s.stop + r, n))
                       for s, r, n in zip(box, reach, values.shape))
        component = components[padded] == comp_id
        labels, k = _split_component(values[padded], component, zooms, params, amplitude)
        target = out[padded]
        target[component] = labels[component] + (next_id - 1)
        if k >= 2:
            for lesion_id in range(next_id, next_id + k):
                split_from[lesion_id] = comp_id
        next_id += k
    return SplitResult(labels=out, n_components=int(n_components), split_from=split_from)


# --------------------------------------------------------------------------------------------
# From a lesion file's values to what the participant workflow carries into the QSM grid
# --------------------------------------------------------------------------------------------
#: What a lesion file holds: a rater's instance map, a 0/1 mask, a 0..1 probability map, or an
#: LST-AI annotated mask (1..4 = lesion location classes, not instances: read as binary).
MASK_KINDS: tuple[str, ...] = ("instances", "binary", "probability", "annotated")
SPLIT_METHODS: tuple[str, ...] = ("auto", "none")


class LesionValueError(ValueError):
    """A lesion file whose values do not fit its kind (the caller adds the file name)."""


@dataclass(frozen=True)
class PreparedLesions:
    """What goes on to the QSM grid: an instance map (split or a rater's) or a 0/1 mask (``none``)."""

    data: np.ndarray
    is_instance_map: bool
    split_from: dict[int, int]
    n_components: int
    messages: tuple[str, ...] = ()


def _describe(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values[:10]) + (" ..." if len(values) > 10 else "")


def prepare_lesions(data: np.ndarray, zooms: tuple[float, float, float], kind: str, split: str = "auto",
                    threshold: float = LESION_THRESHOLD, params: SplitParams = SplitParams()) -> PreparedLesions:
    """Check a lesion file's values for its kind, threshold a probability map, split confluent lesions.

    ``instances`` are returned as they are (a rater's split is never redone). With ``split='none'``
    a binary mask (a thresholded probability map) is returned as 0/1 and becomes lesions by
    26-connected components in the QSM grid, as before splitting existed.
    """
    if kind not in MASK_KINDS or split not in SPLIT_METHODS:
        raise ValueError(f"kind {kind!r} / split {split!r} unknown")
    data = np.asarray(data)
    if kind == "instances":
        return PreparedLesions(data, True, {}, 0)
    values = np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0)
    if kind == "binary":
        extra = sorted(set(np.unique(values).tolist()) - {0.0, 1.0})
        if extra:
            raise LesionValueError(f"binary lesion mask has values other than 0/1: {_describe(extra)} "
                                   "(pass it as an instance map if it holds lesion ids)")
    elif kind == "annotated":
        values = (values > 0).astype(np.float32)
    else:
        low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
        if low < 0 or high > 1:
            raise LesionValueError(f"lesion probability map has values outside 0..1 ({low:g} to {high:g}); "
                                   "rescale it to probabilities")
    if split == "none":
        mask = (values >= threshold) if kind == "probability" and threshold > 0 else (values > 0)
        return PreparedLesions(mask.astype(np.uint8), False, {}, 0)
    result = split_lesions(values, zooms, threshold=threshold if kind == "probability" else 0.5, params=params)
    messages = ()
    if result.split_from:
        messages = (f"{result.n_split_components} confluent component(s) of {result.n_components} split into "
                    f"{len(result.split_from)} lesions (--lesion-split auto: Hessian lesion centres, "
                    f"sigma {params.sigma_mm:g} mm); {result.n_lesions} lesions before --min-lesion-voxels",)
    return PreparedLesions(result.labels, True, result.split_from, result.n_components, messages)
