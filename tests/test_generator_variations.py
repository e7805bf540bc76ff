"""The semi-real generator's later variations (issue 18): background warp, TV inversion, FLAIR resolution.

Fast tests check each piece on its own (a warp's bound and smoothness, TV against TKD on a sphere and a
vein-like cylinder, the FLAIR grid); the slow one generates a `warped-tv` session twice through
`qsmrim-synth` (needs ../shared/data; skips without it).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from qsmrim_app.synthetic import main as synth_main
from qsmrim_app.synthetic.anatomy import rng_for
from qsmrim_app.synthetic.families import FAMILIES
from qsmrim_app.synthetic.semireal import (FLAIR_SHAPE, GRIDS, Inversion, _convolve_dipole, draw_geometry,
                                           draw_variations, flair_grid_shape)
from qsmrim_app.synthetic.semireal_head import Volume
from qsmrim_app.synthetic.tv import tv_invert
from qsmrim_app.synthetic.warp import draw_warp


def test_only_the_new_family_draws_the_new_variations() -> None:
    """Families made before these variations never touch the second stream: their sessions stay bit for bit."""
    for name in ("semireal", "cosmos-faint", "ich-a-strong", "ich-b-mixed", "cosmos-thick"):
        fam = FAMILIES[name]
        assert not fam.varies and fam.warp_mm == (0.0, 0.0) and "tv" not in fam.inversion
        assert fam.flair_voxels == ((1.0, 1.0, 1.0),)
    fam = FAMILIES["warped-tv"]
    assert fam.varies and fam.warp_mm[1] > 0 and "tv" in fam.inversion and len(fam.flair_voxels) == 3
    draws = [draw_variations(fam, rng_for(s, 3, 7)) for s in range(12)]
    again = draw_variations(fam, rng_for(0, 3, 7))  # deterministic per seed
    assert (again.tv_lambda, again.flair_voxel) == (draws[0].tv_lambda, draws[0].flair_voxel)
    pts = np.random.default_rng(1).uniform(-80, 80, size=(3, 500))
    np.testing.assert_array_equal(again.warp.displacement(pts), draws[0].warp.displacement(pts))
    assert not np.array_equal(draws[1].warp.displacement(pts), draws[0].warp.displacement(pts))
    assert {d.flair_voxel for d in draws} == set(fam.flair_voxels)
    assert all(fam.warp_mm[0] <= d.warp.amplitude_mm <= fam.warp_mm[1] for d in draws)
    assert all(fam.tv_lambda[0] <= d.tv_lambda <= fam.tv_lambda[1] for d in draws)


@pytest.mark.parametrize("name", ["tv-ich-a", "cosmos-tv-mixed", "ich-b-small", "cosmos-small"])
def test_later_families_draw_within_their_ranges(name: str) -> None:
    """The families on our own TV inversions and the small-rim families draw warps and FLAIR voxels
    deterministically, inside their ranges."""
    fam = FAMILIES[name]
    assert fam.varies and (fam.background.endswith("-tv") or fam.name.endswith("-small"))
    draws = [draw_variations(fam, rng_for(s, 2, 5)) for s in range(16)]
    again = draw_variations(fam, rng_for(0, 2, 5))
    pts = np.random.default_rng(2).uniform(-80, 80, size=(3, 200))
    np.testing.assert_array_equal(again.warp.displacement(pts), draws[0].warp.displacement(pts))
    assert again.flair_voxel == draws[0].flair_voxel
    assert {d.flair_voxel for d in draws} == set(fam.flair_voxels)
    assert all(fam.warp_mm[0] <= d.warp.amplitude_mm <= fam.warp_mm[1] for d in draws)


def test_warp_is_smooth_and_bounded_by_its_amplitude() -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(-100, 100, size=(3, 20000))
    assert draw_warp(rng_for(0, 1, 1), (0.0, 0.0), (20.0, 40.0)) is None
    for seed in range(8):
        warp = draw_warp(rng_for(seed, 1, 1), (4.0, 4.0), (20.0, 40.0))
        d = warp.displacement(pts)
        assert np.abs(d).max() <= 4.0 + 1e-9  # every component bounded by the amplitude
        assert np.abs(d).max() > 1.0  # and not trivial
        assert 20.0 <= warp.min_wavelength_mm <= 40.0
        # smooth: the analytic Jacobian matches finite differences and is bounded by 2 pi A / wavelength
        jac = warp.jacobian(pts[:, :200])
        h = 1e-3
        for j in range(3):
            step = np.zeros((3, 1))
            step[j] = h
            fd = (warp.displacement(pts[:, :200] + step) - warp.displacement(pts[:, :200] - step)) / (2 * h)
            np.testing.assert_allclose(jac[:, :, j], fd.T, atol=1e-5)
        bound = 2 * np.pi * 4.0 / warp.min_wavelength_mm
        assert np.abs(warp.jacobian(pts)).max() <= bound + 1e-9
        # the warped sampling is a fold-free deformation (positive Jacobian determinant) at these settings
        assert np.linalg.det(np.eye(3) + warp.jacobian(pts)).min() > 0.0


def _phantom(noise: float, seed: int = 0):
    shape, vox = (64, 64, 32), np.array([1.0, 1.0, 2.0])
    affine = np.diag([*vox, 1.0])
    grid = np.stack(np.meshgrid(*[(np.arange(n) - n / 2) * v for n, v in zip(shape, vox)], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    brain = np.sqrt((grid ** 2).sum(0)) < 30
    chi = np.zeros(shape, np.float32)
    chi[r < 8] = 0.1
    vein = (np.hypot(grid[0] - 14, grid[1] + 10) < 2) & brain
    chi[vein] = 0.3
    field = _convolve_dipole(chi, affine, inverse=False)
    field = (field + np.random.default_rng(seed).normal(0, noise, shape).astype(np.float32)) * brain
    return field, affine, r, brain, vein


def test_tv_recovers_a_sphere_with_less_streaking_than_tkd() -> None:
    """Sphere of 0.1 ppm and a 0.3 ppm cylinder, field noise 2 ppb: TV (lambda 3e-4, the middle of the
    family's range) is closer to 0.1 inside the sphere and quieter in the tissue around it than TKD."""
    field, affine, r, brain, vein = _phantom(0.002)
    inner, around = r < 6, (r > 10) & (r < 20) & brain & ~vein
    tkd = _convolve_dipole(field, affine, inverse=True, inversion=Inversion("tkd", 0.18)) * brain
    tv = _convolve_dipole(field, affine, inverse=True, inversion=Inversion("tv", 0.18, 3e-4)) * brain
    np.testing.assert_array_equal(tv, tv_invert(field, affine, 3e-4) * brain)  # the "tv" inversion is tv_invert

    def rmse(x, mask, value):
        return float(np.sqrt(np.mean((x[mask] - value) ** 2)))

    assert rmse(tv, inner, 0.1) < 0.6 * rmse(tkd, inner, 0.1)
    assert rmse(tv, around, 0.0) < 0.6 * rmse(tkd, around, 0.0)
    assert abs(tv[inner].mean() - 0.1) < abs(tkd[inner].mean() - 0.1)
    # deterministic and bounded to the field's support
    np.testing.assert_array_equal(tv_invert(field, affine, 3e-4), tv_invert(field, affine, 3e-4))
    assert tv_invert(np.zeros_like(field), affine, 3e-4).max() == 0.0


def test_flair_grid_covers_the_same_field_of_view_at_any_voxel() -> None:
    brain = np.zeros((40, 40, 40), np.float32)
    brain[10:30, 10:30, 10:30] = 1
    head = SimpleNamespace(brain=Volume(brain, np.diag([2.0, 2.0, 2.0, 1.0])))
    spec = GRIDS["1x1x3"]
    for voxel in FAMILIES["warped-tv"].flair_voxels:
        geom = draw_geometry(head, spec, rng_for(0, 3, 1), None, None, voxel)
        assert geom.flair_shape == flair_grid_shape(voxel)
        np.testing.assert_allclose(np.sqrt(np.sum(geom.flair_affine[:3, :3] ** 2, axis=0)), voxel)
        fov = np.array(geom.flair_shape) * np.array(voxel)
        assert np.all(np.abs(fov - np.array(FLAIR_SHAPE)) <= np.array(voxel) / 2 + 1e-9)
    assert flair_grid_shape((1.0, 1.0, 3.0)) == (208, 192, 53)
    # the default is the 1 mm FLAIR exactly as before: same draws, same affine
    a = draw_geometry(head, spec, rng_for(0, 3, 1))
    b = draw_geometry(head, spec, rng_for(0, 3, 1), None, None, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(a.flair_affine, b.flair_affine)
    assert a.flair_shape == FLAIR_SHAPE


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.nii.gz")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(np.asarray(nib.load(path).dataobj).tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_warped_tv_session_is_deterministic_and_its_flair_matches_its_labels(shared_data: Path,
                                                                            tmp_path: Path) -> None:
    """patient03 on 1x1x3 mm, seed 1 of `warped-tv` draws a TV inversion and a 1x1x3 mm FLAIR: two runs
    give the same arrays; the FLAIR and its lesion labels share the declared grid and the labels sit on
    hyperintense voxels."""
    common = ["--family", "warped-tv", "--patients", "3", "--grids", "1x1x3", "--data-dir", str(shared_data),
              "--head-cache", str(tmp_path / "head"), "--seed", "1"]
    for name in ("a", "b"):
        assert synth_main([str(tmp_path / name), *common]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    sessions = pd.read_csv(tmp_path / "a_truth" / "sessions.tsv", sep="\t")
    row = sessions.iloc[0]
    assert row["family"] == "warped-tv" and row["inversion"] == "tv" and row["warp_mm"] > 0
    voxel = tuple(float(v) for v in str(row["flair_voxel_mm"]).split("x"))
    anat = tmp_path / "a" / "sub-03" / "ses-1x1x3" / "anat"
    flair = nib.load(anat / "sub-03_ses-1x1x3_FLAIR.nii.gz")
    labels = nib.load(tmp_path / "a" / "derivatives" / "lesions" / "sub-03" / "ses-1x1x3" / "anat"
                      / "sub-03_ses-1x1x3_desc-lesion_dseg.nii.gz")
    assert flair.shape == labels.shape == flair_grid_shape(voxel)
    np.testing.assert_allclose(flair.header.get_zooms(), voxel, atol=1e-4)
    np.testing.assert_allclose(flair.affine, labels.affine)
    img, lab = np.asarray(flair.dataobj, np.float32), np.asarray(labels.dataobj)
    assert lab.max() >= 3
    brain = img > 0
    assert np.median(img[lab > 0]) > 1.15 * np.median(img[brain & (lab == 0)])
    qsm = nib.load(anat / "sub-03_ses-1x1x3_Chimap.nii.gz")
    assert qsm.shape == GRIDS["1x1x3"].shape and np.isfinite(qsm.get_fdata()).all()
    # the own-inversion background shares the COSMOS registration (read from the cache, not redone)
    from qsmrim_app.synthetic.semireal_head import load_head

    cosmos = load_head(shared_data, tmp_path / "head", "cosmos")
    own = load_head(shared_data, tmp_path / "head", "cosmos-tv")
    np.testing.assert_array_equal(own.cosmos_to_mni, cosmos.cosmos_to_mni)
    assert own.registration["own_inversion"]["fit_correlation"] > 0.7
    assert not np.array_equal(own.chi_ppm.data, cosmos.chi_ppm.data)


def test_a_field_unit_is_fitted_from_the_forward_field_of_a_known_map() -> None:
    """A field stored as 1/0.8 of its ppm value (plus noise) is recognised as 0.8 ppm per stored unit."""
    from qsmrim_app.synthetic.own_inversion import fit_field_unit

    field, affine, r, brain, vein = _phantom(0.0005)
    chi = np.zeros(field.shape, np.float32)
    chi[r < 8] = 0.1
    chi[vein] = 0.3
    ppm_per_unit, corr = fit_field_unit(field / 0.8, chi, brain, affine)
    assert abs(ppm_per_unit - 0.8) < 0.02 and corr > 0.9
    _, corr_wrong = fit_field_unit(np.roll(field, 9, axis=0), chi, brain, affine)  # another person's field
    assert corr_wrong < corr - 0.3


@pytest.mark.slow
def test_own_tv_inversion_of_the_real_cosmos_field_resembles_cosmos(shared_data: Path, tmp_path: Path) -> None:
    """COSMOS `phs_tissue` is ppm (fitted scale near 1); its TV inversion correlates with COSMOS itself and is
    read back from the cache unchanged."""
    from qsmrim_app.synthetic.own_inversion import own_inversion

    chi, mask, affine, info = own_inversion(shared_data, "cosmos-tv", tmp_path)
    assert 0.8 < info["ppm_per_field_unit"] < 1.1 and info["fit_correlation"] > 0.7
    cosmos = np.asarray(nib.load(shared_data / "qsm_challenge_2016" / "chi_cosmos.nii.gz").dataobj, np.float32)
    inside = mask > 0
    assert np.corrcoef(chi[inside], cosmos[inside])[0, 1] > 0.6
    assert not chi[~inside].any()
    again = own_inversion(shared_data, "cosmos-tv", tmp_path)[0]
    np.testing.assert_array_equal(again, chi)
