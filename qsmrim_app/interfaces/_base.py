"""Small helpers shared by the interfaces: image I/O in the node's working directory."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


class InputDataError(RuntimeError):
    """A problem with a participant's input data; the message names the file and the fix."""


def load_3d(path: str | Path, what: str) -> nib.Nifti1Image:
    """Load a 3D image or fail with a message that names the file and the problem."""
    try:
        image = nib.load(str(path))
        shape = image.shape
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputDataError(f"{what} {path}: cannot be read ({exc}); re-export the image as NIfTI") from exc
    if len(shape) == 4 and shape[3] == 1:
        image = nib.Nifti1Image(np.asarray(image.dataobj)[..., 0], image.affine, image.header)
    elif len(shape) != 3:
        raise InputDataError(f"{what} {path}: expected a 3D image, got shape {shape}; "
                             "select one volume (e.g. one echo) with --bids-filter-file or split it")
    return image


def out_path(name: str) -> str:
    """Outputs go into the node's working directory (nipype's cwd), which caches them."""
    return str(Path.cwd() / name)


def save_like(data: np.ndarray, reference: nib.Nifti1Image, name: str, dtype=None) -> str:
    array = np.asarray(data if dtype is None else data.astype(dtype))
    image = nib.Nifti1Image(array, reference.affine)
    image.header.set_data_dtype(array.dtype)
    image.set_qform(reference.affine, code=1)
    image.set_sform(reference.affine, code=1)
    path = out_path(name)
    nib.save(image, path)
    return path
