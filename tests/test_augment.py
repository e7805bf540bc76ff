"""Augmentation: determinism, shapes, flip/rotation geometry, blur width, lesion stays centred."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qsmrim_app.model.augment import affine_resample, augment_batch, gaussian_blur, random_flip, rotation_matrices

PATCH = (32, 32, 16)


def centred_blob(b: int = 4, shape: tuple[int, ...] = PATCH) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(s) - (s - 1) / 2 for s in shape], indexing="ij"))
    radii = torch.tensor([8.0, 6.0, 3.0]).view(3, 1, 1, 1)
    blob = ((grid / radii) ** 2).sum(0) <= 1
    x = torch.zeros(b, 2, *shape)
    x[:, 0] = blob * 100.0
    x[:, 1] = blob * 2.0
    return x


def centroid(vol: torch.Tensor) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in vol.shape], indexing="ij"))
    w = vol.double().clamp_min(0)
    return (grid * w).sum((1, 2, 3)) / w.sum()


def test_deterministic_given_generator_and_shape_preserved() -> None:
    x = centred_blob() + torch.randn(4, 2, *PATCH, generator=torch.Generator().manual_seed(9))
    a = augment_batch(x, (0.7, 0.7, 2.0), torch.Generator().manual_seed(1), p=1.0)
    b = augment_batch(x, (0.7, 0.7, 2.0), torch.Generator().manual_seed(1), p=1.0)
    c = augment_batch(x, (0.7, 0.7, 2.0), torch.Generator().manual_seed(2), p=1.0)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_probability_zero_is_identity() -> None:
    x = torch.randn(3, 2, *PATCH)
    assert torch.equal(augment_batch(x, generator=torch.Generator().manual_seed(0), p=0.0), x)
    assert augment_batch(x[:0]).shape == (0, 2, *PATCH)
    with pytest.raises(ValueError):
        augment_batch(x[0])


def test_flip_along_chosen_axis() -> None:
    x = torch.randn(4, 2, 6, 5, 4)
    out = random_flip(x, torch.tensor([True, True, True, False]), torch.tensor([0, 1, 2, 1]))
    for b, dim in enumerate((2, 3, 4)):
        assert torch.equal(out[b], x[b:b + 1].flip(dim)[0])
    assert torch.equal(out[3], x[3])


def test_rotation_axis_order_matches_array_axes() -> None:
    """A 90 degree map about Z in mm must be a 90 degree turn of the (X, Y) array axes."""
    n = 8
    x = torch.randn(1, 1, n, n, n, dtype=torch.float64).float()
    m = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    out = affine_resample(x, m, (1.0, 1.0, 1.0))
    # out at offset (u, v, w) = x at offset (-v, u, w)
    idx = np.arange(n)
    expected = x[0, 0].numpy()[(n - 1 - idx)[None, :, None], idx[:, None, None], idx[None, None, :]]
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-5)
    eye = torch.eye(3, dtype=torch.float64)[None]
    torch.testing.assert_close(affine_resample(x, eye, (0.5, 0.5, 2.0)), x)
    r = rotation_matrices(torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64))
    torch.testing.assert_close(r[0] @ r[0].T, torch.eye(3, dtype=torch.float64))


def test_affine_is_physical_on_anisotropic_grid() -> None:
    """A rotation about X in mm on a 1x1x2 mm grid keeps a physically spherical blob's volume and centre."""
    shape, vox = (24, 24, 12), (1.0, 1.0, 2.0)
    grid = torch.stack(torch.meshgrid(*[(torch.arange(s) - (s - 1) / 2) * v for s, v in zip(shape, vox)],
                                      indexing="ij"))
    ball = ((grid ** 2).sum(0) <= 7.0 ** 2).float()[None, None]
    ang = torch.tensor([[math.radians(30), 0.0, 0.0]], dtype=torch.float64)
    out = affine_resample(ball, rotation_matrices(ang), vox)
    assert abs(float(out.sum()) / float(ball.sum()) - 1) < 0.03  # a sphere maps onto itself
    assert float((out[0, 0] - ball[0, 0]).abs().mean()) < 0.02
    # the same rotation done in voxel units would squash the sphere
    bad = affine_resample(ball, rotation_matrices(ang), (1.0, 1.0, 1.0))
    assert float((bad[0, 0] - ball[0, 0]).abs().mean()) > 2 * float((out[0, 0] - ball[0, 0]).abs().mean())


def test_lesion_stays_centred() -> None:
    x = centred_blob(8)
    out = augment_batch(x, (0.7, 0.7, 2.0), torch.Generator().manual_seed(3), p=1.0)
    centre = torch.tensor([(s - 1) / 2 for s in PATCH], dtype=torch.float64)
    for b in range(8):
        assert torch.allclose(centroid(out[b, 0]), centre, atol=0.3)


def test_blur_width_follows_sigma() -> None:
    delta = torch.zeros(2, 1, 21, 21, 21)
    delta[:, :, 10, 10, 10] = 1.0
    sig = torch.tensor([[0.5, 0.9, 0.2], [1.5, 0.3, 0.9]], dtype=torch.float64)
    out = gaussian_blur(delta, sig)
    torch.testing.assert_close(out.sum((1, 2, 3, 4)), torch.ones(2))
    d = (torch.arange(21) - 10).double()
    for b in range(2):
        v = out[b, 0].double()
        var = [(d ** 2 * v.sum(dims)).sum() for dims in ((1, 2), (0, 2), (0, 1))]
        for axis in range(3):
            s = float(sig[b, axis])
            # a sampled Gaussian's variance approaches sigma^2 from below as sigma grows
            if s >= 0.9:
                assert abs(float(var[axis]) - s ** 2) < 0.05 * s ** 2
            elif s >= 0.5:
                assert 0.8 * s ** 2 < float(var[axis]) <= s ** 2
            else:
                assert float(var[axis]) < 0.01


def test_blur_sigma_in_mm_is_converted_with_voxel_size() -> None:
    x = torch.zeros(64, 1, 16, 16, 16)
    x[:, :, 8, 8, 8] = 1.0
    a = augment_batch(x, (1.0, 1.0, 4.0), torch.Generator().manual_seed(0), sigma_units="voxel", p=1.0)
    b = augment_batch(x, (1.0, 1.0, 4.0), torch.Generator().manual_seed(0), sigma_units="mm", p=1.0)
    # Through-plane: the same sigma in mm on 4 mm slices is a quarter of the sigma in voxels -> less spread.
    za = (a.sum((1, 2, 3)) * (torch.arange(16) - 8.0) ** 2).sum(1) / a.sum((1, 2, 3, 4))
    zb = (b.sum((1, 2, 3)) * (torch.arange(16) - 8.0) ** 2).sum(1) / b.sum((1, 2, 3, 4))
    assert float(zb.mean()) < float(za.mean())


@pytest.mark.shared_data
def test_real_lesion_patches_stay_in_range_and_centred(shared_data) -> None:
    """Real lesion shapes (Lesjak et al. 2017) with real QSM texture (2016 QSM challenge, ppm -> ppb).

    Trilinear resampling with zero fill and normalised positive blur kernels only form convex
    combinations of input values and zero, so augmented values never leave [min(x, 0), max(x, 0)].
    """
    import nibabel as nib

    from qsmrim_app.lesions import label_instances
    from qsmrim_app.patches import extract_patches

    folder = shared_data / "open_ms_data" / "patient07"
    mask = np.asarray(nib.load(next(folder.glob("GOLD_STANDARD*.nii.gz"))).dataobj) > 0.5
    chi = np.asarray(nib.load(shared_data / "qsm_challenge_2016" / "chi_cosmos.nii.gz").dataobj, np.float32)
    qsm = np.zeros(mask.shape, np.float32)
    qsm[11:171, 29:189, 11:171] = chi * 1000.0
    inst = label_instances(mask, min_voxels=20)
    from qsmrim_app.model.inputs import InputSpec

    ps = extract_patches(qsm, mask.astype(np.float32), inst.labels, inst.lesion_ids, np.eye(4))
    # The paper's view: this lesion only, so the FLAIR channel (the mask here) is the lesion itself.
    x = torch.from_numpy(InputSpec("paper").network_inputs(ps.patches, np.tile([[0.0, 1.0]], (len(ps.lesion_ids), 1))))
    assert x.shape[0] >= 10
    spacing = ps.grid.spacing_mm
    out = augment_batch(x, spacing, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(out, augment_batch(x, spacing, torch.Generator().manual_seed(0), p=1.0))
    lo = torch.minimum(x.amin((1, 2, 3, 4)), torch.zeros(1))
    hi = torch.maximum(x.amax((1, 2, 3, 4)), torch.zeros(1))
    assert bool((out.amin((1, 2, 3, 4)) >= lo - 1e-3).all() and (out.amax((1, 2, 3, 4)) <= hi + 1e-3).all())
    # The lesion (FLAIR channel = mask here) keeps its centroid within a voxel: flips mirror about the
    # patch centre, so compare against the flipped-or-not input by distance to the centre.
    centre = torch.tensor([(s - 1) / 2 for s in PATCH], dtype=torch.float64)
    for b in range(x.shape[0]):
        before = float((centroid(x[b, 1]) - centre).norm())
        after = float((centroid(out[b, 1]) - centre).norm())
        assert abs(after - before) < 1.0
    # Total lesion volume is kept up to the +-5 % scale (cubed) and interpolation.
    ratio = out[:, 1].sum((1, 2, 3)) / x[:, 1].sum((1, 2, 3))
    assert bool(((ratio > 0.8) & (ratio < 1.2)).all())
