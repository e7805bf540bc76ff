"""Bounding-box crop vs whole-volume pyradiomics on real lesions: speed and identity.

Real expert lesion masks (open_ms_data, Lesjak et al. 2017) are placed on the grid of a real in-vivo
QSM (2016 QSM challenge COSMOS, ppm -> ppb). For the same lesions we time
``extract_lesion_features(crop=False)`` (plain pyradiomics on the whole volume, one lesion at a
time) against ``crop=True`` (the app's path), check the 527 values are identical, and write
``benchmarks/results/radiomics.json``.

    python benchmarks/bench_radiomics.py [--lesions 20] [--patient patient07] [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmrim_app import radiomics as rad
from qsmrim_app.lesions import label_instances

REPO = Path(__file__).resolve().parent.parent
MASK_NAME = "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz"


def _load(data: Path, patient: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], int]:
    qsm_img = nib.load(data / "qsm_challenge_2016" / "chi_cosmos.nii.gz")
    qsm_ppb = np.asarray(qsm_img.dataobj, dtype=np.float64) * 1000.0
    mask = np.asarray(nib.load(data / "open_ms_data" / patient / MASK_NAME).dataobj)
    # The central part of the 182x218x182 MNI mask, the size of the 160^3 QSM grid.
    offset = [(m - q) // 2 for m, q in zip(mask.shape, qsm_ppb.shape)]
    mask = mask[tuple(slice(o, o + q) for o, q in zip(offset, qsm_ppb.shape))]
    instances = label_instances(mask, min_voxels=10)
    spacing = tuple(float(z) for z in qsm_img.header.get_zooms()[:3])
    return qsm_ppb, instances.labels, spacing, len(instances.lesion_ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--patient", default="patient07")
    parser.add_argument("--lesions", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "radiomics.json")
    args = parser.parse_args(argv)

    params = rad.load_params()
    qsm, instances, spacing, n_total = _load(args.data, args.patient)
    sizes = np.bincount(instances.ravel())
    ids = [int(i) for i in np.flatnonzero(sizes)[1:]]
    # Spread the chosen lesions over the size range (sorted by size, evenly spaced picks).
    by_size = sorted(ids, key=lambda i: (sizes[i], i))
    picks = np.unique(np.linspace(0, len(by_size) - 1, min(args.lesions, len(by_size))).round().astype(int))
    chosen = sorted(by_size[p] for p in picks)

    rad.extract_lesion_features(qsm, instances, spacing, chosen[:1], params)  # warm imports and caches

    start = time.perf_counter()
    cropped = rad.extract_lesion_features(qsm, instances, spacing, chosen, params, crop=True)
    t_crop = time.perf_counter() - start
    start = time.perf_counter()
    whole = rad.extract_lesion_features(qsm, instances, spacing, chosen, params, crop=False)
    t_whole = time.perf_counter() - start

    a, b = cropped.to_numpy(), whole.to_numpy()
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(divide="ignore", invalid="ignore"):
        max_rel = float(np.nanmax(np.where(same, 0.0, np.abs(a - b) / np.abs(b))))
    result = {
        "what": "527 pyradiomics features per lesion: bbox+margin crop vs whole-volume pyradiomics",
        "data": {
            "qsm": "qsm_challenge_2016/chi_cosmos.nii.gz (ppm -> ppb)",
            "lesions": f"open_ms_data/{args.patient} expert mask, central {list(qsm.shape)} voxels",
            "grid": list(qsm.shape),
            "spacing_mm": list(spacing),
            "lesions_in_mask": n_total,
        },
        "lesions": len(chosen),
        "lesion_voxels": {"min": int(sizes[chosen].min()), "median": float(np.median(sizes[chosen])), "max": int(sizes[chosen].max())},
        "crop_margin_voxels": rad.CROP_MARGIN,
        "n_features": int(a.shape[1] - 1),
        "seconds_crop": round(t_crop, 3),
        "seconds_whole_volume": round(t_whole, 3),
        "seconds_per_lesion_crop": round(t_crop / len(chosen), 4),
        "seconds_per_lesion_whole_volume": round(t_whole / len(chosen), 4),
        "speedup": round(t_whole / t_crop, 1),
        "identical": bool(same.all()),
        "differing_values": int((~same).sum()),
        "max_relative_difference": max_rel,
        "nan_values": int(np.isnan(a).sum()),
        "nprocs": 1,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(result, indent=2))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
