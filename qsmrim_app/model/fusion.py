"""Late fusion (``--method fusion``): separately trained models, their mean probability calibrated as one.

Why: trained jointly, the fast recipe's network leans on its wide term over the features and its image
branch barely moves it (leave-one-family-out PR AUC: features alone 0.516, image alone 0.362, jointly
0.506). Trained apart, the image branch ranks some families the features rank badly (faint rims), and
the mean of the two is better than either on data made another way (docs/families.md). Each component is
an ordinary model directory trained through the same folds (``components/<method>/``); the fused
model's out-of-fold probability is the mean of the components' out-of-fold probabilities, so its
calibration map and operating points are fitted exactly as :func:`train.train` fits one model's.

The fused ``model.json`` lists every component member (weights under ``components/<method>/``, each
with its ``method``) and each component's scalers and feature columns under ``components``, so the
participant level, the site recalibration and the review loop read it like any model directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from .calibration import add_calibrated_column, fit_cv_calibration
from .config import TrainConfig
from .methods import get as get_method, is_network
from .modeldir import (MODEL_FORMAT, MODEL_JSON, OOF_COLUMNS, OOF_TSV, atomic_path, created_now, read_model_json,
                       versions, write_model_json)

COMPONENTS_DIR = "components"
#: The out-of-fold table's identity columns: the components must list the same lesions in the same folds.
_KEYS = ["subject", "session", "lesion_id", "label", "fold"]


class FusionError(ValueError):
    """The components cannot be fused (other lesions, other folds, missing files); the message says why."""


def component_config(config: TrainConfig, method: str) -> TrainConfig:
    """A component's configuration: the fusion's, its own method, and (fine-tuning) the starting
    model's component of that method for the networks; a scikit-learn component starts afresh."""
    init = None
    if config.init_model and is_network(method):
        init = str(Path(config.init_model) / COMPONENTS_DIR / method)
    return replace(config, method=method, init_model=init)


def check_init_fusion(config: TrainConfig) -> None:
    """``--init-model`` for a fusion must be a fusion with the same components (each network starts
    from its namesake)."""
    if not config.init_model:
        return
    meta = read_model_json(Path(config.init_model))
    wanted = get_method(config.method).components
    if meta.get("method") != config.method or tuple(meta.get("components_order") or ()) != wanted:
        raise FusionError(f"--init-model {config.init_model} is a {meta.get('method')} model; --method "
                          f"{config.method} starts each component from a {config.method} model's component of "
                          f"the same method ({', '.join(wanted)}): give such a model or another --method")


def train_fusion(lesions, config: TrainConfig, out_dir: Path, progress: bool = True, epoch_callback=None,
                 model_id: str | None = None, trained: Mapping[str, Path] | None = None,
                 train_one: Callable | None = None) -> Path:
    """Train every component through the run's folds, then :func:`fuse` them into ``out_dir``.

    ``trained``: component directories this run has trained already with the same configuration (the
    ``--method all`` run's comparators); they are copied instead of trained again.
    """
    from .train import train  # train dispatches here: import at call time

    train_one = train_one or train
    check_init_fusion(config)
    out_dir = Path(out_dir)
    dirs = {}
    for method in get_method(config.method).components:
        cfg = component_config(config, method)
        target = out_dir / COMPONENTS_DIR / method
        done = (trained or {}).get(method)
        if done is not None and _same_config(Path(done), cfg):
            _copy_tree(Path(done), target)
        else:
            train_one(lesions, cfg, target, progress=progress, epoch_callback=epoch_callback)
        dirs[method] = target
    return fuse(dirs, out_dir, config=config, model_id=model_id, copy=False)


def _same_config(model_dir: Path, config: TrainConfig) -> bool:
    try:
        return read_model_json(model_dir).get("config") == json.loads(json.dumps(config.to_dict()))
    except (OSError, ValueError):
        return False


def _copy_tree(src: Path, dst: Path) -> None:
    """A component directory copied (hard links where the file system allows: weights are read-only)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    # the component's resumable checkpoints and its own report are not part of the fused model
    shutil.copytree(src, dst, copy_function=link,
                    ignore=shutil.ignore_patterns("checkpoints", "*.png", "*.svg", "report.html", "comparators"))


def read_components(dirs: Mapping[str, Path]) -> tuple[dict[str, dict], dict[str, pd.DataFrame]]:
    """Each component's model.json and out-of-fold table, checked to cover the same lesions and folds."""
    metas, tables = {}, {}
    for method, d in dirs.items():
        meta = read_model_json(Path(d))
        if meta.get("method") != method:
            raise FusionError(f"{d} is a {meta.get('method')} model, expected {method}")
        if not (Path(d) / OOF_TSV).is_file():
            raise FusionError(f"{d} has no {OOF_TSV}: fuse models trained by `group --train`")
        table = pd.read_csv(Path(d) / OOF_TSV, sep="\t", dtype={"session": str}, keep_default_na=False)
        metas[method], tables[method] = meta, table.sort_values(_KEYS[:3]).reset_index(drop=True)
    first = next(iter(tables))
    for method, table in tables.items():
        if not table[_KEYS].astype(str).equals(tables[first][_KEYS].astype(str)):
            raise FusionError(f"{dirs[method]} was cross-validated on other lesions or folds than "
                              f"{dirs[first]}: train the components through the same folds (same lesions, "
                              "--folds, --cv-group-by and seed)")
    return metas, tables


def fused_probability(tables: Mapping[str, pd.DataFrame]) -> np.ndarray:
    """The fusion's raw probability: the mean of the components' raw (uncalibrated) probabilities."""
    return np.mean([t["probability"].to_numpy(float) for t in tables.values()], axis=0)


def fuse(dirs: Mapping[str, Path], out_dir: Path, config: TrainConfig | None = None, model_id: str | None = None,
         copy: bool = True) -> Path:
    """Write the fused model directory from component directories (``copy``: copy them in first)."""
    from .train import calibrated_thresholds

    out_dir = Path(out_dir)
    wanted = get_method(config.method if config is not None else "fusion").components
    if set(dirs) != set(wanted):
        raise FusionError(f"a fusion fuses {', '.join(wanted)}; got {', '.join(dirs)}")
    dirs = {m: Path(dirs[m]) for m in wanted}  # the fusion's order, whatever the caller's
    metas, tables = read_components(dirs)  # same lesions and folds, checked before anything is copied
    if copy:  # the copies hold the same model.json and tables: read once, above
        dirs = {m: _copy_into(d, out_dir / COMPONENTS_DIR / m) for m, d in dirs.items()}
    first = metas[next(iter(metas))]
    if config is None:
        config = replace(TrainConfig.from_dict(first["config"]), method="fusion", init_model=None)
    reference = tables[next(iter(tables))]
    y, fold = reference["label"].to_numpy(int), reference["fold"].to_numpy(int)
    raw = fused_probability(tables)
    calibration = fit_cv_calibration(y, raw, fold)
    thresholds = calibrated_thresholds(y, calibration.map.apply(raw), fold)
    names = list(dict.fromkeys(n for m in metas.values() for n in m.get("feature_names") or []))  # the union
    members = [{**member, "method": method, "weights": f"{COMPONENTS_DIR}/{method}/{member['weights']}"}
               for method, meta in metas.items() for member in meta["members"]]
    model_id = model_id or "fusion-" + hashlib.sha1(
        json.dumps([metas[m]["model_id"] for m in wanted]).encode()).hexdigest()[:10]
    from .metrics import roc_auc

    meta = {
        "format_version": MODEL_FORMAT, "model_id": model_id, "method": config.method,
        "config": config.to_dict(), "feature_names": names, "inputs": first["inputs"],
        "protocol": config.protocol,
        "folds": [{k: f[k] for k in ("fold", "n_train", "n_test")} for f in first["folds"]],
        "members": members, "thresholds": thresholds,
        "cv": {"auc": float(roc_auc(y, raw)) if 0 < y.sum() < y.size else None},
        "versions": versions(), "created": created_now(), "training_data": first.get("training_data"),
        "calibration": calibration.map.to_dict(),
        "components_order": list(wanted),
        "components": {m: {"model_id": metas[m]["model_id"], "feature_names": metas[m].get("feature_names") or [],
                           "folds": metas[m]["folds"], "thresholds": metas[m].get("thresholds"),
                           "calibration": metas[m].get("calibration")} for m in wanted},
    }
    write_model_json(out_dir, meta)
    _write_oof(out_dir / OOF_TSV, reference, raw, tables, {m: len(metas[m]["members"]) for m in metas})
    add_calibrated_column(out_dir / OOF_TSV, calibration.crossfit)
    return out_dir


def _copy_into(src: Path, dst: Path) -> Path:
    if not (src / MODEL_JSON).is_file():
        raise FusionError(f"{src} holds no {MODEL_JSON}")
    if dst.exists() and src.resolve() == dst.resolve():
        return dst  # fusing in place: the component is already where it belongs
    _copy_tree(src, dst)
    return dst


def _write_oof(path: Path, reference: pd.DataFrame, raw: np.ndarray, tables: Mapping[str, pd.DataFrame],
               n_members: Mapping[str, int]) -> None:
    """The fused out-of-fold table in the one OOF format: the components' member votes pooled, and the
    spread of all their members (within-component variance plus that of the component means)."""
    total = sum(n_members.values())
    vote_fraction = sum(t["vote_fraction"].to_numpy(float) * n_members[m] for m, t in tables.items()) / total
    spread = np.sqrt(np.mean([t["uncertainty"].to_numpy(float) ** 2 for t in tables.values()], axis=0)
                     + np.var([t["probability"].to_numpy(float) for t in tables.values()], axis=0))
    out = reference[_KEYS].copy()
    out["probability"] = [f"{v:.6f}" for v in raw]
    out["vote"] = (vote_fraction > 0.5).astype(int)
    out["vote_fraction"] = [f"{v:.4f}" for v in vote_fraction]
    out["uncertainty"] = [f"{v:.6f}" for v in spread]
    with atomic_path(path) as tmp:
        out[list(OOF_COLUMNS)].to_csv(tmp, sep="\t", index=False, lineterminator="\n")
