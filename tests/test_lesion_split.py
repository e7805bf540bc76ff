"""Confluent-lesion splitting (lesion centres): constructed shapes, grids, probability maps, real masks."""
from __future__ import annotations

import glob

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qsmrim_app.lesion_split import (
    LesionValueError,
    SplitParams,
    hessian_max_eigenvalue,
    prepare_lesions,
    split_lesions,
    voxel_sizes,
)
from qsmrim_app.lesions import lesion_geometry


def _coords(extent_mm: float, h: float) -> tuple[np.ndarray, ...]:
    """World coordinates (mm) of voxel centres of a cube ``extent_mm`` wide at spacing ``h``."""
    axis = (np.arange(int(round(extent_mm / h))) + 0.5) * h
    return np.meshgrid(axis, axis, axis, indexing="ij")


def _balls(h: float, centres: list[tuple[float, float, float]], radius: float, extent: float = 40.0) -> np.ndarray:
    x, y, z = _coords(extent, h)
    mask = np.zeros(x.shape, dtype=bool)
    for cx, cy, cz in centres:
        mask |= (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < radius ** 2
    return mask


def _affine(h: float) -> np.ndarray:
    return np.diag([h, h, h, 1.0])


def test_two_touching_spheres_become_two_lesions() -> None:
    mask = _balls(1.0, [(16.0, 20.0, 20.0), (24.0, 20.0, 20.0)], 5.0)  # 2 mm overlap
    assert ndimage.label(mask, np.ones((3, 3, 3)))[1] == 1
    result = split_lesions(mask.astype(np.uint8), (1.0, 1.0, 1.0))
    assert result.n_components == 1 and result.n_lesions == 2
    assert result.split_from == {1: 1, 2: 1}
    assert np.array_equal(result.labels > 0, mask), "splitting must neither add nor lose voxels"
    centroids = lesion_geometry(result.labels, _affine(1.0))[["centroid_x_mm"]].to_numpy().ravel()
    # voxel centres sit at i + 0.5 mm here; the affine maps index i to i mm
    assert sorted(np.round(centroids + 0.5)) == pytest.approx([15.5, 24.5], abs=1.0)


@pytest.mark.parametrize("h", [0.5, 1.0])
def test_one_elongated_lesion_stays_one(h: float) -> None:
    x, y, z = _coords(40.0, h)
    rot = np.array([[0.8, 0.6, 0.0], [-0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])  # oblique to the grid
    local = np.tensordot(rot, np.stack([x - 20, y - 20, z - 20]), axes=1)
    cigar = (local[0] / 14.0) ** 2 + (local[1] / 3.0) ** 2 + (local[2] / 3.5) ** 2 < 1.0
    result = split_lesions(cigar.astype(np.float32), (h, h, h))
    assert result.n_lesions == 1 and result.split_from == {}


def test_separate_lesions_keep_their_own_ids_and_no_split_from() -> None:
    mask = _balls(1.0, [(10.0, 10.0, 10.0), (30.0, 30.0, 30.0)], 4.0)
    result = split_lesions(mask, (1.0, 1.0, 1.0))
    assert result.n_components == 2 and result.n_lesions == 2 and result.split_from == {}


def test_a_component_without_big_enough_centres_stays_one_lesion() -> None:
    mask = _balls(1.0, [(16.0, 20.0, 20.0), (24.0, 20.0, 20.0)], 5.0)
    result = split_lesions(mask, (1.0, 1.0, 1.0), params=SplitParams(min_centre_mm3=1e6))
    assert result.n_lesions == 1 and result.split_from == {}


def test_same_lesions_on_half_and_one_millimetre_grids_agree() -> None:
    centres = [(12.0, 20.0, 20.0), (19.5, 20.0, 20.0), (27.0, 21.0, 20.0)]  # a chain of three
    found = {}
    for h in (0.5, 1.0):
        mask = _balls(h, centres, 4.5)
        result = split_lesions(mask, (h, h, h))
        table = lesion_geometry(result.labels, _affine(h))
        # world centroid of voxel i is i*h here; voxel centres are at (i + 0.5) h
        found[h] = np.sort(table["centroid_x_mm"].to_numpy() + 0.5 * h)
    assert len(found[0.5]) == len(found[1.0]) == 3
    assert np.max(np.abs(found[0.5] - found[1.0])) < 1.0


def test_hessian_is_in_millimetres_on_anisotropic_grids() -> None:
    # f = -(x^2 + 2 y^2 + 3 z^2): Hessian diag(-2, -4, -6) per mm^2 whatever the voxel size;
    # smoothing only adds a constant to a quadratic; the truncated kernels are within 2 %.
    zooms = (0.8, 1.3, 2.5)
    idx = np.meshgrid(*[np.arange(n) for n in (40, 30, 20)], indexing="ij")
    x, y, z = [(i - c) * s for i, c, s in zip(idx, (20, 15, 10), zooms)]
    f = -(x ** 2 + 2 * y ** 2 + 3 * z ** 2)
    inside = np.zeros(f.shape, dtype=bool)
    inside[18:22, 13:17, 9:11] = True
    assert np.allclose(hessian_max_eigenvalue(f, inside, zooms, 1.25), -2.0, rtol=0.02)  # kernel truncation


def test_box_result_equals_whole_volume_filtering() -> None:
    mask = _balls(1.0, [(12.0, 20.0, 20.0), (19.0, 20.0, 20.0), (31.0, 30.0, 10.0)], 4.0)
    comp = ndimage.label(mask, np.ones((3, 3, 3)))[0] == 1
    whole = hessian_max_eigenvalue(mask.astype(float), comp, (1.0, 1.0, 1.0), 1.25)
    box = tuple(slice(max(s.start - 7, 0), s.stop + 7) for s in ndimage.find_objects(comp.astype(int))[0])
    cropped = hessian_max_eigenvalue(mask[box].astype(float), comp[box], (1.0, 1.0, 1.0), 1.25)
    assert np.allclose(whole, cropped, atol=1e-12)


def test_probability_map_splits_on_its_peaks_and_thresholds() -> None:
    x, y, z = _coords(40.0, 1.0)
    prob = (0.95 * np.exp(-((x - 15) ** 2 + (y - 20) ** 2 + (z - 20) ** 2) / (2 * 3.0 ** 2))
            + 0.9 * np.exp(-((x - 24) ** 2 + (y - 20) ** 2 + (z - 20) ** 2) / (2 * 3.0 ** 2)))
    prob = np.clip(prob, 0, 1).astype(np.float32)
    mask = prob >= 0.5
    assert ndimage.label(mask, np.ones((3, 3, 3)))[1] == 1  # one blob at the threshold
    prepared = prepare_lesions(prob, (1.0, 1.0, 1.0), "probability", split="auto", threshold=0.5)
    assert prepared.is_instance_map and prepared.data.max() == 2
    assert np.array_equal(prepared.data > 0, mask)
    none = prepare_lesions(prob, (1.0, 1.0, 1.0), "probability", split="none", threshold=0.3)
    assert not none.is_instance_map and np.array_equal(none.data.astype(bool), prob >= 0.3)


def test_instance_map_is_never_resplit() -> None:
    dumbbell = _balls(1.0, [(16.0, 20.0, 20.0), (24.0, 20.0, 20.0)], 5.0).astype(np.int32) * 7
    prepared = prepare_lesions(dumbbell, (1.0, 1.0, 1.0), "instances", split="auto")
    assert prepared.is_instance_map and prepared.split_from == {}
    assert np.array_equal(prepared.data, dumbbell)


def test_values_are_checked_against_the_kind() -> None:
    with pytest.raises(LesionValueError, match="other than 0/1"):
        prepare_lesions(np.full((5, 5, 5), 2, np.uint8), (1.0, 1.0, 1.0), "binary")
    with pytest.raises(LesionValueError, match="outside 0..1"):
        prepare_lesions(np.full((5, 5, 5), 1.5, np.float32), (1.0, 1.0, 1.0), "probability")
    annotated = np.zeros((20, 20, 20), np.uint8)
    annotated[2:6, 2:6, 2:6] = 3  # LST-AI location class, not an instance id
    annotated[10:14, 10:14, 10:14] = 1
    prepared = prepare_lesions(annotated, (1.0, 1.0, 1.0), "annotated", split="none")
    assert set(np.unique(prepared.data).tolist()) == {0, 1}


def test_voxel_sizes_of_an_oblique_affine() -> None:
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.5, 0.75, 3.0])
    assert voxel_sizes(affine) == pytest.approx((0.5, 0.75, 3.0))


def test_real_expert_masks_split_into_more_lesions(shared_data) -> None:
    path = sorted(glob.glob(str(shared_data / "open_ms_data" / "patient03" / "GOLD*")))[0]
    img = nib.load(path)
    mask = np.asanyarray(img.dataobj) > 0
    n_components = ndimage.label(mask, np.ones((3, 3, 3)))[1]
    result = split_lesions(mask, voxel_sizes(img.affine))
    assert result.n_components == n_components
    assert n_components < result.n_lesions < 3 * n_components
    assert np.array_equal(result.labels > 0, mask)
    assert set(result.split_from.values()) <= set(range(1, n_components + 1))


def test_interfaces_carry_split_from_into_the_tables(tmp_path, monkeypatch) -> None:
    """PrepareLesionMask (mask grid) -> LesionInstances (QSM grid, here the same): split_from in every table."""
    import pandas as pd

    from qsmrim_app.interfaces.lesions import LesionInstances, PrepareLesionMask

    monkeypatch.chdir(tmp_path)
    mask = _balls(1.0, [(16.0, 20.0, 20.0), (24.0, 20.0, 20.0), (20.0, 33.0, 33.0)], 5.0)
    soft = np.where(mask, 0.9, 0.1).astype(np.float32)  # a soft mask, read as probability
    nib.save(nib.Nifti1Image(soft, _affine(1.0)), tmp_path / "mask.nii.gz")
    prepared = PrepareLesionMask(mask_file=str(tmp_path / "mask.nii.gz"), kind="probability", split="auto",
                                 notes=["lesion mask mask.nii.gz has values between 0 and 1: read as ..."]).run()
    assert prepared.outputs.messages[0].startswith("lesion mask mask.nii.gz has values between 0 and 1")
    assert "1 confluent component(s) of 2 split into 2 lesions" in prepared.outputs.messages[1]
    found = LesionInstances(mask_file=prepared.outputs.out_file, is_instance_map=True, min_voxels=10,
                            split_file=prepared.outputs.split_file,
                            split_messages=prepared.outputs.messages).run()
    geometry = pd.read_csv(found.outputs.geometry_file, sep="\t", na_values=["n/a"])
    dseg_tsv = pd.read_csv(found.outputs.dseg_tsv_file, sep="\t", na_values=["n/a"])
    assert list(geometry["split_from"].fillna(0).astype(int)) == [1, 1, 0]
    assert list(dseg_tsv["split_from"].fillna(0).astype(int)) == [1, 1, 0]
    assert found.outputs.n_lesions == 3


def test_split_from_is_never_a_training_feature(tmp_path) -> None:
    """group --train reads the radiomics tables: the new split_from column must not become a feature."""
    import pandas as pd

    from qsmrim_app import derivatives as drv
    from qsmrim_app.patches import PatchGrid, PatchSet, save_patches
    from qsmrim_app.workflows.training import collect_lesion_set

    unit = drv.Unit("01")
    features = pd.DataFrame({"lesion_id": [1, 2], "voxels": [30, 40], "volume_mm3": [30.0, 40.0],
                             "centroid_x_mm": [0.0, 1.0], "centroid_y_mm": [0.0, 1.0], "centroid_z_mm": [0.0, 1.0],
                             "split_from": pd.array([4, 4], dtype="Int64"), "original_firstorder_Mean": [1.0, 2.0]})
    drv.write_tsv(drv.output_path(tmp_path, unit, "radiomics"), features)
    drv.write_tsv(drv.output_path(tmp_path, unit, "annotations"),
                  pd.DataFrame({"lesion_id": [1, 2], "rim_positive": [0, 1], "agreement": [1.0, 1.0]}))
    save_patches(drv.output_path(tmp_path, unit, "patches"),
                 PatchSet(np.zeros((2, 4, 4, 4, 4), np.float32), np.array([1, 2]), PatchGrid((4, 4, 4), (1, 1, 1)),
                          np.tile(np.float32([0, 1]), (2, 1))), (1.0, 1.0, 1.0))
    lesions = collect_lesion_set(tmp_path)
    assert list(lesions.feature_names) == ["original_firstorder_Mean"]
