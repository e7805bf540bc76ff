"""The 527 pyradiomics features per lesion on the QSM (ppb), as in QSMRim-Net.

Parameters are data (``data/radiomics.yaml``), validated once by :func:`load_params`. Each lesion is
cut to its bounding box plus :data:`CROP_MARGIN` voxels before pyradiomics sees it: pyradiomics
otherwise wavelet-filters the whole volume once per lesion, which dominates the run time. The
margin is chosen so that the cropped values are bit-identical to whole-volume extraction (see
:data:`CROP_MARGIN`).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import yaml
from scipy import ndimage

from .config import RADIOMICS_PARAMS

LOGGER = logging.getLogger(__name__)

#: Features in the bundled configuration: 9 image types x (18 firstorder + 23 glcm + 16 glrlm) + 14 shape.
N_FEATURES = 527
#: pyradiomics' level-1 wavelet decompositions, in the order we name the columns.
WAVELET_BANDS: tuple[str, ...] = ("LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH", "LLL")
#: Voxels kept around each lesion's bounding box. pyradiomics' stationary wavelet transform is
#: circular over whatever image it is given, so a crop changes the filtered values within the
#: coif1 filter's reach (6 taps) of the crop border. Measured on 24 real lesions painted onto a real
#: QSM (tests/test_radiomics.py, benchmarks/bench_radiomics.py): margins 1-2 change wavelet features,
#: margins >= 3 give bit-identical values to whole-volume extraction. We keep pyradiomics'
#: padDistance (5) for two voxels of safety; it costs little.
CROP_MARGIN = 5

_SUPPORTED_CLASSES = ("firstorder", "glcm", "glrlm", "shape")
_SUPPORTED_IMAGE_TYPES = ("Original", "Wavelet")
# Settings that would change which voxels or which names we get; we do not support them.
_FORBIDDEN_SETTINGS = ("resampledPixelSpacing", "force2D", "resegmentRange")


class RadiomicsConfigError(ValueError):
    """The radiomics parameter file is not one we can run (raised once, at start)."""


def _quiet_pyradiomics() -> None:
    """pyradiomics logs every step at INFO; keep only warnings in our logs."""
    for name in ("radiomics", "pykwalify"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _feature_class_names(cls_name: str, wanted: Sequence[str] | None) -> list[str]:
    """Enabled feature names of a class: the listed ones, or all non-deprecated ones (sorted)."""
    from radiomics import getFeatureClasses

    available = getFeatureClasses()[cls_name].getFeatureNames()  # name -> deprecated?
    if not wanted:
        return sorted(name for name, deprecated in available.items() if not deprecated)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise RadiomicsConfigError(f"featureClass {cls_name}: unknown features {unknown}")
    deprecated = [name for name in wanted if available[name]]
    if deprecated:
        raise RadiomicsConfigError(f"featureClass {cls_name}: deprecated features {deprecated}")
    if len(set(wanted)) != len(wanted):
        raise RadiomicsConfigError(f"featureClass {cls_name}: duplicated feature names")
    return sorted(wanted)


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check a parameter dict against pyradiomics' schema and what this module supports.

    Returns a normalised deep copy. Fails fast with a message naming the problem, so a bad file
    stops the app at start rather than after hours of preprocessing.
    """
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    _quiet_pyradiomics()
    if not isinstance(params, dict):
        raise RadiomicsConfigError(f"radiomics parameters must be a mapping, got {type(params).__name__}")
    params = copy.deepcopy(params)
    params.setdefault("imageType", {"Original": {}})
    params.setdefault("featureClass", {})
    params.setdefault("setting", {})
    for key in ("imageType", "featureClass", "setting"):
        if params[key] is None:
            params[key] = {}
    try:
        RadiomicsFeatureExtractor(params)  # pykwalify validation against pyradiomics' schema
    except Exception as err:  # pykwalify raises its own SchemaError type
        raise RadiomicsConfigError(f"radiomics parameters rejected by pyradiomics: {err}") from err

    unknown_types = sorted(set(params["imageType"]) - set(_SUPPORTED_IMAGE_TYPES))
    if unknown_types:
        raise RadiomicsConfigError(f"imageType {unknown_types} not supported (use {list(_SUPPORTED_IMAGE_TYPES)})")
    wavelet = params["imageType"].get("Wavelet")
    if wavelet is not None and set(wavelet or {}) - {"wavelet"}:
        raise RadiomicsConfigError("Wavelet: only the 'wavelet' name may be customised (level 1, start_level 0)")
    unknown_classes = sorted(set(params["featureClass"]) - set(_SUPPORTED_CLASSES))
    if unknown_classes or not params["featureClass"]:
        raise RadiomicsConfigError(
            f"featureClass must be a non-empty subset of {list(_SUPPORTED_CLASSES)}, got {list(params['featureClass'])}"
        )
    for cls_name, wanted in params["featureClass"].items():
        params["featureClass"][cls_name] = _feature_class_names(cls_name, wanted)
    for key in _FORBIDDEN_SETTINGS:
        if params["setting"].get(key):
            raise RadiomicsConfigError(f"setting {key} is not supported: features are computed on the QSM grid as is")
    if params["setting"].get("label", 1) != 1:
        raise RadiomicsConfigError("setting label must be 1: each lesion is passed as its own binary mask")
    params["setting"]["label"] = 1
    params["setting"]["additionalInfo"] = False  # diagnostics are not features
    return params


def load_params(path: str | os.PathLike = RADIOMICS_PARAMS) -> dict[str, Any]:
    """Read and validate the radiomics YAML once; the result is what the other functions take."""
    path = Path(path)
    try:
        with path.open() as handle:
            params = yaml.safe_load(handle)
    except OSError as err:
        raise RadiomicsConfigError(f"cannot read radiomics parameters {path}: {err}") from err
    except yaml.YAMLError as err:
        raise RadiomicsConfigError(f"radiomics parameters {path} are not valid YAML: {err}") from err
    try:
        return validate_params(params)
    except RadiomicsConfigError as err:
        raise RadiomicsConfigError(f"{path}: {err}") from err


def _image_type_prefixes(params: dict[str, Any]) -> list[str]:
    prefixes = []
    if "Original" in params["imageType"]:
        prefixes.append("original")
    if "Wavelet" in params["imageType"]:
        prefixes.extend(f"wavelet-{band}" for band in WAVELET_BANDS)
    return prefixes


def feature_names(params: dict[str, Any]) -> list[str]:
    """Column names in a stable order: shape first, then per image type firstorder, glcm, glrlm."""
    classes = params["featureClass"]
    names = []
    if "shape" in classes:
        names.extend(f"original_shape_{f}" for f in _feature_class_names("shape", classes["shape"]))
    for prefix in _image_type_prefixes(params):
        for cls_name in ("firstorder", "glcm", "glrlm"):
            if cls_name in classes:
                names.extend(f"{prefix}_{cls_name}_{f}" for f in _feature_class_names(cls_name, classes[cls_name]))
    return names


def lesion_boxes(
    instances: np.ndarray, lesion_ids: Iterable[int], margin: int = CROP_MARGIN
) -> dict[int, tuple[slice, ...]]:
    """Bounding box + ``margin`` of each lesion, in one pass over the volume.

    Along an axis where the margin would leave the volume, the whole axis is kept: the wavelet
    transform wraps around the image, so only then does the crop see the same neighbours as the
    whole volume.
    """
    ids = [int(i) for i in lesion_ids]
    if not ids:
        return {}
    objects = ndimage.find_objects(np.asarray(instances), max_label=max(ids))
    boxes = {}
    for lesion_id in ids:
        box = objects[lesion_id - 1] if 0 < lesion_id <= len(objects) else None
        if box is None:
            raise ValueError(f"lesion {lesion_id} is not in the instance map")
        padded = []
        for sl, dim in zip(box, instances.shape):
            lo, hi = sl.start - margin, sl.stop + margin
            padded.append(slice(0, dim) if lo < 0 or hi > dim else slice(lo, hi))
        boxes[lesion_id] = tuple(padded)
    return boxes


#: Grey levels (bins) above which a lesion is refused before pyradiomics runs. Real QSM lesions in
#: ppb span tens of bins of width 25; a ppb map declared ppm (x1000) spans tens of thousands, and
#: pyradiomics' GLCM (bins x bins x 13 angles, float64) then needs tens of GB per lesion.
MAX_BINS = 1000
_GLCM_ANGLES = 13


class RadiomicsInputError(ValueError):
    """A lesion whose values pyradiomics cannot discretise within bounded memory (bad units, mostly)."""


class RadiomicsWorkerError(RuntimeError):
    """A process of the feature-extraction pool died (killed by the kernel, usually for memory)."""


def pyradiomics_bins(lo: float, hi: float, bin_width: float) -> int:
    """Grey levels pyradiomics uses for values in [lo, hi] with a fixed bin width.

    Mirrors ``radiomics.imageoperations.getBinEdges``: edges from ``lo - lo % w`` to ``hi + 2w`` in
    steps of ``w`` (computed arithmetically, so a huge range costs nothing here).
    """
    low = lo - (lo % bin_width)
    return max(1, int(np.ceil((hi + 2 * bin_width - low) / bin_width)) - 1)


def _band_gain(wavelet: str) -> float:
    """Bound on how much a level-1 3-D band can stretch a value range: the product of the three
    1-D filters' L1 norms (the largest over low/high pass)."""
    import pywt

    w = pywt.Wavelet(wavelet)
    return max(float(np.abs(w.dec_lo).sum()), float(np.abs(w.dec_hi).sum())) ** 3


def _exact_band_ranges(image: np.ndarray, mask: np.ndarray, spacing, params: dict[str, Any]):
    """(band name, min, max) inside the lesion of each wavelet band, computed as pyradiomics does."""
    from radiomics import imageoperations

    settings = dict(params["setting"])
    settings.update(params["imageType"].get("Wavelet") or {})
    sitk_mask = _to_sitk(mask, spacing)
    for band_image, name, _ in imageoperations.getWaveletImage(_to_sitk(image, spacing), sitk_mask, **settings):
        import SimpleITK as sitk

        values = np.transpose(sitk.GetArrayFromImage(band_image))[mask > 0]
        yield name, float(values.min()), float(values.max())


def check_discretisation(qsm_ppb: np.ndarray, instances: np.ndarray, boxes: dict[int, tuple[slice, ...]],
                         spacing, params: dict[str, Any], max_bins: int = MAX_BINS) -> None:
    """Refuse, before pyradiomics runs, a lesion that would need more than ``max_bins`` grey levels.

    Checks the original image (exact) and the wavelet bands (a cheap bound from the filters'
    gain; only a lesion over the bound gets its bands computed exactly). ``binCount`` settings fix
    the number of bins, so they are always safe.
    """
    setting = params["setting"]
    if setting.get("binCount"):
        return
    width = float(setting.get("binWidth", 25))
    wavelet = params["imageType"].get("Wavelet", None) if "Wavelet" in params["imageType"] else None
    gain = _band_gain((wavelet or {}).get("wavelet", "coif1")) if "Wavelet" in params["imageType"] else 0.0
    for lesion_id, box in boxes.items():
        crop = qsm_ppb[box]
        mask = instances[box] == lesion_id
        values = crop[mask]
        lo, hi = float(values.min()), float(values.max())
        checks = [("original", lo, hi)]
        if gain and gain * float(crop.max() - crop.min()) / width + 2 > max_bins:
            checks += list(_exact_band_ranges(np.ascontiguousarray(crop), mask.astype(np.uint8), spacing, params))
        for band, band_lo, band_hi in checks:
            bins = pyradiomics_bins(band_lo, band_hi, width)
            if bins > max_bins:
                glcm_gb = bins * bins * _GLCM_ANGLES * 8 / 1024**3
                raise RadiomicsInputError(
                    f"lesion {lesion_id} ({int(mask.sum())} voxels, crop {'x'.join(map(str, crop.shape))}) would need "
                    f"{bins} grey levels on the {band} image (values {band_lo:.6g}..{band_hi:.6g} ppb in the lesion "
                    f"{'' if band == 'original' else '(lesion values ' + f'{lo:.6g}..{hi:.6g} ppb) '}at bin width "
                    f"{width:g}; pyradiomics' GLCM alone would need {glcm_gb:.1f} GB); real QSM lesions need tens "
                    f"of bins (the limit is {max_bins})")


_WORKER_EXTRACTORS: dict[str, Any] = {}


def _extractor(params: dict[str, Any]):
    """One pyradiomics extractor per process and parameter set (building one validates the schema)."""
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    key = json.dumps(params, sort_keys=True)
    if key not in _WORKER_EXTRACTORS:
        _quiet_pyradiomics()
        _WORKER_EXTRACTORS[key] = RadiomicsFeatureExtractor(params)
    return _WORKER_EXTRACTORS[key]


def _to_sitk(array: np.ndarray, spacing_mm: Sequence[float]):
    """(i, j, k) array -> SimpleITK image with x=i, y=j, z=k, as SimpleITK reads a NIfTI.

    The axis order matters for the shape features named after slices/rows/columns; origin and
    direction do not affect any feature, spacing does (shape, through the mesh).
    """
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array)))
    image.SetSpacing(tuple(float(s) for s in spacing_mm))
    return image


def _extract_one(
    task: tuple[int, np.ndarray, np.ndarray, tuple[float, ...], int, dict[str, Any], list[str]],
) -> tuple[int, np.ndarray, str | None]:
    """Features of one lesion; failures become a NaN row plus the reason (never a crash)."""
    lesion_id, image, mask, spacing, label, params, names = task
    try:
        result = _extractor(params).execute(_to_sitk(image, spacing), _to_sitk(mask, spacing), label=label)
        values = np.array([float(result[name]) for name in names], dtype=np.float64)
        return lesion_id, values, None
    except Exception as err:  # pyradiomics raises ValueError/RuntimeError/KeyError on degenerate ROIs
        return lesion_id, np.full(len(names), np.nan), f"{type(err).__name__}: {err}"


def extract_lesion_features(
    qsm_ppb: np.ndarray,
    instances: np.ndarray,
    spacing_mm: Sequence[float],
    lesion_ids: Sequence[int],
    params: dict[str, Any],
    nprocs: int = 1,
    crop: bool = True,
    margin: int = CROP_MARGIN,
    max_bins: int = MAX_BINS,
) -> pd.DataFrame:
    """One row per lesion: ``lesion_id`` then the pyradiomics features named as pyradiomics names them.

    ``crop=True`` ships only each lesion's box (bbox + ``margin`` voxels, default :data:`CROP_MARGIN`)
    to pyradiomics, which is what makes this fast; ``crop=False`` is plain whole-volume pyradiomics, kept as the reference.
    A lesion pyradiomics cannot handle gets NaNs and a warning naming it; a lesion that would need
    more than ``max_bins`` grey levels raises :class:`RadiomicsInputError` before any extraction.
    """
    qsm_ppb = np.asarray(qsm_ppb)
    instances = np.asarray(instances)
    if qsm_ppb.shape != instances.shape or qsm_ppb.ndim != 3:
        raise ValueError(f"QSM {qsm_ppb.shape} and instances {instances.shape} must be the same 3-D grid")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing_mm must be 3 positive values, got {spacing_mm}")
    params = validate_params(params)
    names = feature_names(params)
    ids = [int(i) for i in lesion_ids]
    columns = ["lesion_id", *names]
    if not ids:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c == "lesion_id" else "float64") for c in columns})

    if qsm_ppb.dtype == np.float16:
        qsm_ppb = qsm_ppb.astype(np.float32)
    boxes = lesion_boxes(instances, ids, margin)
    check_discretisation(qsm_ppb, instances, boxes, spacing, params, max_bins)

    def tasks():
        if crop:
            for lesion_id, box in boxes.items():
                mask = (instances[box] == lesion_id).astype(np.uint8)
                yield lesion_id, np.ascontiguousarray(qsm_ppb[box]), mask, spacing, 1, params, names
        else:
            for lesion_id in ids:
                mask = (instances == lesion_id).astype(np.uint8)
                yield lesion_id, qsm_ppb, mask, spacing, 1, params, names

    if nprocs > 1 and len(ids) > 1:
        try:
            with ProcessPoolExecutor(max_workers=min(nprocs, len(ids))) as pool:
                results = list(pool.map(_extract_one, tasks(), chunksize=1))
        except BrokenProcessPool as err:
            raise RadiomicsWorkerError(
                f"a feature-extraction process died ({err}); most likely it ran out of memory: free memory, "
                "lower --nprocs, or set --mem-gb to the memory this job may use") from None
    else:
        results = [_extract_one(task) for task in tasks()]

    failed = [(lesion_id, reason) for lesion_id, _, reason in results if reason is not None]
    for lesion_id, reason in failed:
        LOGGER.warning("radiomics failed for lesion %d, its features are n/a: %s", lesion_id, reason)
    table = pd.DataFrame(np.vstack([values for _, values, _ in results]), columns=names)
    table.insert(0, "lesion_id", np.array([lesion_id for lesion_id, _, _ in results], dtype=np.int64))
    return table
