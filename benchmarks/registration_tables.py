"""The one-head registration tables of docs/registration.md, generated from the benchmark's JSON.

Rewrites the blocks between ``<!-- NAME table: ... -->`` and ``<!-- /NAME table -->`` in docs/registration.md:
``onehead`` (every path of every case), ``gate`` (the gate at the truth and at deliberately wrong transforms) and
``change`` (before vs after the outline offset refinement, the MI agreement check and the magnitude retry, both
measured in the same run: the benchmark also scores the paths and the gate as they were).

    python benchmarks/registration_tables.py [--json ...] [--doc docs/registration.md]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PATHS = {
    "magnitude": "magnitude (app): retried from the outlines when the gate fails",
    "magnitude_no_retry": "magnitude, no retry (before)",
    "no_magnitude": "**no magnitude (app)**: outlines (offset refined), then MI to stand-in if it agrees",
    "no_magnitude_before": "no magnitude before: outline masks, then MI to stand-in",
    "standin_mi_only": "stand-in MI alone",
    "outlines_only": "brain outlines alone (masks, then offset refinement)",
    "outline_masks_only": "outline masks alone (before: no offset)",
}


def _case_label(row: dict) -> str:
    rotation = max(abs(a) for a in row["header_rotation_deg"])
    shift = sum(s * s for s in row["header_shift_mm"]) ** 0.5
    return f"{row['case']} ({row['qsm_grid']}, {row['slab_mm']:g} mm, {rotation:g} deg / {shift:.0f} mm)"


def onehead_table(report: dict) -> list[str]:
    lines = ["| case (QSM grid, slab, header offset) | path | lesion voxels | mean / p95 error (mm) | "
             "median lesion Dice | gate (mm) | CPU s |", "|---|---|---|---|---|---|---|"]
    for row in report["cases"]:
        for key, label in PATHS.items():
            entry = row["paths"].get(key)
            if entry is None:
                continue
            if "error" in entry:
                lines.append(f"| {_case_label(row)} | {label} | failed: {entry['error'][:80]} | | | | |")
                continue
            if entry.get("retry"):
                label += (f" [retried: first {entry['retry']['FirstInitialisation']} start, gate "
                          f"{entry['retry']['FirstGateValueMM']:.2f} mm; kept {entry['retry']['RetryKept']}]")
            lines.append(f"| {_case_label(row)} | {label} | {entry['lesion_voxels']:,} | "
                         f"{entry['error_mm_mean']:.3f} / {entry['error_mm_p95']:.3f} | "
                         f"{entry['lesion_dice_median']:.3f} | {entry['gate_mm']:.2f} | {entry['cpu_seconds']:.0f} |")
    return lines


def gate_table(report: dict) -> list[str]:
    kinds = [("truth", 0.0), ("shift", 2.0), ("shift", 4.0), ("shift", 8.0), ("rotate", 5.0), ("rotate", 10.0)]
    lines = ["| case | truth | shift 2 mm | shift 4 mm | shift 8 mm | rotate 5 deg | rotate 10 deg |",
             "|---|---|---|---|---|---|---|"]
    for row in report["cases"]:
        cells = []
        for kind, size in kinds:
            entry = next(g for g in row["gate"] if g["kind"] == kind and g["size"] == size)
            was = f"was {entry['gate_before_mm']:.2f}" if "gate_before_mm" in entry else ""
            err = "" if kind == "truth" else f"err {entry['error_mm_mean']:.1f}"
            notes = "; ".join(x for x in (err, was) if x)
            cells.append(f"**{entry['gate_mm']:.2f}**" + (f" ({notes})" if notes else ""))
        lines.append(f"| {row['case']} | " + " | ".join(cells) + " |")
    return lines


def change_table(report: dict) -> list[str]:
    """Before (outline masks without the offset, no retry) vs after, both measured in the same run."""
    lines = ["| case | no magnitude: mean error (mm) / median Dice | magnitude: mean error / median Dice | "
             "outlines alone: mean error | gate at the truth (mm) | "
             "smallest gate of a >= 4 mm error (mm; mean lesion error >= 3.95 mm) |",
             "|---|---|---|---|---|---|"]

    def pair(a: dict, b: dict) -> str:
        if "error_mm_mean" not in a or "error_mm_mean" not in b:
            return "n/a"
        return (f"{a['error_mm_mean']:.2f} / {a['lesion_dice_median']:.2f} -> "
                f"**{b['error_mm_mean']:.2f} / {b['lesion_dice_median']:.2f}**")

    for row in report["cases"]:
        paths = row["paths"]
        truth = next(g for g in row["gate"] if g["kind"] == "truth")
        wrong = [g for g in row["gate"] if g["kind"] != "truth" and g["error_mm_mean"] >= 3.95]
        lines.append(f"| {row['case']} | {pair(paths.get('no_magnitude_before', {}), paths.get('no_magnitude', {}))} | "
                     f"{pair(paths.get('magnitude_no_retry', {}), paths.get('magnitude', {}))} | "
                     f"{paths['outline_masks_only']['error_mm_mean']:.2f} -> "
                     f"**{paths['outlines_only']['error_mm_mean']:.2f}** | "
                     f"{truth['gate_before_mm']:.2f} -> **{truth['gate_mm']:.2f}** | "
                     f"{min(g['gate_before_mm'] for g in wrong):.2f} -> **{min(g['gate_mm'] for g in wrong):.2f}** |")
    return lines


def replace_block(text: str, name: str, lines: list[str], source: str) -> str:
    start = f"<!-- {name} table: generated from {source} -->"
    pattern = re.compile(rf"<!-- {name} table:[^\n]*-->\n.*?<!-- /{name} table -->", re.S)
    block = "\n".join([start, *lines, f"<!-- /{name} table -->"])
    if not pattern.search(text):
        raise SystemExit(f"no '{name} table' block in the document")
    return pattern.sub(lambda _: block, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=RESULTS / "registration_onehead.json")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "registration.md")
    args = parser.parse_args()
    report = json.loads(args.json.read_text())
    source = f"benchmarks/results/{args.json.name}"
    text = args.doc.read_text()
    text = replace_block(text, "onehead", onehead_table(report), source)
    text = replace_block(text, "gate", gate_table(report), source)
    text = replace_block(text, "change", change_table(report), source)
    args.doc.write_text(text)


if __name__ == "__main__":
    main()
