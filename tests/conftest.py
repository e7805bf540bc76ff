"""Shared fixtures: the real data beside the checkout and generated phantom datasets."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


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
