"""Counts with intervals and site recalibration end to end, through the command line as a user calls it.

The small phantom goes through the participant level with the bundled model; the group table must carry
each scan's expected rim+ count and its 95 % interval; a rater's decisions (written as qsmrim-review writes
them) then make a site model that ``participant --model`` classifies with.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qsmrim_app import derivatives as drv
from qsmrim_app.config import BUNDLED_MODEL_DIR
from qsmrim_app.model.calibration import CalibrationMap
from qsmrim_app.model.counts import count_interval
from qsmrim_app.workflows.recalibrate import MIN_RIMMINUS, MIN_RIMPLUS

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run_app(*args, code: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == code, proc.stderr[-3000:]
    return proc


def decisions(review: Path, out: Path, n_pos: int, n_neg: int) -> None:
    """A rater's calls, as qsmrim-review stores them: the most probable lesions rim+, the least probable rim-."""
    rows = []
    for unit, path in drv.find_units(out, "rim_lesions").items():
        t = drv.read_tsv(path)
        rows.append(t.assign(unit=unit.prefix, unit_obj=[unit] * len(t)))
    lesions = pd.concat(rows, ignore_index=True).sort_values("probability", ascending=False)
    called = pd.concat([lesions.head(n_pos).assign(decision="rimpos"), lesions.tail(n_neg).assign(decision="rimneg")])
    for _, group in called.groupby("unit"):
        unit = group["unit_obj"].iloc[0]
        drv.write_tsv(drv.review_path(review, unit, "rim_decisions"), pd.DataFrame({
            "lesion_id": group["lesion_id"], "decision": group["decision"], "rater": "alice",
            "time": "2026-12-03T10:00:00Z", "probability": group["probability"]}))


def test_counts_with_intervals_and_a_site_model_through_the_command_line(phantom, tmp_path):
    out, work, review = tmp_path / "out", tmp_path / "work", tmp_path / "review"
    run_app(phantom, out, "participant", "--nprocs", "2", "-w", work)
    run_app(phantom, out, "group")
    group = drv.read_tsv(out / "group_rimcounts.tsv")
    sidecar = json.loads((out / "group_rimcounts.json").read_text())
    for column in ("n_rimplus_expected", "n_rimplus_ci_low", "n_rimplus_ci_high", "calibration"):
        assert column in group.columns and column in sidecar
    for _, row in group.iterrows():
        unit = drv.Unit(row["participant_id"][4:])
        table = drv.read_tsv(drv.output_path(out, unit, "rim_lesions"))
        expected, low, high = count_interval(table["probability"].to_numpy(float))
        assert row["n_rimplus_expected"] == pytest.approx(expected, abs=1e-3)
        assert (row["n_rimplus_ci_low"], row["n_rimplus_ci_high"]) == (low, high)
        assert low <= row["n_rimplus_expected"] <= high
        bundled_map = CalibrationMap.from_dict(json.loads((BUNDLED_MODEL_DIR / "model.json").read_text()).get("calibration"))
        np.testing.assert_allclose(table["probability"], bundled_map.apply(table["probability_raw"].to_numpy(float)),
                                   atol=1e-5)  # the bundled model's own map
        assert row["calibration"] == bundled_map.describe()
        assert "Expected rim+ count" in drv.report_path(out, unit).read_text()
    assert "expected rim+" in (out / "group_report.html").read_text()

    decisions(review, out, MIN_RIMPLUS - 2, MIN_RIMMINUS)
    proc = run_app(phantom, out, "group", "--recalibrate", "--rim-annotations", review, code=64)
    assert f"needs at least {MIN_RIMPLUS} reviewed rim+ and {MIN_RIMMINUS} reviewed rim-" in proc.stderr
    assert not (out / "models").exists()

    decisions(review, out, MIN_RIMPLUS + 1, 2 * MIN_RIMMINUS)
    run_app(phantom, out, "group", "--recalibrate", "--rim-annotations", review)
    site = sorted((out / "models").glob("*-site-*"))
    assert len(site) == 1
    record = json.loads((site[0] / "recalibration.json").read_text())
    assert record["reviewed"]["rim_positive"] == MIN_RIMPLUS + 1 and record["reviewed"]["raters"] == ["alice"]

    out2 = tmp_path / "out_site"
    run_app(phantom, out2, "participant", "--nprocs", "2", "-w", work, "--model", site[0])
    for unit, path in drv.find_units(out2, "summary").items():
        summary = drv.read_tsv(path).iloc[0]
        assert summary["model_id"] == site[0].name and "Platt" in summary["calibration"]
        table = drv.read_tsv(drv.output_path(out2, unit, "rim_lesions"))
        assert not np.allclose(table["probability"], table["probability_raw"])
        # the call is what the table's own (equally rounded) numbers say; its threshold is the summary's
        assert (table["rim_positive"] == (table["probability"] >= table["threshold"])).all()
        np.testing.assert_allclose(table["threshold"], summary["threshold"], rtol=1e-5)
