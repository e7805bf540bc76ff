"""HTML reports: self-contained pages whose lesion anchors, order and images a rater can rely on."""
from __future__ import annotations

import base64
import json
import io
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from qsmrim_app.reports._html import Plane, safe_href
from qsmrim_app.reports.group import report_key, write_group_report
from qsmrim_app.reports.participant import order_lesions, write_participant_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PageParser(HTMLParser):
    """Collects tags/attributes, the ids in document order, and the text inside each lesion figure."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.ids: list[str] = []
        self.figure_text: dict[str, str] = {}
        self._stack: list[str | None] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        d = dict(attrs)
        self.tags.append((tag, d))
        if d.get("id"):
            self.ids.append(d["id"])
        if tag == "figure":
            self._stack.append(d.get("id"))
            if d.get("id"):
                self.figure_text[d["id"]] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure" and self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for fid in self._stack:
            if fid:
                self.figure_text[fid] += data


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def assert_self_contained(parser: PageParser) -> list[Image.Image]:
    """No external resource: only data-URI PNG images, in-page or relative links, no scripts/stylesheets."""
    images = []
    for tag, attrs in parser.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for name, value in attrs.items():
            assert "http://" not in (value or "") and "https://" not in (value or ""), (tag, name, value)
        if "src" in attrs:
            assert tag == "img"
            src = attrs["src"] or ""
            assert src.startswith("data:image/png;base64,"), src[:60]
            raw = base64.b64decode(src.split(",", 1)[1], validate=True)
            assert raw.startswith(PNG_MAGIC)
            images.append(Image.open(io.BytesIO(raw)))
        if tag == "a":
            href = attrs.get("href") or ""
            assert href.startswith("#") or safe_href(href) == href, href
    return images


# --------------------------------------------------------------------------- phantom inputs
def lesion_table_from_dseg(labels: np.ndarray, affine: np.ndarray, probs: dict[int, float]) -> pd.DataFrame:
    """The per-lesion table contract, computed independently here from the instance map."""
    ids = [int(i) for i in np.unique(labels) if i > 0]
    vox_vol = float(abs(np.linalg.det(affine[:3, :3])))
    rows = []
    for lid in ids:
        com = np.asarray(ndimage.center_of_mass(labels == lid))
        xyz = nib.affines.apply_affine(affine, com)
        n = int((labels == lid).sum())
        p = probs.get(lid, 0.1)
        rows.append(dict(lesion_id=lid, voxels=n, volume_mm3=n * vox_vol, centroid_x_mm=xyz[0],
                         centroid_y_mm=xyz[1], centroid_z_mm=xyz[2], probability=p, uncertainty=0.05,
                         rim_positive=int(p >= 0.5), threshold=0.5))
    return pd.DataFrame(rows, columns=["lesion_id", "voxels", "volume_mm3", "centroid_x_mm", "centroid_y_mm",
                                       "centroid_z_mm", "probability", "uncertainty", "rim_positive", "threshold"])


def make_phantom(folder: Path, centres: list[tuple[int, int, int]], rims: list[bool], radius: float = 3.0,
                 shape: tuple[int, int, int] = (72, 80, 24), affine: np.ndarray | None = None,
                 seed: int = 0) -> dict[str, Path]:
    """QSM (ppb) brain ellipsoid with spherical lesions (rim+ ones carry a +120 ppb shell), FLAIR, dseg."""
    rng = np.random.default_rng(seed)
    if affine is None:  # LAS, 1 x 1 x 2.5 mm: exercises flips and anisotropy
        affine = np.diag([-1.0, 1.0, 2.5, 1.0])
        affine[:3, 3] = (36.0, -40.0, -30.0)
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    c = (np.asarray(shape) - 1) / 2.0
    brain = ((ii - c[0]) / (0.45 * shape[0])) ** 2 + ((jj - c[1]) / (0.45 * shape[1])) ** 2 + (
        (kk - c[2]) / (0.45 * shape[2])) ** 2 < 1
    ventricle = ((ii - c[0]) / 5.0) ** 2 + ((jj - c[1]) / 12.0) ** 2 + ((kk - c[2]) / 3.0) ** 2 < 1
    qsm = np.where(brain, rng.normal(0, 15, shape), 0).astype(np.float32)
    flair = np.where(brain, 100 + rng.normal(0, 5, shape), 0).astype(np.float32)
    flair[ventricle] = 20
    labels = np.zeros(shape, np.int32)
    zoom = np.sqrt((affine[:3, :3] ** 2).sum(0))
    for lid, (centre, rim) in enumerate(zip(centres, rims), start=1):
        dist = np.sqrt(sum(((g - x) * z) ** 2 for g, x, z in zip((ii, jj, kk), centre, zoom)))
        lesion = dist <= radius * zoom[0]
        labels[lesion] = lid
        flair[lesion] = 190
        if rim:
            qsm[(dist > (radius - 1) * zoom[0]) & (dist <= (radius + 1) * zoom[0])] += 120
    paths = {"qsm": folder / "qsm.nii.gz", "flair": folder / "flair.nii.gz", "dseg": folder / "dseg.nii.gz"}
    nib.save(nib.Nifti1Image(qsm, affine), paths["qsm"])
    nib.save(nib.Nifti1Image(flair, affine), paths["flair"])
    nib.save(nib.Nifti1Image(labels, affine), paths["dseg"])
    return paths


def report_kwargs(paths: dict[str, Path], table: pd.DataFrame, **extra) -> dict:
    kwargs = dict(
        subject="01", session="1", qsm=paths["qsm"], flair_in_qsm=paths["flair"], lesions_dseg=paths["dseg"],
        lesion_table=table,
        summary={"n_lesions": len(table), "n_rimplus": int(table["rim_positive"].sum()) if len(table) else 0,
                 "threshold": 0.5, "operating_point": "f1", "model_id": "qsmrimnet-test"},
        inputs={"qsm": str(paths["qsm"]), "flair": str(paths["flair"])},
        versions={"qsmrim": "0.0.test", "numpy": np.__version__},
        registration={"metric_before": -0.12, "metric_after": -0.41, "initialisation": "moments"},
        messages=["WARNING: something mild", "ERROR: something serious <b>not bold</b>"],
    )
    kwargs.update(extra)
    return kwargs


# --------------------------------------------------------------------------- participant report
def test_participant_report_anchors_order_and_images(tmp_path: Path) -> None:
    centres = [(20, 25, 8), (50, 30, 12), (30, 55, 14), (45, 55, 10), (25, 40, 16)]
    rims = [False, True, False, True, False]
    paths = make_phantom(tmp_path, centres, rims)
    probs = {1: 0.30, 2: 0.71, 3: 0.45, 4: 0.93, 5: 0.05}
    labels = np.asanyarray(nib.load(paths["dseg"]).dataobj)
    table = lesion_table_from_dseg(labels, nib.load(paths["dseg"]).affine, probs)
    out = write_participant_report(tmp_path / "out" / "sub-01_ses-1.html", **report_kwargs(paths, table))

    assert out == tmp_path / "out" / "sub-01_ses-1.html" and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["sub-01_ses-1.html"]  # no temporary left behind
    parser = parse(out)
    images = assert_self_contained(parser)
    lesion_ids = [i for i in parser.ids if i.startswith("lesion-")]
    # rim+ first (4: 0.93, 2: 0.71), then rim- by probability (3: 0.45, 1: 0.30, 5: 0.05)
    assert lesion_ids == ["lesion-4", "lesion-2", "lesion-3", "lesion-1", "lesion-5"]
    for lid in probs:
        assert f"Lesion {lid}" in parser.figure_text[f"lesion-{lid}"]
        assert any(t == "a" and a.get("href") == f"#lesion-{lid}" for t, a in parser.tags)
    assert "rim+" in parser.figure_text["lesion-4"] and "rim+" not in parser.figure_text["lesion-3"]
    tiles = [im for im in images if im.height == 80]
    assert len(tiles) == 5 and all(im.width == 3 * 80 + 2 * 2 for im in tiles)
    assert any(im.width > 400 for im in images)  # the registration figure
    text = "".join(parser.text)
    assert "ERROR: something serious <b>not bold</b>" in text  # escaped, shown as text
    assert "&lt;b&gt;not bold&lt;/b&gt;" in out.read_bytes().decode("ascii")  # escaped, and pure ASCII
    assert "metric_after" in text and "qsmrimnet-test" in text and "ppb" in text
    assert "WARNING (report)" not in text  # consistent inputs give no report warnings


def test_lesion_tile_shows_rim_on_qsm(tmp_path: Path) -> None:
    """The outlined lesion sits in the tile centre, and a rim+ lesion's edge is brighter than its core."""
    paths = make_phantom(tmp_path, [(36, 40, 12)], [True], radius=4.0)
    labels = np.asanyarray(nib.load(paths["dseg"]).dataobj)
    table = lesion_table_from_dseg(labels, nib.load(paths["dseg"]).affine, {1: 0.9})
    out = write_participant_report(tmp_path / "r.html", **report_kwargs(paths, table))
    tile = [im for im in assert_self_contained(parse(out)) if im.height == 80][0]
    rgb = np.asarray(tile.convert("RGB")).astype(int)
    plain, outlined = rgb[:, :80], rgb[:, 82:162]
    red = (outlined[..., 0] == 255) & (outlined[..., 1] == 48)
    rr, cc = np.nonzero(red)
    assert abs(rr.mean() - 39.5) < 3 and abs(cc.mean() - 39.5) < 3  # outline centred on the lesion
    grey = plain[..., 0]
    yy, xx = np.mgrid[:80, :80]
    r = np.hypot(yy - 39.5, xx - 39.5)
    px_mm = 80 / float(np.clip(4.0 * (6 * table.volume_mm3[0] / np.pi) ** (1 / 3), 24, 96))
    core = grey[r < 1.5 * px_mm].mean()
    shell = grey[(r > 3.3 * px_mm) & (r < 4.7 * px_mm)].mean()
    assert shell > core + 40


def test_plane_orientation_independent_of_storage_order() -> None:
    """The same physical image stored RAS or flipped (LPS) shows identically on screen."""
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(6, 7, 5))
    ras = np.diag([1.0, 2.0, 3.0, 1.0])
    lps_vol = vol[::-1, ::-1, :]
    lps = ras.copy()
    lps[0, 0], lps[1, 1] = -1.0, -2.0
    lps[:3, 3] = (5.0, 12.0, 0.0)  # same world positions for the flipped voxels
    for axis in range(3):
        a = Plane.from_affine(ras, axis)
        b = Plane.from_affine(lps, axis)
        flipped = 2 if axis == 2 else vol.shape[axis] - 1 - 2  # the same physical slice
        np.testing.assert_array_equal(a.take(vol, 2), b.take(lps_vol, flipped))
        assert (a.col_mm, a.row_mm) == (b.col_mm, b.row_mm)
    axial = Plane.from_affine(ras, 2)
    assert axial.col_labels == ("R", "L") and axial.row_labels == ("A", "P")  # radiological, as the review page
    # to_screen agrees with take for a single marked voxel
    marked = np.zeros((6, 7, 5))
    marked[4, 1, 3] = 1
    for affine in (ras, lps):
        plane = Plane.from_affine(affine, 2)
        r, c = plane.to_screen((4, 1, 3), marked.shape)
        assert plane.take(marked, 3)[int(r), int(c)] == 1


def test_zero_lesion_participant(tmp_path: Path) -> None:
    paths = make_phantom(tmp_path, [], [])
    table = lesion_table_from_dseg(np.zeros((2, 2, 2), np.int32), np.eye(4), {})
    out = write_participant_report(tmp_path / "sub-02.html", **report_kwargs(paths, table, session=None,
                                                                               subject="sub-02", messages=()))
    parser = parse(out)
    images = assert_self_contained(parser)
    text = " ".join(parser.text)
    assert "No lesions were found" in text and "sub-02" in text and "ses-" not in text
    assert not [i for i in parser.ids if i.startswith("lesion-")]
    assert len(images) == 1  # the registration figure only
    assert "None were recorded" in text


def test_missing_flair_and_inconsistent_table_become_warnings(tmp_path: Path) -> None:
    paths = make_phantom(tmp_path, [(30, 30, 10)], [False])
    labels = np.asanyarray(nib.load(paths["dseg"]).dataobj)
    table = lesion_table_from_dseg(labels, nib.load(paths["dseg"]).affine, {1: 0.2})
    extra = pd.DataFrame([dict(table.iloc[0]) | {"lesion_id": 7}])
    kwargs = report_kwargs(paths, pd.concat([table, extra], ignore_index=True), flair_in_qsm=tmp_path / "nope.nii.gz",
                           messages=())
    out = write_participant_report(tmp_path / "r.html", **kwargs)
    parser = parse(out)
    tiles = [im for im in assert_self_contained(parser) if im.height == 80]
    text = " ".join(parser.text)
    assert "FLAIR in QSM space not found" in text
    assert "[7] are in the table but not in the lesion map" in text
    assert "summary says 1 lesions" not in text  # report_kwargs counted the given table
    assert len(tiles) == 2 and tiles[0].width == 2 * 80 + 2  # QSM panels only
    assert {"lesion-1", "lesion-7"} <= set(parser.ids)


def test_many_lesions_file_size(tmp_path: Path) -> None:
    """100 lesions stay well under a few MB and render quickly."""
    rng = np.random.default_rng(3)
    grid = [(i, j, k) for i in range(10, 64, 6) for j in range(10, 72, 6) for k in (6, 12, 18)]
    centres = [grid[n] for n in rng.choice(len(grid), 100, replace=False)]
    rims = list(rng.random(100) < 0.2)
    paths = make_phantom(tmp_path, centres, rims, radius=1.6, seed=3)
    img = nib.load(paths["dseg"])
    labels = np.asanyarray(img.dataobj)
    probs = {lid: float(p) for lid, p in zip(range(1, 101), rng.random(100))}
    table = lesion_table_from_dseg(labels, img.affine, probs)
    assert len(table) == 100
    out = write_participant_report(tmp_path / "r.html", **report_kwargs(paths, table))
    size_mb = out.stat().st_size / 1e6
    assert size_mb < 3.0, size_mb
    parser = parse(out)
    ids = [int(i.split("-")[1]) for i in parser.ids if i.startswith("lesion-")]
    assert ids == [int(x) for x in order_lesions(table)["lesion_id"]] and len(ids) == 100


def test_order_lesions_handles_missing_probability() -> None:
    df = pd.DataFrame({"lesion_id": [1, 2, 3, 4], "probability": [0.2, np.nan, 0.9, 0.2],
                       "rim_positive": [0, 0, 1, 0]})
    assert order_lesions(df)["lesion_id"].tolist() == [3, 1, 4, 2]


def test_bad_units_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qsm_units"):
        write_participant_report(tmp_path / "x.html", **report_kwargs(
            {"qsm": tmp_path / "q", "flair": tmp_path / "f", "dseg": tmp_path / "d"},
            lesion_table_from_dseg(np.zeros((2, 2, 2), np.int32), np.eye(4), {}), qsm_units="ppt"))


# --------------------------------------------------------------------------- group report
def test_group_report_links_failed_and_agreement(tmp_path: Path) -> None:
    group = pd.DataFrame({
        "participant_id": ["sub-01", "sub-02", "sub-03"], "session": ["ses-1", "ses-1", None],
        "n_lesions": [5, 3, 0], "n_rimplus": [2, 0, 0], "lesion_volume_mm3": [500.0, 120.0, 0.0],
        "rimplus_volume_mm3": [210.0, 0.0, 0.0], "model_id": ["m1"] * 3, "threshold": [0.5] * 3,
    })
    probs = pd.DataFrame({"participant_id": ["sub-01"] * 5 + ["sub-02"] * 3, "session": ["ses-1"] * 8,
                          "lesion_id": list(range(1, 6)) + [1, 2, 3],
                          "probability": [0.9, 0.7, 0.2, 0.1, 0.3, 0.2, 0.4, 0.05]})
    reports = {report_key("sub-01", "ses-1"): "sub-01_ses-1.html", report_key("sub-03"): "sub-03.html",
               "sub-04": "https://example.org/evil.html"}
    failed = [("sub-04", "registration failed: MI -0.01 > -0.05"), ("sub-05", "no FLAIR <found>")]
    agreement = {"count_pearson_r": 0.87, "count_pearson_ci": (0.6, 0.95), "count_mse": 0.4, "n": 3}
    out = write_group_report(tmp_path / "group.html", group_table=group, probabilities=probs, failed=failed,
                             participant_reports=reports, agreement=agreement, versions={"qsmrim": "0.0.test"})
    parser = parse(out)
    images = assert_self_contained(parser)
    assert len(images) == 1 and images[0].width > 500
    hrefs = [a.get("href") for t, a in parser.tags if t == "a"]
    assert "sub-01_ses-1.html" in hrefs and "sub-03.html" in hrefs
    assert not any("example.org" in (h or "") for h in hrefs)  # external link refused
    text = " ".join(parser.text)
    for pid in ("sub-01", "sub-02", "sub-03", "sub-04", "sub-05"):
        assert pid in text
    assert "registration failed: MI -0.01 > -0.05" in text and "no FLAIR <found>" in text
    assert "Failed participants (2)" in text
    assert "0.87" in text and "[0.6, 0.95]" in text
    assert report_key("sub-03", float("nan")) == "sub-03"


def test_group_report_without_agreement_or_lesions(tmp_path: Path) -> None:
    group = pd.DataFrame(columns=["participant_id", "session", "n_lesions", "n_rimplus", "lesion_volume_mm3",
                                  "rimplus_volume_mm3", "model_id", "threshold"])
    probs = pd.DataFrame(columns=["participant_id", "session", "lesion_id", "probability"])
    out = write_group_report(tmp_path / "g.html", group_table=group, probabilities=probs,
                             failed=[("sub-09", "crashed")], participant_reports={}, agreement=None, versions={})
    parser = parse(out)
    assert_self_contained(parser)
    text = " ".join(parser.text)
    assert "No expert rim+ counts were given" in text and "sub-09" in text and "crashed" in text
    assert "No participant finished successfully" in text


# --------------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.shared_data
def test_participant_report_on_real_lesions(shared_data: Path, tmp_path: Path) -> None:
    """Real expert lesion shapes on a real FLAIR (Lesjak 2017), real QSM texture (2016 challenge)."""
    ms = shared_data / "open_ms_data" / "patient07"
    flair_img = nib.load(ms / "FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz")
    mask = np.asanyarray(nib.load(ms / "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz").dataobj) > 0
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= 10) + 1
    labels = np.where(np.isin(labels, keep), labels, 0).astype(np.int32)
    chi = np.asanyarray(nib.load(shared_data / "qsm_challenge_2016" / "chi_cosmos.nii.gz").dataobj, dtype=np.float32)
    zoom = np.asarray(flair_img.shape) / np.asarray(chi.shape)
    qsm = ndimage.zoom(chi, zoom, order=1)[: flair_img.shape[0], : flair_img.shape[1], : flair_img.shape[2]]
    qsm = qsm * (np.asanyarray(flair_img.dataobj) > 0)
    paths = {"qsm": tmp_path / "qsm.nii.gz", "flair": tmp_path / "flair.nii.gz", "dseg": tmp_path / "dseg.nii.gz"}
    nib.save(nib.Nifti1Image(qsm.astype(np.float32), flair_img.affine), paths["qsm"])
    nib.save(nib.Nifti1Image(np.asanyarray(flair_img.dataobj, dtype=np.float32), flair_img.affine), paths["flair"])
    nib.save(nib.Nifti1Image(labels, flair_img.affine), paths["dseg"])
    rng = np.random.default_rng(7)
    table = lesion_table_from_dseg(labels, flair_img.affine, {int(i): float(rng.random()) for i in keep})
    out = write_participant_report(tmp_path / "sub-07.html", **report_kwargs(paths, table, qsm_units="ppm"))
    parser = parse(out)
    images = assert_self_contained(parser)
    ids = [int(i.split("-")[1]) for i in parser.ids if i.startswith("lesion-")]
    assert ids == [int(x) for x in order_lesions(table)["lesion_id"]] and len(ids) == len(keep) > 10
    assert len(images) == len(keep) + 1
    assert out.stat().st_size < 3e6 * max(1.0, len(keep) / 100)
    text = " ".join(parser.text)
    assert "WARNING (report)" not in text and "window -0.15 to 0.15 ppm" in text


def test_split_lesions_are_outlined_as_one_confluent_component(tmp_path: Path) -> None:
    """Lesions split from one component: each tile outlines the others yellow, unrelated lesions blue."""
    paths = make_phantom(tmp_path, [(30, 40, 12), (36, 40, 12), (52, 55, 12)], [False, False, False], radius=4.0)
    labels = np.asanyarray(nib.load(paths["dseg"]).dataobj)
    table = lesion_table_from_dseg(labels, nib.load(paths["dseg"]).affine, {})
    table.insert(6, "split_from", pd.array([3, 3, None], dtype="Int64"))
    out = write_participant_report(tmp_path / "r.html", **report_kwargs(paths, table))
    parser = parse(out)
    text = "".join(parser.text)
    assert "1 confluent component(s) were split automatically into 2 lesions" in text
    assert "split from confluent component 3 with lesion(s) 2" in parser.figure_text["lesion-1"]
    assert "split from" not in parser.figure_text["lesion-3"]
    tiles = {fid: im for fid, im in zip([i for i in parser.ids if i.startswith("lesion-")],
                                        [im for im in assert_self_contained(parser) if im.height == 80])}
    yellow = lambda im: int(np.sum(np.all(np.asarray(im.convert("RGB"))[:, 82:162] == (255, 200, 0), axis=-1)))  # noqa: E731
    assert yellow(tiles["lesion-1"]) > 0 and yellow(tiles["lesion-2"]) > 0
    assert yellow(tiles["lesion-3"]) == 0


# --------------------------------------------------------------------------- orientation (radiological)
def _blob_volume(affine: np.ndarray, shape: tuple[int, int, int], world_xyz: tuple[float, float, float],
                 radius_mm: float = 5.0) -> np.ndarray:
    """A float volume, 100 inside a ball around `world_xyz` (RAS mm), 1 elsewhere (so every voxel is 'brain')."""
    ijk = np.indices(shape).reshape(3, -1).astype(float)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape((3,) + shape)
    dist = np.sqrt(sum((xyz[a] - world_xyz[a]) ** 2 for a in range(3)))
    return np.where(dist <= radius_mm, 100.0, 1.0).astype(np.float32)


def _affines() -> dict[str, np.ndarray]:
    """Storage orders a report meets: RAS, LAS (the flipped default), sagittal LPS-like, and oblique."""
    from scipy.spatial.transform import Rotation

    def centred(lin: np.ndarray, shape=(40, 44, 36)) -> np.ndarray:
        out = np.eye(4)
        out[:3, :3] = lin
        out[:3, 3] = -lin @ ((np.asarray(shape) - 1) / 2.0)
        return out

    sagittal = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # qsmrim-synth's FLAIR axes
    return {"RAS": centred(np.diag([1.5, 1.5, 2.0])), "LAS": centred(np.diag([-1.5, 1.5, 2.0])),
            "sagittal": centred(sagittal * 1.5),
            "oblique": centred(Rotation.from_euler("xyz", [8, -6, 5], degrees=True).as_matrix() @ np.diag([1.5] * 3))}


@pytest.mark.parametrize("name", ["RAS", "LAS", "sagittal", "oblique"])
def test_lesion_on_the_right_appears_on_the_side_labelled_R(name: str) -> None:
    """A blob at the world's right (RAS x > 0) shows on the image's left, which the images label R."""
    from qsmrim_app.reports.participant import registration_cuts

    affine = _affines()[name]
    shape = (40, 44, 36)
    vol = _blob_volume(affine, shape, (15.0, 0.0, 0.0))
    for cut in registration_cuts(vol, vol, affine):
        if cut.view == "sagittal":
            assert cut.plane.col_labels == ("A", "P")  # as the review page
            continue
        cols = np.nonzero(cut.qsm > 50)[1]
        assert cols.size, (name, cut.view)
        assert cut.plane.col_labels == ("R", "L"), (name, cut.view)
        assert cols.mean() < 0.4 * cut.qsm.shape[1], (name, cut.view, cols.mean(), cut.qsm.shape)


def _white(rgb: np.ndarray) -> np.ndarray:
    return np.all(rgb == 255, axis=-1)


def test_lesion_tile_png_shows_the_right_on_the_R_side(tmp_path: Path) -> None:
    """Pixel test on the report's own PNG: a neighbour at the world's right is outlined on the tile's left,
    and the letters drawn into the tile read R at the left, L at the right."""
    from qsmrim_app.reports._html import label_edges

    affine = np.diag([-1.0, 1.0, 2.5, 1.0])  # LAS storage: voxel i grows towards the patient's left
    affine[:3, 3] = (36.0, -40.0, -30.0)
    # lesion 1 at the centre, lesion 2 at larger world x (i smaller in LAS): the patient's right of lesion 1
    paths = make_phantom(tmp_path, [(36, 40, 12), (28, 40, 12)], [False, False], radius=2.5, affine=affine)
    img = nib.load(paths["dseg"])
    table = lesion_table_from_dseg(np.asanyarray(img.dataobj), img.affine, {1: 0.9, 2: 0.1})
    assert table.centroid_x_mm[1] > table.centroid_x_mm[0] + 5  # lesion 2 is further right in the world
    out = write_participant_report(tmp_path / "r.html", **report_kwargs(paths, table))
    tile = np.asarray([im for im in assert_self_contained(parse(out)) if im.height == 80][0].convert("RGB"))
    outlined = tile[:, 82:162]
    blue = np.all(outlined == (0, 190, 255), axis=-1)
    assert blue.any() and np.nonzero(blue)[1].mean() < 30  # the right-hand neighbour is on the left
    ref_rl = label_edges(np.zeros((80, 80, 3), np.uint8), "R", "L")
    ref_lr = label_edges(np.zeros((80, 80, 3), np.uint8), "L", "R")
    for panel in (tile[:, :80], outlined, tile[:, 164:244]):
        left = (slice(60, 80), slice(0, 20))
        assert np.all(_white(panel[left])[_white(ref_rl[left])])  # every pixel of "R" is there
        assert not np.all(_white(panel[left])[_white(ref_lr[left])])  # and it is not an "L"


def test_review_page_image_shows_the_right_on_the_left(tmp_path: Path) -> None:
    """The review page's PNG (review/images.py) follows the same convention and names it R on the left."""
    from qsmrim_app.review.images import ORIENTATION, Volumes, render

    affine = _affines()["LAS"]
    shape = (40, 44, 36)
    qsm = _blob_volume(affine, shape, (8.0, 0.0, 0.0), radius_mm=3.0)
    volumes = Volumes(affine, np.linalg.inv(affine), np.zeros(shape, np.int32), qsm, None, (0.0, 1.0), None)
    png = render(volumes, (0.0, 0.0, 0.0), 1, "axial", "qsm", outline=False, window=50.0, fov_mm=40.0)
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"))[:-12]  # above the scale bar
    cols = np.nonzero(grey > 200)[1]
    assert ORIENTATION["axial"][0] == "R" and cols.size and cols.mean() < 0.4 * grey.shape[1]


# --------------------------------------------------------------------------- registration contour
def test_registration_contour_traces_the_brain_not_the_field_of_view(tmp_path: Path) -> None:
    """On a generated phantom (scalp as bright as brain, reaching the field of view's edge), the FLAIR's brain
    mask drawn by the report matches the brain (the QSM's support) and stays clear of the edges."""
    from qsmrim_app.reports.participant import flair_brain_mask, registration_cuts
    from qsmrim_app.synthetic import generate_dataset

    generate_dataset(tmp_path / "bids", 1, seed=4, magnitude=False)
    truth = tmp_path / "bids_truth"
    qsm = nib.load(tmp_path / "bids/sub-01/anat/sub-01_Chimap.nii.gz")
    flair = nib.load(tmp_path / "bids/sub-01/anat/sub-01_FLAIR.nii.gz")
    m = np.array(json.loads((truth / "transforms.json").read_text())["subjects"]["sub-01"]["n/a"]["flair_to_qsm_world"])
    ijk = np.indices(qsm.shape).reshape(3, -1).astype(float)
    src = (np.linalg.inv(flair.affine) @ np.linalg.inv(m) @ qsm.affine @ np.vstack([ijk, np.ones(ijk.shape[1])]))[:3]
    flair_in_qsm = ndimage.map_coordinates(np.asarray(flair.dataobj, np.float32), src, order=1).reshape(qsm.shape)
    brain = np.asarray(qsm.dataobj) != 0
    zooms = qsm.header.get_zooms()[:3]
    mask = flair_brain_mask(flair_in_qsm, zooms, seed=ndimage.center_of_mass(brain))
    filled = ndimage.binary_fill_holes(mask)
    dice = 2 * np.sum(filled & brain) / (filled.sum() + brain.sum())
    assert dice > 0.9, dice
    old_style = ndimage.gaussian_filter(flair_in_qsm, 1.0) > 0.5 * np.median(flair_in_qsm[flair_in_qsm > 0])
    edge = np.ones(qsm.shape, bool)
    edge[1:-1, 1:-1, :] = False  # the in-plane border of the field of view
    assert old_style[edge].mean() > 0.2  # the scalp reaches the field of view (what the old contour traced)
    assert not filled[edge].any()
    # the cuts the figure draws carry this mask, ventricles left as holes (inner contours)
    cuts = registration_cuts(np.asarray(qsm.dataobj, np.float32) * 1000, flair_in_qsm, qsm.affine)
    axial = [c for c in cuts if c.view == "axial"][0]
    assert axial.brain.any() and (ndimage.binary_fill_holes(axial.brain) & ~axial.brain).any()


# --------------------------------------------------------------------------- annotations shown
def test_participant_report_shows_rater_labels_disagreements_first(tmp_path: Path) -> None:
    centres = [(20, 25, 8), (50, 30, 12), (30, 55, 14), (45, 55, 10)]
    paths = make_phantom(tmp_path, centres, [False, True, False, True])
    img = nib.load(paths["dseg"])
    table = lesion_table_from_dseg(np.asanyarray(img.dataobj), img.affine, {1: 0.3, 2: 0.71, 3: 0.45, 4: 0.93})
    # the model calls 2 and 4 rim+; the rater: 4 and 3 rim+, 1 and 2 rim-, so 3 is missed and 2 extra
    rater = pd.DataFrame({"lesion_id": [1, 2, 3, 4], "rim_positive": [0, 0, 1, 1], "agreement": [1.0] * 4})
    out = write_participant_report(tmp_path / "r.html", **report_kwargs(paths, table, annotations=rater))
    parser = parse(out)
    assert_self_contained(parser)
    assert "annotations" in parser.ids
    html = out.read_text()
    section = html[html.index('id="annotations"'):html.index('id="review"')]
    rows = [int(x) for x in pd.Series(section.split('href="#lesion-')[1:]).str.extract(r"^(\d+)")[0]]
    assert rows == [3, 2, 4, 1]  # missed, extra, then agreements by probability
    text = "".join(parser.text)
    assert "the rater calls 2 rim+, the model 2" in text and "misses 1 and calls 1 rim+" in text
    assert "rater:" in parser.figure_text["lesion-3"] and "rim+" in parser.figure_text["lesion-3"].split("rater:")[1]
    plain = write_participant_report(tmp_path / "p.html", **report_kwargs(paths, table))
    assert 'id="annotations"' not in plain.read_text() and "rater:" not in plain.read_text()


def _group_inputs() -> tuple[pd.DataFrame, pd.DataFrame]:
    group = pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "session": ["n/a", "n/a"], "n_lesions": [9, 11],
                          "n_rimplus": [0, 0], "lesion_volume_mm3": [500.0, 120.0], "rimplus_volume_mm3": [0.0, 0.0],
                          "model_id": ["m1"] * 2, "threshold": [0.7] * 2})
    probs = pd.DataFrame({"participant_id": ["sub-01"], "session": ["n/a"], "lesion_id": [1], "probability": [0.2]})
    return group, probs


def test_group_report_expert_table_and_why_agreement_is_missing(tmp_path: Path) -> None:
    """Two units with expert counts: the table shows both counts, r says why it is missing, no raw keys."""
    from qsmrim_app.workflows.group import expert_agreement

    group, probs = _group_inputs()
    experts = group.assign(n_labelled=[9, 11], n_rimplus_expert=[3, 2], expert_rimplus_found=[0, 0],
                           model_rimplus_expert_negative=[0, 0])
    agreement = expert_agreement(experts)
    out = write_group_report(tmp_path / "g.html", group_table=group, probabilities=probs, failed=[("sub-03", "x")],
                             participant_reports={"sub-01": "sub-01.html"}, agreement=agreement, versions={},
                             experts=experts)
    text = " ".join(parse(out).text)
    assert "No expert rim+ counts were given" not in text
    assert "needs at least 3 participants/sessions with expert counts; 2 have them" in text
    assert "n_subjects" not in text and "nan" not in text.lower().split() and "r_not_computed" not in text
    html = out.read_text()
    table_html = html[html.index('id="agreement"'):]
    assert "<td>sub-01</td>" in table_html and '<td class="num">3</td>' in table_html and "-3" in table_html
    assert "0 of 5" in text  # expert rim+ lesions the model calls rim+


# --------------------------------------------------------------------------- group level through the CLI
def _write_unit(out: Path, label: str, model_calls: list[int], rater: list[float]) -> None:
    """The participant-level tables the group level reads: summary, classified lesions, annotations."""
    from qsmrim_app import derivatives as drv

    unit = drv.Unit(label)
    ids = list(range(1, len(model_calls) + 1))
    drv.output_path(out, unit, "summary").parent.mkdir(parents=True, exist_ok=True)
    drv.write_tsv(drv.output_path(out, unit, "summary"), pd.DataFrame([{
        "participant_id": f"sub-{label}", "session": "n/a", "n_lesions": len(ids), "n_rimplus": sum(model_calls),
        "lesion_volume_mm3": 100.0 * len(ids), "rimplus_volume_mm3": 100.0 * sum(model_calls), "model_id": "m1",
        "threshold": 0.5, "operating_point": "f1"}]))
    drv.write_tsv(drv.output_path(out, unit, "rim_lesions"), pd.DataFrame({
        "lesion_id": ids, "probability": [0.9 if c else 0.1 for c in model_calls], "rim_positive": model_calls}))
    drv.write_tsv(drv.output_path(out, unit, "annotations"), pd.DataFrame({
        "lesion_id": ids, "rim_positive": rater, "agreement": [1.0] * len(ids)}))


def _group_cli(tmp_path: Path, units: dict[str, tuple[list[int], list[float]]]):
    import subprocess
    import sys

    bids, out = tmp_path / "bids", tmp_path / "out"
    for label in units:
        (bids / f"sub-{label}" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    for label, (calls, rater) in units.items():
        _write_unit(out, label, calls, rater)
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(repo / "run.py"), str(bids), str(out), "group"],
                          capture_output=True, text=True, timeout=300)
    return proc, out


def test_group_level_reports_agreement_with_annotations_through_the_cli(tmp_path: Path) -> None:
    units = {"01": ([1, 1, 0, 0], [1, 1, 1, 0]), "02": ([0, 0, 0], [0, 0, 0]), "03": ([1, 0, 0], [1, 0, 0]),
             "04": ([1, 1, 1, 0], [1, 1, 0, 1])}
    proc, out = _group_cli(tmp_path, units)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    agreement = json.loads((out / "group_agreement.json").read_text())
    model, expert = [2, 0, 1, 3], [3, 0, 1, 3]
    assert agreement["n"] == 4 and agreement["count_pearson_r"] == pytest.approx(np.corrcoef(model, expert)[0, 1])
    assert agreement["count_pearson_ci"] is not None and agreement["lesions"] == {
        "expert_rimplus": 7, "expert_rimplus_found": 5, "model_rimplus_expert_negative": 1}
    assert f"r={agreement['count_pearson_r']:.3f} [95% CI" in log and "nan" not in log
    assert "the model calls 5 of the experts' 7 rim+ lesions rim+, and 1 of their rim- lesions rim+" in log
    text = " ".join(parse(out / "group_report.html").text)
    assert "No expert rim+ counts were given" not in text and "5 of 7" in text and "n_subjects" not in text
    # the group level's own logs/ record is closed when it ends (it stayed "running" before)
    [record] = [json.loads(p.read_text()) for p in (out / "logs").glob("group_*.json")]
    assert record["status"] == "done" and record["exit_code"] == 0 and record["finished_at"]


def test_group_level_says_why_agreement_is_not_computed_through_the_cli(tmp_path: Path) -> None:
    proc, out = _group_cli(tmp_path, {"01": ([0, 0], [1, 0]), "02": ([0, 0, 0], [1, 1, 0]),
                                      "03": ([0], [0])})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "r not computed: the model's rim+ count is 0 for every participant/session" in log and "nan" not in log
    assert json.loads((out / "group_agreement.json").read_text())["count_pearson_r"] is None
    text = " ".join(parse(out / "group_report.html").text)
    assert "no variation to correlate" in text and "No expert rim+ counts were given" not in text
