"""benchmarks/bench_lofo_models.py: leave-one-family-out read from models trained with --cv-group-by."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_lofo_models")


def _model(tmp: Path, name: str, families: dict[str, str], signal: float, seed: int) -> Path:
    """An out-of-fold table as group --train writes it: one fold per family, 3 participants per family."""
    rng = np.random.default_rng(seed)
    rows = []
    fold_of = {f: k for k, f in enumerate(sorted(set(families.values())))}
    for subject, family in families.items():
        for lesion in range(1, 31):
            y = int(rng.random() < 0.2)
            logit = signal * (2 * y - 1) + rng.normal(0, 1) + (1.0 if family == "B" else 0.0)  # B's scale is off
            rows.append({"subject": subject, "session": "n/a", "lesion_id": lesion, "label": y,
                         "fold": fold_of[family], "probability": 1 / (1 + np.exp(-logit))})
    out = tmp / name
    out.mkdir()
    pd.DataFrame(rows).to_csv(out / "oof_predictions.tsv", sep="\t", index=False)
    return out


def test_lofo_scores_each_family_with_maps_and_thresholds_from_the_others(bench, tmp_path: Path) -> None:
    families = {f"sub-{f}{i}": f for f in "ABC" for i in range(3)}
    participants = tmp_path / "participants.tsv"
    pd.DataFrame({"participant_id": list(families), "family": list(families.values())}).to_csv(
        participants, sep="\t", index=False)
    strong, weak = _model(tmp_path, "strong", families, 2.0, 0), _model(tmp_path, "weak", families, 0.2, 0)
    out = tmp_path / "lofo.json"
    assert bench.main(["--participants", str(participants), "--model", f"strong={strong}", "--model",
                       f"weak={weak}", "--n-boot", "200", "--out", str(out), "--predictions",
                       str(tmp_path / "p.tsv")]) == 0
    summary = json.loads(out.read_text())
    assert set(summary["lofo"]) == {"A", "B", "C"}
    # B's scores sit 1 logit high: EM reads that as more rim+ than the other families had
    assert set(summary["prior_shift"]) == {"A", "B", "C"}
    assert summary["prior_shift"]["B"]["prior_estimated"] > summary["prior_shift"]["B"]["prior_train"]
    for fam, entry in summary["lofo"].items():
        s, w = entry["methods"]["strong"], entry["methods"]["weak"]
        assert s["roc_auc_pooled"] > w["roc_auc_pooled"] and 0 < s["threshold_f1"] < 1
        assert s["n_lesions"] == 90 and 0 <= s["ece"] <= 1
    pooled = summary["pooled"]["paired_vs_strong"]["weak"]["pr_auc"]
    assert pooled["difference"] > 0 and pooled["ci_low"] > 0
    # a left-out family's probabilities are calibrated by a map that never saw it: its own labels cannot
    # move them (same raw scores, flipped labels of family A -> A's calibrated values unchanged)
    table = bench.read_oof(strong, families)
    p_a, thr_a, _ = bench.out_of_family(table, "A")
    flipped = table.copy()
    flipped.loc[flipped["family"] == "A", "label"] = 1 - flipped.loc[flipped["family"] == "A", "label"]
    p_b, thr_b, _ = bench.out_of_family(flipped, "A")
    np.testing.assert_allclose(p_a, p_b) and np.testing.assert_allclose(thr_a, thr_b)
    preds = pd.read_csv(tmp_path / "p.tsv", sep="\t")
    assert len(preds) == 2 * 270 and set(preds["family"]) == {"A", "B", "C"}
    within = summary["per_family_mean"]
    assert within["families"] == ["A", "B", "C"]
    diff = within["paired_vs_strong"]["weak"]["pr_auc"]
    assert diff["difference"] > 0 and diff["ci_low"] > 0


def test_per_family_mean_ignores_scales_that_differ_between_families(bench, tmp_path: Path) -> None:
    """Ranking within each family: a method that only moves one family's scale scores the same there,
    while the pooled ranking (one scale for all families) can tell them apart."""
    families = {f"sub-{f}{i}": f for f in "ABC" for i in range(3)}
    table = bench.read_oof(_model(tmp_path, "m", families, 1.5, 1), families)
    shifted = table.copy()
    in_b = shifted["family"] == "B"
    shifted.loc[in_b, "probability"] = shifted.loc[in_b, "probability"] ** 4  # monotone within B only
    within = bench.per_family_mean({"m": table, "shifted": shifted}, n_boot=100)
    d = within["paired_vs_m"]["shifted"]
    for k in ("pr_auc", "roc_auc"):
        assert d[k]["difference"] == pytest.approx(0.0, abs=1e-12)
        assert d[k]["ci_low"] == pytest.approx(0.0, abs=1e-12) and d[k]["ci_high"] == pytest.approx(0.0, abs=1e-12)
    assert within["methods"]["m"]["pr_auc_mean"] == pytest.approx(within["methods"]["shifted"]["pr_auc_mean"])


def test_in_family_reference_and_recalibration_from_a_rater(bench, tmp_path: Path) -> None:
    """The in-family model's scores per family; a left-out family recalibrated from n reviewed lesions."""
    families = {f"sub-{f}{i}": f for f in "ABC" for i in range(4)}
    participants = tmp_path / "participants.tsv"
    pd.DataFrame({"participant_id": list(families), "family": list(families.values())}).to_csv(
        participants, sep="\t", index=False)
    lofo_dir = _model(tmp_path, "lofo", families, 2.0, 3)
    inside = _model(tmp_path, "inside", families, 2.5, 4)
    (inside / "model.json").write_text(json.dumps({"calibration": None, "thresholds": {"f1": 0.5}}))
    out = tmp_path / "lofo.json"
    assert bench.main(["--participants", str(participants), "--model", f"m={lofo_dir}", "--in-family",
                       f"m={inside}", "--recalibrate", "B", "--sizes", "5,40,120", "--draws", "30", "--n-boot",
                       "50", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert set(summary["in_family"]["m"]) == {"A", "B", "C"}
    rec = summary["recalibration"]["B"]
    by_size = {r["reviewed"]: r for r in rec["random"]["by_size"]}
    assert by_size[5]["fitted"] == 0 and by_size[5]["within"] == 0  # under the app's minimum: refused
    assert by_size[120]["fitted"] > 0 and 0 <= by_size[120]["within"] <= 1
    assert by_size[120]["within"] >= by_size[40]["within"] - 0.2


def test_folds_that_mix_families_are_refused(bench, tmp_path: Path) -> None:
    families = {f"sub-{f}{i}": f for f in "AB" for i in range(2)}
    model = _model(tmp_path, "m", families, 1.0, 1)
    table = pd.read_csv(model / "oof_predictions.tsv", sep="\t")
    table["fold"] = np.arange(len(table)) % 2
    table.to_csv(model / "oof_predictions.tsv", sep="\t", index=False)
    with pytest.raises(SystemExit, match="folds mix families"):
        bench.read_oof(model, families)


def test_prior_adaptation_recovers_a_pure_label_shift_and_leaves_an_unshifted_cohort(bench) -> None:
    """Saerens' EM: lesions drawn from the same class-conditional scores at another rim+ share. Calibrated
    where rim+ are 10 %, a cohort at 30 % is found at ~30 % and its probabilities' ECE falls; a cohort at
    10 % stays where it is."""
    from qsmrim_app.model.calibration import expected_calibration_error

    rng = np.random.default_rng(3)
    shift = 2.0  # class-conditional scores: N(+-1, 1) on the logit scale -> exact posterior at a prior
    def cohort(share: float, n: int = 4000):
        y = (rng.random(n) < share).astype(int)
        x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
        p_train = 1 / (1 + np.exp(-(shift * x + np.log(0.1 / 0.9))))  # the posterior where rim+ are 10 %
        return y, p_train
    y, p = cohort(0.3)
    q, prior = bench.adapt_to_prior(p, 0.1)
    assert prior == pytest.approx(0.3, abs=0.03)
    assert expected_calibration_error(y, q) < 0.5 * expected_calibration_error(y, p)
    y, p = cohort(0.1)
    q, prior = bench.adapt_to_prior(p, 0.1)
    assert prior == pytest.approx(0.1, abs=0.02) and np.abs(q - p).max() < 0.05
