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


def test_radial_features_and_rim_truth_are_summarised_per_volume_bin() -> None:
    """A feature that points the wrong way in small lesions shows an AUC under 0.5 there; rim attributes are
    medians among rim+ lesions per bin, non-numeric truth entries (n/a) ignored."""
    bench = load_benchmark("bench_blind_breakdown")
    table = pd.DataFrame({"volume_mm3": [50.0, 60.0, 70.0, 80.0, 400.0, 500.0, 600.0, 700.0],
                          "label": [0, 0, 1, 1, 0, 0, 1, 1]})
    features = pd.DataFrame({"radial_rim_minus_core": [0.9, 0.8, 0.1, 0.2, 0.1, 0.2, 0.8, 0.9],
                             "not_radial": [0.0] * 8})
    out = bench.features_by_volume(table, features)
    assert list(out) == ["radial_rim_minus_core"]
    assert [r["roc_auc"] for r in out["radial_rim_minus_core"]] == [0.0, 1.0]
    rimplus = table[table["label"] == 1].assign(rule_slices_covered=["2", "n/a", "6", "8"], model=[0.1, 0.3, 0.5, 0.7])
    rows = bench.truth_by_volume(rimplus, ["rule_slices_covered", "model"])
    assert [(r["volume_mm3"], r["n"]) for r in rows] == [("0-140", 2), ("310-inf", 2)]
    assert rows[0]["rule_slices_covered"] == 2.0 and rows[1]["rule_slices_covered"] == 7.0
    assert rows[0]["model"] == 0.2 and rows[1]["model"] == 0.6
