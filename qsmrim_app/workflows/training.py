"""``group --train``: all participants' annotated lesions -> cross-validated models and the paper's metrics.

The participant level must have run with rim annotations present (``*_desc-annotations_lesions.tsv``).
This module turns those derivatives into a :class:`~qsmrim_app.model.data.LesionSet` (the only
BIDS-aware step) and hands it to ``model/``.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .. import derivatives as drv
from ..config import AppConfig
from ..model.inputs import is_feature_column
from ..derivatives import find_units
from ..patches import load_patches

LOGGER = logging.getLogger("qsmrim")


def collect_lesion_set(output_dir: Path):
    """Every annotated lesion of every unit: patches, 527 features, expert label, participant."""
    from ..model.data import LesionSet, concat

    annotations = find_units(output_dir, "annotations")
    radiomics = find_units(output_dir, "radiomics")
    patches = find_units(output_dir, "patches")
    sets = []
    undecided = 0  # lesions of annotated units without a rim label (not reviewed, unsure, raters tied)
    for unit in sorted(annotations, key=lambda u: (u.subject, u.session or "")):
        if unit not in radiomics or unit not in patches:
            LOGGER.warning("%s: annotations without features/patches; rerun its participant level", unit.prefix)
            continue
        labels = drv.read_tsv(annotations[unit]).set_index("lesion_id")["rim_positive"]
        table = drv.read_tsv(radiomics[unit])
        patchset = load_patches(patches[unit])
        if list(patchset.lesion_ids) != table["lesion_id"].tolist():
            raise RuntimeError(f"{patches[unit]} and {radiomics[unit]} list different lesions; rerun {unit.prefix}")
        label = table["lesion_id"].map(labels)
        keep = label.notna().to_numpy()
        undecided += int((~keep).sum())
        if not keep.any():
            continue
        names = [c for c in table.columns if is_feature_column(c)]
        sets.append(LesionSet(
            patches=patchset.patches[keep], features=table.loc[keep, names].to_numpy(np.float32),
            feature_names=names, labels=label[keep].to_numpy(np.int64),
            # Sessions of one participant share a subject id, so folds never split a participant.
            subjects=np.full(int(keep.sum()), unit.participant_id), lesion_ids=table.loc[keep, "lesion_id"].to_numpy(),
            voxel_size_mm=patchset.voxel_size_mm, extent_mm=np.asarray(patchset.grid.extent_mm),
            reference=patchset.reference[keep], sessions=np.full(int(keep.sum()), unit.session or "")))
    decided = sum(len(part) for part in sets)
    LOGGER.info("%d lesion(s) with a rim decision used for training; %d without one (not reviewed, unsure "
                "or raters tied) left out", decided, undecided)
    if not sets:
        return None
    return concat(sets)


def with_fold_groups(lesions, training, bids_dir: Path, column: str):
    """The lesion set with each participant's ``column`` value as its fold group, and the folds it allows.

    Every participant needs a value; fewer values than ``--folds`` make one fold per value (leave one
    site out), a single value is refused (there is no site to leave out).
    """
    from ..bids import SelectionError, participants_column

    values = participants_column(bids_dir, column)
    missing = sorted({s for s in lesions.subjects if s not in values})
    if missing:
        raise SelectionError(f"{Path(bids_dir) / 'participants.tsv'}: column {column!r} has no value for "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; fill it in for "
                             "every participant with annotated lesions (--cv-group-by)")
    groups = np.array([values[s] for s in lesions.subjects])
    n_groups = np.unique(groups).size
    if n_groups < 2:
        raise SelectionError(f"--cv-group-by {column}: every participant has the value {groups[0]!r}; "
                             "the folds need at least two groups")
    folds = min(training.folds, n_groups)
    LOGGER.info("folds keep each %s whole: %d values, %d folds%s", column, n_groups, folds,
                " (one per value: leave one out)" if folds == n_groups else "")
    return replace(lesions, groups=groups), replace(training, folds=folds, fold_groups_by=column)


def train_from_derivatives(config: AppConfig) -> int:
    from ..model.evaluation import write_evaluation
    from ..model.methods import select_features
    from ..model.modeldir import model_id
    from ..model.train import estimate_training_seconds, train

    lesions = collect_lesion_set(config.output_dir)
    if lesions is None:
        LOGGER.error("no annotated lesions under %s: run the participant level with rim annotations "
                     "(*_desc-rim_dseg in a derivatives dataset) before `group --train`", config.output_dir)
        return 1
    summary = lesions.summary()
    LOGGER.info("training on %d lesions (%d rim+) of %d participants", summary["lesions"],
                summary.get("rim_positive", 0), summary["subjects"])
    methods = list(config.train_methods)
    primary = methods[0]
    base = replace(config.training, device=config.device)
    if config.cv_group_by:
        lesions, base = with_fold_groups(lesions, base, config.bids_dir, config.cv_group_by)
    # Same lesions + same configuration -> same directory, so rerunning the command resumes its training.
    model_dir = Path(config.output_dir) / "models" / model_id(primary, base.to_dict() | {"methods": methods}, lesions)
    results: dict[str, pd.DataFrame] = {}
    done: dict[str, Path] = {}  # method -> its directory, for a fusion to reuse its components
    effective = {k: getattr(base, k) for k in ("protocol", "epochs", "max_steps", "folds", "seeds",
                                                 "width_multiplier", "stem_stride", "wide", "batch_size",
                                                 "learning_rate", "input_level", "feature_set",
                                                 "patch_extent_mm", "patch_spacing_mm")}
    LOGGER.info("training protocol %s: %s", base.protocol, ", ".join(f"{k}={v}" for k, v in effective.items()))
    for method in methods:
        target = model_dir if method == primary else model_dir / "comparators" / method
        cfg = replace(base, method=method)
        features = select_features(lesions, cfg)  # once per method and run, from this run's configuration
        estimate = estimate_training_seconds(cfg, len(lesions), len(features.names))
        if estimate["seconds"]:
            LOGGER.info("method %s: estimated %.1f min on %s (%d members x %d steps at %.2f s/step)", method,
                        estimate["seconds"] / 60, estimate["device"], estimate["members"],
                        estimate["steps_per_member"], estimate["seconds_per_step"])
            if estimate["device"] == "cpu" and estimate["seconds"] > 3600 and base.protocol == "paper":
                LOGGER.warning("the paper protocol takes hours on a CPU; `--protocol fast` is our CPU recipe "
                               "(about 5 min for ~1,200 lesions on 2 cores)")
        LOGGER.info("method %s -> %s", method, target)
        train(lesions, cfg, target, features=features, model_id=model_dir.name if method == primary else None,
              trained={m: d for m, d in done.items() if m != primary})
        done[method] = target
        results[method] = drv.read_tsv(target / "oof_predictions.tsv")
    metrics = write_evaluation(results, model_dir, title=f"qsmrim cross-validation ({', '.join(methods)})")
    LOGGER.info("model: %s; metrics: %s", model_dir, model_dir / "metrics.json")
    for method, values in metrics.items():
        LOGGER.info("%s: pROC AUC (FPR<0.1) %.3f, PR AUC %.3f, F1 %.3f, count r %.3f", method,
                    values.get("pauc_fpr_0.1", float("nan")), values.get("pr_auc", float("nan")),
                    values.get("f1", float("nan")), values.get("count_pearson_r", float("nan")))
    return 0
