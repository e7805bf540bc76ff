"""Lesion tracks: the same lesion across a participant's sessions, matched by overlap in one common grid.

Plain arrays and tables only (no files, no BIDS): workflows/longitudinal.py resamples every session's
lesion map onto one grid and hands them here.

Matching. Each lesion of one session links to its best-overlapping lesion of every other session when
that overlap covers at least ``min_overlap`` of the smaller of the two; a lesion without any overlap links
to the nearest lesion whose centre lies within ``shift_mm`` (small shifts of masks drawn by different
raters or tools, or a small registration error). Links go both ways, so a lesion split in two (each piece's
best partner is the whole) and two lesions merged into one both end in one track; a neighbour that merely
touches a lesion does not, because its own best partner is itself in the other session. Tracks are the
connected components of the links, numbered by the first session a track is seen in, then by its smallest
lesion id there: the same inputs give the same track ids on every rerun.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from .model.counts import count_interval  # one Poisson-binomial for unit counts and track counts

STATUSES = ("persistent rim+", "new rim+", "resolved", "rim- throughout", "uncertain")
COUNTED = {"persistent rim+": "persistent", "new rim+": "new", "resolved": "resolved"}
MIN_OVERLAP = 0.2
SHIFT_MM = 3.0


@dataclass(frozen=True)
class SessionLesions:
    """One session's lesion map in the common grid and its per-lesion table.

    ``table`` needs ``lesion_id``, ``volume_mm3``; for rim calls also ``probability``, ``uncertainty``,
    ``rim_positive`` and ``threshold`` (missing ones are n/a in the outputs).
    """

    session: str
    labels: np.ndarray  # int32 instance map in the common grid (0 = background)
    table: pd.DataFrame


def _volumes(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels.ravel(), minlength=int(labels.max()) + 1)


def overlaps(a: np.ndarray, b: np.ndarray) -> pd.DataFrame:
    """Voxel counts of every (lesion of ``a``, lesion of ``b``) pair that share voxels."""
    both = (a > 0) & (b > 0)
    if not both.any():
        return pd.DataFrame({"a": pd.Series(dtype=int), "b": pd.Series(dtype=int), "voxels": pd.Series(dtype=int)})
    av, bv = a[both].astype(np.int64), b[both].astype(np.int64)
    key, counts = np.unique(av * (int(bv.max()) + 1) + bv, return_counts=True)
    return pd.DataFrame({"a": key // (int(bv.max()) + 1), "b": key % (int(bv.max()) + 1), "voxels": counts})


def _centroids(labels: np.ndarray, ids: np.ndarray, voxel_mm: float) -> np.ndarray:
    if ids.size == 0:
        return np.zeros((0, 3))
    return np.asarray(ndimage.center_of_mass(np.ones(labels.shape, np.uint8), labels, ids)).reshape(-1, 3) * voxel_mm


def pair_links(a: np.ndarray, b: np.ndarray, voxel_mm: float = 1.0, min_overlap: float = MIN_OVERLAP,
               shift_mm: float = SHIFT_MM) -> set[tuple[int, int]]:
    """Links (lesion of ``a``, lesion of ``b``) between two sessions' maps on the same grid (see module doc)."""
    va, vb = _volumes(a), _volumes(b)
    ids_a, ids_b = np.flatnonzero(va[1:]) + 1, np.flatnonzero(vb[1:]) + 1
    pairs = overlaps(a, b)
    links: set[tuple[int, int]] = set()
    if not pairs.empty:
        smaller = np.minimum(va[pairs["a"].to_numpy()], vb[pairs["b"].to_numpy()])
        pairs = pairs.assign(fraction=pairs["voxels"].to_numpy() / smaller)
        for side, other in (("a", "b"), ("b", "a")):
            best = pairs.sort_values(["voxels", other], ascending=[False, True], kind="mergesort").drop_duplicates(side)
            for row in best.itertuples(index=False):
                if row.fraction >= min_overlap:
                    links.add((int(row.a), int(row.b)))
    # no overlap at all: the nearest lesion within shift_mm (centre to centre)
    lonely_a = sorted(set(ids_a) - set(pairs["a"]))
    lonely_b = sorted(set(ids_b) - set(pairs["b"]))
    if shift_mm > 0 and (lonely_a or lonely_b) and ids_a.size and ids_b.size:
        ca, cb = _centroids(a, ids_a, voxel_mm), _centroids(b, ids_b, voxel_mm)
        dist = np.linalg.norm(ca[:, None, :] - cb[None, :, :], axis=2)
        for lid in lonely_a:
            row = dist[int(np.flatnonzero(ids_a == lid)[0])]
            if row.min() <= shift_mm:
                links.add((int(lid), int(ids_b[int(np.argmin(row))])))
        for lid in lonely_b:
            col = dist[:, int(np.flatnonzero(ids_b == lid)[0])]
            if col.min() <= shift_mm:
                links.add((int(ids_a[int(np.argmin(col))]), int(lid)))
    return links


def match_sessions(sessions: Sequence[SessionLesions], voxel_mm: float = 1.0, min_overlap: float = MIN_OVERLAP,
                   shift_mm: float = SHIFT_MM) -> pd.DataFrame:
    """Every lesion of every session with its ``track_id``: columns session, lesion_id, track_id."""
    nodes = [(s.session, int(lid)) for s in sessions for lid in np.flatnonzero(_volumes(s.labels)[1:]) + 1]
    parent = {node: node for node in nodes}

    def find(node):
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for i, first in enumerate(sessions):
        for second in sessions[i + 1:]:
            for la, lb in pair_links(first.labels, second.labels, voxel_mm, min_overlap, shift_mm):
                ra, rb = find((first.session, la)), find((second.session, lb))
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    order = {s.session: k for k, s in enumerate(sessions)}
    members: dict[tuple, list] = {}
    for node in nodes:
        members.setdefault(find(node), []).append(node)
    keyed = sorted(members.values(), key=lambda m: min((order[s], lid) for s, lid in m))
    rows = [{"session": s, "lesion_id": lid, "track_id": t} for t, m in enumerate(keyed, start=1) for s, lid in m]
    table = pd.DataFrame(rows, columns=["session", "lesion_id", "track_id"])
    return table.sort_values(["track_id", "session", "lesion_id"], key=lambda c: c.map(order) if c.name == "session"
                             else c).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Per track: what each session says, its status and the combined probability
# ---------------------------------------------------------------------------------------------
def _num(table: pd.DataFrame, column: str) -> pd.Series:
    if column not in table:
        return pd.Series(np.nan, index=table.index)
    return pd.to_numeric(table[column], errors="coerce")


def session_view(assignments: pd.DataFrame, tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (track, session with the track present): lesion ids, volume, probability, call, doubt.

    A session holding several lesions of one track (a split, or the other side of a merge) reports them
    together: ids joined by '+', volumes summed, the largest probability and rim+ if any piece is rim+ (a
    rim on one piece is a rim on the lesion).
    """
    rows = []
    for (track, session), group in assignments.groupby(["track_id", "session"], sort=False):
        table = tables[session].set_index("lesion_id")
        part = table.loc[table.index.intersection(group["lesion_id"].astype(int))]
        part = part.reset_index()
        prob, unc, thr = _num(part, "probability"), _num(part, "uncertainty"), _num(part, "threshold")
        call = _num(part, "rim_positive")
        k = int(prob.fillna(-1).to_numpy().argmax()) if len(part) else 0
        p = float(prob.iloc[k]) if len(part) else np.nan
        u = float(unc.iloc[k]) if len(part) and np.isfinite(unc.iloc[k]) else 0.0
        t = float(thr.iloc[k]) if len(part) else np.nan
        rim = float(call.max()) if call.notna().any() else (float(p >= t) if np.isfinite(p) and np.isfinite(t) else np.nan)
        near = bool(np.isfinite(p) and np.isfinite(t) and (p - u) < t <= (p + u))
        rows.append({"track_id": int(track), "session": session,
                     "lesion_id": "+".join(str(int(i)) for i in sorted(group["lesion_id"])),
                     "n_lesions": int(len(group)), "volume_mm3": float(_num(part, "volume_mm3").sum()),
                     "probability": p, "uncertainty": u if np.isfinite(p) else np.nan, "threshold": t,
                     "rim_positive": rim, "near_threshold": near})
    return pd.DataFrame(rows)


def status(calls: Sequence[float | None], near: Sequence[bool] = ()) -> str:
    """Status of a track from its per-session calls (1 rim+, 0 rim-, None/NaN absent), in session order.

    persistent rim+: rim+ in the first and the last session and wherever seen between; new rim+: not rim+
    (rim- or not there yet) in the first session, rim+ from some session on to the last; resolved: rim+ in
    the first session, then rim- or no longer seen to the last; rim- throughout: never rim+. Anything else
    (a rim that comes and goes), or a status resting on a call whose probability lies within its ensemble
    spread of the threshold (``near``), is uncertain.
    """
    pos = [bool(c is not None and np.isfinite(c) and c >= 0.5) for c in calls]
    present = [bool(c is not None and np.isfinite(c)) for c in calls]
    if not any(pos):
        label = "rim- throughout"
    elif pos[0] and pos[-1]:
        label = "persistent rim+" if all(p for p, seen in zip(pos, present) if seen) else "uncertain"
    elif pos[-1]:
        onset = pos.index(True)
        label = "new rim+" if all(pos[onset:]) else "uncertain"
    elif pos[0]:
        end = pos.index(False)
        label = "resolved" if not any(pos[end:]) else "uncertain"
    else:
        label = "uncertain"
    if label != "uncertain" and any(near):
        return "uncertain"
    return label


def track_table(assignments: pd.DataFrame, tables: Mapping[str, pd.DataFrame], sessions: Sequence[str]) -> pd.DataFrame:
    """One row per track: per session (``<column>_ses-<label>``) lesion ids, volume, probability, call;
    status, volume change, the track-level probability and the status probabilities used for the counts."""
    view = session_view(assignments, tables)
    rows = []
    for track, group in view.groupby("track_id", sort=True):
        by = group.set_index("session")
        row: dict = {"track_id": int(track)}
        for s in sessions:
            present = s in by.index
            row[f"lesion_id_ses-{s}"] = by.at[s, "lesion_id"] if present else np.nan
            row[f"volume_mm3_ses-{s}"] = by.at[s, "volume_mm3"] if present else np.nan
            row[f"probability_ses-{s}"] = by.at[s, "probability"] if present else np.nan
            row[f"uncertainty_ses-{s}"] = by.at[s, "uncertainty"] if present else np.nan
            row[f"rim_positive_ses-{s}"] = by.at[s, "rim_positive"] if present else np.nan
        seen = [s for s in sessions if s in by.index]
        calls = [by.at[s, "rim_positive"] if s in by.index else None for s in sessions]
        near = [bool(by.at[s, "near_threshold"]) for s in seen if s in (sessions[0], sessions[-1])]
        row["sessions_present"] = len(seen)
        row["split_or_merge"] = int((group["n_lesions"] > 1).any())
        row["status"] = status(calls, near)
        v0, v1 = by.at[seen[0], "volume_mm3"], by.at[seen[-1], "volume_mm3"]
        row["volume_change_mm3"] = v1 - v0 if len(seen) > 1 else np.nan
        row["volume_change_percent"] = 100.0 * (v1 - v0) / v0 if len(seen) > 1 and v0 > 0 else np.nan
        probs = group["probability"].to_numpy(float)
        row["probability_track"] = float(np.nanmean(probs)) if np.isfinite(probs).any() else np.nan
        p_first = float(by.at[sessions[0], "probability"]) if sessions[0] in by.index else 0.0
        p_last = float(by.at[sessions[-1], "probability"]) if sessions[-1] in by.index else 0.0
        row["p_persistent"] = p_first * p_last
        row["p_new"] = (1.0 - p_first) * p_last
        row["p_resolved"] = p_first * (1.0 - p_last)
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Counts with intervals
# ---------------------------------------------------------------------------------------------
def participant_counts(tracks: pd.DataFrame, level: float = 0.95) -> dict:
    """Counts of each status by the calls, plus the model-based expected count and interval of each rim change.

    The interval treats each track's status probability (from the first and last sessions' rim+
    probabilities, e.g. persistent = p_first x p_last) as independent events: it is as good as the
    probabilities are calibrated.
    """
    out: dict = {"n_tracks": int(len(tracks))}
    statuses = tracks["status"] if "status" in tracks else pd.Series(dtype=str)
    for label in STATUSES:
        key = {"rim- throughout": "rimneg", "persistent rim+": "persistent", "new rim+": "new"}.get(label, label)
        out[f"n_{key}"] = int((statuses == label).sum())
    for label, key in COUNTED.items():
        expected, low, high = count_interval(tracks.get(f"p_{key}", pd.Series(dtype=float)).to_numpy(float), level)
        out[f"{key}_expected"], out[f"{key}_ci_low"], out[f"{key}_ci_high"] = expected, low, high
    return out
