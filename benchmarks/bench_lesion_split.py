"""Confluent-lesion splitting on the real Ljubljana expert masks: merge test, counts, time.

Real MS lesion masks (open_ms_data, Lesjak et al. 2017; 20 patients, 1 mm MNI grid) have real
confluent periventricular lesions, but no instance maps. So we make confluence with a known answer:
each patient's mask is dilated by 1, 2 and 3 mm so that neighbouring lesions merge; the original
26-connected components are the truth. Over the original lesions that actually merged with another
one, we count how many are recovered as their own lesion (a split lesion whose centroid lies within
3 mm of the original's, matched one to one) by ``lesion_split.split_lesions`` against connected
components alone. We also report the lesion-count distribution of the undilated masks with and
without splitting, and the time per participant, against the obvious alternative (one whole-volume
Hessian), and write ``benchmarks/results/lesion_split.json``. Times are CPU seconds of this process
(``time.process_time``): the machine is shared, and wall-clock times under load mean little.

    python benchmarks/bench_lesion_split.py [--data ../shared/data] [--dilations 1 2 3] [--sigmas 1.25]
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
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from qsmrim_app.lesion_split import SplitParams, hessian_max_eigenvalue, split_lesions, voxel_sizes

REPO = Path(__file__).resolve().parent.parent
MASK_NAME = "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz"
MATCH_MM = 3.0
STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def centroids_mm(labels: np.ndarray, n: int, zooms: tuple[float, float, float]) -> np.ndarray:
    """Centroid (mm, grid frame) of labels 1..n; NaN rows for absent labels."""
    index = np.arange(1, n + 1)
    com = np.asarray(ndimage.center_of_mass(np.ones(labels.shape), labels, index), dtype=float).reshape(-1, 3)
    return com * np.asarray(zooms)


def dilate(mask: np.ndarray, zooms: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Every voxel within ``radius_mm`` of the mask (Euclidean, in mm)."""
    return ndimage.distance_transform_edt(~mask, sampling=zooms) <= radius_mm


def recovered(truth_xyz: np.ndarray, found_xyz: np.ndarray) -> int:
    """Original lesions matched one to one by a found lesion within MATCH_MM (Hungarian matching)."""
    if len(truth_xyz) == 0 or len(found_xyz) == 0:
        return 0
    dist = np.linalg.norm(truth_xyz[:, None, :] - found_xyz[None, :, :], axis=-1)
    cost = np.where(dist <= MATCH_MM, dist, 1e6)
    rows, cols = linear_sum_assignment(cost)
    return int(np.sum(dist[rows, cols] <= MATCH_MM))


def merge_test(mask: np.ndarray, zooms: tuple[float, float, float], radius_mm: float, params: SplitParams) -> dict:
    original, n_orig = ndimage.label(mask, STRUCTURE)
    orig_xyz = centroids_mm(original, n_orig, zooms)
    dilated = dilate(mask, zooms, radius_mm)
    components, n_comp = ndimage.label(dilated, STRUCTURE)
    # which dilated component each original lesion fell into (an original is inside exactly one)
    host = ndimage.labeled_comprehension(components, original, np.arange(1, n_orig + 1), np.max, int, 0)
    per_comp = np.bincount(host, minlength=n_comp + 1)
    merged_comps = np.flatnonzero(per_comp >= 2)
    merged_orig = np.flatnonzero(np.isin(host, merged_comps))  # indices into 0..n_orig-1
    comp_xyz = centroids_mm(components, n_comp, zooms)
    start = time.process_time()
    split = split_lesions(dilated, zooms, params=params)
    seconds = time.process_time() - start
    split_xyz = centroids_mm(split.labels, split.n_lesions, zooms)
    split_host = ndimage.labeled_comprehension(components, split.labels, np.arange(1, split.n_lesions + 1),
                                               np.max, int, 0)
    # over-splitting: an original lesion alone in its dilated component should stay one lesion
    pieces = np.bincount(split_host, minlength=n_comp + 1)
    alone = np.flatnonzero(per_comp == 1)
    alone = alone[alone > 0]
    rec_split = rec_cc = 0
    for comp in merged_comps:
        truth = orig_xyz[host == comp]
        rec_split += recovered(truth, split_xyz[split_host == comp])
        rec_cc += recovered(truth, comp_xyz[[comp - 1]])
    return {"original_lesions": int(n_orig), "dilated_components": int(n_comp),
            "merged_components": int(merged_comps.size), "merged_original_lesions": int(merged_orig.size),
            "recovered_split": rec_split, "recovered_components": rec_cc,
            "lesions_after_split": split.n_lesions, "isolated_lesions": int(alone.size),
            "isolated_kept_whole": int(np.sum(pieces[alone] == 1)), "split_cpu_seconds": round(seconds, 3)}


def whole_volume_alternative(mask: np.ndarray, zooms: tuple[float, float, float], sigma_mm: float) -> dict:
    """The obvious alternative, one Hessian over the whole volume, against the per-component boxes.

    Memory is reported as the float64 arrays each way must hold at once (the map and one filter
    output; a naive whole-volume Hessian holding all six entries needs six): tracing allocations
    would slow the many small box computations far more than it measures.
    """
    start = time.process_time()
    hessian_max_eigenvalue(mask.astype(np.float64), mask, zooms, sigma_mm)
    whole_seconds = time.process_time() - start
    start = time.process_time()
    split_lesions(mask, zooms, params=SplitParams(sigma_mm=sigma_mm))
    box_seconds = time.process_time() - start
    components, _ = ndimage.label(mask, STRUCTURE)
    reach = [int(4.0 * sigma_mm / z + 0.5) + 1 for z in zooms]
    largest = max(int(np.prod([min(s.stop + r, n) - max(s.start - r, 0) for s, r, n in zip(box, reach, mask.shape)]))
                  for box in ndimage.find_objects(components))
    mb = lambda voxels, arrays: round(arrays * voxels * 8 / 2**20, 1)  # noqa: E731
    return {"whole_volume_cpu_seconds": round(whole_seconds, 3), "per_component_boxes_cpu_seconds": round(box_seconds, 3),
            "volume_voxels": int(mask.size), "largest_box_voxels": largest,
            "whole_volume_mb_two_arrays": mb(mask.size, 2), "whole_volume_mb_six_entries": mb(mask.size, 7),
            "whole_volume_mb_six_entries_at_0.5mm": mb(mask.size * 8, 7),
            "largest_box_mb_two_arrays": mb(largest, 2)}


def summary(values: list[int]) -> dict:
    arr = np.asarray(values)
    return {"total": int(arr.sum()), "median": float(np.median(arr)), "min": int(arr.min()), "max": int(arr.max()),
            "per_patient": [int(v) for v in arr]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("QSMRIM_SHARED_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--dilations", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1.25])
    parser.add_argument("--min-centres", type=float, nargs="+", default=[10.0], help="minimum centre sizes (mm^3)")
    parser.add_argument("--patients", type=int, default=None, help="only the first N patients (smoke test)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lesion_split.json")
    args = parser.parse_args(argv)

    patients = sorted((args.data / "open_ms_data").glob("patient*/" + MASK_NAME))[: args.patients]
    if not patients:
        print(f"no Ljubljana masks under {args.data / 'open_ms_data'}", file=sys.stderr)
        return 1
    masks = []
    for path in patients:
        img = nib.load(str(path))
        masks.append((path.parent.name, np.asanyarray(img.dataobj) > 0, voxel_sizes(img.affine)))

    results: dict = {"what": __doc__.splitlines()[0], "data": "open_ms_data (Lesjak et al. 2017), "
                     f"{len(masks)} expert consensus masks, {masks[0][1].shape} at {masks[0][2]} mm",
                     "match_mm": MATCH_MM, "runs": []}
    for sigma, min_centre in [(s, m) for s in args.sigmas for m in args.min_centres]:
        params = SplitParams(sigma_mm=sigma, min_centre_mm3=min_centre)
        run = {"sigma_mm": sigma, "min_centre_mm3": params.min_centre_mm3, "merge_test": {}}
        cc_counts, split_counts, seconds = [], [], []
        for name, mask, zooms in masks:
            cc_counts.append(int(ndimage.label(mask, STRUCTURE)[1]))
            start = time.process_time()
            split_counts.append(split_lesions(mask, zooms, params=params).n_lesions)
            seconds.append(time.process_time() - start)
        run["counts_undilated"] = {"components": summary(cc_counts), "split": summary(split_counts)}
        run["cpu_seconds_per_participant"] = {"median": round(float(np.median(seconds)), 3),
                                          "max": round(float(np.max(seconds)), 3),
                                          "per_patient": [round(s, 3) for s in seconds]}
        for radius in args.dilations:
            rows = [merge_test(mask, zooms, radius, params) | {"patient": name} for name, mask, zooms in masks]
            merged = sum(r["merged_original_lesions"] for r in rows)
            run["merge_test"][f"{radius:g}mm"] = {
                "merged_original_lesions": merged,
                "recovered_split": sum(r["recovered_split"] for r in rows),
                "recovered_components": sum(r["recovered_components"] for r in rows),
                "fraction_recovered_split": round(sum(r["recovered_split"] for r in rows) / max(merged, 1), 3),
                "fraction_recovered_components": round(sum(r["recovered_components"] for r in rows) / max(merged, 1), 3),
                "original_lesions": sum(r["original_lesions"] for r in rows),
                "components_after_dilation": sum(r["dilated_components"] for r in rows),
                "lesions_after_split": sum(r["lesions_after_split"] for r in rows),
                "fraction_isolated_kept_whole": round(sum(r["isolated_kept_whole"] for r in rows)
                                                      / max(sum(r["isolated_lesions"] for r in rows), 1), 3),
                "per_patient": rows,
            }
            print(f"sigma {sigma} mm, centre >= {min_centre} mm3, dilation {radius:g} mm: {run['merge_test'][f'{radius:g}mm']['fraction_recovered_split']}"
                  f" recovered by splitting vs {run['merge_test'][f'{radius:g}mm']['fraction_recovered_components']}"
                  f" by components ({merged} merged lesions); {run['merge_test'][f'{radius:g}mm']['lesions_after_split']}"
                  f" lesions for {run['merge_test'][f'{radius:g}mm']['original_lesions']} originals;"
                  f" isolated kept whole {run['merge_test'][f'{radius:g}mm']['fraction_isolated_kept_whole']};"
                  f" undilated: {sum(split_counts)} split vs {sum(cc_counts)} components", flush=True)
        results["runs"].append(run)
    biggest = max(masks, key=lambda m: int(m[1].sum()))
    results["whole_volume_hessian"] = {"patient": biggest[0], **whole_volume_alternative(biggest[1], biggest[2], 1.25)}
    results["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "load_average": [round(x, 2) for x in os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
