"""The nipype interfaces' own behaviour: messages that name files, NaN handling, unit warnings."""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from qsmrim_app.interfaces._base import InputDataError


@pytest.fixture
def in_tmp(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(cwd)


def _save(path, data, zooms=(1.0, 1.0, 2.0)):
    nib.save(nib.Nifti1Image(np.asarray(data), np.diag([*zooms, 1.0])), str(path))
    return str(path)


def test_prepare_qsm_masks_nan_and_converts_to_ppb(in_tmp):
    from qsmrim_app.interfaces.qsm import PrepareQSM

    chi = np.zeros((24, 24, 10), np.float32)
    chi[4:20, 4:20, 2:8] = np.random.default_rng(0).normal(0.0, 0.05, (16, 16, 6))
    chi[10, 10, 5] = np.nan
    path = _save(in_tmp / "chi.nii.gz", chi)
    result = PrepareQSM(in_file=path, units="ppm").run()
    out = np.asarray(nib.load(result.outputs.out_file).dataobj)
    assert result.outputs.n_nonfinite == 1 and np.isfinite(out).all()
    assert out[10, 10, 5] == 0
    np.testing.assert_allclose(out[5, 5, 3], chi[5, 5, 3] * 1000, rtol=1e-5)
    assert any("NaN" in w for w in result.outputs.warnings)
    # Declared ppb although the values are ppm-like: the user is told how to fix it.
    assert any("--qsm-units ppm" in w for w in PrepareQSM(in_file=path, units="ppb").run().outputs.warnings)


def test_prepare_qsm_refuses_an_all_nan_map(in_tmp):
    from qsmrim_app.interfaces.qsm import PrepareQSM

    path = _save(in_tmp / "nan.nii.gz", np.full((8, 8, 4), np.nan, np.float32))
    with pytest.raises(InputDataError, match="nan.nii.gz"):
        PrepareQSM(in_file=path, units="ppm").run()


def test_failed_registration_names_both_images(in_tmp):
    from qsmrim_app.interfaces.registration import RegisterFLAIRToQSM

    rng = np.random.default_rng(1)
    head = np.zeros((40, 40, 20), np.float32)
    zz, yy, xx = np.mgrid[:40, :40, :20]
    head[((zz - 20) / 15) ** 2 + ((yy - 20) / 12) ** 2 + ((xx - 10) / 7) ** 2 < 1] = 100
    fixed = _save(in_tmp / "mag.nii.gz", head + rng.normal(0, 1, head.shape).astype(np.float32))
    noise = _save(in_tmp / "flair_noise.nii.gz", rng.uniform(1, 100, (40, 40, 20)).astype(np.float32))
    with pytest.raises(InputDataError, match="flair_noise.nii.gz.*mag.nii.gz"):
        RegisterFLAIRToQSM(fixed_file=fixed, moving_file=noise, max_metric=-0.05).run()


@pytest.mark.parametrize("mode", ["rigid", "affine"])
def test_registration_records_mode_and_each_stage_metric(in_tmp, mode):
    """The transform's sidecar fields and the report say which mode ran and what each stage reached."""
    import json

    import SimpleITK as sitk
    from scipy import ndimage

    from qsmrim_app.interfaces.registration import RegisterFLAIRToQSM

    zz, yy, xx = np.mgrid[:40, :40, :20]
    head = ((((zz - 20) / 15) ** 2 + ((yy - 20) / 12) ** 2 + ((xx - 10) / 7) ** 2) < 1) * 100.0
    head += (zz > 24) * head * 0.6 + (yy > 26) * head * 0.3  # asymmetric, so the alignment is unique
    head = ndimage.gaussian_filter(head, 1.0).astype(np.float32)
    fixed = _save(in_tmp / "mag.nii.gz", head)
    moving = _save(in_tmp / "flair.nii.gz", ndimage.shift(head, (1.5, -1.0, 0.5), order=1))
    result = RegisterFLAIRToQSM(fixed_file=fixed, moving_file=moving, mode=mode).run()
    sidecar = json.loads(open(result.outputs.sidecar_file).read())
    report = json.loads(open(result.outputs.report_file).read())
    stages = ["Rigid"] + (["Affine"] if mode == "affine" else [])
    assert sidecar["RegistrationMode"] == report["RegistrationMode"] == mode
    assert [k for k in sidecar if k.startswith("Stage") and k.endswith("Metric")] == [f"Stage{s}Metric" for s in stages]
    assert all(sidecar[f"Stage{s}Metric"] < -0.05 for s in stages)
    assert "FixedImage" in report and "FixedImage" not in sidecar  # no work-dir paths in the derivatives
    name = sitk.ReadTransform(result.outputs.transform_file).GetName()
    assert ("Affine" in name) == (mode == "affine")


def test_lesion_instances_names_the_source_mask(in_tmp):
    from qsmrim_app.interfaces.lesions import LesionInstances

    mask = np.zeros((20, 20, 10), np.uint8)
    mask[5:9, 5:9, 3:6] = 3
    path = _save(in_tmp / "resampled.nii.gz", mask)
    with pytest.raises(InputDataError, match="sub-07_desc-lesion_mask.nii.gz"):
        LesionInstances(mask_file=path, source_file="/data/sub-07_desc-lesion_mask.nii.gz").run()
    mask[mask > 0] = 1
    mask[15:17, 15:17, 8] = 1  # 4 voxels: below --min-lesion-voxels
    result = LesionInstances(mask_file=_save(in_tmp / "ok.nii.gz", mask), min_voxels=10).run()
    assert result.outputs.n_lesions == 1 and result.outputs.n_dropped == 1
    assert any("smaller than 10 voxels" in m for m in result.outputs.messages)
