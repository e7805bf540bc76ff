"""Output naming, sidecars and atomic, concurrency-safe writes."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from qsmrim_app import derivatives as drv


def test_names_follow_bids_entity_order():
    unit = drv.Unit("01", "02")
    root = Path("/out")
    assert drv.output_path(root, unit, "rimplus_probseg") == Path(
        "/out/sub-01/ses-02/anat/sub-01_ses-02_space-QSM_label-rimplus_probseg.nii.gz")
    assert drv.output_path(root, unit, "xfm_flair_to_qsm").name == "sub-01_ses-02_from-FLAIR_to-QSM_mode-image_xfm.txt"
    assert drv.output_path(root, drv.Unit("a"), "summary") == Path("/out/sub-a/anat/sub-a_desc-rim_summary.tsv")
    assert drv.sidecar_path(Path("x/sub-a_space-QSM_desc-lesions_dseg.nii.gz")).name == "sub-a_space-QSM_desc-lesions_dseg.json"


def test_every_output_name_is_parsed_back_by_pybids(tmp_path):
    from bids.layout import parse_file_entities

    unit = drv.Unit("07", "pre")
    for role in drv.OUTPUTS:
        entities = parse_file_entities(str(drv.output_path(tmp_path, unit, role)))
        assert entities["subject"] == "07" and entities["session"] == "pre", role


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "table.tsv"
    with pytest.raises(RuntimeError):
        with drv.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_nifti_tsv_json_round_trip(tmp_path):
    affine = np.diag([0.9, 0.9, 2.0, 1.0])
    data = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    path = drv.write_nifti(tmp_path / "a.nii.gz", data, affine)
    image = nib.load(path)
    assert np.array_equal(np.asarray(image.dataobj), data) and np.allclose(image.affine, affine)
    table = pd.DataFrame({"lesion_id": [1, 2], "probability": [0.25, np.nan]})
    drv.write_tsv(tmp_path / "t.tsv", table)
    assert (tmp_path / "t.tsv").read_text().splitlines()[2].endswith("n/a")
    pd.testing.assert_frame_equal(drv.read_tsv(tmp_path / "t.tsv"), table)
    drv.write_json(tmp_path / "m.json", {"n": np.int64(3), "x": np.float32(0.5)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"n": 3, "x": 0.5}


def _init(args):
    out, bids = args
    for _ in range(20):
        drv.init_output_dir(Path(out), Path(bids))
    return True


def test_parallel_init_output_dir_never_corrupts(tmp_path):
    out, bids = tmp_path / "out", tmp_path / "bids"
    bids.mkdir()
    with mp.get_context("spawn").Pool(4) as pool:
        assert all(pool.map(_init, [(str(out), str(bids))] * 8))
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "qsmrim"
    assert "raw" in description["DatasetLinks"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or ".tmp" in p.name]


def test_generated_by_records_container(monkeypatch):
    from qsmrim_app.cli.common import CONTAINER_ENV, container_name

    monkeypatch.setenv(CONTAINER_ENV, "docker://qsmrim/qsmrim:0.1.0")  # what the image sets (Dockerfile)
    assert drv.generated_by(container_name())[0]["Container"] == {"Type": "docker", "Tag": "qsmrim/qsmrim:0.1.0"}
    monkeypatch.delenv(CONTAINER_ENV)
    assert "Container" not in drv.generated_by(container_name())[0]


def test_bids_uri(tmp_path):
    assert drv.bids_uri(tmp_path / "sub-01" / "anat" / "x.nii.gz", tmp_path) == "bids:raw:sub-01/anat/x.nii.gz"
    assert drv.bids_uri("/elsewhere/x.nii.gz", tmp_path) == "/elsewhere/x.nii.gz"


def test_json_is_strict(tmp_path):
    drv.write_json(tmp_path / "a.json", {"r": float("nan"), "ci": [np.float64("nan"), 0.5], "n": 3})
    assert json.loads((tmp_path / "a.json").read_text()) == {"r": None, "ci": [None, 0.5], "n": 3}
