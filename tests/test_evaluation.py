"""Evaluation report: every file written, strict JSON, Table 2 consistent with the metrics, HTML offline."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from qsmrim_app.model.comparators import aprl_rf_out_of_fold
from qsmrim_app.model.evaluation import FIGURES, TABLE_COLUMNS, write_evaluation
from qsmrim_app.model.folds import fold_assignments
from qsmrim_app.model.metrics import lesion_and_subject_metrics


def _oof(seed: int, signal: float) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    subjects = np.repeat([f"sub-{i:02d}" for i in range(25)], 16)
    y = (rng.random(subjects.size) < 0.08).astype(int)
    fold = fold_assignments(subjects, y, n_folds=5, seed=0)
    p = 1 / (1 + np.exp(-(signal * (y - 0.5) + rng.normal(0, 1, y.size))))
    return pd.DataFrame({"subject": subjects, "lesion_id": np.tile(np.arange(1, 17), 25), "label": y,
                         "fold": fold, "probability": p, "vote": (p > 0.5).astype(int)})


def _strict_json(text: str):
    def bad(const: str):
        raise ValueError(f"non-standard JSON constant {const}")
    return json.loads(text, parse_constant=bad)


def test_write_evaluation_outputs(tmp_path) -> None:
    good, weak = _oof(0, 4.0), _oof(0, 0.5)
    const = good.assign(probability=0.5)  # degenerate method: constant scores
    results = {"qsmrimnet": good, "weak": weak, "constant": const}
    metrics = write_evaluation(results, tmp_path, title="unit <test>")

    expected = {"metrics.json", "table2.tsv", "report.html"} | {f"{f}.{e}" for f in FIGURES for e in ("png", "svg")}
    assert expected <= {p.name for p in tmp_path.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    for f in FIGURES:
        assert (tmp_path / f"{f}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stored = _strict_json((tmp_path / "metrics.json").read_text())
    assert set(stored) == set(results)
    direct = lesion_and_subject_metrics(good["label"], good["probability"], good["fold"], good["subject"])
    assert stored["qsmrimnet"]["pauc_fpr_0.1"] == pytest.approx(direct["pauc_fpr_0.1"])
    assert stored["qsmrimnet"]["tp"] == direct["tp"] == metrics["qsmrimnet"]["tp"]
    assert metrics["qsmrimnet"]["pauc_fpr_0.1"] > metrics["weak"]["pauc_fpr_0.1"]

    table = pd.read_csv(tmp_path / "table2.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert list(table["method"]) == ["qsmrimnet", "weak", "constant"]
    row = table.set_index("method").loc["qsmrimnet"]
    assert float(row["pROC AUC (FPR<0.1)"]) == pytest.approx(direct["pauc_fpr_0.1"], abs=5e-4)
    assert int(row["TP"]) == direct["tp"]
    assert re.fullmatch(r"-?\d\.\d{3} \[-?\d\.\d{3}, -?\d\.\d{3}\]", row["Pearson r [95% CI]"])

    page = (tmp_path / "report.html").read_text()
    assert "unit &lt;test&gt;" in page and "<table" in page
    assert page.count("<svg") == len(FIGURES)
    assert "pROC AUC (FPR&lt;0.1)" in page and "qsmrimnet" in page
    assert not re.search(r'(src|href)="(?!#|data:)', page), "report must not reference external files"


def test_write_evaluation_with_aprl_rf_and_reference_point(tmp_path) -> None:
    rng = np.random.default_rng(1)
    names = ["original_firstorder_Mean", "original_firstorder_Variance", "original_glcm_Contrast"]
    subjects = np.repeat([f"sub-{i:02d}" for i in range(20)], 15)
    y = (rng.random(subjects.size) < 0.1).astype(int)
    x = rng.normal(size=(y.size, 3))
    x[:, 0] += 2.5 * y
    oof = aprl_rf_out_of_fold(x, y, names, subjects, n_folds=5, seed=0, n_estimators=50)
    metrics = write_evaluation({"aprl-rf": oof}, tmp_path / "eval", reference_points={"paper": (0.7, 0.7)})
    assert metrics["aprl-rf"]["roc_auc"] > 0.75
    assert (tmp_path / "eval" / "pr.svg").read_text().count("<svg") == 1


def test_write_evaluation_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="no method"):
        write_evaluation({}, tmp_path)
    with pytest.raises(ValueError, match="probability"):
        write_evaluation({"x": _oof(0, 1.0).drop(columns="probability")}, tmp_path)


def test_counts_are_per_scan_when_participants_have_sessions(tmp_path) -> None:
    """Two sessions of one participant are two scans: their rim+ counts are compared one by one, not summed."""
    oof = _oof(3, 4.0)
    two = pd.concat([oof.assign(session="a"), oof.assign(session="b")], ignore_index=True)
    none = two.assign(session="n/a")
    per_scan = write_evaluation({"m": two}, tmp_path / "scan")["m"]
    per_person = write_evaluation({"m": none}, tmp_path / "person")["m"]
    assert per_scan["n_subjects"] == 50 and per_person["n_subjects"] == 25
    # Same lesions, same predictions: summing two identical scans doubles every count error, squared x4.
    assert per_person["count_mse"] == pytest.approx(4 * per_scan["count_mse"])
    assert per_scan["tp"] == per_person["tp"]


def test_paired_differences_tell_a_real_gap_from_noise(tmp_path) -> None:
    good, weak = _oof(0, 4.0), _oof(0, 0.5)
    noise = np.random.default_rng(9).normal(0, 1, len(good))
    twin = good.assign(probability=1 / (1 + np.exp(-(4.0 * (good["label"] - 0.5) + noise))))  # same signal
    write_evaluation({"qsmrimnet": good, "weak": weak, "twin": twin}, tmp_path)
    paired = pd.read_csv(tmp_path / "paired_differences.tsv", sep="\t")
    assert set(paired["method"]) == {"weak", "twin"} and (paired["reference"] == "qsmrimnet").all()
    assert (paired["n_participants"] == 25).all() and (paired["n_lesions"] == 400).all()
    rows = paired.set_index(["method", "metric"])
    gap = rows.loc[("weak", "ROC AUC")]
    assert gap["ci_low"] > 0 and gap["p_value"] < 0.01  # a strong model against a weak one: the CI excludes 0
    direct = lesion_and_subject_metrics(good["label"], good["probability"], good["fold"], good["subject"])
    assert gap["reference_value"] == pytest.approx(direct["roc_auc_pooled"], abs=1e-4)
    noise = rows.loc[("twin", "ROC AUC")]
    assert noise["ci_low"] < 0 < noise["ci_high"] and noise["p_value"] > 0.05  # equal signal: cannot tell
    page = (tmp_path / "report.html").read_text()
    assert "Paired differences against qsmrimnet" in page and "difference [95% CI]" in page
    # one method alone: nothing to pair
    write_evaluation({"qsmrimnet": good}, tmp_path / "alone")
    assert not (tmp_path / "alone" / "paired_differences.tsv").exists()


def test_paired_differences_refuse_other_labels(tmp_path) -> None:
    good = _oof(0, 4.0)
    other = good.assign(label=1 - good["label"])
    with pytest.raises(ValueError, match="disagree on lesion labels"):
        write_evaluation({"a": good, "b": other}, tmp_path)
