"""Lesion tracks at the group level: each participant's sessions registered to each other, lesions matched.

Why at the group level: tracks need every session of a participant, and the participant level stays one
session per job (a cluster array can still run each session alone; the group level runs once after all of
them). Only participant-level derivatives are read (the QSM-space FLAIR, the lesion map, the rim table),
plus the raw QSM named in their sidecars for the pictures; nothing of the participant level is recomputed.

Per participant with two or more sessions with outputs: every later session's QSM-space FLAIR is
registered rigidly to the first session's (same contrast, both already N4-corrected and on their QSM
grids; ``registration.register_flair_to_qsm``, one ITK thread so reruns are identical), every lesion map is
pulled onto one common 1 mm grid aligned with the world axes around the first session's QSM grid, and
``tracks.match_sessions`` links lesions by overlap there. A session without outputs, or whose registration
fails, is left out and the track table's sidecar says which sessions it covers and why the others are not.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import derivatives as drv
from .. import tracks as trk
from ..config import AppConfig

LOGGER = logging.getLogger("qsmrim")
COMMON_SPACING_MM = 1.0


@dataclass
class ParticipantTracks:
    """What the group level keeps of one participant's tracks (for the group table and report)."""

    subject: str
    sessions: list[str]  # covered, in order
    missing: dict[str, str]  # session -> why it is not covered
    tracks: pd.DataFrame
    counts: dict = field(default_factory=dict)
    report: Path | None = None
    assignments: pd.DataFrame | None = None  # session, lesion_id, track_id of every lesion
    maps: dict[str, np.ndarray] | None = None  # session -> lesion map on the common grid (keep_maps only)


def expected_sessions(bids_dir: Path | None, subject: str, found: list[str]) -> list[str]:
    """Sessions of ``subject`` in the raw dataset (those with outputs included), sorted."""
    raw = []
    if bids_dir is not None:
        raw = [p.name[4:] for p in (Path(bids_dir) / f"sub-{subject}").glob("ses-*") if p.is_dir()]
    return sorted(set(raw) | set(found))


def _common_reference(ref_image):
    """A 1 mm grid along the world axes covering ``ref_image`` (SimpleITK), and its RAS affine."""
    import SimpleITK as sitk

    size = np.array(ref_image.GetSize())
    corners = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)],
                       dtype=float)
    lps = np.array([ref_image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    ras = lps * np.array([-1.0, -1.0, 1.0])
    lo, hi = np.floor(ras.min(axis=0)) - 2, np.ceil(ras.max(axis=0)) + 2
    shape = ((hi - lo) / COMMON_SPACING_MM).astype(int) + 1
    reference = sitk.Image([int(n) for n in shape], sitk.sitkUInt8)
    reference.SetSpacing([COMMON_SPACING_MM] * 3)
    reference.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    reference.SetOrigin((-lo[0], -lo[1], lo[2]))
    affine = np.diag([COMMON_SPACING_MM] * 3 + [1.0])
    affine[:3, 3] = lo
    return reference, affine


def _to_common(image, reference, transform, interpolation: str) -> np.ndarray:
    """``image`` pulled onto the common grid, as an (i, j, k) array matching the RAS affine."""
    import SimpleITK as sitk

    from ..registration import resample_to_reference

    out = resample_to_reference(image, reference, transform, interpolation=interpolation)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def _session_units(output_dir: Path, subject: str) -> dict[str, drv.Unit]:
    """Sessions of ``subject`` whose outputs are complete (a rim table: classified)."""
    found = drv.find_units(output_dir, "rim_lesions")
    return {u.session: u for u in sorted(found, key=lambda u: u.session or "")
            if u.subject == subject and u.session}


def _failed_sessions(output_dir: Path, subject: str) -> dict[str, str]:
    """Sessions whose latest participant-level run failed (their earlier outputs, if any, are stale)."""
    out = {}
    for prefix, record in drv.latest_unit_logs(output_dir).items():
        match = re.match(rf"^sub-{re.escape(subject)}_ses-(?P<ses>[A-Za-z0-9]+)$", prefix)
        if match and record.get("status") in ("failed", "skipped"):
            why = record.get("reason") or record.get("error") or "?"
            out[match["ses"]] = f"participant level {record['status']} ({why})"
    return out


def track_participant(output_dir: Path, bids_dir: Path | None, subject: str, *, register: bool = True,
                      write: bool = True, min_overlap: float = trk.MIN_OVERLAP,
                      shift_mm: float = trk.SHIFT_MM, keep_maps: bool = False) -> ParticipantTracks | None:
    """Tracks of one participant from its sessions' derivatives; writes the outputs when ``write``.

    ``register=False`` trusts the scanner coordinates instead of registering (the obvious alternative,
    kept for the benchmark); ``keep_maps`` keeps the common-grid lesion maps in the result (benchmark only:
    the group level keeps no arrays between participants). Returns None when fewer than two sessions can be
    covered.
    """
    import SimpleITK as sitk

    from ..registration import RegistrationError, register_flair_to_qsm

    output_dir = Path(output_dir)
    units = _session_units(output_dir, subject)
    failed = _failed_sessions(output_dir, subject)
    sessions = expected_sessions(bids_dir, subject, list(units))
    missing = {s: failed.get(s, "no participant-level outputs") for s in sessions if s not in units}
    for s, reason in failed.items():  # outputs of an earlier run, but the latest run failed: not trusted
        if s in units:
            missing[s] = reason + "; the outputs of its earlier run are not used"
            units.pop(s)
    covered = [s for s in sessions if s in units]
    if len(sessions) < 2:
        return None
    if len(covered) < 2:
        LOGGER.warning("sub-%s: lesion tracks need two sessions with outputs; %d of %d have them", subject,
                       len(covered), len(sessions))
        result = ParticipantTracks(subject, covered, missing, pd.DataFrame())
        if write and covered:
            _write_outputs(output_dir, result, {}, {})
        return result

    ref_unit = units[covered[0]]
    ref_flair = sitk.ReadImage(str(drv.output_path(output_dir, ref_unit, "flair_preproc")), sitk.sitkFloat32)
    reference, affine = _common_reference(ref_flair)
    transforms: dict[str, tuple] = {}
    image_transforms: dict[str, object] = {}
    per_session, tables = [], {}
    for s in covered:
        unit = units[s]
        transform = sitk.Transform(3, sitk.sitkIdentity)
        if s != covered[0] and register:
            moving = sitk.ReadImage(str(drv.output_path(output_dir, unit, "flair_preproc")), sitk.sitkFloat32)
            try:
                result = register_flair_to_qsm(ref_flair, moving, threads=1)
            except RegistrationError as exc:
                missing[s] = f"registration to ses-{covered[0]} failed: {exc}"
                LOGGER.warning("sub-%s ses-%s: %s", subject, s, missing[s])
                continue
            transform = result.transform
            transforms[s] = (transform, result)
        labels = sitk.ReadImage(str(drv.output_path(output_dir, unit, "lesions_dseg")))
        common = _to_common(labels, reference, transform, "nearest").astype(np.int32)
        table = drv.read_tsv(drv.output_path(output_dir, unit, "rim_lesions"))
        per_session.append(trk.SessionLesions(s, common, table))
        tables[s] = table
        image_transforms[s] = transform
    covered = [p.session for p in per_session]
    assignments = trk.match_sessions(per_session, COMMON_SPACING_MM, min_overlap, shift_mm)
    tracks = trk.track_table(assignments, tables, covered)
    result = ParticipantTracks(subject, covered, missing, tracks, trk.participant_counts(tracks),
                               assignments=assignments,
                               maps={p.session: p.labels for p in per_session} if keep_maps else None)
    if write:
        _write_outputs(output_dir, result, transforms, {
            "units": units, "bids_dir": bids_dir, "output_dir": output_dir, "per_session": per_session,
            "affine": affine, "reference": reference, "transforms": image_transforms})
    return result


def _write_outputs(output_dir: Path, result: ParticipantTracks, transforms: dict, context: dict) -> None:
    subject = drv.Unit(result.subject)
    sources = [f"sub-{result.subject}/ses-{s}/anat/" + drv.output_path(Path("."), drv.Unit(result.subject, s),
                                                                         "rim_lesions").name
               for s in result.sessions]
    meta = {
        "SessionsCovered": [f"ses-{s}" for s in result.sessions],
        "SessionsMissing": {f"ses-{s}": why for s, why in sorted(result.missing.items())},
        "ReferenceSession": f"ses-{result.sessions[0]}" if result.sessions else None,
        "MatchingMinOverlap": trk.MIN_OVERLAP, "MatchingShiftMm": trk.SHIFT_MM,
        "CommonGridSpacingMm": COMMON_SPACING_MM,
        **drv.track_dictionary(result.sessions),
    }
    path = drv.tracks_path(output_dir, subject)
    table = result.tracks if not result.tracks.empty else pd.DataFrame(columns=list(drv.track_dictionary(result.sessions)))
    drv.write_with_sidecar(path, lambda p: drv.write_tsv(p, table), sources=sources, metadata=meta)
    written = {drv.session_transform_path(output_dir, subject, s, result.sessions[0]) for s in transforms}
    for old in drv.Unit(result.subject).folder(output_dir).glob(f"sub-{result.subject}_from-ses*_to-ses*_mode-image_xfm.*"):
        if old.with_suffix(".txt") not in written:  # an earlier run's transform this run did not make
            old.unlink(missing_ok=True)
    for s, (transform, reg) in transforms.items():
        xfm = drv.session_transform_path(output_dir, subject, s, result.sessions[0])
        drv.write_with_sidecar(
            xfm, lambda p, t=transform: drv.write_itk_transform(p, t),
            sources=[f"sub-{result.subject}/ses-{x}/anat/"
                     + drv.output_path(Path("."), drv.Unit(result.subject, x), "flair_preproc").name
                     for x in (result.sessions[0], s)],
            metadata={"Type": "rigid (Euler3D)", "Software": "SimpleITK",
                      "FromSession": f"ses-{s}", "ToSession": f"ses-{result.sessions[0]}",
                      "Convention": (f"ITK: maps points of ses-{result.sessions[0]}'s QSM space to ses-{s}'s (LPS mm), "
                                     f"the transform that resamples ses-{s}'s space-QSM images onto "
                                     f"ses-{result.sessions[0]}'s"),
                      "Images": "space-QSM desc-preproc FLAIR of both sessions (Mattes MI)",
                      "MetricBefore": reg.metric_before, "MetricAfter": reg.metric_after,
                      "Initialisation": reg.initialisation})
    if context and not result.tracks.empty:
        from ..reports.longitudinal import track_figures, write_tracks_report

        figures = track_figures(result, context)
        result.report = write_tracks_report(drv.tracks_report_path(output_dir, subject), result, figures)
    else:
        drv.tracks_report_path(output_dir, subject).unlink(missing_ok=True)


def run_longitudinal(config: AppConfig) -> list[ParticipantTracks]:
    """Tracks for every participant with two or more sessions; returns them for the group table/report."""
    output_dir = Path(config.output_dir)
    subjects = sorted({u.subject for u in drv.find_units(output_dir, "rim_lesions") if u.session})
    if config.participant_labels:
        subjects = [s for s in subjects if s in set(config.participant_labels)]
    out = []
    for subject in subjects:
        result = track_participant(output_dir, config.bids_dir, subject)
        if result is not None:
            out.append(result)
            LOGGER.info("sub-%s: %d lesion tracks over sessions %s%s", subject, len(result.tracks),
                        ", ".join(result.sessions), f" (not covered: {', '.join(result.missing)})"
                        if result.missing else "")
    if out:
        table = group_track_table(out)
        drv.write_tsv(output_dir / GROUP_TRACKS, table)
        drv.write_json(drv.sidecar_path(output_dir / GROUP_TRACKS), drv.GROUP_TRACKS_DICTIONARY)
    return out


GROUP_TRACKS = "group_rimtracks.tsv"


def group_track_table(results: list[ParticipantTracks]) -> pd.DataFrame:
    """One row per participant: sessions covered/missing, counts per status, intervals of rim changes."""
    rows = []
    for r in results:
        counts = r.counts or trk.participant_counts(r.tracks if not r.tracks.empty
                                                    else pd.DataFrame(columns=["status"]))
        rows.append({"participant_id": f"sub-{r.subject}", "sessions_covered": ",".join(f"ses-{s}" for s in r.sessions),
                     "sessions_missing": ",".join(f"ses-{s}" for s in sorted(r.missing)) or "n/a", **counts})
    return pd.DataFrame(rows, columns=list(drv.GROUP_TRACKS_DICTIONARY))


def longitudinal_section(output_dir: Path, results: list[ParticipantTracks]) -> tuple[str, str, str]:
    """(id, title, HTML) of the group report's lesion-track section."""
    from ..reports.longitudinal import tracks_section

    table = group_track_table(results) if results else None
    links = {f"sub-{r.subject}": r.report.name for r in results if r.report is not None}
    return "longitudinal", "Lesion tracks", tracks_section(table, links)
