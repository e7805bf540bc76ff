"""nibabel <-> SimpleITK conversion that keeps the voxel order and the world orientation.

nibabel speaks RAS+ world coordinates and (i, j, k) arrays; ITK speaks LPS+ physical points and numpy
views in (k, j, i) order. Both conventions meet here so no other module has to flip signs or axes.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk

# diag(-1, -1, 1): RAS <-> LPS (its own inverse).
_LPS_FLIP = np.diag([-1.0, -1.0, 1.0])


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    """World points (..., 3) from nibabel's RAS+ to ITK's LPS+ (and back: the map is an involution)."""
    return np.asarray(points, dtype=float) * np.array([-1.0, -1.0, 1.0])


lps_to_ras = ras_to_lps


def affine_from_sitk(image: sitk.Image) -> np.ndarray:
    """The 4x4 RAS voxel-to-world affine (nibabel's convention) of a 3D SimpleITK image."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_FLIP @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS_FLIP @ np.array(image.GetOrigin(), dtype=float)
    return affine


def set_sitk_geometry(image: sitk.Image, affine: np.ndarray, tol: float = 1e-4) -> sitk.Image:
    """Give ``image`` the grid of a RAS ``affine`` (in place, also returned).

    ITK cannot represent shears: an affine whose columns are not orthogonal is refused rather than silently
    approximated, because a wrong direction matrix misplaces every lesion.
    """
    affine = np.asarray(affine, dtype=float)
    linear = _LPS_FLIP @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("affine has a zero-length voxel axis")
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=tol):
        raise ValueError("affine has shear (non-orthogonal axes); ITK images cannot represent it")
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(d) for d in direction.ravel()))
    image.SetOrigin(tuple(float(o) for o in _LPS_FLIP @ affine[:3, 3]))
    return image


def array_to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image from an (i, j, k) array and its RAS affine (the array's dtype is kept)."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {array.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    return set_sitk_geometry(image, affine)


def sitk_to_array(image: sitk.Image) -> np.ndarray:
    """The voxel values of a 3D SimpleITK image as an (i, j, k) numpy array (a copy)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("expected a 3D scalar image")
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0).copy()


def nib_to_sitk(img: nib.spatialimages.SpatialImage, dtype: np.dtype | type | None = None) -> sitk.Image:
    """A SimpleITK image with the same voxels and world placement as a 3D nibabel image.

    Uses ``img.affine`` (sform when set, else qform), as nibabel does everywhere else in the app; scaling
    (scl_slope/inter) is applied when ``dtype`` is given or the file is scaled, otherwise the stored dtype is
    kept so label maps stay integer.
    """
    proxy = img.dataobj
    scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
    if dtype is not None:
        data = np.asarray(img.get_fdata(dtype=np.float64)).astype(dtype)
    elif scaled:
        data = img.get_fdata(dtype=np.float32)
    else:
        data = np.asanyarray(proxy)
    data = np.squeeze(data) if data.ndim > 3 else data
    return array_to_sitk(data, img.affine)


def sitk_to_nib(image: sitk.Image, header: nib.Nifti1Header | None = None) -> nib.Nifti1Image:
    """A NIfTI-1 image (sform and qform both set, code 1 = scanner) with the SimpleITK image's grid."""
    affine = affine_from_sitk(image)
    out = nib.Nifti1Image(sitk_to_array(image), affine, header=header)
    out.set_sform(affine, code=1)
    out.set_qform(affine, code=1)
    return out
