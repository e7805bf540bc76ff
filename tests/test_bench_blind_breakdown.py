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
