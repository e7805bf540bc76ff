"""benchmarks/bench_feature_sets.py: outer-contrast candidates from raw patches, and feature sets compared
leave-one-family-out."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import load_benchmark

SPACING = (0.75, 0.75, 1.5)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_feature_sets")


def _patch(rim_ppb: float, slices: range, shape=(32, 32, 16), radius_mm=4.0) -> np.ndarray:
    """A raw patch: a round lesion (signed distance in mm), noise-free tissue at 0 ppb, a rim band raised by
    ``rim_ppb`` on ``slices`` only."""
    x, y = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape[:2], SPACING[:2])), indexing="ij")
    r = np.hypot(x - x.mean(), y - y.mean())
    sd = np.repeat((r - radius_mm)[:, :, None], shape[2], axis=2)
    qsm = np.zeros(shape)
    rim = (sd >= 0) & (sd <= 1.0)
    for k in slices:
        qsm[:, :, k][rim[:, :, k]] = rim_ppb
    return np.stack([qsm, np.zeros(shape), sd, np.zeros(shape)]).astype(np.float32)


def test_outer_contrast_reads_a_rim_against_the_tissue_outside(bench) -> None:
    names = list(bench.OUTER_NAMES)
    plain = bench.outer_contrast(_patch(0.0, range(0)), (0.0, 5.0), SPACING)
    ringed = bench.outer_contrast(_patch(20.0, range(6, 10)), (0.0, 5.0), SPACING)
    one_slice = bench.outer_contrast(_patch(20.0, range(8, 9)), (0.0, 5.0), SPACING)
    assert plain.shape == (len(names),) and np.all(plain == 0)
    # 20 ppb over a reference scale of 5 ppb: 4 robust SDs above the tissue outside, all round the edge
    assert ringed[names.index("outer_slice_p75_max")] == pytest.approx(4.0)
    assert ringed[names.index("outer_arc_k2_2nd")] == 1.0
    # a ring on one slice only: its best slice is as bright, its second is not (the consensus's 2 slices)
    assert one_slice[names.index("outer_slice_p75_max")] == pytest.approx(4.0)
    assert one_slice[names.index("outer_slice_p75_2nd")] == 0 and one_slice[names.index("outer_arc_k1_2nd")] == 0
    # the reference's scale divides: the same rim in a noisier map is fewer SDs
    assert bench.outer_contrast(_patch(20.0, range(6, 10)), (0.0, 10.0), SPACING)[0] == pytest.approx(2.0)


def test_sets_and_leave_one_group_out_scores(bench) -> None:
    rng = np.random.default_rng(0)
    n = 240
    y = (rng.random(n) < 0.25).astype(int)
    groups = np.repeat(["A", "B", "C"], n // 3)
    # one informative radial column, one noise pyradiomics column, an informative candidate
    table = pd.DataFrame({"radial_rim_peak": y * 1.5 + rng.normal(size=n),
                          "original_firstorder_Mean": rng.normal(size=n),
                          "original_glrlm_RunEntropy": rng.normal(size=n),
                          "original_shape_VoxelVolume": rng.uniform(20, 600, n)})
    for k, name in enumerate(bench.OUTER_NAMES):
        table[name] = y * 3.0 + rng.normal(size=n) if k == 0 else rng.normal(size=n)
    sets = bench.feature_sets(table.columns)
    app = sets["app (pyradiomics + radial)"]
    assert "original_glrlm_RunEntropy" not in app  # the bundled recipe's feature set: no voxel counts
    assert "radial_rim_peak" in app and not set(bench.OUTER_NAMES) & set(app)
    assert sets["radial + shape"] == ["radial_rim_peak", "original_shape_VoxelVolume"]
    test = table.iloc[:60].copy()
    people = np.repeat([f"sub-{i}" for i in range(12)], 5)
    out = bench.evaluate(table, y, groups, sets, {"held": (test, y[:60], people)}, n_boot=200)
    assert set(out["app + outer"]["lofo"]) == {"A", "B", "C"}
    assert out["app + outer"]["lofo_mean_pr_auc"] > out["app (pyradiomics + radial)"]["lofo_mean_pr_auc"]
    held = out["radial + shape + outer"]["test"]["held"]
    assert held["all"]["n"] == 60 and sum(b["n"] for b in held["by_volume_mm3"].values()) == 60
    assert held["all"]["roc_auc"] > 0.9
    # the candidate column carries the signal here: the sets with it beat the first set on the same lesions
    gain = held["minus_first_set"]["pr_auc"]
    assert gain["ci_low"] <= gain["difference"] <= gain["ci_high"]
    assert out["app + outer"]["test"]["held"]["minus_first_set"]["roc_auc"]["difference"] > 0
    assert "minus_first_set" not in out["app (pyradiomics + radial)"]["test"]["held"]
