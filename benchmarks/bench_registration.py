"""Time N4 and FLAIR->QSM registration on the real 1 mm FLAIR (open_ms_data patient07) at full resolution.

The "QSM-like" fixed image is the FLAIR rotated (5, -4, 6 degrees), shifted (6, -4, 7 mm), resampled onto a
0.9 x 0.9 x 2.5 mm grid with permuted axes and contrast-inverted, so accuracy is measured against a known
transform at the same time. Writes benchmarks/results/registration.json. Wall times depend on how busy the machine is (the load
average is recorded); CPU seconds summed over ITK threads are the steadier figure.

    python benchmarks/bench_registration.py [--data ../shared/data] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from qsmrim_app.registration import n4_correct, register_flair_to_qsm

REPO = Path(__file__).resolve().parent.parent
FLAIR = "open_ms_data/patient07/FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"
LESIONS = "open_ms_data/patient07/GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz"


def biased(image: sitk.Image) -> tuple[sitk.Image, np.ndarray]:
    """The image times a smooth known field (x1.7 across the brain) and that field's log."""
    data = sitk.GetArrayFromImage(image)
    z, y, x = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in data.shape], indexing="ij")
    log_bias = 0.25 * x + 0.15 * y - 0.2 * z + 0.2 * x * y - 0.15 * z * z
    out = sitk.GetImageFromArray((data * np.exp(log_bias)).astype(np.float32))
    out.CopyInformation(image)
    return out, log_bias


def bench_n4(flair: sitk.Image, repeats: int) -> dict:
    corrupted, true_log = biased(flair)
    seconds, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        corrected, bias = n4_correct(corrupted)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    clean = sitk.GetArrayFromImage(flair)
    brain = clean > np.percentile(clean[clean > 0], 10)
    low, high = np.percentile(clean[brain], [30, 70])
    wm = brain & (clean > low) & (clean < high)

    def cv(values: np.ndarray) -> float:
        return float(values[wm].std() / values[wm].mean())

    return {
        "size": list(flair.GetSize()),
        "seconds": seconds,
        "seconds_median": statistics.median(seconds),
        "cpu_seconds_median": statistics.median(cpu),  # all ITK threads; less sensitive to a busy machine
        "bias_log_correlation_in_brain": float(
            np.corrcoef(np.log(sitk.GetArrayFromImage(bias)[brain]), true_log[brain])[0, 1]
        ),
        "wm_cv_clean": cv(clean),
        "wm_cv_biased": cv(sitk.GetArrayFromImage(corrupted)),
        "wm_cv_corrected": cv(sitk.GetArrayFromImage(corrected)),
    }


def qsm_like_case(flair: sitk.Image, offset_mm: float) -> tuple[sitk.Image, sitk.Image, sitk.Transform]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(flair > 0, sitk.sitkUInt8))
    centre = np.array(stats.GetCentroid(1))
    truth = sitk.Euler3DTransform()
    truth.SetCenter(tuple(centre))
    truth.SetRotation(*np.deg2rad([5.0, -4.0, 6.0]))
    truth.SetTranslation((6.0, -4.0, 7.0))
    spacing = np.array([0.9, 0.9, 2.5])
    direction = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    size = [int(np.ceil(200.0 / s)) for s in spacing]
    origin = centre - direction @ (np.array(size) * spacing / 2)
    grid = sitk.Resample(flair, size, truth, sitk.sitkLinear, tuple(origin), tuple(spacing),
                         tuple(direction.ravel()), 0.0, sitk.sitkFloat32)
    data = sitk.GetArrayFromImage(grid)
    inside = data > 5
    noise = np.random.default_rng(0).normal(0, 2.0, data.shape)
    fixed = sitk.GetImageFromArray((np.where(inside, 1.3 * np.percentile(data[inside], 99) - data, 0) + noise)
                                   .astype(np.float32))
    fixed.CopyInformation(grid)
    moving = sitk.Image(flair)
    if offset_mm:
        shift = np.array([offset_mm, 0.0, offset_mm / 2])
        moving.SetOrigin(tuple(np.array(moving.GetOrigin()) + shift))
        truth = sitk.CompositeTransform([sitk.TranslationTransform(3, tuple(shift)), truth])
    return fixed, moving, truth


def lesion_errors_vox(fixed: sitk.Image, recovered: sitk.Transform, truth: sitk.Transform,
                      lesions: sitk.Image, offset_mm: float) -> np.ndarray:
    labels, count = ndimage.label(sitk.GetArrayFromImage(lesions) > 0)
    centres = ndimage.center_of_mass(labels > 0, labels, range(1, count + 1))
    shift = np.array([offset_mm, 0.0, offset_mm / 2])
    errors = []
    for c in centres:
        point = np.array(lesions.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in c[::-1]))) + shift
        got = fixed.TransformPhysicalPointToContinuousIndex(recovered.GetInverse().TransformPoint(tuple(point)))
        want = fixed.TransformPhysicalPointToContinuousIndex(truth.GetInverse().TransformPoint(tuple(point)))
        errors.append(np.linalg.norm(np.subtract(got, want)))
    return np.array(errors)


def bench_registration(flair: sitk.Image, lesions: sitk.Image, offset_mm: float, repeats: int) -> dict:
    fixed, moving, truth = qsm_like_case(flair, offset_mm)
    seconds, cpu, result = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = register_flair_to_qsm(fixed, moving)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    errors = lesion_errors_vox(fixed, result.transform, truth, lesions, offset_mm)
    return {
        "fixed_size": list(fixed.GetSize()),
        "fixed_spacing_mm": list(fixed.GetSpacing()),
        "header_offset_mm": offset_mm,
        "seconds": seconds,
        "seconds_median": statistics.median(seconds),
        "cpu_seconds_median": statistics.median(cpu),  # all ITK threads; less sensitive to a busy machine
        "initialisation": result.initialisation,
        "metric_before": result.metric_before,
        "metric_after": result.metric_after,
        "stages": [vars(s) for s in result.stages],
        "lesions": int(errors.size),
        "lesion_centroid_error_vox_max": float(errors.max()),
        "lesion_centroid_error_vox_mean": float(errors.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "registration.json")
    args = parser.parse_args()

    flair = sitk.ReadImage(str(args.data / FLAIR), sitk.sitkFloat32)
    lesions = sitk.ReadImage(str(args.data / LESIONS), sitk.sitkUInt8)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "itk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
            "load_average_1min_at_start": os.getloadavg()[0],
            "python": platform.python_version(),
            "simpleitk": sitk.Version.VersionString(),
        },
        "n4": bench_n4(flair, args.repeats),
        "registration_header": bench_registration(flair, lesions, 0.0, args.repeats),
        "registration_offset_60mm": bench_registration(flair, lesions, 60.0, args.repeats),
    }
    report["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
