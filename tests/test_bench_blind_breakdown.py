"""benchmarks/bench_blind_breakdown.py: rim+ share and probability by lesion-volume bin."""
from __future__ import annotations

import pandas as pd
from conftest import load_benchmark


def test_volume_bins_split_at_the_stated_edges_and_average_within_them() -> None:
    bench = load_benchmark("bench_blind_breakdown")
    table = pd.DataFrame({"volume_mm3": [50.0, 139.9, 140.1, 300.0, 5000.0], "y": [0, 1, 1, 1, 0]})
    rows = bench.by_volume(table, "y")
    assert [r["volume_mm3"] for r in rows] == ["0-140", "140-310", "310-inf"]
    assert [r["n"] for r in rows] == [2, 2, 1] and [r["mean"] for r in rows] == [0.5, 1.0, 0.0]


def test_ranking_within_volume_bins_ignores_the_size_prior() -> None:
    """A score that is pure size ranks perfectly across bins but at chance within them; a score that sees the
    rim ranks within each bin; a bin with one class gives None."""
    bench = load_benchmark("bench_blind_breakdown")
    table = pd.DataFrame({"volume_mm3": [50.0, 60.0, 70.0, 80.0, 200.0, 210.0, 400.0, 500.0],
                          "label": [0, 1, 0, 1, 0, 1, 1, 1]})
    table["rim"] = table["label"] * 0.5 + table["volume_mm3"] / 1000
    table["size"] = [0.1, 0.1, 0.1, 0.1, 0.5, 0.5, 0.9, 0.9]
    rim, size = bench.ranking_by_volume(table, "rim"), bench.ranking_by_volume(table, "size")
    assert [r["n"] for r in rim] == [4, 2, 2] and [r["rim_positive"] for r in rim] == [2, 1, 2]
    assert rim[0]["roc_auc"] == 1.0 and rim[1]["roc_auc"] == 1.0 and rim[2]["roc_auc"] is None
    assert size[0]["roc_auc"] == 0.5 and size[1]["roc_auc"] == 0.5
