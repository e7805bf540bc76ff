"""Lesion-track pictures and pages: each rim+ track seen in every session side by side, same world place.

The participant's tracks page (``sub-X_rimtracks.html``) shows, for every track that is rim+ in some
session, one axial cut per session through the same point of the common grid (the first session's world,
other sessions registered onto it), so a rater sees the lesion grow, shrink, appear or lose its rim. The
group report gets a section with each participant's counts (``tracks_section``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from ..derivatives import write_text
from ._html import Plane, esc, fixed, fmt, img_tag, kv_table, page, png_data_uri, safe_href, table, window_to_uint8

TILE_PX = 120
GAP_PX = 3
QSM_WINDOW_PPB = (-150.0, 150.0)
FOV_MM = (24.0, 80.0)
TRACK_RGB = (255, 48, 48)
OTHER_RGB = (0, 190, 255)
STATUS_CSS = {"persistent rim+": "rimpos", "new rim+": "rimpos", "resolved": "rimneg"}


def rim_tracks(tracks: pd.DataFrame) -> pd.DataFrame:
    """Tracks rim+ in at least one session (the ones shown), in track order."""
    calls = tracks[[c for c in tracks.columns if c.startswith("rim_positive_ses-")]].apply(pd.to_numeric,
                                                                                        errors="coerce")
    return tracks[(calls.fillna(0) >= 0.5).any(axis=1)].sort_values("track_id")


def _qsm_in_common(unit, output_dir: Path, bids_dir: Path | None, reference, transform) -> np.ndarray | None:
    """The session's raw QSM (named by its outputs' sidecar) in ppb on the common grid, or None."""
    import json

    import SimpleITK as sitk

    from .. import derivatives as drv
    from ..qsm import guess_units, to_ppb
    from ..review.catalog import resolve_source
    from ..workflows.longitudinal import _to_common

    sidecar = drv.sidecar_path(drv.output_path(output_dir, unit, "flair_preproc"))
    try:
        reference_uri = json.loads(sidecar.read_text()).get("SpatialReference", "")
    except (OSError, ValueError):
        return None
    path = resolve_source(reference_uri, bids_dir) if reference_uri else None
    if path is None or not Path(path).is_file():
        return None
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    data = _to_common(image, reference, transform, "linear")
    return to_ppb(data, guess_units(data) or "ppb")


def _panel(qsm: np.ndarray | None, labels: np.ndarray, ids: Sequence[int], plane: Plane, k: int,
           centre: tuple[float, float], fov: float) -> np.ndarray:
    offsets = (np.arange(TILE_PX) - (TILE_PX - 1) / 2.0) * (fov / TILE_PX)
    grid = np.meshgrid(centre[0] + offsets / plane.row_mm, centre[1] + offsets / plane.col_mm, indexing="ij")
    if qsm is not None:
        grey = window_to_uint8(ndimage.map_coordinates(plane.take(qsm, k), grid, order=1, cval=np.nan,
                                                       prefilter=False), *QSM_WINDOW_PPB)
    else:
        grey = np.full((TILE_PX, TILE_PX), 40, np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    lab = ndimage.map_coordinates(plane.take(labels, k).astype(np.float32), grid, order=0, cval=0.0,
                                  prefilter=False).astype(np.int64)
    this = np.isin(lab, list(ids)) if ids else np.zeros(lab.shape, bool)
    other = (lab > 0) & ~this
    rgb[other & ~ndimage.binary_erosion(other)] = OTHER_RGB
    rgb[this & ~ndimage.binary_erosion(this)] = TRACK_RGB
    return rgb


def track_figures(result, context: Mapping[str, Any]) -> dict[int, str]:
    """track id -> PNG data URI of its sessions side by side (rim+ tracks only)."""
    shown = rim_tracks(result.tracks)
    if shown.empty:
        return {}
    per_session = {p.session: p for p in context["per_session"]}
    assignments = result.assignments
    plane = Plane.from_affine(context["affine"], 2)
    union = {}
    for track in shown["track_id"]:
        rows = assignments[assignments["track_id"] == track]
        mask = np.zeros(next(iter(per_session.values())).labels.shape, bool)
        for s, group in rows.groupby("session"):
            mask |= np.isin(per_session[s].labels, group["lesion_id"].to_numpy())
        if not mask.any():
            continue
        idx = np.argwhere(mask)
        centre = idx.mean(axis=0)
        extent = float(max(np.ptp(idx[:, plane.row_axis]), np.ptp(idx[:, plane.col_axis]))) + 1.0
        union[int(track)] = (centre, float(np.clip(2.0 * extent, *FOV_MM)), rows)
    panels: dict[int, list[np.ndarray]] = {t: [] for t in union}
    output_dir, bids_dir = Path(context["output_dir"]), context.get("bids_dir")
    for s in result.sessions:
        unit = context["units"][s]
        transform = context["transforms"].get(s)
        qsm = _qsm_in_common(unit, output_dir, bids_dir, context["reference"], transform)
        labels = per_session[s].labels
        for track, (centre, fov, rows) in union.items():
            ids = rows.loc[rows["session"] == s, "lesion_id"].astype(int).tolist()
            k = int(round(centre[plane.axis]))
            panels[track].append(_panel(qsm, labels, ids, plane, k, plane.to_screen(centre, labels.shape), fov))
        del qsm
    gap = np.full((TILE_PX, GAP_PX, 3), 255, np.uint8)
    out = {}
    for track, tiles in panels.items():
        parts = [tiles[0]]
        for tile in tiles[1:]:
            parts += [gap, tile]
        out[track] = png_data_uri(np.concatenate(parts, axis=1))
    return out


def _status_tag(status: str) -> str:
    return f'<span class="tag {STATUS_CSS.get(status, "")}">{esc(status)}</span>'


def write_tracks_report(out_file: Path, result, figures: Mapping[int, str]) -> Path:
    """The participant's tracks page: coverage, counts, the rim+ tracks side by side, the full table."""
    sessions = result.sessions
    counts = result.counts
    cover = [("Participant", f"sub-{result.subject}"), ("Sessions covered", ", ".join(f"ses-{s}" for s in sessions))]
    cover += [(f"ses-{s} not covered", why) for s, why in sorted(result.missing.items())]
    body = '<section id="coverage"><h2>Coverage</h2>' + kv_table(cover)
    if result.missing:
        body += ('<p class="bad">Some sessions are not covered: statuses are over the covered sessions only.</p>')
    body += "</section>"
    labels = [("Tracks", counts.get("n_tracks")), ("Persistent rim+", counts.get("n_persistent")),
              ("New rim+", counts.get("n_new")), ("Resolved", counts.get("n_resolved")),
              ("Rim- throughout", counts.get("n_rimneg")), ("Uncertain", counts.get("n_uncertain"))]
    labels += [(f"{key.capitalize()} rim+ expected (95% interval)",
                f"{fmt(counts.get(f'{key}_expected'))} ({counts.get(f'{key}_ci_low')}-{counts.get(f'{key}_ci_high')})")
               for key in ("persistent", "new", "resolved")]
    body += '<section id="counts"><h2>Counts</h2>' + kv_table(labels) + "</section>"
    shown = rim_tracks(result.tracks)
    body += ('<section id="rimtracks"><h2>Rim+ tracks, session by session</h2><p class="caption">One axial cut '
             "per session (left to right: " + esc(", ".join(f"ses-{s}" for s in sessions)) + ") through the same "
             f"world point of the common grid (ses-{esc(sessions[0])}'s space; later sessions registered rigidly "
             f"onto it), QSM in ppb, window {QSM_WINDOW_PPB[0]:g} to {QSM_WINDOW_PPB[1]:g}, radiological "
             "convention as in the participant reports (patient left on screen right, anterior up). Red: the track's lesion in that session (no outline: not seen there); blue: other "
             "lesions.</p>")
    if shown.empty:
        body += "<p>No track is rim+ in any session.</p>"
    for _, row in shown.iterrows():
        track = int(row["track_id"])
        cells = []
        for s in sessions:
            lid = row.get(f"lesion_id_ses-{s}")
            seen = not (lid is None or (isinstance(lid, float) and np.isnan(lid)) or str(lid) in ("", "nan", "n/a"))
            call = pd.to_numeric(pd.Series([row.get(f"rim_positive_ses-{s}")]), errors="coerce").iloc[0]
            cells.append(f"ses-{esc(s)}: " + (f"lesion {esc(lid)}, p = {esc(fixed(row.get(f'probability_ses-{s}'), 3))}"
                                              f" {'rim+' if call >= 0.5 else 'rim−'}, "
                                              f"{esc(fixed(row.get(f'volume_mm3_ses-{s}'), 0))} mm³"
                                              if seen else "not seen"))
        image = (img_tag(figures[track], f"track {track}: " + "; ".join(cells), "tile",
                         f' width="{len(sessions) * (TILE_PX + GAP_PX)}"') if track in figures else "<p>(no image)</p>")
        body += (f'<figure class="track" id="track-{track}">{image}<figcaption><b>Track {track}</b> '
                 f"{_status_tag(str(row['status']))} · track p = {esc(fixed(row.get('probability_track'), 3))}"
                 f"<br>{'<br>'.join(cells)}</figcaption></figure>")
    body += "</section>"
    columns = ["track_id", "status", "probability_track", "volume_change_mm3", "sessions_present"]
    columns += [f"{c}_ses-{s}" for s in sessions for c in ("lesion_id", "probability", "rim_positive")]
    rows = [[esc(fmt(r.get(c))) for c in columns] for _, r in result.tracks.iterrows()]
    body += '<section id="tracks"><h2>All tracks</h2>' + table(columns, rows) + "</section>"
    nav = [("coverage", "Coverage"), ("counts", "Counts"), ("rimtracks", "Rim+ tracks"), ("tracks", "All tracks")]
    return write_text(Path(out_file), page(f"qsmrim: sub-{result.subject} lesion tracks", nav, body))


def tracks_section(group_tracks: pd.DataFrame | None, reports: Mapping[str, str] | None = None) -> str:
    """The group report's longitudinal section: per participant, counts with intervals and a link."""
    head = '<section id="longitudinal"><h2>Lesion tracks over sessions</h2>'
    if group_tracks is None or group_tracks.empty:
        return head + "<p>No participant has two or more sessions with outputs.</p></section>"
    total = {k: int(pd.to_numeric(group_tracks[f"n_{k}"], errors="coerce").sum())
             for k in ("persistent", "new", "resolved", "rimneg", "uncertain")}
    body = head + (f"<p>Over {len(group_tracks)} participant(s): <b>{total['persistent']}</b> persistent rim+, "
                   f"<b>{total['new']}</b> new rim+, <b>{total['resolved']}</b> resolved, {total['rimneg']} rim- "
                   f"throughout and {total['uncertain']} uncertain track(s). Intervals: 95%, Poisson-binomial over "
                   "tracks from the rim+ probabilities (as good as their calibration). Statuses are over the "
                   "sessions each participant's tracks cover.</p>")
    rows = []
    for _, r in group_tracks.iterrows():
        href = safe_href((reports or {}).get(str(r["participant_id"]), ""))
        link = f'<a href="{esc(href)}">tracks</a>' if href else "no page"
        rows.append([esc(r["participant_id"]), esc(r["sessions_covered"]), esc(fmt(r["sessions_missing"])),
                     esc(fmt(r["n_tracks"]))]
                    + [f"{esc(fmt(r[f'n_{k}']))} (expected {esc(fixed(r[f'{k}_expected'], 1))}, "
                       f"{esc(fmt(r[f'{k}_ci_low']))}-{esc(fmt(r[f'{k}_ci_high']))})"
                       for k in ("persistent", "new", "resolved")]
                    + [esc(fmt(r["n_uncertain"])), link])
    body += table(["participant", "sessions", "not covered", "tracks", "persistent rim+", "new rim+",
                   "resolved", "uncertain", "page"], rows)
    body += ('<p class="caption">Each count is by the sessions\' calls (uncertain tracks not counted); in brackets '
             "the expected count from the probabilities and its 95% interval.</p>")
    return body + "</section>"
