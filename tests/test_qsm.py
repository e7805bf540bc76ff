"""QSM unit conventions and the brain support of a reconstructed map."""
import numpy as np
import nibabel as nib
import pytest

from qsmrim_app.qsm import brain_mask, guess_units, to_ppb


def test_ppm_to_ppb_and_refusal():
    assert to_ppb(np.array([0.05]), "ppm")[0] == pytest.approx(50.0)
    assert to_ppb(np.array([50.0]), "ppb")[0] == pytest.approx(50.0)
    with pytest.raises(ValueError):
        to_ppb(np.zeros(1), "ppt")


def test_guess_units_on_real_qsm(shared_data):
    chi = np.asarray(nib.load(shared_data / "qsm_challenge_2016" / "chi_cosmos.nii.gz").dataobj)
    assert guess_units(chi) == "ppm"
    assert guess_units(chi * 1000) == "ppb"
    assert guess_units(np.zeros((3, 3, 3))) is None


def test_brain_mask_fills_holes_and_ignores_nan():
    data = np.zeros((20, 20, 6), np.float32)
    data[4:16, 4:16, 1:5] = 0.02
    data[9, 9, 2] = 0.0  # a zero-valued voxel inside the brain is still brain
    data[0, 0, 0] = np.nan
    mask = brain_mask(data)
    assert mask[9, 9, 2] and not mask[0, 0, 0] and mask.sum() == 12 * 12 * 4
