"""The method registry is the one list of methods: the command line, the trainer and the builders read it."""
from __future__ import annotations

import numpy as np
import pytest

from qsmrim_app.cli.parser import build_parser
from qsmrim_app.model import methods
from qsmrim_app.model.config import TrainConfig
from qsmrim_app.model.inputs import FLOOR_COLUMN


def _choices(option: str) -> list:
    action = next(a for a in build_parser()._actions if option in a.option_strings)
    return list(action.choices)


def test_parser_method_choices_are_the_registry() -> None:
    assert _choices("--method") == [*methods.METHODS, "all"]
    assert methods.ALL_METHODS == tuple(methods.METHODS)


def test_every_builder_resolves_and_kinds_are_known() -> None:
    for method in methods.METHODS.values():
        assert callable(method.build()), method.name
        assert method.kind in ("network", "sklearn", "floor", "fusion")
        assert (method.kind == "fusion") == bool(method.components)
        assert all(c in methods.METHODS and methods.get(c).kind != "fusion" for c in method.components)
    assert set(methods.NETWORK_METHODS) == {"qsmrimnet", "aprl-nn", "rimnet", "image-only", "image-radiomics"}


def test_feature_names_follow_the_run_configuration() -> None:
    names = ["original_firstorder_Mean", "radial_shell_mean_ppb", FLOOR_COLUMN, "volume_mm3"]
    assert methods.feature_names(TrainConfig(method="image-only"), names) == []
    assert methods.feature_names(TrainConfig(method="shell-core"), names) == [FLOOR_COLUMN]
    assert methods.feature_names(TrainConfig(method="rf"), names) == ["original_firstorder_Mean"]
    paper = methods.feature_names(TrainConfig(method="qsmrimnet", input_level="paper"), names)
    referenced = methods.feature_names(TrainConfig(method="qsmrimnet", input_level="referenced"), names)
    assert paper == ["original_firstorder_Mean"] and len(referenced) >= len(paper)
    # the features-only ablation reads what the network's radiomic branch reads (radial columns too)
    assert methods.feature_names(TrainConfig(method="features-only"), names) == referenced
    assert "radial_shell_mean_ppb" in referenced
    with pytest.raises(ValueError, match=FLOOR_COLUMN):
        methods.feature_names(TrainConfig(method="shell-core"), names[:2])
    with pytest.raises(ValueError, match="unknown method"):
        methods.get("svm")


def test_no_voxel_counts_leaves_out_the_features_that_count_native_voxels() -> None:
    """The 527 pyradiomics names: 'no-voxel-counts' drops the 144 run-length (GLRLM) features and the 9
    first-order Energy (one per image type), keeps TotalEnergy, GLCM JointEnergy, shape and the radial columns,
    for the floors (pyradiomics columns) and the networks' feature methods alike."""
    from qsmrim_app import radiomics as rad

    names = [*rad.feature_names(rad.load_params()), "radial_shell_mean_ppb", FLOOR_COLUMN]
    for method in ("rf", "features-only", "qsmrimnet"):
        every = methods.feature_names(TrainConfig(method=method), names)
        kept = methods.feature_names(TrainConfig(method=method, feature_set="no-voxel-counts"), names)
        dropped = set(every) - set(kept)
        assert set(kept) <= set(every) and len(dropped) == 144 + 9, method
        assert all("_glrlm_" in n or n.endswith("_firstorder_Energy") for n in dropped)
        assert {"original_firstorder_TotalEnergy", "original_glcm_JointEnergy", "original_shape_VoxelVolume"} <= set(kept)
        assert ("radial_shell_mean_ppb" in kept) == (method != "rf")
    assert methods.feature_names(TrainConfig(method="shell-core", feature_set="no-voxel-counts"), names) == [FLOOR_COLUMN]
    with pytest.raises(ValueError, match="unknown feature set"):
        TrainConfig(feature_set="physical")
    # a model.json written before the option existed read all the features, and still says so; its id is kept
    stored = {k: v for k, v in TrainConfig(method="rf").to_dict().items() if k != "feature_set"}
    assert TrainConfig.from_dict(stored).feature_set == "all"


def test_sklearn_builders_fit_through_the_registry() -> None:
    from qsmrim_app.model.comparators import fit_comparator

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = (x[:, 0] > 0).astype(int)
    for name in methods.names_of_kind("sklearn", "floor"):
        model = fit_comparator(name, x, y, ["original_firstorder_A", "original_firstorder_B", "c"], seed=0)
        p = model.predict_proba(x)[:, 1]
        assert p.shape == (40,) and np.all((p >= 0) & (p <= 1)), name
    with pytest.raises(ValueError, match="not a comparator"):
        fit_comparator("qsmrimnet", x, y, [], 0)


def test_parser_choices_and_defaults_come_from_their_owners() -> None:
    """Each choice list and default is defined once, in the module that owns it; the parser imports it."""
    from qsmrim_app.config import PreprocConfig
    from qsmrim_app.lesion_split import LESION_THRESHOLD, SPLIT_METHODS
    from qsmrim_app.lesions import MIN_LESION_VOXELS
    from qsmrim_app.model.config import PROTOCOLS
    from qsmrim_app.model.inputs import DEFAULT_LEVEL, LEVELS, PATCH_EXTENT_MM, PATCH_SPACING_MM

    defaults = vars(build_parser().parse_args(["bids", "out", "participant"]))
    assert _choices("--lesion-split") == list(SPLIT_METHODS) and _choices("--inputs") == list(LEVELS)
    assert _choices("--protocol") == list(PROTOCOLS)
    assert defaults["min_lesion_voxels"] == MIN_LESION_VOXELS == PreprocConfig().min_lesion_voxels
    assert defaults["lesion_threshold"] == LESION_THRESHOLD == PreprocConfig().lesion_threshold
    assert defaults["lesion_split"] == PreprocConfig().lesion_split and defaults["inputs"] == DEFAULT_LEVEL
    assert PreprocConfig().patch_extent_mm == TrainConfig().patch_extent_mm == PATCH_EXTENT_MM
    assert PreprocConfig().patch_spacing_mm == TrainConfig().patch_spacing_mm == PATCH_SPACING_MM
