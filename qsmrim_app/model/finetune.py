"""Fine-tuning (``--init-model``): start each network from a member of an existing model.

A model can only start a network that reads the same inputs and has the same architecture. What
the inputs are is what ``model.json`` says about them: every key in :data:`INPUT_KEYS` (the patch
definition, e.g. ``patch_shape`` and ``voxel_size_mm`` or a physical ``inputs`` block, and the
``feature_names``) is compared as a whole between the starting model and the run, so a new key
that describes the inputs is checked as soon as it is listed here and written by ``train``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from .config import TrainConfig
from .modeldir import ModelDirError, read_model_json

#: model.json keys that define what a network reads (absent from both: nothing to compare).
INPUT_KEYS: tuple[str, ...] = ("inputs", "patch_shape", "voxel_size_mm", "feature_names")
#: TrainConfig fields that define the network's architecture (its state dict's shapes).
ARCHITECTURE_KEYS: tuple[str, ...] = ("width_multiplier", "fusion", "stem_stride", "wide")
#: Methods with the same network (they differ in training only: DeepSMOTE on or off).
_SAME_NETWORK = {"qsmrimnet": "fused", "image-radiomics": "fused"}


class InitModelError(ValueError):
    """The model given to ``--init-model`` cannot start this run's networks; the message says why."""


def read_init_model(model_dir: Path) -> dict:
    """``--init-model``'s model.json (read by the one model-directory reader)."""
    try:
        return read_model_json(model_dir)
    except ModelDirError as err:
        raise InitModelError(f"--init-model: {err}") from None


def _same(a: Any, b: Any) -> bool:
    """Equal, with float tolerance (voxel sizes went through float32) and lists == tuples."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-6)
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"{len(value)} entries starting {value[:3]}"
    return json.dumps(value)


def check_init_model(init_meta: Mapping, run_inputs: Mapping, config: TrainConfig) -> None:
    """Raise InitModelError naming every input or architecture key where the model and the run differ.

    ``run_inputs`` holds what this run's model.json will say under :data:`INPUT_KEYS`.
    """
    from .methods import NETWORK_METHODS

    where = config.init_model
    init_method = str(init_meta.get("method"))
    if init_method == "fusion":
        raise InitModelError(f"--init-model {where} is a fusion model (e.g. the bundled one): fine-tune it with "
                             "--method fusion, which starts each of its networks from the matching component")
    if init_method not in NETWORK_METHODS:
        raise InitModelError(f"--init-model {where} is a {init_method} model, not a network; "
                             "start from a network model (e.g. the bundled one) or drop --init-model")
    if config.method not in NETWORK_METHODS:
        raise InitModelError(f"--init-model starts networks; --method {config.method} is not one")
    if _SAME_NETWORK.get(init_method, init_method) != _SAME_NETWORK.get(config.method, config.method):
        raise InitModelError(f"--init-model {where} is a {init_method} network; --method {config.method} "
                             "has another architecture")
    problems = []
    for key in INPUT_KEYS:
        if key not in init_meta and key not in run_inputs:
            continue
        if key not in init_meta or key not in run_inputs:
            side = "the model" if key not in init_meta else "this run"
            problems.append(f"{key}: {side} does not define it")
        elif not _same(init_meta[key], run_inputs[key]):
            problems.append(f"{key}: model {_show(init_meta[key])}, this run {_show(run_inputs[key])}")
    init_config = init_meta.get("config") or {}
    their_set = init_config.get("feature_set", TrainConfig().feature_set)
    if any(p.startswith("feature_names") for p in problems) and their_set != config.feature_set:
        problems.append(f"feature_set: model {their_set!r}, this run {config.feature_set!r} "
                        f"(pass --feature-set {their_set})")
    for key in ARCHITECTURE_KEYS:
        mine = getattr(config, key)
        theirs = init_config.get(key, getattr(TrainConfig(), key))
        if not _same(theirs, mine):
            flag = "--" + key.replace("_", "-")
            problems.append(f"{key}: model {theirs!r}, this run {mine!r}"
                            + (f" (pass {flag} {theirs})" if key == "width_multiplier" else ""))
    if problems:
        raise InitModelError(f"--init-model {where} reads other inputs or has another architecture than this "
                             "run: " + "; ".join(problems))


def member_weights(init_dir: Path, init_meta: Mapping, fold: int, seed: int) -> Path:
    """The starting weights of member (fold, seed): the model's member of that fold and seed, else its first."""
    members = list(init_meta.get("members") or [])
    if not members:
        raise InitModelError(f"--init-model {init_dir} lists no members")
    match = next((m for m in members if int(m["fold"]) == fold and int(m["seed"]) == seed), members[0])
    path = Path(init_dir) / match["weights"]
    if not path.is_file():
        raise InitModelError(f"--init-model: member weights {path} are missing")
    return path
