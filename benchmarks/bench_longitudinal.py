"""Lesion tracks against the truth of a longitudinal phantom cohort (`qsmrim-synth --longitudinal`).

Reads the participant-level outputs of the cohort (run beforehand, one job per session as a cluster would)
and the generator's truth, builds each participant's tracks exactly as the group level does
(`workflows.longitudinal.track_participant`, with registration) and, as the obvious alternative, with
the sessions' scanner coordinates trusted instead of registered. Measures:

- matching: over every pair of lesions in two different covered sessions, precision and recall of "same
  track" against "same true lesion" (each app lesion is the true lesion it overlaps most in its QSM grid),
  also without the true lesions that are new or gone where, in the session without them, a neighbour's
  mask covers their place (a split and a new neighbour are then the same images: `ambiguous_truth`);
- status (persistent / new / resolved / rim- throughout) per true class, from the model's calls (as run, and
  at the bundled model's high-sensitivity threshold) and, to separate matching from classification, from
  the expert (truth) rim labels carried onto the lesions;
- the track-level rim+ probability (mean over the sessions) against the session's own probability, PR AUC
  with the paired participant bootstrap, per lesion-session (label: rim+ in that session) and per session.

Writes ``benchmarks/results/longitudinal.json``.

    python benchmarks/bench_longitudinal.py --bids BIDS --truth BIDS_truth --out OUTPUT [--participants 01 02 ..]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qsmrim_app import derivatives as drv  # noqa: E402
from qsmrim_app import tracks as trk  # noqa: E402
from qsmrim_app.model.metrics import paired_bootstrap  # noqa: E402
from qsmrim_app.synthetic.longitudinal import status_of  # noqa: E402
from qsmrim_app.workflows.longitudinal import track_participant  # noqa: E402

TRUTH_CLASSES = ("persistent rim+", "new rim+", "resolved", "rim- throughout")


def truth_of_lesions(out: Path, truth: Path, subject: str, session: str) -> dict[int, int]:
    """App lesion id -> true track (the true lesion it overlaps most; 0 when it overlaps none)."""
    unit = drv.Unit(subject, session)
    app = np.asarray(nib.load(drv.output_path(out, unit, "lesions_dseg")).dataobj, dtype=np.int64)
    true = np.asarray(nib.load(truth / f"sub-{subject}" / f"ses-{session}"
                               / f"sub-{subject}_ses-{session}_space-QSM_desc-tracks_dseg.nii.gz").dataobj, np.int64)
    if app.shape != true.shape:
        raise ValueError(f"sub-{subject} ses-{session}: app and truth grids differ {app.shape} vs {true.shape}")
    mapping = {}
    for lid in np.unique(app[app > 0]):
        hits = true[app == lid]
        hits = hits[hits > 0]
        mapping[int(lid)] = int(np.bincount(hits).argmax()) if hits.size else 0
    return mapping


def ambiguous_truth(assignments: pd.DataFrame, truth_id: dict, maps: dict[str, np.ndarray]) -> set[int]:
    """True lesions that are missing from some session while their place there is inside another lesion's mask.

    The generator lets a lesion appear (or go) next to one it overlaps; in the session without it, the
    neighbour's mask covers its place, so "a new lesion" and "the neighbour split in two" (or "merged")
    are the same images: no method can tell them apart. These are reported apart, not dropped.
    """
    out = set()
    by_truth: dict[int, list[tuple[str, int]]] = {}
    for (s, lid), g in truth_id.items():
        if g:
            by_truth.setdefault(g, []).append((s, lid))
    for g, lesions in by_truth.items():
        present = {s for s, _ in lesions}
        for s_absent in set(maps) - present:
            for s, lid in lesions:
                if np.any(maps[s_absent][maps[s] == lid] > 0):
                    out.add(g)
    return out


def pair_counts(assignments: pd.DataFrame, truth_id: dict[tuple[str, int], int],
                skip: set[int] = frozenset()) -> dict[str, int]:
    """TP/FP/FN over pairs of lesions of different sessions: same track vs same true lesion (pairs with a
    lesion of a true lesion in ``skip`` are left out)."""
    rows = [(r.session, int(r.lesion_id), int(r.track_id)) for r in assignments.itertuples()]
    tp = fp = fn = 0
    for i, (s1, l1, t1) in enumerate(rows):
        for s2, l2, t2 in rows[i + 1:]:
            if s1 == s2:
                continue
            g1, g2 = truth_id.get((s1, l1), 0), truth_id.get((s2, l2), 0)
            if g1 in skip or g2 in skip:
                continue
            same_true = g1 > 0 and g1 == g2
            same_track = t1 == t2
            tp += same_true and same_track
            fp += same_track and not same_true
            fn += same_true and not same_track
    return {"tp": tp, "fp": fp, "fn": fn}


def _prf(c: dict) -> dict:
    precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else float("nan")
    recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else float("nan")
    return {**c, "precision": precision, "recall": recall}


def app_status_of_truth(assignments: pd.DataFrame, tracks: pd.DataFrame, truth_id: dict) -> dict[int, str]:
    """True track -> status the app gives it ('missed' when no lesion of it was found, 'fragmented' when its
    lesions ended in several tracks)."""
    status = tracks.set_index("track_id")["status"].to_dict()
    out: dict[int, set] = {}
    for r in assignments.itertuples():
        g = truth_id.get((r.session, int(r.lesion_id)), 0)
        if g:
            out.setdefault(g, set()).add(int(r.track_id))
    return {g: (status[next(iter(ts))] if len(ts) == 1 else "fragmented") for g, ts in out.items()}


def expert_tables(out: Path, subject: str, sessions: list[str], truth_rim: dict) -> dict[str, pd.DataFrame]:
    """The sessions' rim tables with the truth rim label as the call (probability 0/1, no spread)."""
    tables = {}
    for s in sessions:
        table = drv.read_tsv(drv.output_path(out, drv.Unit(subject, s), "rim_lesions")).copy()
        label = [truth_rim.get((s, int(lid)), 0) for lid in table["lesion_id"]]
        table["probability"] = np.asarray(label, float)
        table["rim_positive"] = label
        table["uncertainty"] = 0.0
        table["threshold"] = 0.5
        tables[s] = table
    return tables


def rethresholded_tables(out: Path, subject: str, sessions: list[str], threshold: float) -> dict[str, pd.DataFrame]:
    """The sessions' rim tables called at another threshold (e.g. the model's high-sensitivity point)."""
    tables = {}
    for s in sessions:
        table = drv.read_tsv(drv.output_path(out, drv.Unit(subject, s), "rim_lesions")).copy()
        table["rim_positive"] = (table["probability"] >= threshold).astype(int)
        table["threshold"] = threshold
        tables[s] = table
    return tables


def status_accuracy(pairs: list[tuple[str, str]]) -> dict:
    out = {}
    for cls in TRUTH_CLASSES:
        got = [a for t, a in pairs if t == cls]
        out[cls] = {"n": len(got), "correct": sum(a == cls for a in got),
                    "accuracy": (sum(a == cls for a in got) / len(got)) if got else float("nan"),
                    "called": {k: got.count(k) for k in sorted(set(got))}}
    decided = [(t, a) for t, a in pairs if t in TRUTH_CLASSES and a != "uncertain"]
    out["overall"] = {"n": len(pairs), "accuracy": float(np.mean([t == a for t, a in pairs])) if pairs else float("nan"),
                      "n_not_uncertain": len(decided),
                      "accuracy_not_uncertain": float(np.mean([t == a for t, a in decided])) if decided else float("nan")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bids", type=Path, required=True)
    parser.add_argument("--truth", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="qsmrim output dir (participant level run)")
    parser.add_argument("--participants", nargs="*", default=None)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "longitudinal.json")
    args = parser.parse_args(argv)

    truth_rows = pd.read_csv(args.truth / "tracks.tsv", sep="\t")
    truth_rows["session"] = truth_rows["session"].str.replace("ses-", "", regex=False)
    subjects = sorted({p.name[4:] for p in args.out.glob("sub-*") if p.is_dir()})
    if args.participants:
        subjects = [s for s in subjects if s in set(args.participants)]
    match = {name: {"tp": 0, "fp": 0, "fn": 0} for name in ("registered", "registered_identifiable",
                                                             "scanner_coordinates", "scanner_coordinates_identifiable")}
    n_ambiguous = 0
    statuses_model, statuses_expert, statuses_alt, statuses_hs = [], [], [], []
    model_meta = json.loads((REPO / "qsmrim_app" / "data" / "model" / "model.json").read_text())
    high_sensitivity = float(model_meta["thresholds"]["high-sensitivity"])
    inst_y, inst_track, inst_session, inst_cluster, inst_index = [], [], [], [], []
    trk_y, trk_p, trk_first, trk_last, trk_cluster = [], [], [], [], []
    per_participant, seconds = [], []
    for sub in subjects:
        start = time.process_time()
        result = track_participant(args.out, args.bids, sub, write=False, keep_maps=True)
        seconds.append(time.process_time() - start)
        if result is None or result.assignments is None:
            continue
        alternative = track_participant(args.out, args.bids, sub, register=False, write=False)
        sessions = result.sessions
        truth_id = {(s, lid): g for s in sessions for lid, g in truth_of_lesions(args.out, args.truth, sub, s).items()}
        rows = truth_rows[(truth_rows["participant_id"] == f"sub-{sub}") & truth_rows["session"].isin(sessions)]
        present = rows.pivot(index="track", columns="session", values="present").reindex(columns=sessions)
        rim = rows.pivot(index="track", columns="session", values="rim_positive").reindex(columns=sessions)
        truth_status = {int(g): status_of([bool(v) for v in present.loc[g]], [bool(v) for v in rim.loc[g]])
                        for g in present.index if present.loc[g].any()}
        truth_rim = {(s, lid): int(rim.at[g, s]) if g in rim.index else 0 for (s, lid), g in truth_id.items()}
        ambiguous = ambiguous_truth(result.assignments, truth_id, result.maps)
        n_ambiguous += len(ambiguous)
        for name, res in (("registered", result), ("scanner_coordinates", alternative)):
            for part, skip in (("", set()), ("_identifiable", ambiguous)):
                c = pair_counts(res.assignments, truth_id, skip)
                for k in c:
                    match[name + part][k] += c[k]
        app = app_status_of_truth(result.assignments, result.tracks, truth_id)
        alt = app_status_of_truth(alternative.assignments, alternative.tracks, truth_id)
        expert_tracks = trk.track_table(result.assignments, expert_tables(args.out, sub, sessions, truth_rim), sessions)
        expert = app_status_of_truth(result.assignments, expert_tracks, truth_id)
        hs_tracks = trk.track_table(result.assignments, rethresholded_tables(args.out, sub, sessions, high_sensitivity),
                                    sessions)
        hs = app_status_of_truth(result.assignments, hs_tracks, truth_id)
        for g, st in truth_status.items():
            statuses_model.append((st, app.get(g, "missed")))
            statuses_expert.append((st, expert.get(g, "missed")))
            statuses_alt.append((st, alt.get(g, "missed")))
            statuses_hs.append((st, hs.get(g, "missed")))
        # track-level probability vs the session's own, per lesion-session
        ptrack = result.tracks.set_index("track_id")["probability_track"].to_dict()
        for s_index, s in enumerate(sessions):
            table = drv.read_tsv(drv.output_path(args.out, drv.Unit(sub, s), "rim_lesions")).set_index("lesion_id")
            for r in result.assignments[result.assignments["session"] == s].itertuples():
                inst_y.append(truth_rim.get((s, int(r.lesion_id)), 0))
                inst_session.append(float(table.at[int(r.lesion_id), "probability"]))
                inst_track.append(float(ptrack[int(r.track_id)]))
                inst_cluster.append(sub)
                inst_index.append(s_index)
        # per track: rim+ in any covered session, from the track probability or one session alone
        for t in result.tracks.to_dict("records"):
            ids = result.assignments[result.assignments["track_id"] == t["track_id"]]
            ys = [truth_rim.get((r.session, int(r.lesion_id)), 0) for r in ids.itertuples()]
            trk_y.append(int(max(ys)))
            trk_p.append(float(t["probability_track"]))
            first, last = t[f"probability_ses-{sessions[0]}"], t[f"probability_ses-{sessions[-1]}"]
            trk_first.append(0.0 if not np.isfinite(first) else float(first))  # not seen there: not rim+ there
            trk_last.append(0.0 if not np.isfinite(last) else float(last))
            trk_cluster.append(sub)
        per_participant.append({"participant": f"sub-{sub}", "sessions": sessions, "missing": result.missing,
                                "tracks": int(len(result.tracks)), **result.counts})

    y, clusters = np.asarray(inst_y), np.asarray(inst_cluster)
    probability = {"per_lesion_session": {
        "n": int(y.size), "n_rimplus": int(y.sum()),
        "track_minus_session": paired_bootstrap(y, np.asarray(inst_track), np.asarray(inst_session), clusters,
                                                n_boot=args.n_boot)}}
    for k in sorted(set(inst_index)):
        sel = np.asarray(inst_index) == k
        if len(set(y[sel])) == 2:
            probability[f"session_{k + 1}_only"] = {
                "n": int(sel.sum()), "n_rimplus": int(y[sel].sum()),
                "track_minus_session": paired_bootstrap(y[sel], np.asarray(inst_track)[sel],
                                                        np.asarray(inst_session)[sel], clusters[sel],
                                                        n_boot=args.n_boot)}
    ty, tc = np.asarray(trk_y), np.asarray(trk_cluster)
    probability["per_track_rim_any_session"] = {
        "n": int(ty.size), "n_rimplus": int(ty.sum()),
        "track_minus_first_session": paired_bootstrap(ty, np.asarray(trk_p), np.asarray(trk_first), tc,
                                                      n_boot=args.n_boot),
        "track_minus_last_session": paired_bootstrap(ty, np.asarray(trk_p), np.asarray(trk_last), tc,
                                                     n_boot=args.n_boot)}
    results = {
        "command": " ".join(["python", "benchmarks/bench_longitudinal.py", *(argv if argv is not None else sys.argv[1:])]),
        "cohort": json.loads((args.truth / "longitudinal.json").read_text()),
        "participants": len(per_participant), "lesion_sessions": int(y.size), "tracks": int(ty.size),
        "matching": {k: _prf(v) for k, v in match.items()},
        "ambiguous_true_lesions": n_ambiguous,
        "status_model_calls": status_accuracy(statuses_model),
        "status_expert_labels": status_accuracy(statuses_expert),
        "status_model_calls_scanner_coordinates": status_accuracy(statuses_alt),
        "status_model_high_sensitivity": {"threshold": high_sensitivity, **status_accuracy(statuses_hs)},
        "track_probability": probability,
        "cpu_seconds_per_participant": {"mean": float(np.mean(seconds)) if seconds else None,
                                        "max": float(np.max(seconds)) if seconds else None},
        "per_participant": per_participant,
        "host": platform.node(),
        "note": ("lesion pairs: every pair of app lesions in two different covered sessions; every app lesion has "
                 ">= 10 QSM voxels (the participant level's --min-lesion-voxels), so the figures are those for "
                 "lesions of 10 voxels or more. Truth statuses are over the sessions the tracks cover."),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(drv._finite(results), indent=2, default=drv._json_default) + "\n")
    m = results["matching"]
    print(f"identifiable (without {n_ambiguous} true lesions new/gone inside a neighbour's mask): precision "
          f"{m['registered_identifiable']['precision']:.3f} recall {m['registered_identifiable']['recall']:.3f}")
    print(f"matching (registered): precision {m['registered']['precision']:.3f} recall {m['registered']['recall']:.3f}; "
          f"scanner coordinates: precision {m['scanner_coordinates']['precision']:.3f} "
          f"recall {m['scanner_coordinates']['recall']:.3f}")
    for key in ("status_model_calls", "status_model_high_sensitivity", "status_expert_labels"):
        print(key, {k: (v["n"], round(v["accuracy"], 3) if v.get("accuracy") == v.get("accuracy") else None)
                    for k, v in results[key].items() if k in TRUTH_CLASSES},
              "overall", round(results[key]["overall"]["accuracy"], 3))
    pr = probability["per_lesion_session"]["track_minus_session"]["pr_auc"]
    print(f"PR AUC per lesion-session: track {pr['a']:.3f} vs session {pr['b']:.3f}, "
          f"difference {pr['difference']:+.3f} [{pr['ci_low']:+.3f}, {pr['ci_high']:+.3f}]")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
