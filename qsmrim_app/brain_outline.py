"""Brain outlines: the one structure every FLAIR and every QSM map share, as a rigid registration of masks.

A QSM map has no tissue contrast in common with a FLAIR that a histogram metric can rely on (the brain edge,
deep grey matter and veins are bright on one and dark or absent on the other), but its support (the voxels the
reconstruction kept) is the brain, and so is a FLAIR's brain mask. Registering the two masks, smoothed, by mean
squares is contrast-free: it starts the no-magnitude registration, and, run again from any finished
registration, it says how far the brain outlines disagree with it (the registration gate).

Transforms follow registration.py: fixed (QSM) physical points -> moving (FLAIR) physical points, ITK LPS mm.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

#: Isotropic grid (mm) the masks are compared on, and the Gaussian (mm) that turns them into soft outlines.
OUTLINE_SPACING_MM = 2.0
OUTLINE_SIGMA_MM = 2.0


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


@dataclass(frozen=True)
class Outlines:
    """Soft brain outlines of the QSM support (fixed) and the FLAIR brain (moving) and where they are compared."""

    fixed: sitk.Image
    moving: sitk.Image
    band: sitk.Image  # UInt8: fixed voxels near the outline, away from the grid's faces (a slab's cut is no edge)
    points: np.ndarray  # (N, 3) physical points of the QSM brain, for displacements in mm

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
        return cls(fixed, moving, band_image, points)

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

    def register(self, initial: sitk.Transform, seed: int = 1) -> sitk.Euler3DTransform:
        """Rigid mean-squares registration of the outlines from ``initial`` (2 levels: 4 then 2 mm)."""
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
