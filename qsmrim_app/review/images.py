"""Lesion views for the page: planes through the lesion centre, sampled in millimetres, as PNG.

Each view is a plane of world (scanner RAS) coordinates through the lesion's centroid, sampled on a
square grid of ``fov_mm`` millimetres with linear interpolation, so anisotropic voxels (0.75 x 0.75 x
3 mm QSM) show at their true proportions and oblique grids are handled by their affine. Display
follows the radiological convention: the patient's right on the image's left (axial, coronal),
anterior on the left (sagittal), superior/anterior up. QSM is shown in ppb within +-window (bright is
paramagnetic); FLAIR between robust percentiles of the participant's brain.
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from .. import derivatives as drv
from .catalog import ReviewUnit

VIEWS = ("axial", "coronal", "sagittal")
CHANNELS = ("qsm", "flair")
#: For each view: the world axis fixed at the lesion centre, then the axes along image columns and
#: rows with their direction (-1: the coordinate decreases left to right / top to bottom).
_PLANES = {
    "axial": (2, (0, -1), (1, -1)),      # columns R->L, rows A->P
    "coronal": (1, (0, -1), (2, -1)),    # columns R->L, rows S->I
    "sagittal": (0, (1, -1), (2, -1)),   # columns A->P, rows S->I
}
#: Orientation letters at the image's left, right, top and bottom, for the page.
ORIENTATION = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}
OUTLINE_RGB = (255, 210, 0)      # the lesion under review
NEIGHBOUR_RGB = (0, 170, 210)    # other lesions in view
DEFAULT_WINDOW_PPB = 150.0
IMAGE_PX = 256


@dataclass
class Volumes:
    """One unit's arrays on the QSM grid (what every view of its lesions samples)."""

    affine: np.ndarray
    inverse: np.ndarray
    lesions: np.ndarray  # int32 instances
    qsm_ppb: np.ndarray | None
    flair: np.ndarray | None
    flair_range: tuple[float, float]
    qsm_message: str | None
    qsm_window: float = 150.0  # suggested +-window (ppb): the map's robust magnitude in the brain


def _qsm_scale_to_ppb(qsm: np.ndarray, lesions: np.ndarray, patches_file) -> float:
    """1000 for a map in ppm, 1 for ppb, read off the pipeline's own patches (QSM channel in ppb).

    The patches hold the QSM the pipeline used inside each lesion; their typical magnitude against the
    map's at the lesion voxels tells the unit the pipeline applied, including a ``--qsm-units`` override.
    Without lesions or patches, BIDS' ppm is assumed.
    """
    if patches_file is None or not np.any(lesions):
        return 1000.0
    from ..patches import load_patches

    raw = load_patches(patches_file).patches
    patches = raw[:, 0][raw[:, 2] < 0]  # the QSM (ppb) inside each lesion
    in_patch = np.abs(patches[patches != 0])
    in_map = np.abs(qsm[lesions > 0])
    in_map = in_map[np.isfinite(in_map) & (in_map > 0)]
    if in_patch.size == 0 or in_map.size == 0:
        return 1000.0
    ratio = float(np.median(in_patch) / np.median(in_map))
    return 1000.0 if abs(np.log10(ratio) - 3.0) < abs(np.log10(ratio)) else 1.0


def load_volumes(unit: ReviewUnit) -> Volumes:
    image = nib.load(str(unit.lesions_dseg))
    affine = np.asarray(image.affine, dtype=float)
    lesions = np.asarray(image.dataobj).astype(np.int32)
    qsm_ppb, message, window = None, unit.qsm_problem, DEFAULT_WINDOW_PPB
    if unit.qsm is not None:
        qsm_image = nib.load(str(unit.qsm))
        if qsm_image.shape[:3] != lesions.shape:
            message = f"the QSM map {unit.qsm} ({qsm_image.shape}) is not on the lesions' grid {lesions.shape}"
        else:
            qsm = np.asarray(qsm_image.dataobj, dtype=np.float32).reshape(lesions.shape)
            qsm = np.where(np.isfinite(qsm), qsm, 0.0).astype(np.float32)
            qsm_ppb = qsm * np.float32(_qsm_scale_to_ppb(qsm, lesions, unit.patches))
            tissue = np.abs(qsm_ppb[qsm_ppb != 0])
            if tissue.size:
                window = float(np.ceil(np.percentile(tissue, 99.0) / 10.0) * 10.0)
    flair, flair_range = None, (0.0, 1.0)
    if unit.flair is not None:
        flair = np.asarray(nib.load(str(unit.flair)).dataobj, dtype=np.float32)
        flair = np.where(np.isfinite(flair), flair, 0.0).astype(np.float32)
        tissue = flair[flair > 0]
        if tissue.size:
            low, high = np.percentile(tissue, [1.0, 99.5])
            flair_range = (float(low), float(max(high, low + 1e-6)))
    return Volumes(affine, np.linalg.inv(affine), lesions, qsm_ppb, flair, flair_range, message,
                   float(min(max(window, 10.0), 1000.0)))


class VolumeCache:
    """The last few units' volumes (a rater moves through one participant at a time): memory stays bounded."""

    def __init__(self, max_units: int = 3) -> None:
        self._max = max_units
        self._items: OrderedDict[drv.Unit, Volumes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, unit: ReviewUnit) -> Volumes:
        with self._lock:
            if unit.unit in self._items:
                self._items.move_to_end(unit.unit)
                return self._items[unit.unit]
        volumes = load_volumes(unit)  # outside the lock: another tab's view need not wait
        with self._lock:
            self._items[unit.unit] = volumes
            self._items.move_to_end(unit.unit)
            while len(self._items) > self._max:
                self._items.popitem(last=False)
        return volumes


def plane_points(centre_mm, view: str, fov_mm: float, size: int = IMAGE_PX, offset_mm: float = 0.0) -> np.ndarray:
    """World coordinates (3, size, size) of the view's pixel centres, in display order.

    ``offset_mm`` moves the plane along its normal (+z, +y, +x of scanner RAS: towards superior,
    anterior, the patient's right), to page through the lesion and its surroundings.
    """
    fixed, (col_axis, col_dir), (row_axis, row_dir) = _PLANES[view]
    offsets = (np.arange(size) + 0.5) / size * fov_mm - fov_mm / 2.0
    points = np.empty((3, size, size), dtype=np.float64)
    points[fixed] = centre_mm[fixed] + offset_mm
    points[col_axis] = centre_mm[col_axis] + col_dir * offsets[None, :]
    points[row_axis] = centre_mm[row_axis] + row_dir * offsets[:, None]
    return points


def sample(volume: np.ndarray, inverse: np.ndarray, points: np.ndarray, order: int) -> np.ndarray:
    """The volume at world ``points`` (3, H, W): linear for images, nearest for labels; 0 outside."""
    flat = points.reshape(3, -1)
    ijk = inverse[:3, :3] @ flat + inverse[:3, 3:4]
    values = ndimage.map_coordinates(volume, ijk, order=order, mode="constant", cval=0.0, prefilter=False)
    return values.reshape(points.shape[1:])


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def render(volumes: Volumes, centre_mm, lesion_id: int, view: str, channel: str, *, outline: bool = True,
           zoom: float = 1.0, window: float = DEFAULT_WINDOW_PPB, fov_mm: float = 30.0,
           size: int = IMAGE_PX, offset_mm: float = 0.0) -> bytes:
    """PNG bytes of one view; ``fov_mm / zoom`` millimetres across, ``offset_mm`` off the lesion centre."""
    if view not in VIEWS or channel not in CHANNELS:
        raise ValueError(f"view must be one of {VIEWS} and channel one of {CHANNELS}")
    points = plane_points(np.asarray(centre_mm, dtype=float), view, fov_mm / zoom, size, offset_mm)
    source = volumes.qsm_ppb if channel == "qsm" else volumes.flair
    if source is None:
        grey = np.zeros((size, size), dtype=np.uint8)
    else:
        values = sample(source, volumes.inverse, points, order=1)
        if channel == "qsm":
            low, high = -window, window
        else:
            low, high = volumes.flair_range
        grey = (np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    if outline:
        labels = sample(volumes.lesions, volumes.inverse, points, order=0).astype(np.int64)
        others = _outline(labels > 0) & (labels != lesion_id)
        rgb[others] = NEIGHBOUR_RGB
        rgb[_outline(labels == lesion_id)] = OUTLINE_RGB
    _scale_bar(rgb, fov_mm / zoom)
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _scale_bar(rgb: np.ndarray, fov_mm: float) -> None:
    """A 10 mm (or 5 mm / 2 mm when zoomed in) white bar at the bottom left, for size at a glance."""
    size = rgb.shape[1]
    for length in (10.0, 5.0, 2.0, 1.0):
        pixels = int(round(length / fov_mm * size))
        if pixels <= size // 3:
            break
    rgb[size - 8:size - 5, 6:6 + pixels] = (255, 255, 255)


def scale_bar_mm(fov_mm: float, size: int = IMAGE_PX) -> float:
    """The length the bar of :func:`_scale_bar` stands for (shown under the image)."""
    for length in (10.0, 5.0, 2.0, 1.0):
        if int(round(length / fov_mm * size)) <= size // 3:
            return length
    return 1.0
