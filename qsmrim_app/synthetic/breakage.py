"""Break one participant of a phantom dataset on purpose, so tests see a bad input among good ones."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

HOWS: tuple[str, ...] = ("missing-flair", "4d-qsm", "nan-qsm", "corrupt-gzip", "empty-mask",
                         "mismatched-mask-grid", "nonbinary-mask")


def _save_like(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def _files(root: Path, sub: str, pattern: str) -> list[Path]:
    found = sorted((root / f"sub-{sub}").rglob(pattern))
    if not found:
        raise FileNotFoundError(f"no {pattern} for sub-{sub} under {root}")
    return found


def break_participant(bids_dir: Path, label: str, how: str) -> list[Path]:
    """Damage every session of participant `label` in the way `how` names; return the files touched.

    missing-flair: FLAIR image and sidecar deleted. 4d-qsm: Chimap becomes 4D (two volumes).
    nan-qsm: every Chimap voxel NaN. corrupt-gzip: Chimap truncated mid-stream. empty-mask: the lesion
    mask and both dsegs all zero. mismatched-mask-grid: the lesion mask and dsegs cropped and shifted so
    their grid no longer matches the FLAIR. nonbinary-mask: the lesion mask becomes a float probability
    map (values strictly between 0 and 1 at lesion edges) and the lesion dseg beside it is removed.
    """
    bids_dir = Path(bids_dir)
    sub = label.removeprefix("sub-")
    deriv = bids_dir / "derivatives" / "lesions"
    touched: list[Path] = []
    if how == "missing-flair":
        for path in _files(bids_dir, sub, "*_FLAIR.nii.gz"):
            path.unlink()
            path.with_name(path.name.replace(".nii.gz", ".json")).unlink(missing_ok=True)
            touched.append(path)
    elif how in ("4d-qsm", "nan-qsm", "corrupt-gzip"):
        for path in _files(bids_dir, sub, "*_Chimap.nii.gz"):
            if how == "corrupt-gzip":
                raw = path.read_bytes()
                path.write_bytes(raw[: len(raw) // 2])
            else:
                img = nib.load(path)
                data = np.asarray(img.dataobj, dtype=np.float32)
                data = np.stack([data, data], axis=-1) if how == "4d-qsm" else np.full_like(data, np.nan)
                _save_like(path, data, img.affine)
            touched.append(path)
    elif how in ("empty-mask", "mismatched-mask-grid", "nonbinary-mask"):
        pattern = "*_desc-lesion_mask.nii.gz" if how == "nonbinary-mask" else "*_desc-*.nii.gz"
        for path in _files(deriv, sub, pattern):
            img = nib.load(path)
            data = np.asarray(img.dataobj)
            if how == "empty-mask":
                _save_like(path, np.zeros_like(data), img.affine)
            elif how == "mismatched-mask-grid":
                affine = img.affine.copy()
                affine[:3, 3] += affine[:3, :3] @ np.array([4.0, 4.0, 4.0])
                _save_like(path, np.ascontiguousarray(data[4:-4, 4:-4, 4:-4]), affine)
            else:
                soft = ndimage.gaussian_filter((data > 0).astype(np.float32), 1.0)
                _save_like(path, np.where(data > 0, np.maximum(soft, 0.5), soft * 0.9).astype(np.float32), img.affine)
                # without the instance map beside it, the mask is what a reader has to use
                dseg = path.with_name(path.name.replace("desc-lesion_mask", "desc-lesion_dseg"))
                dseg.unlink(missing_ok=True)
                dseg.with_name(dseg.name.replace(".nii.gz", ".json")).unlink(missing_ok=True)
            touched.append(path)
    else:
        raise ValueError(f"unknown breakage {how!r}; expected one of {HOWS}")
    return touched
