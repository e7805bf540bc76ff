"""LST-AI's two output layouts, built from a binary lesion mask exactly as the tools write them.

- LST-AI itself (``lst --output <dir>/sub-<label>[/ses-<label>]``): bare names ``space-flair_seg-lst.nii.gz``
  (older versions ``space-orig_seg-lst.nii.gz``), ``space-flair_desc-annotated_seg-lst.nii.gz`` (lesion
  location classes 1-4), ``lesion_stats.csv``, ``annotated_lesion_stats.csv``; with ``--probability_map``
  and ``--temp`` the ensemble's map ``sub-X_ses-Y_space-FLAIR_seg-lst_prob.nii.gz`` in the temp folder.
- Its authors' BIDS wrapper (LST-AI_BIDS ``run_lst_ai.py``): ``<deriv>/sub-<l>/ses-<l>/anat/`` holds
  ``sub-<l>_ses-<l>_space-FLAIR_label-lesion_mask.nii.gz``, ``..._space-FLAIR_desc-annotated_label-lesion_mask``
  and the renamed stats; ``<deriv>/sub-<l>/ses-<l>/temp/`` keeps the intermediates renamed to
  ``sub-<l>_ses-<l>_<name>`` (a FLAIR, a T1w, MNI-space images).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def _annotated(mask_path: Path, out: Path) -> None:
    """LST-AI's annotated mask: each lesion painted with a location class 1..4 (not an instance id)."""
    img = nib.load(str(mask_path))
    components, _ = ndimage.label(np.asanyarray(img.dataobj) > 0, np.ones((3, 3, 3)))
    classes = np.where(components > 0, (components % 4) + 1, 0).astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(classes, img.affine), str(out))


def _stats(folder: Path, prefix: str = "") -> None:
    (folder / f"{prefix}lesion_stats.csv").write_text("Num_Lesions,Lesion_Volume\n3,1234.0\n")
    (folder / f"{prefix}annotated_lesion_stats.csv").write_text("Region,Num_Lesions,Lesion_Volume\nPeriventricular,1,10\n")


def write_lstai_output(root: Path, subject: str, session: str | None, mask: Path, *, old_names: bool = False,
                       probability: Path | None = None) -> Path:
    """LST-AI's own --output folder for one participant; returns the binary mask's path."""
    folder = root / f"sub-{subject}" / (f"ses-{session}" if session else "")
    folder.mkdir(parents=True, exist_ok=True)
    space = "orig" if old_names else "flair"
    target = folder / f"space-{space}_seg-lst.nii.gz"
    shutil.copyfile(mask, target)
    _annotated(mask, folder / f"space-{space}_desc-annotated_seg-lst.nii.gz")
    _stats(folder)
    if probability is not None:
        (folder / "temp").mkdir(exist_ok=True)
        shutil.copyfile(probability, folder / "temp" / "sub-X_ses-Y_space-FLAIR_seg-lst_prob.nii.gz")
    return target


def write_lstai_bids(root: Path, subject: str, session: str | None, mask: Path, flair: Path | None = None,
                     description: bool = True) -> Path:
    """The BIDS wrapper's derivative folder for one participant; returns the binary mask's path."""
    if description and not (root / "dataset_description.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        (root / "dataset_description.json").write_text(json.dumps(
            {"Name": "LST-AI", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
             "GeneratedBy": [{"Name": "LST-AI", "Version": "1.1.0"}]}))
    unit = root / f"sub-{subject}" / (f"ses-{session}" if session else "")
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    anat, temp = unit / "anat", unit / "temp"
    anat.mkdir(parents=True, exist_ok=True)
    temp.mkdir(parents=True, exist_ok=True)
    target = anat / f"{prefix}_space-FLAIR_label-lesion_mask.nii.gz"
    shutil.copyfile(mask, target)
    _annotated(mask, anat / f"{prefix}_space-FLAIR_desc-annotated_label-lesion_mask.nii.gz")
    _stats(anat, f"{prefix}_")
    # the intermediates the wrapper keeps, renamed from LST-AI's sub-X_ses-Y_* names
    for name in ("space-flair_FLAIR", "space-flair_desc-stripped_FLAIR", "space-t1w_T1w", "space-mni_seg-lst"):
        source = flair if flair is not None and "FLAIR" in name else mask
        shutil.copyfile(source, temp / f"{prefix}_{name}.nii.gz")
    return target
