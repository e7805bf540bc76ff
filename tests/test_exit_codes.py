"""Every exit code of the README's table through the command line (main(), and run.py as a container runs
it), as a user or a scheduler script meets it, and
the unit records behind them: each selected participant/session ends with a ``logs/`` record (done,
failed or skipped, with the reason and the file), the terminal ends with a summary of the units, and the
group level quotes the records.

Why: a dataset without QSM used to exit 18 ("the filters selected no data") with a hint about the
filters, and a unit refused for a truncated FLAIR left no log although the group level said "see its log".
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, tree_digest
from qsmrim_app import derivatives as drv
from qsmrim_app.cli.exitcodes import EXIT_CODES
from qsmrim_app.cli.run import main
from test_bids import make_dataset

FAST = ["--n4-iterations", "20", "10", "--nprocs", "1"]


def qsmrim(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "run.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def cli(capsys: pytest.CaptureFixture, *args) -> tuple[int, str]:
    """main() in this process (no interpreter start-up per call): exit code and what went to stderr."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def truncate(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def records(output_dir: Path) -> dict[str, dict]:
    return drv.latest_unit_logs(output_dir)


def summary_lines(stderr: str) -> list[str]:
    """The closing summary: from its 'summary:' line to the end."""
    lines = stderr.splitlines()
    start = max(i for i, line in enumerate(lines) if " summary: " in line)
    return lines[start:]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds")


# -- fast: refused before any workflow runs ------------------------------------------------------------
def test_64_usage_error(tmp_path: Path, dataset: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = cli(capsys, dataset, tmp_path / "out", "participant", "--threshold", "2")
    assert code == 64 and "must be a probability" in err
    assert not (tmp_path / "out").exists()


def test_16_bids_validation_failed(tmp_path: Path, dataset: Path, capsys: pytest.CaptureFixture) -> None:
    (dataset / "dataset_description.json").unlink()
    code, err = cli(capsys, dataset, tmp_path / "out", "participant")
    assert code == 16 and "dataset_description.json: missing" in err


def test_18_only_when_the_selection_matches_nothing(tmp_path: Path, dataset: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    code, err = cli(capsys, dataset, tmp_path / "out", "participant", "--session-label", "9")
    assert code == 18 and "match no session" in err
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"qsm": {"acquisition": "none"}}))
    code, err = cli(capsys, dataset, tmp_path / "out", "participant", "--bids-filter-file", filters)
    assert code == 18 and "--bids-filter-file" in err.splitlines()[-1]


def test_66_a_dataset_without_qsm_records_every_unit_as_skipped(tmp_path: Path, dataset: Path) -> None:
    """Through run.py, as the container runs it (the case of the report: it exited 18 with a filter hint)."""
    for qsm in dataset.rglob("*_Chimap.*"):
        qsm.unlink()
    before = tree_digest(dataset)
    out = tmp_path / "out"
    proc = qsmrim(dataset, out, "participant")
    assert proc.returncode == 66, proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert "no selected participant/session has the inputs" in last and "--bids-filter-file" not in last
    logs = records(out)
    assert sorted(logs) == ["sub-01", "sub-02", "sub-03"]
    for record in logs.values():
        assert record["status"] == "skipped" and "no QSM" in record["reason"] and record["file"] is None
        assert record["command_line"][:3] == [str(dataset), str(out), "participant"]
    summary = summary_lines(proc.stderr)
    assert "summary: 0 done, 0 failed, 3 skipped for missing inputs (of 3" in summary[0]
    assert sum("skipped sub-0" in line and "no QSM" in line and "(log: " in line for line in summary) == 3
    assert tree_digest(dataset) == before


def test_1_a_truncated_flair_is_a_failed_unit_with_its_record(tmp_path: Path, dataset: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    flair = truncate(next((dataset / "sub-02" / "anat").glob("*_FLAIR.nii.gz")))
    out = tmp_path / "out"
    code, err = cli(capsys, dataset, out, "participant", "--participant-label", "02")
    assert code == 1, err
    record = records(out)["sub-02"]
    assert record["status"] == "failed" and record["file"] == str(flair)
    assert "unreadable gzip" in record["reason"] and record["error"] == record["reason"]
    summary = summary_lines(err)
    assert "0 done, 1 failed, 0 skipped" in summary[0]
    assert any(f"failed sub-02: {flair}: unreadable gzip" in line for line in summary)


def test_every_code_is_in_the_help_and_the_readme(capsys: pytest.CaptureFixture) -> None:
    """The help's epilog and the README's table say what the one table of codes (cli/exitcodes.py) says."""
    assert main(["--help"]) == 0
    epilog = " ".join(capsys.readouterr().out.split("exit codes:", 1)[1].split())
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", (REPO_ROOT / "README.md").read_text(), re.M))
    assert {0, 1, 16, 18, 64, 66} <= set(EXIT_CODES)
    for code, meaning in EXIT_CODES.items():
        assert f"{code} {meaning}" in epilog, code
        assert rows.get(str(code), "").replace("`", "") == meaning, code


# -- slow: the pipeline runs one good unit beside a failed and a skipped one -----------------------------
@pytest.mark.slow
def test_0_and_1_and_66_with_a_unit_run_and_the_group_quoting_the_records(tmp_path: Path, phantom_copy: Path) -> None:
    bids, out, work = phantom_copy, tmp_path / "out", tmp_path / "work"
    flair = truncate(bids / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz")
    for qsm in (bids / "sub-03" / "anat").glob("sub-03_Chimap.*"):
        qsm.unlink()

    proc = qsmrim(bids, out, "participant", "-w", work, *FAST)
    assert proc.returncode == 1, proc.stderr[-4000:]  # a failed unit outranks a skipped one
    summary = summary_lines(proc.stderr)
    assert "summary: 1 done, 1 failed, 1 skipped for missing inputs (of 3" in summary[0]
    assert "[Node]" not in "\n".join(summary), "the summary comes after nipype's node lines"
    assert any(line.endswith("done: sub-01") for line in summary)
    assert any(f"failed sub-02: {flair}: unreadable gzip" in line for line in summary)
    assert any("skipped sub-03: no QSM" in line for line in summary)
    logs = records(out)
    assert {label: r["status"] for label, r in logs.items()} == {"sub-01": "done", "sub-02": "failed",
                                                                "sub-03": "skipped"}
    for label, record in logs.items():
        assert Path(record["log_file"]).parent == out / "logs" and Path(record["log_file"]).name.startswith(label)

    group = qsmrim(bids, out, "group")
    report = (out / "group_report.html").read_text()
    for label in ("sub-02", "sub-03"):
        quoted = f"participant level {logs[label]['status']}: {label}: "
        assert quoted in group.stderr and Path(logs[label]["log_file"]).name in report
    assert "unreadable gzip" in report and "no QSM" in report

    proc = qsmrim(bids, out, "participant", "--participant-label", "01", "03", "-w", work, *FAST)
    assert proc.returncode == 66, proc.stderr[-4000:]  # sub-01 completes (from the cache), sub-03 lacks its QSM
    assert "summary: 1 done, 0 failed, 1 skipped" in summary_lines(proc.stderr)[0]

    proc = qsmrim(bids, out, "participant", "--participant-label", "01", "-w", work, *FAST)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "summary: 1 done, 0 failed, 0 skipped" in summary_lines(proc.stderr)[0]
    assert records(out)["sub-01"]["status"] == "done"
