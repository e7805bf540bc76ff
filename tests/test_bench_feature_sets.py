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


def _patch(rim_ppb: float, slices: range, tissue_ppb: float = 0.0, outside_ppb: float | None = None,
           half: bool = False, shape=(32, 32, 16), radius_mm=4.0) -> np.ndarray:
    """A raw patch: a round lesion (signed distance in mm) in tissue at ``tissue_ppb``, a rim band (0-1 mm out)
    at ``rim_ppb`` on ``slices`` only (on one half of the edge with ``half``), and optionally the tissue 3-5 mm
    out at ``outside_ppb``."""
    x, y = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape[:2], SPACING[:2])), indexing="ij")
    r = np.hypot(x - x.mean(), y - y.mean())
    sd = np.repeat((r - radius_mm)[:, :, None], shape[2], axis=2)
    qsm = np.full(shape, tissue_ppb)
    rim = (sd >= 0) & (sd <= 1.0)
    if half:
        rim &= (x > x.mean())[:, :, None]
    for k in slices:
        qsm[:, :, k][rim[:, :, k]] = rim_ppb
    if outside_ppb is not None:
        qsm[(sd >= 3.0) & (sd <= 5.0)] = outside_ppb
    return np.stack([qsm, np.zeros(shape), sd, np.zeros(shape)]).astype(np.float32)


def test_outer_contrast_reads_a_rim_against_the_tissue_outside(bench) -> None:
    col = {n: i for i, n in enumerate(bench.OUTER_NAMES)}
    plain = bench.outer_contrast(_patch(0.0, range(0)), (0.0, 5.0), SPACING)
    assert plain.shape == (len(col),) and np.all(plain == 0)
    # a 30 ppb ring in tissue at 10 ppb, reference median 10 and scale 5: 4 SDs above the outside, all round
    ringed = bench.outer_contrast(_patch(30.0, range(6, 10), tissue_ppb=10.0), (10.0, 5.0), SPACING)
    for name in ("outer_slice_p75_max", "outer_slice_p75_2nd", "outer_slice_p90_2nd"):
        assert ringed[col[name]] == pytest.approx(4.0), name
    # the whole band's percentile pools every slice: a ring on 4 of 16 slices does not move it, a tube does
    assert ringed[col["outer_band_p75"]] == 0
    tube = bench.outer_contrast(_patch(30.0, range(16), tissue_ppb=10.0), (10.0, 5.0), SPACING)
    assert tube[col["outer_band_p75"]] == pytest.approx(4.0)
    for name in ("outer_arc_k1_max", "outer_arc_k1_2nd", "outer_arc_k2_2nd"):
        assert ringed[col[name]] == 1.0, name
    # the contrast is to the tissue outside, not to the reference: an outside as bright as the rim reads 0
    masked = bench.outer_contrast(_patch(30.0, range(6, 10), tissue_ppb=10.0, outside_ppb=30.0), (10.0, 5.0), SPACING)
    assert masked[col["outer_slice_p75_max"]] == pytest.approx(0.0)
    assert masked[col["outer_arc_k1_max"]] == 0.0
    # half the edge: half the sectors
    half = bench.outer_contrast(_patch(30.0, range(6, 10), tissue_ppb=10.0, half=True), (10.0, 5.0), SPACING)
    assert half[col["outer_arc_k1_max"]] == pytest.approx(0.5, abs=1 / 12)
    # a ring on one slice only: its best slice is as bright, its second is not (the consensus's 2 slices)
    one = bench.outer_contrast(_patch(20.0, range(8, 9)), (0.0, 5.0), SPACING)
    assert one[col["outer_slice_p75_max"]] == pytest.approx(4.0)
    assert one[col["outer_slice_p75_2nd"]] == 0 and one[col["outer_arc_k1_2nd"]] == 0
    # a lesion cut by the patch to one slice: no second slice at all reads 0, not the best slice again
    flat = _patch(20.0, range(16))
    flat[2, :, :, 1:] = 10.0  # every voxel of the other slices lies far outside the lesion
    cut = bench.outer_contrast(flat, (0.0, 5.0), SPACING)
    assert cut[col["outer_slice_p75_max"]] == pytest.approx(4.0) and cut[col["outer_slice_p75_2nd"]] == 0
    # the reference's scale divides: the same rim in a noisier map is fewer SDs
    assert bench.outer_contrast(_patch(20.0, range(6, 10)), (0.0, 10.0), SPACING)[0] == pytest.approx(2.0)


def test_sets_and_leave_one_group_out_scores(bench, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    n = 240
    y = (rng.random(n) < 0.25).astype(int)
    groups = np.repeat(["A", "B", "C"], n // 3)
    subjects = np.array([f"sub-{g}{i % 8}" for i, g in enumerate(groups)])
    # one informative radial column, one noise pyradiomics column, an informative candidate
    table = pd.DataFrame({"radial_rim_peak": y * 1.5 + rng.normal(size=n),
                          "original_firstorder_Mean": rng.normal(size=n),
                          "original_glrlm_RunEntropy": rng.normal(size=n),
                          "original_shape_VoxelVolume": rng.uniform(20, 600, n)})
    for k, name in enumerate(bench.OUTER_NAMES):
        table[name] = y * 3.0 + rng.normal(size=n) if k == 0 else rng.normal(size=n)
    table["row"] = np.arange(n, dtype=float)  # not a feature: lets the check below see which rows a fit used
    sets = bench.feature_sets(table.columns)
    app = sets["app (pyradiomics + radial)"]
    assert "original_glrlm_RunEntropy" not in app and "row" not in app  # the recipe's set: no voxel counts
    assert "radial_rim_peak" in app and not set(bench.OUTER_NAMES) & set(app)
    assert sets["radial + shape"] == ["radial_rim_peak", "original_shape_VoxelVolume"]

    fit = bench._fit_predict
    seen = []

    def checked(x_train, y_train, x_test):  # a left-out group's rows never reach its own fit
        seen.append((x_train.shape[0], x_test.shape[0]))
        return fit(x_train, y_train, x_test)

    monkeypatch.setattr(bench, "_fit_predict", checked)
    test = table.iloc[:60].copy()
    people = np.repeat([f"sub-{i}" for i in range(12)], 5)
    out = bench.evaluate(table, y, groups, sets, {"held": (test, y[:60], people)}, subjects, n_boot=200)
    # per set: three left-out fits on the other two groups' 160 rows, then one on all 240 for the test family
    assert seen == [(160, 80)] * 3 + [(240, 60)] + ([(160, 80)] * 3 + [(240, 60)]) * 3
    assert set(out["app + outer"]["lofo"]) == {"A", "B", "C"}
    assert out["app + outer"]["lofo_mean_pr_auc"] > out["app (pyradiomics + radial)"]["lofo_mean_pr_auc"]
    gain = out["app + outer"]["lofo_mean_minus_first_set"]["pr_auc"]
    assert gain["difference"] == pytest.approx(out["app + outer"]["lofo_mean_pr_auc"]
                                               - out["app (pyradiomics + radial)"]["lofo_mean_pr_auc"])
    assert 0 < gain["ci_low"] <= gain["difference"] <= gain["ci_high"]
    held = out["radial + shape + outer"]["test"]["held"]
    assert held["all"]["n"] == 60 and sum(b["n"] for b in held["by_volume_mm3"].values()) == 60
    assert held["all"]["roc_auc"] > 0.9
    # the candidate column carries the signal: the sets with it beat the first set on the same lesions
    assert out["app + outer"]["test"]["held"]["minus_first_set"]["roc_auc"]["difference"] > 0
    assert out["app + outer"]["test"]["held"]["minus_first_set"]["n_clusters"] == 12
    assert "minus_first_set" not in out["app (pyradiomics + radial)"]["test"]["held"]
    test.loc[test.index[0], "original_shape_VoxelVolume"] = np.nan
    with pytest.raises(ValueError, match="without a original_shape_VoxelVolume"):
        bench.evaluate(table, y, groups, sets, {"held": (test, y[:60], people)}, subjects, n_boot=10)
