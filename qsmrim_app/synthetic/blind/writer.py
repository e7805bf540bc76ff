"""Writing a blind-family participant as BIDS (raw + lesion/rim derivatives) and its truth beside it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ...derivatives import write_json, write_nifti, write_tsv
from .participant import Participant

DERIVATIVE = "blind-lesions"
GENERATOR = "qsmrim-blind-family"


def truth_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}_truth"


def write_dataset_files(out_dir: Path, seed: int) -> None:
    out_dir = Path(out_dir)
    write_json(out_dir / "dataset_description.json", {
        "Name": "qsmrim blind family (semi-real QSM + FLAIR with annotated rim lesions)",
        "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "GeneratedBy": [{"Name": GENERATOR, "Description": f"python -m qsmrim_app.synthetic.blind, seed {seed}"}],
        "SourceDatasets": [{"URL": "https://github.com/muschellij2/open_ms_data"},
                           {"URL": "https://github.com/sylarMI/POCSnet1-2_QSM"},
                           {"URL": "https://github.com/TyrionJ/msQSM"},
                           {"URL": "https://github.com/Jinwei1209/FINE_demo"}]})
    write_json(out_dir / "derivatives" / DERIVATIVE / "dataset_description.json", {
        "Name": "Lesion instances and rim labels of the blind family", "BIDSVersion": "1.9.0",
        "DatasetType": "derivative", "GeneratedBy": [{"Name": GENERATOR}]})
    (out_dir / ".bidsignore").write_text("")


def write_participant(out_dir: Path, part: Participant, seed: int) -> None:
    """The participant's raw images, derivatives and truth files."""
    out_dir = Path(out_dir)
    anat = out_dir / f"sub-{part.label}" / "anat"
    prefix = anat / f"sub-{part.label}"
    qsm_affine, flair_affine = part.acquisition.qsm.affine, part.acquisition.flair.affine
    write_nifti(Path(f"{prefix}_Chimap.nii.gz"), part.qsm_ppm, qsm_affine, dtype=np.float32)
    write_json(Path(f"{prefix}_Chimap.json"), {"Units": "ppm", "MagneticFieldStrength": 3.0})
    write_nifti(Path(f"{prefix}_part-mag_T2starw.nii.gz"), part.magnitude, qsm_affine, dtype=np.float32)
    write_json(Path(f"{prefix}_part-mag_T2starw.json"), {"MagneticFieldStrength": 3.0,
                                                         "EchoTime": part.params["magnitude"]["te_ms"] / 1000})
    write_nifti(Path(f"{prefix}_FLAIR.nii.gz"), part.flair, flair_affine, dtype=np.float32)
    write_json(Path(f"{prefix}_FLAIR.json"), {"MagneticFieldStrength": 3.0})
    der = out_dir / "derivatives" / DERIVATIVE / f"sub-{part.label}" / "anat" / f"sub-{part.label}"
    write_nifti(Path(f"{der}_space-FLAIR_desc-lesion_dseg.nii.gz"), part.lesion_dseg, flair_affine, dtype=np.int32)
    write_nifti(Path(f"{der}_space-FLAIR_desc-rim_dseg.nii.gz"), part.rim_dseg, flair_affine, dtype=np.uint8)

    truth = truth_dir(out_dir) / f"sub-{part.label}"
    for name, image in part.truth_maps.items():
        write_nifti(truth / f"sub-{part.label}_space-QSM_{name}.nii.gz", image, qsm_affine,
                    dtype=np.int32 if name.endswith("dseg") else np.float32)
    acq = part.acquisition
    write_json(truth / "transforms.json", {
        "qsm_affine": qsm_affine, "flair_affine": flair_affine,
        "qsm_world_from_head": acq.qsm_from_head, "flair_world_from_qsm_world": acq.flair_from_qsm,
        "qsm_world_from_flair_world": np.linalg.inv(acq.flair_from_qsm),
        "b0_in_qsm_index_frame": acq.b0_index, "seed": seed})
    write_json(truth / "params.json", part.params)
    write_tsv(truth / "lesions.tsv", lesion_table(part.lesions))


def lesion_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    for column in table.columns:
        if table[column].map(lambda v: isinstance(v, (list, tuple))).any():
            table[column] = table[column].map(lambda v: json.dumps(v) if isinstance(v, (list, tuple)) else v)
    return table


def write_family_tables(out_dir: Path, parts_params: list[dict], truth_rows: list[pd.DataFrame]) -> None:
    out_dir = Path(out_dir)
    participants = pd.DataFrame([{
        "participant_id": f"sub-{p['subject']}", "family": "blind", "background": p["background"],
        "qsm_voxel_mm": "x".join(f"{v:.3g}" for v in p["qsm_voxel_mm"]), "flair_mode": p["flair_mode"],
        "through_field": p["through_field"], "inversion": p["inversion"]} for p in parts_params])
    write_tsv(out_dir / "participants.tsv", participants)
    write_json(out_dir / "participants.json", {
        "family": {"Description": "Generator family of this synthetic participant (the blind family)"},
        "background": {"Description": "Real susceptibility map used as background"}})
    if truth_rows:
        write_tsv(truth_dir(out_dir) / "lesions.tsv", pd.concat(truth_rows, ignore_index=True))
