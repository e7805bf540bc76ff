"""The semi-real head: the real COSMOS QSM brain and the real Ljubljana FLAIR/lesions in one frame.

Made once per data directory: the MNI-space FLAIR of patient07 is registered (affine, Mattes MI, after a
brain-mask alignment) onto the COSMOS brain. That transform then *defines* the truth: every MNI-space
image of the Ljubljana data (both FLAIRs, all 20 lesion masks) is carried by it into the COSMOS frame, so
a lesion of any patient sits where that patient's lesion would sit in the COSMOS brain. The head frame is
COSMOS world (RAS+ mm, nibabel convention); nothing here knows about participants or grids.

Data (see ../shared/data/README.md): Lesjak et al., Neuroinformatics 2017 (CC-BY, via muschellij2/open_ms_data);
Langkammer et al., MRM 2018 (2016 QSM challenge COSMOS map, via sylarMI/POCSnet1-2_QSM).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..registration import read_transform, write_transform
from ..utils.images import nib_to_sitk
from .own_inversion import OWN_INVERSIONS, own_inversion

LOGGER = logging.getLogger(__name__)

MS_DIR = "open_ms_data"
FLAIR_NAME = "FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"
MASK_NAME = "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz"
CHI_PATH = "qsm_challenge_2016/chi_cosmos.nii.gz"
CHI_MASK_PATH = "qsm_challenge_2016/msk.nii.gz"
#: Real QSM maps a head can take its texture from: (chi, brain mask) under the shared data folder. The two
#: ICH maps are two other people and reconstructions, each with a haemorrhage (a paramagnetic confounder);
#: they carry no licence file, so they are read at run time only and never copied into the project.
BACKGROUNDS: dict[str, tuple[str, str]] = {
    "cosmos": (CHI_PATH, CHI_MASK_PATH),
    "ich-a": ("qsm_ich/patientA_Chimap.nii.gz", "qsm_ich/patientA_desc-brain_mask.nii.gz"),
    "ich-b": ("qsm_ich/patientB_Chimap.nii.gz", "qsm_ich/patientB_desc-brain_mask.nii.gz"),
    # our own TV inversions of the same people's real tissue fields (own_inversion.py): (field, mask)
    **{key: value[:2] for key, value in OWN_INVERSIONS.items()},
}
FLAIR_PATIENTS = (7, 19)  # the only patients whose FLAIR is in the data
REGISTERED_PATIENT = 7  # its FLAIR defines the MNI -> COSMOS transform
PATIENTS = tuple(range(1, 21))
MIN_SOURCE_VOXELS = 3  # smaller components of a gold-standard mask are rater specks, not lesions
_HEAD_VERSION = "1"  # bump when the head registration changes: invalidates caches
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def patient_dir(data_dir: Path, patient: int) -> Path:
    return Path(data_dir) / MS_DIR / f"patient{patient:02d}"


def check_data(data_dir: Path, background: str = "cosmos") -> None:
    """Raise FileNotFoundError naming the first missing input and where it comes from."""
    needed = [Path(data_dir) / rel for rel in BACKGROUNDS[background]]
    needed += [patient_dir(data_dir, p) / FLAIR_NAME for p in FLAIR_PATIENTS]
    needed += [patient_dir(data_dir, p) / MASK_NAME for p in PATIENTS]
    for path in needed:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: --data-dir must be the shared data folder "
                                    "(open_ms_data/ and qsm_challenge_2016/, see its README)")


@dataclass(frozen=True)
class Volume:
    """A 3D array and its RAS voxel-to-world affine."""

    data: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class Head:
    """The semi-real head: COSMOS chi/mask and the MNI sources, tied by `cosmos_to_mni` (RAS 4x4, mm)."""

    chi_ppm: Volume
    brain: Volume  # float32 0/1 COSMOS brain mask
    flairs: dict[int, Volume]  # patient -> FLAIR with that patient's own lesions inpainted (MNI grid)
    cosmos_to_mni: np.ndarray  # x_mni = M @ x_cosmos (world, RAS)
    registration: dict  # metrics of the head registration (written to the truth)

    @property
    def mni_affine(self) -> np.ndarray:
        return next(iter(self.flairs.values())).affine


def _load(path: Path, dtype: type = np.float32) -> Volume:
    img = nib.load(str(path))
    return Volume(np.asarray(img.dataobj, dtype=dtype), np.asarray(img.affine, float))


def lesion_instances(data_dir: Path, patient: int) -> Volume:
    """int32 instances (26-connected components, >= MIN_SOURCE_VOXELS) of a patient's MNI lesion mask."""
    src = _load(patient_dir(data_dir, patient) / MASK_NAME)
    labels, n = ndimage.label(src.data > 0.5, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.flatnonzero(sizes >= MIN_SOURCE_VOXELS)
    keep = keep[keep > 0]
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    return Volume(lut[labels], src.affine)


def inpaint_lesions(flair: np.ndarray, lesions: np.ndarray) -> np.ndarray:
    """The FLAIR with its own (dilated) lesions replaced by the surrounding tissue (normalised convolution).

    Otherwise the source patient's lesions would stay as unlabelled hyperintensities in every participant.
    """
    brain = flair > 0
    hole = ndimage.binary_dilation(lesions > 0, iterations=1) & brain
    known = (brain & ~hole).astype(np.float32)
    out = flair.astype(np.float32).copy()
    for sigma in (1.5, 3.0, 6.0):  # small holes from close tissue; the middle of big ones from further away
        num = ndimage.gaussian_filter(flair * known, sigma)
        den = ndimage.gaussian_filter(known, sigma)
        fill = hole & (den > 0.05)
        out[fill] = num[fill] / den[fill]
        known = known.copy()
        known[fill] = 1.0
        flair = out
        hole = hole & ~fill
        if not hole.any():
            break
    return out


def _fingerprint(data_dir: Path, background: str = "cosmos") -> str:
    digest = hashlib.sha256(_HEAD_VERSION.encode())
    for rel in (*BACKGROUNDS[background], f"{MS_DIR}/patient{REGISTERED_PATIENT:02d}/{FLAIR_NAME}"):
        path = Path(data_dir) / rel
        digest.update(rel.encode())
        digest.update(str(path.stat().st_size).encode())
        with open(path, "rb") as handle:
            digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()[:16]


def _distance_map(mask: sitk.Image, clamp_mm: float = 20.0) -> sitk.Image:
    """Signed distance (mm, negative inside) to the brain outline, clamped: a smooth, convex-ish cost."""
    dist = sitk.SignedMaurerDistanceMap(sitk.Cast(mask, sitk.sitkUInt8), insideIsPositive=False,
                                        squaredDistance=False, useImageSpacing=True)
    return sitk.Clamp(sitk.Cast(dist, sitk.sitkFloat32), sitk.sitkFloat32, -clamp_mm, clamp_mm)


def _mean_squares_stage(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform) -> tuple[sitk.Transform, float]:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 300, relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    out = reg.Execute(fixed, moving)
    while out.GetName() == "CompositeTransform":  # Execute wraps its result in a composite
        out = sitk.CompositeTransform(out).GetNthTransform(0)
    return out.Downcast(), float(reg.GetMetricValue())


def _register_head(flair: Volume, brain: Volume) -> tuple[sitk.Transform, dict]:
    """Affine FLAIR(MNI) -> COSMOS on the signed distance maps of the two brain masks.

    Two different people, so 12 degrees of freedom are right here (unlike FLAIR -> QSM of one session).
    The two brains share no intensity contrast (FLAIR vs susceptibility); their outlines are what both
    images define well, and a distance map turns the outline into a smooth cost. Similarity first (moments
    start), then affine. Measured on this data: brain-mask Dice 0.82 at the moments start, 0.86 after the
    similarity, 0.92 after the affine, with the lateral ventricles and deep grey matter in place (checked on
    a quicklook); a Mattes-MI stage on FLAIR vs smoothed chi was tried and lowered the Dice to 0.77.
    Single-threaded ITK with fixed seeds: repeatable bit for bit.
    """
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        moving_mask = nib_to_sitk(nib.Nifti1Image((flair.data > 0).astype(np.uint8), flair.affine))
        fixed_mask = nib_to_sitk(nib.Nifti1Image((brain.data > 0.5).astype(np.uint8), brain.affine))
        fixed, moving = _distance_map(fixed_mask), _distance_map(moving_mask)
        start = sitk.CenteredTransformInitializer(sitk.Cast(fixed_mask, sitk.sitkFloat32),
                                                  sitk.Cast(moving_mask, sitk.sitkFloat32),
                                                  sitk.Similarity3DTransform(),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
        similarity, sim_metric = _mean_squares_stage(fixed, moving, start)
        affine = sitk.AffineTransform(3)
        affine.SetCenter(similarity.GetCenter())
        affine.SetMatrix(similarity.GetMatrix())
        affine.SetTranslation(similarity.GetTranslation())
        final, aff_metric = _mean_squares_stage(fixed, moving, affine)

        def dice(transform: sitk.Transform) -> float:
            warped = sitk.Resample(sitk.Cast(moving_mask, sitk.sitkFloat32), fixed_mask, transform,
                                   sitk.sitkLinear, 0.0)
            a = sitk.GetArrayViewFromImage(warped) > 0.5
            b = sitk.GetArrayViewFromImage(fixed_mask) > 0
            return float(2 * np.sum(a & b) / (a.sum() + b.sum()))

        report = {"method": "affine on clamped signed distance maps of the brain masks (mean squares, "
                            "moments start, similarity then affine, shrink 4/2/1)",
                  "similarity_stage_mean_squares_mm2": sim_metric, "affine_stage_mean_squares_mm2": aff_metric,
                  "brain_mask_dice_start": dice(start), "brain_mask_dice": dice(final),
                  "singular_values": np.linalg.svd(np.array(final.GetMatrix()).reshape(3, 3),
                                                   compute_uv=False).tolist()}
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    return final, report


def _transform_to_ras(transform: sitk.Transform) -> np.ndarray:
    """ITK fixed(LPS)->moving(LPS) affine as a 4x4 RAS matrix with the same meaning."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(transform.GetMatrix())
    tx.SetTranslation(transform.GetTranslation())
    tx.SetCenter(transform.GetCenter())
    a = np.array(tx.GetMatrix()).reshape(3, 3)
    c = np.array(tx.GetCenter())
    t = np.array(tx.GetTranslation())
    lps = np.eye(4)
    lps[:3, :3] = a
    lps[:3, 3] = t + c - a @ c
    return _LPS @ lps @ _LPS


def load_head(data_dir: Path, cache_dir: Path, background: str = "cosmos") -> Head:
    """The semi-real head; the registration is read from `cache_dir` when it was made from the same data.

    `background` (BACKGROUNDS) picks whose real QSM is the texture; other than COSMOS, the registration
    is cached in `cache_dir/<background>`. An own inversion (`cosmos-tv`, `ich-a-tv`) is the same person
    on the same grid as its base map, so it shares the base's registration (and cache).
    """
    data_dir = Path(data_dir)
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r} (one of {', '.join(BACKGROUNDS)})")
    check_data(data_dir, background)
    own = background in OWN_INVERSIONS
    base = OWN_INVERSIONS[background][3] if own else background
    check_data(data_dir, base)
    chi_rel, mask_rel = BACKGROUNDS[base]
    chi = _load(data_dir / chi_rel)
    brain = Volume((_load(data_dir / mask_rel).data > 0.5).astype(np.float32), chi.affine)
    if base != "cosmos":  # the ICH maps hold values (and NaN) outside their masks
        chi = Volume(np.nan_to_num(chi.data) * brain.data, chi.affine)
    own_info = {}
    if own:
        data, _, affine, own_info = own_inversion(data_dir, background, Path(cache_dir) / background)
        if not np.allclose(affine, chi.affine, atol=1e-4) or data.shape != chi.data.shape:
            raise ValueError(f"{background}: the tissue field's grid differs from the {base} map's")
        chi = Volume(data * brain.data, chi.affine)
    flairs = {}
    for p in FLAIR_PATIENTS:
        src = _load(patient_dir(data_dir, p) / FLAIR_NAME)
        own = _load(patient_dir(data_dir, p) / MASK_NAME)
        flairs[p] = Volume(inpaint_lesions(src.data, own.data), src.affine)
    cache_dir = Path(cache_dir) if base == "cosmos" else Path(cache_dir) / base
    key = _fingerprint(data_dir, base)
    xfm_path, info_path = cache_dir / "cosmos_to_mni_xfm.txt", cache_dir / "head_registration.json"
    if info_path.is_file() and xfm_path.is_file() and json.loads(info_path.read_text()).get("key") == key:
        transform, report = read_transform(xfm_path), json.loads(info_path.read_text())
        LOGGER.info("semi-real head: registration read from %s", cache_dir)
    else:
        LOGGER.info("semi-real head: registering patient%02d FLAIR onto the %s brain (once)", REGISTERED_PATIENT,
                    base)
        transform, report = _register_head(flairs[REGISTERED_PATIENT], brain)
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_transform(transform, xfm_path)
        report = {"key": key, **report, "direction": "COSMOS world -> MNI world (ITK file: LPS, fixed COSMOS)"}
        info_path.write_text(json.dumps(report, indent=2) + "\n")
    matrix = _transform_to_ras(transform)
    report = {**report, "cosmos_to_mni_ras": matrix.tolist()}
    if own:
        report["own_inversion"] = {k: v for k, v in own_info.items() if k != "stamp"}
    return Head(chi, brain, flairs, matrix, report)
