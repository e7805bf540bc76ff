"""Running units side by side: publishing all at once, run logs, the scheduler's recovery from dead workers.

These are the subtle pieces under the end-to-end tests of tests/test_cohort.py, tested on their own
with small real inputs (files, nipype workflows with real worker processes).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from qsmrim_app import derivatives as drv


def _stage(root: Path, unit: drv.Unit, roles: dict[str, str]) -> list[Path]:
    files = []
    for role, text in roles.items():
        path = drv.output_path(root, unit, role)
        drv.write_with_sidecar(path, lambda p, t=text: drv.write_text(p, t), sources=["bids:raw:x"])
        files.append(path)
    return files


def test_publish_replaces_the_unit_and_removes_stale_files(tmp_path: Path) -> None:
    staging, out = tmp_path / "staging", tmp_path / "out"
    unit, other = drv.Unit("01"), drv.Unit("02")
    first = _stage(staging / "a", unit, {"radiomics": "r1", "annotations": "a1", "summary": "s1"})
    drv.publish_unit(staging / "a", out, unit, first)
    kept = _stage(out, other, {"summary": "other"})  # another unit's files are never touched
    assert drv.output_path(out, unit, "annotations").read_text() == "a1"
    assert drv.sidecar_path(drv.output_path(out, unit, "summary")).is_file()

    second = _stage(staging / "b", unit, {"radiomics": "r2", "summary": "s2"})  # no annotations this time
    published = drv.publish_unit(staging / "b", out, unit, second)
    assert drv.output_path(out, unit, "summary").read_text() == "s2"
    assert drv.output_path(out, unit, "radiomics").read_text() == "r2"
    assert not drv.output_path(out, unit, "annotations").exists(), "a stale output of the earlier run stayed"
    assert not drv.sidecar_path(drv.output_path(out, unit, "annotations")).exists()
    assert sorted(p.name for p in published) == sorted(p.name for p in drv.unit_files(out, unit))
    assert kept[0].read_text() == "other"
    assert not list(out.rglob(".*tmp*"))
    # published files are links to (or copies of) the staged ones, never the staged files moved away
    assert all(p.is_file() for p in second)


def test_publish_refuses_an_empty_set(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing staged"):
        drv.publish_unit(tmp_path, tmp_path / "out", drv.Unit("01"), [])


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / "sub-01" / f".x.tsv.{drv._HOST}~999999999.abc.tmp.tsv"
    live = tmp_path / f".dataset_description.json.{drv._HOST}~{os.getpid()}.abc.tmp.json"
    foreign = tmp_path / ".y.tsv.otherhost~1.abc.tmp.tsv"
    for path in (dead, live, foreign):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert drv.remove_stale_temporaries(tmp_path) == 1
    assert not dead.exists() and live.exists() and foreign.exists()


def test_latest_unit_log_wins(tmp_path: Path) -> None:
    first = drv.write_run_log(tmp_path, "participant", ["qsmrim"], {}, label="sub-01")
    drv.finish_run_log(first, "done")
    time.sleep(1.1)  # a later run: a different file name
    second = drv.write_run_log(tmp_path, "participant", ["qsmrim"], {}, label="sub-01")
    drv.finish_run_log(second, "failed", "QSM map x: bad")
    drv.write_run_log(tmp_path, "participant", ["qsmrim"], {}, label="sub-02")  # killed: still running
    latest = drv.latest_unit_logs(tmp_path)
    assert set(latest) == {"sub-01"}
    assert latest["sub-01"]["status"] == "failed" and latest["sub-01"]["error"] == "QSM map x: bad"
    assert json.loads(first.read_text())["status"] == "done"


# ----------------------------------------------------------------------------------------------
# The scheduler: a worker killed by the kernel, a MemoryError, the other units unaffected
# ----------------------------------------------------------------------------------------------
def _kill_self(x: int) -> int:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
    return x


def _out_of_memory(x: int) -> int:
    raise MemoryError("Unable to allocate 40.0 GiB for an array")


def _slow_double(x: int) -> int:
    import time

    time.sleep(1.0)
    return 2 * x


def _unit_workflow(name: str, func) -> "object":
    from nipype import Function, Node, Workflow

    wf = Workflow(name=name)
    first = Node(Function(input_names=["x"], output_names=["y"], function=func), name="work")
    first.inputs.x = 3
    then = Node(Function(input_names=["x"], output_names=["y"], function=_slow_double), name="publish")
    wf.connect(first, "y", then, "x")
    return wf


def test_dead_worker_fails_its_unit_only_with_a_clear_cause(tmp_path: Path) -> None:
    from qsmrim_app.config import AppConfig
    from qsmrim_app.workflows.execution import run_units

    config = AppConfig(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                       work_dir=tmp_path / "work", nprocs=2)
    workflows = {"sub-01": _unit_workflow("sub_01_wf", _slow_double),
                 "sub-02": _unit_workflow("sub_02_wf", _kill_self),
                 "sub-03": _unit_workflow("sub_03_wf", _out_of_memory),
                 "sub-04": _unit_workflow("sub_04_wf", _slow_double)}
    done: list[str] = []
    start = time.monotonic()
    outcome = run_units(config, workflows, on_done=done.append)
    assert time.monotonic() - start < 120, "the scheduler hung"
    assert outcome["sub-01"] is None and outcome["sub-04"] is None, outcome
    assert sorted(done) == ["sub-01", "sub-04"]
    assert "worker process running node work died" in outcome["sub-02"] and "memory" in outcome["sub-02"]
    assert "--nprocs" in outcome["sub-02"]
    assert "node work ran out of memory" in outcome["sub-03"] and "40.0 GiB" in outcome["sub-03"]
    result = tmp_path / "work" / "participants_wf" / "sub_04_wf" / "publish" / "result_publish.pklz"
    assert result.is_file()
    table = (tmp_path / "work" / "node_memory.tsv").read_text().splitlines()
    assert table[0] == "node\tpeak_rss_gb" and any("sub_01_wf.work" in row for row in table)
    assert all(0.01 < float(row.split("\t")[1]) < 4 for row in table[1:])


def test_progress_counts_units(caplog: pytest.LogCaptureFixture) -> None:
    from qsmrim_app.workflows.execution import UnitProgress

    class FakeNode:
        def __init__(self, unit: str, name: str) -> None:
            self._hierarchy, self.name = f"participants_wf.{unit}", name

    logger = logging.getLogger("qsmrim")  # the CLI may have stopped it propagating to the root logger
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="qsmrim")
    published = []
    progress = UnitProgress({"sub_01_wf": "sub-01", "sub_02_wf": "sub-02", "sub_03_wf": "sub-03"},
                            on_done=published.append)
    progress(FakeNode("sub_01_wf", "flair_n4"), "start")
    progress(FakeNode("sub_02_wf", "flair_n4"), "start")
    progress(FakeNode("sub_02_wf", "lesion_patches"), "exception")
    progress(FakeNode("sub_02_wf", "publish"), "end")  # nipype calls "end" after a local node's exception
    progress(FakeNode("sub_01_wf", "publish"), "end")
    assert progress.counts() == (1, 0, 1, 1)
    assert published == ["sub-01"]
    assert progress.failed_nodes == {"sub-02": "lesion_patches"}
    logger.removeHandler(caplog.handler)
    assert "units: 1 done, 0 running, 1 failed, 1 waiting (of 3)" in caplog.text


# ----------------------------------------------------------------------------------------------
# Radiomics: pyradiomics' bin count is known before it runs
# ----------------------------------------------------------------------------------------------
def test_bin_count_matches_pyradiomics() -> None:
    from radiomics.imageoperations import getBinEdges

    from qsmrim_app.radiomics import pyradiomics_bins

    rng = np.random.default_rng(0)
    for _ in range(50):
        values = rng.normal(rng.uniform(-500, 500), rng.uniform(1, 400), size=200)
        edges = getBinEdges(values, binWidth=25)
        assert pyradiomics_bins(values.min(), values.max(), 25) == len(edges) - 1


def _lesion_volume(scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A real-looking QSM patch in ppb (-60..+120) with one lesion; ``scale`` x1000 is the unit mistake."""
    rng = np.random.default_rng(1)
    qsm = rng.normal(10, 30, (30, 30, 20)).astype(np.float32)
    instances = np.zeros(qsm.shape, np.int32)
    instances[10:18, 10:18, 6:12] = 1
    qsm[instances == 1] += 60
    return qsm * np.float32(scale), instances


def test_discretisation_check_refuses_the_unit_mistake_and_passes_real_values() -> None:
    from qsmrim_app.radiomics import RadiomicsInputError, check_discretisation, lesion_boxes, load_params

    params = load_params()
    qsm, instances = _lesion_volume(1.0)
    boxes = lesion_boxes(instances, [1])
    check_discretisation(qsm, instances, boxes, (0.75, 0.75, 3.0), params)  # real values: no error
    with pytest.raises(RadiomicsInputError, match=r"lesion 1 .* grey levels on the original image .* ppb"):
        check_discretisation(qsm * 1000, instances, boxes, (0.75, 0.75, 3.0), params)
    # with a fixed bin count pyradiomics' bins are bounded whatever the values
    fixed = {**params, "setting": {**params["setting"], "binCount": 32}}
    check_discretisation(qsm * 1000, instances, boxes, (0.75, 0.75, 3.0), fixed)


def test_discretisation_check_computes_bands_exactly_when_the_bound_is_exceeded() -> None:
    """A bright vessel beside the lesion inflates the cheap bound; the exact bands decide (and pass)."""
    from qsmrim_app.radiomics import RadiomicsInputError, check_discretisation, lesion_boxes, load_params

    params = load_params()
    qsm, instances = _lesion_volume(1.0)
    qsm[2, 2, 2] = 6000.0  # inside the crop, far from the lesion: the bound exceeds 1000 bins
    boxes = lesion_boxes(instances, [1], margin=12)
    check_discretisation(qsm, instances, boxes, (0.75, 0.75, 3.0), params, max_bins=1000)
    # the original image needs 10 bins; a low-pass band of the lesion needs more, and only the
    # exact band computation (not the bound) can say which band and how many
    with pytest.raises(RadiomicsInputError, match=r"grey levels on the wavelet-L\w+ image"):
        check_discretisation(qsm, instances, boxes, (0.75, 0.75, 3.0), params, max_bins=10)


# ----------------------------------------------------------------------------------------------
# Classification: the model is read once per process
# ----------------------------------------------------------------------------------------------
def test_model_is_loaded_once_per_process(tmp_path: Path) -> None:
    import shutil

    from qsmrim_app import inference
    from qsmrim_app.config import BUNDLED_MODEL_DIR

    model = Path(shutil.copytree(BUNDLED_MODEL_DIR, tmp_path / "model"))
    key = str(model.resolve())
    first = inference.cached_ensemble(model, device="cpu")
    again = inference.cached_ensemble(model, device="cpu")
    assert again is first and inference.LOADS[key] == 1
    patches = np.zeros((3, 4, *first.inputs.shape), np.float32)
    features = np.zeros((3, len(first.feature_names)), np.float32)
    for _ in range(3):  # three units' lesions through the one loaded ensemble
        assert len(inference.cached_ensemble(model, device="cpu").predict(patches, features, first.feature_names)) == 3
    assert inference.LOADS[key] == 1
    meta = model / "model.json"
    os.utime(meta, ns=(meta.stat().st_atime_ns, meta.stat().st_mtime_ns + 10**9))  # retrained in place
    assert inference.cached_ensemble(model, device="cpu") is not first and inference.LOADS[key] == 2
