"""``group --recalibrate --rim-annotations REVIEW_DIR``: a site's calibration and operating points from its rater.

After a rater has reviewed some of a site's lesions in ``qsmrim-review``, the model's probabilities are
re-mapped for that site: a Platt map (slope and intercept on the logit) over the model's own calibration,
fitted on the reviewed lesions (majority of the raters; unsure and tied lesions left out), and the F1 and
high-sensitivity thresholds chosen on the reviewed lesions' re-mapped probabilities. The network weights do not change. The result is a new model
directory ``OUT/models/<model-id>-site-<hash>/`` (the original's weights copied, model.json with the new
``calibration`` and ``thresholds``, ``recalibration.json`` with what it was fitted on) that
``participant --model`` takes.

It reads only the participant outputs (``*_desc-rim_lesions.tsv``: the model's raw probability) and the
review dataset's decisions tables; nothing is recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .. import derivatives as drv
from ..config import AppConfig

LOGGER = logging.getLogger("qsmrim")
#: Fewest reviewed lesions of each class a site map is fitted on (see docs/calibration.md for the measurement).
MIN_RIMPLUS = 5
MIN_RIMMINUS = 5
#: Strength of the Gaussian prior of the site map towards the model's own map (calibration.fit_site_map).
PRIOR = 1.0


class RecalibrationError(Exception):
    """A site recalibration that cannot be done as asked (a usage error: exit 64)."""


def reviewed_labels(review_dir: Path) -> pd.DataFrame:
    """Every reviewed lesion of a qsmrim-review dataset with its majority label (1 rim+, 0 rim-).

    Lesions whose raters are unsure or tied are left out, as ``group --train`` leaves them out.
    """
    from ..review.store import majority

    rows = []
    for path in sorted(Path(review_dir).glob("sub-*/**/sub-*_decisions.tsv")):
        match = drv._UNIT_RE.match(path.name)
        if not match:
            continue
        unit = drv.Unit(match["sub"], match["ses"])
        if drv.review_path(review_dir, unit, "rim_decisions") != path:
            continue
        table = drv.read_tsv(path)
        for lesion_id, group in table.groupby("lesion_id"):
            value = majority(group["decision"].astype(str))
            if value == 0:
                continue
            rows.append({"participant_id": unit.participant_id, "session": unit.session or "n/a",
                         "lesion_id": int(lesion_id), "label": int(value == 2),
                         "raters": ",".join(sorted(set(group["rater"].astype(str))))})
    return pd.DataFrame(rows, columns=["participant_id", "session", "lesion_id", "label", "raters"])


def site_lesions(output_dir: Path) -> pd.DataFrame:
    """Every classified lesion of the outputs: raw and reported probability and the model that made them."""
    frames = []
    summaries = drv.find_units(output_dir, "summary")
    for unit, path in sorted(drv.find_units(output_dir, "rim_lesions").items(), key=lambda kv: kv[1]):
        table = drv.read_tsv(path)
        raw = table["probability_raw"] if "probability_raw" in table.columns else pd.Series(np.nan, index=table.index)
        model_id = drv.read_tsv(summaries[unit])["model_id"].iloc[0] if unit in summaries else None
        frames.append(pd.DataFrame({"participant_id": unit.participant_id, "session": unit.session or "n/a",
                                    "lesion_id": table["lesion_id"].astype(int), "probability": table["probability"],
                                    "probability_raw": raw, "model_id": model_id}))
    if not frames:
        return pd.DataFrame(columns=["participant_id", "session", "lesion_id", "probability", "probability_raw",
                                     "model_id"])
    return pd.concat(frames, ignore_index=True)


def run_recalibration(config: AppConfig) -> int:
    """Fit the site map and thresholds and write the site's model directory; see the module docstring."""
    from ..model.calibration import CalibrationMap, expected_operating_points, fit_site_map
    from ..model.metrics import f1_optimal_threshold, high_sensitivity_threshold
    from ..model.predict import MODEL_JSON

    model_dir = Path(config.inference.model_dir)
    meta = json.loads((model_dir / MODEL_JSON).read_text())
    base = CalibrationMap.from_dict(meta.get("calibration"))
    lesions = site_lesions(config.output_dir)
    if lesions.empty:
        raise RecalibrationError(f"no classified lesions (*_desc-rim_lesions.tsv) under {config.output_dir}: run the "
                                 "participant level with the model first")
    used = sorted({str(m) for m in lesions["model_id"].dropna()})
    if used != [str(meta["model_id"])]:
        raise RecalibrationError(f"the outputs were classified with model(s) {', '.join(used) or 'unknown'}, not "
                                 f"{meta['model_id']} ({model_dir}); give the model they were classified with "
                                 "(--model) or rerun the participant level with it")
    if lesions["probability_raw"].isna().any():
        if not base.is_identity:
            raise RecalibrationError("the outputs have no probability_raw column (made by an older qsmrim); rerun "
                                     "the participant level")
        lesions["probability_raw"] = lesions["probability"]
    labels = reviewed_labels(config.rim_annotations)
    reviewed = lesions.merge(labels, on=["participant_id", "session", "lesion_id"], how="inner")
    n_pos, n_neg = int(reviewed["label"].sum()), int((reviewed["label"] == 0).sum())
    if n_pos < MIN_RIMPLUS or n_neg < MIN_RIMMINUS:
        raise RecalibrationError(
            f"recalibration needs at least {MIN_RIMPLUS} reviewed rim+ and {MIN_RIMMINUS} reviewed rim- lesions "
            f"(majority of raters, unsure and ties left out); {config.rim_annotations} has {n_pos} rim+ and {n_neg} "
            f"rim- among the lesions of {config.output_dir}: review more in qsmrim-review")

    y, raw = reviewed["label"].to_numpy(int), reviewed["probability_raw"].to_numpy(float)
    digest = hashlib.sha1(str(meta["model_id"]).encode())
    digest.update(reviewed[["participant_id", "session", "lesion_id", "label"]].to_csv(index=False).encode())
    site_id = f"{meta['model_id']}-site-{digest.hexdigest()[:8]}"
    fitted_on = {"source": "reviewed lesions of a site (qsmrim-review decisions, majority of raters)",
                 "review_dir": str(config.rim_annotations), "site_model_id": site_id}
    site_map = fit_site_map(base, y, raw, prior=PRIOR, fitted_on=fitted_on)
    reviewed_p = site_map.apply(raw)
    # The operating points are the F1 / high-sensitivity optima of the reviewed lesions under the site map. The
    # alternative (the points the map implies for all the site's lesions) is recorded, not used: fitted on the
    # queue's most probable lesions the map extrapolates badly below them, and it needed 80 queue reviews where
    # this rule needed 60 (benchmarks/results/recalibration.json, docs/calibration.md).
    thresholds = {"f1": below_point(f1_optimal_threshold(y, reviewed_p), reviewed_p),
                  "high-sensitivity": below_point(high_sensitivity_threshold(y, reviewed_p), reviewed_p)}
    implied = expected_operating_points(site_map.apply(lesions["probability_raw"].to_numpy(float)))
    out = Path(config.output_dir) / "models" / site_id
    write_site_model(model_dir, meta, out, site_id, site_map.to_dict(), thresholds)
    before = base.apply(raw)
    record = {
        "site_model_id": site_id, "model_id": meta["model_id"], "model_dir": str(model_dir.resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "review_dir": str(config.rim_annotations), "output_dir": str(config.output_dir),
        "minimum": {"rim_positive": MIN_RIMPLUS, "rim_negative": MIN_RIMMINUS},
        "reviewed": {"lesions": int(y.size), "rim_positive": n_pos, "rim_negative": n_neg,
                     "participants": sorted(set(reviewed["participant_id"])),
                     "raters": sorted({r for rs in reviewed["raters"] for r in rs.split(",")})},
        "site_lesions": int(len(lesions)),
        "calibration": site_map.to_dict(),
        "thresholds": thresholds, "thresholds_before": meta.get("thresholds", {}),
        "threshold_rule": "F1-optimal / highest threshold with sensitivity <= 0.95 on the reviewed lesions under the "
                          "site map, moved halfway down to the next reviewed probability (below_point)",
        "thresholds_implied_for_all_site_lesions": implied,
        "reviewed_mean_probability": {"before": float(before.mean()), "after": float(site_map.apply(raw).mean()),
                                      "observed_rim_positive_fraction": float(y.mean())},
        "lesions": reviewed[["participant_id", "session", "lesion_id", "label", "raters"]].to_dict("records"),
    }
    drv.write_json(out / "recalibration.json", record)
    LOGGER.info("site recalibration on %d reviewed lesions (%d rim+) of %d participants: %s; thresholds f1 %.3f, "
                "high-sensitivity %.3f (were %.3f, %.3f)", y.size, n_pos, len(record["reviewed"]["participants"]),
                site_map.describe(), thresholds["f1"], thresholds["high-sensitivity"],
                float(meta["thresholds"]["f1"]), float(meta["thresholds"]["high-sensitivity"]))
    LOGGER.info("site model: %s; classify with it: qsmrim %s %s participant --model %s", out, config.bids_dir,
                config.output_dir, out)
    return 0


#: Below the lowest reviewed probability: a margin far above the tables' 6-decimal rounding of raw probabilities.
ROUNDING_MARGIN = 1e-4


def below_point(threshold: float, p: np.ndarray) -> float:
    """The threshold moved halfway down to the next reviewed probability below it.

    Why: an optimum sits exactly on a reviewed lesion's probability, fitted here from the tables' rounded raw
    probabilities; the participant level recomputes that lesion's probability from the unrounded float32 one,
    which may land a hair below and flip its call. Halfway to the next point calls the same reviewed lesions
    and leaves a margin of whole probability steps instead of a rounding error."""
    lower = p[p < threshold]
    if lower.size:
        return float((threshold + lower.max()) / 2)
    return float(max(threshold - ROUNDING_MARGIN, 0.0))  # nothing below: a margin far above the rounding


def write_site_model(model_dir: Path, meta: dict, out: Path, site_id: str, calibration: dict,
                     thresholds: dict[str, float]) -> Path:
    """A model directory of the site's own: the original's member weights (and a fusion's component
    model.json files) copied, model.json updated."""
    from ..model.predict import MODEL_JSON

    out.mkdir(parents=True, exist_ok=True)
    # a fusion's components keep their own model.json (fine-tuning starts each network from its namesake)
    component_files = [f"components/{m}/{name}" for m in meta.get("components") or {}
                       for name in ("model.json", "oof_predictions.tsv")
                       if (Path(model_dir) / "components" / m / name).is_file()]
    for rel in [member["weights"] for member in meta["members"]] + component_files:
        src, dst = Path(model_dir) / rel, out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    new = {**meta, "model_id": site_id, "calibration": calibration, "thresholds": dict(thresholds),
           "thresholds_model": dict(meta.get("thresholds", {})),
           "recalibrated_from": {"model_id": meta["model_id"], "model_dir": str(Path(model_dir).resolve()),
                                 "record": "recalibration.json"}}
    drv.write_json(out / MODEL_JSON, new)
    return out
