"""The one registry of training methods: name, kind, the features it reads and its builder.

Everything that lists, chooses between or builds methods reads :data:`METHODS`: the command line's
``--method`` choices, :class:`~qsmrim_app.model.config.TrainConfig`, the trainer, the comparators and the
network factory. Adding a method is one entry here (plus its builder and its tests).

Builders are named ``"module:function"`` inside ``qsmrim_app.model`` and imported when called, so the
command line can list the methods without importing torch or scikit-learn. A network builder takes
``(config, n_features, in_channels)`` and returns an ``nn.Module``; a scikit-learn or floor builder takes
``(features, labels, feature_names, seed)`` and returns a fitted estimator with ``predict_proba``.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Callable, Literal, Sequence

from .inputs import FLOOR_COLUMN, in_feature_set, is_pyradiomics_feature

if TYPE_CHECKING:
    import numpy as np

    from .config import TrainConfig
    from .data import LesionSet

Kind = Literal["network", "sklearn", "floor", "fusion"]
# What a method reads from the lesion table: nothing (image only), the training-free floor score, the
# 527 pyradiomics features, or what the run's input level feeds the networks' radiomic branch.
Features = Literal["none", "floor", "pyradiomics", "inputs"]


@dataclass(frozen=True)
class Method:
    """One training method."""

    name: str
    kind: Kind
    features: Features
    builder: str  # "module:function" in qsmrim_app.model
    description: str
    components: tuple[str, ...] = ()  # kind "fusion": the methods whose calibrated mean it is

    def build(self) -> Callable:
        """The builder function (imported now, not when the registry is read)."""
        module, function = self.builder.split(":")
        return getattr(import_module(f"{__package__}.{module}"), function)


# Order matters: it is the order of ``--method all`` (the first is the primary model of such a run).
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("qsmrimnet", "network", "inputs", "network:build_qsmrimnet",
           "QSMRim-Net: 3D ResNet on the patch + radiomics MLP, fused, with DeepSMOTE"),
    Method("aprl-rf", "sklearn", "pyradiomics", "comparators:fit_aprl_rf",
           "APRL(RF): first-order radiomics, SMOTE, random forest (paper's Table 2)"),
    Method("aprl-nn", "network", "inputs", "network:build_aprl_nn",
           "APRL(NN): the radiomics branch alone (paper's Table 2)"),
    Method("rimnet", "network", "none", "network:build_rimnet",
           "RimNet-like multi-branch VGG on the image alone (paper's Table 2)"),
    Method("image-only", "network", "none", "network:build_image_only",
           "ablation: the image branch alone (paper's Table 3)"),
    Method("image-radiomics", "network", "inputs", "network:build_image_radiomics",
           "ablation: image + radiomics without DeepSMOTE (paper's Table 3)"),
    Method("rf", "sklearn", "pyradiomics", "comparators:fit_rf",
           "floor: class-balanced random forest on the pyradiomics features (--feature-set)"),
    Method("logreg", "sklearn", "pyradiomics", "comparators:fit_logreg",
           "floor: penalised logistic regression on the pyradiomics features (C by inner CV)"),
    Method("features-only", "sklearn", "inputs", "comparators:fit_logreg",
           "ablation: the features alone, as the fast recipe's wide term sees them (logistic regression on the "
           "networks' feature columns: "
           "pyradiomics + radial), to ask whether the image branch adds to the features"),
    Method("fusion", "fusion", "inputs", "fusion:train_fusion",
           "late fusion: the image branch alone (image-only) and the features alone (features-only), each "
           "trained through the same folds, their mean probability calibrated as one model",
           components=("image-only", "features-only")),
    Method("shell-core", "floor", "floor", "comparators:fit_shell_core",
           "training-free floor: the rim-minus-core QSM score"),
)}
ALL_METHODS: tuple[str, ...] = tuple(METHODS)


def names_of_kind(*kinds: Kind) -> tuple[str, ...]:
    return tuple(name for name, m in METHODS.items() if m.kind in kinds)


NETWORK_METHODS: tuple[str, ...] = names_of_kind("network")


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (one of {', '.join(METHODS)})") from None


def is_network(name: str) -> bool:
    return get(name).kind == "network"


def starts_from_model(name: str) -> bool:
    """Whether ``--init-model`` can start this method: a network, or a fusion with a network component."""
    method = get(name)
    return method.kind == "network" or any(is_network(c) for c in method.components)


def feature_names(config: "TrainConfig", names: Sequence[str]) -> list[str]:
    """The feature columns ``config.method`` reads from a table with columns ``names``, in table order
    (pyradiomics columns only those of ``config.feature_set``)."""
    method = get(config.method)
    names = list(names)
    if method.features == "none":
        return []
    if method.features == "floor":
        if FLOOR_COLUMN not in names:
            raise ValueError(f"method {method.name!r} needs the {FLOOR_COLUMN!r} column; rerun the participant level")
        return [FLOOR_COLUMN]
    if method.features == "pyradiomics":
        wanted = [n for n in names if is_pyradiomics_feature(n)]
    else:
        wanted = config.input_spec().select_features(names)
    return [n for n in wanted if in_feature_set(n, config.feature_set)]


@dataclass(frozen=True)
class FeatureColumns:
    """A method's feature columns of one lesion set, worked out once per run."""

    names: list[str]
    values: "np.ndarray"  # (N, len(names))


def select_features(lesions: "LesionSet", config: "TrainConfig") -> FeatureColumns:
    """The columns of ``lesions.features`` that ``config.method`` reads."""
    wanted = feature_names(config, lesions.feature_names)
    index = {n: i for i, n in enumerate(lesions.feature_names)}
    values = lesions.features[:, [index[n] for n in wanted]]
    if get(config.method).features == "inputs":  # what the input level feeds the radiomic branch
        values = config.input_spec().feature_values(wanted, values, lesions.reference)
    return FeatureColumns(wanted, values)
