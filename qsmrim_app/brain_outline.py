"""Brain outlines: the one structure every FLAIR and every QSM map share, as a rigid registration of masks.

A QSM map has no tissue contrast in common with a FLAIR that a histogram metric can rely on (the brain edge,
deep grey matter and veins are bright on one and dark or absent on the other), but its support (the voxels the
reconstruction kept) is the brain, and so is a FLAIR's brain mask. Registering the two masks is contrast-free:
it starts the no-magnitude registration, and, run again from any finished registration, it says how far the
brain outlines disagree with it (the registration gate).

The two outlines are not the same surface: FLAIR suppresses the outer CSF, so its brain mask ends at the grey
matter, while a QSM support keeps the CSF (or, in pipelines that erode their masks, less than the brain). Around
a whole brain that offset is symmetric and cancels; on a slab that sees only the top of the brain it is
one-sided and pulled a mask fit 4 mm along the slab axis (measured on the one-head benchmark: the FLAIR mask's
signed distance at the QSM outline was 2.0-2.4 mm in every direction). So the fit ends with a refinement of
signed distance maps that estimates the offset (one number, the same all around the brain) with the six rigid
parameters, instead of assuming it is zero or guessing a CSF thickness.

Transforms follow registration.py: fixed (QSM) physical points -> moving (FLAIR) physical points, ITK LPS mm.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import map_coordinates
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

#: Isotropic grid (mm) the masks are compared on, and the Gaussian (mm) that turns them into soft outlines.
OUTLINE_SPACING_MM = 2.0
OUTLINE_SIGMA_MM = 2.0
#: The offset refinement: signed distance maps on a 1 mm grid, sampled within ``DISTANCE_BAND_MM`` of the QSM
#: outline (distances clipped there, so far-away parts of either mask do not pull) and ``FACE_MARGIN_MM`` more
#: than their depth from the QSM grid's faces, at most ``DISTANCE_SAMPLES`` samples.
DISTANCE_SPACING_MM = 1.0
DISTANCE_BAND_MM = 10.0
FACE_MARGIN_MM = 2.0
DISTANCE_SAMPLES = 30000


def flair_brain_mask(flair: sitk.Image, erode_mm: float = 2.0) -> sitk.Image:
    """The brain of a FLAIR (UInt8 0/1): Otsu foreground, cut from the scalp by erosion, largest part, filled.

    FLAIR suppresses CSF, so skull and CSF form a dark shell between the bright scalp and the brain; eroding by
    ``erode_mm`` breaks the remaining bridges, the largest component is the brain, and the dilation, closing and
    hole filling give back its outline (ventricles and sulci included). A skull-stripped FLAIR passes unchanged.
    """
    image = sitk.Cast(flair, sitk.sitkFloat32)
    foreground = sitk.OtsuThreshold(image, 0, 1, 128)
    radius = [max(1, int(round(erode_mm / s))) for s in image.GetSpacing()]
    parts = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.BinaryErode(foreground, radius)),
                                  sortByObjectSize=True)
    brain = sitk.And(sitk.BinaryDilate(sitk.Cast(parts == 1, sitk.sitkUInt8), radius), foreground)
    brain = sitk.BinaryMorphologicalClosing(brain, [max(1, int(round(3.0 / s))) for s in image.GetSpacing()])
    brain = sitk.Cast(sitk.BinaryFillhole(brain), sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(brain)):
        raise ValueError("the FLAIR has no foreground: no brain mask")
    return brain


def as_euler(transform: sitk.Transform, centre: np.ndarray | tuple[float, ...]) -> sitk.Euler3DTransform:
    """The rigid part of ``transform`` (polar decomposition of its linear part) as an Euler transform about ``centre``."""
    centre = np.asarray(centre, dtype=float)
    origin = np.array(transform.TransformPoint(tuple(centre)))
    linear = np.stack([np.array(transform.TransformPoint(tuple(centre + e))) - origin for e in np.eye(3)], axis=1)
    u, _, vt = np.linalg.svd(linear)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:  # a reflection cannot be a head's motion
        u[:, -1] *= -1
        rotation = u @ vt
    euler = sitk.Euler3DTransform()
    euler.SetCenter(tuple(centre))
    euler.SetMatrix(tuple(rotation.ravel()))
    euler.SetTranslation(tuple(origin - centre))
    return euler


def _iso_grid(reference: sitk.Image, spacing: float) -> sitk.Image:
    """An isotropic grid with ``reference``'s extent, corner and direction (a slab stays a slab)."""
    size = [max(1, int(np.ceil(n * s / spacing))) for n, s in zip(reference.GetSize(), reference.GetSpacing())]
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    corner = np.array(reference.TransformContinuousIndexToPhysicalPoint([-0.5, -0.5, -0.5]))
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(tuple(corner + direction @ np.full(3, spacing / 2.0)))
    return grid


def _soft(mask: sitk.Image, sigma_mm: float, spacing: float) -> sitk.Image:
    """A 0/1 mask smoothed in its own grid, then sampled on the isotropic outline grid."""
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkFloat32), sigma_mm)
    return sitk.Resample(smooth, _iso_grid(mask, spacing), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _binary_on_iso(mask: sitk.Image, spacing: float, pad: int = 0) -> sitk.Image:
    """A 0/1 mask resampled (linear, then > 0.5) onto the isotropic grid of its extent, padded by ``pad`` voxels."""
    grid = _iso_grid(mask, spacing)
    soft = sitk.Resample(sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkFloat32), grid, sitk.Transform(),
                         sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    binary = sitk.Cast(soft > 0.5, sitk.sitkUInt8)
    return sitk.ConstantPad(binary, [pad] * 3, [pad] * 3, 0) if pad else binary


def _signed_distance(mask: sitk.Image) -> np.ndarray:
    """Signed distance to the mask's outline (mm; negative inside), as a (z, y, x) float32 array."""
    distance = sitk.SignedMaurerDistanceMap(mask, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    return sitk.GetArrayFromImage(distance).astype(np.float32)


def _face_distance_mm(shape: tuple[int, ...], spacing: float) -> np.ndarray:
    """Distance (mm) of every voxel of a (z, y, x) grid to the grid's nearest face."""
    near = None
    for axis, n in enumerate(shape):
        index = np.arange(n)
        along = np.minimum(index, n - 1 - index).reshape([-1 if a == axis else 1 for a in range(len(shape))])
        near = along if near is None else np.minimum(near, along)
    return np.broadcast_to(near, shape) * spacing


@dataclass(frozen=True)
class DistanceMaps:
    """The QSM outline's samples with their signed depth, and the FLAIR brain's signed distance map.

    Samples lie within ``band_mm`` of the QSM outline and farther from the QSM grid's faces than from the outline
    plus ``face_mm``: a slab's cut is not the brain's edge, and a sample's nearest outline point must lie inside
    the grid for its depth to mean the same as the FLAIR's distance.
    """

    samples: np.ndarray  # (N, 3) physical points near the QSM outline
    depth: np.ndarray  # (N,) their signed distance (mm) to the QSM outline, negative inside
    moving: np.ndarray  # (z, y, x) signed distance (mm) to the FLAIR brain's outline, negative inside
    moving_origin: np.ndarray
    moving_axes: np.ndarray  # direction matrix divided by the spacing: physical offset -> continuous index
    band_mm: float

    @classmethod
    def build(cls, qsm_mask: sitk.Image, flair_mask: sitk.Image, spacing: float = DISTANCE_SPACING_MM,
              band_mm: float | None = None, face_mm: float | None = None,
              max_samples: int = DISTANCE_SAMPLES) -> "DistanceMaps":
        band_mm = DISTANCE_BAND_MM if band_mm is None else band_mm
        face_mm = FACE_MARGIN_MM if face_mm is None else face_mm
        fixed = _binary_on_iso(qsm_mask, spacing)
        depth = _signed_distance(fixed)
        keep = (np.abs(depth) < band_mm) & (_face_distance_mm(depth.shape, spacing) > face_mm + np.abs(depth))
        index = np.argwhere(keep)
        if len(index) == 0:
            raise ValueError("the QSM support has no outline inside its grid")
        index = index[:: max(1, len(index) // max_samples)]
        direction = np.array(fixed.GetDirection()).reshape(3, 3)
        samples = np.array(fixed.GetOrigin()) + (index[:, ::-1] * spacing) @ direction.T
        moving = _binary_on_iso(flair_mask, spacing, pad=int(np.ceil(band_mm / spacing)) + 2)
        axes = np.array(moving.GetDirection()).reshape(3, 3) / spacing
        return cls(samples, depth[tuple(index.T)], _signed_distance(moving), np.array(moving.GetOrigin()), axes,
                   float(band_mm))

    def residuals(self, rotation: np.ndarray, translation: np.ndarray, centre: np.ndarray,
                  offset_mm: float) -> np.ndarray:
        """FLAIR distance at the mapped samples minus their QSM depth and the offset (mm; 0 where outlines agree)."""
        mapped = (self.samples - centre) @ rotation.T + centre + translation
        index = (mapped - self.moving_origin) @ self.moving_axes  # (x, y, z) continuous indices
        value = map_coordinates(self.moving, index[:, ::-1].T, order=1, mode="nearest")
        return np.clip(value, -self.band_mm, self.band_mm) - self.depth - offset_mm


@dataclass(frozen=True)
class OffsetFit:
    """The outline refinement's answer: a rigid transform and how far the QSM outline lies outside the FLAIR's."""

    transform: sitk.Euler3DTransform
    offset_mm: float


@dataclass(frozen=True)
class Outlines:
    """Soft brain outlines of the QSM support (fixed) and the FLAIR brain (moving) and where they are compared."""

    fixed: sitk.Image
    moving: sitk.Image
    band: sitk.Image  # UInt8: fixed voxels near the outline, away from the grid's faces (a slab's cut is no edge)
    points: np.ndarray  # (N, 3) physical points of the QSM brain, for displacements in mm
    distances: DistanceMaps  # the same two masks as signed distances, for the offset refinement

    @property
    def centre(self) -> np.ndarray:
        return self.points.mean(axis=0)

    @classmethod
    def build(cls, qsm_mask: sitk.Image, flair_mask: sitk.Image, spacing: float = OUTLINE_SPACING_MM,
              sigma_mm: float = OUTLINE_SIGMA_MM) -> "Outlines":
        fixed, moving = _soft(qsm_mask, sigma_mm, spacing), _soft(flair_mask, sigma_mm, spacing)
        values = sitk.GetArrayFromImage(fixed)
        edge = sitk.GetImageFromArray(((values > 0.05) & (values < 0.95)).astype(np.uint8))
        edge.CopyInformation(fixed)
        band = sitk.GetArrayFromImage(sitk.BinaryDilate(edge, [max(1, int(round(6.0 / spacing)))] * 3))
        margin = int(np.ceil(2.0 * sigma_mm / spacing))  # smoothing runs into the zero padding at the faces
        for axis in range(3):
            index = [slice(None)] * 3
            index[axis] = slice(0, margin)
            band[tuple(index)] = 0
            index[axis] = slice(band.shape[axis] - margin, band.shape[axis])
            band[tuple(index)] = 0
        if not band.any():
            raise ValueError("the QSM support has no outline inside its grid")
        band_image = sitk.GetImageFromArray(band)
        band_image.CopyInformation(fixed)
        inside = np.argwhere(values > 0.5)
        step = max(1, len(inside) // 20000)
        points = np.array([fixed.TransformIndexToPhysicalPoint([int(i) for i in v[::-1]]) for v in inside[::step]])
        if len(points) == 0:
            raise ValueError("the QSM support is empty")
        return cls(fixed, moving, band_image, points, DistanceMaps.build(qsm_mask, flair_mask))

    def mismatch(self, transform: sitk.Transform) -> float:
        """Mean squared difference of the soft outlines under ``transform`` (lower is better)."""
        reg = self._method()
        reg.SetInitialTransform(transform, inPlace=False)
        try:
            return float(reg.MetricEvaluate(self.fixed, self.moving))
        except RuntimeError:  # the moving outline falls outside the fixed band entirely
            return float("inf")

    def _method(self, seed: int = 1) -> sitk.ImageRegistrationMethod:
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMeanSquares()
        reg.SetMetricFixedMask(self.band)
        reg.SetInterpolator(sitk.sitkLinear)
        return reg

    def register(self, initial: sitk.Transform) -> sitk.Euler3DTransform:
        """The outline registration from ``initial``: the soft masks' fit, then the offset refinement."""
        return self.fit(initial).transform

    def fit(self, initial: sitk.Transform) -> OffsetFit:
        """:meth:`register_masks` from ``initial`` (its capture range), then :meth:`refine` from there."""
        return self.refine(self.register_masks(initial))

    def refine(self, initial: sitk.Transform) -> OffsetFit:
        """Rigid fit of the signed distance maps with one free offset between the outlines, from ``initial``.

        Robust least squares (soft L1, 1 mm scale: a QSM mask cut at the sinuses or a dark lesion at the edge of
        a FLAIR mask moves a few samples, not the answer) over the samples near the QSM outline; the FLAIR
        distance is read where the rigid transform maps each sample, and should equal the sample's QSM depth
        plus the offset. The offset is separable from a shift because it is the same along every outline
        normal while a shift changes sign across the brain.
        """
        centre = self.centre
        start = as_euler(initial, centre)
        rotation0 = np.array(start.GetMatrix()).reshape(3, 3)
        translation0 = np.array(start.GetTranslation())

        def unpack(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return Rotation.from_rotvec(x[:3]).as_matrix() @ rotation0, translation0 + x[3:6]

        def residuals(x: np.ndarray) -> np.ndarray:
            rotation, translation = unpack(x)
            return self.distances.residuals(rotation, translation, centre, x[6])

        # Rotations in radians scaled so 1 unit moves the outline ~1 mm, like the shifts and the offset.
        result = least_squares(residuals, np.zeros(7), loss="soft_l1", f_scale=1.0, diff_step=1e-3,
                                x_scale=np.r_[[0.02] * 3, [1.0] * 4])
        rotation, translation = unpack(result.x)
        euler = sitk.Euler3DTransform()
        euler.SetCenter(tuple(centre))
        euler.SetMatrix(tuple(rotation.ravel()))
        euler.SetTranslation(tuple(translation))
        return OffsetFit(euler, float(result.x[6]))

    def register_masks(self, initial: sitk.Transform, seed: int = 1) -> sitk.Euler3DTransform:
        """Rigid mean-squares registration of the soft masks from ``initial`` (2 levels: 4 then 2 mm).

        It assumes the outlines are one surface, so on its own it lands where the offset between them is
        balanced (0.6-0.9 mm off on whole brains, 4 mm on a 60 mm slab at the top of the brain); it is kept
        for its capture range, :meth:`refine` finishes.
        """
        reg = self._method()
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.25, seed)
        # Small steps, slow relaxation: with a fast one the optimiser stopped after ~12 iterations and
        # recovered under half of a 10 degree rotation (measured on the one-head benchmark case).
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=300,
                                                     relaxationFactor=0.8, gradientMagnitudeTolerance=1e-10)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([2, 1])
        reg.SetSmoothingSigmasPerLevel([4.0, 0.0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(as_euler(initial, self.centre), inPlace=False)
        result = reg.Execute(self.fixed, self.moving)
        if result.GetName() == "CompositeTransform":
            result = sitk.CompositeTransform(result).GetNthTransform(0)
        return sitk.Euler3DTransform(result.Downcast())

    def start(self) -> tuple[sitk.Euler3DTransform, str]:
        """The better start by outline mismatch: the headers, or the masks' centres of mass (moments)."""
        header = sitk.Euler3DTransform()
        header.SetCenter(tuple(self.centre))
        moments = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
            self.fixed, self.moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS))
        # A slab's support has its centre far from the whole brain's even when the headers agree: choose by fit.
        if self.mismatch(moments) < self.mismatch(header):
            return moments, "brain-outline (centre-of-mass start)"
        return header, "brain-outline (header start)"

    def displacement_mm(self, a: sitk.Transform, b: sitk.Transform) -> float:
        """Mean distance (mm) between where ``a`` and ``b`` map the QSM brain's points."""
        pa = np.array([a.TransformPoint(tuple(p)) for p in self.points])
        pb = np.array([b.TransformPoint(tuple(p)) for p in self.points])
        return float(np.linalg.norm(pa - pb, axis=1).mean())
