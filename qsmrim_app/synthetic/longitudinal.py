"""Longitudinal phantom cohort (`qsmrim-synth --longitudinal`): one participant scanned several times.

Why: lesion tracks (workflows/longitudinal.py) need a truth to be measured against. Each participant's
lesions are drawn once (anatomy.py, as the cross-sectional phantom does); every session then sees a
version of them: the head placed anew in the scanner, a QSM grid with another voxel size, lesions grown
or shrunk, a few lesions new (not there yet in earlier sessions) or no longer seen, rims that persist,
fade or appear at the stated rates, and a lesion mask redrawn by a different "rater" (every lesion drawn
larger or smaller by a session-wide factor). The images of a session come from `simulate_session`
unchanged; only the anatomy handed to it differs. The truth of tracks and statuses is written outside
the BIDS dataset (``<truth>/tracks.tsv``, ``<truth>/track_status.tsv`` and a QSM-grid map of the true
track id per session).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from .anatomy import SIZES, Anatomy, Ellipsoid, Lesion, SizeSpec, _lesion_centre, rng_for
from .dataset import _prepare, _write_json, _write_nifti, _write_top_level, draw_subject, write_session
from .render import Grid, render_lesions, render_tissue
from .simulate import MIN_LESION_VOXELS, simulate_session

#: QSM voxel sizes (mm) the sessions cycle through: follow-ups rarely reuse the baseline protocol exactly.
SESSION_QSM_VOXELS: tuple[tuple[float, float, float], ...] = ((1.6, 1.6, 2.6), (1.4, 1.4, 2.2), (1.8, 1.8, 2.4))
STREAM = 1000  # rng streams of this module start here (the cross-sectional phantom uses 0, 1, 2+session)
#: Least distance (mm) between a lesion that appears or goes and every other lesion, in every session where
#: both are there (after growth, and with the rater's largest drawing). More than the coarsest voxel edge
#: (2.6 mm slices here, 3 mm in the "full" size), so their voxel masks do not touch in any grid: a lesion
#: that is new next to an old one must be visible as a lesion of its own, not as the old one splitting.
MIN_GAP_MM = 3.0
GAP_STEP_MM = 0.4  # sampling step of the gap measurement; the check adds it to MIN_GAP_MM to stay on the safe side
RELOCATE_STREAM = STREAM + 500  # rng stream of the moves of new/vanishing lesions (one per subject)


@dataclass(frozen=True)
class Rates:
    """What changes between sessions, per lesion and per interval between consecutive sessions."""

    new: float = 0.12  # share of lesions that appear after the first session (onset drawn uniformly)
    vanish: float = 0.04  # per interval: a lesion is no longer seen (stays gone)
    rim_persist: float = 0.8  # per interval: a rim+ lesion keeps its rim (else it fades)
    rim_appear: float = 0.06  # per interval: a rim- lesion of a rim-capable kind (iso, hypo, faded rim+) gets one
    log_volume_sd: float = 0.2  # per interval: random volume change, log scale
    rim_growth: float = 0.1  # per interval: extra relative volume growth of rim+ lesions (slow expansion)
    rater_scale: tuple[float, float] = (0.94, 1.06)  # per session: linear scale of every drawn mask


@dataclass
class _Track:
    """One lesion over the sessions: its base shape and what happens to it."""

    lesion: Lesion
    onset: int  # first session index it exists in
    end: int  # last session index it exists in
    rim: list[bool]  # per session
    scale: list[float]  # linear size factor per session


def _scaled(lesion: Lesion, factor: float) -> Lesion:
    """The lesion grown (factor > 1) or shrunk about its centre, same shape."""
    c = lesion.center
    parts = tuple(Ellipsoid(c + (p.center - c) * factor, p.radii * factor, p.rotation) for p in lesion.parts)
    return replace(lesion, parts=parts, waves=lesion.waves / factor)


def _with_rim(lesion: Lesion, rim: bool, rng: np.random.Generator) -> Lesion:
    if rim == lesion.rim_positive:
        return lesion
    if not rim:  # a rim that faded: the core stays, the paramagnetic edge goes
        return replace(lesion, kind="iso", chi_rim=0.0, rim_thickness=0, rim_coverage=0.0)
    return replace(lesion, kind="rim+", chi_rim=float(rng.uniform(0.035, 0.07)),
                   rim_thickness=int(rng.integers(1, 3)), rim_coverage=float(rng.uniform(0.55, 1.0)))


def plan_tracks(anat: Anatomy, n_sessions: int, rates: Rates, rng: np.random.Generator) -> list[_Track]:
    """Draw every lesion's onset, end, rim course and size course over `n_sessions` sessions."""
    tracks = []
    for lesion in anat.lesions:
        onset = int(rng.integers(1, n_sessions)) if n_sessions > 1 and rng.random() < rates.new else 0
        end = n_sessions - 1
        for s in range(onset + 1, n_sessions):
            if rng.random() < rates.vanish:
                end = s - 1
                break
        rim, scale = [False] * n_sessions, [1.0] * n_sessions
        has_rim, log_volume = lesion.rim_positive, 0.0
        for s in range(onset, n_sessions):
            if s > onset:
                if has_rim and rng.random() > rates.rim_persist:
                    has_rim = False
                elif not has_rim and lesion.kind in ("iso", "hypo", "rim+") and rng.random() < rates.rim_appear:
                    has_rim = True
                log_volume += rng.normal(0.0, rates.log_volume_sd) + (np.log1p(rates.rim_growth) if has_rim else 0.0)
            rim[s], scale[s] = has_rim, float(np.exp(log_volume / 3.0))
        tracks.append(_Track(lesion, onset, end, rim, scale))
    return tracks


def lesion_gap_mm(a: Lesion, b: Lesion, step: float = GAP_STEP_MM) -> float:
    """Least distance (mm) between the two lesions' shapes (their level < 1 sets), sampled every `step` mm.

    Why sampled: the shapes are unions of ellipsoids with a wavy boundary; no closed form. Far apart
    lesions (bounding balls `gap` apart) return that lower bound without sampling; 0.0 when they overlap.
    """
    centre_gap = float(np.linalg.norm(a.center - b.center)) - a.bound - b.bound
    if centre_gap > MIN_GAP_MM + step:
        return centre_gap
    lo = np.minimum(a.center - a.bound, b.center - b.bound)
    hi = np.maximum(a.center + a.bound, b.center + b.bound)
    axes = [np.arange(l, h + step, step, dtype=np.float32) for l, h in zip(lo, hi)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"))
    in_a, in_b = a.level(pts) < 1.0, b.level(pts) < 1.0
    if not in_a.any() or not in_b.any():
        return float("inf")
    if (in_a & in_b).any():
        return 0.0
    return float(ndimage.distance_transform_edt(~in_a, sampling=step)[in_b].min())


def _changes(track: _Track, n_sessions: int) -> bool:
    return track.onset > 0 or track.end < n_sessions - 1


def _too_close(tracks: list[_Track], k: int, n_sessions: int, rater_max: float) -> bool:
    """Whether track k comes nearer than MIN_GAP_MM to another lesion in a session where both are there."""
    for j, other in enumerate(tracks):
        if j == k:
            continue
        for s in range(max(tracks[k].onset, other.onset), min(tracks[k].end, other.end) + 1):
            a = _scaled(tracks[k].lesion, tracks[k].scale[s] * rater_max)
            b = _scaled(other.lesion, other.scale[s] * rater_max)
            if lesion_gap_mm(a, b) < MIN_GAP_MM + GAP_STEP_MM:
                return True
    return False


def _moved(lesion: Lesion, centre: np.ndarray, location: str) -> Lesion:
    shift = centre - lesion.center
    parts = tuple(Ellipsoid(p.center + shift, p.radii, p.rotation) for p in lesion.parts)
    return replace(lesion, parts=parts, location=location)


def separate_changing(anat: Anatomy, tracks: list[_Track], n_sessions: int, rng: np.random.Generator,
                      rater_max: float, tries: int = 60) -> tuple[Anatomy, list[_Track]]:
    """Move every lesion that appears or goes to where it keeps MIN_GAP_MM from every other lesion.

    Why: a lesion that appears touching a neighbour is, in the images, the neighbour splitting in two; such
    a truth cannot judge a matcher. The lesion keeps its shape, size course and rim course and is moved to
    another white-matter place of its kind (a "confluent" one, by definition touching, becomes "deep"). A
    vein-confounder keeps its vein and so is not moved; it, or a lesion with no free place after `tries`
    draws, is instead there in every session (its first drawn state before onset, its course after the end):
    rarer than the rates ask, never ambiguous. Deterministic given `rng`.
    """
    tracks = [replace(t, rim=list(t.rim), scale=list(t.scale)) for t in tracks]
    size = {k: float(np.max(t.lesion.parts[0].radii)) for k, t in enumerate(tracks)}
    changed = True
    while changed:  # a lesion made stable is there in more sessions: check the others again
        changed = False
        for k, track in enumerate(tracks):
            if not _changes(track, n_sessions) or not _too_close(tracks, k, n_sessions, rater_max):
                continue
            if track.lesion.kind != "vein-confounder":
                location = "deep" if track.lesion.location == "confluent" else track.lesion.location
                original = track.lesion
                for _ in range(tries):
                    centre = _lesion_centre(rng, anat.brain_radii, anat.structures, location, size[k])
                    track.lesion = _moved(original, centre, location)
                    if not _too_close(tracks, k, n_sessions, rater_max):
                        break
                else:
                    track.lesion = original
            if _too_close(tracks, k, n_sessions, rater_max):
                for s in range(track.onset):
                    track.rim[s], track.scale[s] = track.rim[track.onset], track.scale[track.onset]
                track.onset, track.end, changed = 0, n_sessions - 1, True
    return replace(anat, lesions=tuple(t.lesion for t in tracks)), tracks


def session_anatomy(anat: Anatomy, tracks: list[_Track], s: int, rng: np.random.Generator,
                    rater: float = 1.0) -> tuple[Anatomy, list[int]]:
    """The anatomy seen at session `s` (times `rater` for a drawn mask) and the track index of each lesion."""
    lesions, index = [], []
    for k, track in enumerate(tracks):
        if track.onset <= s <= track.end:
            lesion = _with_rim(track.lesion, track.rim[s], np.random.default_rng([k, s]))
            lesions.append(_scaled(lesion, track.scale[s] * rater))
            index.append(k)
    return replace(anat, lesions=tuple(lesions)), index


def _session_spec(spec: SizeSpec, s: int) -> SizeSpec:
    """Session `s`'s QSM grid: another voxel size, same field of view."""
    voxel = SESSION_QSM_VOXELS[s % len(SESSION_QSM_VOXELS)]
    fov = np.array(spec.qsm_shape) * np.array(spec.qsm_voxel)
    shape = tuple(int(2 * round(f / v / 2)) for f, v in zip(fov, voxel))
    return replace(spec, qsm_voxel=voxel, qsm_shape=shape)  # type: ignore[arg-type]


def _drawn_mask(ids: np.ndarray, index: list[int]) -> tuple[np.ndarray, list[int]]:
    """Renumber a rendered map 1..n (lesions under MIN_LESION_VOXELS dropped); return it and track indices."""
    counts = np.bincount(ids.ravel(), minlength=len(index) + 1)
    kept = [k for k in range(1, len(index) + 1) if counts[k] >= MIN_LESION_VOXELS]
    lut = np.zeros(len(index) + 1, np.int32)
    lut[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)
    return lut[ids], [index[k - 1] for k in kept]


def status_of(present: list[bool], rim: list[bool]) -> str:
    """Track status from its rim course (the definitions workflows/longitudinal.py applies to calls)."""
    calls = [p and r for p, r in zip(present, rim)]
    first, last = calls[0], calls[-1]
    if not any(calls):
        return "rim- throughout"
    if first and last:
        return "persistent rim+" if all(calls) or all(c for c, p in zip(calls, present) if p) else "uncertain"
    if last:
        return "new rim+"
    if first:
        return "resolved"
    return "uncertain"  # rim+ only in a middle session


def generate_longitudinal(out_dir: Path, n_subjects: int, sessions: int = 3, seed: int = 0, size: str = "small",
                          magnitude: bool = True, truth_dir: Path | None = None, rimplus_fraction: float = 0.25,
                          rates: Rates = Rates(), overwrite: bool = False) -> Path:
    """Write a longitudinal phantom BIDS dataset (ses-01..) and its track truth; return the truth directory.

    Subject i depends only on (seed, i): adding subjects never changes the earlier ones.
    """
    if size not in SIZES or n_subjects < 1 or sessions < 2:
        raise ValueError("need a known size, n_subjects >= 1 and sessions >= 2 for a longitudinal cohort")
    out_dir = Path(out_dir)
    truth_dir = Path(truth_dir) if truth_dir else out_dir.with_name(out_dir.name + "_truth")
    _prepare(out_dir, truth_dir, overwrite)
    spec = SIZES[size]
    participants, rows, statuses = [], [], []
    for i in range(n_subjects):
        sub, anat, deep_iron, participant = draw_subject(seed, i, n_subjects, spec, rimplus_fraction)
        participants.append(participant)
        plan_rng = rng_for(seed, i, STREAM)
        tracks = plan_tracks(anat, sessions, rates, plan_rng)
        anat, tracks = separate_changing(anat, tracks, sessions, rng_for(seed, i, RELOCATE_STREAM),
                                         max(rates.rater_scale))
        seen = np.zeros((len(tracks), sessions), bool)
        for s in range(sessions):
            ses = f"{s + 1:02d}"
            s_spec = _session_spec(spec, s)
            truth_anat, index = session_anatomy(anat, tracks, s, plan_rng)
            images = simulate_session(truth_anat, s_spec, rng_for(seed, i, STREAM + 1 + s), deep_iron, magnitude)
            rater = float(plan_rng.uniform(*rates.rater_scale))
            scanner_to_head = np.linalg.inv(images.head_to_scanner)
            gq = Grid(s_spec.qsm_shape, images.qsm_affine, scanner_to_head)
            gf = Grid(s_spec.flair_shape, images.flair_affine, scanner_to_head @ images.flair_to_qsm)
            drawn_anat, drawn_index = session_anatomy(anat, tracks, s, plan_rng, rater)
            mask, mask_tracks = _drawn_mask(render_lesions(drawn_anat, gf, render_tissue(anat, gf)), drawn_index)
            # the true extent of every lesion, also one under MIN_LESION_VOXELS here (not `present` then): a
            # rater's larger mask may still hold it, and it must be judged as itself, not as its neighbour
            true_q, true_tracks = render_lesions(truth_anat, gq, render_tissue(anat, gq)), index
            rim_lut = np.array([0] + [2 if tracks[k].rim[s] else 1 for k in mask_tracks], np.uint8)
            images.flair_lesions, images.rim_dseg = mask, rim_lut[mask]
            write_session(out_dir, sub, ses, images)
            lut = np.array([0] + [k + 1 for k in true_tracks], np.int32)
            track_map = lut[true_q]
            _write_nifti(truth_dir / f"sub-{sub}" / f"ses-{ses}" / f"sub-{sub}_ses-{ses}_space-QSM_desc-tracks_dseg.nii.gz",
                         track_map, images.qsm_affine, np.int32)
            voxel_mm3 = float(np.prod(s_spec.qsm_voxel))
            counts = np.bincount(track_map.ravel(), minlength=len(tracks) + 1)
            drawn = set(mask_tracks)
            for k, track in enumerate(tracks):
                present = bool(counts[k + 1] >= MIN_LESION_VOXELS and k in drawn)
                seen[k, s] = present
                rows.append({"participant_id": f"sub-{sub}", "session": f"ses-{ses}", "track": k + 1,
                             "present": int(present), "exists": int(track.onset <= s <= track.end),
                             "rim_positive": int(present and track.rim[s]), "qsm_voxels": int(counts[k + 1]),
                             "volume_mm3": counts[k + 1] * voxel_mm3, "scale": track.scale[s],
                             "rater_scale": rater, "kind": track.lesion.kind, "location": track.lesion.location})
        for k, track in enumerate(tracks):
            if not seen[k].any():
                continue
            statuses.append({"participant_id": f"sub-{sub}", "track": k + 1,
                             "status": status_of(list(seen[k]), track.rim), "sessions_present": int(seen[k].sum()),
                             "onset_session": f"ses-{track.onset + 1:02d}"})
    _write_top_level(out_dir, pd.DataFrame(participants), seed, size, rimplus_fraction)
    pd.DataFrame(rows).to_csv(truth_dir / "tracks.tsv", sep="\t", index=False, float_format="%.4f")
    pd.DataFrame(statuses).to_csv(truth_dir / "track_status.tsv", sep="\t", index=False)
    _write_json(truth_dir / "longitudinal.json", {
        "rates": asdict(rates), "sessions": sessions, "min_gap_mm_new_or_gone": MIN_GAP_MM, "seed": seed, "size": size, "rimplus_fraction": rimplus_fraction,
        "session_qsm_voxels_mm": [list(v) for v in SESSION_QSM_VOXELS],
        "convention": ("track = index of the drawn lesion (1-based) in the participant's anatomy; "
                       "sub-*/ses-*/*_desc-tracks_dseg.nii.gz holds it in each session's QSM grid (true extent, "
                       "not the rater's mask, also of lesions under MIN_LESION_VOXELS); present = at least MIN_LESION_VOXELS voxels in the QSM grid and "
                       "in the drawn mask; status over the sessions as status_of() defines it")})
    return truth_dir
