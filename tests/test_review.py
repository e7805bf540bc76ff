"""qsmrim-review: the server's API, its files, its refusals, and the views' geometry.

The outputs here are written with the app's own derivatives functions on a small grid (no pipeline
run), so these tests take seconds; tests/test_review_browser.py drives the real page over real
pipeline outputs.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qsmrim_app import derivatives as drv
from qsmrim_app.config import BUNDLED_MODEL_DIR, ReviewConfig
from qsmrim_app.lesions import lesion_geometry
from qsmrim_app.patches import extract_patches, save_patches
from qsmrim_app.review.catalog import build_catalog, default_review_dir, parse_label
from qsmrim_app.review.images import Volumes, plane_points, render, sample
from qsmrim_app.review.server import TOKEN_HEADER, ReviewApp, make_server
from qsmrim_app.review.store import DecisionStore, majority

REPO = Path(__file__).resolve().parent.parent
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
SHAPE = (40, 40, 20)
#: unit -> [(lesion box as slices, probability)]
LESIONS = {
    drv.Unit("01"): [((slice(5, 9), slice(5, 9), slice(3, 6)), 0.9), ((slice(20, 25), slice(20, 24), slice(8, 11)), 0.2),
                     ((slice(30, 34), slice(8, 12), slice(12, 15)), 0.55)],
    drv.Unit("02", "1"): [((slice(10, 14), slice(25, 30), slice(5, 8)), 0.7), ((slice(26, 30), slice(26, 30), slice(14, 17)), 0.1)],
}


def tree_digest(root: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def make_outputs(root: Path) -> tuple[Path, Path]:
    """A raw dataset with QSM maps (ppm) and qsmrim-like participant outputs over it."""
    bids, out = root / "bids", root / "out"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    drv.init_output_dir(out, bids)
    model_id = json.loads((BUNDLED_MODEL_DIR / "model.json").read_text())["model_id"]
    rng = np.random.default_rng(0)
    for unit, lesions in LESIONS.items():
        qsm_ppm = rng.normal(0, 0.01, SHAPE).astype(np.float32)
        instances = np.zeros(SHAPE, np.int32)
        for lesion_id, (box, _) in enumerate(lesions, start=1):
            instances[box] = lesion_id
        qsm_ppm[instances > 0] += 0.03
        raw = unit.folder(bids) / f"{unit.prefix}_Chimap.nii.gz"
        drv.write_nifti(raw, qsm_ppm, AFFINE)
        rel = raw.relative_to(bids).as_posix()
        dseg = drv.output_path(out, unit, "lesions_dseg")
        drv.write_with_sidecar(dseg, lambda p: drv.write_nifti(p, instances, AFFINE),
                               sources=[f"bids:raw:{rel}"], metadata={"SpatialReference": f"bids:raw:{rel}"})
        flair = np.where(instances > 0, 300.0, 100.0).astype(np.float32)
        drv.write_nifti(drv.output_path(out, unit, "flair_preproc"), flair, AFFINE)
        ids = list(range(1, len(lesions) + 1))
        patches = extract_patches(qsm_ppm * 1000.0, flair, instances, ids, AFFINE)
        patches = type(patches)(patches.patches, patches.lesion_ids, patches.grid,
                                np.tile(np.float32([0.0, 10.0]), (len(ids), 1)), [])
        save_patches(drv.output_path(out, unit, "patches"), patches, [1.0, 1.0, 2.0])
        table = lesion_geometry(instances, AFFINE)
        table["probability"] = [p for _, p in lesions]
        table["uncertainty"] = 0.05
        table["votes"] = 1.0
        table["rim_positive"] = (table["probability"] >= 0.577).astype(int)
        table["threshold"] = 0.577
        drv.write_tsv(drv.output_path(out, unit, "rim_lesions"), table)
        drv.write_tsv(drv.output_path(out, unit, "summary"), pd.DataFrame([{
            "participant_id": unit.participant_id, "session": unit.session or "n/a", "n_lesions": len(ids),
            "n_rimplus": int(table["rim_positive"].sum()), "model_id": model_id}]))
    return bids, out


@pytest.fixture()
def outputs(tmp_path) -> tuple[Path, Path]:
    return make_outputs(tmp_path)


class Running:
    """A review server in a thread, with small request helpers."""

    def __init__(self, app: ReviewApp) -> None:
        self.app = app
        self.server = make_server(app)
        self.base = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def request(self, path: str, body: dict | None = None, token: str | None = "", header: bool = True):
        token = self.app.token if token == "" else token
        headers = {TOKEN_HEADER: token} if (token and header) else {}
        if token and not header:
            path += ("&" if "?" in path else "?") + f"token={token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=headers,
                                     method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, response.read(), response.headers.get("Content-Type")
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers.get("Content-Type")

    def json(self, path: str, body: dict | None = None):
        status, data, _ = self.request(path, body)
        return status, json.loads(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start(bids: Path, out: Path, review: Path, rater: str = "alice", operating_point: str = "high-sensitivity"):
    config = ReviewConfig(output_dir=out, review_dir=review, bids_dir=None, operating_point=operating_point,
                          rater=rater)
    catalog = build_catalog(config)
    return Running(ReviewApp(catalog=catalog, store=DecisionStore(review, out, catalog), rater=rater))


@pytest.fixture()
def server(outputs, tmp_path):
    bids, out = outputs
    running = start(bids, out, tmp_path / "review")
    yield running
    running.close()


def test_majority_rule():
    assert majority([]) == 0
    assert majority(["rimpos"]) == 2 and majority(["rimneg"]) == 1 and majority(["unsure"]) == 0
    assert majority(["rimpos", "rimneg"]) == 0  # tied raters
    assert majority(["rimpos", "rimpos", "rimneg"]) == 2
    assert majority(["rimneg", "rimneg", "rimpos", "unsure"]) == 1
    assert majority(["rimpos", "unsure"]) == 0


def test_labels_are_letters_and_digits_only():
    assert parse_label("sub-01", "sub-") == "01" and parse_label("01", "sub-") == "01"
    for bad in ("../01", "01/..", "sub-01/../../etc", "", "sub-", "0 1", "%2e%2e", None, 1):
        assert parse_label(bad, "sub-") is None


def test_default_review_dir_is_never_inside_the_input(tmp_path):
    bids = tmp_path / "ds"
    assert default_review_dir(bids / "derivatives" / "qsmrim", bids) == tmp_path / "qsmrim-review"
    assert default_review_dir(tmp_path / "out" / "qsmrim", bids) == tmp_path / "out" / "qsmrim-review"


def test_every_request_without_the_token_is_forbidden(server):
    for path in ("/", "/api/queue", "/api/status", "/api/lesion?participant=01&lesion_id=1",
                 "/api/lesion.png?participant=01&lesion_id=1", "/favicon.ico", "/../../etc/passwd"):
        assert server.request(path, token=None)[0] == 403, path
        assert server.request(path, token="wrong")[0] == 403, path
    status, _, _ = server.request("/api/decision", {"participant": "01", "session": None, "lesion_id": 1,
                                                    "decision": "rimpos"}, token=None)
    assert status == 403
    assert not drv.review_path(server.app.store.review_dir, drv.Unit("01"), "rim_decisions").exists()
    # With the token, in the query (the page's images) or the header (its fetches).
    status, body, kind = server.request("/", header=False)
    assert status == 200 and kind.startswith("text/html") and b"qsmrim-review" in body
    assert b"http://" not in body and b"https://" not in body  # offline: nothing from a CDN


def test_queue_is_exactly_the_documented_shape_in_review_order(server):
    status, queue = server.json("/api/queue")
    assert status == 200
    assert all(set(item) == {"participant", "session", "lesion_id", "probability", "uncertainty", "decision"}
               for item in queue)
    assert [(q["participant"], q["session"], q["lesion_id"]) for q in queue] == [
        ("sub-01", None, 1), ("sub-02", "1", 1), ("sub-01", None, 3), ("sub-01", None, 2), ("sub-02", "1", 2)]
    assert [q["probability"] for q in queue] == [0.9, 0.7, 0.55, 0.2, 0.1]
    status, state = server.json("/api/status")
    assert state["n_above_threshold"] == n_at_or_above("high-sensitivity") and state["n_lesions"] == 5


def n_at_or_above(operating_point: str) -> int:
    """How many of the fixture's lesions reach the bundled model's threshold (the review set's rule)."""
    threshold = json.loads((BUNDLED_MODEL_DIR / "model.json").read_text())["thresholds"][operating_point]
    return sum(p >= threshold for lesions in LESIONS.values() for _, p in lesions)


def test_operating_point_f1_moves_the_review_set(outputs, tmp_path):
    bids, out = outputs
    running = start(bids, out, tmp_path / "review", operating_point="f1")
    try:
        n_f1 = n_at_or_above("f1")
        assert n_f1 < n_at_or_above("high-sensitivity")  # the bundled model's F1 point is the stricter one
        assert running.json("/api/status")[1]["n_above_threshold"] == n_f1
    finally:
        running.close()


def test_decisions_are_validated_persisted_and_cleared(server, outputs):
    bids, out = outputs
    before = tree_digest(bids), tree_digest(out)
    bad = [{"participant": "../../etc", "session": None, "lesion_id": 1, "decision": "rimpos"},
           {"participant": "sub-01/../02", "session": None, "lesion_id": 1, "decision": "rimpos"},
           {"participant": "01", "session": "../x", "lesion_id": 1, "decision": "rimpos"},
           {"participant": "01", "session": None, "lesion_id": "1; rm", "decision": "rimpos"},
           {"participant": "01", "session": None, "lesion_id": 1, "decision": "maybe"},
           {"participant": "01", "session": None, "lesion_id": 1, "decision": "rimpos", "path": "/tmp"}]
    for body in bad:
        assert server.request("/api/decision", body)[0] == 400, body
    assert server.request("/api/decision", {"participant": "07", "session": None, "lesion_id": 1,
                                            "decision": "rimpos"})[0] == 404
    assert server.request("/api/decision", {"participant": "01", "session": None, "lesion_id": 99,
                                            "decision": "rimpos"})[0] == 404
    assert server.request("/api/lesion.png?participant=..%2F..%2Fetc&lesion_id=1")[0] == 400

    for body in ({"participant": "sub-01", "session": None, "lesion_id": 1, "decision": "rimpos"},
                 {"participant": "01", "session": None, "lesion_id": 2, "decision": "rimneg"},
                 {"participant": "02", "session": "ses-1", "lesion_id": 1, "decision": "unsure"},
                 {"participant": "sub-02", "session": "1", "lesion_id": 2, "decision": "rimpos"}):
        status, item = server.json("/api/decision", body)
        assert status == 200 and item["decision"] == body["decision"]
    review = server.app.store.review_dir
    table = drv.read_tsv(drv.review_path(review, drv.Unit("01"), "rim_decisions"))
    assert list(table.columns) == ["lesion_id", "decision", "rater", "time", "probability"]
    assert table[["lesion_id", "decision", "rater"]].values.tolist() == [[1, "rimpos", "alice"], [2, "rimneg", "alice"]]
    assert table["probability"].tolist() == [0.9, 0.2]
    assert all(pd.Timestamp(t).tz is not None for t in table["time"])  # ISO 8601 with its UTC zone
    dseg = nib.load(drv.review_path(review, drv.Unit("01"), "rim_dseg"))
    lesions = np.asarray(nib.load(drv.output_path(out, drv.Unit("01"), "lesions_dseg")).dataobj)
    values = np.asarray(dseg.dataobj)
    assert np.allclose(dseg.affine, AFFINE) and values.dtype == np.uint8
    assert set(values[lesions == 1]) == {2} and set(values[lesions == 2]) == {1} and set(values[lesions == 3]) == {0}
    assert set(values[lesions == 0]) == {0}
    sidecar = json.loads(drv.sidecar_path(drv.review_path(review, drv.Unit("01"), "rim_dseg")).read_text())
    assert sidecar["Sources"][0] == "bids:qsmrim:sub-01/anat/sub-01_space-QSM_desc-lesions_dseg.nii.gz"
    bundled_id = json.loads((BUNDLED_MODEL_DIR / "model.json").read_text())["model_id"]
    assert sidecar["ModelID"] == bundled_id and sidecar["Raters"] == ["alice"]
    ses = np.asarray(nib.load(drv.review_path(review, drv.Unit("02", "1"), "rim_dseg")).dataobj)
    assert drv.review_path(review, drv.Unit("02", "1"), "rim_dseg").parent == review / "sub-02" / "ses-1" / "anat"
    lesions2 = np.asarray(nib.load(drv.output_path(out, drv.Unit("02", "1"), "lesions_dseg")).dataobj)
    assert set(ses[lesions2 == 1]) == {0} and set(ses[lesions2 == 2]) == {2}  # unsure -> 0
    description = json.loads((review / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["DatasetLinks"]["qsmrim"] == out.resolve().as_uri()

    status, state = server.json("/api/status")
    assert (state["reviewed"], state["rimpos"]) == (4, 2)
    queue = {(q["participant"], q["lesion_id"]): q["decision"] for q in server.json("/api/queue")[1]}
    assert queue[("sub-01", 1)] == "rimpos" and queue[("sub-01", 3)] is None
    # null clears: the row goes and the lesion is 0 again.
    assert server.json("/api/decision", {"participant": "01", "session": None, "lesion_id": 1,
                                         "decision": None})[1]["decision"] is None
    table = drv.read_tsv(drv.review_path(review, drv.Unit("01"), "rim_decisions"))
    assert table["lesion_id"].tolist() == [2]
    values = np.asarray(nib.load(drv.review_path(review, drv.Unit("01"), "rim_dseg")).dataobj)
    assert set(values[lesions == 1]) == {0}
    assert (tree_digest(bids), tree_digest(out)) == before  # neither the input nor the outputs were written


def test_two_raters_majority_and_disagreement(outputs, tmp_path):
    bids, out = outputs
    review = tmp_path / "review"
    alice, bob = start(bids, out, review, "alice"), start(bids, out, review, "bob")
    try:
        for running, decision in ((alice, "rimpos"), (bob, "rimneg")):
            running.json("/api/decision", {"participant": "01", "session": None, "lesion_id": 1, "decision": decision})
        lesions = np.asarray(nib.load(drv.output_path(out, drv.Unit("01"), "lesions_dseg")).dataobj)
        dseg = lambda: np.asarray(nib.load(drv.review_path(review, drv.Unit("01"), "rim_dseg")).dataobj)  # noqa: E731
        assert set(dseg()[lesions == 1]) == {0}  # tied
        status, detail = bob.json("/api/lesion?participant=01&session=&lesion_id=1")
        assert detail["decisions"] == {"alice": "rimpos", "bob": "rimneg"} and detail["disagreement"]
        assert alice.json("/api/status")[1]["disagreements"] == [{"participant": "sub-01", "session": None, "lesion_id": 1}]
        assert alice.json("/api/queue")[1][0]["decision"] == "rimpos"  # each sees their own call
        carol = start(bids, out, review, "carol")
        try:
            carol.json("/api/decision", {"participant": "01", "session": None, "lesion_id": 1, "decision": "rimpos"})
        finally:
            carol.close()
        assert set(dseg()[lesions == 1]) == {2}
        table = drv.read_tsv(drv.review_path(review, drv.Unit("01"), "rim_decisions"))
        assert sorted(table["rater"]) == ["alice", "bob", "carol"]
    finally:
        alice.close()
        bob.close()


def test_concurrent_tabs_and_servers_never_lose_a_decision(outputs, tmp_path):
    """Two tabs (threads on one server) and a second server write at once: every row survives."""
    bids, out = outputs
    review = tmp_path / "review"
    one, two = start(bids, out, review, "alice"), start(bids, out, review, "bob")
    errors = []

    def hammer(running, decisions):
        for lesion_id, decision in decisions:
            status, _ = running.json("/api/decision", {"participant": "01", "session": None,
                                                       "lesion_id": lesion_id, "decision": decision})
            if status != 200:
                errors.append(status)

    plan = [(i % 3 + 1, ("rimpos", "rimneg", "unsure")[i % 3]) for i in range(12)]
    threads = [threading.Thread(target=hammer, args=(one, plan)), threading.Thread(target=hammer, args=(one, plan[::-1])),
               threading.Thread(target=hammer, args=(two, plan))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        one.close()
        two.close()
    assert not errors
    table = drv.read_tsv(drv.review_path(review, drv.Unit("01"), "rim_decisions"))
    assert sorted(zip(table["rater"], table["lesion_id"])) == [(r, i) for r in ("alice", "bob") for i in (1, 2, 3)]
    assert not list(review.rglob(".*.tmp*"))  # no temporary file left behind


def test_views_are_pngs_in_millimetres_and_radiological(server):
    status, png, kind = server.request("/api/lesion.png?participant=01&session=&lesion_id=1&view=axial&channel=qsm"
                                       "&outline=1&zoom=2&window=50")
    assert status == 200 and kind == "image/png"
    assert Image.open(io.BytesIO(png)).size == (256, 256)
    centre_png = server.request("/api/lesion.png?participant=01&lesion_id=1&view=axial")[1]
    status, paged, _ = server.request("/api/lesion.png?participant=01&lesion_id=1&view=axial&offset=-4")
    assert status == 200 and paged != centre_png  # 4 mm below the centre: another plane
    for query in ("view=oblique", "channel=t1", "outline=2", "zoom=0", "zoom=1e9", "window=-5", "zoom=nan",
                  "offset=1000"):
        assert server.request(f"/api/lesion.png?participant=01&lesion_id=1&{query}")[0] == 400, query
    # Geometry: a world point to the patient's right (larger x) lands on the image's left in axial
    # and coronal views; superior is up; 2 mm slices show at their true size.
    volume = np.zeros((40, 40, 20), np.float32)
    volume[30, 20, 10] = 1.0  # x = 30 mm (right of the centre at 20 mm)
    volume[20, 20, 14] = 2.0  # z = 28 mm (superior)
    inverse = np.linalg.inv(AFFINE)
    centre = np.array([20.0, 20.0, 20.0])
    # 80 pixels over 40 mm: 0.5 mm per pixel, the centre between pixels 39 and 40.
    axial = sample(volume, inverse, plane_points(centre, "axial", 40.0, 80), order=0)
    rows, cols = np.nonzero(axial == 1.0)
    assert set(cols) == {19, 20} and set(rows) == {39, 40}  # 1 mm wide, on the left half
    coronal = sample(volume, inverse, plane_points(centre, "coronal", 40.0, 80), order=0)
    rows, cols = np.nonzero(coronal == 2.0)
    assert set(cols) == {39, 40} and set(rows) == {22, 23, 24, 25}  # above the centre, 2 mm tall
    volumes = Volumes(AFFINE, inverse, np.zeros((40, 40, 20), np.int32), volume * 100, None, (0, 1), None)
    rgb = np.asarray(Image.open(io.BytesIO(render(volumes, centre, 1, "axial", "qsm", fov_mm=40.0, window=50.0))))
    assert rgb.shape == (256, 256, 3)
    assert rgb[128, 61:66].min() == 255 and rgb[128, 150:].max() <= 128  # +100 ppb (right) shows white on the left


def test_qsm_in_ppm_is_shown_in_ppb(server):
    """The map is ppm; the QSM channel of the patches (ppb) says so and the view shows ppb."""
    unit = server.app.catalog.unit("01", None)
    volumes = server.app.volumes.get(unit)
    lesions = volumes.lesions
    raw = np.asarray(nib.load(str(unit.qsm)).dataobj)
    assert np.allclose(volumes.qsm_ppb[lesions > 0], raw[lesions > 0] * 1000.0, rtol=1e-5)
    status, detail = server.json("/api/lesion?participant=01&lesion_id=1")
    assert detail["qsm_available"] and 10 <= detail["default_window_ppb"] <= 100


def _serve(out: Path, review: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "qsmrim_app.review", str(out), "--review-dir", str(review),
                             "--rater", "alice", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stdout.readline()
    assert line.startswith("qsmrim-review: open http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
    return proc, line.split("open ", 1)[1].strip()


def test_command_line_prints_the_url_and_a_killed_server_keeps_acknowledged_decisions(outputs, tmp_path):
    bids, out = outputs
    review = tmp_path / "review"
    proc, url = _serve(out, review)
    base, token = url.split("/?token=")
    try:
        assert urllib.request.urlopen(url, timeout=30).status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/api/queue", timeout=30)
        assert err.value.code == 403
        body = json.dumps({"participant": "02", "session": "1", "lesion_id": 2, "decision": "rimneg"}).encode()
        request = urllib.request.Request(base + "/api/decision", data=body, method="POST",
                                         headers={TOKEN_HEADER: token})
        assert json.loads(urllib.request.urlopen(request, timeout=30).read())["decision"] == "rimneg"
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean shutdown
        proc.wait(30)
    table = drv.read_tsv(drv.review_path(review, drv.Unit("02", "1"), "rim_decisions"))
    assert table[["lesion_id", "decision"]].values.tolist() == [[2, "rimneg"]]
    # A server killed between the table and the image: the next start rebuilds the image.
    dseg = drv.review_path(review, drv.Unit("02", "1"), "rim_dseg")
    dseg.unlink()
    proc, url = _serve(out, review)
    try:
        queue = json.loads(urllib.request.urlopen(url.replace("/?", "/api/queue?"), timeout=30).read())
        assert [q["decision"] for q in queue if q["participant"] == "sub-02" and q["lesion_id"] == 2] == ["rimneg"]
        lesions = np.asarray(nib.load(drv.output_path(out, drv.Unit("02", "1"), "lesions_dseg")).dataobj)
        assert set(np.asarray(nib.load(dseg).dataobj)[lesions == 2]) == {1}
    finally:
        proc.terminate()
        assert proc.wait(30) == 0  # SIGTERM: a clean stop


@pytest.mark.parametrize("where, code", [("inside-bids", 64), ("inside-out", 64), ("missing-out", 66)])
def test_command_line_refusals(outputs, tmp_path, where, code):
    bids, out = outputs
    args = {"inside-bids": [str(out), "--review-dir", str(bids / "derivatives" / "review")],
            "inside-out": [str(out), "--review-dir", str(out / "review")],
            "missing-out": [str(tmp_path / "nothing")]}[where]
    proc = subprocess.run([sys.executable, "-m", "qsmrim_app.review", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == ""
    assert not (bids / "derivatives").exists() and not (out / "review").exists()
