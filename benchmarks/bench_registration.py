"""N4 and FLAIR->QSM registration: speed on the real FLAIR, accuracy rigid vs affine on the semi-real head.

1. ``n4``, ``registration_header``, ``registration_offset_60mm``: the real 1 mm FLAIR (open_ms_data
   patient07) against a contrast-inverted copy of itself rotated (5, -4, 6 degrees), shifted (6, -4, 7 mm) and
   resampled onto a 0.9 x 0.9 x 2.5 mm grid (timing; an easy case: same contrast up to inversion).
2. ``semireal``: the real test of accuracy. Sessions of the semi-real cohort (qsmrim_app.synthetic.semireal):
   the FLAIR (real FLAIR, lesions painted in, 1 mm sagittal) is registered, as the app does (N4 on both,
   then Mattes MI), to a *different contrast of the same head*: the T2*-weighted magnitude in the QSM grid
   (own bias field, Rician noise, 2-3 mm slices, a slab that misses part of the brain), and to the QSM-derived
   stand-in used when there is no magnitude. The true FLAIR->QSM transform is a known random rigid one
   (up to 4 degrees and 5 mm per axis). Reported per case, rigid and affine: the error in mm of every FLAIR
   lesion voxel mapped into QSM space (recovered vs true transform), and the per-lesion Dice of the lesion
   map pulled into the QSM grid (nearest neighbour, as the app does) through the recovered vs the true transform.
   Caveat the benchmark measures itself: the head's QSM (COSMOS) and FLAIR (Ljubljana patient07) are two
   people aligned by an inter-subject affine (semireal_head.py), while the magnitude is made from the FLAIR.
   The magnitude target's truth is exact; the QSM stand-in's "truth" is only as good as that fit. To tell the
   head's own mismatch from the method's error, every recovered transform is also expressed as a displacement
   field in the head's (COSMOS) frame on a fixed set of brain points: a fixed mismatch of the head gives every
   session the same field, a method error does not (``head_frame`` in each case, pairwise differences in
   ``head_frame_agreement``), and Mattes MI over all masked voxels is reported at the true and the found transform.

3. ``onehead`` (``--only onehead``): one head, exact truth. The phantom anatomy of qsmrim-synth rendered into a
   FLAIR (1 mm sagittal, bright lesions and grey matter, dark CSF and veins), and into a QSM (dipole forward model
   and TKD: bright deep grey matter and veins, dark white matter, CSF near zero) and a T2*-weighted magnitude on
   the QSM grid, with a known rigid FLAIR->QSM header offset (up to 10 degrees, 20 mm): grids 0.6x0.6x2,
   0.75x0.75x3 and 1 mm, whole brain and partial slabs. Each case is registered as the app does with the
   magnitude (N4 on both, Mattes MI, rerun from the brain outlines when the answer fails the gate), without it
   (brain outlines then Mattes MI to the QSM stand-in), and, for comparison, by the magnitude path without the
   retry, the no-magnitude path before the offset refinement (outline masks, then MI), the stand-in alone
   (the path before the outline start), the outlines alone (mask fit, then the offset refinement) and the
   outline masks alone (no offset: the outline answer before). Then the
   registration gate (qsmrim_app.registration_gate) is scored on every answer, at the truth, and at
   deliberately wrong transforms (the truth shifted 2/4/8 mm, rotated 5/10 degrees), as it is now and as it
   was before the offset refinement (``gate_before_mm``: the outline masks' fit alone). Writes
   benchmarks/results/registration_onehead.json.

Writes benchmarks/results/registration.json (parts 1 and 2). Wall times depend on how busy the machine is (the load
average is recorded); CPU seconds summed over ITK threads are the steadier figure.

    python benchmarks/bench_registration.py [--data ../shared/data] [--repeats 3] [--only semireal]
    python benchmarks/bench_registration.py --only onehead [--onehead-cases NAME ...] [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from qsmrim_app.registration import (evaluate_mi, metric_mask, n4_correct, qsm_registration_target,
                                     register_flair_to_qsm, resample_to_reference)
from qsmrim_app.utils.images import array_to_sitk, lps_to_ras, ras_to_lps

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


# Semi-real sessions: (patient, grid). Patients with many lesions; every grid; 3 mm slices twice.
SEMIREAL_CASES = [(1, "0.75x0.75x3"), (6, "0.6x0.6x2"), (12, "1x1x1")]


def _voxel_points(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(labels > 0).astype(float)
    return (affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T


def _lesion_dice(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    ids = [i for i in np.unique(want) if i > 0]
    return np.array([2 * np.sum((got == i) & (want == i)) / (np.sum(got == i) + np.sum(want == i)) for i in ids])


def _head_frame_field(result, session, points: np.ndarray) -> np.ndarray:
    """Displacement (mm, COSMOS world) of each head point: where the recovered transform puts its FLAIR content.

    For a head point c seen at QSM world q, the recovered transform fetches FLAIR world f'; the truth places f'
    at head point c'. c' - c is zero for a perfect registration and the same for every session when the error
    is a fixed property of the head (its two people) rather than of the session's pose, grid and slab.
    """
    g = session.geometry
    qsm_world_to_cosmos = g.head_to_cosmos @ np.linalg.inv(g.head_to_scanner)
    q = (np.linalg.inv(qsm_world_to_cosmos) @ np.c_[points, np.ones(len(points))].T)[:3].T
    f = lps_to_ras(np.array([result.transform.TransformPoint(tuple(x)) for x in ras_to_lps(q)]))
    back = (qsm_world_to_cosmos @ g.flair_to_qsm @ np.c_[f, np.ones(len(f))].T)[:3].T
    return back - points


def _accuracy(result, session, flair_dseg: sitk.Image, qsm_ref: sitk.Image, true_fixed_to_moving) -> dict:
    """Lesion-voxel error (mm) and per-lesion Dice of the recovered transform against the known one."""
    g = session.geometry
    pts = _voxel_points(session.flair_labels, g.flair_affine)  # FLAIR world, RAS
    true_qsm = (g.flair_to_qsm @ np.c_[pts, np.ones(len(pts))].T)[:3].T
    inverse = result.transform.GetInverse()
    got_qsm = lps_to_ras(np.array([inverse.TransformPoint(tuple(p)) for p in ras_to_lps(pts)]))
    error = np.linalg.norm(got_qsm - true_qsm, axis=1)
    got = sitk.GetArrayFromImage(resample_to_reference(flair_dseg, qsm_ref, result.transform, "nearest"))
    want = sitk.GetArrayFromImage(resample_to_reference(flair_dseg, qsm_ref, true_fixed_to_moving, "nearest"))
    dice = _lesion_dice(got, want)
    return {"lesion_voxels": int(len(error)), "error_mm_mean": float(error.mean()),
            "error_mm_median": float(np.median(error)), "error_mm_p95": float(np.percentile(error, 95)),
            "error_mm_max": float(error.max()), "lesions": int(len(dice)),
            "lesion_dice_median": float(np.median(dice)), "lesion_dice_mean": float(dice.mean()),
            "lesion_dice_p10": float(np.percentile(dice, 10))}


def bench_semireal(data: Path, cache: Path, cases: list[tuple[int, str]]) -> dict:
    from qsmrim_app.synthetic.semireal import simulate_session
    from qsmrim_app.synthetic.semireal_head import load_head
    from qsmrim_app.synthetic.semireal_lesions import design_patient

    head = load_head(data, cache)
    brain = np.argwhere(head.brain.data > 0.5)[::200]  # ~4,700 fixed head points
    points = (head.brain.affine @ np.c_[brain, np.ones(len(brain))].T)[:3].T
    rows, fields = [], {}
    for patient, grid in cases:
        session = simulate_session(head, design_patient(data, patient, 0), grid, 0)
        g = session.geometry
        qsm = array_to_sitk(session.qsm_ppm, g.qsm_affine)
        qsm_mask = array_to_sitk((session.qsm_ppm != 0).astype(np.uint8), g.qsm_affine)
        magnitude = array_to_sitk(session.magnitude.astype(np.float32), g.qsm_affine)
        flair = array_to_sitk(session.flair, g.flair_affine)
        flair_dseg = array_to_sitk(session.flair_labels, g.flair_affine)
        # True fixed(QSM)->moving(FLAIR) point map in ITK's LPS: inverse of FLAIR->QSM, conjugated by the flip.
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        m = flip @ np.linalg.inv(g.flair_to_qsm) @ flip
        true_tx = sitk.AffineTransform(m[:3, :3].ravel().tolist(), m[:3, 3].tolist())
        flair_n4, _ = n4_correct(flair)
        mag_n4, _ = n4_correct(magnitude, qsm_mask)
        targets = {"magnitude": (mag_n4, qsm_mask), "qsm": (qsm_registration_target(qsm, qsm_mask), qsm_mask)}
        for target, (fixed, fixed_mask) in targets.items():
            sampled = metric_mask(fixed_mask)  # what the app's metric sees, for MI at the truth and the answer
            mi_truth = evaluate_mi(fixed, flair_n4, sampled, true_tx, 50)
            for mode in ("rigid", "affine"):
                start, start_cpu = time.perf_counter(), time.process_time()
                result = register_flair_to_qsm(fixed, flair_n4, fixed_mask, affine=mode == "affine", threads=1)
                seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
                field = _head_frame_field(result, session, points)
                fields[(patient, grid, target, mode)] = field
                row = {"patient": patient, "grid": grid, "target": target, "mode": mode,
                       "seconds": seconds, "cpu_seconds": cpu,
                       "metric_after": result.metric_after, "stages": [vars(s) for s in result.stages],
                       "mi_all_voxels_found": evaluate_mi(fixed, flair_n4, sampled, result.transform, 50),
                       "mi_all_voxels_truth": mi_truth,
                       "head_frame": {"mean_displacement_mm": float(np.linalg.norm(field, axis=1).mean()),
                                      "mean_vector_mm": field.mean(axis=0).round(3).tolist()},
                       **_accuracy(result, session, flair_dseg, qsm, true_tx)}
                print(json.dumps({k: v for k, v in row.items() if k != "stages"}), flush=True)
                rows.append(row)
    agreement = {}
    for (a, b) in combinations(sorted(fields), 2):
        if a[2:] == b[2:]:  # same target and mode, two sessions
            agreement[f"{a[2]}_{a[3]}: patient{a[0]:02d} {a[1]} vs patient{b[0]:02d} {b[1]}"] = float(
                np.linalg.norm(fields[a] - fields[b], axis=1).mean())
    return {"cases": rows, "summary": summarise(rows), "head_frame_agreement_mean_mm": agreement}


def summarise(rows: list[dict]) -> dict:
    """Per target and mode: lesion Dice and error over the cases (each case one session)."""
    summary = {}
    for target in ("magnitude", "qsm"):
        for mode in ("rigid", "affine"):
            sel = [r for r in rows if r["target"] == target and r["mode"] == mode]
            if not sel:
                continue
            summary[f"{target}_{mode}"] = {
                "cases": len(sel),
                "median_of_case_median_lesion_dice": float(np.median([r["lesion_dice_median"] for r in sel])),
                "worst_case_median_lesion_dice": float(min(r["lesion_dice_median"] for r in sel)),
                "mean_of_case_mean_error_mm": float(np.mean([r["error_mm_mean"] for r in sel])),
                "worst_case_mean_error_mm": float(max(r["error_mm_mean"] for r in sel)),
                "worst_case_p95_error_mm": float(max(r["error_mm_p95"] for r in sel)),
                "seconds_median": float(np.median([r["seconds"] for r in sel]))}
    return summary


# One-head cases: name -> (QSM grid, slab thickness mm, slab centre shift along z mm, header rotation deg xyz,
# header shift mm). Whole brain ~110 mm high: 130 mm slabs cover it, 60-70 mm slabs cut it.
ONEHEAD_GRIDS = {"0.6x0.6x2": (0.6, 0.6, 2.0), "0.75x0.75x3": (0.75, 0.75, 3.0), "1x1x1": (1.0, 1.0, 1.0)}
ONEHEAD_CASES = {
    "0.6x0.6x2_whole": ("0.6x0.6x2", 130.0, 0.0, (6.0, -4.0, 8.0), (12.0, -8.0, 15.0)),
    "0.75x0.75x3_whole": ("0.75x0.75x3", 132.0, 0.0, (-10.0, 5.0, 3.0), (-20.0, 10.0, 8.0)),
    "1x1x1_whole": ("1x1x1", 130.0, 0.0, (3.0, 8.0, -5.0), (5.0, 20.0, -10.0)),
    "0.75x0.75x3_slab60_top": ("0.75x0.75x3", 60.0, 20.0, (4.0, -10.0, 6.0), (8.0, 12.0, -20.0)),
    "0.6x0.6x2_slab70_mid": ("0.6x0.6x2", 70.0, -5.0, (-5.0, 3.0, -10.0), (-15.0, -12.0, 10.0)),
    "1x1x1_slab60_top": ("1x1x1", 60.0, 15.0, (8.0, 6.0, 2.0), (18.0, -5.0, 12.0)),
}
# Deliberately wrong registrations: the truth moved by these (shift mm / rotation deg about the brain centre).
GATE_PERTURBATIONS = [("shift", 2.0), ("shift", 4.0), ("shift", 8.0), ("rotate", 5.0), ("rotate", 10.0)]


def onehead_case(name: str, seed: int = 0):
    """A phantom session of one head on the case's QSM grid and header offset (qsmrim_app.synthetic)."""
    import dataclasses

    from scipy.spatial.transform import Rotation

    from qsmrim_app.synthetic.anatomy import SIZES, draw_counts, make_anatomy, rng_for
    from qsmrim_app.synthetic.simulate import rigid, simulate_session

    grid, slab_mm, z_shift, rotation, shift = ONEHEAD_CASES[name]
    voxel = ONEHEAD_GRIDS[grid]
    shape = (int(round(200.0 / voxel[0])), int(round(200.0 / voxel[1])), int(round(slab_mm / voxel[2])))
    spec = dataclasses.replace(SIZES["full"], qsm_shape=shape, qsm_voxel=voxel)
    n_lesions, n_rim = draw_counts(rng_for(seed, 0, 0), spec, 0.0425)
    rng = rng_for(seed, 0, 1)
    anatomy = make_anatomy(rng, spec, n_lesions, n_rim)
    deep_iron = float(rng.uniform(0.8, 1.2))
    header = rigid(Rotation.from_euler("xyz", rotation, degrees=True).as_matrix(), np.array(shift))
    return simulate_session(anatomy, spec, rng_for(seed, 0, 2), deep_iron, True, flair_to_qsm=header,
                            qsm_shift_mm=np.array([0.0, 0.0, z_shift]))


def _onehead_accuracy(transform: sitk.Transform, session, flair_dseg: sitk.Image, qsm: sitk.Image,
                      truth: sitk.Transform) -> dict:
    """Lesion-voxel error (mm) and median per-lesion Dice of ``transform`` against the exact truth."""
    ijk = np.argwhere(session.flair_lesions > 0).astype(float)
    pts = (session.flair_affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    want = (session.flair_to_qsm @ np.c_[pts, np.ones(len(pts))].T)[:3].T
    inverse = transform.GetInverse()
    got = lps_to_ras(np.array([inverse.TransformPoint(tuple(p)) for p in ras_to_lps(pts)]))
    error = np.linalg.norm(got - want, axis=1)
    found = sitk.GetArrayFromImage(resample_to_reference(flair_dseg, qsm, transform, "nearest"))
    true = sitk.GetArrayFromImage(resample_to_reference(flair_dseg, qsm, truth, "nearest"))
    dice = _lesion_dice(found, true)
    return {"lesion_voxels": int(len(error)), "lesions": int(len(dice)), "error_mm_mean": float(error.mean()),
            "error_mm_p95": float(np.percentile(error, 95)), "error_mm_max": float(error.max()),
            "lesion_dice_median": float(np.median(dice)), "lesion_dice_p10": float(np.percentile(dice, 10))}


def _perturbed(truth: sitk.Transform, centre: np.ndarray, kind: str, size: float, rng) -> sitk.Transform:
    """The truth preceded by a rigid motion of the QSM space about ``centre`` (a wrong registration)."""
    from qsmrim_app.brain_outline import as_euler

    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    motion = sitk.Euler3DTransform()
    motion.SetCenter(tuple(centre))
    if kind == "shift":
        motion.SetTranslation(tuple(axis * size))
    else:
        from scipy.spatial.transform import Rotation

        motion.SetMatrix(tuple(Rotation.from_rotvec(axis * np.deg2rad(size)).as_matrix().ravel()))
    return as_euler(sitk.CompositeTransform([truth, motion]), centre)


def bench_onehead_case(name: str) -> dict:
    from qsmrim_app.brain_outline import Outlines, flair_brain_mask
    from qsmrim_app.registration import register_without_magnitude
    from qsmrim_app.registration_gate import outline_disagreement_mm, register_magnitude_gated

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    start = time.perf_counter()
    session = onehead_case(name)
    qsm = array_to_sitk(session.qsm_ppm.astype(np.float32), session.qsm_affine)
    qsm_mask = array_to_sitk((session.qsm_ppm != 0).astype(np.uint8), session.qsm_affine)
    magnitude = array_to_sitk(session.magnitude.astype(np.float32), session.qsm_affine)
    flair = array_to_sitk(session.flair.astype(np.float32), session.flair_affine)
    flair_dseg = array_to_sitk(session.flair_lesions.astype(np.int32), session.flair_affine)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    m = flip @ np.linalg.inv(session.flair_to_qsm) @ flip  # true fixed(QSM)->moving(FLAIR), ITK LPS
    truth = sitk.AffineTransform(m[:3, :3].ravel().tolist(), m[:3, 3].tolist())
    flair_n4, _ = n4_correct(flair)
    mag_n4, _ = n4_correct(magnitude, qsm_mask)
    outlines = Outlines.build(qsm_mask, flair_brain_mask(flair_n4))
    row = {"case": name, "qsm_grid": ONEHEAD_CASES[name][0], "qsm_size": list(qsm.GetSize()),
           "slab_mm": ONEHEAD_CASES[name][1], "header_rotation_deg": list(ONEHEAD_CASES[name][3]),
           "header_shift_mm": list(ONEHEAD_CASES[name][4]), "simulate_and_n4_seconds": time.perf_counter() - start,
           "header": _onehead_accuracy(sitk.Euler3DTransform(), session, flair_dseg, qsm, truth), "paths": {}}

    def gate_before(transform: sitk.Transform) -> float:
        """The gate as it was before the offset refinement: the outline masks' fit alone."""
        return outlines.displacement_mm(transform, outlines.register_masks(transform))

    def no_magnitude_before():
        """register_without_magnitude as it was before the offset refinement (outline masks, then MI)."""
        start, label = outlines.start()
        return register_flair_to_qsm(qsm_registration_target(qsm, qsm_mask), flair_n4, qsm_mask, threads=1,
                                     initial=outlines.register_masks(start), initialisation=label)

    def score(path: str, run) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            result = run()
        except Exception as exc:  # a failed path is a result too
            row["paths"][path] = {"error": str(exc)}
            return
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        retry = getattr(result, "retry", None)
        result = getattr(result, "result", result)  # the gated magnitude path: its kept registration
        offset = getattr(result, "offset_mm", None)
        transform = getattr(result, "transform", result)
        entry = {"seconds": seconds, "cpu_seconds": cpu, "initialisation": getattr(result, "initialisation", None),
                 "metric_after": getattr(result, "metric_after", None),
                 **({"retry": retry} if retry else {}), **({"outline_offset_mm": offset} if offset is not None else {}),
                 **_onehead_accuracy(transform, session, flair_dseg, qsm, truth),
                 "gate_mm": outline_disagreement_mm(qsm_mask, flair_n4, transform, outlines=outlines),
                 "gate_before_mm": gate_before(transform)}
        row["paths"][path] = entry
        print(json.dumps({"case": name, "path": path, **entry}), flush=True)

    score("magnitude", lambda: register_magnitude_gated(mag_n4, flair_n4, qsm_mask, qsm_mask, threads=1))
    score("magnitude_no_retry", lambda: register_flair_to_qsm(mag_n4, flair_n4, qsm_mask, threads=1))
    score("no_magnitude", lambda: register_without_magnitude(qsm, flair_n4, qsm_mask, threads=1))
    score("no_magnitude_before", no_magnitude_before)
    score("standin_mi_only", lambda: register_flair_to_qsm(qsm_registration_target(qsm, qsm_mask), flair_n4,
                                                           qsm_mask, threads=1))
    score("outlines_only", lambda: outlines.fit(outlines.start()[0]))
    score("outline_masks_only", lambda: outlines.register_masks(outlines.start()[0]))

    rng = np.random.default_rng(sum(map(ord, name)))  # one fixed direction per case
    gate = [{"kind": "truth", "size": 0.0, "error_mm_mean": 0.0,
             "gate_mm": outline_disagreement_mm(qsm_mask, flair_n4, truth, outlines=outlines),
             "gate_before_mm": gate_before(truth)}]
    for kind, size in GATE_PERTURBATIONS:
        wrong = _perturbed(truth, outlines.centre, kind, size, rng)
        accuracy = _onehead_accuracy(wrong, session, flair_dseg, qsm, truth)
        gate.append({"kind": kind, "size": size, "error_mm_mean": accuracy["error_mm_mean"],
                     "lesion_dice_median": accuracy["lesion_dice_median"],
                     "gate_mm": outline_disagreement_mm(qsm_mask, flair_n4, wrong, outlines=outlines),
                     "gate_before_mm": gate_before(wrong)})
        print(json.dumps({"case": name, **gate[-1]}), flush=True)
    row["gate"] = gate
    row["seconds_total"] = time.perf_counter() - start
    return row


def summarise_onehead(rows: list[dict]) -> dict:
    """Worst case per path, and the gate's separation: correct answers vs deliberately wrong ones."""
    summary = {}
    for path in ("magnitude", "magnitude_no_retry", "no_magnitude", "no_magnitude_before", "standin_mi_only",
                 "outlines_only", "outline_masks_only"):
        sel = [r["paths"][path] for r in rows if "error_mm_mean" in r["paths"].get(path, {})]
        failed = sum("error" in r["paths"].get(path, {}) for r in rows)
        if sel:
            summary[path] = {"cases": len(sel), "failed": failed,
                             "worst_mean_error_mm": max(s["error_mm_mean"] for s in sel),
                             "worst_p95_error_mm": max(s["error_mm_p95"] for s in sel),
                             "worst_median_lesion_dice": min(s["lesion_dice_median"] for s in sel)}
    correct = [g["gate_mm"] for r in rows for g in r["gate"] if g["kind"] == "truth"]
    correct += [p["gate_mm"] for r in rows for k, p in r["paths"].items()
                if k in ("magnitude", "no_magnitude") and "gate_mm" in p and p["error_mm_mean"] < 1.0]
    wrong = [g for r in rows for g in r["gate"] if g["kind"] != "truth"]
    # ">= 4 mm": a mean lesion error of 3.95 mm or more (a 4 mm shift measures 3.9999... mm)
    correct_before = [g["gate_before_mm"] for r in rows for g in r["gate"] if g["kind"] == "truth"]
    summary["gate_before_offset_refinement"] = {
        "truth_max_mm": max(correct_before) if correct_before else None,
        "wrong_4mm_or_more_min_mm": min((g["gate_before_mm"] for g in wrong if g["error_mm_mean"] >= 3.95),
                                        default=None)}
    summary["gate"] = {"correct_max_mm": max(correct) if correct else None,
                       "wrong_4mm_or_more_min_mm": min((g["gate_mm"] for g in wrong if g["error_mm_mean"] >= 3.95),
                                                       default=None),
                       "wrong_2mm_or_more_min_mm": min((g["gate_mm"] for g in wrong if g["error_mm_mean"] >= 1.95),
                                                       default=None)}
    return summary


def bench_onehead(names: list[str], jobs: int, write) -> dict:
    """Every case (``jobs`` at a time); ``write(report)`` after each, so a long run keeps what it finished."""
    from multiprocessing import get_context

    rows: list[dict] = []
    with get_context("fork").Pool(max(1, jobs)) as pool:
        for row in pool.imap_unordered(bench_onehead_case, names, chunksize=1):
            rows.append(row)
            rows.sort(key=lambda r: names.index(r["case"]))
            write({"cases": rows, "summary": summarise_onehead(rows)})
    return {"cases": rows, "summary": summarise_onehead(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "registration.json")
    parser.add_argument("--head-cache", type=Path, default=Path(tempfile.gettempdir()) / "qsmrim_semireal_head",
                        help="where the semi-real head's registration is cached")
    parser.add_argument("--cases", nargs="+", default=None, metavar="PATIENT:GRID",
                        help="semi-real sessions to register (default: " +
                             " ".join(f"{p}:{g}" for p, g in SEMIREAL_CASES) + ")")
    parser.add_argument("--only", choices=["timing", "semireal", "onehead"], default=None,
                        help="run one part; the other part's previous results in --out are kept")
    parser.add_argument("--onehead-cases", nargs="+", choices=sorted(ONEHEAD_CASES), default=None,
                        help="one-head cases to run (default: all)")
    parser.add_argument("--onehead-out", type=Path,
                        default=REPO / "benchmarks" / "results" / "registration_onehead.json")
    parser.add_argument("--jobs", type=int, default=1, help="one-head cases run in parallel (one thread each)")
    args = parser.parse_args()
    if args.only == "onehead":
        names = args.onehead_cases or list(ONEHEAD_CASES)
        head = {"machine": {"cpus": os.cpu_count(), "load_average_1min_at_start": os.getloadavg()[0],
                            "python": platform.python_version(), "simpleitk": sitk.Version.VersionString()},
                "command": "python benchmarks/bench_registration.py --only onehead --jobs "
                           f"{args.jobs}" + (" --onehead-cases " + " ".join(names) if args.onehead_cases else "")}

        def write(part: dict) -> None:
            report = {**head, **part}
            report["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
            args.onehead_out.parent.mkdir(parents=True, exist_ok=True)
            args.onehead_out.write_text(json.dumps(report, indent=2) + "\n")

        print(json.dumps(bench_onehead(names, args.jobs, write)["summary"], indent=2))
        return

    report = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    report["machine"] = {
        "cpus": os.cpu_count(),
        "itk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "load_average_1min_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "simpleitk": sitk.Version.VersionString(),
    }
    if args.only != "semireal":
        flair = sitk.ReadImage(str(args.data / FLAIR), sitk.sitkFloat32)
        lesions = sitk.ReadImage(str(args.data / LESIONS), sitk.sitkUInt8)
        report["n4"] = bench_n4(flair, args.repeats)
        report["registration_header"] = bench_registration(flair, lesions, 0.0, args.repeats)
        report["registration_offset_60mm"] = bench_registration(flair, lesions, 60.0, args.repeats)
    if args.only != "timing":
        cases = [(int(c.split(":")[0]), c.split(":")[1]) for c in args.cases] if args.cases else SEMIREAL_CASES
        report["semireal"] = bench_semireal(args.data, args.head_cache, cases)
    report["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
