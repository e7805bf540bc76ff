"""Calibration maps, counts with intervals and site recalibration: the logic, without a pipeline run."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qsmrim_app import derivatives as drv
from qsmrim_app.config import BUNDLED_MODEL_DIR
from qsmrim_app.model.calibration import (CalibrationMap, expected_calibration_error, expected_operating_points,
                                          fit_cv_calibration, fit_map, fit_site_map, log_loss, reliability_table,
                                          sigmoid)
from qsmrim_app.model.counts import count_interval, poisson_binomial_pmf

from test_train import synthetic_lesions, tiny_config


def miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels drawn from a true probability, and an over-confident, over-predicting model's score of it."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-2.5, 1.5, n)
    y = (rng.random(n) < sigmoid(z)).astype(int)
    p_model = sigmoid(2.5 * z + 3.0)  # too sharp and shifted up: the fast recipe's rim+-enriched batches do this
    return y, p_model, rng.integers(0, 5, n)


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_every_map_is_monotone_on_random_data(method):
    grid = np.linspace(0.0, 1.0, 2001)
    for seed in range(25):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(8, 300))
        p = rng.beta(rng.uniform(0.2, 3), rng.uniform(0.2, 3), n)
        y = (rng.random(n) < rng.uniform(0, 1) * p + rng.uniform(0, 0.3)).astype(int)  # any relation, even none
        y[:2] = [0, 1]
        m = fit_map(method, y, p)
        out = m.apply(grid)
        assert np.all(np.diff(out) >= -1e-12), (method, seed)
        assert np.all((out >= 0) & (out <= 1))
        site = fit_site_map(m, y, p).apply(grid)  # a site map over it stays monotone too
        assert np.all(np.diff(site) >= -1e-12), (method, seed)


def test_maps_survive_model_json_and_identity_when_absent():
    y, p, fold = miscalibrated(400, 1)
    for method in ("identity", "temperature", "platt", "isotonic"):
        m = fit_map(method, y, p, {"source": "test"})
        again = CalibrationMap.from_dict(json.loads(json.dumps(m.to_dict())))
        np.testing.assert_allclose(again.apply(p), m.apply(p))
        assert again.fitted_on["lesions"] == 400 and again.fitted_on["source"] == "test"
    site = fit_site_map(fit_map("isotonic", y, p), y[:50], p[:50])
    again = CalibrationMap.from_dict(json.loads(json.dumps(site.to_dict())))
    np.testing.assert_allclose(again.apply(p), site.apply(p))
    legacy = CalibrationMap.from_dict(None)  # a model trained before maps existed: identity, and it says so
    assert legacy.is_identity and "no calibration map" in legacy.fitted_on["note"]
    np.testing.assert_array_equal(legacy.apply(p), p)


def test_calibration_fitted_out_of_fold_lowers_held_out_ece():
    y, p, fold = miscalibrated(1500, 2)
    y_new, p_new, _ = miscalibrated(3000, 3)
    cv = fit_cv_calibration(y, p, fold)
    assert cv.map.method in ("platt", "isotonic")  # the chosen one beats identity by cross-fitted log loss
    assert cv.selection[cv.map.method]["log_loss"] < cv.selection["identity"]["log_loss"]
    before, after = expected_calibration_error(y_new, p_new), expected_calibration_error(y_new, cv.map.apply(p_new))
    assert before > 0.1 and after < 0.5 * before and after < 0.04, (before, after)
    assert log_loss(y_new, cv.map.apply(p_new)) < log_loss(y_new, p_new)
    # a calibrated model is left alone: identity or a map that changes little
    y_ok = (np.random.default_rng(4).random(p.size) < p).astype(int)
    ok = fit_cv_calibration(y_ok, p, fold)
    assert np.abs(ok.map.apply(p) - p).mean() < 0.03


def test_equal_mass_ece_and_reliability_bins():
    p = np.linspace(0.01, 0.99, 100)
    y = (p > 0.5).astype(int)
    rows = reliability_table(y, p, 10)
    assert [r["n"] for r in rows] == [10] * 10
    assert all(r["observed_low"] <= r["observed"] <= r["observed_high"] for r in rows)
    manual = sum(0.1 * abs(y[k * 10:(k + 1) * 10].mean() - p[k * 10:(k + 1) * 10].mean()) for k in range(10))
    assert expected_calibration_error(y, p, 10) == pytest.approx(manual)


def test_poisson_binomial_equals_brute_force_enumeration():
    rng = np.random.default_rng(5)
    for n in range(1, 11):
        p = rng.uniform(0, 1, n)
        p[rng.random(n) < 0.2] = rng.choice([0.0, 1.0])
        exact = np.zeros(n + 1)
        for bits in itertools.product((0, 1), repeat=n):
            b = np.array(bits)
            exact[b.sum()] += np.prod(np.where(b == 1, p, 1 - p))
        np.testing.assert_allclose(poisson_binomial_pmf(p), exact, atol=1e-12)
        cdf = np.cumsum(exact)
        expected, low, high = count_interval(p)
        assert expected == pytest.approx(p.sum())
        assert low == int(np.argmax(cdf >= 0.025 - 1e-12)) and high == int(np.argmax(cdf >= 0.975 - 1e-12))


def test_poisson_binomial_interval_matches_monte_carlo_for_many_lesions():
    rng = np.random.default_rng(6)
    p = rng.beta(0.3, 4.0, 400)  # a large participant: mostly rim- lesions, a few likely rim+
    draws = (rng.random((20000, p.size)) < p).sum(axis=1)
    expected, low, high = count_interval(p)
    assert expected == pytest.approx(draws.mean(), abs=0.1)
    assert abs(low - np.quantile(draws, 0.025)) <= 1 and abs(high - np.quantile(draws, 0.975)) <= 1
    coverage = np.mean((draws >= low) & (draws <= high))
    assert 0.94 <= coverage <= 0.99
    assert count_interval(np.array([])) == (0.0, 0, 0)


def test_expected_operating_points_match_labelled_ones_when_calibrated():
    rng = np.random.default_rng(7)
    p = rng.beta(0.4, 3.0, 20000)
    y = (rng.random(p.size) < p).astype(int)
    from qsmrim_app.model.metrics import f1_optimal_threshold, high_sensitivity_threshold

    from qsmrim_app.model.metrics import confusion

    points = expected_operating_points(p)  # from the probabilities alone, no labels
    best = confusion(y, (p >= f1_optimal_threshold(y, p)).astype(int))["f1"]
    assert confusion(y, (p >= points["f1"]).astype(int))["f1"] == pytest.approx(best, abs=0.01)
    sens = confusion(y, (p >= points["high-sensitivity"]).astype(int))["sensitivity"]
    assert sens == pytest.approx(0.95, abs=0.01)
    assert points["high-sensitivity"] < points["f1"]


def test_training_stores_the_map_and_prediction_applies_it(tmp_path):
    from qsmrim_app.model.predict import load_ensemble
    from qsmrim_app.model.train import train

    lesions = synthetic_lesions(n_subjects=10, per_subject=14)
    model_dir = train(lesions, tiny_config(method="logreg", folds=3), tmp_path / "m", progress=False)
    meta = json.loads((model_dir / "model.json").read_text())
    cal = meta["calibration"]
    assert cal["method"] in ("identity", "temperature", "platt", "isotonic")
    assert set(cal["fitted_on"]["candidates"]) == {"identity", "temperature", "platt", "isotonic"}
    assert cal["fitted_on"]["lesions"] == len(lesions) and cal["fitted_on"]["ece_binning"] == "equal-mass"
    oof = drv.read_tsv(model_dir / "oof_predictions.tsv")
    assert {"probability", "probability_calibrated"} <= set(oof.columns)
    ens = load_ensemble(model_dir, device="cpu")
    pred = ens.predict(lesions.patches, lesions.features, lesions.feature_names)
    np.testing.assert_allclose(pred.probability, CalibrationMap.from_dict(cal).apply(pred.probability_raw), atol=1e-6)
    # operating points live on the calibrated scale: the F1 one equals the mean of the per-fold ones chosen there
    from qsmrim_app.model.metrics import f1_optimal_threshold

    p_cal = CalibrationMap.from_dict(cal).apply(oof["probability"].to_numpy(float))
    per_fold = [f1_optimal_threshold(oof["label"].to_numpy(int)[oof["fold"] == k], p_cal[oof["fold"] == k])
                for k in sorted(oof["fold"].unique())]
    assert meta["thresholds"]["f1"] == pytest.approx(np.mean(per_fold), abs=1e-5)


def test_a_model_without_a_map_predicts_its_raw_mean(tmp_path):
    """Models trained before calibration existed (no ``calibration`` in model.json) load as identity."""
    import shutil

    from qsmrim_app.model.predict import load_ensemble

    legacy = Path(shutil.copytree(BUNDLED_MODEL_DIR, tmp_path / "legacy"))
    meta = json.loads((legacy / "model.json").read_text())
    meta.pop("calibration", None)
    (legacy / "model.json").write_text(json.dumps(meta))
    ens = load_ensemble(legacy, device="cpu")
    assert ens.calibration.is_identity
    assert "identity" in ens.calibration.describe()


def test_the_bundled_models_map_is_monotone_and_stored_in_model_json():
    from qsmrim_app.model.predict import load_ensemble

    meta = json.loads((BUNDLED_MODEL_DIR / "model.json").read_text())
    ens = load_ensemble(BUNDLED_MODEL_DIR, device="cpu")
    assert meta["calibration"]["method"] != "identity"  # fitted out-of-family (--cv-group-by family)
    assert CalibrationMap.from_dict(meta["calibration"]).method == ens.calibration.method
    grid = np.linspace(0, 1, 501)
    assert np.all(np.diff(ens.calibration.apply(grid)) >= -1e-12)


# ----------------------------------------------------------------------------- site recalibration
def site_outputs(root: Path, n_units: int = 6, per_unit: int = 20, seed: int = 0) -> tuple[Path, Path, pd.DataFrame]:
    """qsmrim-like participant tables (rim lesions + summary, bundled model) of a site where the model is off:
    its raw probability is too low for the rim+ lesions. Written with the app's own derivatives functions."""
    bids, out = root / "bids", root / "out"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    drv.init_output_dir(out, bids)
    model_id = json.loads((BUNDLED_MODEL_DIR / "model.json").read_text())["model_id"]
    rng = np.random.default_rng(seed)
    truth = []
    for u in range(n_units):
        unit = drv.Unit(f"{u + 1:02d}")
        y = (rng.random(per_unit) < 0.3).astype(int)
        raw = sigmoid(rng.normal(-3.0 + 2.0 * y, 1.0))  # rim+ lesions score low: the model is off here
        table = pd.DataFrame({"lesion_id": np.arange(1, per_unit + 1), "volume_mm3": 100.0, "probability": raw,
                              "probability_raw": raw, "uncertainty": 0.05, "votes": 0.0,
                              "rim_positive": (raw >= 0.7).astype(int), "threshold": 0.7})
        drv.write_tsv(drv.output_path(out, unit, "rim_lesions"), table)
        drv.write_tsv(drv.output_path(out, unit, "summary"), pd.DataFrame([{
            "participant_id": unit.participant_id, "session": "n/a", "n_lesions": per_unit,
            "n_rimplus": int(table["rim_positive"].sum()), "model_id": model_id}]))
        truth.append(pd.DataFrame({"unit": [unit] * per_unit, "lesion_id": table["lesion_id"], "label": y}))
    return bids, out, pd.concat(truth, ignore_index=True)


def write_decisions(review: Path, reviewed: pd.DataFrame, rater: str = "alice") -> None:
    """A rater's decisions as qsmrim-review stores them (its decisions table per unit)."""
    for unit, rows in reviewed.groupby(reviewed["unit"].map(lambda u: u.prefix)):
        unit = rows["unit"].iloc[0]
        path = drv.review_path(review, unit, "rim_decisions")
        drv.write_tsv(path, pd.DataFrame({"lesion_id": rows["lesion_id"],
                                          "decision": np.where(rows["label"] == 1, "rimpos", "rimneg"),
                                          "rater": rater, "time": "2026-12-03T10:00:00Z", "probability": 0.5}))


def test_recalibration_refuses_too_few_reviews_and_writes_a_site_model(tmp_path, capsys):
    from qsmrim_app.cli.run import main
    from qsmrim_app.model.predict import load_ensemble
    from qsmrim_app.workflows.recalibrate import MIN_RIMMINUS, MIN_RIMPLUS

    bids, out, truth = site_outputs(tmp_path)
    review = tmp_path / "review"
    few = pd.concat([truth[truth["label"] == 1].head(MIN_RIMPLUS - 1), truth[truth["label"] == 0].head(30)])
    write_decisions(review, few)
    args = [str(bids), str(out), "group", "--recalibrate", "--rim-annotations", str(review), "--skip-bids-validation"]
    assert main(args) == 64
    err = capsys.readouterr().err
    assert f"needs at least {MIN_RIMPLUS} reviewed rim+ and {MIN_RIMMINUS} reviewed rim-" in err
    assert f"has {MIN_RIMPLUS - 1} rim+ and 30 rim-" in err
    assert not (out / "models").exists()
    assert main([str(bids), str(out), "group", "--recalibrate", "--skip-bids-validation"]) == 64  # no review dir

    enough = truth.sample(60, random_state=0)
    write_decisions(review, enough)
    (drv.review_path(review, drv.Unit("01"), "rim_decisions")).unlink(missing_ok=True)  # a unit nobody reviewed
    assert main(args) == 0
    err = capsys.readouterr().err
    site = sorted((out / "models").glob("*-site-*"))
    assert len(site) == 1
    meta = json.loads((site[0] / "model.json").read_text())
    record = json.loads((site[0] / "recalibration.json").read_text())
    bundled = json.loads((BUNDLED_MODEL_DIR / "model.json").read_text())
    assert meta["model_id"] == site[0].name and meta["recalibrated_from"]["model_id"] == bundled["model_id"]
    base = CalibrationMap.from_dict(bundled.get("calibration")).method  # the site map sits over the model's own
    assert meta["calibration"]["method"] == "platt" and meta["calibration"]["base"]["method"] == base
    reviewed = enough[enough["unit"] != drv.Unit("01")]
    assert record["reviewed"]["lesions"] == len(reviewed)
    assert record["reviewed"]["rim_positive"] == int(reviewed["label"].sum())
    assert record["reviewed"]["raters"] == ["alice"] and "sub-01" not in record["reviewed"]["participants"]
    # the site map moves the rim+ lesions' probability up, where they belong, and the F1 point follows
    assert meta["calibration"]["params"]["intercept"] > 0.5
    assert meta["thresholds"]["f1"] != bundled["thresholds"]["f1"]
    assert record["reviewed_mean_probability"]["after"] == pytest.approx(
        record["reviewed_mean_probability"]["observed_rim_positive_fraction"], abs=0.05)
    ens = load_ensemble(site[0], device="cpu")  # the weights came along
    assert ens.model_id == meta["model_id"] and len(ens.members) == len(bundled["members"])
    assert "participant --model" in err
    # the outputs of another model are refused with the reason
    assert main(args + ["--model", str(site[0])]) == 64
    err = capsys.readouterr().err
    assert "classified with model(s)" in err


def test_site_thresholds_sit_between_reviewed_probabilities() -> None:
    """A site's operating point is moved halfway to the next reviewed probability below its optimum, so a
    reviewed lesion exactly at the optimum keeps its call when recomputed from unrounded probabilities."""
    from qsmrim_app.model.metrics import f1_optimal_threshold
    from qsmrim_app.workflows.recalibrate import below_point

    y = np.array([1, 1, 0, 1, 0, 0])
    p = np.array([0.9, 0.7, 0.6, 0.5, 0.3, 0.1])
    t = f1_optimal_threshold(y, p)
    assert t == 0.5 and below_point(t, p) == pytest.approx(0.4)
    moved = below_point(t, p)
    assert ((p >= t) == (p >= moved)).all()  # the same reviewed lesions are called
    assert (p[p < moved] <= 0.3).all() and (p >= moved).sum() == 4
    assert 0.1 - 1e-3 < below_point(0.1, p) < 0.1  # nothing below: a small margin, the same calls
