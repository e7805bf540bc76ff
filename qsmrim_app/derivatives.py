"""Every output file of the app: BIDS-derivative names, sidecars and atomic writes.

One place builds every output path, so names stay consistent between the participant level that
writes them, the group level and the reports that read them. Every write goes through a temporary
file in the target folder plus ``os.replace``: a killed job never leaves a half-written file, and
several participant jobs of an HPC array can share one output folder.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np
import pandas as pd

from . import __version__, atomic
from .atomic import atomic_path, remove_stale_temporaries, write_text

APP_NAME = "qsmrim"
CODE_URL = "https://github.com/qsmrim/qsmrim"
BIDS_VERSION = "1.9.0"


@dataclass(frozen=True)
class Unit:
    """One unit of participant-level work: a subject, optionally one session of it."""

    subject: str
    session: str | None = None

    @property
    def prefix(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def participant_id(self) -> str:
        return f"sub-{self.subject}"

    def folder(self, root: Path, datatype: str = "anat") -> Path:
        path = Path(root) / f"sub-{self.subject}"
        if self.session:
            path = path / f"ses-{self.session}"
        return path / datatype


def bids_name(unit: Unit, suffix: str, extension: str, *, space: str | None = None,
              label: str | None = None, desc: str | None = None, **entities: str) -> str:
    """File name with entities in the order BIDS derivatives prescribe."""
    parts = [unit.prefix]
    for key, value in entities.items():  # e.g. from/to/mode for transforms
        parts.append(f"{key.rstrip('_')}-{value}")
    if space:
        parts.append(f"space-{space}")
    if label:
        parts.append(f"label-{label}")
    if desc:
        parts.append(f"desc-{desc}")
    return "_".join(parts) + f"_{suffix}{extension}"


# The outputs, by role. Each entry: (suffix, extension, entities).
OUTPUTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "flair_preproc": ("FLAIR", ".nii.gz", {"space": "QSM", "desc": "preproc"}),
    "qsm_ppb": ("Chimap", ".nii.gz", {"space": "QSM", "desc": "ppb"}),
    "xfm_flair_to_qsm": ("xfm", ".txt", {"from_": "FLAIR", "to": "QSM", "mode": "image"}),
    "lesions_dseg": ("dseg", ".nii.gz", {"space": "QSM", "desc": "lesions"}),
    "lesions_dseg_tsv": ("dseg", ".tsv", {"space": "QSM", "desc": "lesions"}),
    "radiomics": ("lesions", ".tsv", {"space": "QSM", "desc": "radiomics"}),
    "patches": ("lesions", ".npz", {"space": "QSM", "desc": "patches"}),
    "annotations": ("lesions", ".tsv", {"space": "QSM", "desc": "annotations"}),
    "rimplus_mask": ("mask", ".nii.gz", {"space": "QSM", "desc": "rimplus"}),
    "rimplus_probseg": ("probseg", ".nii.gz", {"space": "QSM", "label": "rimplus"}),
    "rim_lesions": ("lesions", ".tsv", {"space": "QSM", "desc": "rim"}),
    "summary": ("summary", ".tsv", {"desc": "rim"}),
}


def output_path(root: Path, unit: Unit, role: str) -> Path:
    """Where the output of ``role`` (a key of OUTPUTS) lives for ``unit``."""
    suffix, extension, entities = OUTPUTS[role]
    entities = dict(entities)
    named = {k: entities.pop(k) for k in ("space", "label", "desc") if k in entities}
    return unit.folder(root) / bids_name(unit, suffix, extension, **entities, **named)


def sidecar_path(path: Path) -> Path:
    name = path.name
    for ext in (".nii.gz", ".nii", ".tsv", ".npz", ".txt", ".h5"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_suffix(".json")


def report_path(root: Path, unit: Unit) -> Path:
    return Path(root) / f"{unit.prefix}.html"


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------
# One helper for every atomic write (qsmrim_app/atomic.py); re-exported here for the writers below.
_HOST = atomic.HOST


def write_json(path: Path, data: Mapping) -> Path:
    """Strict JSON: NaN/Inf (an undefined correlation, say) are written as null."""
    return write_text(path, json.dumps(_finite(data), indent=2, sort_keys=False, default=_json_default,
                                       allow_nan=False) + "\n")


def _finite(value):
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


def write_tsv(path: Path, table: pd.DataFrame, fsync: bool = False) -> Path:
    """``fsync``: on disk before returning (the review store acknowledges a decision only then)."""
    with atomic_path(path, fsync) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.10g")
    return Path(path)


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, dtype=None,
                header: nib.Nifti1Header | None = None, fsync: bool = False) -> Path:
    array = np.asarray(data if dtype is None else np.asarray(data).astype(dtype))
    image = nib.Nifti1Image(array, affine, header=header)
    image.header.set_data_dtype(array.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path, fsync) as tmp:
        nib.save(image, tmp)
    return Path(path)


def copy_file(src: Path, dst: Path) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


# ---------------------------------------------------------------------------------------------
# Sidecars and dataset-level files
# ---------------------------------------------------------------------------------------------
def bids_uri(path: Path | str, bids_dir: Path | None) -> str:
    """``bids:raw:sub-01/anat/...`` for inputs inside the raw dataset, else the plain path."""
    path = Path(path)
    if bids_dir is not None:
        try:
            return "bids:raw:" + path.resolve().relative_to(Path(bids_dir).resolve()).as_posix()
        except ValueError:
            pass
    return str(path)


def write_with_sidecar(role_path: Path, writer, *, sources: Sequence[str],
                       metadata: Mapping | None = None) -> Path:
    """Write an output through ``writer(path)`` and its JSON sidecar with ``Sources``."""
    writer(role_path)
    meta = {"Sources": list(sources)}
    if metadata:
        meta.update(metadata)
    write_json(sidecar_path(role_path), meta)
    return role_path


def generated_by(container: str | None = None) -> list[dict]:
    """``container``: the image the app runs in (``docker://name:tag``; the command line reads it from
    the environment the image sets, cli/common.CONTAINER_ENV), recorded so outputs name their image."""
    entry = {"Name": APP_NAME, "Version": __version__, "CodeURL": CODE_URL}
    if container:
        kind, _, tag = container.partition("://")
        entry["Container"] = {"Type": kind or "docker", "Tag": tag or container}
    return [entry]


def dataset_description(bids_dir: Path | None, container: str | None = None) -> dict:
    description = {
        "Name": "qsmrim: rim+ lesion detection on QSM",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": generated_by(container),
        "HowToAcknowledge": "Cite QSMRim-Net (Zhang et al., NeuroImage: Clinical 2022) and qsmrim; see CITATION.md.",
    }
    if bids_dir is not None:
        description["SourceDatasets"] = [{"URL": Path(bids_dir).resolve().as_uri()}]
        description["DatasetLinks"] = {"raw": Path(bids_dir).resolve().as_uri()}
    return description


BIDSIGNORE = "\n".join([
    "*_lesions.tsv", "*_lesions.json", "*_lesions.npz", "*_summary.tsv", "*_summary.json",
    "*.html", "logs/", "models/", "group_*", "figures/", "CITATION.md", "",
])

CITATION = """# Citing qsmrim

If you use qsmrim, please cite the method it implements and the libraries it builds on:

- Zhang H, Nguyen TD, Zhang J, et al. QSMRim-Net: Imbalance-aware learning for identification of chronic
  active lesions with paramagnetic rim on quantitative susceptibility maps. NeuroImage: Clinical 2022;34:102979.
- van Griethuysen JJM, et al. Computational Radiomics System to Decode the Radiographic Phenotype
  (pyradiomics). Cancer Research 2017;77(21):e104-e107.
- Gorgolewski K, et al. Nipype: a flexible, lightweight and extensible neuroimaging data processing
  framework in Python. Front. Neuroinform. 2011;5:13.
- Yoo TS, Lowekamp BC, et al. SimpleITK / the Insight Toolkit (N4: Tustison NJ, et al. IEEE TMI 2010;29:1310).
- Yarkoni T, et al. PyBIDS: Python tools for BIDS datasets. JOSS 2019;4(40):1294.
- Paszke A, et al. PyTorch: an imperative style, high-performance deep learning library. NeurIPS 2019.
- Pedregosa F, et al. Scikit-learn: machine learning in Python. JMLR 2011;12:2825-2830.
"""


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    write_text(path, text)


def init_output_dir(output_dir: Path, bids_dir: Path | None, container: str | None = None) -> None:
    """Dataset-level files; safe when many participant jobs start at once (same content, atomic)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    description = json.dumps(dataset_description(bids_dir, container), indent=2) + "\n"
    _write_if_changed(output_dir / "dataset_description.json", description)
    _write_if_changed(output_dir / ".bidsignore", BIDSIGNORE)
    _write_if_changed(output_dir / "CITATION.md", CITATION)


def versions() -> dict[str, str]:
    """Versions of what produced the outputs, for logs, sidecars and the model card."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"qsmrim": __version__, "python": platform.python_version()}
    for dist in ("numpy", "scipy", "nibabel", "nipype", "pybids", "SimpleITK", "pyradiomics-bhklab",
                 "PyWavelets", "torch", "scikit-learn"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


def write_run_log(output_dir: Path, level: str, command_line: Sequence[str], config: Mapping,
                  label: str | None = None) -> Path:
    """``logs/`` entry with the command line, configuration and versions of this run."""
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%S")
    name = f"{label or level}_{stamp}_{os.getpid()}.json"
    return write_json(Path(output_dir) / "logs" / name, {
        "level": level,
        "command_line": list(command_line),
        "config": config,
        "versions": versions(),
        "started": stamp,
        "started_at": now.isoformat(),  # microseconds: orders several runs started within one second
        "host": platform.node(),
        "status": "running",
    })


#: How a unit's run can end: published, failed (a step or an unusable input), skipped (an input missing).
UNIT_STATUSES = ("done", "failed", "skipped")


def finish_run_log(path: Path, status: str, error: str | None = None, file: Path | str | None = None,
                   extra: Mapping | None = None) -> Path:
    """Record how a unit's run ended in its ``logs/`` entry: ``status``, the one-line ``reason`` (also as
    ``error`` when it failed), the ``file`` it names (the input at fault or the crash report) and ``extra``
    fields (e.g. the registration gate's verdict)."""
    if status not in UNIT_STATUSES:
        raise ValueError(f"unit status {status!r} is not one of {UNIT_STATUSES}")
    record = json.loads(Path(path).read_text())
    record.update({"status": status, "finished_at": datetime.now(timezone.utc).isoformat()})
    if error:
        record["reason"] = error
        if status == "failed":
            record["error"] = error
    if status != "done":
        record["file"] = str(file) if file else None
    if extra:
        record.update(extra)
    return write_json(path, record)


def write_unit_log(output_dir: Path, label: str, command_line: Sequence[str], config: Mapping, status: str,
                   reason: str, file: Path | str | None = None) -> Path:
    """A unit that never reached the workflow (refused for its inputs) still gets its ``logs/`` record."""
    path = write_run_log(output_dir, "participant", command_line, config, label=label)
    return finish_run_log(path, status, reason, file)


def config_record(config: Any) -> dict:
    """The run's AppConfig as JSON-ready values, for the ``logs/`` records."""
    record = asdict(config)
    record["preproc"].pop("radiomics", None)  # the parameters themselves: radiomics_params names their file
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in record.items()}


def registration_gate(sidecar: Path) -> dict | None:
    """``{"verdict", "value_mm", "threshold_mm", "target"}`` from a transform's sidecar; None when absent
    (outputs of a version without the gate)."""
    try:
        record = json.loads(Path(sidecar).read_text())
    except (OSError, ValueError):
        return None
    if "RegistrationGate" not in record:
        return None
    value = record.get("RegistrationGateValueMM")
    return {"verdict": record["RegistrationGate"], "value_mm": float("nan") if value is None else float(value),
            "threshold_mm": float(record["RegistrationGateThresholdMM"]),
            "target": record.get("RegistrationTarget", "n/a")}


_LOG_RE = re.compile(r"^(?P<prefix>sub-[A-Za-z0-9]+(?:_ses-[A-Za-z0-9]+)?)_\d{8}T\d{6}_\d+\.json$")


def latest_unit_logs(output_dir: Path) -> dict[str, dict]:
    """The newest finished participant-level log record per unit prefix (``sub-01[_ses-1]``).

    Records still ``running`` belong to runs that were killed or are in progress, and say nothing
    about the outputs: they are skipped.
    """
    latest: dict[str, dict] = {}
    for path in sorted((Path(output_dir) / "logs").glob("sub-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("level") != "participant" or record.get("status") not in UNIT_STATUSES:
            continue
        match = _LOG_RE.match(path.name)  # <prefix>_<YYYYmmddTHHMMSS>_<pid>.json
        if not match:
            continue
        prefix = match["prefix"]
        key = record.get("finished_at", "")
        if prefix not in latest or key >= latest[prefix].get("finished_at", ""):
            latest[prefix] = {**record, "log_file": str(path)}
    return latest


# ---------------------------------------------------------------------------------------------
# Finding outputs, staging and publishing a unit's outputs all at once
# ---------------------------------------------------------------------------------------------
_UNIT_RE = re.compile(r"^sub-(?P<sub>[a-zA-Z0-9]+)(?:_ses-(?P<ses>[a-zA-Z0-9]+))?_")


def find_units(output_dir: Path, role: str) -> dict[Unit, Path]:
    """Units that have the output ``role``, found by its BIDS name under ``sub-*/[ses-*/]anat``."""
    suffix, extension, _ = OUTPUTS[role]
    found: dict[Unit, Path] = {}
    for path in sorted(Path(output_dir).glob(f"sub-*/**/sub-*_{suffix}{extension}")):
        match = _UNIT_RE.match(path.name)
        if not match:
            continue
        unit = Unit(match["sub"], match["ses"])
        if output_path(output_dir, unit, role) == path:
            found[unit] = path
    return found


def staging_root(work_dir: Path) -> Path:
    """Where a unit's derivatives are assembled (a mirror of the output tree) before publishing."""
    return Path(work_dir) / "staging"


def unit_files(root: Path, unit: Unit) -> list[Path]:
    """Every file of ``unit`` under an output (or staging) root: its folder's files and its report."""
    folder = unit.folder(root)
    files = [p for p in folder.glob(f"{unit.prefix}_*") if p.is_file() and not p.name.startswith(".")] \
        if folder.is_dir() else []
    report = report_path(root, unit)
    return sorted(files + ([report] if report.is_file() else []))


#: Published last, in this order: the group level takes a unit with a summary (or, without
#: classification, a radiomics table) as complete, so these must not appear before the rest.
COMPLETION_ROLES: tuple[str, ...] = ("radiomics", "summary")


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on a directory (flock on its descriptor): no lock file is left behind."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _place(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` a copy of ``src`` (a hard link when both are on one file system)."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed: copy instead
            shutil.copyfile(src, tmp)


def publish_unit(staging: Path, output_dir: Path, unit: Unit, files: Sequence[Path]) -> list[Path]:
    """Replace ``unit``'s outputs in ``output_dir`` by ``files`` (and their sidecars), staged under ``staging``.

    Called only after every node of the unit succeeded, so a failed unit never reaches the output
    dir and a unit that was complete before keeps its old outputs. The completion files (summary,
    radiomics table, each with its sidecar) are removed first and written last, and files of an
    earlier run that the new run did not produce are removed: if the process is killed part way,
    the unit is incomplete in the group level's eyes and a rerun publishes it again from the cache.
    """
    staging, output_dir = Path(staging), Path(output_dir)
    staged = [Path(f) for f in files]
    staged += [sidecar_path(f) for f in staged if f.suffix != ".json" and sidecar_path(f).is_file()]
    new = {p.relative_to(staging): p for p in sorted(set(staged))}
    if not new:
        raise FileNotFoundError(f"nothing staged for {unit.prefix} under {staging}")
    markers = [output_path(Path("."), unit, role) for role in COMPLETION_ROLES]
    markers += [sidecar_path(m) for m in markers]
    last = [rel for rel in markers if rel in new]
    output_dir.mkdir(parents=True, exist_ok=True)
    with _locked(output_dir):
        for rel in markers:
            (output_dir / rel).unlink(missing_ok=True)
        for rel, src in new.items():
            if rel not in last:
                _place(src, output_dir / rel)
        for old in unit_files(output_dir, unit):
            if old.relative_to(output_dir) not in new:
                old.unlink()
        for rel in last:
            _place(new[rel], output_dir / rel)
    return [output_dir / rel for rel in new]


# ---------------------------------------------------------------------------------------------
# Data dictionaries for the TSV outputs (the JSON sidecars describe every column)
# ---------------------------------------------------------------------------------------------
GEOMETRY_DICTIONARY = {
    "lesion_id": {"Description": "Lesion instance: its value in the space-QSM desc-lesions dseg image"},
    "voxels": {"Description": "Number of QSM-grid voxels in the lesion"},
    "volume_mm3": {"Description": "Lesion volume", "Units": "mm^3"},
    "centroid_x_mm": {"Description": "Lesion centre of mass, world x (NIfTI affine of the QSM grid)", "Units": "mm"},
    "centroid_y_mm": {"Description": "Lesion centre of mass, world y", "Units": "mm"},
    "centroid_z_mm": {"Description": "Lesion centre of mass, world z", "Units": "mm"},
    "split_from": {"Description": "Connected component (numbered in the lesion mask's own grid) that this lesion "
                                  "was split from by --lesion-split auto; n/a for lesions that were not split"},
}

RIM_DICTIONARY = {
    **GEOMETRY_DICTIONARY,
    "probability": {"Description": "Rim+ probability: the model's calibration map applied to the mean over the "
                                   "ensemble's fold/seed models (equal to probability_raw for a model without a map)"},
    "probability_raw": {"Description": "Mean rim+ probability of the ensemble's fold/seed models, before calibration"},
    "uncertainty": {"Description": "Standard deviation of the ensemble members' probabilities"},
    "votes": {"Description": "Fraction of ensemble members whose own fold threshold calls the lesion rim+"},
    "rim_positive": {"Description": "1 if probability >= threshold (a paramagnetic rim lesion), else 0",
                     "Levels": {"0": "rim-", "1": "rim+"}},
    "threshold": {"Description": "Probability threshold applied (see the summary's operating_point)"},
}

SUMMARY_DICTIONARY = {
    "participant_id": {"Description": "Participant label"},
    "session": {"Description": "Session label (n/a when the dataset has no sessions)"},
    "n_lesions": {"Description": "Lesions analysed (after --min-lesion-voxels)"},
    "n_rimplus": {"Description": "Lesions classified rim+"},
    "lesion_volume_mm3": {"Description": "Total lesion volume", "Units": "mm^3"},
    "rimplus_volume_mm3": {"Description": "Total volume of rim+ lesions", "Units": "mm^3"},
    "threshold": {"Description": "Probability threshold applied"},
    "operating_point": {"Description": "f1 (model's F1-optimal threshold), high-sensitivity, or user (--threshold)"},
    "model_id": {"Description": "Identifier of the model directory used"},
    "n_rimplus_expected": {"Description": "Expected number of rim+ lesions: sum of the lesions' rim+ "
                                          "probabilities (calibrated when the model has a map, see calibration)"},
    "n_rimplus_ci_low": {"Description": "Lower end of the 95 % interval of the rim+ count (2.5 % quantile of the "
                                        "Poisson-binomial distribution of the lesions' probabilities)"},
    "n_rimplus_ci_high": {"Description": "Upper end of the 95 % interval of the rim+ count (97.5 % quantile of the "
                                         "Poisson-binomial distribution of the lesions' probabilities)"},
    "calibration": {"Description": "The model's calibration map of the probabilities (none: the ensemble's raw "
                                   "mean, whose counts are not calibrated)"},
}

ANNOTATION_DICTIONARY = {
    "lesion_id": GEOMETRY_DICTIONARY["lesion_id"],
    "rim_positive": {"Description": "Expert label carried onto the lesion by majority vote of desc-rim_dseg",
                     "Levels": {"0": "rim-", "1": "rim+"}},
    "agreement": {"Description": "Fraction of the lesion's annotated voxels that agree with the majority label"},
}


PATCHES_ARRAYS = {"patches": "float32 (N, 4, X, Y, Z)", "lesion_id": "int32 (N,)",
                  "reference": "float32 (N, 2) median, scale (ppb)", "extent_mm": "float32 (3,)",
                  "spacing_mm": "float32 (3,)", "qsm_voxel_size_mm": "float32 (3,)", "channels": "str (4,)",
                  "format_version": "int32"}


def participant_outputs(qsm: str, flair: str, mask: str, rim_labels: str | None,
                        patch_extent_mm: Sequence[float], patch_spacing_mm: Sequence[float]
                        ) -> dict[str, tuple[str, list[str], dict | None]]:
    """Every participant-level output: field -> (role, Sources, sidecar metadata or None for no sidecar).

    The arguments are the inputs' URIs (:func:`bids_uri`) and the run's patch grid.
    """
    patches_meta = {
        "Description": "Per-lesion patches resampled in mm along the world (RAS) axes around each lesion's "
                       "centroid: QSM (ppb), normalised FLAIR, signed distance to the lesion boundary "
                       "(mm, negative inside), other lesions (1); and each lesion's local reference "
                       "tissue (median, robust scale; ppb)",
        "Arrays": PATCHES_ARRAYS, "PatchExtentMM": list(patch_extent_mm), "PatchSpacingMM": list(patch_spacing_mm)}
    return {
        "flair": ("flair_preproc", [flair, qsm], {"SkullStripped": False, "SpatialReference": qsm}),
        "xfm": ("xfm_flair_to_qsm", [flair, qsm], {"Type": "ITK", "Direction":
                "maps QSM-space physical points to FLAIR-space points (ITK resampling convention)"}),
        "dseg": ("lesions_dseg", [mask, qsm], {"SpatialReference": qsm}),
        "dseg_tsv": ("lesions_dseg_tsv", [mask], None),  # its sidecar is the image's (same name)
        "radiomics": ("radiomics", [qsm, mask], {}),
        "patches": ("patches", [qsm, flair, mask], patches_meta),
        "annotations": ("annotations", [rim_labels] if rim_labels else [], ANNOTATION_DICTIONARY),
        "rim_table": ("rim_lesions", [qsm, flair, mask], RIM_DICTIONARY),
        "rim_mask": ("rimplus_mask", [qsm, mask], {"SpatialReference": qsm}),
        "rim_probseg": ("rimplus_probseg", [qsm, mask], {"SpatialReference": qsm}),
        "summary": ("summary", [qsm, flair, mask], SUMMARY_DICTIONARY),
    }


def _radial_dictionary() -> dict:
    from .radial import FLOOR_COLUMN, feature_descriptions

    out = {name: {"Description": desc} for name, desc in feature_descriptions().items()}
    out[FLOOR_COLUMN] = {"Description": "Training-free rim score: mean QSM of the lesion's 1-voxel inner shell "
                                        "minus that of its core (0 without a core)", "Units": "ppb"}
    return out


RADIAL_DICTIONARY = _radial_dictionary()


def radiomics_dictionary(columns: Sequence[str]) -> dict:
    """Sidecar for the feature table: geometry columns plus one entry per pyradiomics feature."""
    entries = {}
    for column in columns:
        if column in GEOMETRY_DICTIONARY:
            entries[column] = GEOMETRY_DICTIONARY[column]
            continue
        if column in RADIAL_DICTIONARY:
            entries[column] = RADIAL_DICTIONARY[column]
            continue
        if not column.startswith(("original_", "wavelet")):
            entries[column] = {"Description": column}
            continue
        image_type, _, rest = column.partition("_")
        feature_class, _, feature = rest.partition("_")
        entries[column] = {"Description": f"pyradiomics {feature_class} feature {feature} on the {image_type} "
                                          "image of the QSM (ppb, binWidth 25)"}
    return entries


# ---------------------------------------------------------------------------------------------
# The review dataset (``qsmrim-review``): rater decisions as their own BIDS derivatives dataset
# ---------------------------------------------------------------------------------------------
REVIEW_OUTPUTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "rim_dseg": ("dseg", ".nii.gz", {"space": "QSM", "desc": "rim"}),
    "rim_dseg_tsv": ("dseg", ".tsv", {"space": "QSM", "desc": "rim"}),
    "rim_decisions": ("decisions", ".tsv", {"space": "QSM", "desc": "rim"}),
}
REVIEW_BIDSIGNORE = "\n".join(["*_decisions.tsv", "*_decisions.json", ""])
#: Values of the review's desc-rim_dseg (the app's rim annotation convention, lesions.py).
RIM_DSEG_LOOKUP = pd.DataFrame({"index": [1, 2], "name": ["rim-", "rim+"]})

DECISIONS_DICTIONARY = {
    "lesion_id": GEOMETRY_DICTIONARY["lesion_id"],
    "decision": {"Description": "The rater's call on this lesion",
                 "Levels": {"rimpos": "rim+ (paramagnetic rim)", "rimneg": "rim- (no rim)",
                            "unsure": "the rater could not decide"}},
    "rater": {"Description": "Who decided (qsmrim-review --rater; default the user name)"},
    "time": {"Description": "When the decision was made (ISO 8601, UTC)"},
    "probability": {"Description": "The model's rim+ probability shown to the rater at review"},
}


def review_path(root: Path, unit: Unit, role: str) -> Path:
    """Where the review output ``role`` (a key of REVIEW_OUTPUTS) of ``unit`` lives."""
    suffix, extension, entities = REVIEW_OUTPUTS[role]
    return unit.folder(root) / bids_name(unit, suffix, extension, **entities)


def init_review_dir(review_dir: Path, output_dir: Path, container: str | None = None) -> None:
    """dataset_description.json (linking the qsmrim outputs it annotates) and .bidsignore."""
    review_dir = Path(review_dir)
    review_dir.mkdir(parents=True, exist_ok=True)
    uri = Path(output_dir).resolve().as_uri()
    description = {
        "Name": "qsmrim-review: rater decisions on rim+ candidates",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{**generated_by(container)[0], "Name": "qsmrim-review",
                         "Description": "rater decisions made in qsmrim-review over qsmrim outputs"}],
        "SourceDatasets": [{"URL": uri}],
        "DatasetLinks": {"qsmrim": uri},
    }
    _write_if_changed(review_dir / "dataset_description.json", json.dumps(description, indent=2) + "\n")
    _write_if_changed(review_dir / ".bidsignore", REVIEW_BIDSIGNORE)


# ---------------------------------------------------------------------------------------------
# Lesion tracks across a participant's sessions (group level: workflows/longitudinal.py)
# ---------------------------------------------------------------------------------------------
def tracks_path(root: Path, subject: Unit) -> Path:
    """``sub-X/anat/sub-X_desc-rimtracks_lesions.tsv``: one row per lesion track over the sessions."""
    return Unit(subject.subject).folder(root) / bids_name(Unit(subject.subject), "lesions", ".tsv", desc="rimtracks")


def session_transform_path(root: Path, subject: Unit, moving: str, fixed: str) -> Path:
    """``sub-X/anat/sub-X_from-ses<moving>_to-ses<fixed>_mode-image_xfm.txt`` (ITK, resamples moving onto fixed)."""
    unit = Unit(subject.subject)
    return unit.folder(root) / bids_name(unit, "xfm", ".txt", from_=f"ses{moving}", to=f"ses{fixed}", mode="image")


def tracks_report_path(root: Path, subject: Unit) -> Path:
    return Path(root) / f"sub-{subject.subject}_rimtracks.html"


def write_itk_transform(path: Path, transform) -> Path:
    """An ITK text transform (SimpleITK), written atomically like every other output."""
    import SimpleITK as sitk

    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))
    return Path(path)


TRACK_SESSION_COLUMNS = {
    "lesion_id": "Lesion id(s) of the track in this session (its space-QSM desc-lesions dseg); several joined "
                 "by '+' when the lesion is split there (or two lesions of another session merged into it); "
                 "n/a when the track's lesion is not seen in this session",
    "volume_mm3": "Volume of the track's lesion(s) in this session (mm^3, summed over pieces)",
    "probability": "Rim+ probability of the lesion in this session (the largest over its pieces)",
    "uncertainty": "Ensemble spread (standard deviation) of that probability",
    "rim_positive": "The session's call: 1 rim+, 0 rim- (rim+ if any piece is rim+)",
}


def track_dictionary(sessions: Sequence[str]) -> dict:
    """Data dictionary of the track table for the covered ``sessions``."""
    out: dict = {"track_id": {"Description": "Lesion track: the same lesion across the participant's sessions; "
                                             "numbered by the first session it is seen in, then its lesion id "
                                             "there (stable across reruns on the same inputs)"}}
    for s in sessions:
        for column, text in TRACK_SESSION_COLUMNS.items():
            out[f"{column}_ses-{s}"] = {"Description": f"ses-{s}: {text}"}
    out.update({
        "sessions_present": {"Description": "Number of covered sessions the track's lesion is seen in"},
        "split_or_merge": {"Description": "1 if some session holds more than one lesion of the track"},
        "status": {"Description": "Rim course over the covered sessions (first to last)", "Levels": {
            "persistent rim+": "rim+ in the first and last session and wherever seen between",
            "new rim+": "not rim+ in the first session (rim- or not there yet), rim+ from some session to the last",
            "resolved": "rim+ in the first session, then rim- (rim faded) or no longer seen, to the last",
            "rim- throughout": "never rim+",
            "uncertain": "a rim that comes and goes, or a status resting on a first/last-session call whose "
                         "probability lies within its ensemble spread (uncertainty) of the threshold"}},
        "volume_change_mm3": {"Description": "Volume in the last session the lesion is seen in minus the first",
                              "Units": "mm^3"},
        "volume_change_percent": {"Description": "volume_change_mm3 relative to the first volume", "Units": "%"},
        "probability_track": {"Description": "Track-level rim+ probability: mean of the sessions' probabilities "
                                             "over the sessions the lesion is seen in"},
        "p_persistent": {"Description": "p_first x p_last (p = rim+ probability, 0 where not seen): the "
                                        "probability of persistent rim+ used for the group count intervals"},
        "p_new": {"Description": "(1 - p_first) x p_last"},
        "p_resolved": {"Description": "p_first x (1 - p_last)"},
    })
    return out


GROUP_TRACKS_DICTIONARY = {
    "participant_id": {"Description": "Participant label"},
    "sessions_covered": {"Description": "Sessions the tracks cover (comma-separated, e.g. ses-01,ses-02, in order)"},
    "sessions_missing": {"Description": "Sessions of the participant not covered (no outputs, a failed run, or "
                                        "a failed registration; the track table's sidecar says which)"},
    "n_tracks": {"Description": "Lesion tracks"},
    "n_persistent": {"Description": "Tracks with status persistent rim+"},
    "n_new": {"Description": "Tracks with status new rim+"},
    "n_resolved": {"Description": "Tracks with status resolved"},
    "n_rimneg": {"Description": "Tracks with status rim- throughout"},
    "n_uncertain": {"Description": "Tracks with status uncertain"},
    **{f"{key}_{part}": {"Description": text.format(key=key)}
       for key in ("persistent", "new", "resolved")
       for part, text in (("expected", "Expected number of {key} rim+ tracks from the probabilities (sum of p_{key})"),
                          ("ci_low", "Lower end of the 95% interval of the {key} count (Poisson-binomial over "
                                     "tracks; assumes calibrated, independent probabilities)"),
                          ("ci_high", "Upper end of that interval"))},
}
