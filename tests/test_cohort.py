"""A cohort on one machine, through the command line: units side by side, bad units contained, kills survived.

- bad units: a lesion mask covering the whole volume and a ppb map declared ppm (the commonest unit
  mistake) each fail only their participant, with one clear line naming the file and the fix, and
  leave nothing of that participant in a fresh output dir; a participant that was complete before
  keeps its outputs; a QSM with Inf/NaN voxels warns and finishes; the input tree is never written;
  fixing the input and rerunning completes the unit from the cached nodes.
- many writers: 8 participant processes into one output dir, some killed with SIGKILL at seeded
  random moments, then one rerun of all: the tree equals a clean one-call run's.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT, tree_digest
from qsmrim_app import derivatives as drv

pytestmark = pytest.mark.slow
sys.path.insert(0, str(REPO_ROOT / "scripts"))
from compare_derivatives import DEFAULT_IGNORE, compare_trees  # noqa: E402

# Cheaper N4 (same in every run compared): the tests are about scheduling and files, not bias fields.
FAST = ["--n4-iterations", "20", "10"]
NO_GATE = ["--registration-gate-mm", "50"]


def qsmrim(*args, check: int | None = 0, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), *map(str, args), *FAST], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stderr[-6000:]}"
    return proc


def _resave(path: Path, change) -> None:
    image = nib.load(path)
    data = np.asarray(image.dataobj)
    nib.save(nib.Nifti1Image(change(data).astype(data.dtype), image.affine, image.header), path)


def _whole_volume_mask(bids: Path, label: str) -> Path:
    folder = bids / "derivatives" / "lesions" / f"sub-{label}" / "anat"
    for path in folder.glob("*_desc-lesion_*.nii.gz"):
        _resave(path, np.ones_like)
    return next(folder.glob("*_desc-lesion_dseg.nii.gz"))


def _ppb_declared_ppm(bids: Path, label: str) -> Path:
    path = bids / f"sub-{label}" / "anat" / f"sub-{label}_Chimap.nii.gz"
    _resave(path, lambda d: d * 1000.0)
    return path


def _with_inf(bids: Path, label: str) -> Path:
    def change(data):
        data = data.astype(np.float32).copy()
        data[data.shape[0] // 2, data.shape[1] // 2, :3] = np.inf
        data[1, 1, 1] = np.nan
        return data
    path = bids / f"sub-{label}" / "anat" / f"sub-{label}_Chimap.nii.gz"
    _resave(path, change)
    return path


def _unit_digest(out: Path, label: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in drv.unit_files(out, drv.Unit(label))}


def test_bad_units_fail_alone_and_leave_nothing(tmp_path: Path) -> None:
    from qsmrim_app.synthetic import generate_dataset

    bids, work = tmp_path / "bids", tmp_path / "work"
    generate_dataset(bids, n_subjects=3, seed=12, size="small")
    inf_qsm = _with_inf(bids, "01")
    pristine = tmp_path / "pristine"
    shutil.copytree(bids, pristine)

    # 1. every unit is good: one call, three units side by side on two processes
    first = tmp_path / "first"
    proc = qsmrim(bids, first, "participant", "--nprocs", "2", "-w", work)
    log = proc.stdout + proc.stderr  # nipype's interface logger writes to stdout
    assert f"{inf_qsm}: 4 NaN/Inf voxels set to 0 and masked out" in log
    assert "units: 3 done, 0 running, 0 failed, 0 waiting (of 3)" in log
    loads = log.count("loaded in process")
    assert 1 <= loads <= 2, f"the model was read {loads} times for 3 units on 2 worker processes"
    before = {label: _unit_digest(first, label) for label in ("01", "02", "03")}
    assert all(before.values())

    # 2. the same participants, two of them now broken, rerun into the same output dir
    mask = _whole_volume_mask(bids, "02")
    qsm = _ppb_declared_ppm(bids, "03")
    inputs_before = tree_digest(bids)
    proc = qsmrim(bids, first, "participant", "--nprocs", "2", "-w", work, check=1)
    errors = [line for line in proc.stderr.splitlines() if ": FAILED: " in line]
    assert len(errors) == 2, proc.stderr[-4000:]
    (e02,) = [e for e in errors if "sub-02: FAILED" in e]
    (e03,) = [e for e in errors if "sub-03: FAILED" in e]
    assert str(mask) in e02 and re.search(r"\d+% of the image is marked as lesion", e02) and "not a brain mask" in e02
    assert str(qsm) in e03 and "--qsm-units ppb" in e03 and "grey levels" in e03 and "ppb in the lesion" in e03
    assert "Traceback" not in proc.stdout + proc.stderr and "Saving crash info" not in proc.stdout + proc.stderr
    assert tree_digest(bids) == inputs_before, "the input dataset was written to"
    for label in ("01", "02", "03"):  # complete before, failed now: the earlier outputs stay untouched
        assert _unit_digest(first, label) == before[label], label
    qsmrim(bids, first, "group", check=1)
    report = (first / "group_report.html").read_text()
    assert "sub-02" in report and "of the image is marked as lesion" in report
    assert "sub-03" in report and "--qsm-units ppb" in report

    # 3. a fresh output dir: the broken units leave nothing there, the good one completes
    fresh = tmp_path / "fresh"
    qsmrim(bids, fresh, "participant", "--nprocs", "2", "-w", work, check=1)
    assert not (fresh / "sub-02").exists() and not (fresh / "sub-03").exists()
    assert not list(fresh.glob("sub-02*")) and not list(fresh.glob("sub-03*"))
    assert drv.output_path(fresh, drv.Unit("01"), "summary").is_file()
    assert not list(fresh.rglob(".*tmp*"))
    logs = drv.latest_unit_logs(fresh)
    assert logs["sub-02"]["status"] == "failed" and str(mask) in logs["sub-02"]["error"]
    assert logs["sub-01"]["status"] == "done"

    # 4. the inputs fixed: the rerun completes them, reusing the nodes that are still valid
    for label in ("02", "03"):
        for src in (pristine / "derivatives" / "lesions" / f"sub-{label}").rglob("*.nii.gz"):
            shutil.copyfile(src, bids / src.relative_to(pristine))
        shutil.copyfile(pristine / f"sub-{label}/anat/sub-{label}_Chimap.nii.gz",
                        bids / f"sub-{label}/anat/sub-{label}_Chimap.nii.gz")
    registration = (work / "participants_wf" / "sub_02_wf" / "registration_wf" / "flair_to_qsm_xfm"
                    / "result_flair_to_qsm_xfm.pklz")
    stamp = registration.stat().st_mtime_ns
    qsmrim(bids, fresh, "participant", "--nprocs", "2", "-w", work)
    assert registration.stat().st_mtime_ns == stamp, "a valid cached registration was recomputed"
    problems, n = compare_trees(first, fresh, ignore=(*DEFAULT_IGNORE, "group_*"))  # `first` also had a group run
    assert not problems and n > 60, problems[:10]


def test_eight_writers_killed_at_random_then_rerun_equals_a_clean_run(tmp_path: Path) -> None:
    from qsmrim_app.synthetic import generate_dataset

    bids, out, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    # The tiny phantom (a small head, the same voxel sizes): every step and every output of a unit, at a
    # quarter of the small phantom's work, so 8 writers + a rerun + a clean run fit CI's time.
    generate_dataset(bids, n_subjects=8, seed=40, size="tiny")
    labels = [f"{i:02d}" for i in range(1, 9)]
    seed = 20261201
    rng = random.Random(seed)
    victims = sorted(rng.sample(labels, 4))
    moments = {label: round(rng.uniform(2.0, 60.0), 1) for label in victims}  # early to late in a run
    print(f"kill seed {seed}: SIGKILL of {moments} (seconds after start)")

    # The registration gate is tested elsewhere (test_registration_gate.py); here every unit must publish.
    # (The tiny phantom's sub-04 is really misregistered, 6.4 mm, by the magnitude path: docs/registration.md.)
    procs = {label: subprocess.Popen([sys.executable, str(REPO_ROOT / "run.py"), str(bids), str(out),
                                      "participant", "--participant-label", label, "--nprocs", "1",
                                      "-w", str(work), *FAST, *NO_GATE],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
             for label in labels}
    start = time.monotonic()
    killed = []
    while any(p.poll() is None for p in procs.values()):
        elapsed = time.monotonic() - start
        for label, moment in moments.items():
            if label not in killed and elapsed >= moment and procs[label].poll() is None:
                os.killpg(procs[label].pid, signal.SIGKILL)
                killed.append(label)
        assert elapsed < 1200, "writers did not finish"
        time.sleep(0.2)
    codes = {label: p.returncode for label, p in procs.items()}
    print(f"exit codes {codes}; killed while running: {killed}")
    assert killed, f"no kill landed (moments {moments})"
    assert all(codes[label] == 0 for label in labels if label not in killed), codes

    qsmrim(bids, out, "participant", "--nprocs", "2", "-w", work, *NO_GATE)  # one rerun of all
    clean = tmp_path / "clean"
    qsmrim(bids, clean, "participant", "--nprocs", "2", "-w", tmp_path / "clean_work", *NO_GATE)

    problems, n = compare_trees(clean, out)
    assert not problems and n >= 8 * 20, (f"kill seed {seed}, moments {moments}", problems[:10])
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "qsmrim"
    assert not list(out.rglob(".*tmp*")), list(out.rglob(".*tmp*"))
    qsmrim(bids, out, "group")
    table = drv.read_tsv(out / "group_rimcounts.tsv")
    assert table["participant_id"].tolist() == [f"sub-{label}" for label in labels]
    assert "None: every participant finished." in (out / "group_report.html").read_text()
