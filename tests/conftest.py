"""Shared fixtures: the real data beside the checkout and generated phantom datasets."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist each worker gets its share of the cores for torch/OpenMP/BLAS threads.

    By default every worker's torch (OpenMP) and BLAS use all cores; with `-n 2` on 2 cores the other
    worker is busy too, and OpenMP threads that spin waiting for a descheduled sibling made the in-process
    training tests ~6x slower (test_trains_on_real_lesion_shapes_and_qsm_texture: 287 s with 2 threads
    against 49 s with 1 while the other core was busy). Set before torch and numpy are imported (the test
    modules import them after this file); an explicit setting in the environment wins. The app's own
    subprocesses get OMP_NUM_THREADS=1 from the tests anyway.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers < 1:
        return
    threads = str(max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
                      // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, threads)


_share_the_cores_between_workers()


def load_benchmark(name: str):
    """A ``benchmarks/<name>.py`` script imported as a module (benchmarks are scripts, not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _shared_data_dir() -> Path:
    return Path(os.environ.get("QSMRIM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data (`../shared/data`); tests using it skip when it is absent."""
    path = _shared_data_dir()
    if not (path / "README.md").is_file():
        pytest.skip(f"real shared data not found at {path} (set QSMRIM_SHARED_DATA to its folder)")
    return path


_PHANTOM: dict[str, Path] = {}


def phantom_dataset(factory: pytest.TempPathFactory) -> Path:
    """The small 3-subject phantom (qsmrim-synth), generated once per test process; read only."""
    from qsmrim_app.synthetic import generate_dataset

    if "bids" not in _PHANTOM:
        _PHANTOM["bids"] = Path(factory.mktemp("phantom")) / "bids"
        generate_dataset(_PHANTOM["bids"], 3, seed=0, size="small")
    return _PHANTOM["bids"]


@pytest.fixture
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared phantom; tests must not modify it (use ``phantom_copy``)."""
    return phantom_dataset(tmp_path_factory)


@pytest.fixture
def phantom_copy(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the phantom that a test may break."""
    return Path(shutil.copytree(phantom_dataset(tmp_path_factory), tmp_path / "ds"))


def tree_digest(root: Path) -> str:
    """Hash of every path, size and content below root: proves a run wrote nothing there."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()
