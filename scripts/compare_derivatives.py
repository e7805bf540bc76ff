#!/usr/bin/env python3
"""Compare two qsmrim output trees: same files, same tables, same image arrays.

Why: the container and SLURM CI stages must show that a run inside the container (or through a batch
scheduler) gives the same results as the same run in the plain venv. Byte equality is too strict (JSON
sidecars carry timestamps, paths and the container name; HTML reports embed them), so each file type is
compared by its content: TSV by column names and values (numbers with a tolerance), NIfTI by header
geometry and voxel array, NPZ by array names and values, JSON by keys and values except run-specific ones.

Usage: compare_derivatives.py A B [--rtol R] [--atol A] [--ignore GLOB ...]; exit 0 when equal, 1 otherwise.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import nibabel as nib
import numpy as np
import pandas as pd

# Files that legitimately differ between two runs of the same inputs (logs, reports, crash files).
DEFAULT_IGNORE: tuple[str, ...] = ("logs/*", "*/logs/*", "*.html", "*.log", "*.pklz", "crash-*", "*.svg", "*.png")
# JSON keys whose values describe the run rather than the result (where the inputs were mounted, when, by
# which image).
RUN_SPECIFIC_KEYS: frozenset[str] = frozenset(
    {"Container", "DatasetLinks", "URL", "CodeURL", "DatasetDOI", "Date", "date", "CommandLine", "command_line", "Environment",
     "WorkDir", "work_dir", "Host", "host", "Hostname", "Runtime", "runtime_s", "ElapsedSeconds",
     "elapsed_s", "Timestamp", "timestamp", "StartTime", "EndTime", "PID"}
)


def list_files(root: Path, ignore: Iterable[str]) -> set[str]:
    """Relative POSIX paths of regular files under ``root`` not matching any ignore glob."""
    patterns = tuple(ignore)
    out: set[str] = set()
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        if any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(path.name, pat) for pat in patterns):
            continue
        out.add(rel)
    return out


def _close(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> tuple[bool, float]:
    if a.shape != b.shape:
        return False, math.inf
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        same_nan = np.array_equal(np.isnan(a64), np.isnan(b64))
        finite = ~np.isnan(a64)
        diff = float(np.max(np.abs(a64[finite] - b64[finite]), initial=0.0))
        return same_nan and bool(np.allclose(a64[finite], b64[finite], rtol=rtol, atol=atol)), diff
    equal = bool(np.array_equal(a, b))
    return equal, 0.0 if equal else math.inf


def compare_tsv(a: Path, b: Path, rtol: float, atol: float) -> list[str]:
    """Column names, row count and values; numeric columns within tolerance, others exactly."""
    ta = pd.read_csv(a, sep="\t", na_values=["n/a"], keep_default_na=False)
    tb = pd.read_csv(b, sep="\t", na_values=["n/a"], keep_default_na=False)
    if list(ta.columns) != list(tb.columns):
        return [f"columns differ: {sorted(set(ta.columns) ^ set(tb.columns))[:10]}"]
    if len(ta) != len(tb):
        return [f"row count {len(ta)} != {len(tb)}"]
    problems: list[str] = []
    for col in ta.columns:
        ca, cb = ta[col], tb[col]
        if pd.api.types.is_numeric_dtype(ca) and pd.api.types.is_numeric_dtype(cb):
            ok, diff = _close(ca.to_numpy(dtype=float), cb.to_numpy(dtype=float), rtol, atol)
            if not ok:
                problems.append(f"column {col!r}: max |diff| {diff:.3g}")
        elif not ca.astype(str).equals(cb.astype(str)):
            problems.append(f"column {col!r}: values differ")
    return problems


def compare_nifti(a: Path, b: Path, rtol: float, atol: float) -> list[str]:
    """Shape, affine and voxel values (the header's description/timestamps do not matter)."""
    ia, ib = nib.load(str(a)), nib.load(str(b))
    problems: list[str] = []
    if ia.shape != ib.shape:
        return [f"shape {ia.shape} != {ib.shape}"]
    if not np.allclose(ia.affine, ib.affine, rtol=1e-6, atol=1e-6):
        problems.append("affine differs")
    if ia.get_data_dtype() != ib.get_data_dtype():
        problems.append(f"dtype {ia.get_data_dtype()} != {ib.get_data_dtype()}")
    ok, diff = _close(np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj), rtol, atol)
    if not ok:
        problems.append(f"voxels differ: max |diff| {diff:.3g}")
    return problems


def compare_npz(a: Path, b: Path, rtol: float, atol: float) -> list[str]:
    with np.load(a, allow_pickle=False) as za, np.load(b, allow_pickle=False) as zb:
        if sorted(za.files) != sorted(zb.files):
            return [f"arrays {sorted(za.files)} != {sorted(zb.files)}"]
        problems = []
        for name in za.files:
            ok, diff = _close(za[name], zb[name], rtol, atol)
            if not ok:
                problems.append(f"array {name!r}: max |diff| {diff:.3g}")
        return problems


def _json_diff(a: Any, b: Any, where: str, rtol: float, atol: float) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - RUN_SPECIFIC_KEYS
        out: list[str] = []
        for key in sorted(keys):
            if key not in a or key not in b:
                out.append(f"{where}.{key}: only in one file")
            else:
                out.extend(_json_diff(a[key], b[key], f"{where}.{key}", rtol, atol))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _json_diff(x, y, f"{where}[{i}]", rtol, atol)]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        if math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b)):
            return []
        return [f"{where}: {a} != {b}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare_json(a: Path, b: Path, rtol: float, atol: float) -> list[str]:
    return _json_diff(json.loads(a.read_text()), json.loads(b.read_text()), "$", rtol, atol)


def compare_file(a: Path, b: Path, rtol: float, atol: float) -> list[str]:
    """Dispatch by file type; unknown types must be byte-identical."""
    name = a.name
    if name.endswith((".tsv", ".csv")):
        return compare_tsv(a, b, rtol, atol)
    if name.endswith((".nii", ".nii.gz")):
        return compare_nifti(a, b, rtol, atol)
    if name.endswith(".npz"):
        return compare_npz(a, b, rtol, atol)
    if name.endswith(".json"):
        return compare_json(a, b, rtol, atol)
    return [] if a.read_bytes() == b.read_bytes() else ["bytes differ"]


def compare_trees(a: Path, b: Path, rtol: float = 1e-5, atol: float = 1e-6,
                  ignore: Iterable[str] = DEFAULT_IGNORE) -> tuple[list[str], int]:
    """All problems found (empty when the trees match) and the number of files compared."""
    ignore = tuple(ignore)
    fa, fb = list_files(a, ignore), list_files(b, ignore)
    problems = [f"only in {a}: {rel}" for rel in sorted(fa - fb)]
    problems += [f"only in {b}: {rel}" for rel in sorted(fb - fa)]
    common = sorted(fa & fb)
    for rel in common:
        try:
            problems += [f"{rel}: {p}" for p in compare_file(a / rel, b / rel, rtol, atol)]
        except Exception as exc:  # an unreadable file is a difference, not a crash of the comparison
            problems.append(f"{rel}: cannot compare ({type(exc).__name__}: {exc})")
    return problems, len(common)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument("--ignore", nargs="*", default=list(DEFAULT_IGNORE), help="glob patterns to skip")
    parser.add_argument("--min-files", type=int, default=1, help="fail when fewer files were compared")
    args = parser.parse_args(argv)
    for root in (args.a, args.b):
        if not root.is_dir():
            print(f"not a directory: {root}", file=sys.stderr)
            return 1
    problems, n = compare_trees(args.a, args.b, args.rtol, args.atol, args.ignore)
    for problem in problems:
        print(f"DIFF {problem}")
    if n < args.min_files:
        print(f"DIFF only {n} files compared (expected at least {args.min_files})")
        return 1
    print(f"compared {n} files: {'identical within tolerance' if not problems else f'{len(problems)} differences'}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
