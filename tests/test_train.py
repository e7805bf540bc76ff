"""Training end to end on a small synthetic lesion set whose rim+ patches carry a bright QSM ring."""
from __future__ import annotations

import csv
from dataclasses import replace
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from qsmrim_app.model.config import TrainConfig
from qsmrim_app.model.data import FeatureScaler, LesionSet, concat
from qsmrim_app.model.predict import load_ensemble
from qsmrim_app.model.train import cross_validate, lr_milestones, train
from qsmrim_app.patches import signed_distance_mm

SMALL_PATCH = (16, 16, 8)


def synthetic_lesions(n_subjects: int = 8, per_subject: int = 12, shape: tuple[int, int, int] = SMALL_PATCH,
                      seed: int = 0, rim_fraction: float = 0.35, n_features: int = 5) -> LesionSet:
    """Ellipsoidal lesions; rim+ ones have a paramagnetic (bright) shell on QSM. Features weakly informative."""
    rng = np.random.default_rng(seed)
    n = n_subjects * per_subject
    labels = (rng.random(n) < rim_fraction).astype(np.int64)
    labels[:3] = 1  # every set has rim+ lesions
    grid = np.stack(np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij"))
    patches = np.zeros((n, 4, *shape), np.float32)  # raw patches: QSM, FLAIR, signed distance, others
    for i in range(n):
        radii = np.array(shape) * rng.uniform(0.25, 0.4, 3)
        r = np.sqrt(((grid / radii[:, None, None, None]) ** 2).sum(0))
        inside = r <= 1.0
        qsm = rng.normal(0, 8, shape) + 5.0
        if labels[i]:
            qsm += 60.0 * np.exp(-((r - 0.85) / 0.15) ** 2)
        flair = 2.0 + rng.normal(0, 0.3, shape)
        patches[i, 0] = qsm
        patches[i, 1] = np.where(inside, flair, 0.5)
        patches[i, 2] = signed_distance_mm(inside, (0.7, 0.7, 2.0))
    features = rng.normal(0, 1, (n, n_features)).astype(np.float32)
    features[:, 0] += 1.0 * labels
    features[rng.random((n, n_features)) < 0.05] = np.nan
    subjects = np.repeat([f"sub-{k:02d}" for k in range(n_subjects)], per_subject)
    return LesionSet(patches, features, [f"original_firstorder_F{j}" for j in range(n_features)], labels,
                     subjects, np.tile(np.arange(1, per_subject + 1), n_subjects), np.array([0.7, 0.7, 2.0]))


def tiny_config(**kw: object) -> TrainConfig:
    base = dict(width_multiplier=0.125, epochs=2, folds=2, seeds=1, batch_size=16, learning_rate=1e-3,
                device="cpu", base_seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_lesion_set_validation_subset_and_concat() -> None:
    a, b = synthetic_lesions(n_subjects=2, per_subject=3), synthetic_lesions(n_subjects=1, per_subject=4, seed=1)
    both = concat([a, b])
    assert len(both) == 10 and both.summary()["rim_positive"] == int(a.labels.sum() + b.labels.sum())
    sub = both.subset([9, 0])
    np.testing.assert_array_equal(sub.patches[0], b.patches[3])
    assert sub.lesion_ids.tolist() == [b.lesion_ids[3], a.lesion_ids[0]]
    with pytest.raises(ValueError, match="feature"):
        LesionSet(a.patches, a.features, a.feature_names[:-1], a.labels, a.subjects, a.lesion_ids)
    with pytest.raises(ValueError, match="labels"):
        LesionSet(a.patches, a.features, a.feature_names, a.labels + 2, a.subjects, a.lesion_ids)
    renamed = LesionSet(b.patches, b.features, [n + "x" for n in b.feature_names], b.labels, b.subjects,
                        b.lesion_ids, b.voxel_size_mm)
    with pytest.raises(ValueError, match="feature names differ"):
        concat([a, renamed])


def test_feature_scaler_imputes_median_and_standardises_on_training_fold_only() -> None:
    train_x = np.array([[1.0, np.nan, 5.0], [3.0, 2.0, 5.0], [np.nan, 4.0, 5.0], [5.0, np.inf, 5.0]])
    scaler = FeatureScaler.fit(train_x)
    np.testing.assert_allclose(scaler.median, [3.0, 3.0, 5.0])
    z = scaler.transform(train_x)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(z[:, :2].std(0), 1, atol=1e-6)
    np.testing.assert_allclose(z[:, 2], 0)  # constant column
    test_x = np.array([[100.0, np.nan, 7.0]])
    out = scaler.transform(test_x)
    assert out[0, 0] > 10 and out[0, 1] == pytest.approx((3.0 - scaler.mean[1]) / scaler.std[1])
    again = FeatureScaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
    np.testing.assert_array_equal(again.transform(test_x), out)
    all_nan = FeatureScaler.fit(np.full((3, 2), np.nan))
    assert np.isfinite(all_nan.transform(np.full((1, 2), np.nan))).all()


def test_lr_milestones_are_fractions_of_epochs() -> None:
    assert lr_milestones(TrainConfig()) == [20, 28, 36]
    assert lr_milestones(TrainConfig(epochs=2)) == [1, 2]


def test_train_writes_loadable_model_that_beats_chance(tmp_path: Path) -> None:
    lesions = synthetic_lesions()
    model_dir = train(lesions, tiny_config(epochs=4), tmp_path / "model", progress=False)
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["method"] == "qsmrimnet" and meta["feature_names"] == lesions.feature_names
    assert len(meta["members"]) == 2 and len(meta["folds"]) == 2
    assert {"f1", "high-sensitivity"} <= set(meta["thresholds"])
    assert meta["training_data"]["rim_positive"] == int(lesions.labels.sum())
    assert {"torch", "numpy", "qsmrim"} <= set(meta["versions"])
    for m in meta["members"]:
        assert (model_dir / m["weights"]).is_file()
    assert not list((model_dir / "checkpoints").glob("*.pt"))  # finished members leave no checkpoint
    rows = list(csv.DictReader((model_dir / "oof_predictions.tsv").open(), delimiter="\t"))
    assert len(rows) == len(lesions)
    assert {r["fold"] for r in rows} == {"0", "1"}
    assert {r["session"] for r in rows} == {"n/a"}  # the lesion set has no sessions
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)

    ens = load_ensemble(model_dir, device="cpu")
    assert ens.model_id == meta["model_id"] and ens.thresholds == meta["thresholds"]
    held_out = synthetic_lesions(n_subjects=4, seed=11)
    # Columns shuffled and an extra one added: the ensemble reorders by name.
    order = [2, 0, 4, 1, 3]
    feats = np.concatenate([held_out.features[:, order], np.ones((len(held_out), 1), np.float32)], axis=1)
    names = [held_out.feature_names[j] for j in order] + ["extra"]
    pred = ens.predict(held_out.patches, feats, names, batch_size=7)
    assert pred.probability.shape == (len(held_out),)
    assert pred.member_probabilities.shape == (2, len(held_out))
    assert np.all((pred.votes >= 0) & (pred.votes <= 1))
    assert np.array_equal(pred.rim_positive, pred.votes > 0.5)
    auc = roc_auc_score(held_out.labels, pred.probability)
    assert auc > 0.7, auc
    same = ens.predict(held_out.patches, held_out.features, held_out.feature_names)
    np.testing.assert_allclose(same.probability, pred.probability, rtol=1e-5, atol=1e-6)
    thr = ens.predict(held_out.patches, held_out.features, held_out.feature_names, threshold=0.5)
    assert np.array_equal(thr.rim_positive, thr.probability >= 0.5)

    with pytest.raises(ValueError, match="original_firstorder_F0"):
        ens.predict(held_out.patches, held_out.features[:, 1:], held_out.feature_names[1:])
    empty = ens.predict(held_out.patches[:0], held_out.features[:0], held_out.feature_names)
    assert len(empty) == 0 and empty.rim_positive.dtype == bool


def test_cpu_training_is_deterministic_and_resumes_after_interrupt(tmp_path: Path) -> None:
    lesions = synthetic_lesions(n_subjects=6, per_subject=10)
    config = tiny_config(epochs=3, folds=2, width_multiplier=0.0625)
    ref = cross_validate(lesions, config, tmp_path / "a", progress=False)
    again = cross_validate(lesions, config, tmp_path / "b", progress=False)
    np.testing.assert_array_equal(ref.probability, again.probability)

    class Interrupt(Exception):
        pass

    def stop(fold: int, seed: int, epoch: int, record: dict) -> None:
        if fold == 1 and epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        cross_validate(lesions, config, tmp_path / "c", progress=False, epoch_callback=stop)
    assert (tmp_path / "c" / "checkpoints" / "fold1_seed0.pt").is_file()
    assert (tmp_path / "c" / "weights" / "fold0_seed0.pt").is_file()
    seen: list[tuple[int, int]] = []
    resumed = cross_validate(lesions, config, tmp_path / "c", progress=False,
                             epoch_callback=lambda f, s, e, r: seen.append((f, e)))
    assert seen == [(1, 2)]  # fold 0 was finished, fold 1 resumes after epoch 1
    np.testing.assert_array_equal(resumed.probability, ref.probability)
    assert resumed.thresholds == ref.thresholds


def test_members_trained_apart_make_the_same_cross_validation(tmp_path: Path) -> None:
    """Two processes (here: two calls) each train some members; one cross_validate then only collects them."""
    from qsmrim_app.model.cv import train_members

    lesions = synthetic_lesions(n_subjects=6, per_subject=10)
    config = tiny_config(epochs=2, folds=2, seeds=2, width_multiplier=0.0625)
    ref = cross_validate(lesions, config, tmp_path / "whole", progress=False)
    first = train_members(lesions, config, tmp_path / "apart", [(1, 1), (0, 0)])
    second = train_members(lesions, config, tmp_path / "apart", [(0, 1), (1, 0)])
    assert sorted(first) == [(0, 0), (1, 1)] and sorted(second) == [(0, 1), (1, 0)]
    assert sorted(p.name for p in (tmp_path / "apart" / "weights").iterdir()) == [
        "fold0_seed0.pt", "fold0_seed1.pt", "fold1_seed0.pt", "fold1_seed1.pt"]
    for (k, s), prob in {**first, **second}.items():
        np.testing.assert_allclose(prob, ref.member_probability[s, ref.folds[k][1]], rtol=0, atol=1e-6)
    trained: list[tuple[int, int]] = []
    collected = cross_validate(lesions, config, tmp_path / "apart", progress=False,
                               epoch_callback=lambda f, s, e, r: trained.append((f, s)))
    assert trained == []  # every member's weights were there
    np.testing.assert_allclose(collected.probability, ref.probability, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="outside 2 folds x 2 seeds"):
        train_members(lesions, config, tmp_path / "apart", [(2, 0)])
    with pytest.raises(ValueError, match="fusion trains its components"):
        train_members(lesions, replace(config, method="fusion"), tmp_path / "fused", [(0, 0)])


def test_fp16_weights_and_other_methods(tmp_path: Path) -> None:
    lesions = synthetic_lesions(n_subjects=4, per_subject=8)
    for method in ("image-only", "aprl-nn", "rimnet"):
        cfg = tiny_config(method=method, epochs=1, weights_fp16=True)
        out = train(lesions, cfg, tmp_path / method, progress=False)
        state = torch.load(out / "weights" / "fold0_seed0.pt", weights_only=True)
        assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
        ens = load_ensemble(out, device="cpu")
        if method in ("image-only", "rimnet"):
            assert ens.feature_names == []
            pred = ens.predict(lesions.patches, np.zeros((len(lesions), 0)), [])
        else:
            pred = ens.predict(lesions.patches, lesions.features, lesions.feature_names)
        assert np.isfinite(pred.probability).all()


def test_aprl_rf_uses_same_folds(tmp_path: Path) -> None:
    pytest.importorskip("qsmrim_app.model.comparators")
    lesions = synthetic_lesions(n_subjects=6, per_subject=10)
    out = train(lesions, tiny_config(method="aprl-rf", seeds=2), tmp_path / "rf", progress=False)
    nn_cv = cross_validate(lesions, tiny_config(epochs=1), tmp_path / "nn", progress=False)
    rows = list(csv.DictReader((out / "oof_predictions.tsv").open(), delimiter="\t"))
    np.testing.assert_array_equal([int(r["fold"]) for r in rows], nn_cv.fold)
    pred = load_ensemble(out).predict(lesions.patches, lesions.features, lesions.feature_names)
    assert pred.member_probabilities.shape == (4, len(lesions))


def test_full_size_patches_train(tmp_path: Path) -> None:
    """The real 32x32x16 patch size through the whole pipeline (ResNet strides, augmentation)."""
    lesions = synthetic_lesions(n_subjects=4, per_subject=8, shape=(32, 32, 16))
    out = train(lesions, tiny_config(epochs=1), tmp_path / "m", progress=False)
    pred = load_ensemble(out, "cpu").predict(lesions.patches, lesions.features, lesions.feature_names)
    assert pred.probability.shape == (len(lesions),) and np.isfinite(pred.probability).all()


def real_lesion_set(shared_data: Path, rim_ppb: float = 40.0) -> LesionSet:
    """Real MS lesion shapes and FLAIR (Lesjak et al. 2017) on real QSM texture (2016 QSM challenge).

    There is no rim annotation in the public data, so every second lesion becomes rim+ by adding a
    paramagnetic shell (+``rim_ppb``) on its outer layer of voxels, as the phantom generator does.
    """
    import nibabel as nib
    from scipy import ndimage

    from qsmrim_app.lesions import label_instances
    from qsmrim_app.patches import extract_patches, normalise_flair
    from qsmrim_app.radial import feature_names as radial_names
    from qsmrim_app.radial import radial_table
    from qsmrim_app.reference import local_references

    chi = np.asarray(nib.load(shared_data / "qsm_challenge_2016" / "chi_cosmos.nii.gz").dataobj, np.float32)
    sets = []
    for patient in ("patient07", "patient19"):
        folder = shared_data / "open_ms_data" / patient
        mask = np.asarray(nib.load(next(folder.glob("GOLD_STANDARD*.nii.gz"))).dataobj) > 0.5
        flair = np.asarray(nib.load(next(folder.glob("FLAIR*.nii.gz"))).dataobj, np.float32)
        qsm = np.zeros(mask.shape, np.float32)
        off = [(a - b) // 2 for a, b in zip(mask.shape, chi.shape)]
        qsm[off[0]:off[0] + chi.shape[0], off[1]:off[1] + chi.shape[1], off[2]:off[2] + chi.shape[2]] = chi * 1000
        inst = label_instances(mask, min_voxels=10)
        ids = np.asarray(inst.lesion_ids)
        labels = (np.arange(ids.size) % 2 == 0).astype(np.int64)
        shell = inst.labels > 0
        shell &= ~ndimage.binary_erosion(shell, np.ones((3, 3, 3), bool))
        rim_ids = ids[labels == 1]
        qsm = qsm + rim_ppb * (shell & np.isin(inst.labels, rim_ids))
        ps = extract_patches(qsm, normalise_flair(flair, lesion_mask=mask), inst.labels, ids, np.eye(4))
        p = ps.patches
        inside = p[:, 2] < 0
        feats = np.stack([(p[:, 0] * inside).sum((1, 2, 3)) / np.maximum(inside.sum((1, 2, 3)), 1),
                          np.log(inside.sum((1, 2, 3)) + 1)], axis=1)
        # Pseudo-subjects: each patient's lesions in 4 groups so folds can split them.
        subjects = np.array([f"{patient}-{i % 4}" for i in range(ids.size)])
        reference, _ = local_references(qsm, inst.labels, mask | (qsm != 0), ids, (1.0, 1.0, 1.0))
        # The app's own radial-profile features (what the default inputs feed the radiomic branch).
        radial = radial_table(p, reference, ps.grid.spacing_mm)
        sets.append(LesionSet(p, np.concatenate([feats, radial], axis=1),
                              ["original_firstorder_Mean", "original_shape_VoxelVolume", *radial_names()], labels,
                              subjects, ids, ps.voxel_size_mm, reference=reference))
    return concat(sets)


@pytest.mark.slow
@pytest.mark.shared_data
def test_trains_on_real_lesion_shapes_and_qsm_texture(shared_data: Path, tmp_path: Path) -> None:
    lesions = real_lesion_set(shared_data)
    assert len(lesions) > 30 and lesions.patches.shape[1:] == (4, 32, 32, 16)
    cv = cross_validate(lesions, tiny_config(epochs=3, folds=2), tmp_path / "real", progress=False)
    assert np.isfinite(cv.probability).all()
    assert roc_auc_score(lesions.labels, cv.probability) > 0.7


def test_fast_protocol_trains_with_step_budget_and_early_stopping(tmp_path: Path) -> None:
    """The step-budget recipe: rim+-enriched batches, one-cycle LR, inner split, best round kept."""
    from qsmrim_app.model.config import protocol_config
    from qsmrim_app.model.loop import _batches, _steps_plan, estimate_training_seconds

    config = protocol_config("fast", max_steps=12, eval_every=4, folds=2, batch_size=16, device="cpu")
    assert _steps_plan(config, 100) == (3, 4)
    assert _steps_plan(protocol_config("paper", epochs=3, batch_size=16), 100) == (3, 7)
    labels = torch.tensor([1] * 5 + [0] * 95)
    batches = _batches(config, labels, 4, torch.Generator().manual_seed(0))
    assert len(batches) == 4 and all(len(b) == 16 for b in batches)
    assert all(int(labels[b].sum()) == 4 for b in batches)  # a quarter rim+, whatever the prevalence
    lesions = synthetic_lesions(n_subjects=10, per_subject=10)
    out = train(lesions, config, tmp_path / "fast", progress=False)
    meta = json.loads((out / "model.json").read_text())
    assert meta["protocol"] == "fast" and meta["config"]["max_steps"] == 12
    assert meta["inputs"]["level"] == "referenced" and meta["inputs"]["channels"] == ["qsm", "flair", "outline"]
    ens = load_ensemble(out, "cpu")
    pred = ens.predict(lesions.patches, lesions.features, lesions.feature_names, reference=lesions.reference)
    assert np.isfinite(pred.probability).all()
    estimate = estimate_training_seconds(config, len(lesions), lesions.n_features)
    assert estimate["steps_per_member"] == 12 and estimate["members"] == 2 and estimate["seconds"] > 0


def test_old_models_are_refused_by_name(tmp_path: Path) -> None:
    """A model written by qsmrim 0.1 (voxel windows, format 1) cannot read today's patches: clear refusal."""
    (tmp_path / "model.json").write_text(json.dumps({"format_version": 1, "method": "qsmrimnet", "config": {},
                                                      "patch_shape": [2, 32, 32, 16], "members": []}))
    with pytest.raises(ValueError, match="Retrain it with"):
        load_ensemble(tmp_path)


def test_wide_term_is_the_fitted_logistic_regression_frozen(tmp_path: Path) -> None:
    """The wide network's linear term equals the logreg floor's estimator fitted on the member's training
    lesions, is not moved by training, and the stored member predicts through it."""
    from qsmrim_app.model.comparators import fit_comparator
    from qsmrim_app.model.train import train_fold

    lesions = synthetic_lesions(n_subjects=10, per_subject=10, n_features=6)
    config = tiny_config(method="qsmrimnet", wide=True, stem_stride=(2, 2, 1), max_steps=6, eval_every=3,
                         inner_val_fraction=0.2, positive_fraction=0.25)
    train_idx, val_idx = np.arange(0, 80), np.arange(80, 100)
    scaler = FeatureScaler.fit(lesions.features[train_idx])
    x_all = config.input_spec().network_inputs(lesions.patches, lesions.reference)
    result = train_fold(lesions, x_all, lesions.features, train_idx, val_idx, config, 5, scaler,
                        tmp_path / "m.pt", progress=False)
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    expected = fit_comparator("logreg", scaler.transform(lesions.features[train_idx]), lesions.labels[train_idx], [], 5)
    assert np.allclose(state["wide.weight"].numpy().ravel(), expected.coef_.ravel(), atol=1e-5)
    assert np.allclose(state["wide.bias"].numpy(), expected.intercept_, atol=1e-5)
    assert result.history[-1]["selected_round"] >= -1  # the fitted start is a candidate for early stopping
    assert np.isfinite(result.val_probability).all() and result.val_probability.shape == (20,)


def _sites_per_fold(model_dir: Path, sites: dict[str, str]) -> list[list[str]]:
    folds: dict[str, set[str]] = {}
    for row in csv.DictReader(open(model_dir / "oof_predictions.tsv"), delimiter="\t"):
        folds.setdefault(row["fold"], set()).add(sites[row["subject"]])
    return sorted(sorted(v) for v in folds.values())


def test_fold_groups_keep_each_site_in_one_fold(tmp_path: Path) -> None:
    """LesionSet.groups (--cv-group-by): folds keep a site whole, so out-of-fold means out-of-site."""
    from dataclasses import replace

    from qsmrim_app.model.modeldir import model_id

    lesions = synthetic_lesions(n_subjects=9, per_subject=6, seed=4)
    sites = {f"sub-{k:02d}": "ABC"[k % 3] for k in range(9)}
    grouped = replace(lesions, groups=np.array([sites[s] for s in lesions.subjects]))
    assert grouped.summary()["fold_groups"] == {"A": 18, "B": 18, "C": 18}
    assert grouped.subset([0, 6]).groups.tolist() == ["A", "B"]
    with pytest.raises(ValueError, match="fold groups"):
        concat([grouped, lesions])
    config = tiny_config(method="logreg", folds=3)
    assert _sites_per_fold(train(grouped, config, tmp_path / "g"), sites) == [["A"], ["B"], ["C"]]
    # without groups the participant folds mix the sites, and the two are different models
    assert any(len(f) > 1 for f in _sites_per_fold(train(lesions, config, tmp_path / "p"), sites))
    assert model_id("logreg", config.to_dict(), grouped) != model_id("logreg", config.to_dict(), lesions)
    # the feature set is part of the model; "all" (how every model before the option was trained) keeps its id
    before = {k: v for k, v in config.to_dict().items() if k != "feature_set"}
    assert config.feature_set == "all" and model_id("logreg", config.to_dict(), lesions) == model_id("logreg", before, lesions)
    assert model_id("logreg", replace(config, feature_set="no-voxel-counts").to_dict(), lesions) != model_id(
        "logreg", config.to_dict(), lesions)


def test_tissue_level_model_is_invariant_to_the_reconstruction_scale(tmp_path: Path) -> None:
    """--inputs tissue: trained and applied through the same referencing, so a lesion whose first-order
    features and local reference are rescaled and shifted (another reconstruction) gets the same call."""
    from dataclasses import replace

    rng = np.random.default_rng(7)
    base = synthetic_lesions(n_subjects=8, per_subject=10, seed=7)
    n = len(base)
    ref = np.stack([rng.normal(-10, 5, n), rng.uniform(8, 20, n)], 1).astype(np.float32)
    z = rng.normal(0, 1, (n, 3)) + base.labels[:, None] * np.array([1.5, 1.0, 0.8])
    names = ["original_firstorder_Mean", "original_firstorder_90Percentile", "original_firstorder_InterquartileRange"]
    feats = np.stack([ref[:, 0] + ref[:, 1] * z[:, 0], ref[:, 0] + ref[:, 1] * z[:, 1], ref[:, 1] * np.abs(z[:, 2])], 1)
    lesions = replace(base, features=feats, feature_names=names, reference=ref)
    other_ref = ref * np.array([2.0, 2.0], np.float32) + np.array([15.0, 0.0], np.float32)  # scale 2, offset +15
    other = np.stack([other_ref[:, 0] + other_ref[:, 1] * z[:, 0], other_ref[:, 0] + other_ref[:, 1] * z[:, 1],
                      other_ref[:, 1] * np.abs(z[:, 2])], 1)
    probs = {}
    for level in ("referenced", "tissue"):
        out = train(lesions, tiny_config(method="features-only", input_level=level), tmp_path / level, progress=False)
        ens = load_ensemble(out, device="cpu")
        a = ens.predict(lesions.patches, feats, names, reference=ref).probability
        b = ens.predict(lesions.patches, other, names, reference=other_ref).probability
        probs[level] = (a, b)
    np.testing.assert_allclose(*probs["tissue"], atol=1e-5)
    assert np.abs(probs["referenced"][0] - probs["referenced"][1]).max() > 0.05
    assert roc_auc_score(lesions.labels, probs["tissue"][0]) > 0.75
