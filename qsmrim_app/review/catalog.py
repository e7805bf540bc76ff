"""What there is to review: every classified lesion of an output directory, and where its images are.

Everything comes from the participant-level derivatives: the rim table (probability, uncertainty,
geometry), the lesion instances, the FLAIR in QSM space, and the QSM map that the lesion dseg's
sidecar names as its ``SpatialReference`` (a ``bids:raw:`` URI into the raw dataset, or a path into a
derivatives dataset). Thresholds come from the model the summary names (its ``model_id``).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd

from .. import derivatives as drv
from ..config import BUNDLED_MODEL_DIR, ReviewConfig
from ..workflows.group import find_units

LOGGER = logging.getLogger("qsmrim.review")
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


class CatalogError(Exception):
    """The output directory cannot be reviewed as it is; the message names the file and the fix."""


@dataclass(frozen=True)
class ReviewUnit:
    """One participant/session with classified lesions and the images the page shows."""

    unit: drv.Unit
    rim_table: Path
    lesions_dseg: Path
    flair: Path | None  # the space-QSM preprocessed FLAIR (None: not in the outputs)
    patches: Path | None
    qsm: Path | None  # the QSM map the pipeline read (None: not found, see qsm_problem)
    qsm_problem: str | None
    model_id: str
    model_dir: Path
    threshold: float  # the review threshold of the operating point

    @property
    def participant(self) -> str:
        return self.unit.participant_id


@dataclass
class Catalog:
    """All reviewable units and the queue of their lesions, most probably rim+ first."""

    units: dict[drv.Unit, ReviewUnit]
    lesions: pd.DataFrame  # one row per lesion, queue order
    operating_point: str
    models: dict[str, Path]  # model_id -> model directory
    #: (subject, session, lesion_id) -> its lesion track (group level's desc-rimtracks table), when there is one
    tracks: dict[tuple[str, str, int], "Track"] = field(default_factory=dict)

    def unit(self, participant: str, session: str | None) -> ReviewUnit | None:
        return self.units.get(drv.Unit(participant, session))

    def row(self, unit: drv.Unit, lesion_id: int) -> pd.Series | None:
        rows = self.lesions[(self.lesions["subject"] == unit.subject)
                            & (self.lesions["session"] == (unit.session or ""))
                            & (self.lesions["lesion_id"] == lesion_id)]
        return None if rows.empty else rows.iloc[0]


def parse_label(value: object, prefix: str) -> str | None:
    """A participant/session label from the URL or a JSON body, with or without its prefix.

    Returns None for an invalid label; only letters and digits pass, so nothing that reaches a
    file name can climb out of the output or review directory.
    """
    if not isinstance(value, str):
        return None
    value = value[len(prefix):] if value.startswith(prefix) else value
    return value if _LABEL_RE.match(value) else None


def default_review_dir(output_dir: Path, bids_dir: Path | None) -> Path:
    """``<output>-review`` beside the output dir, or beside the raw dataset when the output is inside it."""
    output_dir = output_dir.resolve()
    name = f"{output_dir.name}-review"
    if bids_dir is not None:
        bids_dir = bids_dir.resolve()
        if bids_dir in output_dir.parents:
            return bids_dir.parent / name
    return output_dir.parent / name


def raw_dataset_of(output_dir: Path) -> Path | None:
    """The raw dataset recorded in the outputs' dataset_description.json (DatasetLinks, SourceDatasets)."""
    path = Path(output_dir) / "dataset_description.json"
    try:
        description = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    uris = [(description.get("DatasetLinks") or {}).get("raw")]
    uris += [entry.get("URL") for entry in description.get("SourceDatasets") or [] if isinstance(entry, dict)]
    for uri in uris:
        if isinstance(uri, str) and uri.startswith("file:"):
            return Path(unquote(urlparse(uri).path))
    return None


def _sidecar(path: Path) -> dict:
    try:
        return json.loads(drv.sidecar_path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def resolve_source(reference: str, bids_dir: Path | None) -> Path | None:
    """A sidecar's source (``bids:raw:sub-01/anat/...`` or a plain path) as a file on this machine."""
    if reference.startswith("bids:raw:"):
        return None if bids_dir is None else Path(bids_dir) / reference[len("bids:raw:"):]
    if reference.startswith("bids:"):
        return None
    return Path(reference)


def _qsm_of(lesions_dseg: Path, bids_dir: Path | None) -> tuple[Path | None, str | None]:
    reference = _sidecar(lesions_dseg).get("SpatialReference")
    if not isinstance(reference, str):
        return None, f"{drv.sidecar_path(lesions_dseg)} names no SpatialReference (the QSM map); rerun its participant level"
    path = resolve_source(reference, bids_dir)
    if path is None:
        return None, (f"the QSM map {reference} is in the raw dataset, which the outputs do not locate; "
                      "pass --bids-dir")
    if not path.is_file():
        return None, f"the QSM map {path} does not exist (moved?); pass --bids-dir with the raw dataset"
    return path, None


def _logged_model_dirs(output_dir: Path) -> list[Path]:
    """Model directories named in the participant-level run logs, newest first."""
    found: list[Path] = []
    for log in sorted((Path(output_dir) / "logs").glob("*.json"), reverse=True):
        try:
            record = json.loads(log.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        model_dir = ((record.get("config") or {}).get("inference") or {}).get("model_dir")
        if isinstance(model_dir, str) and Path(model_dir) not in found:
            found.append(Path(model_dir))
    return found


def _read_model(model_dir: Path) -> dict | None:
    try:
        return json.loads((Path(model_dir) / "model.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def find_models(config: ReviewConfig) -> dict[str, tuple[Path, dict]]:
    """model_id -> (directory, model.json) of every model that may have classified these outputs."""
    if config.model_dir is not None:
        candidates = [config.model_dir]
    else:
        candidates = [*_logged_model_dirs(config.output_dir), BUNDLED_MODEL_DIR,
                      *sorted(p.parent for p in (config.output_dir / "models").glob("*/model.json"))]
    models: dict[str, tuple[Path, dict]] = {}
    for directory in candidates:
        meta = _read_model(directory)
        if meta is not None and "model_id" in meta:
            models.setdefault(str(meta["model_id"]), (Path(directory), meta))
    return models


def _threshold(meta: dict, operating_point: str, model_dir: Path) -> float:
    thresholds = meta.get("thresholds") or {}
    if operating_point not in thresholds:
        raise CatalogError(f"model {model_dir} has no {operating_point!r} threshold (it has "
                           f"{sorted(thresholds)}); choose one with --operating-point")
    return float(thresholds[operating_point])


@dataclass(frozen=True)
class Track:
    """One lesion track over a participant's sessions: its id, status and lesion ids per session."""

    subject: str
    track_id: int
    status: str
    lesions: tuple[tuple[str, tuple[int, ...]], ...]  # (session, lesion ids) in session order


def read_tracks(output_dir: Path) -> dict[tuple[str, str, int], Track]:
    """Every lesion that belongs to a track of the group level's ``*_desc-rimtracks_lesions.tsv``."""
    out: dict[tuple[str, str, int], Track] = {}
    for folder in sorted(Path(output_dir).glob("sub-*")):
        path = drv.tracks_path(output_dir, drv.Unit(folder.name[4:]))
        if not folder.is_dir() or not path.is_file():
            continue
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        columns = [c for c in table.columns if c.startswith("lesion_id_ses-")]
        for row in table.to_dict("records"):
            lesions = tuple((c[len("lesion_id_ses-"):], tuple(int(i) for i in row[c].split("+")))
                            for c in columns if row[c] not in ("", "n/a"))
            track = Track(folder.name[4:], int(row["track_id"]), row.get("status", "n/a"), lesions)
            for session, ids in lesions:
                for lid in ids:
                    out[(track.subject, session, lid)] = track
    return out


def build_catalog(config: ReviewConfig) -> Catalog:
    """Read every classified unit of ``config.output_dir``; raises CatalogError with the fix."""
    output_dir = config.output_dir
    tables = find_units(output_dir, "rim_lesions")
    if not tables:
        raise CatalogError(f"no classified lesions (*_desc-rim_lesions.tsv) under {output_dir}: run the "
                           "participant level with a model first (qsmrim BIDS_DIR OUTPUT_DIR participant)")
    bids_dir = config.bids_dir or raw_dataset_of(output_dir)
    models = find_models(config)
    if config.model_dir is not None and not models:
        raise CatalogError(f"--model {config.model_dir} holds no readable model.json")
    override = next(iter(models.items())) if config.model_dir is not None else None

    units: dict[drv.Unit, ReviewUnit] = {}
    frames = []
    for unit, table_path in sorted(tables.items(), key=lambda kv: (kv[0].subject, kv[0].session or "")):
        dseg = drv.output_path(output_dir, unit, "lesions_dseg")
        if not dseg.is_file():
            raise CatalogError(f"{unit.prefix}: {dseg} is missing; rerun its participant level")
        summary_path = drv.output_path(output_dir, unit, "summary")
        summary = drv.read_tsv(summary_path) if summary_path.is_file() else pd.DataFrame()
        model_id = str(summary["model_id"].iloc[0]) if "model_id" in summary and len(summary) else ""
        if override is not None:
            model_id_used, (model_dir, meta) = override
            if model_id and model_id != model_id_used:
                LOGGER.warning("%s was classified by model %s; thresholds of --model %s (%s) are used",
                               unit.prefix, model_id, model_dir, model_id_used)
        elif model_id in models:
            model_dir, meta = models[model_id]
        else:
            raise CatalogError(f"{unit.prefix} was classified by model {model_id or '(unknown)'}, which is "
                               f"neither the bundled model nor in {output_dir}/logs or {output_dir}/models; "
                               "pass --model with that model's directory")
        threshold = _threshold(meta, config.operating_point, model_dir)
        qsm, problem = _qsm_of(dseg, bids_dir)
        if problem:
            LOGGER.warning("%s: %s (the QSM views will say so)", unit.prefix, problem)
        flair = drv.output_path(output_dir, unit, "flair_preproc")
        patches = drv.output_path(output_dir, unit, "patches")
        units[unit] = ReviewUnit(unit, table_path, dseg, flair if flair.is_file() else None,
                                 patches if patches.is_file() else None, qsm, problem,
                                 str(meta.get("model_id", model_id)), Path(model_dir), threshold)
        table = drv.read_tsv(table_path)
        table.insert(0, "session", unit.session or "")  # "" when none
        table.insert(0, "subject", unit.subject)
        table["threshold_review"] = threshold
        frames.append(table)
    lesions = pd.concat(frames, ignore_index=True)
    lesions["lesion_id"] = lesions["lesion_id"].astype(int)
    lesions["above"] = lesions["probability"] >= lesions["threshold_review"]
    # The review set (at or above its model's threshold) first, each part most probable first.
    lesions = lesions.sort_values(["above", "probability", "subject", "session", "lesion_id"],
                                  ascending=[False, False, True, True, True], na_position="last")
    lesions = lesions.reset_index(drop=True)
    return Catalog(units=units, lesions=lesions, operating_point=config.operating_point,
                   models={ru.model_id: ru.model_dir for ru in units.values()}, tracks=read_tracks(output_dir))


def field_of_view_mm(volume_mm3: float) -> float:
    """Default field of view: the lesion (its equivalent-sphere diameter) four times over, at least 30 mm,
    so the rim and the surrounding tissue are in view."""
    diameter = (6.0 * max(float(volume_mm3), 0.0) / math.pi) ** (1.0 / 3.0)
    return max(30.0, 4.0 * diameter)
