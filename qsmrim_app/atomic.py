"""One atomic write: a temporary file beside the target, then ``os.replace``.

A killed job never leaves a half-written file, and several jobs of an HPC array can share one output
folder. Temporary names carry ``host~pid`` so a later run can remove what a killed writer left
(:func:`remove_stale_temporaries`). Plain module (no nipype, no BIDS): the model code writes with it too.
"""
from __future__ import annotations

import os
import platform
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HOST = re.sub(r"[^A-Za-z0-9-]", "-", platform.node() or "host")
_TEMP_RE = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)~(?P<pid>\d+)\..*tmp")


def writer_tag() -> str:
    """``host~pid`` of the writing process (at call time: forked workers have their own pid)."""
    return f"{HOST}~{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(root: Path) -> int:
    """Delete temporary files of writers on this host that no longer run (killed jobs); return how many.

    Temporaries of live writers, or of writers on other hosts sharing the folder, are left alone.
    """
    removed = 0
    for path in Path(root).rglob(".*tmp*"):
        match = _TEMP_RE.match(path.name)
        if not match or not path.is_file() or match["host"] != HOST or _pid_alive(int(match["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def fsync_file(path: Path) -> None:
    """Flush a written file and its folder entry to disk (a decision is acknowledged only after this)."""
    for target in (Path(path), Path(path).parent):
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_path(path: Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` only if the block succeeds.

    The real extension stays at the end of the temporary name, so writers that look at it (nibabel,
    numpy, SimpleITK) behave. ``fsync``: flush the file and its folder entry before returning (the
    review store acknowledges a decision only after this).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=".tmp" + "".join(path.suffixes[-2:]),
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
        if fsync:
            fsync_file(path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: Path, data: bytes, fsync: bool = False) -> Path:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path, text: str, fsync: bool = False) -> Path:
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text)
    return Path(path)
