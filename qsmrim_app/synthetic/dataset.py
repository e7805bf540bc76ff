"""Write phantom subjects as a BIDS dataset, a lesion-mask derivative and truth tables outside BIDS."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .. import __version__
from .anatomy import SIZES, Anatomy, draw_counts, make_anatomy, rng_for
from .simulate import SessionImages, simulate_session

BIDS_VERSION = "1.9.0"
DERIV_NAME = "lesions"
_TOP_LEVEL = ("dataset_description.json", "participants.tsv", "participants.json", "README")

QSM_SIDECAR = {"Units": "ppm", "MagneticFieldStrength": 3, "EchoTime": [0.006, 0.012, 0.018, 0.024, 0.030],
               "RepetitionTime": 0.035, "FlipAngle": 15, "MRAcquisitionType": "3D", "Manufacturer": "qsmrim-synth",
               "QSMMethod": "TKD (threshold 0.18) of the simulated local field", "B0Direction": "scanner z"}
MAG_SIDECAR = {"MagneticFieldStrength": 3, "EchoTime": 0.018, "RepetitionTime": 0.035, "FlipAngle": 15,
               "MRAcquisitionType": "3D", "Manufacturer": "qsmrim-synth"}
FLAIR_SIDECAR = {"MagneticFieldStrength": 3, "EchoTime": 0.387, "RepetitionTime": 5.0, "InversionTime": 1.8,
                 "MRAcquisitionType": "3D", "Manufacturer": "qsmrim-synth"}


def subject_label(index: int, n_subjects: int) -> str:
    return f"{index + 1:0{max(2, len(str(n_subjects)))}d}"


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_truth(truth_dir: Path, lesion_rows: list[dict], units: tuple[str, list[dict]], transforms: dict) -> None:
    """The truth folder's tables: lesions.tsv, <units>.tsv (subjects or sessions) and transforms.json."""
    pd.DataFrame(lesion_rows).to_csv(truth_dir / "lesions.tsv", sep="\t", index=False, float_format="%.4f")
    pd.DataFrame(units[1]).to_csv(truth_dir / f"{units[0]}.tsv", sep="\t", index=False)
    _write_json(truth_dir / "transforms.json", transforms)


def _write_pair(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type, sidecar: dict) -> None:
    _write_nifti(path, data, affine, dtype)
    _write_json(path.with_name(path.name.replace(".nii.gz", ".json")), sidecar)


def write_session(bids: Path, sub: str, ses: str | None, images: SessionImages) -> None:
    """Raw images under sub-XX[/ses-YY]/anat and lesion masks under derivatives/lesions."""
    rel = Path(f"sub-{sub}") / (f"ses-{ses}" if ses else "") / "anat"
    stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    anat, deriv = bids / rel, bids / "derivatives" / DERIV_NAME / rel
    _write_pair(anat / f"{stem}_Chimap.nii.gz", images.qsm_ppm, images.qsm_affine, np.float32, QSM_SIDECAR)
    if images.magnitude is not None:
        _write_pair(anat / f"{stem}_part-mag_T2starw.nii.gz", np.round(images.magnitude * 1000), images.qsm_affine,
                    np.int16, MAG_SIDECAR)
    _write_pair(anat / f"{stem}_FLAIR.nii.gz", np.round(images.flair * 1000), images.flair_affine, np.int16,
                FLAIR_SIDECAR)
    flair_uri = f"bids:raw:{(rel / f'{stem}_FLAIR.nii.gz').as_posix()}"
    common = {"Sources": [flair_uri], "SpatialReference": flair_uri}
    _write_pair(deriv / f"{stem}_desc-lesion_mask.nii.gz", images.flair_lesions > 0, images.flair_affine, np.uint8,
                {**common, "Type": "Lesion", "Description": "binary MS lesion mask in FLAIR space"})
    _write_pair(deriv / f"{stem}_desc-lesion_dseg.nii.gz", images.flair_lesions, images.flair_affine, np.int32,
                {**common, "Description": "one integer per lesion (lesion_id); confluent lesions stay split"})
    _write_pair(deriv / f"{stem}_desc-rim_dseg.nii.gz", images.rim_dseg, images.flair_affine, np.uint8,
                {**common, "Description": "rim annotation per lesion", "Labels": {"0": "background",
                                                                                  "1": "rim-", "2": "rim+"}})


def _write_top_level(bids: Path, participants: pd.DataFrame, seed: int, size: str, fraction: float) -> None:
    generated = [{"Name": "qsmrim-synth", "Version": __version__,
                  "Description": f"seed={seed} size={size} rimplus_fraction={fraction}"}]
    _write_json(bids / "dataset_description.json", {
        "Name": "qsmrim-synth phantom MS dataset", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
        "License": "CC0", "GeneratedBy": generated})
    participants.to_csv(bids / "participants.tsv", sep="\t", index=False)
    _write_json(bids / "participants.json", {"age": {"Description": "age", "Units": "year"},
                                             "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
                                             "group": {"Description": "diagnosis"}})
    (bids / "README").write_text(
        "Synthetic MS phantom made by qsmrim-synth: QSM (Chimap, ppm) from a dipole forward model and TKD\n"
        "inversion, a T2*-weighted magnitude, and a FLAIR on its own grid. Lesion masks (FLAIR space) are in\n"
        "derivatives/lesions. Not real patients; ground truth is kept outside this dataset.\n")
    _write_json(bids / "derivatives" / DERIV_NAME / "dataset_description.json", {
        "Name": "Lesion masks and rim annotations (phantom ground truth)", "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative", "GeneratedBy": generated, "DatasetLinks": {"raw": "../../"}})


def _prepare(out_dir: Path, truth_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty output unless asked; with `overwrite`, remove only what we would write."""
    for path in (out_dir, truth_dir):
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{path} is not empty (use --overwrite to replace a phantom dataset)")
            stale = [*path.glob("sub-*"), path / "derivatives" / DERIV_NAME,
                     *(path / name for name in _TOP_LEVEL + ("lesions.tsv", "subjects.tsv", "transforms.json"))]
            for item in stale:
                if item.is_dir():
                    shutil.rmtree(item)
                elif item.exists():
                    item.unlink()
        path.mkdir(parents=True, exist_ok=True)


def draw_subject(seed: int, i: int, n_subjects: int, spec, rimplus_fraction: float
                 ) -> tuple[str, Anatomy, float, dict]:
    """Subject i's label, anatomy (lesion counts drawn from stream 0, anatomy from stream 1), deep-grey-matter
    iron factor and participants.tsv row: what every phantom generator (plain, longitudinal) draws first."""
    sub = subject_label(i, n_subjects)
    n_lesions, n_rim = draw_counts(rng_for(seed, i, 0), spec, rimplus_fraction)
    rng = rng_for(seed, i, 1)
    anat = make_anatomy(rng, spec, n_lesions, n_rim)
    deep_iron = float(rng.uniform(0.8, 1.2))
    participant = {"participant_id": f"sub-{sub}", "age": int(rng.integers(20, 65)),
                   "sex": str(rng.choice(["F", "M"], p=[0.7, 0.3])), "group": "MS"}
    return sub, anat, deep_iron, participant


def generate_dataset(out_dir: Path, n_subjects: int, seed: int = 0, size: str = "small", sessions: int = 1,
                     magnitude: bool = True, truth_dir: Path | None = None, rimplus_fraction: float = 0.0425,
                     overwrite: bool = False) -> Path:
    """Write a deterministic phantom BIDS dataset to `out_dir`; return the truth directory.

    Subject i depends only on (seed, i), so adding subjects never changes the earlier ones.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}")
    if n_subjects < 1 or sessions < 1 or not 0.0 <= rimplus_fraction <= 1.0:
        raise ValueError("need n_subjects >= 1, sessions >= 1 and 0 <= rimplus_fraction <= 1")
    out_dir = Path(out_dir)
    truth_dir = Path(truth_dir) if truth_dir else out_dir.with_name(out_dir.name + "_truth")
    _prepare(out_dir, truth_dir, overwrite)
    spec = SIZES[size]
    lesion_rows, subject_rows, participants, transforms = [], [], [], {}
    for i in range(n_subjects):
        sub, anat, deep_iron, participant = draw_subject(seed, i, n_subjects, spec, rimplus_fraction)
        participants.append(participant)
        for s in range(sessions):
            ses = f"{s + 1:02d}" if sessions > 1 else None
            images = simulate_session(anat, spec, rng_for(seed, i, 2 + s), deep_iron, magnitude)
            write_session(out_dir, sub, ses, images)
            ses_value = f"ses-{ses}" if ses else "n/a"
            for row in images.lesions:
                lesion_rows.append({"participant_id": f"sub-{sub}", "session": ses_value, **row})
            subject_rows.append({"participant_id": f"sub-{sub}", "session": ses_value,
                                 "n_lesions": len(images.lesions),
                                 "n_rimplus": sum(r["rim_positive"] for r in images.lesions)})
            transforms.setdefault(f"sub-{sub}", {})[ses_value] = {
                "flair_to_qsm_world": images.flair_to_qsm.tolist(),
                "flair_affine": images.flair_affine.tolist(), "qsm_affine": images.qsm_affine.tolist(),
                "head_to_qsm_world": images.head_to_scanner.tolist()}
    _write_top_level(out_dir, pd.DataFrame(participants), seed, size, rimplus_fraction)
    write_truth(truth_dir, lesion_rows, ("subjects", subject_rows), {
        "convention": ("flair_to_qsm_world is a 4x4 rigid matrix M with x_qsm = M @ [x_flair, 1], both in the "
                       "NIfTI world (RAS+, mm) of the respective image affine; FLAIR voxel -> QSM voxel is "
                       "inv(qsm_affine) @ M @ flair_affine. Lesion centroids in lesions.tsv: centroid_* in "
                       "FLAIR world, qsm_centroid_* in QSM world."),
        "subjects": transforms})
    return truth_dir
