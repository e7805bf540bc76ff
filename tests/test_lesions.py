"""Lesion instances, rim labels and geometry: hand-made arrays and real expert lesion masks."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from qsmrim_app.lesions import (
    GEOMETRY_COLUMNS,
    LesionMaskError,
    carry_rim_labels,
    label_instances,
    lesion_geometry,
)


def _cube(corner: tuple[int, int, int], edge: int) -> tuple[slice, ...]:
    return tuple(slice(c, c + edge) for c in corner)


def test_diagonal_neighbours_join_26_connectivity() -> None:
    mask = np.zeros((10, 10, 10), dtype=np.uint8)
    mask[_cube((1, 1, 1), 3)] = 1
    mask[_cube((4, 4, 4), 3)] = 1  # touches the first only at the corner (3,3,3)-(4,4,4)
    result = label_instances(mask, min_voxels=1)
    assert result.lesion_ids == (1,)
    assert result.dropped == 0
    assert np.count_nonzero(result.labels == 1) == 54


def test_small_components_dropped_and_ids_renumbered_in_scan_order() -> None:
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels, first in scan order, dropped
    mask[5:8, 5:8, 5:8] = True  # 27 voxels
    mask[15, 15, 15] = True  # 1 voxel, dropped
    mask[12:15, 0:3, 0:3] = True  # 27 voxels
    result = label_instances(mask, min_voxels=10)
    assert result.dropped == 2
    assert result.lesion_ids == (1, 2)
    assert result.labels.dtype == np.int32
    assert result.labels[6, 6, 6] == 1 and result.labels[13, 1, 1] == 2
    assert result.labels[0, 0, 0] == 0 and result.labels[15, 15, 15] == 0
    assert set(np.unique(result.labels).tolist()) == {0, 1, 2}


def test_instance_map_keeps_touching_instances_and_disconnected_parts() -> None:
    dseg = np.zeros((12, 12, 12), dtype=np.int16)
    dseg[2:5, 2:5, 2:5] = 7
    dseg[5:8, 2:5, 2:5] = 3  # face-touching neighbour: stays separate
    dseg[10:12, 10:12, 10:12] = 7  # disconnected part of lesion 7: stays lesion 7
    dseg[0, 11, 0] = 9  # tiny instance: dropped
    result = label_instances(dseg, min_voxels=10, is_instance_map=True)
    assert result.lesion_ids == (3, 7)
    assert result.dropped == 1
    assert np.count_nonzero(result.labels == 7) == 27 + 8
    assert np.count_nonzero(result.labels == 3) == 27
    assert result.labels[0, 11, 0] == 0


def test_non_binary_mask_error_names_values() -> None:
    mask = np.zeros((5, 5, 5))
    mask[1, 1, 1] = 2
    mask[2, 2, 2] = 0.5
    with pytest.raises(LesionMaskError, match=r"0\.5, 2"):
        label_instances(mask)


def test_empty_mask_gives_zero_lesions() -> None:
    result = label_instances(np.zeros((4, 4, 4), dtype=np.uint8))
    assert result.lesion_ids == () and result.dropped == 0
    assert not result.labels.any()
    table = lesion_geometry(result.labels, np.eye(4))
    assert list(table.columns) == list(GEOMETRY_COLUMNS) and len(table) == 0


def test_rim_labels_majority_and_disagreement() -> None:
    instances = np.zeros((10, 10, 10), dtype=np.int32)
    instances[0:2, 0:2, 0:5] = 1  # 20 voxels
    instances[5:7, 5:7, 0:5] = 2  # 20 voxels
    instances[8:10, 8:10, 8:10] = 3  # 8 voxels, not annotated
    rim = np.zeros_like(instances, dtype=np.uint8)
    rim[instances == 1] = 2  # all rim+
    rim[instances == 2] = 1
    rim[5, 5, 0:3] = 2  # 3 of 20 voxels disagree
    rim[9, 0, 0] = 2  # annotation outside any lesion is ignored
    result = carry_rim_labels(instances, rim)
    assert result.labels == {1: 1, 2: 0}
    assert result.agreement[1] == 1.0
    assert result.agreement[2] == pytest.approx(17 / 20)
    assert result.disagreeing == [2]
    assert result.missing == [3]
    assert result.label_for(3) is None


def test_rim_labels_reject_unknown_values() -> None:
    instances = np.ones((3, 3, 3), dtype=np.int32)
    with pytest.raises(LesionMaskError):
        carry_rim_labels(instances, np.full((3, 3, 3), 5))


def test_geometry_with_non_trivial_affine() -> None:
    instances = np.zeros((6, 7, 8), dtype=np.int32)
    instances[1, 2, 3] = 4
    instances[3, 2, 3] = 4  # mean index (2, 2, 3)
    instances[5, 6, 7] = 2  # single voxel
    affine = np.array(
        [[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -5.0], [0.0, 0.0, 3.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
    )
    table = lesion_geometry(instances, affine)
    assert list(table.columns) == list(GEOMETRY_COLUMNS)
    assert table["lesion_id"].tolist() == [2, 4]
    assert table["voxels"].tolist() == [1, 2]
    assert table["volume_mm3"].tolist() == pytest.approx([9.0, 18.0])  # |det| = 2 * 1.5 * 3
    # lesion 2 at (5, 6, 7): x = -2*6 + 10, y = 1.5*5 - 5, z = 3*7 + 1
    assert table.iloc[0][["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].tolist() == pytest.approx([-2.0, 2.5, 22.0])
    # lesion 4 at (2, 2, 3): x = -4 + 10, y = 3 - 5, z = 9 + 1
    assert table.iloc[1][["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].tolist() == pytest.approx([6.0, -2.0, 10.0])


@pytest.mark.parametrize("patient", ["patient01", "patient07", "patient19"])
def test_real_expert_masks(shared_data, patient: str) -> None:
    img = nib.load(shared_data / "open_ms_data" / patient / "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz")
    mask = np.asarray(img.dataobj)
    result = label_instances(mask, min_voxels=1)
    # The dataset documents 17 to 392 lesions per patient.
    assert 17 <= len(result.lesion_ids) <= 392
    assert np.array_equal(result.labels > 0, mask > 0)  # min_voxels=1 keeps every voxel
    filtered = label_instances(mask, min_voxels=10)
    assert len(filtered.lesion_ids) + filtered.dropped == len(result.lesion_ids)
    table = lesion_geometry(filtered.labels, img.affine)
    assert table["voxels"].min() >= 10
    assert table["voxels"].sum() == np.count_nonzero(filtered.labels)
    # Centroids of lesions lie within the brain's world bounding box.
    corners = nib.affines.apply_affine(img.affine, np.array([[0, 0, 0], np.array(mask.shape) - 1]))
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    xyz = table[["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].to_numpy()
    assert np.all(xyz >= lo) and np.all(xyz <= hi)
    # Instance ids are kept when the map is fed back in as an instance map.
    again = label_instances(filtered.labels, min_voxels=10, is_instance_map=True)
    assert again.lesion_ids == filtered.lesion_ids and again.dropped == 0
