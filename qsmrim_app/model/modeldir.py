"""The model directory: ``model.json`` (one writer, one reader), the model id and the out-of-fold table.

A model directory holds ``model.json`` (what the model is, how it was trained, its folds, members and
thresholds), ``weights/`` (one file per fold x seed member) and ``oof_predictions.tsv``. Everything that
reads a model directory (the command line, fine-tuning, prediction) reads ``model.json`` through
:func:`read_model_json`. No torch here: the command line reads models without importing it.
"""
from __future__ import annotations

import csv
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from ..atomic import atomic_path, write_text

if TYPE_CHECKING:
    from .data import LesionSet

MODEL_JSON = "model.json"
OOF_TSV = "oof_predictions.tsv"
# 2: patches in mm with their surrounding tissue (model/inputs.py). 1 (qsmrim 0.1): 32x32x16 voxel
# windows of the lesion only; such models cannot read today's patches and are refused by name.
MODEL_FORMAT = 2
OOF_COLUMNS = ["subject", "session", "lesion_id", "label", "fold", "probability", "vote", "vote_fraction",
               "uncertainty"]


class ModelDirError(ValueError):
    """A model directory's ``model.json`` is missing or unreadable; the message names the file."""


def read_model_json(model_dir: Path) -> dict:
    """``model.json`` of ``model_dir`` as a dict (ModelDirError when it is missing or not JSON)."""
    path = Path(model_dir) / MODEL_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelDirError(f"cannot read {path} ({err})") from None


def write_model_json(model_dir: Path, meta: Mapping) -> Path:
    """Write ``model.json`` atomically (strict JSON: no NaN)."""
    return write_text(Path(model_dir) / MODEL_JSON, json.dumps(meta, indent=1, allow_nan=False))


def model_id(method: str, config: Mapping, lesions: "LesionSet") -> str:
    """``<method>-<hash>``: the same configuration on the same lesions and labels gives the same id.

    It names the model's directory under ``models/`` (so rerunning a command resumes its training) and is
    what ``model.json`` and the participant summaries call the model.
    """
    config = dict(config)
    if config.get("feature_set") == "all":  # added later: the ids of models on all features stay what they were
        config.pop("feature_set")
    digest = hashlib.sha1()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(np.asarray(lesions.subjects).astype(str).tobytes())
    digest.update(np.asarray(lesions.lesion_ids).tobytes())
    digest.update(np.asarray(lesions.labels).tobytes())
    if lesions.groups is not None:  # other folds, another model
        digest.update(np.asarray(lesions.groups).astype(str).tobytes())
    return f"{method}-{digest.hexdigest()[:10]}"


def versions() -> dict[str, str]:
    """The package versions a model was trained with."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        qsmrim_version = version("qsmrim")
    except PackageNotFoundError:
        qsmrim_version = "unknown"
    return {"qsmrim": qsmrim_version, "torch": torch.__version__, "numpy": np.__version__}


def created_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_oof_predictions(path: Path, lesions: "LesionSet", probability: np.ndarray, member_probability: np.ndarray,
                          fold: np.ndarray, vote: np.ndarray, vote_fraction: np.ndarray) -> Path:
    """``oof_predictions.tsv``: one row per lesion with its held-out probability, vote and member spread."""
    spread = np.asarray(member_probability).std(axis=0)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(OOF_COLUMNS)
        for i in range(len(lesions)):
            w.writerow([lesions.subjects[i], lesions.sessions[i] or "n/a", int(lesions.lesion_ids[i]),
                        int(lesions.labels[i]), int(fold[i]), f"{probability[i]:.6f}", int(vote[i]),
                        f"{vote_fraction[i]:.4f}", f"{spread[i]:.6f}"])
    return Path(path)
