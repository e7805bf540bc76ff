"""The semi-real cohort generator: files the app discovers, truth that follows the consensus rule,
determinism, prevalence, and one participant through the app's own command line.

Uses the real data in ../shared/data (skips without it). One participant (patient01 on the 1 mm
grid, ~150 lesions) is generated once per session through the `qsmrim-synth` entry point; the head
registration is made once and shared through --head-cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from qsmrim_app.synthetic import main as synth_main
from qsmrim_app.synthetic.semireal import RIM_SEEN, RULE_COVERAGE, consensus_rule, split_of

REPO = Path(__file__).resolve().parent.parent
PATIENT, GRID, SESSION = 1, "1x1x1", "1x1x1"  # patient01: 180 lesions, rims and every confounder
ARGS = ["--semi-real", "--patients", str(PATIENT), "--grids", GRID, "--seed", "0"]
SUB = f"sub-{PATIENT:02d}"


@pytest.fixture(scope="session")
def head_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("semireal_head")


@pytest.fixture(scope="session")
def cohort(shared_data: Path, head_cache: Path, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("semireal") / "bids"
    assert synth_main([str(out), *ARGS, "--data-dir", str(shared_data), "--head-cache", str(head_cache)]) == 0
    return out, out.with_name("bids_truth")


def _anat(root: Path, suffix: str, deriv: bool = False) -> Path:
    base = root / "derivatives" / "lesions" if deriv else root
    return base / f"sub-{PATIENT:02d}" / f"ses-{SESSION}" / "anat" / f"sub-{PATIENT:02d}_ses-{SESSION}_{suffix}.nii.gz"


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        data = np.asarray(nib.load(path).dataobj).tobytes() if path.name.endswith(".nii.gz") else path.read_bytes()
        digest.update(data)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# The consensus rule itself, on constructed lesions


def _disc_lesion(radius: float = 5.0, slices: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A cylinder lesion (slices along k) and the in-plane angle of every voxel around its axis."""
    ii, jj = np.meshgrid(np.arange(21) - 10.0, np.arange(21) - 10.0, indexing="ij")
    disc = ii ** 2 + jj ** 2 <= radius ** 2
    lesion = np.zeros((21, 21, slices + 2), bool)
    lesion[:, :, 1:-1] = disc[:, :, None]
    return lesion, np.broadcast_to(np.arctan2(jj, ii)[:, :, None], lesion.shape)


def test_rule_full_ring_outside_is_rim_positive() -> None:
    lesion, _ = _disc_lesion()
    ring = ndimage.binary_dilation(lesion, np.ones((3, 3, 1), bool)) & ~lesion
    positive, slices, best = consensus_rule(lesion, ring)
    assert positive and slices == 4 and best == 1.0


def test_rule_half_arc_is_rim_negative_and_two_thirds_arc_positive() -> None:
    lesion, angle = _disc_lesion()
    edge = lesion & ~ndimage.binary_erosion(lesion, np.ones((3, 3, 1), bool))
    half = edge & (np.abs(angle) <= np.pi / 2)
    assert not consensus_rule(lesion, half)[0]
    assert consensus_rule(lesion, half)[2] < RULE_COVERAGE
    most = edge & (np.abs(angle) <= 0.8 * np.pi)  # 80 % of the edge
    assert consensus_rule(lesion, most)[0]


def test_rule_needs_two_slices() -> None:
    lesion, _ = _disc_lesion()
    ring = lesion & ~ndimage.binary_erosion(lesion, np.ones((3, 3, 1), bool))
    one_slice = ring.copy()
    one_slice[:, :, 2:] = False
    assert consensus_rule(lesion, one_slice)[:2] == (False, 1)
    two = ring.copy()
    two[:, :, 3:] = False
    assert consensus_rule(lesion, two)[:2] == (True, 2)


def test_rule_skips_slivers_without_an_inside() -> None:
    lesion = np.zeros((20, 20, 5), bool)
    lesion[3:17, 9:11, 1:4] = True  # 2 voxels wide: no inside on any slice
    rim = ndimage.binary_dilation(lesion, np.ones((3, 3, 1), bool))
    assert consensus_rule(lesion, rim)[:2] == (False, 0)


def test_split_holds_out_patients_15_to_20_and_the_finest_grid() -> None:
    assert split_of(3, "0.75x0.75x3") == "train" and split_of(14, "1x1x1") == "train"
    assert split_of(15, "0.75x0.75x3") == "test" and split_of(20, "1x1x1") == "test"
    assert split_of(3, "0.6x0.6x2") == "test"


# --------------------------------------------------------------------------------------------------
# A generated participant


@pytest.mark.shared_data
def test_files_grids_and_sidecars(cohort) -> None:
    bids, truth = cohort
    qsm, mag, flair = (nib.load(_anat(bids, s)) for s in ("Chimap", "part-mag_T2starw", "FLAIR"))
    dseg, rim = nib.load(_anat(bids, "desc-lesion_dseg", True)), nib.load(_anat(bids, "desc-rim_dseg", True))
    assert np.allclose(qsm.header.get_zooms(), (1.0, 1.0, 1.0)) and qsm.get_data_dtype() == np.float32
    assert mag.shape == qsm.shape and np.allclose(mag.affine, qsm.affine)
    assert dseg.shape == rim.shape == flair.shape and np.allclose(dseg.affine, flair.affine)
    assert not np.allclose(flair.affine, qsm.affine)  # its own grid and header
    chi = qsm.get_fdata()
    brain = chi != 0
    # Real in-vivo texture in ppm: white matter diamagnetic, iron and veins paramagnetic.
    assert -0.12 < np.percentile(chi[brain], 1) < -0.01 and 0.03 < np.percentile(chi[brain], 99) < 0.3
    sidecar = json.loads(_anat(bids, "Chimap").with_suffix("").with_suffix(".json").read_text())
    assert sidecar["Units"] == "ppm"
    participants = pd.read_csv(bids / "participants.tsv", sep="\t")
    assert participants.to_dict("records")[0] | {} == {
        "participant_id": SUB, "patient": "patient01", "grids": GRID, "split": "train",
        "flair_source": "patient19", "group": "MS"}
    sessions = pd.read_csv(bids / SUB / f"{SUB}_sessions.tsv", sep="\t")
    assert sessions.to_dict("records") == [{"session_id": "ses-1x1x1", "grid": GRID, "voxel_size_mm": "1.0x1.0x1.0",
                                            "split": "train"}]
    for name in ("lesions.tsv", "sessions.tsv", "transforms.json"):
        assert (truth / name).is_file() and not (bids / name).exists()
    assert "Lesjak" in (bids / "README").read_text() and "Langkammer" in (bids / "README").read_text()


@pytest.mark.shared_data
def test_truth_instances_match_the_shipped_masks(cohort) -> None:
    bids, truth = cohort
    lesions = pd.read_csv(truth / "lesions.tsv", sep="\t")
    dseg = np.asarray(nib.load(_anat(bids, "desc-lesion_dseg", True)).dataobj)
    rim = np.asarray(nib.load(_anat(bids, "desc-rim_dseg", True)).dataobj)
    assert sorted(set(np.unique(dseg)) - {0}) == lesions["lesion_id"].tolist()
    counts = np.bincount(dseg.ravel())
    assert (counts[lesions["lesion_id"]] == lesions["voxels_flair"]).all()
    assert (lesions["voxels_flair"] >= 12).all() and (lesions["voxels_qsm"] >= 12).all()
    for row in lesions.itertuples():
        assert set(np.unique(rim[dseg == row.lesion_id])) == {2 if row.rim_positive else 1}
    assert set(np.unique(rim[dseg == 0])) == {0}


@pytest.mark.shared_data
def test_rim_labels_follow_the_consensus_rule_on_the_truth(cohort) -> None:
    """rim+ exactly when the simulated rim, as seen in the QSM grid, surrounds >= 2/3 of the edge on >= 2 slices."""
    bids, truth = cohort
    lesions = pd.read_csv(truth / "lesions.tsv", sep="\t")
    tdir = truth / SUB / "ses-1x1x1" / "anat"
    labels = np.asarray(nib.load(tdir / "sub-01_ses-1x1x1_space-QSM_desc-lesion_dseg.nii.gz").dataobj)
    source = np.asarray(nib.load(tdir / "sub-01_ses-1x1x1_space-QSM_desc-rimsource_probseg.nii.gz").dataobj)
    assert set(lesions["kind"]) == {"plain", "rim", "arc", "vein", "hyper"}
    assert lesions["rim_positive"].sum() >= 3 and (lesions["kind"] == "arc").sum() >= 3
    assert (lesions.loc[~lesions["kind"].isin(["rim", "arc"]), "rim_positive"] == 0).all()
    positive = lesions[lesions["rim_positive"] == 1]
    assert (positive["rule_slices"] >= 2).all() and (positive["rule_best_coverage"] >= RULE_COVERAGE).all()
    assert (lesions.loc[lesions["rim_positive"] == 0, "rule_slices"] < 2).all()
    assert (lesions.loc[lesions["kind"] == "arc", "rim_coverage_designed"] <= 0.5).all()
    assert (lesions.loc[lesions["kind"] == "rim", "rim_coverage_designed"] >= 0.8).all()
    # Recompute the rule from the truth maps for the lesions with a rim source of their own.
    others = labels > 0
    for row in lesions[lesions["kind"].isin(["rim", "arc"])].itertuples():
        mask = labels == row.lesion_id
        near = ndimage.binary_dilation(mask, iterations=3) & ~(others & ~mask)
        assert consensus_rule(mask, (source >= RIM_SEEN) & near)[0] == bool(row.rim_positive)
    # The rim source is where the truth says: no rim source near lesions without one.
    plain = np.isin(labels, lesions.loc[~lesions["kind"].isin(["rim", "arc"]), "lesion_id"])
    assert source[plain].max() < RIM_SEEN or not plain.any()


@pytest.mark.shared_data
def test_discovered_by_the_app(cohort, tmp_path) -> None:
    from qsmrim_app.bids import discover
    from qsmrim_app.config import AppConfig

    bids, _ = cohort
    config = AppConfig(bids_dir=bids, output_dir=tmp_path / "out", analysis_level="participant",
                       work_dir=tmp_path / "work")
    inputs, problems = discover(config)
    assert problems == []
    (unit,) = inputs
    assert (unit.subject, unit.session) == ("01", "1x1x1")
    assert unit.lesion_mask.name.endswith("desc-lesion_dseg.nii.gz") and unit.lesion_mask_kind == "instances"
    assert unit.lesion_mask_space == "FLAIR" and unit.rim_labels_space == "FLAIR"
    assert unit.magnitude is not None and unit.qsm_units == "ppm"


@pytest.mark.slow
@pytest.mark.shared_data
def test_generator_is_deterministic(cohort, shared_data: Path, head_cache: Path, tmp_path: Path) -> None:
    bids, truth = cohort
    again = tmp_path / "bids"
    assert synth_main([str(again), *ARGS, "--data-dir", str(shared_data), "--head-cache", str(head_cache)]) == 0
    assert _digest(again) == _digest(bids)
    first = pd.read_csv(truth / "lesions.tsv", sep="\t")
    second = pd.read_csv(tmp_path / "bids_truth" / "lesions.tsv", sep="\t")
    pd.testing.assert_frame_equal(first, second)


@pytest.mark.shared_data
def test_rim_prevalence_over_the_whole_cohort(shared_data: Path) -> None:
    """About 5 % of the lesions get a rim (and each confounder kind about as many), from the same sizes."""
    from qsmrim_app.synthetic.semireal_lesions import COUNTED_VOXELS, lesion_designs

    designs = [d for p in range(1, 21) for d in lesion_designs(shared_data, p, 0).values()
               if d.volume_mm3 >= COUNTED_VOXELS]
    kinds = pd.Series([d.kind for d in designs])
    assert len(designs) > 1000
    share = kinds.value_counts(normalize=True)
    assert 0.035 < share["rim"] < 0.065
    for kind in ("arc", "vein", "hyper"):
        assert 0.03 < share[kind] < 0.07
    volume = pd.Series([d.volume_mm3 for d in designs])
    assert volume[kinds == "rim"].median() / volume[kinds == "arc"].median() < 2.0


@pytest.mark.slow
@pytest.mark.shared_data
def test_one_participant_end_to_end_through_the_app(cohort, tmp_path: Path) -> None:
    """`qsmrim ... participant` on the semi-real participant: its instances survive, the rigid registration
    puts the lesions where the truth has them, the rim annotations reach the table."""
    bids, truth = cohort
    out = tmp_path / "out"
    # The semi-real head is two people: their brain outlines disagree by ~6.5 mm at its truth, so the registration
    # gate (docs/registration.md) is relaxed here; its value is still recorded.
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), str(bids), str(out), "participant",
                           "--nprocs", "2", "-w", str(tmp_path / "work"), "--registration-gate-mm", "20"],
                          capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    anat = out / SUB / "ses-1x1x1" / "anat"
    stem = "sub-01_ses-1x1x1"
    found = nib.load(anat / f"{stem}_space-QSM_desc-lesions_dseg.nii.gz")
    want = nib.load(truth / SUB / "ses-1x1x1" / "anat" / f"{stem}_space-QSM_desc-lesion_dseg.nii.gz")
    got, true = np.asarray(found.dataobj), np.asarray(want.dataobj)
    lesions = pd.read_csv(truth / "lesions.tsv", sep="\t")
    assert sorted(set(np.unique(got)) - {0}) == lesions["lesion_id"].tolist()
    dice = [2 * np.sum((got == i) & (true == i)) / (np.sum(got == i) + np.sum(true == i)) for i in lesions["lesion_id"]]
    # Measured 0.78 (1 mm grid, 2026-12-01): the truth map is the generator's own QSM-grid rendering of
    # each lesion while the app carries the FLAIR-grid instances by nearest neighbour, so small lesions
    # differ by a voxel layer; the registration itself is checked in mm by bench_registration.py
    # (rigid: 0.07 mm mean lesion-voxel error, median Dice 0.98). A broken registration gives < 0.5.
    assert np.median(dice) > 0.7, dice
    sidecar = json.loads((anat / f"{stem}_from-FLAIR_to-QSM_mode-image_xfm.json").read_text())
    assert sidecar["RegistrationMode"] == "rigid" and sidecar["StageRigidMetric"] < -0.05
    assert sidecar["RegistrationTarget"] == "magnitude" and sidecar["RegistrationGate"] == "pass"
    annotations = pd.read_csv(anat / f"{stem}_space-QSM_desc-annotations_lesions.tsv", sep="\t")
    merged = annotations.merge(lesions, on="lesion_id", suffixes=("_app", "_truth"))
    assert len(merged) == len(lesions)
    assert (merged["rim_positive_app"].astype(int) == merged["rim_positive_truth"]).all()
    report = (out / f"{stem}.html").read_text()
    assert "RegistrationMode" in report and "rigid" in report
