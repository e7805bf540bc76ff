"""Input discovery (qsmrim_app.bids) on small hand-made BIDS datasets and on the real shared data."""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmrim_app.bids import (
    Grid,
    InputProblem,
    SelectionError,
    derivative_roots,
    discover,
    unit_doubt,
    validate_dataset,
)
from qsmrim_app.config import AppConfig, PreprocConfig
from qsmrim_app.synthetic import HOWS, break_participant

from lesion_layouts import write_lstai_bids, write_lstai_output

from conftest import tree_digest

# Tiny grids that differ like real ones do: QSM 0.5x0.5x2 mm axial, FLAIR 1 mm isotropic.
QSM_SHAPE = (16, 16, 6)
QSM_AFFINE = np.diag([0.5, 0.5, 2.0, 1.0])
FLAIR_SHAPE = (8, 8, 12)
FLAIR_AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _entities(subject: str, session: str | None) -> tuple[str, str]:
    """(folder, file prefix) of a participant/session."""
    if session:
        return f"sub-{subject}/ses-{session}/anat", f"sub-{subject}_ses-{session}"
    return f"sub-{subject}/anat", f"sub-{subject}"


def add_participant(root: Path, subject: str, session: str | None = None, *, seed: int = 0,
                    qsm_units: str = "ppm", mask_space: str = "FLAIR", magnitude: bool = True,
                    qsm_in: str = "raw", rim: bool = True, ext: str = ".nii.gz") -> None:
    """One participant/session laid out as the phantom generator does (masks in derivatives/lesions)."""
    rng = np.random.default_rng(seed)
    folder, prefix = _entities(subject, session)
    chi = rng.normal(0.0, 0.05, QSM_SHAPE).astype(np.float32)
    if qsm_units == "ppb":
        chi *= 1000.0
    qsm_root = root if qsm_in == "raw" else root / "derivatives" / qsm_in
    _save(qsm_root / folder / f"{prefix}_Chimap{ext}", chi, QSM_AFFINE)
    _save(root / folder / f"{prefix}_FLAIR.nii.gz", rng.uniform(100, 200, FLAIR_SHAPE).astype(np.float32),
          FLAIR_AFFINE)
    if magnitude:
        _save(root / folder / f"{prefix}_part-mag_T2starw.nii.gz",
              rng.uniform(0, 1, QSM_SHAPE).astype(np.float32), QSM_AFFINE)
    shape, affine = (FLAIR_SHAPE, FLAIR_AFFINE) if mask_space == "FLAIR" else (QSM_SHAPE, QSM_AFFINE)
    instances = np.zeros(shape, np.int16)
    instances[1:4, 1:4, 1:4] = 1
    instances[5:7, 5:7, 3:6] = 2
    deriv = root / "derivatives" / "lesions" / folder
    _save(deriv / f"{prefix}_desc-lesion_mask.nii.gz", (instances > 0).astype(np.uint8), affine)
    _save(deriv / f"{prefix}_desc-lesion_dseg.nii.gz", instances, affine)
    if rim:
        _save(deriv / f"{prefix}_desc-rim_dseg.nii.gz", np.where(instances == 2, 2, instances > 0).astype(np.uint8),
              affine)


def make_dataset(root: Path, subjects: tuple[str, ...] = ("01", "02", "03"),
                 sessions: tuple[str | None, ...] = (None,), **kwargs) -> Path:
    """A small valid BIDS dataset with a lesion derivatives dataset beside the raw data."""
    _json(root / "dataset_description.json", {"Name": "qsmrim test", "BIDSVersion": "1.9.0"})
    _json(root / "derivatives" / "lesions" / "dataset_description.json",
          {"Name": "lesions", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
           "GeneratedBy": [{"Name": "manual"}]})
    for i, subject in enumerate(subjects):
        for session in sessions:
            add_participant(root, subject, session, seed=i, **kwargs)
    return root


def make_config(bids_dir: Path, tmp_path: Path, **kwargs) -> AppConfig:
    defaults = dict(bids_dir=bids_dir.resolve(), output_dir=(tmp_path / "out").resolve(),
                    analysis_level="participant", work_dir=(tmp_path / "work").resolve())
    defaults.update(kwargs)
    return AppConfig(**defaults)


# ----------------------------------------------------------------------------------------------
def test_discovers_the_phantom(phantom: Path, tmp_path: Path) -> None:
    before = tree_digest(phantom)
    assert validate_dataset(phantom) == []
    inputs, problems = discover(make_config(phantom, tmp_path))
    assert problems == []
    assert [i.subject for i in inputs] == ["01", "02", "03"]
    for unit in inputs:
        prefix = f"sub-{unit.subject}"
        assert unit.qsm == phantom / prefix / "anat" / f"{prefix}_Chimap.nii.gz"
        assert unit.flair == phantom / prefix / "anat" / f"{prefix}_FLAIR.nii.gz"
        assert unit.magnitude == phantom / prefix / "anat" / f"{prefix}_part-mag_T2starw.nii.gz"
        assert unit.lesion_mask == phantom / "derivatives/lesions" / prefix / "anat" / f"{prefix}_desc-lesion_dseg.nii.gz"
        assert (unit.lesion_mask_kind, unit.lesion_mask_space, unit.rim_labels_space) == ("instances", "FLAIR", "FLAIR")
        assert unit.qsm_units == "ppm" and unit.notes == ()
        # the phantom's QSM is an oblique thick-slice grid, the FLAIR its own sagittal one
        assert not unit.qsm_grid.matches(unit.flair_grid)
        assert nib.load(unit.qsm).shape == unit.qsm_grid.shape
        np.testing.assert_allclose(nib.load(unit.flair).affine, unit.flair_grid.affine_array)
    assert tree_digest(phantom) == before


_PHANTOM_BREAKS = {
    "missing-flair": "no FLAIR",
    "4d-qsm": "4D with shape",
    "nan-qsm": "no finite non-zero",
    "corrupt-gzip": "unreadable",
    "mismatched-mask-grid": "matches neither the FLAIR nor the QSM grid",
}


# empty-mask is zero lesions; nonbinary-mask (a soft 0-1 mask) is read as a probability map (below).
@pytest.mark.parametrize("how", [h for h in HOWS if h not in ("empty-mask", "nonbinary-mask")])
def test_one_broken_phantom_participant(phantom_copy: Path, tmp_path: Path, how: str) -> None:
    touched = break_participant(phantom_copy, "02", how)
    inputs, problems = discover(make_config(phantom_copy, tmp_path))
    assert [i.subject for i in inputs] == ["01", "03"]
    assert problems and all(p.subject == "02" for p in problems)
    assert all(_PHANTOM_BREAKS[how] in p.message for p in problems), [str(p) for p in problems]
    for problem in problems:
        assert problem.file is None if how == "missing-flair" else problem.file in touched


def test_discovers_raw_layout_with_lesion_derivatives(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds")
    inputs, problems = discover(make_config(bids_dir, tmp_path))
    assert problems == []
    assert [i.subject for i in inputs] == ["01", "02", "03"]
    first = inputs[0]
    assert first.session is None
    assert first.qsm == bids_dir / "sub-01/anat/sub-01_Chimap.nii.gz"
    assert first.flair == bids_dir / "sub-01/anat/sub-01_FLAIR.nii.gz"
    assert first.magnitude == bids_dir / "sub-01/anat/sub-01_part-mag_T2starw.nii.gz"
    # instances preferred over the binary mask of the same lesions
    assert first.lesion_mask.name == "sub-01_desc-lesion_dseg.nii.gz"
    assert first.lesion_mask_kind == "instances"
    assert first.lesion_mask_space == "FLAIR"
    assert first.rim_labels is not None and first.rim_labels.name == "sub-01_desc-rim_dseg.nii.gz"
    assert first.rim_labels_space == "FLAIR"
    assert first.qsm_units == "ppm"
    assert first.qsm_grid.shape == QSM_SHAPE and first.flair_grid.shape == FLAIR_SHAPE
    assert first.qsm_grid.zooms == (0.5, 0.5, 2.0)
    np.testing.assert_allclose(first.qsm_grid.affine_array, QSM_AFFINE)
    assert first.notes == ()
    assert first.name == "sub-01"


def test_binary_mask_in_qsm_grid_and_legacy_roi(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01", "02"), mask_space="QSM", rim=False)
    for dseg in bids_dir.glob("derivatives/lesions/sub-01/anat/*_desc-lesion_dseg.nii.gz"):
        dseg.unlink()
    # sub-02: only a legacy raw label-lesion_roi mask
    legacy_src = bids_dir / "derivatives/lesions/sub-02/anat/sub-02_desc-lesion_mask.nii.gz"
    legacy = bids_dir / "sub-02/anat/sub-02_label-lesion_roi.nii.gz"
    legacy.write_bytes(legacy_src.read_bytes())
    for path in (bids_dir / "derivatives/lesions/sub-02/anat").iterdir():
        path.unlink()
    inputs, problems = discover(make_config(bids_dir, tmp_path))
    assert problems == []
    by_subject = {i.subject: i for i in inputs}
    assert by_subject["01"].lesion_mask.name == "sub-01_desc-lesion_mask.nii.gz"
    assert by_subject["01"].lesion_mask_kind == "binary"
    assert by_subject["01"].lesion_mask_space == "QSM"
    assert by_subject["01"].rim_labels is None and by_subject["01"].rim_labels_space is None
    assert by_subject["02"].lesion_mask == legacy
    assert by_subject["02"].lesion_mask_kind == "binary"
    assert validate_dataset(bids_dir) == []  # the legacy spelling is accepted


def test_qsmxt_derivatives_without_description_uncompressed(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01", "02"), qsm_in="qsmxt", ext=".nii")
    assert not (bids_dir / "derivatives/qsmxt/dataset_description.json").exists()
    before = tree_digest(bids_dir)
    inputs, problems = discover(make_config(bids_dir, tmp_path))
    assert problems == []
    assert [i.qsm for i in inputs] == [bids_dir / f"derivatives/qsmxt/sub-{s}/anat/sub-{s}_Chimap.nii"
                                       for s in ("01", "02")]
    assert tree_digest(bids_dir) == before  # no synthesized description written into the input


def test_qsm_from_external_derivatives_folder(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01",), qsm_in="qsmxt")
    external = tmp_path / "elsewhere" / "derivatives"
    (bids_dir / "derivatives" / "qsmxt").rename(tmp_path / "qsmxt_out")
    external.mkdir(parents=True)
    (tmp_path / "qsmxt_out").rename(external / "qsmxt")
    config = make_config(bids_dir, tmp_path)
    inputs, problems = discover(config)
    assert inputs == [] and len(problems) == 1 and problems[0].missing
    assert "no QSM" in problems[0].message
    # -d pointing at a whole derivatives folder is expanded to the pipelines inside it
    config = make_config(bids_dir, tmp_path, derivatives=(external,))
    assert derivative_roots(config)[-1] == (external / "qsmxt").resolve()
    inputs, problems = discover(config)
    assert problems == []
    assert inputs[0].qsm == external / "qsmxt/sub-01/anat/sub-01_Chimap.nii.gz"


def test_sessions_are_units_and_session_labels_select(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01", "02"), sessions=("1", "2"))
    inputs, problems = discover(make_config(bids_dir, tmp_path))
    assert problems == []
    assert [(i.subject, i.session) for i in inputs] == [("01", "1"), ("01", "2"), ("02", "1"), ("02", "2")]
    assert inputs[1].qsm.name == "sub-01_ses-2_Chimap.nii.gz"
    assert inputs[1].name == "sub-01_ses-2"
    inputs, _ = discover(make_config(bids_dir, tmp_path, session_labels=("2",), participant_labels=("02",)))
    assert [(i.subject, i.session) for i in inputs] == [("02", "2")]
    with pytest.raises(SelectionError) as err:
        discover(make_config(bids_dir, tmp_path, session_labels=("9",)))
    assert err.value.no_data and "existing sessions: 1, 2" in str(err.value)


def test_unknown_participant_label_lists_existing(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01", "02"))
    with pytest.raises(SelectionError) as err:
        discover(make_config(bids_dir, tmp_path, participant_labels=("01", "07")))
    assert not err.value.no_data
    assert "07" in str(err.value) and "existing participants: 01, 02" in str(err.value)


def _break(bids_dir: Path, how: str) -> Path:
    """Break sub-02 in one way; returns the file at fault."""
    anat = bids_dir / "sub-02/anat"
    lesions = bids_dir / "derivatives/lesions/sub-02/anat"
    if how == "missing-flair":
        (anat / "sub-02_FLAIR.nii.gz").unlink()
        return anat / "sub-02_FLAIR.nii.gz"
    if how == "4d-qsm":
        return _save(anat / "sub-02_Chimap.nii.gz", np.zeros(QSM_SHAPE + (2,), np.float32), QSM_AFFINE)
    if how == "nan-qsm":
        return _save(anat / "sub-02_Chimap.nii.gz", np.full(QSM_SHAPE, np.nan, np.float32), QSM_AFFINE)
    if how == "corrupt-gzip":
        path = anat / "sub-02_FLAIR.nii.gz"
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])  # truncated: header intact, data stream cut
        return path
    if how == "truncated-nii":  # uncompressed FLAIR cut short: the header still reads
        src = nib.load(anat / "sub-02_FLAIR.nii.gz")
        img = nib.Nifti1Image(np.asanyarray(src.dataobj), src.affine)
        (anat / "sub-02_FLAIR.nii.gz").unlink()
        path = anat / "sub-02_FLAIR.nii"
        nib.save(img, path)
        path.write_bytes(path.read_bytes()[:-10])
        return path
    if how == "empty-mask":
        return _save(lesions / "sub-02_desc-lesion_dseg.nii.gz", np.zeros(FLAIR_SHAPE, np.int16), FLAIR_AFFINE)
    if how == "mismatched-mask-grid":
        shifted = FLAIR_AFFINE.copy()
        shifted[0, 3] = 5.0
        return _save(lesions / "sub-02_desc-lesion_dseg.nii.gz", np.ones(FLAIR_SHAPE, np.int16), shifted)
    if how == "no-mask":
        for path in lesions.iterdir():
            path.unlink()
        return lesions
    raise ValueError(how)


@pytest.mark.parametrize("how, expected", [
    ("missing-flair", "no FLAIR"),
    ("4d-qsm", "4D"),
    ("nan-qsm", "no finite non-zero"),
    ("corrupt-gzip", "gzip"),
    ("truncated-nii", "truncated"),
    ("mismatched-mask-grid", "matches neither"),
    ("no-mask", "no lesion mask"),
])
def test_one_broken_participant_among_good_ones(tmp_path: Path, how: str, expected: str) -> None:
    bids_dir = make_dataset(tmp_path / "ds")
    culprit = _break(bids_dir, how)
    inputs, problems = discover(make_config(bids_dir, tmp_path))
    assert [i.subject for i in inputs] == ["01", "03"]
    assert problems and all(p.subject == "02" for p in problems)
    assert len(problems) == 1, [str(p) for p in problems]
    problem = problems[0]
    assert expected in problem.message
    assert problem.missing == (how in ("missing-flair", "no-mask"))
    if not problem.missing:
        assert problem.file == culprit
        assert str(culprit) in str(problem)
    assert str(problem).startswith("sub-02: ")


def test_mismatched_grid_message_names_both_grids(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("02",))
    _break(bids_dir, "mismatched-mask-grid")
    _, problems = discover(make_config(bids_dir, tmp_path))
    message = problems[0].message
    assert "FLAIR: shape 8x8x12" in message and "QSM: shape 16x16x6" in message
    assert "origin (5.00" in message  # the mask's own grid


def test_several_runs_are_an_error_until_a_filter_picks_one(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01",))
    anat = bids_dir / "sub-01/anat"
    flair = anat / "sub-01_FLAIR.nii.gz"
    flair.rename(anat / "sub-01_run-1_FLAIR.nii.gz")
    (anat / "sub-01_run-2_FLAIR.nii.gz").write_bytes((anat / "sub-01_run-1_FLAIR.nii.gz").read_bytes())
    inputs, problems = discover(make_config(bids_dir, tmp_path))
    assert inputs == [] and len(problems) == 1
    assert "several FLAIR files" in problems[0].message and "run-2" in problems[0].message
    assert "'flair' query in --bids-filter-file" in problems[0].message
    inputs, problems = discover(make_config(bids_dir, tmp_path, bids_filters={"flair": {"run": 2}}))
    assert problems == [] and inputs[0].flair.name == "sub-01_run-2_FLAIR.nii.gz"


def test_filter_scope_picks_derivative_qsm_over_raw(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01",))
    add_participant(bids_dir, "01", qsm_in="qsmxt", ext=".nii")  # a second QSM in derivatives
    _, problems = discover(make_config(bids_dir, tmp_path))
    assert "several QSM files" in problems[0].message
    inputs, problems = discover(make_config(bids_dir, tmp_path, bids_filters={"qsm": {"scope": "qsmxt"}}))
    assert problems == [] and inputs[0].qsm.parent.parent.parent.name == "qsmxt"
    inputs, _ = discover(make_config(bids_dir, tmp_path, bids_filters={"qsm": {"scope": "raw"}}))
    assert inputs[0].qsm == bids_dir / "sub-01/anat/sub-01_Chimap.nii.gz"


def test_filter_selecting_nothing_is_a_missing_problem(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01", "02"))
    inputs, problems = discover(make_config(bids_dir, tmp_path, bids_filters={"qsm": {"acquisition": "nope"}}))
    assert inputs == [] and len(problems) == 2
    assert all(p.missing and "with the --bids-filter-file query" in p.message for p in problems)


def test_magnitude_only_in_qsm_grid(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01",), magnitude=False)
    anat = bids_dir / "sub-01/anat"
    _save(anat / "sub-01_part-mag_T2starw.nii.gz", np.ones(FLAIR_SHAPE, np.float32), FLAIR_AFFINE)
    inputs, problems = discover(make_config(bids_dir, tmp_path))
    assert problems == [] and inputs[0].magnitude is None
    assert any("grid differs" in note for note in inputs[0].notes)
    # a multi-echo magnitude (echo 1) in the QSM grid is taken (entity order as BIDS writes it)
    (anat / "sub-01_part-mag_T2starw.nii.gz").unlink()
    megre = _save(anat / "sub-01_echo-1_part-mag_MEGRE.nii.gz", np.ones(QSM_SHAPE, np.float32), QSM_AFFINE)
    _save(anat / "sub-01_echo-2_part-mag_MEGRE.nii.gz", np.ones(QSM_SHAPE, np.float32), QSM_AFFINE)
    inputs, _ = discover(make_config(bids_dir, tmp_path))
    assert inputs[0].magnitude == megre


def test_units_from_cli_sidecar_and_doubts(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01",), qsm_units="ppb")
    inputs, _ = discover(make_config(bids_dir, tmp_path))
    assert inputs[0].qsm_units == "ppm"
    assert any("--qsm-units ppb" in note for note in inputs[0].notes)
    config = make_config(bids_dir, tmp_path, preproc=PreprocConfig(qsm_units="ppb"))
    inputs, _ = discover(config)
    assert inputs[0].qsm_units == "ppb" and inputs[0].notes == ()
    _json(bids_dir / "sub-01/anat/sub-01_Chimap.json", {"Units": "ppb"})
    inputs, _ = discover(make_config(bids_dir, tmp_path))
    assert inputs[0].qsm_units == "ppb" and inputs[0].notes == ()


def test_unit_doubt_on_values() -> None:
    rng = np.random.default_rng(0)
    ppm = rng.normal(0, 0.05, 1000)
    assert unit_doubt(ppm, "ppm") is None
    assert "--qsm-units ppm" in unit_doubt(ppm, "ppb")
    assert "--qsm-units ppb" in unit_doubt(ppm * 1000, "ppm")
    assert unit_doubt(np.zeros(10), "ppm") is None


def test_own_output_inside_derivatives_is_not_an_input(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01",))
    output = bids_dir / "derivatives" / "qsmrim"
    # an earlier run's instance map must not be taken for a second lesion mask
    _save(output / "sub-01/anat/sub-01_desc-lesion_dseg.nii.gz", np.ones(FLAIR_SHAPE, np.int16), FLAIR_AFFINE)
    config = make_config(bids_dir, tmp_path, output_dir=output.resolve())
    assert output.resolve() not in derivative_roots(config)
    inputs, problems = discover(config)
    assert problems == [] and inputs[0].lesion_mask.parent.parent.parent.name == "lesions"


def test_grid_tolerance() -> None:
    img = nib.Nifti1Image(np.zeros(QSM_SHAPE, np.float32), QSM_AFFINE)
    grid = Grid.from_image(img)
    close = QSM_AFFINE.copy()
    close[0, 3] += 5e-4
    far = QSM_AFFINE.copy()
    far[0, 3] += 5e-2
    assert grid.matches(Grid.from_image(nib.Nifti1Image(np.zeros(QSM_SHAPE, np.float32), close)))
    assert not grid.matches(Grid.from_image(nib.Nifti1Image(np.zeros(QSM_SHAPE, np.float32), far)))
    assert not grid.matches(Grid.from_image(nib.Nifti1Image(np.zeros((16, 16, 7), np.float32), QSM_AFFINE)))
    assert hash(grid) == hash(Grid.from_image(img))  # frozen and hashable


def test_validate_dataset(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01",))
    assert validate_dataset(bids_dir) == []
    bad = bids_dir / "sub-01/anat/sub-01_flair_copy.nii.gz"
    bad.write_bytes(b"x")
    (bids_dir / "derivatives/lesions/whatever.txt").write_text("not checked")
    (bids_dir / ".hidden").write_text("not checked")
    errors = validate_dataset(bids_dir)
    assert len(errors) == 1 and str(bad) in errors[0]
    (bids_dir / ".bidsignore").write_text("# local extras\n*_copy.nii.gz\n")
    assert validate_dataset(bids_dir) == []
    (bids_dir / "dataset_description.json").unlink()
    errors = validate_dataset(bids_dir)
    assert len(errors) == 1 and "dataset_description.json: missing" in errors[0]
    (bids_dir / "dataset_description.json").write_text('{"Name": "x"}')
    assert "BIDSVersion missing" in validate_dataset(bids_dir)[0]


def test_discovery_never_writes_into_the_dataset(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", sessions=("1",), qsm_in="qsmxt")
    before = tree_digest(bids_dir)
    discover(make_config(bids_dir, tmp_path))
    validate_dataset(bids_dir)
    assert tree_digest(bids_dir) == before


@pytest.mark.shared_data
def test_real_qsm_flair_and_expert_mask(shared_data: Path, tmp_path: Path) -> None:
    """Real images: COSMOS QSM (ppm, 160^3) and a real MS FLAIR with its consensus lesion mask."""
    bids_dir = tmp_path / "real"
    _json(bids_dir / "dataset_description.json", {"Name": "real", "BIDSVersion": "1.9.0"})
    _json(bids_dir / "derivatives/lesions/dataset_description.json",
          {"Name": "lesions", "BIDSVersion": "1.9.0", "DatasetType": "derivative"})
    anat = bids_dir / "sub-07/anat"
    lesions = bids_dir / "derivatives/lesions/sub-07/anat"
    anat.mkdir(parents=True)
    lesions.mkdir(parents=True)
    ms = shared_data / "open_ms_data" / "patient07"
    os.symlink(shared_data / "qsm_challenge_2016/chi_cosmos.nii.gz", anat / "sub-07_Chimap.nii.gz")
    os.symlink(ms / "FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz",
               anat / "sub-07_FLAIR.nii.gz")
    os.symlink(ms / "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz",
               lesions / "sub-07_desc-lesion_mask.nii.gz")
    assert validate_dataset(bids_dir) == []
    inputs, problems = discover(make_config(bids_dir, tmp_path))
    assert problems == []
    (real,) = inputs
    assert real.qsm_grid.shape == (160, 160, 160) and real.flair_grid.shape == (182, 218, 182)
    assert real.lesion_mask_kind == "binary" and real.lesion_mask_space == "FLAIR"
    assert real.qsm_units == "ppm" and real.notes == ()  # COSMOS in ppm: no unit doubt
    # the same real mask in ppb-declared data raises the doubt
    inputs, _ = discover(make_config(bids_dir, tmp_path, preproc=PreprocConfig(qsm_units="ppb")))
    assert any("--qsm-units ppm" in note for note in inputs[0].notes)
    # a truncated copy of the real FLAIR is reported as unreadable, naming the file
    raw = gzip.open(anat / "sub-07_FLAIR.nii.gz").read(400_000)
    (anat / "sub-07_FLAIR.nii.gz").unlink()
    with gzip.open(anat / "sub-07_FLAIR.nii.gz", "wb") as stream:
        stream.write(raw)
    _, problems = discover(make_config(bids_dir, tmp_path))
    assert len(problems) == 1 and problems[0].file == anat / "sub-07_FLAIR.nii.gz"


def test_input_problem_str() -> None:
    problem = InputProblem("01", "2", Path("/d/x.nii.gz"), "is broken")
    assert str(problem) == "sub-01 ses-2: /d/x.nii.gz: is broken"
    assert str(InputProblem("01", None, None, "no FLAIR")) == "sub-01: no FLAIR"


def test_rim_annotation_labels_checked(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01", "02"))
    rim = bids_dir / "derivatives/lesions/sub-02/anat/sub-02_desc-rim_dseg.nii.gz"
    labels = np.zeros(FLAIR_SHAPE, np.uint8)
    labels[1:3, 1:3, 1:3] = 3
    _save(rim, labels, FLAIR_AFFINE)
    inputs, problems = discover(make_config(bids_dir, tmp_path))
    assert [i.subject for i in inputs] == ["01"]
    assert len(problems) == 1 and problems[0].file == rim and "labels [3]" in problems[0].message


def test_empty_lesion_mask_is_a_participant_without_lesions(phantom_copy: Path, tmp_path: Path) -> None:
    """No lesions is a valid result (zero rim+), not an input error: the participant is processed."""
    break_participant(phantom_copy, "02", "empty-mask")
    inputs, problems = discover(make_config(phantom_copy, tmp_path))
    assert [i.subject for i in inputs] == ["01", "02", "03"] and not problems


# --------------------------------------------------------------------------------------------
# Lesion files as users have them: probability maps, soft masks, LST-AI's two layouts
# --------------------------------------------------------------------------------------------
def test_soft_binary_mask_is_read_as_probability_with_a_notice(phantom_copy: Path, tmp_path: Path) -> None:
    (touched,) = break_participant(phantom_copy, "02", "nonbinary-mask")
    inputs, problems = discover(make_config(phantom_copy, tmp_path))
    assert problems == []
    unit = {i.subject: i for i in inputs}["02"]
    assert (unit.lesion_mask, unit.lesion_mask_kind) == (touched, "probability")
    assert any("read as a lesion probability map" in note for note in unit.notes)


def test_probability_map_outside_0_1_is_a_problem(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01",))
    deriv = bids_dir / "derivatives" / "lesions" / "sub-01" / "anat"
    for path in deriv.glob("*desc-lesion_*"):
        path.unlink()
    _save(deriv / "sub-01_label-lesion_probseg.nii.gz", np.full(FLAIR_SHAPE, 3.5, np.float32), FLAIR_AFFINE)
    inputs, problems = discover(make_config(bids_dir, tmp_path))
    assert inputs == [] and "expected probabilities in 0..1" in problems[0].message


def _without_lesion_masks(bids_dir: Path) -> Path:
    """The raw dataset only: the phantom-style lesion derivatives removed."""
    shutil.rmtree(bids_dir / "derivatives" / "lesions")
    return bids_dir


@pytest.mark.parametrize("session", [None, "A"])
@pytest.mark.parametrize("where", ["-d", "derivatives"])
def test_lstai_bare_outputs_found_from_folder_names(tmp_path: Path, session: str | None, where: str) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01", "02"), sessions=(session,))
    folder, prefix = _entities("01", session)
    binary = bids_dir / "derivatives/lesions" / folder / f"{prefix}_desc-lesion_mask.nii.gz"
    lst_root = (tmp_path / "lstai") if where == "-d" else (bids_dir / "derivatives" / "lst")
    masks = {}
    for subject in ("01", "02"):
        folder, prefix = _entities(subject, session)
        source = bids_dir / "derivatives/lesions" / folder / f"{prefix}_desc-lesion_mask.nii.gz"
        masks[subject] = write_lstai_output(lst_root, subject, session, source, old_names=subject == "02")
    _without_lesion_masks(bids_dir)
    before = tree_digest(lst_root)
    extra = {"derivatives": (lst_root.resolve(),)} if where == "-d" else {}
    inputs, problems = discover(make_config(bids_dir, tmp_path, **extra))
    assert problems == [] and binary is not None
    assert {i.subject: i.lesion_mask for i in inputs} == masks  # the binary mask, not the annotated one
    assert all((i.session, i.lesion_mask_kind, i.lesion_mask_space) == (session, "binary", "FLAIR")
               for i in inputs)
    assert tree_digest(lst_root) == before


@pytest.mark.parametrize("description", [True, False])
def test_lstai_bids_wrapper_found_by_pybids(tmp_path: Path, description: bool) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01", "02"), sessions=("01",))
    lst_root = bids_dir / "derivatives" / "lst-ai-v1.1.0b"
    masks = {}
    for subject in ("01", "02"):
        folder, prefix = _entities(subject, "01")
        source = bids_dir / "derivatives/lesions" / folder / f"{prefix}_desc-lesion_mask.nii.gz"
        flair = bids_dir / folder / f"{prefix}_FLAIR.nii.gz"
        masks[subject] = write_lstai_bids(lst_root, subject, "01", source, flair=flair, description=description)
    _without_lesion_masks(bids_dir)
    inputs, problems = discover(make_config(bids_dir, tmp_path))
    # the wrapper's temp/ FLAIR copies are intermediates, not a second FLAIR
    assert problems == [], [str(p) for p in problems]
    assert {i.subject: i.lesion_mask for i in inputs} == masks
    assert all(i.lesion_mask_kind == "binary" and i.flair.parent.parent.parent.parent == bids_dir for i in inputs)


def test_lstai_probability_map_preferred_and_filters_keep_working(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01",))
    source = bids_dir / "derivatives/lesions/sub-01/anat/sub-01_desc-lesion_mask.nii.gz"
    prob = _save(tmp_path / "prob.nii.gz", np.full(FLAIR_SHAPE, 0.25, np.float32), FLAIR_AFFINE)
    lst_root = tmp_path / "lstai"
    write_lstai_output(lst_root, "01", None, source, probability=prob)
    inputs, problems = discover(make_config(bids_dir, tmp_path, derivatives=(lst_root.resolve(),)))
    # a BIDS-named mask in the dataset wins over the bare files
    assert problems == [] and inputs[0].lesion_mask.name == "sub-01_desc-lesion_dseg.nii.gz"
    _without_lesion_masks(bids_dir)
    inputs, problems = discover(make_config(bids_dir, tmp_path, derivatives=(lst_root.resolve(),)))
    assert inputs[0].lesion_mask == lst_root / "sub-01/temp/sub-X_ses-Y_space-FLAIR_seg-lst_prob.nii.gz"
    assert inputs[0].lesion_mask_kind == "probability"
    # a filter with BIDS entities asks for a BIDS-named file: the bare outputs cannot match it
    inputs, problems = discover(make_config(bids_dir, tmp_path, derivatives=(lst_root.resolve(),),
                                            bids_filters={"lesion_mask": {"desc": "lesion"}}))
    assert inputs == [] and problems[0].missing
    inputs, problems = discover(make_config(bids_dir, tmp_path, derivatives=(lst_root.resolve(),),
                                            bids_filters={"lesion_mask": {"scope": "lstai"}}))
    assert problems == [] and inputs[0].lesion_mask_kind == "probability"


def test_label_lesion_probseg_found_as_probability(tmp_path: Path) -> None:
    bids_dir = make_dataset(tmp_path / "ds", subjects=("01",))
    deriv = bids_dir / "derivatives" / "lesions" / "sub-01" / "anat"
    for path in deriv.glob("*desc-lesion_*"):
        path.unlink()
    _save(deriv / "sub-01_space-FLAIR_label-lesion_probseg.nii.gz", np.full(FLAIR_SHAPE, 0.7, np.float32),
          FLAIR_AFFINE)
    inputs, problems = discover(make_config(bids_dir, tmp_path))
    assert problems == [] and inputs[0].lesion_mask_kind == "probability"
