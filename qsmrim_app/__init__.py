"""qsmrim: find chronic active (rim+) multiple sclerosis lesions on QSM (QSMRim-Net)."""
from __future__ import annotations

from pathlib import Path


def _read_version() -> str:
    # A source checkout's ``version`` file wins, so ``run.py --version`` in a clone never
    # reports a stale installed version; an installed package falls back to its metadata.
    version_file = Path(__file__).resolve().parent.parent / "version"
    if version_file.is_file():
        return version_file.read_text().strip()
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qsmrim")
    except PackageNotFoundError:  # pragma: no cover - running from an unpacked copy
        return "0+unknown"


__version__ = _read_version()
