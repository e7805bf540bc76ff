"""Late fusion (--method fusion): components trained through the same folds, their mean calibrated as one."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qsmrim_app.model.calibration import CalibrationMap
from qsmrim_app.model.finetune import InitModelError
from qsmrim_app.model.fusion import FusionError, fuse, train_fusion
from qsmrim_app.model.predict import load_ensemble
from qsmrim_app.model.train import train
from test_train import synthetic_lesions, tiny_config


def _oof(model_dir: Path) -> pd.DataFrame:
    t = pd.read_csv(model_dir / "oof_predictions.tsv", sep="\t", dtype={"session": str}, keep_default_na=False)
    return t.sort_values(["subject", "session", "lesion_id"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    lesions = synthetic_lesions(n_subjects=6, per_subject=10)
    out = train(lesions, tiny_config(method="fusion", epochs=2), tmp_path_factory.mktemp("f") / "fusion",
                progress=False)
    return out, lesions


def test_fusion_trains_its_components_through_one_set_of_folds(fused) -> None:
    out, lesions = fused
    meta = json.loads((out / "model.json").read_text())
    assert meta["method"] == "fusion" and meta["components_order"] == ["image-only", "features-only"]
    assert [m["method"] for m in meta["members"]] == ["image-only"] * 2 + ["features-only"] * 2
    for member in meta["members"]:
        assert (out / member["weights"]).is_file() and member["weights"].startswith("components/")
    assert meta["components"]["image-only"]["feature_names"] == []
    assert meta["feature_names"] == meta["components"]["features-only"]["feature_names"] != []
    # the fused out-of-fold probability is the mean of the components', lesion by lesion, fold by fold
    fused_oof, img, feat = _oof(out), _oof(out / "components/image-only"), _oof(out / "components/features-only")
    assert len(fused_oof) == len(lesions)
    assert (fused_oof["fold"] == img["fold"]).all() and (img["fold"] == feat["fold"]).all()
    np.testing.assert_allclose(fused_oof["probability"], (img["probability"] + feat["probability"]) / 2, atol=2e-6)
    # one monotone calibration map of that mean, and the operating points on its scale
    cmap = CalibrationMap.from_dict(meta["calibration"])
    grid = np.linspace(0, 1, 201)
    assert np.all(np.diff(cmap.apply(grid)) >= -1e-9)
    assert all(0 < meta["thresholds"][k] < 1 for k in ("f1", "high-sensitivity"))
    assert "probability_calibrated" in fused_oof.columns


def test_fused_model_predicts_the_calibrated_mean_of_its_components(fused) -> None:
    out, _ = fused
    held_out = synthetic_lesions(n_subjects=3, seed=11)
    ens = load_ensemble(out, device="cpu")
    pred = ens.predict(held_out.patches, held_out.features, held_out.feature_names)
    parts = [load_ensemble(out / "components" / m, device="cpu").predict(
        held_out.patches, held_out.features, held_out.feature_names) for m in ("image-only", "features-only")]
    np.testing.assert_allclose(pred.probability_raw, (parts[0].probability_raw + parts[1].probability_raw) / 2,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.probability, ens.calibration.apply(pred.probability_raw), atol=1e-6)
    assert pred.member_probabilities.shape == (4, len(held_out))
    np.testing.assert_allclose(pred.member_probabilities,
                               np.concatenate([parts[0].member_probabilities, parts[1].member_probabilities]),
                               atol=1e-6)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(held_out.labels, pred.probability) > 0.7


def test_fusion_reuses_components_this_run_trained_and_refuses_other_folds(fused, tmp_path: Path) -> None:
    out, lesions = fused
    config = json.loads((out / "model.json").read_text())["config"]
    from qsmrim_app.model.config import TrainConfig

    cfg = TrainConfig.from_dict(config)
    trained = {m: out / "components" / m for m in ("image-only", "features-only")}

    def must_not_train(*args, **kwargs):
        raise AssertionError("a component this run trained was trained again")

    again = train_fusion(lesions, cfg, tmp_path / "again", progress=False, trained=trained, train_one=must_not_train)
    assert json.loads((again / "model.json").read_text())["thresholds"] == \
        json.loads((out / "model.json").read_text())["thresholds"]

    other = train(lesions, tiny_config(method="features-only", folds=3), tmp_path / "other", progress=False)
    with pytest.raises(FusionError, match="other lesions or folds"):
        fuse({"image-only": out / "components/image-only", "features-only": other}, tmp_path / "bad")
    with pytest.raises(FusionError, match="is a features-only model, expected image-only"):
        fuse({"image-only": other, "features-only": other}, tmp_path / "bad2")


def test_fine_tuning_a_fusion_starts_each_network_from_its_namesake(fused, tmp_path: Path) -> None:
    out, lesions = fused
    tuned = train(lesions, tiny_config(method="fusion", epochs=1, init_model=str(out)), tmp_path / "tuned",
                  progress=False)
    image = json.loads((tuned / "components/image-only/model.json").read_text())["config"]
    feats = json.loads((tuned / "components/features-only/model.json").read_text())["config"]
    assert image["init_model"] == str(out / "components/image-only") and feats["init_model"] is None
    # zero epochs: each image-only member is exactly the starting fusion's namesake member
    import torch

    start = train(lesions, tiny_config(method="fusion", epochs=0, init_model=str(out), inner_val_fraction=0.0),
                  tmp_path / "start", progress=False)
    for member in json.loads((start / "model.json").read_text())["members"]:
        if member["method"] != "image-only":
            continue
        mine = torch.load(start / member["weights"], weights_only=True)
        theirs = torch.load(out / member["weights"], weights_only=True)
        assert all(torch.equal(mine[k].float(), theirs[k].float()) for k in theirs if theirs[k].is_floating_point())
    # a network cannot start from a fusion, nor a fusion from a network
    with pytest.raises(InitModelError, match="--method fusion"):
        train(lesions, tiny_config(init_model=str(out)), tmp_path / "net", progress=False)
    image_only = out / "components/image-only"
    with pytest.raises(FusionError, match="is a image-only model"):
        train(lesions, tiny_config(method="fusion", init_model=str(image_only)), tmp_path / "fus", progress=False)


def test_command_line_fine_tunes_a_fusion_model_as_a_fusion(fused, tmp_path: Path) -> None:
    """`group --train --init-model FUSION` without --method trains a fusion (the bundled model's method)."""
    from qsmrim_app.cli.parser import build_parser
    from qsmrim_app.cli.run import build_config
    from test_bids import make_dataset

    out, _ = fused
    bids = make_dataset(tmp_path / "ds")
    argv = [str(bids), str(tmp_path / "out"), "group", "--train", "--init-model", str(out)]
    (tmp_path / "out").mkdir()
    assert build_config(build_parser().parse_args(argv), argv).train_methods == ("fusion",)
    argv = [str(bids), str(tmp_path / "out"), "group", "--train"]
    assert build_config(build_parser().parse_args(argv), argv).train_methods == ("qsmrimnet",)


def test_each_folds_members_reproduce_the_out_of_fold_probabilities(fused) -> None:
    """Inference (component feature columns, scalers, input transforms) is what training computed: the
    members of fold k, predicting fold k's held-out lesions, give the fused out-of-fold probability."""
    out, lesions = fused
    ens = load_ensemble(out, device="cpu")
    oof = _oof(out)
    row = {(s, int(i)): k for k, (s, i) in enumerate(zip(lesions.subjects, lesions.lesion_ids))}
    for fold in sorted(oof["fold"].unique()):
        mine = oof[oof["fold"] == fold]
        idx = np.array([row[(s, int(i))] for s, i in zip(mine["subject"], mine["lesion_id"])])
        held = replace(ens, members=[m for m in ens.members if m.fold == fold])
        assert {m.method for m in held.members} == {"image-only", "features-only"}
        pred = held.predict(lesions.patches[idx], lesions.features[idx], lesions.feature_names,
                            reference=lesions.reference[idx] if lesions.reference is not None else None)
        np.testing.assert_allclose(pred.probability_raw, mine["probability"].to_numpy(float), atol=2e-5)


def test_a_site_model_of_a_fusion_keeps_its_components(fused, tmp_path: Path) -> None:
    from qsmrim_app.workflows.recalibrate import write_site_model

    out, lesions = fused
    meta = json.loads((out / "model.json").read_text())
    site = write_site_model(out, meta, tmp_path / "site", "site-x", meta["calibration"], {"f1": 0.4,
                                                                                           "high-sensitivity": 0.2})
    for method in ("image-only", "features-only"):
        assert (site / "components" / method / "model.json").is_file()
    a = load_ensemble(out, device="cpu").predict(lesions.patches[:8], lesions.features[:8], lesions.feature_names)
    b = load_ensemble(site, device="cpu").predict(lesions.patches[:8], lesions.features[:8], lesions.feature_names)
    np.testing.assert_allclose(a.probability_raw, b.probability_raw, atol=1e-6)
    # and it can start a fine-tuning run, component by component
    tuned = train(lesions, tiny_config(method="fusion", epochs=1, init_model=str(site)), tmp_path / "tuned",
                  progress=False)
    assert json.loads((tuned / "model.json").read_text())["method"] == "fusion"


def test_command_line_refuses_a_fusion_from_a_network_before_any_work(fused, tmp_path: Path) -> None:
    from qsmrim_app.cli.run import main
    from test_bids import make_dataset

    out, _ = fused
    bids = make_dataset(tmp_path / "ds")
    dest = tmp_path / "out"
    dest.mkdir()
    base = [str(bids), str(dest), "group", "--train"]
    assert main([*base, "--method", "fusion", "--init-model", str(out / "components/image-only")]) == 64
    assert main([*base, "--method", "qsmrimnet", "--init-model", str(out)]) == 64
    assert not (dest / "models").exists()
