#!/usr/bin/env python
"""Screenshots of a run's HTML reports in a headless browser, to look at them as a researcher would.

    python scripts/screenshot_reports.py example/derivatives/qsmrim /tmp/shots [--height 2400]

Writes `<name>.png` per report (`sub-*.html`, `group_report.html`) plus crops of the sections that
a reader checks first (registration figure, rater vs model, agreement) found by their anchors, and
`screenshots.json` listing them. Needs chromium (or google-chrome) on PATH; nothing leaves the
machine (the reports are self-contained files).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SECTIONS = ("registration", "annotations", "lesions", "participants", "agreement")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no headless browser found: install chromium (apt-get install -y chromium)")


def screenshot(browser: str, page: Path, png: Path, width: int, height: int) -> None:
    """One full-window capture of a local file (no sandbox: runs as root in containers)."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}",
               page.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not png.is_file():
        raise RuntimeError(f"{browser} failed on {page}: {proc.stderr[-2000:]}")


def section_page(page: Path, anchor: str, folder: Path) -> Path | None:
    """A copy of the report that starts at `anchor` (everything before it hidden), for a section capture."""
    text = page.read_text(encoding="utf-8")
    marker = f'<section id="{anchor}"'
    if marker not in text:
        return None
    start = text.index(marker)
    body = text.index("<body>") + len("<body>")
    out = folder / f"{page.stem}_{anchor}.html"
    out.write_text(text[:body] + text[start:], encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a qsmrim output directory (reports at its top level)")
    parser.add_argument("shots", type=Path, help="where the PNG files go")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    pages = sorted(args.output_dir.glob("sub-*.html")) + sorted(args.output_dir.glob("group_report.html"))
    if not pages:
        print(f"no reports under {args.output_dir}", file=sys.stderr)
        return 1
    browser = find_browser()
    args.shots.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for page in pages:
            shots = [args.shots / f"{page.stem}.png"]
            screenshot(browser, page, shots[0], args.width, args.height)
            for anchor in SECTIONS:
                cut = section_page(page, anchor, Path(tmp))
                if cut is not None:
                    shots.append(args.shots / f"{page.stem}_{anchor}.png")
                    screenshot(browser, cut, shots[-1], args.width, 1400)
            written[page.name] = [str(p) for p in shots]
            print(f"{page.name}: {', '.join(p.name for p in shots)}")
    (args.shots / "screenshots.json").write_text(json.dumps(written, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
