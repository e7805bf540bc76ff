"""The SLURM array script (fast: driven with SLURM's environment and stand-in apps) and the real cluster
stage (slow, opt-in).

Why: `.ci/slurm.sh` proves the script on a real one-node cluster, but only where slurm-wlm can be
installed; these tests pin down the script's contract everywhere: which participant a task takes, the
resources it passes on, the per-task exit-code record, exit-code propagation and work-dir handling.
"""
from __future__ import annotations

import csv
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "qsmrim_slurm_array.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# A stand-in for `qsmrim` / `apptainer`: records its argv (one per line) and exits with $FAKE_RC.
FAKE = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_ARGS"
env | grep -E '^(OMP_NUM_THREADS|MKL_NUM_THREADS)=' | sort > "$FAKE_ARGS.env"
exit "${FAKE_RC:-0}"
"""


def _fake(bin_dir: Path, name: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(FAKE)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _dataset(root: Path, rows: list[str], header: str = "participant_id\tage\tsex") -> Path:
    bids = root / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text("\n".join([header, *rows]) + "\n")
    return bids


def _run(tmp_path: Path, bids: Path, task: int, *extra: str, rc: int = 0,
         env_extra: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "qsmrim")
    args_file = tmp_path / f"args-{task}"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_JOB_ID": "777",
        "SLURM_CPUS_PER_TASK": "2",
        "SLURM_MEM_PER_NODE": "4096",
        "QSMRIM_SCRATCH": str(tmp_path / "scratch"),
        "FAKE_ARGS": str(args_file),
        "FAKE_RC": str(rc),
        **(env_extra or {}),
    }
    (tmp_path / "scratch").mkdir(exist_ok=True)
    proc = subprocess.run(["bash", str(SCRIPT), str(bids), str(tmp_path / "out"), *extra],
                          env=env, capture_output=True, text=True, timeout=60)
    argv = args_file.read_text().splitlines() if args_file.exists() else []
    return proc, argv


def _record(tmp_path: Path, task: int) -> dict[str, str]:
    with open(tmp_path / "out" / "logs" / "slurm" / f"777_{task}.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert len(rows) == 1
    return rows[0]


def test_task_takes_its_row_and_the_allocation(tmp_path: Path) -> None:
    bids = _dataset(tmp_path, ["sub-01\t40\tF", "sub-02\t51\tM", "sub-03\t33\tF"])
    proc, argv = _run(tmp_path, bids, 2, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert argv[:3] == [str(bids), str(tmp_path / "out"), "participant"]
    assert argv[argv.index("--participant-label") + 1] == "02"
    assert argv[argv.index("--nprocs") + 1] == "2" and argv[argv.index("--omp-nthreads") + 1] == "2"
    assert float(argv[argv.index("--mem-gb") + 1]) == pytest.approx(3.6)
    assert argv[argv.index("--device") + 1] == "cpu"  # extra options pass through
    work = Path(argv[argv.index("-w") + 1])
    assert work.is_relative_to(tmp_path / "scratch"), "work dir must be on node-local scratch"
    assert not work.parent.exists(), "a successful task removes its work dir"
    env = (tmp_path / "args-2.env").read_text().split()
    assert env == ["MKL_NUM_THREADS=2", "OMP_NUM_THREADS=2"]
    record = _record(tmp_path, 2)
    assert record["participant_id"] == "sub-02" and record["exit_code"] == "0"
    assert int(record["seconds"]) >= 0 and record["host"]


def test_failure_propagates_and_keeps_the_work_dir(tmp_path: Path) -> None:
    bids = _dataset(tmp_path, ["40\tsub-a\tF", "51\tsub-b\tM"], header="age\tparticipant_id\tsex")
    proc, argv = _run(tmp_path, bids, 1, rc=18)
    assert proc.returncode == 18
    assert argv[argv.index("--participant-label") + 1] == "a"  # participant_id found in any column
    assert _record(tmp_path, 1)["exit_code"] == "18"
    kept = list((tmp_path / "scratch").glob("qsmrim-work-777_1.*"))
    assert len(kept) == 1 and "work dir kept" in proc.stdout


def test_task_past_the_end_and_missing_column_are_errors(tmp_path: Path) -> None:
    bids = _dataset(tmp_path, ["sub-01\t40\tF"])
    proc, argv = _run(tmp_path, bids, 2)
    assert proc.returncode == 65 and argv == [] and "past the last row" in proc.stderr
    (bids / "participants.tsv").write_text("subject\tage\nsub-01\t40\n")
    proc, argv = _run(tmp_path, bids, 1)
    assert proc.returncode == 65 and argv == [] and "participant_id" in proc.stderr


def test_outside_an_array_job_it_refuses(tmp_path: Path) -> None:
    bids = _dataset(tmp_path, ["sub-01\t40\tF"])
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), str(bids), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "SLURM_ARRAY_TASK_ID" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 64 and "sbatch --array" in proc.stderr  # usage comes from the header


def test_container_mode_binds_data_read_only(tmp_path: Path) -> None:
    bids = _dataset(tmp_path, ["sub-01\t40\tF", "sub-02\t51\tM"])
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "apptainer")
    sif = tmp_path / "qsmrim.sif"
    sif.write_text("")
    proc, argv = _run(tmp_path, bids, 1, env_extra={"QSMRIM_SIF": str(sif),
                                                    "QSMRIM_APPTAINER": str(bin_dir / "apptainer")})
    assert proc.returncode == 0, proc.stderr
    assert argv[0] == "run" and "--cleanenv" in argv
    binds = [argv[i + 1] for i, a in enumerate(argv) if a == "-B"]
    assert f"{bids}:/data:ro" in binds and f"{tmp_path / 'out'}:/out" in binds
    assert any(b.endswith(":/work") and b.startswith(str(tmp_path / "scratch")) for b in binds)
    i = argv.index(str(sif))
    assert argv[i + 1:i + 4] == ["/data", "/out", "participant"]
    assert argv[argv.index("-w") + 1] == "/work" and argv[argv.index("--participant-label") + 1] == "01"


def test_sbatch_header_requests_the_measured_allocation() -> None:
    header = [ln for ln in SCRIPT.read_text().splitlines() if ln.startswith("#SBATCH")]
    opts = dict(ln.split(None, 1)[1].split("=", 1) for ln in header)
    assert opts["--cpus-per-task"] == "2" and opts["--mem"] == "4G"
    assert "%a" in opts["--output"] and "%A" in opts["--output"]
    assert os.access(SCRIPT, os.X_OK)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QSMRIM_TEST_SLURM") != "1",
                    reason="starts munged/slurmctld/slurmd and runs jobs (minutes, root); set QSMRIM_TEST_SLURM=1")
def test_slurm_stage_end_to_end() -> None:
    """The CI stage itself: SLURMGraph, SLURM and the array script on a one-node cluster."""
    proc = subprocess.run(["bash", str(REPO / ".ci" / "slurm.sh")], cwd=REPO, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "SKIP" not in proc.stdout and "PASS" in proc.stdout
