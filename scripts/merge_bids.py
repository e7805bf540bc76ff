#!/usr/bin/env python3
"""Merge BIDS datasets into one, optionally relabelling each source's participants.

Why: the bundled model is trained on one dataset made of several generated ones (semi-real sessions on
two grids, phantoms of three seeds whose participants are all called sub-01...). `group --train` reads one
BIDS dataset, so the sources are merged, with a label prefix per source so that phantom sub-01 and
semi-real sub-01 stay two people. Sessions of one participant may come from different sources (the
semi-real generator makes one grid per call); the same session twice is an error.

Files are hard-linked where the filesystem allows (the app never writes its input), copied otherwise.
Covered: ``sub-*/`` trees and ``sub-*_sessions.tsv``, ``derivatives/<name>/sub-*/`` trees,
``participants.tsv`` (rows relabelled, columns united), other top-level files and each derivative's
``dataset_description.json`` from the first source that has them.

    python scripts/merge_bids.py OUT SRC1 SRC2 ph/full:phf ph/small:phs
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pandas as pd

_SUB = re.compile(r"sub-([A-Za-z0-9]+)")


def _place(src: Path, dst: Path) -> None:
    """Hard link src at dst (copy across filesystems); refuse to overwrite."""
    if dst.exists():
        raise FileExistsError(f"{dst} comes from two sources ({src}); merge sources with distinct sessions")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _relabel(text: str, prefix: str) -> str:
    return _SUB.sub(lambda m: f"sub-{prefix}{m.group(1)}", text) if prefix else text


def _merge_tree(src_root: Path, dst_root: Path, prefix: str, tables: dict[Path, list[pd.DataFrame]]) -> int:
    """Place every file under src_root's sub-* folders; collect sessions tables to concatenate."""
    n = 0
    for sub in sorted(p for p in src_root.glob("sub-*") if p.is_dir()):
        for path in sorted(p for p in sub.rglob("*") if p.is_file()):
            rel = Path(_relabel(str(path.relative_to(src_root)), prefix))
            if path.name.endswith("_sessions.tsv") and path.parent == sub:
                tables.setdefault(dst_root / rel, []).append(pd.read_csv(path, sep="\t", dtype=str))
                continue
            _place(path, dst_root / rel)
            n += 1
    return n


def merge(out: Path, sources: list[tuple[Path, str]]) -> dict:
    """Merge `sources` ((dataset, label prefix) pairs) into a new dataset at `out`; return a summary."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    tables: dict[Path, list[pd.DataFrame]] = {}
    participants, summary = [], {"sources": []}
    for src, prefix in sources:
        if not (src / "dataset_description.json").is_file():
            raise FileNotFoundError(f"{src} is not a BIDS dataset (no dataset_description.json)")
        n = _merge_tree(src, out, prefix, tables)
        for top in sorted(p for p in src.iterdir() if p.is_file() and p.name != "participants.tsv"):
            if not (out / top.name).exists():
                _place(top, out / top.name)
        for deriv in sorted(p for p in (src / "derivatives").glob("*") if p.is_dir()):
            n += _merge_tree(deriv, out / "derivatives" / deriv.name, prefix, tables)
            desc = deriv / "dataset_description.json"
            if desc.is_file() and not (out / "derivatives" / deriv.name / desc.name).exists():
                _place(desc, out / "derivatives" / deriv.name / desc.name)
        if (src / "participants.tsv").is_file():
            table = pd.read_csv(src / "participants.tsv", sep="\t", dtype=str)
            table["participant_id"] = [_relabel(p, prefix) for p in table["participant_id"]]
            table["source"] = str(src)
            participants.append(table)
        summary["sources"].append({"dataset": str(src), "prefix": prefix, "files": n})
    for path, parts in tables.items():
        table = pd.concat(parts, ignore_index=True)
        if table["session_id"].duplicated().any():
            raise ValueError(f"{path.name}: a session comes from two sources")
        table.sort_values("session_id").to_csv(path, sep="\t", index=False)
    if participants:
        table = pd.concat(participants, ignore_index=True).fillna("n/a")
        table = table.groupby("participant_id", sort=True, as_index=False).first()
        table.to_csv(out / "participants.tsv", sep="\t", index=False)
        summary["participants"] = len(table)
    desc_path = out / "dataset_description.json"
    desc = json.loads(desc_path.read_text())
    desc_path.unlink()  # a link to the first source's: write our own
    desc["Name"] = "merged: " + ", ".join(f"{s}" + (f" (sub-{p}*)" if p else "") for s, p in sources)
    desc.setdefault("GeneratedBy", []).append({"Name": "scripts/merge_bids.py", "Description": desc["Name"]})
    desc_path.write_text(json.dumps(desc, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="new (empty or absent) dataset folder")
    parser.add_argument("sources", nargs="+", metavar="SRC[:PREFIX]",
                        help="a BIDS dataset; with :PREFIX its sub-<label> become sub-<PREFIX><label>")
    args = parser.parse_args(argv)
    sources = []
    for item in args.sources:
        path, _, prefix = item.partition(":")
        if prefix and not prefix.isalnum():
            parser.error(f"prefix {prefix!r} must be alphanumeric (a BIDS label)")
        sources.append((Path(path), prefix))
    print(json.dumps(merge(args.out, sources), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
