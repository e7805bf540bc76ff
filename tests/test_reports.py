"""HTML reports: self-contained pages whose lesion anchors, order and images a rater can rely on."""
from __future__ import annotations

import base64
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
    assert axial.col_labels == ("L", "R") and axial.row_labels == ("A", "P")
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
