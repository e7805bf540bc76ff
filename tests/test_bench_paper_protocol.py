"""benchmarks/bench_paper_protocol.py: packed arrays feed the network what the corpus did; members trained in
worker processes assemble into the model directory a single run writes."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import load_benchmark
from test_train import synthetic_lesions

from qsmrim_app.model.inputs import LEVELS, InputSpec


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_paper_protocol")


def _grouped(n_subjects: int = 6, per_subject: int = 8):
    lesions = synthetic_lesions(n_subjects=n_subjects, per_subject=per_subject)
    lesions.patches[:, 3, :3] = 1.0  # another lesion in the first slabs: masked out beside the margin
    groups = np.array([f"fam{int(s[-2:]) % 3}" for s in lesions.subjects])
    rng = np.random.default_rng(5)  # a reconstruction's own offset and scale per lesion
    reference = np.stack([rng.uniform(-40, 40, len(lesions)), rng.uniform(3, 20, len(lesions))], axis=1)
    return replace(lesions, groups=groups, reference=reference)


def test_packing_keeps_every_input_level_and_compresses(bench, tmp_path: Path) -> None:
    lesions = _grouped()
    packed = bench.pack_patches(lesions.patches, 3.0)
    for level in LEVELS:
        spec = InputSpec(level, tuple(lesions.extent_mm), tuple(lesions.voxel_size_mm), 3.0)
        np.testing.assert_array_equal(spec.network_inputs(lesions.patches, lesions.reference),
                                      spec.network_inputs(packed, lesions.reference))
    assert (packed[:, 0] == 0).mean() > (lesions.patches[:, 0] == 0).mean() + 0.2  # texture beyond the margin gone
    # a wider margin than the packing's would read what was cut away: refused
    wide = bench.paper_config(lesions, "family", margin_mm=5.0)
    with pytest.raises(RuntimeError, match="change the network inputs"):
        bench.check_packed(lesions.patches, packed, lesions.reference, wide)
    path = tmp_path / "arrays.npz"
    bench.save_arrays(path, lesions, "family", 3.0)
    back, column, margin = bench.load_arrays(path)
    assert (column, margin) == ("family", 3.0) and back.feature_names == lesions.feature_names
    np.testing.assert_array_equal(back.groups, lesions.groups)
    np.testing.assert_array_equal(back.patches, packed)
    np.testing.assert_array_equal(back.labels, lesions.labels)
    bench.save_arrays(path, lesions, "family", 3.0, half=True)  # float16: rounding only, still accepted
    half, _, _ = bench.load_arrays(path)
    assert not np.array_equal(half.patches, packed)
    for level in LEVELS:  # every level within float16 rounding, on references far from (0, 1)
        spec = InputSpec(level, tuple(lesions.extent_mm), tuple(lesions.voxel_size_mm), 3.0)
        np.testing.assert_allclose(spec.network_inputs(half.patches, half.reference),
                                   spec.network_inputs(lesions.patches, lesions.reference), rtol=2e-3, atol=2e-2)
    bench.check_packed(lesions.patches, half.patches, lesions.reference, bench.paper_config(lesions, "family"), half=True)


def test_complete_seeds_counts_only_seeds_with_every_fold(bench) -> None:
    assert bench.complete_seeds({(0, 0), (1, 0), (2, 0), (0, 1)}, 3, 3) == 1
    assert bench.complete_seeds({(0, 1), (1, 1), (2, 1)}, 3, 3) == 0  # seed 0 unfinished: no ensemble
    assert bench.complete_seeds({(k, s) for k in range(3) for s in range(2)}, 3, 2) == 2


@pytest.mark.slow
def test_train_in_two_workers_writes_a_leave_one_family_out_model(bench, tmp_path: Path) -> None:
    lesions = _grouped()
    bench.save_arrays(tmp_path / "arrays.npz", lesions, "family", 3.0)
    timing = tmp_path / "timing.json"
    rc = bench.main(["train", "--arrays", str(tmp_path / "arrays.npz"), "--out-dir", str(tmp_path / "model"),
                     "--workers", "2", "--json", str(timing), "--epochs", "1", "--width", "0.0625",
                     "--seeds", "2", "--device", "cpu"])
    assert rc == 0
    result = json.loads(timing.read_text())
    assert result["members_trained"] == 6 and result["seeds_complete"] == 2
    model = json.loads((tmp_path / "model" / "model.json").read_text())
    assert model["config"]["protocol"] == "paper" and model["config"]["fold_groups_by"] == "family"
    assert len(model["members"]) == 6 and model["training_data"]["fold_groups"] == {"fam0": 16, "fam1": 16,
                                                                                     "fam2": 16}
    oof = pd.read_csv(tmp_path / "model" / "oof_predictions.tsv", sep="\t")
    assert len(oof) == len(lesions) and oof["probability"].between(0, 1).all()
    # every family is held out by exactly one fold: the out-of-fold table is leave-one-family-out
    fam = dict(zip(lesions.subjects, lesions.groups))
    assert oof.groupby(oof["subject"].map(fam))["fold"].nunique().eq(1).all()
    assert oof.groupby("fold")["subject"].agg(lambda s: s.map(fam).nunique()).eq(1).all() and oof["fold"].nunique() == 3
    assert result["layout"] == {"channels_last": False, "chosen_by": "not a GPU"}
    # score: each member's saved held-out probabilities map back onto the lesions the model's own table holds
    scored = tmp_path / "scored.json"
    assert bench.main(["score", "--arrays", str(tmp_path / "arrays.npz"), "--out-dir", str(tmp_path / "model"),
                       "--reference", str(tmp_path / "model" / "oof_predictions.tsv"), "--n-boot", "50",
                       "--json", str(scored)]) == 0
    rows = json.loads(scored.read_text())["families"]
    assert sorted(r["family"] for r in rows) == ["fam0", "fam1", "fam2"] and all(r["seeds"] == 2 for r in rows)
    # lesion by lesion, the mean of a fold's saved seeds is the model's out-of-fold probability
    packed, column, _ = bench.load_arrays(tmp_path / "arrays.npz")
    heldout = bench.read_heldout(tmp_path / "model", packed, column)
    oof_by_key = oof.set_index(["subject", "lesion_id"])["probability"]
    for k in range(3):
        index, p0 = heldout[(k, 0)]
        _, p1 = heldout[(k, 1)]
        expected = oof_by_key.reindex(list(zip(packed.subjects[index], packed.lesion_ids[index]))).to_numpy(float)
        np.testing.assert_allclose((p0 + p1) / 2, expected, atol=2e-6)  # the table rounds to 6 decimals
    for r in rows:
        ref = r["compared"]["reference"]
        assert r["pr_auc"] == pytest.approx(ref["pr_auc"], abs=1e-4)
    # held-out files of another packing are refused, not mapped onto the wrong lesions
    other = replace(lesions, lesion_ids=lesions.lesion_ids + 100)
    bench.save_arrays(tmp_path / "other.npz", other, "family", 3.0)
    other_packed, _, _ = bench.load_arrays(tmp_path / "other.npz")
    with pytest.raises(SystemExit, match="does not hold fold"):
        bench.read_heldout(tmp_path / "model", other_packed, "family")
    # a deadline already past starts nothing and writes no model
    rc = bench.main(["train", "--arrays", str(tmp_path / "arrays.npz"), "--out-dir", str(tmp_path / "none"),
                     "--workers", "1", "--json", str(timing), "--epochs", "1", "--width", "0.0625",
                     "--device", "cpu", "--deadline-s", "-1"])
    assert rc == 1 and json.loads(timing.read_text())["members_trained"] == 0
    assert not (tmp_path / "none" / "model.json").exists()


def test_score_compares_every_method_and_refuses_other_lesions(bench, tmp_path: Path) -> None:
    lesions = _grouped(n_subjects=3, per_subject=6)
    index = np.arange(6)
    heldout = {(0, 0): (index, np.linspace(0.1, 0.9, 6))}
    base = pd.DataFrame({"subject": lesions.subjects, "session": lesions.sessions, "lesion_id": lesions.lesion_ids,
                         "label": lesions.labels})
    table = pd.concat([base.assign(method="good", probability_raw=lesions.labels * 0.8 + 0.1, probability=0.5),
                       base.assign(method="flat", probability_raw=0.5, probability=0.5)])
    path = tmp_path / "lofo_predictions.tsv"
    table.to_csv(path, sep="\t", index=False)
    rows = bench.score_heldout(lesions, heldout, bench.reference_tables(path), 20)
    assert len(rows) == 1 and rows[0]["n_lesions"] == 6 and rows[0]["seeds"] == 1
    compared = rows[0]["compared"]
    assert set(compared) == {"good", "flat"}
    assert 0 < lesions.labels[index].sum() < 6  # both classes: the raw probability is compared, not the calibrated
    assert compared["good"]["roc_auc"] == pytest.approx(1.0) and compared["flat"]["roc_auc"] == pytest.approx(0.5)
    # a flat method adds nothing to the paper's ranking: their rank mean ranks as the paper alone
    assert compared["flat"]["rank_mean_with_paper"]["roc_auc"] == pytest.approx(rows[0]["roc_auc"])
    # the control: the rank mean of one method with every other, without the paper's ranking
    rows = bench.score_heldout(lesions, heldout, bench.reference_tables(path), 20, control_base="good")
    assert set(rows[0]["controls"]) == {"flat"} and rows[0]["controls"]["flat"]["with"] == "good"
    assert rows[0]["controls"]["flat"]["pr_auc"] == pytest.approx(compared["good"]["pr_auc"])  # flat adds nothing
    bad = base.assign(probability=0.5)
    bad.loc[0, "label"] = 1 - bad.loc[0, "label"]
    with pytest.raises(SystemExit, match="does not hold these lesions"):
        bench.score_heldout(lesions, heldout, {"reference": bad}, 20)
    # a table without some of the family's lesions is not compared on the rest
    rows = bench.score_heldout(lesions, heldout, {"partial": base.assign(probability=0.5).iloc[3:]}, 20)
    assert rows[0]["compared"] == {}
    # one lesion twice: refused with its name
    table.iloc[[0, 0]].to_csv(path, sep="\t", index=False)
    with pytest.raises(SystemExit, match="more than one row"):
        bench.reference_tables(path)


def test_channels_last_only_on_a_gpu(monkeypatch) -> None:
    import torch

    from qsmrim_app.model.loop import CHANNELS_LAST_ENV, training_memory_format

    monkeypatch.setenv(CHANNELS_LAST_ENV, "1")
    assert training_memory_format(torch.device("cpu")) == torch.contiguous_format
    assert training_memory_format(torch.device("cuda")) == torch.channels_last_3d
    monkeypatch.setenv(CHANNELS_LAST_ENV, "0")
    assert training_memory_format(torch.device("cuda")) == torch.contiguous_format
