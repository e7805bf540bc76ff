"""--init-model: members start from the matching members of a model; incompatible models are refused."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from qsmrim_app.config import BUNDLED_MODEL_DIR
from qsmrim_app.model.config import TrainConfig
from qsmrim_app.model.data import LesionSet
from qsmrim_app.model.finetune import InitModelError
from qsmrim_app.model.train import train

FUSION = json.loads((BUNDLED_MODEL_DIR / "model.json").read_text())
# The bundled model is a fusion (model/fusion.py): fine-tuning it starts its image-only network from this
# component (tests/test_fusion.py checks the fusion's side); these tests start that network directly.
START_DIR = BUNDLED_MODEL_DIR / "components" / "image-only"
BUNDLED = json.loads((START_DIR / "model.json").read_text())


def lesions_like_bundled(n: int = 16, voxel=None, names=None) -> LesionSet:
    """Random lesions with the bundled model's inputs (its feature names, patch shape, voxel size)."""
    rng = np.random.default_rng(0)
    names = list(FUSION["feature_names"]) if names is None else names
    labels = np.array([0, 1] * (n // 2))
    return LesionSet(patches=rng.normal(size=(n, 4, *BUNDLED["inputs"]["shape"])).astype(np.float32),
                     features=rng.normal(size=(n, len(names))).astype(np.float32), feature_names=names,
                     labels=labels, subjects=np.array([f"sub-{i % 4}" for i in range(n)]),
                     lesion_ids=np.arange(1, n + 1),
                     voxel_size_mm=np.asarray(BUNDLED["inputs"]["spacing_mm"] if voxel is None else voxel))


def config(**changes) -> TrainConfig:
    base = TrainConfig.from_dict(BUNDLED["config"])
    # Epochs of the paper's Adam at 1e-4 (the bundled model was trained with a step budget).
    settings = dict(epochs=0, folds=2, seeds=2, device="cpu", weights_fp16=False, checkpoint=False,
                    init_model=str(START_DIR), max_steps=None, lr_schedule="step", optimizer="adam",
                    learning_rate=1e-4, weight_decay=0.0, inner_val_fraction=0.0, positive_fraction=None)
    return replace(base, **{**settings, **changes})


def state(path: Path) -> dict:
    return {k: v.float() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
            if v.is_floating_point()}


def test_members_start_from_the_matching_member(tmp_path):
    """0 epochs: each stored member is exactly its starting point (fold k seed 0 -> the model's
    fold k seed 0; seed 1, which the bundled model lacks, -> its first member)."""
    out = train(lesions_like_bundled(), config(), tmp_path / "model", progress=False)
    meta = json.loads((out / "model.json").read_text())
    assert meta["config"]["init_model"] == str(START_DIR)
    expected = {(0, 0): "fold0_seed0", (1, 0): "fold1_seed0", (0, 1): "fold0_seed0", (1, 1): "fold0_seed0"}
    for member in meta["members"]:
        mine = state(out / member["weights"])
        theirs = state(START_DIR / "weights" / f"{expected[(member['fold'], member['seed'])]}.pt")
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    scratch = train(lesions_like_bundled(), config(init_model=None), tmp_path / "scratch", progress=False)
    first = state(scratch / "weights" / "fold0_seed0.pt")
    bundled = state(START_DIR / "weights" / "fold0_seed0.pt")
    assert not all(torch.equal(first[k], bundled[k]) for k in first)


def test_one_epoch_of_fine_tuning_moves_away_from_the_start(tmp_path):
    out = train(lesions_like_bundled(), config(epochs=1, seeds=1), tmp_path / "model", progress=False)
    mine = state(out / "weights" / "fold0_seed0.pt")
    theirs = state(START_DIR / "weights" / "fold0_seed0.pt")
    learned = [k for k in mine if "running_" not in k]  # BatchNorm statistics follow the new data at once
    changed = [k for k in learned if not torch.equal(mine[k], theirs[k])]
    # One Adam step at lr 1e-4 moves each weight by about 1e-4: changed, but still the bundled network.
    assert changed and max(float((mine[k] - theirs[k]).abs().max()) for k in changed) < 0.01


@pytest.mark.parametrize("case, needle", [
    ("voxel", "inputs: model"), ("features", "feature_names"), ("width", "--width-multiplier 0.125"),
    ("inputs-key", "inputs: the model does not define it"), ("rf-model", "not a network"),
    ("other-network", "another architecture"), ("feature-set", "(pass --feature-set all)")])
def test_incompatible_models_are_refused(tmp_path, case, needle):
    lesions, cfg = lesions_like_bundled(), config()
    if case == "voxel":
        lesions = lesions_like_bundled(voxel=[1.0, 1.0, 1.0])
    elif case == "features":  # a network that reads features (the image-only start reads none)
        names = list(FUSION["feature_names"])
        lesions = lesions_like_bundled(names=names[:-1] + ["original_firstorder_Other"])
        model = tmp_path / "init"
        shutil.copytree(START_DIR, model)
        (model / "model.json").write_text(json.dumps({**BUNDLED, "method": "qsmrimnet", "feature_names": names}))
        cfg = config(method="qsmrimnet", init_model=str(model))
    elif case == "feature-set":  # a network trained on all features; this run leaves out the voxel counts
        names = list(FUSION["feature_names"]) + ["original_glrlm_RunVariance"]
        lesions = lesions_like_bundled(names=names)
        model = tmp_path / "init"
        shutil.copytree(START_DIR, model)
        (model / "model.json").write_text(json.dumps({**BUNDLED, "method": "qsmrimnet", "feature_names": names,
                                                      "config": {**BUNDLED["config"], "feature_set": "all"}}))
        cfg = config(method="qsmrimnet", init_model=str(model), feature_set="no-voxel-counts")
    elif case == "width":
        cfg = config(width_multiplier=0.25)
    elif case in ("inputs-key", "rf-model"):
        model = tmp_path / "init"
        shutil.copytree(START_DIR, model)
        meta = dict(BUNDLED)
        if case == "inputs-key":  # a model.json that does not say what its patches are
            del meta["inputs"]
        else:
            meta["method"] = "aprl-rf"
        (model / "model.json").write_text(json.dumps(meta))
        cfg = config(init_model=str(model))
    elif case == "other-network":
        cfg = config(method="rimnet")
    with pytest.raises(InitModelError, match=needle.replace("+", r"\+").replace(".", r"\.")):
        train(lesions, cfg, tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()  # refused before anything was written


def test_command_line_refusals(tmp_path):
    from qsmrim_app.cli.run import main
    from test_bids import make_dataset

    bids = make_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    out.mkdir()
    base = [str(bids), str(out), "group", "--train", "--init-model", str(BUNDLED_MODEL_DIR)]
    assert main([*base, "--method", "aprl-rf"]) == 64
    assert main([*base, "--method", "all"]) == 64
    assert main([str(bids), str(out), "participant", "--init-model", str(BUNDLED_MODEL_DIR)]) == 64
    assert main([*base[:-1], str(tmp_path)]) == 66  # no model.json there


def test_fine_tuning_builds_the_starting_models_network(tmp_path):
    """`group --train --init-model M` without architecture options trains M's network on M's feature set,
    whatever the protocol."""
    from qsmrim_app.cli.parser import build_parser
    from qsmrim_app.cli.run import build_config
    from test_bids import make_dataset

    bids = make_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    out.mkdir()
    stored = TrainConfig.from_dict(json.loads((BUNDLED_MODEL_DIR / "model.json").read_text())["config"])
    argv = [str(bids), str(out), "group", "--train", "--init-model", str(BUNDLED_MODEL_DIR)]
    for protocol in ("paper", "fast"):
        cfg = build_config(build_parser().parse_args([*argv, "--protocol", protocol]), argv).training
        for key in ("width_multiplier", "fusion", "stem_stride", "wide", "feature_set"):
            assert getattr(cfg, key) == getattr(stored, key), (protocol, key)
    cfg = build_config(build_parser().parse_args([*argv, "--width-multiplier", "0.5"]), argv).training
    assert cfg.width_multiplier == 0.5  # explicit wins (and is refused later by check_init_model)
