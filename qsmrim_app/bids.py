"""Input discovery: PyBIDS queries -> one frozen ParticipantInputs per participant/session.

The raw dataset and every derivatives dataset (``<bids_dir>/derivatives/*`` and ``-d`` paths,
our own output excluded) are indexed as separate read-only layouts, so a QSMxT output folder
without ``dataset_description.json`` needs no synthesized description and nothing is ever
written into the input. Problems are per unit: one InputProblem per problem, that unit skipped,
the others go on. Only headers are read, except the QSM (NaN and unit checks), masks (emptiness)
and a streaming gzip integrity check of the other compressed images.
"""
from __future__ import annotations

import fnmatch
import gzip
import json
import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import nibabel as nib
import numpy as np

from .config import AppConfig
from .qsm import guess_units

LOGGER = logging.getLogger("qsmrim.bids")

GRID_ATOL_MM = 1e-3
NIFTI_EXTENSIONS = [".nii", ".nii.gz"]
# Folders of a raw dataset that the BIDS validator does not check.
_UNVALIDATED_TOP = {"derivatives", "sourcedata", "code", "stimuli", "models", "phenotype"}
# Our legacy lesion-mask spelling is not in current BIDS but this app supports it.
_LEGACY_ROI = re.compile(r"^/sub-[A-Za-z0-9]+/(ses-[A-Za-z0-9]+/)?anat/sub-[A-Za-z0-9]+"
                         r"(_ses-[A-Za-z0-9]+)?(_[a-z]+-[A-Za-z0-9]+)*_label-lesion_roi\.nii(\.gz)?$")

# Per input kind: candidate queries, most preferred first, and for masks their kind.
_QSM_QUERIES: list[dict[str, Any]] = [{"suffix": "Chimap"}]
_FLAIR_QUERIES: list[dict[str, Any]] = [{"suffix": "FLAIR"}]
_MAGNITUDE_QUERIES: list[dict[str, Any]] = [
    {"suffix": "T2starw", "part": "mag"},
    {"suffix": "MEGRE", "part": "mag", "echo": 1},
    {"suffix": "GRE"},
    {"suffix": "T2starw"},
]
# Lesion files, most preferred first. What a file holds (instances, binary, probability, LST-AI's
# annotated classes) is read from its name (see _mask_kind), since a filter may change the suffix.
_MASK_QUERIES: list[dict[str, Any]] = [
    {"suffix": "dseg", "desc": "lesion"},
    {"suffix": "mask", "desc": "lesion"},
    {"suffix": "mask", "label": "lesion", "desc": "<Query.NONE>"},  # LST-AI's BIDS wrapper
    {"suffix": "probseg", "label": "lesion"},
    {"suffix": "roi", "label": "lesion"},
    {"suffix": "mask", "label": "lesion", "desc": "annotated"},  # the wrapper's annotated mask
]
# LST-AI's own outputs, untouched: bare names in <root>/sub-<label>[/ses-<label>]/ (its --output
# folder), its probability map from the --temp folder beside them or in temp/. Most preferred first:
# the probability map (the binary mask is that map thresholded at 0.5; the split works best on it).
LSTAI_FILES: tuple[tuple[str, str], ...] = (
    ("sub-X_ses-Y_space-FLAIR_seg-lst_prob.nii.gz", "probability"),
    ("temp/sub-X_ses-Y_space-FLAIR_seg-lst_prob.nii.gz", "probability"),
    ("space-flair_seg-lst.nii.gz", "binary"),
    ("space-orig_seg-lst.nii.gz", "binary"),
    ("space-flair_desc-annotated_seg-lst.nii.gz", "annotated"),
    ("space-orig_desc-annotated_seg-lst.nii.gz", "annotated"),
)
_RIM_QUERIES: list[dict[str, Any]] = [{"suffix": "dseg", "desc": "rim"}]


@dataclass(frozen=True)
class Grid:
    """A voxel grid from a NIfTI header: shape, affine (as nested tuples, hashable) and voxel size."""

    shape: tuple[int, ...]
    affine: tuple[tuple[float, ...], ...]
    zooms: tuple[float, ...]

    @classmethod
    def from_image(cls, img: nib.spatialimages.SpatialImage) -> "Grid":
        return cls(
            shape=tuple(int(n) for n in img.shape),
            affine=tuple(tuple(float(v) for v in row) for row in np.asarray(img.affine)),
            zooms=tuple(float(z) for z in img.header.get_zooms()[:3]),
        )

    @property
    def affine_array(self) -> np.ndarray:
        return np.array(self.affine, dtype=float)

    def matches(self, other: "Grid", atol: float = GRID_ATOL_MM) -> bool:
        """Same shape and affine within ``atol`` (mm): the same voxels in the same place."""
        return self.shape[:3] == other.shape[:3] and bool(
            np.allclose(self.affine_array, other.affine_array, atol=atol)
        )

    def describe(self) -> str:
        origin = ", ".join(f"{v:.2f}" for v in self.affine_array[:3, 3])
        return (f"shape {'x'.join(map(str, self.shape))}, voxel {'x'.join(f'{z:.3g}' for z in self.zooms)} mm, "
                f"origin ({origin})")


@dataclass(frozen=True)
class ParticipantInputs:
    """Everything the participant workflow reads for one participant/session, checked."""

    subject: str
    session: str | None
    qsm: Path
    flair: Path
    magnitude: Path | None
    lesion_mask: Path
    lesion_mask_kind: str  # 'instances' | 'binary' | 'probability' | 'annotated' (lesion_split.MASK_KINDS)
    lesion_mask_space: str  # 'FLAIR' | 'QSM'
    rim_labels: Path | None
    rim_labels_space: str | None  # 'FLAIR' | 'QSM' | None
    qsm_units: str  # 'ppm' | 'ppb'
    qsm_grid: Grid
    flair_grid: Grid
    notes: tuple[str, ...] = ()  # warnings worth showing in the report (unit doubts, magnitude skipped)

    @property
    def name(self) -> str:
        """``sub-X[_ses-Y]``: the BIDS prefix of this unit's outputs and log lines."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")


@dataclass(frozen=True)
class InputProblem:
    """Why one participant/session cannot be processed: one line naming the file and the fix."""

    subject: str
    session: str | None
    file: Path | None
    message: str
    missing: bool = False  # True: nothing matched (selection), False: a file is unusable

    def __str__(self) -> str:
        unit = f"sub-{self.subject}" + (f" ses-{self.session}" if self.session else "")
        where = f" {self.file}:" if self.file else ""
        return f"{unit}:{where} {self.message}"


class SelectionError(Exception):
    """The selection as a whole is wrong (unknown labels) or empty; not a per-participant problem."""

    def __init__(self, message: str, no_data: bool = False) -> None:
        super().__init__(message)
        self.no_data = no_data


# --------------------------------------------------------------------------------------------
# BIDS validation of the raw dataset
# --------------------------------------------------------------------------------------------
def _bidsignore_patterns(bids_dir: Path) -> list[str]:
    path = bids_dir / ".bidsignore"
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _ignored(rel: str, patterns: Sequence[str]) -> bool:
    """gitignore-like matching of ``/a/b/c`` against .bidsignore patterns (as the validator does)."""
    parts = rel.strip("/").split("/")
    for pattern in patterns:
        pat = pattern.rstrip("/")
        if "/" in pat.lstrip("/"):
            anchored = pat.lstrip("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch.fnmatch(p, anchored) for p in prefixes):
                return True
        elif any(fnmatch.fnmatch(part, pat) for part in parts):
            return True
    return False


def validate_dataset(bids_dir: Path) -> list[str]:
    """Check the raw dataset with bids-validator's Python rules; returns one line per offence.

    Derivatives, sourcedata, code and hidden files are not checked (as the BIDS validator does);
    ``.bidsignore`` is honoured.
    """
    from bids_validator import BIDSValidator

    errors: list[str] = []
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        errors.append(f"{description}: missing; create it with at least "
                      '{"Name": "...", "BIDSVersion": "1.9.0"}')
    else:
        try:
            content = json.loads(description.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            errors.append(f"{description}: not valid JSON ({err})")
        else:
            absent = [key for key in ("Name", "BIDSVersion") if not isinstance(content, dict) or key not in content]
            if absent:
                errors.append(f"{description}: required field(s) {', '.join(absent)} missing")
    if not any(p.is_dir() and p.name.startswith("sub-") for p in bids_dir.iterdir()):
        errors.append(f"{bids_dir}: no sub-<label> folders")

    validator = BIDSValidator()
    patterns = _bidsignore_patterns(bids_dir)
    for path in sorted(bids_dir.rglob("*")):
        rel_parts = path.relative_to(bids_dir).parts
        if rel_parts[0] in _UNVALIDATED_TOP or any(part.startswith(".") for part in rel_parts):
            continue
        if path.is_dir():
            continue
        rel = "/" + "/".join(rel_parts)
        if _ignored(rel, patterns) or _LEGACY_ROI.match(rel):
            continue
        if not validator.is_bids(rel):
            errors.append(f"{path}: not a valid BIDS file name or location")
    return errors


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------
@dataclass
class _Dataset:
    """One indexed dataset: its scope names (for ``"scope"`` in filters) and its PyBIDS layout."""

    root: Path
    scopes: frozenset[str]
    layout: Any = field(repr=False)


def _dataset_scopes(root: Path, raw: bool) -> frozenset[str]:
    if raw:
        return frozenset({"raw", "all"})
    names = {"derivatives", "all", root.name}
    description = root / "dataset_description.json"
    if description.is_file():
        try:
            content = json.loads(description.read_text())
            for generator in content.get("GeneratedBy", []) or []:
                if isinstance(generator, dict) and generator.get("Name"):
                    names.add(str(generator["Name"]))
            if content.get("PipelineDescription", {}).get("Name"):
                names.add(str(content["PipelineDescription"]["Name"]))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            LOGGER.warning("%s: unreadable, ignored for scope names", description)
    return frozenset(names)


def _has_subjects(path: Path) -> bool:
    return any(p.is_dir() and p.name.startswith("sub-") for p in path.iterdir())


def derivative_roots(config: AppConfig) -> list[Path]:
    """Derivatives datasets to search: ``<bids_dir>/derivatives/*`` and ``-d`` paths.

    Our own output and work folders are never inputs. A ``-d`` folder without ``sub-*`` folders
    but with pipelines inside (a whole ``derivatives/`` folder) is expanded one level.
    """
    excluded = [config.output_dir.resolve(), config.work_dir.resolve()]

    def usable(path: Path) -> bool:
        path = path.resolve()
        return path.is_dir() and not any(path == ex or ex in path.parents or path in ex.parents
                                         for ex in excluded)

    roots: list[Path] = []
    inside = config.bids_dir / "derivatives"
    if inside.is_dir():
        roots += [p for p in sorted(inside.iterdir()) if not p.name.startswith(".") and usable(p)]
    for path in config.derivatives:
        if not path.is_dir():
            LOGGER.warning("derivatives path %s is not a folder; ignored", path)
            continue
        if _has_subjects(path):
            candidates = [path]
        else:
            candidates = [p for p in sorted(path.iterdir()) if p.is_dir() and _has_subjects(p)]
            if not candidates:
                LOGGER.warning("derivatives path %s holds no sub-* folders; ignored", path)
        roots += [p for p in candidates if usable(p)]
    unique: dict[Path, None] = {}
    for root in roots:
        unique.setdefault(root.resolve(), None)
    return list(unique)


def _derivative_ignore() -> list:
    """PyBIDS' default ignores plus ``sub-*/[ses-*/]temp/``: LST-AI's BIDS wrapper keeps its
    intermediates there under BIDS-like names (a FLAIR, a T1w, MNI-space masks) that are not inputs."""
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    return [*DEFAULT_LOCATIONS_TO_IGNORE, re.compile(r"^/sub-[^/]+/(ses-[^/]+/)?temp(/|$)")]


def _index(config: AppConfig) -> list[_Dataset]:
    """Read-only PyBIDS layouts: raw first, then each derivatives dataset."""
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    datasets = [_Dataset(config.bids_dir, _dataset_scopes(config.bids_dir, True),
                         BIDSLayout(config.bids_dir, validate=False, config=["bids", "derivatives"]))]
    for root in derivative_roots(config):
        layout = BIDSLayout(root, validate=False, config=["bids", "derivatives"],
                            indexer=BIDSLayoutIndexer(validate=False, ignore=_derivative_ignore()))
        datasets.append(_Dataset(root, _dataset_scopes(root, False), layout))
        LOGGER.debug("indexed derivatives dataset %s", root)
    return datasets


# --------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------
def _to_query_values(value: Any) -> Any:
    """fMRIPrep's filter spelling: "<Query.ANY>"/"<Query.NONE>" strings and null -> PyBIDS Query."""
    from bids.layout import Query

    if isinstance(value, list):
        return [_to_query_values(v) for v in value]
    if value is None or value == "<Query.NONE>":
        return Query.NONE
    if value == "<Query.ANY>":
        return Query.ANY
    return value


def _find(datasets: Sequence[_Dataset], base: dict[str, Any], user: dict[str, Any],
          subject: str, session: str | None) -> list[Path]:
    """Files of one candidate query (user filter overriding our defaults), across datasets."""
    from bids.layout import Query

    query = {k: _to_query_values(v) for k, v in base.items()}
    query.update({k: _to_query_values(v) for k, v in user.items() if k != "scope"})
    query["subject"] = subject
    query["session"] = session if session is not None else Query.NONE
    query.setdefault("extension", NIFTI_EXTENSIONS)
    scope = user.get("scope")
    scopes = set(scope if isinstance(scope, list) else [scope]) if scope else None
    found: dict[Path, None] = {}
    for dataset in datasets:
        if scopes is not None and not scopes & dataset.scopes:
            continue
        for bids_file in dataset.layout.get(**query):
            found.setdefault(Path(bids_file.path), None)
    return list(found)


def _mask_kind(path: Path) -> str:
    """What a lesion file holds, from its name: a ``dseg`` is instances, a ``probseg`` probabilities."""
    name = path.name
    for kind, suffixes in (("instances", ("_dseg",)), ("probability", ("_probseg", "_seg-lst_prob"))):
        if any(name.split(".")[0].endswith(suffix) for suffix in suffixes):
            return kind
    return "annotated" if "desc-annotated" in name else "binary"


def find_lstai(datasets: Sequence[_Dataset], user: dict[str, Any], subject: str,
               session: str | None) -> tuple[Path, str] | None:
    """LST-AI's bare outputs in ``<root>/sub-<label>[/ses-<label>]/``, participant and session taken
    from the folder names (PyBIDS cannot: the names carry neither). Only ``scope`` of a
    ``lesion_mask`` filter applies to them; any other key asks for a BIDS-named file."""
    if set(user) - {"scope"}:
        return None
    scope = user.get("scope")
    scopes = set(scope if isinstance(scope, list) else [scope]) if scope else None
    for dataset in datasets[1:]:
        if scopes is not None and not scopes & dataset.scopes:
            continue
        folder = dataset.root / f"sub-{subject}"
        if session is not None:
            folder = folder / f"ses-{session}"
        for name, kind in LSTAI_FILES:
            if (folder / name).is_file():
                return folder / name, kind
    return None


def _unique(paths: list[Path], what: str, subject: str, session: str | None,
            problems: list[InputProblem]) -> Path | None:
    if len(paths) == 1:
        return paths[0]
    listing = ", ".join(str(p) for p in paths)
    problems.append(InputProblem(subject, session, None,
                                 f"several {what} files match ({listing}); choose one with a "
                                 f"'{_kind_key(what)}' query in --bids-filter-file "
                                 "(e.g. run, acquisition or scope)"))
    return None


def _kind_key(what: str) -> str:
    return {"QSM": "qsm", "FLAIR": "flair", "magnitude": "magnitude", "lesion mask": "lesion_mask",
            "rim annotation": "rim_labels"}[what]


# --------------------------------------------------------------------------------------------
# File checks
# --------------------------------------------------------------------------------------------
def _data_intact(path: Path, img: nib.Nifti1Image) -> str | None:
    """Is the whole image on disk? Streams a .gz (CRC checked by gzip) without building arrays.

    Catches corrupt and truncated files whose header still reads, for images we only need the
    header of now (FLAIR, magnitude) but the workflow will load later.
    """
    header = img.header
    offset = int(getattr(img.dataobj, "offset", header.get_data_offset()))  # the proxy knows the real one
    expected = offset + int(np.prod(img.shape)) * header.get_data_dtype().itemsize
    if path.name.endswith(".gz"):
        size = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    size += len(chunk)
        except (OSError, EOFError, zlib.error) as err:
            return f"unreadable gzip ({err}); re-export or re-compress this file"
    else:
        size = path.stat().st_size
    if size < expected:
        return f"image data truncated ({size} of {expected} bytes); re-export this file"
    return None


def _header(path: Path) -> tuple[nib.Nifti1Image | None, str | None]:
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises many types for broken files
        return None, f"cannot be read as NIfTI ({err}); re-export this file"
    if len(img.shape) != 3:
        return None, (f"is {len(img.shape)}D with shape {img.shape}; qsmrim needs one 3D volume "
                      "(extract it, e.g. the first echo or volume)")
    return img, None


def _load_data(img: nib.Nifti1Image) -> tuple[np.ndarray | None, str | None]:
    try:
        return np.asanyarray(img.dataobj), None
    except Exception as err:
        return None, f"image data unreadable ({err}); re-export or re-compress this file"


def _qsm_units(path: Path, cli_units: str | None) -> str:
    """CLI override, else the sidecar's Units (ppm/ppb), else BIDS' ppm for Chimap."""
    if cli_units:
        return cli_units
    sidecar = Path(re.sub(r"\.nii(\.gz)?$", ".json", str(path)))
    if sidecar.is_file():
        try:
            units = str(json.loads(sidecar.read_text()).get("Units", "")).lower()
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            units = ""
        if units in ("ppm", "ppb"):
            return units
    return "ppm"


def unit_doubt(data: np.ndarray, units: str) -> str | None:
    """A warning when the map's robust value range contradicts the declared unit, else None."""
    guessed = guess_units(data)
    if guessed is None or guessed == units:
        return None
    return (f"values look like {guessed} (robust range) but the map is taken as {units}; "
            f"if it is in {guessed} pass --qsm-units {guessed}")


def _space(grid: Grid, flair: Grid | None, qsm: Grid | None) -> str | None:
    """'FLAIR' or 'QSM' by grid (FLAIR first: masks are drawn on FLAIR), None when neither."""
    if flair is not None and grid.matches(flair):
        return "FLAIR"
    if qsm is not None and grid.matches(qsm):
        return "QSM"
    return None


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------
def _units_of_work(config: AppConfig, datasets: Sequence[_Dataset]) -> list[tuple[str, str | None]]:
    """(subject, session) pairs selected by the labels; raises SelectionError when none/unknown."""
    raw = datasets[0].layout
    subjects = set(raw.get_subjects())
    for dataset in datasets[1:]:  # participants with a QSM only in a derivatives dataset count too
        subjects |= set(dataset.layout.get_subjects(suffix="Chimap"))
    if config.participant_labels:
        unknown = [label for label in config.participant_labels if label not in subjects]
        if unknown:
            existing = ", ".join(sorted(subjects)) or "none"
            raise SelectionError(f"participant label(s) {', '.join(unknown)} not found in "
                                 f"{config.bids_dir}; existing participants: {existing}")
        selected = list(config.participant_labels)
    else:
        selected = sorted(subjects)
    if not selected:
        raise SelectionError(f"{config.bids_dir} holds no participants (sub-* folders)", no_data=True)

    units: list[tuple[str, str | None]] = []
    all_sessions: set[str] = set()
    for subject in selected:
        sessions: set[str] = set()
        for dataset in datasets:
            sessions |= set(dataset.layout.get_sessions(subject=subject))
        all_sessions |= sessions
        if not sessions:
            if not config.session_labels:
                units.append((subject, None))
            continue
        chosen = sorted(sessions & set(config.session_labels)) if config.session_labels else sorted(sessions)
        units += [(subject, session) for session in chosen]
    if not units:
        existing = ", ".join(sorted(all_sessions)) or "none"
        raise SelectionError(f"session label(s) {', '.join(config.session_labels)} match no session of "
                             f"the selected participants; existing sessions: {existing}", no_data=True)
    return units


@dataclass
class _UnitSearch:
    """One unit's input search: each input found and checked in turn, every problem and note kept."""

    config: AppConfig
    datasets: Sequence[_Dataset]
    subject: str
    session: str | None
    problems: list[InputProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, file: Path | None, message: str, missing: bool = False) -> None:
        self.problems.append(InputProblem(self.subject, self.session, file, message, missing))

    def first_match(self, queries: Iterable[dict[str, Any]], kind: str,
                    within: Sequence[_Dataset] | None = None) -> list[Path]:
        for query in queries:
            paths = _find(self.datasets if within is None else within, query,
                          self.config.bids_filters.get(kind, {}), self.subject, self.session)
            if paths:
                return paths
        return []

    def unique(self, paths: list[Path], what: str) -> Path | None:
        return _unique(paths, what, self.subject, self.session, self.problems)

    @property
    def filter_hint(self) -> str:
        return " (with the --bids-filter-file query)" if self.config.bids_filters else ""

    def qsm(self) -> tuple[Path | None, Grid | None, str]:
        """The primary input; its data loaded for NaN and unit checks. (path, grid, units)"""
        qsm_paths = self.first_match(_QSM_QUERIES, "qsm")
        qsm_path = self.unique(qsm_paths, "QSM") if qsm_paths else None
        units = self.config.preproc.qsm_units or "ppm"
        if not qsm_paths:
            self.problem(None, f"no QSM (*_Chimap.nii[.gz]) found{self.filter_hint} in the dataset or its "
                               "derivatives; add one or point -d at the QSM pipeline's output", missing=True)
        if qsm_path is None:
            return None, None, units
        img, error = _header(qsm_path)
        data = None
        if not error:
            data, error = _load_data(img)
        if not error and (not np.isfinite(data).any() or not np.any(data[np.isfinite(data)])):
            error = "holds no finite non-zero value (all NaN or zero); re-run the QSM reconstruction"
        if error:
            self.problem(qsm_path, error)
            return qsm_path, None, units
        units = _qsm_units(qsm_path, self.config.preproc.qsm_units)
        doubt = unit_doubt(np.asarray(data, dtype=np.float32), units)
        if doubt:
            LOGGER.warning("sub-%s%s: %s: %s", self.subject, f" ses-{self.session}" if self.session else "",
                           qsm_path, doubt)
            self.notes.append(f"{qsm_path.name}: {doubt}")
        return qsm_path, Grid.from_image(img), units

    def flair(self) -> tuple[Path | None, Grid | None]:
        """Header plus a gzip integrity check. (path, grid)"""
        flair_paths = self.first_match(_FLAIR_QUERIES, "flair")
        flair_path = self.unique(flair_paths, "FLAIR") if flair_paths else None
        if not flair_paths:
            self.problem(None, f"no FLAIR (*_FLAIR.nii[.gz]) found{self.filter_hint}; qsmrim needs a FLAIR "
                               "image of this participant/session", missing=True)
        if flair_path is None:
            return None, None
        img, error = _header(flair_path)
        error = error or _data_intact(flair_path, img)
        if error:
            self.problem(flair_path, error)
            return flair_path, None
        return flair_path, Grid.from_image(img)

    def magnitude(self, qsm_grid: Grid | None) -> Path | None:
        """Optional: only one in the QSM's grid is used."""
        if qsm_grid is None:
            return None
        for path in self.first_match(_MAGNITUDE_QUERIES, "magnitude"):
            img, error = _header(path)
            error = error or _data_intact(path, img)
            if error:
                self.notes.append(f"magnitude {path.name} not used: {error}")
            elif not Grid.from_image(img).matches(qsm_grid):
                self.notes.append(f"magnitude {path.name} not used: its grid differs from the QSM's")
            else:
                return path
        return None

    def lesion_mask(self, flair_grid: Grid | None, qsm_grid: Grid | None) -> tuple[Path | None, str, str | None]:
        """Instances (dseg) preferred over binary masks, then probability maps, then LST-AI's bare outputs
        (docs/inputs.md lists every pattern). (path, kind, space)"""
        lesion_mask, mask_kind = None, "binary"
        mask_filter = self.config.bids_filters.get("lesion_mask", {})
        for query in _MASK_QUERIES:
            paths = _find(self.datasets, query, mask_filter, self.subject, self.session)
            if paths:
                lesion_mask = self.unique(paths, "lesion mask")
                mask_kind = _mask_kind(lesion_mask) if lesion_mask is not None else "binary"
                break
        else:
            lstai = find_lstai(self.datasets, mask_filter, self.subject, self.session)
            if lstai is not None:
                lesion_mask, mask_kind = lstai
            else:
                self.problem(None, f"no lesion mask found{self.filter_hint} (derivatives *_desc-lesion_dseg, "
                                   "*_desc-lesion_mask, *_label-lesion_mask, *_label-lesion_probseg, LST-AI's "
                                   "space-flair_seg-lst.nii.gz in sub-<label>[/ses-<label>]/ or raw "
                                   "*_label-lesion_roi); add one or point -d at it", missing=True)
        if lesion_mask is None:
            return None, mask_kind, None
        mask_space, mask_kind = _check_lesion_file(lesion_mask, mask_kind, flair_grid, qsm_grid, self.problem,
                                                   self.notes)
        return lesion_mask, mask_kind, mask_space

    def rim_labels(self, rim_datasets: Sequence[_Dataset] | None, flair_grid: Grid | None, qsm_grid: Grid | None
                   ) -> tuple[Path | None, str | None]:
        """Optional; when present they must be usable. --rim-annotations: that dataset alone, so a review
        folder never competes with other desc-rim_dseg. (path, space)"""
        rim_paths = self.first_match(_RIM_QUERIES, "rim_labels", rim_datasets)
        rim_labels = self.unique(rim_paths, "rim annotation") if rim_paths else None
        if rim_labels is None:
            return None, None
        return rim_labels, _check_label_image(rim_labels, "rim annotation", flair_grid, qsm_grid, self.problem,
                                              allowed={0, 1, 2}, allow_empty=True)


def _discover_one(config: AppConfig, datasets: Sequence[_Dataset], subject: str, session: str | None,
                  rim_datasets: Sequence[_Dataset] | None = None
                  ) -> tuple[ParticipantInputs | None, list[InputProblem]]:
    """Find and check every input of one unit; every problem found is reported, not just the first."""
    search = _UnitSearch(config, datasets, subject, session)
    qsm_path, qsm_grid, qsm_units = search.qsm()
    flair_path, flair_grid = search.flair()
    magnitude = search.magnitude(qsm_grid)
    lesion_mask, mask_kind, mask_space = search.lesion_mask(flair_grid, qsm_grid)
    rim_labels, rim_space = search.rim_labels(rim_datasets, flair_grid, qsm_grid)
    problems = search.problems
    if problems or any(v is None for v in (qsm_path, flair_path, lesion_mask, qsm_grid, flair_grid, mask_space)):
        return None, problems
    if rim_labels is not None and rim_space is None:
        return None, problems
    return ParticipantInputs(
        subject=subject, session=session, qsm=qsm_path, flair=flair_path, magnitude=magnitude,
        lesion_mask=lesion_mask, lesion_mask_kind=mask_kind, lesion_mask_space=mask_space,
        rim_labels=rim_labels, rim_labels_space=rim_space, qsm_units=qsm_units,
        qsm_grid=qsm_grid, flair_grid=flair_grid, notes=tuple(search.notes),
    ), problems


def _check_lesion_file(path: Path, kind: str, flair_grid: Grid | None, qsm_grid: Grid | None, problem: Any,
                       notes: list[str]) -> tuple[str | None, str]:
    """A lesion file's space and kind: probability maps (and soft 0-1 masks, read as probability
    with a notice) need values in 0..1, the others non-negative integers."""
    if kind != "probability":
        img, error = _header(path)
        data, error = (None, error) if error else _load_data(img)
        if data is not None and np.all(np.isfinite(data)):
            values = np.unique(data)
            soft = values.size and values.min() >= 0 and values.max() <= 1 and np.any(values != np.round(values))
            if soft and kind == "binary":
                note = (f"lesion mask {path.name} has values between 0 and 1: read as a lesion probability map "
                        "(lesion where >= --lesion-threshold)")
                LOGGER.warning("%s", note)
                notes.append(note)
                kind = "probability"
        if kind != "probability":
            return _check_label_image(path, "lesion mask", flair_grid, qsm_grid, problem, allow_empty=True), kind
    return _check_label_image(path, "lesion probability map", flair_grid, qsm_grid, problem, allow_empty=True,
                              probability=True), kind


def _check_label_image(path: Path, what: str, flair_grid: Grid | None, qsm_grid: Grid | None,
                       problem: Any, allowed: set[int] | None = None, allow_empty: bool = False,
                       probability: bool = False) -> str | None:
    """Readable, 3D, non-negative integer labels (within ``allowed``; with ``probability`` values in
    0..1), not empty, on the FLAIR or QSM grid; returns the space or None (the problem reported)."""
    img, error = _header(path)
    if error:
        problem(path, error)
        return None
    data, error = _load_data(img)
    if error:
        problem(path, error)
        return None
    if not np.any(np.nan_to_num(data) > 0):
        if not allow_empty:
            problem(path, f"{what} is empty (no voxel > 0); check that it belongs to this participant")
            return None
        # A participant without lesions is a valid result (zero lesions, zero rim+), not an error.
        LOGGER.warning("%s %s is empty: no lesions to classify for this participant", what, path)
    values = np.unique(data)
    if probability:
        finite = values[np.isfinite(values)]
        if finite.size and (finite.min() < 0 or finite.max() > 1):
            problem(path, f"{what} holds values from {finite.min():g} to {finite.max():g}; expected "
                          "probabilities in 0..1")
            return None
    elif not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values != np.round(values)):
        problem(path, f"{what} holds values other than non-negative integers (a probability map?); "
                      "threshold it into a 0/1 mask or label map")
        return None
    if allowed is not None and not set(values.astype(int).tolist()) <= allowed:
        extra = sorted(set(values.astype(int).tolist()) - allowed)
        problem(path, f"{what} holds labels {extra}; expected only {sorted(allowed)} "
                      "(0 background, 1 rim- lesion, 2 rim+ lesion)")
        return None
    if flair_grid is None or qsm_grid is None:
        return None  # the space cannot be decided; the FLAIR's or QSM's own problem is reported
    grid = Grid.from_image(img)
    space = _space(grid, flair_grid, qsm_grid)
    if space is None:
        grids = "; ".join(f"{name}: {g.describe()}" for name, g in (("FLAIR", flair_grid), ("QSM", qsm_grid))
                          if g is not None)
        problem(path, f"{what} grid ({grid.describe()}) matches neither the FLAIR nor the QSM grid "
                      f"({grids}); resample it onto one of them")
    return space


def discover(config: AppConfig) -> tuple[list[ParticipantInputs], list[InputProblem]]:
    """All units of work (participant x session) with their checked inputs, and the problems.

    Raises SelectionError for unknown participant labels or a selection without any unit.
    """
    datasets = _index(config)
    rim_datasets = None
    if config.rim_annotations is not None:
        from bids import BIDSLayout

        root = Path(config.rim_annotations)
        rim_datasets = [_Dataset(root, _dataset_scopes(root, False),
                                 BIDSLayout(root, validate=False, config=["bids", "derivatives"]))]
    inputs: list[ParticipantInputs] = []
    problems: list[InputProblem] = []
    for subject, session in _units_of_work(config, datasets):
        found, unit_problems = _discover_one(config, datasets, subject, session, rim_datasets)
        problems += unit_problems
        if found is not None:
            inputs.append(found)
    if config.rim_annotations is not None:
        LOGGER.info("rim annotations from %s: %d of %d unit(s) have one", config.rim_annotations,
                    sum(1 for found in inputs if found.rim_labels is not None), len(inputs))
    return inputs, problems


# --------------------------------------------------------------------------------------------
# participants.tsv
# --------------------------------------------------------------------------------------------
def participants_column(bids_dir: Path, column: str) -> dict[str, str]:
    """``participant_id -> value`` of one participants.tsv column (``n/a`` and empty cells left out).

    Why: ``group --train --cv-group-by site`` keeps each site's participants in one fold, so the model's
    out-of-fold predictions, calibration and operating points are those of a site it did not see.
    """
    import pandas as pd

    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        raise SelectionError(f"{path} does not exist; --cv-group-by reads a column of it")
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if "participant_id" not in table.columns:
        raise SelectionError(f"{path} has no participant_id column")
    if column not in table.columns:
        raise SelectionError(f"{path} has no column {column!r} (columns: {', '.join(table.columns)})")
    values = table.set_index("participant_id")[column].str.strip()
    return {str(k): str(v) for k, v in values.items() if v not in ("", "n/a")}
