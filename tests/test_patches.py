"""Masked lesion patches, FLAIR normalisation and the .npz contract."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from qsmrim_app.lesions import label_instances
from qsmrim_app.patches import extract_patches, load_patches, normalise_flair, save_patches


def _volumes(shape=(40, 40, 24)):
    rng = np.random.default_rng(0)
    qsm = rng.normal(0, 10, shape).astype(np.float32)
    flair = rng.normal(0, 1, shape).astype(np.float32)
    return qsm, flair, np.zeros(shape, dtype=np.int32)


def test_centring_and_masking_of_confluent_neighbour() -> None:
    qsm, flair, inst = _volumes()
    inst[18:23, 18:23, 10:13] = 1  # centre of mass (20, 20, 11)
    inst[23:26, 18:23, 10:13] = 2  # confluent neighbour, touching lesion 1
    ps = extract_patches(qsm, flair, inst, [1, 2])
    assert ps.patches.shape == (2, 2, 32, 32, 16) and ps.patches.dtype == np.float32
    assert ps.lesion_ids.tolist() == [1, 2] and ps.cropped == []
    p = ps.patches[0]
    # Centre voxel (20, 20, 11) lands at (16, 16, 8); the window starts at (4, 4, 3).
    assert p[0, 16, 16, 8] == qsm[20, 20, 11]
    assert p[1, 16, 16, 8] == flair[20, 20, 11]
    nonzero = np.argwhere(p[0] != 0)
    assert nonzero.min(axis=0).tolist() == [14, 14, 7] and nonzero.max(axis=0).tolist() == [18, 18, 9]
    assert np.count_nonzero(p[0]) == 75  # lesion 2 voxels (x 23..25 -> patch 19..21) are zero
    assert not p[:, 19:22].any()
    expected = np.where(inst[4:36, 4:36, 3:19] == 1, qsm[4:36, 4:36, 3:19], 0)
    np.testing.assert_array_equal(p[0], expected)


def test_edge_padding() -> None:
    qsm, flair, inst = _volumes()
    inst[0:3, 37:40, 0:2] = 5  # corner lesion, centre of mass (1, 38, 0.5) -> rounded (1, 38, 1)
    ps = extract_patches(qsm, flair, inst, [5])
    p = ps.patches[0, 0]
    # Window starts at (1-16, 38-16, 1-8) = (-15, 22, -7): volume index 0 -> patch 15 etc.
    np.testing.assert_array_equal(p[15:18, 15:18, 7:9], qsm[0:3, 37:40, 0:2])
    assert np.count_nonzero(p) == 18
    assert ps.cropped == []


def test_big_lesion_is_cropped_around_centre_and_reported() -> None:
    qsm, flair, inst = _volumes((50, 50, 30))
    inst[5:45, 10:20, 10:20] = 3  # 40 voxels along i > 32
    inst[30:33, 30:33, 5:8] = 4
    ps = extract_patches(np.ones_like(qsm), flair, inst, [3, 4])
    assert ps.cropped == [3]
    # centre (25, 15, 15) -> window starts (9, -1, 7): i 9..40 all lesion, j 10..19 -> 11..20, k 10..19 -> 3..12
    assert np.all(ps.patches[0, 0, :, 11:21, 3:13] == 1)
    assert np.count_nonzero(ps.patches[0, 0]) == 32 * 10 * 10


def test_unknown_lesion_and_shape_mismatch_raise() -> None:
    qsm, flair, inst = _volumes()
    inst[5:8, 5:8, 5:8] = 1
    with pytest.raises(ValueError, match="lesion 2"):
        extract_patches(qsm, flair, inst, [2])
    with pytest.raises(ValueError):
        extract_patches(qsm[:-1], flair, inst, [1])


def test_empty_lesion_list() -> None:
    qsm, flair, inst = _volumes()
    ps = extract_patches(qsm, flair, inst, [])
    assert ps.patches.shape == (0, 2, 32, 32, 16)


def test_npz_round_trip(tmp_path) -> None:
    qsm, flair, inst = _volumes()
    inst[5:8, 5:8, 5:8] = 2
    inst[20:25, 20:25, 10:12] = 7
    ps = extract_patches(qsm, flair, inst, [7, 2])
    path = save_patches(tmp_path / "sub-01_desc-lesion_patches.npz", ps, (0.5, 0.5, 2.0))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    back = load_patches(path)
    np.testing.assert_array_equal(back.patches, ps.patches)
    assert back.lesion_ids.dtype == np.int32 and back.lesion_ids.tolist() == [7, 2]
    assert back.voxel_size_mm.tolist() == [0.5, 0.5, 2.0]
    with np.load(path) as raw:
        assert set(raw.files) == {"patches", "lesion_id", "voxel_size_mm"}


def test_normalise_flair_robust_z_score() -> None:
    rng = np.random.default_rng(1)
    flair = rng.normal(300.0, 20.0, (30, 30, 30)).astype(np.float32)
    brain = np.zeros(flair.shape, dtype=bool)
    brain[3:27, 3:27, 3:27] = True
    flair[~brain] = 0.0
    lesions = np.zeros(flair.shape, dtype=np.int32)
    lesions[10:16, 10:16, 10:16] = 1
    flair[lesions > 0] = 900.0  # hyperintense lesions must not shift the reference
    out = normalise_flair(flair, brain, lesions)
    tissue = out[brain & (lesions == 0)]
    assert abs(np.median(tissue)) < 0.02
    assert np.subtract(*np.percentile(tissue, [75, 25])) / 1.349 == pytest.approx(1.0, abs=0.02)
    assert out[12, 12, 12] == pytest.approx((900 - 300) / 20, rel=0.05)
    # Without masks the non-zero voxels stand in for the brain; lesions then barely move it.
    assert normalise_flair(flair, None, None)[12, 12, 12] == pytest.approx(out[12, 12, 12], rel=0.1)


def test_real_flair_and_lesions(shared_data) -> None:
    folder = shared_data / "open_ms_data" / "patient07"
    flair_img = nib.load(folder / "FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz")
    flair = np.asarray(flair_img.dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(folder / "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz").dataobj)
    inst = label_instances(mask, min_voxels=10)
    norm = normalise_flair(flair, flair > 0, inst.labels)
    # MS lesions are FLAIR-hyperintense against normal-appearing tissue.
    assert np.median(norm[inst.labels > 0]) > 1.0
    ps = extract_patches(np.ones_like(flair), norm, inst.labels, inst.lesion_ids)
    assert ps.patches.shape[0] == len(inst.lesion_ids)
    sizes = np.bincount(inst.labels.ravel())
    for n, lesion_id in enumerate(inst.lesion_ids):
        kept = np.count_nonzero(ps.patches[n, 0])
        if lesion_id in ps.cropped:
            assert kept < sizes[lesion_id]
        else:
            assert kept == sizes[lesion_id]
