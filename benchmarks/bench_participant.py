"""Stage times of the participant level on one generated full-size participant.

Runs the same plain functions the nipype nodes call, one stage after another, on a `--size full`
phantom (1 mm FLAIR 256x256x176, anisotropic QSM, 50-80 lesions), then the whole participant level
through the command line (nipype overhead included). Writes ``benchmarks/results/participant.json``.

    python benchmarks/bench_participant.py [--nprocs 2] [--out benchmarks/results/participant.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent


def timed(times: dict, name: str, func, *args, **kwargs):
    start = time.perf_counter()
    result = func(*args, **kwargs)
    times[name] = round(time.perf_counter() - start, 3)
    print(f"{name:28s} {times[name]:8.2f} s", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "participant.json")
    args = parser.parse_args(argv)

    from qsmrim_app.config import RADIOMICS_PARAMS
    from qsmrim_app.lesions import label_instances, lesion_geometry
    from qsmrim_app.patches import extract_patches, normalise_flair
    from qsmrim_app.radial import radial_table
    from qsmrim_app.reference import local_references
    from qsmrim_app.qsm import brain_mask, to_ppb
    from qsmrim_app.radiomics import extract_lesion_features, load_params
    from qsmrim_app.registration import n4_correct, register_flair_to_qsm, resample_to_reference
    from qsmrim_app.synthetic import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        times: dict[str, float] = {}
        timed(times, "generate_full_phantom", generate_dataset, tmp / "bids", n_subjects=1, seed=7, size="full")
        anat = tmp / "bids" / "sub-01" / "anat"
        masks = tmp / "bids" / "derivatives" / "lesions" / "sub-01" / "anat"
        qsm_img = nib.load(anat / "sub-01_Chimap.nii.gz")
        flair = sitk.ReadImage(str(anat / "sub-01_FLAIR.nii.gz"), sitk.sitkFloat32)
        magnitude = sitk.ReadImage(str(anat / "sub-01_part-mag_T2starw.nii.gz"), sitk.sitkFloat32)
        lesion_mask = sitk.ReadImage(str(masks / "sub-01_desc-lesion_dseg.nii.gz"))

        qsm = to_ppb(np.asarray(qsm_img.dataobj), "ppm")
        brain = brain_mask(qsm)
        flair_n4, _ = timed(times, "n4_flair", n4_correct, flair)
        magnitude_n4, _ = timed(times, "n4_magnitude", n4_correct, magnitude)
        result = timed(times, "registration", register_flair_to_qsm, magnitude_n4, flair_n4, threads=args.nprocs)
        flair_q = timed(times, "resample_flair", resample_to_reference, flair_n4, magnitude, result.transform, "bspline")
        mask_q = timed(times, "resample_mask", resample_to_reference, lesion_mask, magnitude, result.transform, "nearest")
        # SimpleITK arrays are (k, j, i); the app works in nibabel's (i, j, k).
        flair_arr = np.transpose(sitk.GetArrayFromImage(flair_q), (2, 1, 0))
        mask_arr = np.transpose(sitk.GetArrayFromImage(mask_q), (2, 1, 0))
        lesions = timed(times, "lesion_instances", label_instances, mask_arr, 10, True)
        timed(times, "lesion_geometry", lesion_geometry, lesions.labels, qsm_img.affine)
        flair_norm = normalise_flair(flair_arr, brain, lesions.labels > 0)
        patchset = timed(times, "patches", extract_patches, qsm, flair_norm, lesions.labels, list(lesions.lesion_ids),
                         qsm_img.affine)
        zooms_ = tuple(float(z) for z in qsm_img.header.get_zooms()[:3])
        reference, _ = timed(times, "reference", local_references, qsm, lesions.labels, brain,
                             list(lesions.lesion_ids), zooms_)
        timed(times, "radial", radial_table, patchset.patches, reference, patchset.grid.spacing_mm)
        zooms = tuple(float(z) for z in qsm_img.header.get_zooms()[:3])
        timed(times, "radiomics", extract_lesion_features, qsm, lesions.labels, zooms, list(lesions.lesion_ids),
              load_params(RADIOMICS_PARAMS), nprocs=args.nprocs)
        stage_total = sum(v for k, v in times.items() if k != "generate_full_phantom")

        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "run.py"), str(tmp / "bids"), str(tmp / "out"),
                               "participant", "--no-classify", "--nprocs", str(args.nprocs),
                               "-w", str(tmp / "work")], capture_output=True, text=True)
        app_wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            return 1
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        record = {
            "what": "participant level on one --size full phantom (no classification)",
            "lesions": len(lesions.lesion_ids),
            "flair_grid": list(flair.GetSize()), "qsm_grid": list(qsm_img.shape),
            "qsm_voxel_mm": [round(z, 3) for z in zooms],
            "stage_seconds": times, "stages_total_seconds": round(stage_total, 2),
            "app_participant_wall_seconds": round(app_wall, 2),
            "app_peak_rss_mb_children": round(child.ru_maxrss / 1024, 1),
            "nprocs": args.nprocs, "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
            "python": platform.python_version(), "machine": platform.machine(),
            "registration_metric_after": result.metric_after,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
