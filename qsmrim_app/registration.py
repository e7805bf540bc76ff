"""N4 bias correction, FLAIR-to-QSM registration and resampling, as plain SimpleITK functions.

The nipype interfaces wrap these; nothing here knows about BIDS names or files other than the transform.

Transform convention (ITK's, used throughout): a registration result maps a point in the *fixed* (QSM)
physical space to the corresponding point in the *moving* (FLAIR) physical space. That is the direction
``sitk.Resample`` wants to pull the FLAIR onto the QSM grid, and the one written to
``*_from-FLAIR_to-QSM_mode-image_xfm.txt`` (ITK names transforms by the image they resample).
Physical points are ITK's LPS+ millimetres.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path
from .brain_outline import Outlines, as_euler, flair_brain_mask

LOGGER = logging.getLogger(__name__)

#: Final Mattes MI (ITK reports it negated: lower is better) above which a registration is refused.
#: Values are over every masked fixed voxel at full resolution. Measured on the real FLAIR (patient07)
#: against contrast-inverted, rotated copies of itself on anisotropic grids: -1.60 to -1.67 after
#: registration (-0.14 at a 10 mm header error); real QSM-to-QSM: -0.57 (raw chi) to -1.40
#: (qsm_registration_target); pure-noise moving images: -0.0004 to -0.004. -0.05 (as in
#: PreprocConfig.registration_max_metric) sits an order of magnitude from both (tests and benchmark).
DEFAULT_MAX_METRIC = -0.05

#: Without a magnitude, the Mattes-MI stage refines the brain outlines' fit; an MI answer farther than this
#: (mean over the QSM brain, mm) from that fit is not kept. Measured on the one-head benchmark
#: (docs/registration.md): on whole brains and a 70 mm slab MI moved the outline fit by 0.13-0.56 mm; on both 60 mm
#: slabs of the top of the brain MI to the stand-in settled 1.9-2.1 mm from the truth, started from an outline fit
#: 0.07-0.10 mm off (it moved it 2.04-2.07 mm).
MI_AGREEMENT_MM = 1.0

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "nearest": sitk.sitkNearestNeighbor,
}


class RegistrationError(RuntimeError):
    """A registration did not reach a meaningful alignment (the message says which check failed)."""


@dataclass(frozen=True)
class RegistrationStage:
    """What one optimisation stage did, kept for the report and for debugging failed subjects."""

    name: str
    metric: float
    iterations: int
    stop_condition: str


@dataclass(frozen=True)
class RegistrationResult:
    """A fixed-to-moving transform plus the evidence that it is a real alignment."""

    transform: sitk.Transform
    metric_before: float  # Mattes MI at the chosen initialisation
    metric_after: float  # Mattes MI of the final transform (same sampling as metric_before)
    initialisation: str  # "header" or "center-of-mass"
    stages: tuple[RegistrationStage, ...]
    com_distance_mm: float  # distance between brain centres of mass under the header (identity) mapping


# --------------------------------------------------------------------------------------------------
# Masks


def otsu_foreground(image: sitk.Image) -> sitk.Image:
    """A filled Otsu foreground mask (UInt8, 1 = foreground), the default "brain" for N4 and registration."""
    mask = sitk.OtsuThreshold(sitk.Cast(image, sitk.sitkFloat32), 0, 1, 128)
    return sitk.Cast(sitk.BinaryFillhole(mask, foregroundValue=1), sitk.sitkUInt8)


def _as_mask(mask: sitk.Image | None, image: sitk.Image) -> sitk.Image:
    """A UInt8 0/1 mask on ``image``'s grid (Otsu foreground when None)."""
    if mask is None:
        return otsu_foreground(image)
    mask = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)
    if mask.GetSize() != image.GetSize():
        raise ValueError(f"mask size {mask.GetSize()} differs from image size {image.GetSize()}")
    mask.CopyInformation(image)
    return mask


def _mask_centroid(mask: sitk.Image) -> np.ndarray:
    """Physical (LPS) centroid of a binary mask."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if not stats.HasLabel(1):
        raise RegistrationError("a brain mask is empty: nothing to register")
    return np.array(stats.GetCentroid(1))


# --------------------------------------------------------------------------------------------------
# N4


def n4_correct(
    image: sitk.Image,
    mask: sitk.Image | None = None,
    shrink_factor: int = 4,
    iterations: Sequence[int] = (50, 50, 30),
    convergence: float = 1e-4,
) -> tuple[sitk.Image, sitk.Image]:
    """N4 bias correction fitted on a shrunk copy, applied at full resolution.

    The bias field is smooth, so fitting it on a ``shrink_factor``-times smaller image loses nothing and is
    ~shrink_factor**3 faster; the B-spline log field is then evaluated on the full grid. Voxels <= 0 are left
    out of the fit (N4 works on log intensities). Returns (corrected float32 image, multiplicative bias field
    float32), ``image = corrected * bias`` inside and outside the mask.
    """
    if shrink_factor < 1:
        raise ValueError("shrink_factor must be >= 1")
    if not iterations:
        raise ValueError("iterations needs at least one fitting level")
    image = sitk.Cast(image, sitk.sitkFloat32)
    mask = _as_mask(mask, image)
    mask = sitk.Cast(sitk.And(mask, sitk.Greater(image, 0.0)), sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise ValueError("N4 mask has no voxels with positive intensity")

    # Never shrink an axis below ~16 voxels (thin slabs, small test images).
    factors = [int(max(1, min(shrink_factor, n // 16))) for n in image.GetSize()]
    small = sitk.Shrink(image, factors)
    small_mask = sitk.Shrink(mask, factors)

    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.SetConvergenceThreshold(float(convergence))
    corrector.Execute(small, small_mask)

    log_bias = corrector.GetLogBiasFieldAsImage(image)
    bias = sitk.Cast(sitk.Exp(log_bias), sitk.sitkFloat32)
    corrected = sitk.Cast(sitk.Divide(image, bias), sitk.sitkFloat32)
    corrected.CopyInformation(image)
    bias.CopyInformation(image)
    return corrected, bias


# --------------------------------------------------------------------------------------------------
# Registration


def qsm_registration_target(qsm: sitk.Image, mask: sitk.Image | None = None, sigma_mm: float = 1.0) -> sitk.Image:
    """A registration-friendly stand-in for a QSM map when no magnitude image exists.

    Raw QSM is signed, near zero over most of the brain and zero outside, so its intensity histogram says
    little. ``mask * (1 + |smoothed chi| / robust scale)`` keeps the brain outline (the strongest edge shared
    with FLAIR) and the deep grey matter and veins (high |chi|) while being positive and free of speckle.
    """
    qsm = sitk.Cast(qsm, sitk.sitkFloat32)
    if mask is None:
        mask = sitk.Cast(sitk.NotEqual(qsm, 0.0), sitk.sitkUInt8)
        mask = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(mask, [2, 2, 2]))
    mask = _as_mask(mask, qsm)
    smooth = sitk.SmoothingRecursiveGaussian(qsm, float(sigma_mm)) if sigma_mm > 0 else qsm
    magnitude = np.abs(sitk.GetArrayFromImage(smooth))
    inside = sitk.GetArrayViewFromImage(mask) > 0
    if not inside.any():
        raise ValueError("QSM mask is empty")
    scale = float(np.percentile(magnitude[inside], 95)) or 1.0
    target = np.where(inside, 1.0 + np.minimum(magnitude / scale, 3.0), 0.0).astype(np.float32)
    out = sitk.GetImageFromArray(target)
    out.CopyInformation(qsm)
    return out


def _metric_setup(
    fixed_mask: sitk.Image, sampling_fraction: float | None, seed: int, bins: int
) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    if sampling_fraction is None:
        reg.SetMetricSamplingStrategy(reg.NONE)
    else:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sampling_fraction, seed)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


def metric_mask(fixed_mask: sitk.Image) -> sitk.Image:
    """The fixed mask dilated by ~4 mm, so the metric sees the brain/background edge as well as the inside."""
    radius = [max(1, int(round(4.0 / s))) for s in fixed_mask.GetSpacing()]
    return sitk.BinaryDilate(sitk.Cast(fixed_mask, sitk.sitkUInt8), radius)


def evaluate_mi(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image,
    transform: sitk.Transform,
    bins: int,
) -> float:
    """Mattes MI of ``transform`` over every masked fixed voxel at full resolution.

    Deterministic and comparable between transforms (the optimiser's own values use random subsets and
    smoothed levels); 0.0, i.e. "no shared information", when too few samples land in the moving image.
    """
    reg = _metric_setup(fixed_mask, None, 0, bins)
    reg.SetInitialTransform(transform, inPlace=False)
    try:
        return float(reg.MetricEvaluate(fixed, moving))
    except RuntimeError:  # too few samples fall inside the moving image
        return 0.0


def _run_stage(
    name: str,
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image,
    initial: sitk.Transform,
    shrink: Sequence[int],
    sigmas_mm: Sequence[float],
    iterations: int,
    sampling_fraction: float,
    seed: int,
    bins: int,
) -> tuple[sitk.Transform, RegistrationStage]:
    reg = _metric_setup(fixed_mask, sampling_fraction, seed, bins)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0,
        minStep=1e-4,
        numberOfIterations=iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    # Scales from a 1 mm physical shift so rotations, scalings and translations take comparable steps.
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    try:
        result = reg.Execute(fixed, moving)
    except RuntimeError as err:
        raise RegistrationError(f"{name} stage failed inside ITK: {str(err).strip().splitlines()[-1]}") from err
    stage = RegistrationStage(
        name=name,
        metric=float(reg.GetMetricValue()),
        iterations=int(reg.GetOptimizerIteration()),
        stop_condition=reg.GetOptimizerStopConditionDescription(),
    )
    LOGGER.debug("registration stage %s: %s", name, stage)
    return _flatten(result), stage


def _flatten(transform: sitk.Transform) -> sitk.Transform:
    """The single transform inside a one-element composite (what Execute returns), typed."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() == 1:
            return composite.GetNthTransform(0).Downcast()
    return transform.Downcast()


def register_flair_to_qsm(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    *,
    affine: bool = False,
    max_metric: float = DEFAULT_MAX_METRIC,
    com_tolerance_mm: float = 20.0,
    sampling_fraction: float = 0.1,
    histogram_bins: int = 50,
    seed: int = 1,
    rigid_iterations: int = 500,
    affine_iterations: int = 100,
    max_scale_deviation: float = 0.25,
    threads: int | None = None,
    initial: sitk.Transform | None = None,
    initialisation: str = "given",
) -> RegistrationResult:
    """Rigid (default) or rigid then affine (``affine=True``) Mattes-MI registration of a FLAIR to the QSM grid.

    FLAIR and GRE of one session show one rigid head: the 6 extra affine parameters fit contrast
    differences, slab coverage and distortion instead, and move lesions by 1-2 mm (measured in
    benchmarks/bench_registration.py on the semi-real head), which is more than a rim is thick.
    The rigid stage may take up to ``rigid_iterations`` per level: with 200, two real-FLAIR cases (a 60 mm
    header offset, a partial-coverage slab) stopped on the iteration limit 1.1-1.4 voxels off and had relied
    on the affine stage to finish; with 500 they stop on the step size after 311-354, 0.05-0.14 voxel off.

    ``fixed`` is the magnitude image when there is one, else :func:`qsm_registration_target` of the QSM.
    Start: the headers (identity in physical space; one session shares scanner coordinates). If the brain
    centres of mass are more than ``com_tolerance_mm`` apart or the header start carries no information
    (metric above ``max_metric``), a centre-of-mass start (moments of the *masks*, not of the intensities:
    QSM is signed) is tried too, and whichever has the better metric is used. Multi-resolution (shrink 4/2/1,
    smoothing 2/1/0 mm), a random ``sampling_fraction`` of masked fixed voxels drawn with ``seed``. Masks
    default to the Otsu foreground; the fixed one is dilated so the brain edge is sampled. ``threads=1``
    makes the result bit-for-bit repeatable; with several ITK threads (None: ITK's global default) the
    metric's per-thread sums add in varying order and runs differ by ~0.01 voxel.

    ``initial`` (a rigid fixed-to-moving transform) replaces the header / centre-of-mass start; the result
    names it ``initialisation``. The no-magnitude path (:func:`register_without_magnitude`) starts here from
    the brain outlines; the magnitude path passes None and is unchanged.

    Raises RegistrationError when ITK fails, when the final metric is above ``max_metric`` (no meaningful
    alignment), or when the affine scales/shears the brain by more than ``max_scale_deviation``.
    ``result.stages`` names the stages that ran (``rigid`` [, ``affine``]) with their final metrics.
    """
    with _itk_threads(threads):
        return _register(
            fixed, moving, fixed_mask, moving_mask, affine=affine, max_metric=max_metric,
            com_tolerance_mm=com_tolerance_mm, sampling_fraction=sampling_fraction, histogram_bins=histogram_bins,
            seed=seed, rigid_iterations=rigid_iterations, affine_iterations=affine_iterations,
            max_scale_deviation=max_scale_deviation, initial=initial, initialisation=initialisation,
        )


def register_without_magnitude(
    qsm: sitk.Image,
    flair: sitk.Image,
    qsm_mask: sitk.Image | None = None,
    *,
    threads: int | None = None,
    **kwargs,
) -> RegistrationResult:
    """FLAIR to QSM when there is no magnitude image: the brain outlines first, then Mattes MI to the stand-in.

    The brain outlines (the QSM's support against the FLAIR's brain mask, :mod:`.brain_outline`) are what a
    FLAIR and a QSM map share whatever their contrasts; their registration starts the usual rigid Mattes-MI
    stage against :func:`qsm_registration_target`, which refines it with the deep grey matter, veins and
    ventricles. Without the outline start, MI alone landed 1.8-4.3 mm off on the semi-real head and preferred
    the wrong answer; measured against the outline-only answer and MI alone on the one-head benchmark
    (docs/registration.md). When the MI answer moves more than ``MI_AGREEMENT_MM`` from the outline fit, the
    outline fit is kept (the result's ``initialisation`` says so, and ``metric_after`` is MI there): the outline
    fit is contrast-free and, with its offset refinement, 0.05-0.13 mm off on the one-head cases measured, while
    MI to the stand-in has a measured wrong optimum on slabs of the top of the brain. ``kwargs`` go to
    :func:`register_flair_to_qsm`.
    """
    qsm = sitk.Cast(qsm, sitk.sitkFloat32)
    if qsm_mask is None:
        qsm_mask = sitk.Cast(sitk.NotEqual(qsm, 0.0), sitk.sitkUInt8)
    with _itk_threads(threads):
        try:
            outlines = Outlines.build(qsm_mask, flair_brain_mask(flair))
        except ValueError as exc:
            raise RegistrationError(f"no brain outline to start from without a magnitude image ({exc}); a QSM map "
                                    "must be zero outside the brain, or give the magnitude") from exc
        start, label = outlines.start()
        outline = outlines.fit(start)
    LOGGER.info("no magnitude: %s (outline offset %.1f mm), then Mattes MI to the QSM-derived stand-in", label,
                outline.offset_mm)
    target = qsm_registration_target(qsm, qsm_mask)
    result = register_flair_to_qsm(target, flair, qsm_mask, threads=threads, initial=outline.transform,
                                   initialisation=label, **kwargs)
    moved = outlines.displacement_mm(outline.transform, result.transform)
    if moved <= MI_AGREEMENT_MM:
        return result
    LOGGER.warning("no magnitude: Mattes MI to the stand-in moved the brain outlines' fit by %.2f mm (more than "
                   "%.1f mm); the outline fit is kept", moved, MI_AGREEMENT_MM)
    with _itk_threads(threads):
        metric = evaluate_mi(sitk.Cast(target, sitk.sitkFloat32), sitk.Cast(flair, sitk.sitkFloat32),
                             metric_mask(_as_mask(qsm_mask, target)), outline.transform,
                             kwargs.get("histogram_bins", 50))
    return replace(result, transform=outline.transform, metric_after=metric,
                   initialisation=f"{label}; Mattes MI moved it {moved:.2f} mm and was not kept")


@contextmanager
def _itk_threads(threads: int | None) -> Iterator[None]:
    """Run ITK filters with ``threads`` threads, restoring the global default afterwards.

    The per-registration thread count of SimpleITK does not reach the v4 metric's threader; only the global
    default does, and one thread is what makes the metric sums (hence the result) bit-for-bit repeatable.
    """
    if threads is None:
        yield
        return
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _register(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image | None,
    moving_mask: sitk.Image | None,
    *,
    affine: bool,
    max_metric: float,
    com_tolerance_mm: float,
    sampling_fraction: float,
    histogram_bins: int,
    seed: int,
    rigid_iterations: int,
    affine_iterations: int,
    max_scale_deviation: float,
    initial: sitk.Transform | None = None,
    initialisation: str = "given",
) -> RegistrationResult:
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    fixed_mask = _as_mask(fixed_mask, fixed)
    moving_mask = _as_mask(moving_mask, moving)
    fixed_centre = _mask_centroid(fixed_mask)
    moving_centre = _mask_centroid(moving_mask)
    com_distance = float(np.linalg.norm(fixed_centre - moving_centre))

    sampled = metric_mask(fixed_mask)

    if initial is not None:
        given = as_euler(initial, fixed_centre)
        initial, metric_before = given, evaluate_mi(fixed, moving, sampled, given, histogram_bins)
    else:
        initial, initialisation, metric_before = _header_or_com(
            fixed, moving, fixed_mask, moving_mask, sampled, fixed_centre, com_distance, com_tolerance_mm,
            max_metric, histogram_bins)

    common = dict(sampling_fraction=sampling_fraction, seed=seed, bins=histogram_bins)
    rigid, rigid_stage = _run_stage(
        "rigid", fixed, moving, sampled, initial, (4, 2, 1), (2.0, 1.0, 0.0), rigid_iterations, **common
    )
    stages = [rigid_stage]
    transform: sitk.Transform = rigid
    if affine:
        start = sitk.AffineTransform(3)
        start.SetCenter(rigid.GetCenter())
        start.SetMatrix(rigid.GetMatrix())
        start.SetTranslation(rigid.GetTranslation())
        transform, affine_stage = _run_stage(
            "affine", fixed, moving, sampled, start, (2, 1), (1.0, 0.0), affine_iterations, **common
        )
        stages.append(affine_stage)

    metric_after = evaluate_mi(fixed, moving, sampled, transform, histogram_bins)
    result = RegistrationResult(
        transform=transform,
        metric_before=metric_before,
        metric_after=metric_after,
        initialisation=initialisation,
        stages=tuple(stages),
        com_distance_mm=com_distance,
    )
    _check(result, max_metric, max_scale_deviation)
    return result


def _header_or_com(
    fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, moving_mask: sitk.Image, sampled: sitk.Image,
    fixed_centre: np.ndarray, com_distance: float, com_tolerance_mm: float, max_metric: float, histogram_bins: int,
) -> tuple[sitk.Euler3DTransform, str, float]:
    """The magnitude path's start: the headers, or the masks' centres of mass when those are better by MI."""
    header = sitk.Euler3DTransform()
    header.SetCenter(tuple(fixed_centre))
    header_metric = evaluate_mi(fixed, moving, sampled, header, histogram_bins)

    initial, initialisation, metric_before = header, "header", header_metric
    if com_distance > com_tolerance_mm or header_metric > max_metric:
        com = sitk.CenteredTransformInitializer(
            sitk.Cast(fixed_mask, sitk.sitkFloat32),
            sitk.Cast(moving_mask, sitk.sitkFloat32),
            sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
        com = sitk.Euler3DTransform(com)
        com_metric = evaluate_mi(fixed, moving, sampled, com, histogram_bins)
        # Choose by the metric, not by the distance alone: a QSM slab that covers part of the brain has its
        # mask centroid far from the whole-brain FLAIR's even when the headers agree.
        if com_metric < header_metric:
            initial, initialisation, metric_before = com, "center-of-mass", com_metric
    LOGGER.info(
        "registration start: %s (centres %.1f mm apart, MI header %.3f, start %.3f)",
        initialisation, com_distance, header_metric, metric_before,
    )
    return initial, initialisation, metric_before


def _check(result: RegistrationResult, max_metric: float, max_scale_deviation: float) -> None:
    """Refuse alignments that carry no shared information or that deform a brain implausibly."""
    if not np.isfinite(result.metric_after) or result.metric_after > max_metric:
        raise RegistrationError(
            f"registration did not align the images: final Mattes MI {result.metric_after:.4f} is above "
            f"max_metric {max_metric:.4f} (start {result.metric_before:.4f}, {result.initialisation} initialisation)"
        )
    matrix = np.array(result.transform.GetMatrix()).reshape(3, 3) if hasattr(result.transform, "GetMatrix") else None
    if matrix is not None:
        singular = np.linalg.svd(matrix, compute_uv=False)
        if np.any(np.abs(singular - 1.0) > max_scale_deviation):
            raise RegistrationError(
                f"registration produced an implausible scaling: singular values {np.round(singular, 3).tolist()} "
                f"deviate from 1 by more than {max_scale_deviation}"
            )


# --------------------------------------------------------------------------------------------------
# Resampling and transform files


def resample_to_reference(
    image: sitk.Image,
    reference: sitk.Image,
    transform: sitk.Transform | None = None,
    interpolation: str = "linear",
    default_value: float = 0.0,
) -> sitk.Image:
    """``image`` pulled onto ``reference``'s grid through a reference-to-image ``transform``.

    "nearest" keeps the pixel type and the exact label values (instance maps, masks); "linear" and
    "bspline" return float32 so intensities are not truncated.
    """
    try:
        interpolator = _INTERPOLATORS[interpolation]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATORS)}, got {interpolation!r}") from None
    transform = sitk.Transform(3, sitk.sitkIdentity) if transform is None else transform
    if interpolation == "nearest":
        pixel_type = image.GetPixelID()
    else:
        pixel_type = sitk.sitkFloat32
        image = sitk.Cast(image, sitk.sitkFloat32)
    return sitk.Resample(image, reference, transform, interpolator, float(default_value), pixel_type)


def write_transform(transform: sitk.Transform, path: str | os.PathLike) -> Path:
    """Write ``transform`` as an ITK text transform (``.txt``), atomically.

    Direction: the file holds the fixed(QSM)-to-moving(FLAIR) point mapping, i.e. the transform that
    resamples the FLAIR into QSM space (``*_from-FLAIR_to-QSM_mode-image_xfm.txt``), in LPS millimetres,
    readable by ``antsApplyTransforms``/``sitk.ReadTransform``.
    """
    path = Path(path)
    if path.suffix not in (".txt", ".tfm"):
        raise ValueError(f"ITK text transforms end in .txt or .tfm, got {path.name}")
    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))
    return path


def read_transform(path: str | os.PathLike) -> sitk.Transform:
    """Read a transform written by :func:`write_transform` (same direction convention), typed."""
    return _flatten(sitk.ReadTransform(str(path)))
