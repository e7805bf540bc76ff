"""Registration without a magnitude image, the registration gate, and the magnitude path kept as it was.

The small phantom of qsmrim-synth is one head: its FLAIR, magnitude and QSM come from one anatomy and its
truth folder holds the exact FLAIR->QSM transform, so every figure here is checked against the truth.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from qsmrim_app import derivatives as drv
from qsmrim_app import registration_gate as gate_module
from qsmrim_app.brain_outline import Outlines, as_euler, flair_brain_mask
from qsmrim_app.registration import register_flair_to_qsm, register_without_magnitude
from qsmrim_app.registration_gate import GATE_THRESHOLD_MM, register_magnitude_gated, registration_gate
from qsmrim_app.utils.images import lps_to_ras, ras_to_lps

REPO = Path(__file__).resolve().parent.parent

# register_flair_to_qsm(magnitude, FLAIR, QSM support, threads=1) on sub-01 of the small phantom (seed 0), as
# computed by qsmrim before the no-magnitude path and the gate were added (commit df40939, whose phantom keeps
# lesions in one hemisphere): Euler angles (rad), translation (mm), centre (mm). The magnitude path must give
# the same transform.
MAGNITUDE_PATH_BEFORE = (0.021894125688814128, 0.02523726154603125, -0.020398599147373773,
                         4.616727357249705, 4.533003651008131, -5.2925316199886305)
MAGNITUDE_CENTRE_BEFORE = (-0.3700757475592411, 0.9305350120466187, -2.532859810498991)


def _images(bids: Path, sub: str = "01") -> dict[str, sitk.Image]:
    anat = bids / f"sub-{sub}" / "anat"
    qsm = sitk.ReadImage(str(anat / f"sub-{sub}_Chimap.nii.gz"), sitk.sitkFloat32)
    return {"qsm": qsm, "mask": sitk.Cast(sitk.NotEqual(qsm, 0), sitk.sitkUInt8),
            "flair": sitk.ReadImage(str(anat / f"sub-{sub}_FLAIR.nii.gz"), sitk.sitkFloat32),
            "magnitude": sitk.ReadImage(str(anat / f"sub-{sub}_part-mag_T2starw.nii.gz"), sitk.sitkFloat32)}


def _truth(bids: Path, sub: str = "01") -> np.ndarray:
    """FLAIR world -> QSM world (RAS, 4x4) from the phantom's truth folder."""
    record = json.loads((bids.parent / f"{bids.name}_truth" / "transforms.json").read_text())
    return np.array(record["subjects"][f"sub-{sub}"]["n/a"]["flair_to_qsm_world"])


def _itk(flair_to_qsm: np.ndarray) -> sitk.AffineTransform:
    """The truth as ITK's fixed(QSM)->moving(FLAIR) point map in LPS."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    m = flip @ np.linalg.inv(flair_to_qsm) @ flip
    return sitk.AffineTransform(m[:3, :3].ravel().tolist(), m[:3, 3].tolist())


def _lesion_errors_mm(bids: Path, transform: sitk.Transform, sub: str = "01") -> np.ndarray:
    """Distance (mm) between where ``transform`` and the truth put every FLAIR lesion voxel in QSM space."""
    dseg = nib.load(bids / "derivatives" / "lesions" / f"sub-{sub}" / "anat" / f"sub-{sub}_desc-lesion_dseg.nii.gz")
    ijk = np.argwhere(np.asanyarray(dseg.dataobj) > 0).astype(float)
    points = (dseg.affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    want = (_truth(bids, sub) @ np.c_[points, np.ones(len(points))].T)[:3].T
    inverse = transform.GetInverse()
    got = lps_to_ras(np.array([inverse.TransformPoint(tuple(p)) for p in ras_to_lps(points)]))
    return np.linalg.norm(got - want, axis=1)


def _shifted(truth: sitk.Transform, shift_mm: tuple[float, float, float]) -> sitk.Transform:
    """A deliberately wrong registration: the truth preceded by a shift of the QSM space."""
    return sitk.CompositeTransform([truth, sitk.TranslationTransform(3, shift_mm)])


def test_magnitude_path_gives_the_same_transform_as_before(phantom: Path) -> None:
    images = _images(phantom)
    result = register_flair_to_qsm(images["magnitude"], images["flair"], images["mask"], threads=1)
    assert result.initialisation == "header"
    np.testing.assert_allclose(result.transform.GetParameters(), MAGNITUDE_PATH_BEFORE, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.transform.GetFixedParameters()[:3], MAGNITUDE_CENTRE_BEFORE, atol=1e-9)


def test_gate_passes_the_truth_and_fails_4_and_8_mm(phantom: Path) -> None:
    images = _images(phantom)
    truth = _itk(_truth(phantom))
    right = registration_gate(images["mask"], images["flair"], truth)
    assert right.passed and right.value_mm < 0.75 * GATE_THRESHOLD_MM, right
    for shift in ((0.0, 8.0, 0.0), (4.0, 0.0, 0.0)):
        wrong = _shifted(truth, shift)
        assert np.mean(_lesion_errors_mm(phantom, wrong)) == pytest.approx(np.linalg.norm(shift), abs=0.01)
        gate = registration_gate(images["mask"], images["flair"], wrong)
        assert not gate.passed and gate.value_mm > 0.6 * np.linalg.norm(shift), (shift, gate)
        assert gate.sidecar()["RegistrationGate"] == "fail"


def test_flair_brain_mask_is_the_brain_not_the_scalp(phantom: Path) -> None:
    """The phantom FLAIR has a bright scalp; the mask must be the brain (the QSM support mapped back)."""
    images = _images(phantom)
    mask = flair_brain_mask(images["flair"])
    support_on_flair = sitk.Resample(images["mask"], images["flair"], _itk(_truth(phantom)).GetInverse(),
                                     sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    a, b = (sitk.GetArrayFromImage(x) > 0 for x in (mask, support_on_flair))
    assert 2 * np.sum(a & b) / (a.sum() + b.sum()) > 0.85


def test_as_euler_keeps_a_rigid_transform() -> None:
    rigid = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.05, 0.2, (4.0, -5.0, 6.0))
    euler = as_euler(sitk.AffineTransform(rigid.GetMatrix(), rigid.GetTranslation(), rigid.GetCenter()), (10, 0, -3))
    for point in ((0.0, 0.0, 0.0), (50.0, -20.0, 30.0)):
        np.testing.assert_allclose(euler.TransformPoint(point), rigid.TransformPoint(point), atol=1e-9)


def _top_part(mask: sitk.Image, fraction: float) -> sitk.Image:
    """The QSM support cropped to the top ``fraction`` of its slices (a slab that sees only the dome)."""
    array = sitk.GetArrayViewFromImage(mask)
    slices = np.flatnonzero(array.any(axis=(1, 2)))
    assert mask.GetDirection()[8] > 0.99  # slice index grows towards the top of the head
    low = int(slices[int(len(slices) * (1.0 - fraction))])
    size = list(mask.GetSize())
    return sitk.RegionOfInterest(mask, [size[0], size[1], size[2] - low], [0, 0, low])


def test_outline_fit_estimates_the_csf_offset(phantom: Path) -> None:
    """The FLAIR brain mask ends at the grey matter, the QSM support includes the outer CSF: the refinement finds
    that offset and lands nearer the truth than the fit of the masks alone, most of all on the top of the brain."""
    images = _images(phantom)
    truth = _itk(_truth(phantom))
    flair_mask = flair_brain_mask(images["flair"])
    found = {}
    for part, qsm_mask in (("whole", images["mask"]), ("top half", _top_part(images["mask"], 0.5))):
        outlines = Outlines.build(qsm_mask, flair_mask)
        start = outlines.start()[0]
        fit = outlines.fit(start)
        found[part] = (outlines.displacement_mm(truth, fit.transform),
                       outlines.displacement_mm(truth, outlines.register_masks(start)), fit.offset_mm)
        assert 1.0 < fit.offset_mm < 3.5, found  # the phantom's outer CSF (QSM side) is 2-3 mm thick
    (whole, whole_masks, _), (top, top_masks, _) = found["whole"], found["top half"]
    assert whole < 0.5 and whole <= whole_masks, found
    assert top < 1.5 and top_masks > 2.5 and top < 0.5 * top_masks, found


def test_magnitude_path_passing_the_gate_is_not_retried(phantom: Path) -> None:
    images = _images(phantom)
    gated = register_magnitude_gated(images["magnitude"], images["flair"], images["mask"], images["mask"],
                                     threads=1)
    assert gated.retry == {} and gated.gate.passed and gated.result.initialisation == "header"
    np.testing.assert_allclose(gated.result.transform.GetParameters(), MAGNITUDE_PATH_BEFORE, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_magnitude_path_failing_the_gate_is_retried_from_the_outlines(phantom: Path, monkeypatch) -> None:
    """A first answer 8 mm off (what a header / centre-of-mass start gave on a thin top slab) fails the gate;
    the retry from the brain outlines is kept, and the sidecar fields say what happened."""
    import dataclasses

    images = _images(phantom)
    truth = _itk(_truth(phantom))
    real = gate_module.register_flair_to_qsm
    starts = []

    def first_one_wrong(*args, **kwargs):
        result = real(*args, **kwargs)
        starts.append(kwargs.get("initialisation", "header/centre-of-mass"))
        if kwargs.get("initial") is None:
            return dataclasses.replace(result, transform=_shifted(truth, (0.0, 8.0, 0.0)))
        return result

    monkeypatch.setattr(gate_module, "register_flair_to_qsm", first_one_wrong)
    gated = register_magnitude_gated(images["magnitude"], images["flair"], images["mask"], images["mask"],
                                     threads=1)
    assert len(starts) == 2 and starts[1].startswith("brain-outline"), starts
    assert gated.retry["RetryKept"] == "retry" and gated.retry["FirstGateValueMM"] > GATE_THRESHOLD_MM
    assert gated.retry["RetryGateValueMM"] == pytest.approx(gated.gate.value_mm, abs=1e-3)
    assert gated.gate.passed and gated.result.initialisation.startswith("brain-outline")
    errors = _lesion_errors_mm(phantom, gated.result.transform)
    assert errors.max() < min(images["qsm"].GetSpacing()), (errors.mean(), errors.max())


@pytest.mark.slow
def test_no_magnitude_path_keeps_the_outline_fit_when_mi_moves_it_far(phantom: Path, monkeypatch) -> None:
    """MI to the stand-in that drifts 3 mm from the outline fit (as it settled 1.9 mm off on a thin top slab) is
    not kept; MI that stays near it is."""
    import dataclasses

    from qsmrim_app import registration

    images = _images(phantom)
    real = registration.register_flair_to_qsm
    drift = {"mm": 3.0}

    def drifting(*args, **kwargs):
        result = real(*args, **kwargs)
        return dataclasses.replace(result, transform=_shifted(kwargs["initial"], (0.0, 0.0, drift["mm"])))

    monkeypatch.setattr(registration, "register_flair_to_qsm", drifting)
    kept = register_without_magnitude(images["qsm"], images["flair"], images["mask"], threads=1)
    assert kept.initialisation.startswith("brain-outline") and "was not kept" in kept.initialisation
    assert _lesion_errors_mm(phantom, kept.transform).max() < min(images["qsm"].GetSpacing())
    drift["mm"] = 0.5 * registration.MI_AGREEMENT_MM
    moved = register_without_magnitude(images["qsm"], images["flair"], images["mask"], threads=1)
    assert "not kept" not in moved.initialisation and moved.transform.GetName() == "CompositeTransform"


@pytest.mark.slow
def test_no_magnitude_path_lands_within_one_voxel(phantom: Path) -> None:
    images = _images(phantom)
    result = register_without_magnitude(images["qsm"], images["flair"], images["mask"], threads=1)
    assert result.initialisation.startswith("brain-outline")
    errors = _lesion_errors_mm(phantom, result.transform)
    voxel = min(images["qsm"].GetSpacing())  # 1.6 mm in-plane
    assert errors.max() < voxel, (errors.mean(), errors.max())
    assert registration_gate(images["mask"], images["flair"], result.transform).passed


# ------------------------------------------------------------------------------------------------
# End to end: an 8 mm misaligned FLAIR through the command line


def _realign_flair_space(bids: Path, sub: str, shift_mm: tuple[float, float, float]) -> None:
    """Rewrite the FLAIR-space headers (FLAIR, lesion masks, rim labels) so the FLAIR world is the QSM world,
    then move them by ``shift_mm``: what a FLAIR "already registered" by another tool, ``shift_mm`` off, looks like."""
    move = _truth(bids, sub).copy()
    move[:3, 3] += np.asarray(shift_mm)
    files = [bids / f"sub-{sub}" / "anat" / f"sub-{sub}_FLAIR.nii.gz",
             *(bids / "derivatives" / "lesions" / f"sub-{sub}" / "anat").glob("*.nii.gz")]
    for path in files:
        image = nib.load(path)
        affine = move @ image.affine
        out = nib.Nifti1Image(np.asanyarray(image.dataobj), affine, image.header)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        nib.save(out, path)


def _run_app(*args, code: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800)
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_misaligned_flair_fails_the_gate_end_to_end(tmp_path: Path) -> None:
    """sub-01: FLAIR aligned by its header (passes); sub-02: the same 8 mm off (fails, reported everywhere)."""
    from qsmrim_app.synthetic import generate_dataset

    bids, out, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    generate_dataset(bids, 2, seed=0, size="small")
    _realign_flair_space(bids, "01", (0.0, 0.0, 0.0))
    _realign_flair_space(bids, "02", (0.0, 8.0, 0.0))

    proc = _run_app(bids, out, "participant", "-w", work, "--nprocs", "2", "--registration", "header", code=1)
    assert "sub-02: registration gate FAILED" in proc.stderr, proc.stderr[-3000:]
    assert "sub-01: registration gate FAILED" not in proc.stderr
    assert "1 of 2 participant units failed the registration gate: sub-02" in proc.stderr

    gates = {}
    for sub in ("01", "02"):
        unit = drv.Unit(sub)
        sidecar = json.loads(drv.sidecar_path(drv.output_path(out, unit, "xfm_flair_to_qsm")).read_text())
        assert sidecar["RegistrationMode"] == "header" and sidecar["RegistrationTarget"].startswith("none")
        gates[sub] = sidecar
        assert drv.output_path(out, unit, "summary").is_file()  # outputs are written for review
        log = drv.latest_unit_logs(out)[unit.prefix]
        assert log["status"] == "done" and log["registration_gate"]["verdict"] == sidecar["RegistrationGate"]
    assert gates["01"]["RegistrationGate"] == "pass" and gates["01"]["RegistrationGateValueMM"] < GATE_THRESHOLD_MM
    assert gates["02"]["RegistrationGate"] == "fail" and gates["02"]["RegistrationGateValueMM"] > 5.0
    report = drv.report_path(out, drv.Unit("02")).read_text()
    assert "Registration gate FAILED" in report and "Registration gate FAILED" not in \
        drv.report_path(out, drv.Unit("01")).read_text()

    proc = _run_app(bids, out, "group", "-w", work, code=1)
    assert "sub-02: registration gate failed" in proc.stderr
    table = pd.read_csv(out / "group_rimcounts.tsv", sep="\t", na_values="n/a", keep_default_na=False)
    rows = table.set_index("participant_id")
    assert rows.loc["sub-01", "registration_gate"] == "pass" and rows.loc["sub-02", "registration_gate"] == "fail"
    assert pd.notna(rows.loc["sub-01", "n_rimplus"]) and pd.isna(rows.loc["sub-02", "n_rimplus"])
    assert pd.isna(rows.loc["sub-02", "n_lesions"])
    assert "registration gate failed" in (out / "group_report.html").read_text()

    _run_app(bids, out, "group", "-w", work, "--keep-failed-registration", code=1)
    kept = pd.read_csv(out / "group_rimcounts.tsv", sep="\t", na_values="n/a", keep_default_na=False)
    kept = kept.set_index("participant_id")
    assert kept.loc["sub-02", "registration_gate"] == "fail-kept" and pd.notna(kept.loc["sub-02", "n_lesions"])
    summary = drv.read_tsv(drv.output_path(out, drv.Unit("02"), "summary"))
    assert kept.loc["sub-02", "n_lesions"] == summary["n_lesions"].iloc[0]


def test_gate_threshold_has_one_default() -> None:
    from qsmrim_app.cli.parser import build_parser
    from qsmrim_app.config import PreprocConfig

    args = build_parser().parse_args(["bids", "out", "participant"])
    assert args.registration_gate_mm == PreprocConfig().registration_gate_mm == GATE_THRESHOLD_MM
    assert build_parser().parse_args(["bids", "out", "group", "--keep-failed-registration"]).keep_failed_registration
