"""The one-head registration tables of docs/registration.md, generated from the benchmark's JSON.

Rewrites the blocks between ``<!-- NAME table: ... -->`` and ``<!-- /NAME table -->`` in docs/registration.md:
``onehead`` (every path of every case), ``gate`` (the gate at the truth and at deliberately wrong transforms) and
``change`` (before vs after the outline offset refinement and the magnitude retry; the "before" figures are the
previous run's JSON, kept as benchmarks/results/registration_onehead_before_offset.json).

    python benchmarks/registration_tables.py [--json ...] [--before ...] [--doc docs/registration.md]
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
    "no_magnitude": "**no magnitude (app)**: outlines, then MI to stand-in",
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
            cells.append(f"{entry['gate_mm']:.2f}" if kind == "truth"
                         else f"{entry['gate_mm']:.2f} (err {entry['error_mm_mean']:.1f})")
        lines.append(f"| {row['case']} | " + " | ".join(cells) + " |")
    return lines


def change_table(report: dict, before: dict) -> list[str]:
    old = {row["case"]: row for row in before["cases"]}
    lines = ["| case | no magnitude: mean error (mm) / median Dice | magnitude: mean error / median Dice | "
             "outlines alone: mean error | gate at the truth (mm) | smallest gate of a >= 4 mm error |",
             "|---|---|---|---|---|---|"]

    def path(row: dict, key: str, fallback: str | None = None) -> dict:
        return row["paths"].get(key) or row["paths"].get(fallback or key, {})

    def pair(a: dict, b: dict) -> str:
        if "error_mm_mean" not in a or "error_mm_mean" not in b:
            return "n/a"
        return (f"{a['error_mm_mean']:.2f} / {a['lesion_dice_median']:.2f} -> "
                f"**{b['error_mm_mean']:.2f} / {b['lesion_dice_median']:.2f}**")

    for row in report["cases"]:
        was = old.get(row["case"])
        if was is None:
            continue
        truth = [next(g["gate_mm"] for g in r["gate"] if g["kind"] == "truth") for r in (was, row)]
        wrong = [min(g["gate_mm"] for g in r["gate"] if g["kind"] != "truth" and g["error_mm_mean"] >= 4.0)
                 for r in (was, row)]
        outline_before = path(was, "outlines_only")["error_mm_mean"]
        outline_after = path(row, "outlines_only")["error_mm_mean"]
        lines.append(f"| {row['case']} | {pair(path(was, 'no_magnitude'), path(row, 'no_magnitude'))} | "
                     f"{pair(path(was, 'magnitude'), path(row, 'magnitude'))} | "
                     f"{outline_before:.2f} -> **{outline_after:.2f}** | {truth[0]:.2f} -> **{truth[1]:.2f}** | "
                     f"{wrong[0]:.2f} -> **{wrong[1]:.2f}** |")
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
    parser.add_argument("--before", type=Path, default=RESULTS / "registration_onehead_before_offset.json")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "registration.md")
    args = parser.parse_args()
    report = json.loads(args.json.read_text())
    source = f"benchmarks/results/{args.json.name}"
    text = args.doc.read_text()
    text = replace_block(text, "onehead", onehead_table(report), source)
    text = replace_block(text, "gate", gate_table(report), source)
    if args.before.is_file() and "<!-- change table" in text:
        text = replace_block(text, "change", change_table(report, json.loads(args.before.read_text())),
                             f"{source} and benchmarks/results/{args.before.name}")
    args.doc.write_text(text)


if __name__ == "__main__":
    main()
