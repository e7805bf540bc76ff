"""Lesion tracks end to end: longitudinal phantom -> participant level per session -> group level tracks.

The generator test is fast; the command-line test runs the real app (one session's inputs broken on
purpose, so it also checks what a failed session leaves) and is marked slow.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from qsmrim_app import derivatives as drv

REPO = Path(__file__).resolve().parent.parent


def run(*args, module: str | None = None, check_code: int | None = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(["-m", module] if module else [str(REPO / "run.py")]), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    if check_code is not None:
        assert proc.returncode == check_code, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_longitudinal_phantom_has_track_truth_on_other_grids(tmp_path):
    from qsmrim_app.synthetic.longitudinal import Rates, generate_longitudinal

    rates = Rates(new=0.5, vanish=0.3, rim_persist=0.5, rim_appear=0.5)
    truth = generate_longitudinal(tmp_path / "bids", 1, sessions=2, seed=1, rimplus_fraction=0.5, rates=rates)
    rows = pd.read_csv(truth / "tracks.tsv", sep="\t")
    status = pd.read_csv(truth / "track_status.tsv", sep="\t")
    grids = []
    for ses in ("01", "02"):
        qsm = nib.load(tmp_path / "bids" / "sub-01" / f"ses-{ses}" / "anat" / f"sub-01_ses-{ses}_Chimap.nii.gz")
        true = nib.load(truth / "sub-01" / f"ses-{ses}" / f"sub-01_ses-{ses}_space-QSM_desc-tracks_dseg.nii.gz")
        assert np.allclose(qsm.affine, true.affine) and qsm.shape == true.shape
        grids.append(qsm.header.get_zooms())
        here = rows[rows["session"] == f"ses-{ses}"]
        ids = set(np.unique(np.asarray(true.dataobj))) - {0}
        assert set(here.loc[here["present"] == 1, "track"]) <= ids
        # the drawn mask's rim labels are those of the truth for the lesions it holds
        deriv = tmp_path / "bids" / "derivatives" / "lesions" / "sub-01" / f"ses-{ses}" / "anat"
        rim = np.asarray(nib.load(deriv / f"sub-01_ses-{ses}_desc-rim_dseg.nii.gz").dataobj)
        assert (rim == 2).any() == bool(here["rim_positive"].any())
    assert not np.allclose(grids[0], grids[1])  # another QSM voxel size in the follow-up
    assert set(status["status"]) <= {"persistent rim+", "new rim+", "resolved", "rim- throughout", "uncertain"}
    assert len(status) == int((rows.groupby("track")["present"].max() > 0).sum())
    assert (rows["rater_scale"].nunique()) == 2  # the mask redrawn by a different "rater" per session



def test_new_and_vanishing_lesions_keep_a_gap_to_every_other_lesion(tmp_path):
    """A lesion that appears or goes is never next to another one: its truth must be visible in the images."""
    from scipy import ndimage

    from qsmrim_app.synthetic.anatomy import SIZES, draw_counts, make_anatomy, rng_for
    from qsmrim_app.synthetic.longitudinal import (MIN_GAP_MM, RELOCATE_STREAM, STREAM, Rates, _scaled,
                                                   generate_longitudinal, lesion_gap_mm, plan_tracks,
                                                   separate_changing)

    rates = Rates(new=0.5, vanish=0.3)
    # the plan: every changing lesion, in every session it shares with another, at the largest drawing
    n_lesions, n_rim = draw_counts(rng_for(3, 0, 0), SIZES["small"], 0.5)
    anat = make_anatomy(rng_for(3, 0, 1), SIZES["small"], max(n_lesions, 12), n_rim)
    planned = plan_tracks(anat, 3, rates, rng_for(3, 0, STREAM))
    changing = [k for k, t in enumerate(planned) if t.onset > 0 or t.end < 2]
    near = [k for k in changing if any(lesion_gap_mm(planned[k].lesion, o.lesion) < MIN_GAP_MM
                                       for j, o in enumerate(planned) if j != k)]
    assert near  # the raw plan does put changing lesions next to others: the test can fail
    anat2, tracks = separate_changing(anat, planned, 3, rng_for(3, 0, RELOCATE_STREAM), 1.06)
    again = separate_changing(anat, planned, 3, rng_for(3, 0, RELOCATE_STREAM), 1.06)[0]
    assert all(np.allclose(a.center, b.center) for a, b in zip(anat2.lesions, again.lesions))  # deterministic
    still = [k for k, t in enumerate(tracks) if t.onset > 0 or t.end < 2]
    assert len(still) >= len(changing) - 1  # moved, not simply made stable
    for k in still:
        for j, other in enumerate(tracks):
            for s in range(max(tracks[k].onset, other.onset), min(tracks[k].end, other.end) + 1):
                if j != k:
                    gap = lesion_gap_mm(_scaled(tracks[k].lesion, tracks[k].scale[s] * 1.06),
                                        _scaled(other.lesion, other.scale[s] * 1.06), step=0.25)
                    assert gap >= MIN_GAP_MM, (k, j, s, gap)

    # the written cohort: in every session's true track map, voxels of a lesion that is new or gone at
    # some session lie at least MIN_GAP_MM from every other lesion's voxels
    truth = generate_longitudinal(tmp_path / "bids", 1, sessions=3, seed=3, rimplus_fraction=0.5, rates=rates)
    rows = pd.read_csv(truth / "tracks.tsv", sep="\t")
    exists = rows.pivot(index="track", columns="session", values="exists")
    moving = set(exists.index[exists.min(axis=1) == 0])
    assert moving
    checked = 0
    for ses in ("01", "02", "03"):
        img = nib.load(truth / "sub-01" / f"ses-{ses}" / f"sub-01_ses-{ses}_space-QSM_desc-tracks_dseg.nii.gz")
        ids = np.asarray(img.dataobj)
        for k in moving & set(np.unique(ids)) - {0}:
            others = (ids > 0) & (ids != k)
            if others.any():
                dist = ndimage.distance_transform_edt(~others, sampling=img.header.get_zooms()[:3])
                assert dist[ids == k].min() >= MIN_GAP_MM
                checked += 1
    assert checked


@pytest.mark.slow
def test_tracks_through_the_command_line_with_a_failed_session(tmp_path):
    bids, out = tmp_path / "bids", tmp_path / "out"
    run(bids, "--subjects", "1", "--sessions", "3", "--longitudinal", "--seed", "1", "--rimplus-fraction", "0.5",
        module="qsmrim_app.synthetic")
    chimap = bids / "sub-01" / "ses-03" / "anat" / "sub-01_ses-03_Chimap.nii.gz"
    chimap.write_bytes(chimap.read_bytes()[:2000])  # ses-03 fails at the participant level
    # a low threshold so that some lesions are called rim+ whatever the bundled model makes of this small phantom
    run(bids, out, "participant", "-w", tmp_path / "work", "--nprocs", "2", "-d", bids / "derivatives" / "lesions",
        "--threshold", "0.3", check_code=None)
    assert drv.output_path(out, drv.Unit("01", "02"), "summary").is_file()
    assert not drv.output_path(out, drv.Unit("01", "03"), "summary").is_file()
    run(bids, out, "group", "-w", tmp_path / "work", check_code=None)

    table_path = drv.tracks_path(out, drv.Unit("01"))
    tracks = drv.read_tsv(table_path)
    sidecar = json.loads(drv.sidecar_path(table_path).read_text())
    assert sidecar["SessionsCovered"] == ["ses-01", "ses-02"]
    assert list(sidecar["SessionsMissing"]) == ["ses-03"]
    assert not any(c.endswith("ses-03") for c in tracks.columns)
    assert set(tracks.columns) <= set(sidecar)  # every column is described
    # every lesion of each covered session is in exactly one track
    for ses in ("01", "02"):
        lesions = drv.read_tsv(drv.output_path(out, drv.Unit("01", ses), "rim_lesions"))["lesion_id"]
        listed = [int(i) for cell in tracks[f"lesion_id_ses-{ses}"].dropna().astype(str) for i in cell.split("+")]
        assert sorted(listed) == sorted(lesions.astype(int))
    assert (tracks["sessions_present"] == 2).mean() > 0.8  # the same lesions are found again
    xfm = drv.session_transform_path(out, drv.Unit("01"), "02", "01")
    assert xfm.is_file() and json.loads(drv.sidecar_path(xfm).read_text())["MetricAfter"] < -0.5

    group = drv.read_tsv(out / "group_rimtracks.tsv")
    row = group.iloc[0]
    assert row["participant_id"] == "sub-01" and row["sessions_missing"] == "ses-03"
    assert row["sessions_covered"] == "ses-01,ses-02"
    for key, label in (("persistent", "persistent rim+"), ("new", "new rim+"), ("resolved", "resolved"),
                       ("uncertain", "uncertain")):
        assert row[f"n_{key}"] == (tracks["status"] == label).sum()
    assert row["n_tracks"] == len(tracks)

    # the tracks page: one side-by-side image (2 sessions wide) per track that is rim+ in some session
    page = drv.tracks_report_path(out, drv.Unit("01")).read_text()
    rim_any = (tracks[[c for c in tracks.columns if c.startswith("rim_positive_ses-")]] == 1).any(axis=1)
    assert rim_any.sum() >= 1
    figures = page.count('<figure class="track"')
    assert figures == rim_any.sum()
    from io import BytesIO

    from PIL import Image

    uri = page.split('src="data:image/png;base64,')[1].split('"')[0]
    image = np.asarray(Image.open(BytesIO(base64.b64decode(uri))))
    assert image.shape[1] > 2 * image.shape[0] - 10 and image.std() > 10  # two tiles with content
    assert "Lesion tracks" in (out / "group_report.html").read_text()
    assert "ses-03 not covered" in page

    # a rerun gives the same tracks
    before = table_path.read_bytes()
    run(bids, out, "group", "-w", tmp_path / "work", check_code=None)
    assert table_path.read_bytes() == before

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        shot = tmp_path / "tracks.png"
        subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--window-size=1200,1600", f"--screenshot={shot}",
                        drv.tracks_report_path(out, drv.Unit("01")).as_uri()], capture_output=True, timeout=120)
        assert shot.is_file() and np.asarray(Image.open(shot)).std() > 10


def test_review_shows_the_other_sessions_and_decides_for_a_whole_track(tmp_path, monkeypatch):
    import test_review as tr

    from qsmrim_app.workflows.longitudinal import track_participant

    box = (slice(5, 9), slice(5, 9), slice(3, 6))
    moved = (slice(6, 10), slice(5, 9), slice(3, 6))  # the same lesion, one voxel on, at the follow-up
    monkeypatch.setattr(tr, "LESIONS", {
        drv.Unit("03", "1"): [(box, 0.9), ((slice(20, 25), slice(20, 24), slice(8, 11)), 0.3)],
        drv.Unit("03", "2"): [(moved, 0.8), ((slice(30, 34), slice(8, 12), slice(12, 15)), 0.7)],
    })
    bids, out = tr.make_outputs(tmp_path)
    result = track_participant(out, bids, "03", register=False)  # one scanner frame here: nothing to register
    tracks = drv.read_tsv(drv.tracks_path(out, drv.Unit("03")))
    assert list(tracks["status"]) == ["persistent rim+", "rim- throughout", "new rim+"]
    assert result.counts["n_persistent"] == 1 and result.counts["n_new"] == 1
    running = tr.start(bids, out, tmp_path / "review")
    try:
        status, detail = running.json("/api/lesion?participant=sub-03&session=1&lesion_id=1")
        assert status == 200
        track = detail["track"]
        assert track["track_id"] == 1 and track["status"] == "persistent rim+"
        assert [(s["session"], s["lesion_ids"], s["current"]) for s in track["sessions"]] == [
            ("1", [1], True), ("2", [1], False)]
        assert track["sessions"][1]["probability"] == pytest.approx(0.8)
        status, _ = running.json("/api/decision", {"participant": "sub-03", "session": "1", "lesion_id": 1,
                                                   "decision": "rimpos", "track": "yes"})
        assert status == 400
        status, saved = running.json("/api/decision", {"participant": "sub-03", "session": "1", "lesion_id": 1,
                                                       "decision": "rimpos", "track": True})
        assert status == 200 and saved["applied"] == [{"session": "1", "lesion_id": 1}, {"session": "2", "lesion_id": 1}]
        for ses in ("1", "2"):
            decisions = drv.read_tsv(drv.review_path(tmp_path / "review", drv.Unit("03", ses), "rim_decisions"))
            assert decisions[["lesion_id", "decision"]].values.tolist() == [[1, "rimpos"]]
        _, detail = running.json("/api/lesion?participant=sub-03&session=2&lesion_id=1")
        assert detail["decision"] == "rimpos" and detail["track"]["sessions"][0]["decision"] == "rimpos"
        # without "track" only the lesion itself changes
        running.json("/api/decision", {"participant": "sub-03", "session": "2", "lesion_id": 1, "decision": "rimneg"})
        _, detail = running.json("/api/lesion?participant=sub-03&session=1&lesion_id=1")
        assert detail["decision"] == "rimpos"
        # the follow-up's new lesion is a track of its own
        _, detail = running.json("/api/lesion?participant=sub-03&session=2&lesion_id=2")
        assert detail["track"]["track_id"] == 3
    finally:
        running.close()


def test_a_session_without_outputs_is_listed_and_stale_files_go(tmp_path, monkeypatch):
    import test_review as tr

    from qsmrim_app.workflows.longitudinal import track_participant

    box = (slice(5, 9), slice(5, 9), slice(3, 6))
    monkeypatch.setattr(tr, "LESIONS", {drv.Unit("04", "1"): [(box, 0.9)], drv.Unit("04", "2"): [(box, 0.2)]})
    bids, out = tr.make_outputs(tmp_path)
    (bids / "sub-04" / "ses-3" / "anat").mkdir(parents=True)  # in the raw dataset, never run
    stale = drv.session_transform_path(out, drv.Unit("04"), "3", "1")
    drv.write_text(stale, "an earlier run's transform")
    drv.write_json(drv.sidecar_path(stale), {})
    result = track_participant(out, bids, "04", register=False)
    assert result.sessions == ["1", "2"] and result.missing == {"3": "no participant-level outputs"}
    sidecar = json.loads(drv.sidecar_path(drv.tracks_path(out, drv.Unit("04"))).read_text())
    assert sidecar["SessionsMissing"] == {"ses-3": "no participant-level outputs"}
    assert not stale.exists() and not drv.sidecar_path(stale).exists()
    assert list(result.tracks["status"]) == ["resolved"]
    # one session left: a table that says so, no tracks, no page
    drv.output_path(out, drv.Unit("04", "2"), "rim_lesions").unlink()
    result = track_participant(out, bids, "04", register=False)
    assert result.sessions == ["1"] and result.tracks.empty
    sidecar = json.loads(drv.sidecar_path(drv.tracks_path(out, drv.Unit("04"))).read_text())
    assert sidecar["SessionsCovered"] == ["ses-1"] and set(sidecar["SessionsMissing"]) == {"ses-2", "ses-3"}
    assert not drv.tracks_report_path(out, drv.Unit("04")).exists()
