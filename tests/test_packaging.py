"""Packaging: the wheel declares its data (no setuptools warnings) and carries the model and page.

Why: `pip install .` used to print setuptools' "Package 'qsmrim_app.data' is absent from the
`packages` configuration" warning (133 lines) because the data folders were not declared; a user's
first command should be quiet, and a wheel without the bundled model would fail only at run time.
The wheel is built offline from a copy of the sources (no build/ or egg-info in the checkout).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _build_wheel(tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "version", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "qsmrim_app", src / "qsmrim_app",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(out), "--no-deps",
                           "--no-build-isolation", "--no-index", "-v"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    return proc, out


def test_wheel_builds_without_setuptools_warnings_and_holds_the_data(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    proc, out = _build_wheel(tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "absent from the `packages` configuration" not in text, text[-4000:]
    assert "Warning" not in text, [line for line in text.splitlines() if "Warning" in line][:5]
    (wheel,) = out.glob("qsmrim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # every member the bundled model.json lists (a fusion's live under components/<method>/weights/)
    members = json.loads((REPO / "qsmrim_app/data/model/model.json").read_text())["members"]
    weights = [f"qsmrim_app/data/model/{m['weights']}" for m in members]
    for needed in ("qsmrim_app/data/radiomics.yaml", "qsmrim_app/data/model/model.json",
                   "qsmrim_app/data/model/MODEL.md", *weights,
                   "qsmrim_app/review/page.html", "qsmrim_app/cli/run.py"):
        assert needed in names, needed
    assert not any("__pycache__" in name for name in names)
