"""The phantom generator: files, grids, truth, realism of rims and counts, determinism, breakages."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from qsmrim_app.synthetic import HOWS, break_participant, generate_dataset, main, sample_lesion_counts


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """3 small subjects with many rim+ lesions, made through the CLI entry point."""
    out = tmp_path_factory.mktemp("synth") / "bids"
    assert main([str(out), "--subjects", "3", "--seed", "3", "--rimplus-fraction", "0.5"]) == 0
    return out, out.with_name("bids_truth")


def _anat(bids: Path, sub: str, suffix: str, deriv: bool = False) -> Path:
    root = bids / "derivatives" / "lesions" if deriv else bids
    return root / f"sub-{sub}" / "anat" / f"sub-{sub}_{suffix}.nii.gz"


def _flair_labels_in_qsm(bids: Path, truth: Path, sub: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Lesion dseg mapped into the QSM grid (nearest neighbour) with the true FLAIR->QSM transform."""
    qsm = nib.load(_anat(bids, sub, "Chimap"))
    dseg = nib.load(_anat(bids, sub, "desc-lesion_dseg", deriv=True))
    m = np.array(json.loads((truth / "transforms.json").read_text())["subjects"][f"sub-{sub}"]["n/a"]
                 ["flair_to_qsm_world"])
    qsm_to_flair_vox = np.linalg.inv(dseg.affine) @ np.linalg.inv(m) @ qsm.affine
    ijk = np.indices(qsm.shape).reshape(3, -1).astype(float)
    src = (qsm_to_flair_vox @ np.vstack([ijk, np.ones(ijk.shape[1])]))[:3]
    mapped = ndimage.map_coordinates(np.asarray(dseg.dataobj), src, order=0, cval=0).reshape(qsm.shape)
    return mapped.astype(np.int32), qsm


def test_files_and_sidecars(dataset):
    bids, truth = dataset
    desc = json.loads((bids / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.9.0" and desc["DatasetType"] == "raw"
    deriv_desc = json.loads((bids / "derivatives" / "lesions" / "dataset_description.json").read_text())
    assert deriv_desc["DatasetType"] == "derivative" and deriv_desc["GeneratedBy"][0]["Name"] == "qsmrim-synth"
    assert (bids / "README").read_text().strip()
    participants = pd.read_csv(bids / "participants.tsv", sep="\t")
    assert list(participants.participant_id) == ["sub-01", "sub-02", "sub-03"]
    for sub in ("01", "02", "03"):
        for suffix, deriv in [("Chimap", False), ("FLAIR", False), ("part-mag_T2starw", False),
                              ("desc-lesion_mask", True), ("desc-lesion_dseg", True), ("desc-rim_dseg", True)]:
            path = _anat(bids, sub, suffix, deriv)
            assert path.is_file(), path
            assert path.with_name(path.name.replace(".nii.gz", ".json")).is_file()
        sidecar = json.loads(_anat(bids, sub, "Chimap").with_suffix("").with_suffix(".json").read_text())
        assert sidecar["Units"] == "ppm" and sidecar["MagneticFieldStrength"] == 3
    for name in ("lesions.tsv", "subjects.tsv", "transforms.json"):
        assert (truth / name).is_file()
        assert not (bids / name).exists()


def test_grids_differ(dataset):
    bids, _ = dataset
    qsm, flair = nib.load(_anat(bids, "01", "Chimap")), nib.load(_anat(bids, "01", "FLAIR"))
    mag = nib.load(_anat(bids, "01", "part-mag_T2starw"))
    assert mag.shape == qsm.shape and np.allclose(mag.affine, qsm.affine)
    assert qsm.shape != flair.shape
    assert nib.aff2axcodes(qsm.affine) != nib.aff2axcodes(flair.affine)
    zooms = np.array(qsm.header.get_zooms())
    assert zooms[2] > 1.4 * zooms[0]  # anisotropic QSM, thick slices on k
    assert np.allclose(flair.header.get_zooms(), flair.header.get_zooms()[0])
    assert qsm.get_data_dtype() == np.float32
    chi = qsm.get_fdata()
    brain = chi != 0
    assert 0.15 < brain.mean() < 0.8
    assert -0.2 < np.percentile(chi[brain], 1) < 0 < np.percentile(chi[brain], 99) < 0.4  # ppm, not ppb


def test_truth_matches_masks(dataset):
    bids, truth = dataset
    lesions = pd.read_csv(truth / "lesions.tsv", sep="\t")
    subjects = pd.read_csv(truth / "subjects.tsv", sep="\t")
    assert set(lesions.kind) <= {"rim+", "iso", "hypo", "hyper", "vein-confounder", "homogeneous-hyper"}
    for _, row in subjects.iterrows():
        sub = row.participant_id[4:]
        table = lesions[lesions.participant_id == row.participant_id]
        assert len(table) == row.n_lesions and table.rim_positive.sum() == row.n_rimplus
        mask = nib.load(_anat(bids, sub, "desc-lesion_mask", True))
        dseg = nib.load(_anat(bids, sub, "desc-lesion_dseg", True))
        rim = np.asarray(nib.load(_anat(bids, sub, "desc-rim_dseg", True)).dataobj)
        flair = nib.load(_anat(bids, sub, "FLAIR"))
        assert mask.shape == dseg.shape == rim.shape == flair.shape
        assert np.allclose(mask.affine, flair.affine)
        ids = np.asarray(dseg.dataobj)
        assert mask.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(mask.dataobj), (ids > 0).astype(np.uint8))
        assert sorted(np.unique(ids[ids > 0])) == list(table.lesion_id)
        counts = np.bincount(ids.ravel())
        np.testing.assert_array_equal(counts[table.lesion_id], table.voxels_flair)
        expected_rim = np.zeros(counts.size, np.uint8)
        expected_rim[table.lesion_id] = np.where(table.rim_positive == 1, 2, 1)
        np.testing.assert_array_equal(rim, expected_rim[ids])
        # centroids are FLAIR-world means of the voxel indices
        com = np.array(ndimage.center_of_mass(ids > 0, ids, table.lesion_id.tolist()))
        world = nib.affines.apply_affine(flair.affine, com)
        np.testing.assert_allclose(world, table[["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]], atol=1e-3)


def test_lesion_counts_and_sizes(dataset):
    bids, truth = dataset
    lesions = pd.read_csv(truth / "lesions.tsv", sep="\t")
    per_subject = lesions.groupby("participant_id").size()
    assert per_subject.between(4, 15).all()
    assert lesions.voxels_qsm.min() >= 12 and lesions.voxels_qsm.max() <= 2500
    assert lesions.voxels_qsm.max() > 100  # some large lesions
    assert (lesions.location == "periventricular").mean() > 0.25
    # most lesions fit a 32x32x16 QSM patch; confluent neighbours exist (touching labels)
    mapped, _ = _flair_labels_in_qsm(bids, truth, "01")
    extents = [tuple(s.stop - s.start for s in sl) for sl in ndimage.find_objects(mapped) if sl is not None]
    assert np.mean([e[0] <= 32 and e[1] <= 32 and e[2] <= 16 for e in extents]) >= 0.9
    touching = 0
    for sub in ("01", "02", "03"):
        ids = np.asarray(nib.load(_anat(bids, sub, "desc-lesion_dseg", True)).dataobj)
        grown = ndimage.grey_dilation(ids, size=(3, 3, 3))
        touching += int(np.any((ids > 0) & (grown != ids) & (grown > 0)))
    assert touching >= 1


def test_transform_relates_flair_and_qsm(dataset):
    """The recorded transform maps FLAIR lesions onto the lesions visible in the QSM-grid magnitude."""
    bids, truth = dataset
    lesions = pd.read_csv(truth / "lesions.tsv", sep="\t")
    table = lesions[lesions.participant_id == "sub-02"]
    m = np.array(json.loads((truth / "transforms.json").read_text())["subjects"]["sub-02"]["n/a"]
                 ["flair_to_qsm_world"])
    assert not np.allclose(m, np.eye(4), atol=1e-3)
    moved = nib.affines.apply_affine(m, table[["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].to_numpy())
    qsm_centroids = table[["qsm_centroid_x_mm", "qsm_centroid_y_mm", "qsm_centroid_z_mm"]].to_numpy()
    assert np.median(np.linalg.norm(moved - qsm_centroids, axis=1)) < 1.5
    mapped, _ = _flair_labels_in_qsm(bids, truth, "02")
    mag = nib.load(_anat(bids, "02", "part-mag_T2starw")).get_fdata()
    lesion = mapped > 0
    shell = ndimage.binary_dilation(lesion, iterations=2) & ~ndimage.binary_dilation(lesion)
    assert mag[lesion].mean() > 1.05 * np.median(mag[shell])
    flair = nib.load(_anat(bids, "02", "FLAIR")).get_fdata()
    ids = np.asarray(nib.load(_anat(bids, "02", "desc-lesion_dseg", True)).dataobj) > 0
    ring = ndimage.binary_dilation(ids, iterations=3) & ~ndimage.binary_dilation(ids, iterations=1)
    assert flair[ids].mean() > 1.4 * np.median(flair[ring])


def test_rim_plus_lesions_have_paramagnetic_edges(dataset):
    """Measured like a reader would: edge minus core QSM inside FLAIR masks mapped to the QSM grid."""
    bids, truth = dataset
    lesions = pd.read_csv(truth / "lesions.tsv", sep="\t")
    contrast = {0: [], 1: []}
    for sub in ("01", "02", "03"):
        mapped, qsm = _flair_labels_in_qsm(bids, truth, sub)
        chi = qsm.get_fdata()
        for _, row in lesions[lesions.participant_id == f"sub-{sub}"].iterrows():
            mask = mapped == row.lesion_id
            core = ndimage.binary_erosion(mask)
            edge = mask & ~core
            if core.sum() >= 3 and edge.sum() >= 3:
                contrast[int(row.rim_positive)].append(chi[edge].mean() - chi[core].mean())
    assert len(contrast[1]) >= 5 and len(contrast[0]) >= 5
    assert np.mean(contrast[1]) > np.mean(contrast[0]) + 0.01
    assert np.median(contrast[1]) > 0.005


def test_rimplus_counts_are_skewed():
    counts = np.array(sample_lesion_counts(40, seed=0, size="full"))
    rim = counts[:, 1]
    assert np.median(rim) <= 1 and rim.max() >= 5 and np.mean(rim == 0) >= 0.3
    assert 0.02 <= rim.sum() / counts[:, 0].sum() <= 0.10
    small = np.array(sample_lesion_counts(400, seed=1, size="small"))
    assert small[:, 0].min() >= 6 and small[:, 0].max() <= 15
    assert 0.02 <= small[:, 1].sum() / small[:, 0].sum() <= 0.08
    many = np.array(sample_lesion_counts(200, seed=1, size="small", rimplus_fraction=0.4))
    assert many[:, 1].sum() / many[:, 0].sum() > 0.2
    assert np.all(many[:, 1] <= many[:, 0])


def test_counts_agree_with_dataset(dataset):
    _, truth = dataset
    subjects = pd.read_csv(truth / "subjects.tsv", sep="\t")
    drawn = sample_lesion_counts(3, seed=3, rimplus_fraction=0.5)
    for (n, r), (_, row) in zip(drawn, subjects.iterrows()):
        assert n - 2 <= row.n_lesions <= n and row.n_rimplus <= r  # only too-small lesions are ever dropped


def test_deterministic_and_seed_dependent(tmp_path):
    a = tmp_path / "a" / "bids"
    b = tmp_path / "b" / "bids"
    c = tmp_path / "c" / "bids"
    for out, seed in ((a, 7), (b, 7), (c, 8)):
        generate_dataset(out, 1, seed=seed, magnitude=False)
    for suffix, deriv in (("Chimap", False), ("FLAIR", False), ("desc-lesion_dseg", True)):
        xa, xb = (np.asarray(nib.load(_anat(p, "01", suffix, deriv)).dataobj) for p in (a, b))
        np.testing.assert_array_equal(xa, xb)
    assert (tmp_path / "a" / "bids_truth" / "lesions.tsv").read_text() == \
        (tmp_path / "b" / "bids_truth" / "lesions.tsv").read_text()
    xa, xc = (nib.load(_anat(p, "01", "Chimap")).get_fdata() for p in (a, c))
    assert xa.shape == xc.shape and not np.allclose(xa, xc)
    assert not (a / "sub-01" / "anat" / "sub-01_part-mag_T2starw.nii.gz").exists()


def test_sessions_and_refusal(tmp_path, capsys):
    out, truth = tmp_path / "bids", tmp_path / "truth"
    argv = [str(out), "--subjects", "1", "--sessions", "2", "--no-magnitude", "--truth-dir", str(truth)]
    assert main(argv) == 0
    for ses in ("01", "02"):
        anat = out / "sub-01" / f"ses-{ses}" / "anat"
        assert (anat / f"sub-01_ses-{ses}_Chimap.nii.gz").is_file()
        assert (anat / f"sub-01_ses-{ses}_FLAIR.nii.gz").is_file()
        assert (out / "derivatives/lesions/sub-01" / f"ses-{ses}" / "anat" /
                f"sub-01_ses-{ses}_desc-rim_dseg.nii.gz").is_file()
    subjects = pd.read_csv(truth / "subjects.tsv", sep="\t")
    assert list(subjects.session) == ["ses-01", "ses-02"]
    transforms = json.loads((truth / "transforms.json").read_text())["subjects"]["sub-01"]
    assert not np.allclose(transforms["ses-01"]["flair_to_qsm_world"], transforms["ses-02"]["flair_to_qsm_world"])
    assert main(argv) != 0  # refuses a non-empty output
    assert "not empty" in capsys.readouterr().err
    assert main([str(out), "--subjects", "1", "--no-magnitude", "--truth-dir", str(truth), "--overwrite"]) == 0
    assert not (out / "sub-01" / "ses-01").exists() and (out / "sub-01" / "anat").is_dir()  # stale sessions gone
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--size", "huge"])


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("sub-02*")
            if p.is_file()}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pristine") / "bids"
    generate_dataset(out, 2, seed=5, magnitude=False)
    return out


@pytest.mark.parametrize("how", HOWS)
def test_break_participant(pristine, tmp_path, how):
    bids = tmp_path / "bids"
    shutil.copytree(pristine, bids)
    before = _digest(bids)
    break_participant(bids, "sub-01", how)
    assert _digest(bids) == before  # the other participant is untouched
    qsm_path, flair_path = _anat(bids, "01", "Chimap"), _anat(bids, "01", "FLAIR")
    mask_path = _anat(bids, "01", "desc-lesion_mask", True)
    if how == "missing-flair":
        assert not flair_path.exists() and qsm_path.exists()
    elif how == "4d-qsm":
        assert nib.load(qsm_path).ndim == 4
    elif how == "nan-qsm":
        assert np.isnan(nib.load(qsm_path).get_fdata()).all()
    elif how == "corrupt-gzip":
        with pytest.raises(Exception):
            nib.load(qsm_path).get_fdata()
    elif how == "empty-mask":
        assert not np.asarray(nib.load(mask_path).dataobj).any()
    elif how == "mismatched-mask-grid":
        mask, flair = nib.load(mask_path), nib.load(flair_path)
        assert mask.shape != flair.shape and not np.allclose(mask.affine, flair.affine)
        assert np.asarray(mask.dataobj).any()
    elif how == "nonbinary-mask":
        values = np.unique(np.asarray(nib.load(mask_path).dataobj))
        assert not set(values.tolist()) <= {0, 1} and values.max() > 0
        assert not _anat(bids, "01", "desc-lesion_dseg", True).exists()
    with pytest.raises(ValueError):
        break_participant(bids, "02", "melt")


@pytest.mark.slow
def test_full_size_against_real_data(tmp_path, shared_data):
    """Benchmark-size phantom: grids as specified; lesion sizes and QSM range like real data."""
    out = tmp_path / "bids"
    truth = generate_dataset(out, 1, seed=2, size="full", magnitude=False)
    flair, qsm = nib.load(_anat(out, "01", "FLAIR")), nib.load(_anat(out, "01", "Chimap"))
    assert flair.shape == (256, 256, 176) and np.allclose(flair.header.get_zooms(), 1.0)
    assert np.allclose(qsm.header.get_zooms(), (0.75, 0.75, 3.0))
    lesions = pd.read_csv(truth / "lesions.tsv", sep="\t")
    assert 45 <= len(lesions) <= 80
    real = []
    for path in sorted((shared_data / "open_ms_data").glob("patient*/GOLD_STANDARD*.nii.gz")):
        labels, _ = ndimage.label(np.asarray(nib.load(path).dataobj) > 0, np.ones((3, 3, 3)))
        real.extend(np.bincount(labels.ravel())[1:])
    real = np.array(real, float)  # 1 mm isotropic, so voxels are mm3
    real_median = np.median(real[real >= 30])
    assert 0.5 * real_median < lesions.voxels_flair.median() < 4 * real_median
    assert lesions.voxels_flair.max() <= real.max()
    cosmos = np.asarray(nib.load(shared_data / "qsm_challenge_2016" / "chi_cosmos.nii.gz").dataobj)
    brain = np.asarray(nib.load(shared_data / "qsm_challenge_2016" / "msk.nii.gz").dataobj) > 0
    chi = qsm.get_fdata()
    ours, theirs = np.percentile(chi[chi != 0], [1, 99]), np.percentile(cosmos[brain], [1, 99])
    assert np.all(np.abs(ours - theirs) < 0.1), (ours, theirs)


def test_enriched_rimplus_fraction_spreads_over_subjects():
    """Above the clinical rate the excess is shared by every subject (the demo's 3 subjects all get rim+)."""
    enriched = np.array(sample_lesion_counts(200, seed=1, size="small", rimplus_fraction=0.3))
    assert np.mean(enriched[:, 1] > 0) >= 0.95
    assert 0.25 <= enriched[:, 1].sum() / enriched[:, 0].sum() <= 0.35
    assert [r for _, r in sample_lesion_counts(3, seed=1, rimplus_fraction=0.3)] == [3, 2, 3]  # make demo
    clinical = np.array(sample_lesion_counts(200, seed=1, size="small"))
    assert np.mean(clinical[:, 1] == 0) >= 0.5  # the clinical default keeps its skew


def test_lesions_stay_in_one_hemisphere_in_one_piece(dataset):
    """Each truth lesion is one 26-connected blob on one side of the head's midline (x = 0 of the head frame)."""
    bids, truth = dataset
    transforms = json.loads((truth / "transforms.json").read_text())["subjects"]
    for sub in ("01", "02", "03"):
        dseg = nib.load(_anat(bids, sub, "desc-lesion_dseg", deriv=True))
        labels = np.asarray(dseg.dataobj)
        t = transforms[f"sub-{sub}"]["n/a"]
        flair_vox_to_head = (np.linalg.inv(np.array(t["head_to_qsm_world"])) @ np.array(t["flair_to_qsm_world"])
                             @ dseg.affine)
        for lesion_id in np.unique(labels[labels > 0]):
            ijk = np.argwhere(labels == lesion_id)
            x_head = (flair_vox_to_head[0, :3] @ ijk.T) + flair_vox_to_head[0, 3]
            assert np.all(x_head > 0) or np.all(x_head < 0), (sub, lesion_id, x_head.min(), x_head.max())
            assert ndimage.label(labels == lesion_id, structure=np.ones((3, 3, 3)))[1] == 1, (sub, lesion_id)
