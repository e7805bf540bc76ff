"""Training-time augmentation of a whole patch batch on its own device (no per-sample Python loop).

Transforms, each applied per sample with probability ``p`` (paper: flips, small affine, anisotropic blur):

* flip along one randomly chosen spatial axis;
* affine about the patch centre (no translation, so the lesion stays centred): isotropic scale in
  [0.95, 1.05] and rotations of +-5 degrees about each axis, done in millimetres (the patch grid is
  usually anisotropic, e.g. 16 thick slices) with ``affine_grid``/``grid_sample`` (trilinear, zeros
  outside, which matches the masked patches);
* Gaussian blur, sigma ~ U(0.1, 0.95) in-plane (X, Y) and U(0.03, 0.3) through-plane (Z). As in the paper
  the sigmas are in voxels by default; with ``sigma_units="mm"`` they are millimetres converted with
  ``voxel_size_mm``. Separable 1D convolutions with per-sample kernels (grouped conv).

All random numbers come from one CPU ``torch.Generator`` (tiny per-sample parameter tensors, then moved
to the batch's device), so results are reproducible given the generator on any device.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

SCALE_RANGE = (0.95, 1.05)
MAX_ROTATION_DEG = 5.0
SIGMA_IN_PLANE = (0.1, 0.95)
SIGMA_THROUGH_PLANE = (0.03, 0.3)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand((n, *shape), generator=generator, dtype=torch.float64)


def random_flip(x: torch.Tensor, apply: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Flip sample ``b`` along spatial axis ``axis[b]`` (0..2) where ``apply[b]``."""
    apply, axis = apply.to(x.device), axis.to(x.device)
    for a in range(3):
        sel = (apply & (axis == a)).view(-1, 1, 1, 1, 1)
        if bool(sel.any()):
            x = torch.where(sel, x.flip(2 + a), x)
    return x


def rotation_matrices(angles_rad: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles about X, Y, Z -> (B, 3, 3) rotation matrices Rz @ Ry @ Rx."""
    c, s = torch.cos(angles_rad), torch.sin(angles_rad)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def affine_resample(x: torch.Tensor, matrices: torch.Tensor, voxel_size_mm: Sequence[float]) -> torch.Tensor:
    """Resample each sample with a centred linear map given in millimetres (output -> input).

    ``matrices`` (B, 3, 3) act on (X, Y, Z) mm offsets from the patch centre; they are converted to
    ``affine_grid``'s normalised coordinates, which run in reversed axis order (Z, Y, X).
    """
    b = x.shape[0]
    half_mm = torch.tensor([n * v / 2.0 for n, v in zip(x.shape[2:], voxel_size_mm)], dtype=torch.float64)
    m = torch.diag(1.0 / half_mm) @ matrices @ torch.diag(half_mm)  # normalised (X, Y, Z) coords
    m = m.flip(1).flip(2)  # -> (Z, Y, X) order expected by affine_grid for (D, H, W) = (X, Y, Z)
    theta = torch.cat([m, torch.zeros(b, 3, 1, dtype=m.dtype)], dim=2).to(device=x.device, dtype=torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(x.dtype)


def gaussian_kernels(sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    """(B,) sigmas (voxels) -> (B, 2*radius+1) normalised 1D Gaussian kernels."""
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (d[None, :] / sigmas[:, None].clamp_min(1e-6)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigmas_vox: torch.Tensor) -> torch.Tensor:
    """Blur sample ``b`` with per-axis sigmas ``sigmas_vox[b]`` (voxels) by separable grouped convolutions."""
    b, c = x.shape[:2]
    out = x.float().reshape(1, b * c, *x.shape[2:])
    for axis in range(3):
        radius = max(1, int(math.ceil(3.0 * float(sigmas_vox[:, axis].max()))))
        radius = min(radius, x.shape[2 + axis] - 1)
        kern = gaussian_kernels(sigmas_vox[:, axis], radius).repeat_interleave(c, dim=0)  # (B*C, K)
        shape = [b * c, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        kern = kern.view(shape).to(device=x.device, dtype=torch.float32)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kern, groups=b * c)
    return out.reshape(x.shape).to(x.dtype)


def augment_batch(x: torch.Tensor, voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                  generator: torch.Generator | None = None, p: float = 0.5,
                  sigma_units: str = "voxel") -> torch.Tensor:
    """Randomly flipped, rotated/scaled and blurred copy of a (B, C, X, Y, Z) batch."""
    if x.ndim != 5:
        raise ValueError(f"expected a (B, C, X, Y, Z) batch, got {tuple(x.shape)}")
    if sigma_units not in ("voxel", "mm"):
        raise ValueError("sigma_units must be 'voxel' or 'mm'")
    b = x.shape[0]
    if b == 0:
        return x
    # Draw every parameter up front, in a fixed order, so the stream does not depend on the data.
    flip = torch.rand(b, generator=generator) < p
    axis = torch.randint(0, 3, (b,), generator=generator)
    do_affine = torch.rand(b, generator=generator) < p
    scale = _uniform(b, *SCALE_RANGE, generator)
    angles = _uniform(b, -MAX_ROTATION_DEG, MAX_ROTATION_DEG, generator, 3) * (math.pi / 180.0)
    do_blur = torch.rand(b, generator=generator) < p
    sig_xy = _uniform(b, *SIGMA_IN_PLANE, generator, 2)
    sig_z = _uniform(b, *SIGMA_THROUGH_PLANE, generator, 1)

    x = random_flip(x, flip, axis)
    if bool(do_affine.any()):
        idx = torch.nonzero(do_affine).reshape(-1)
        # Output->input map: inverse of "scale then rotate" is R^T / s.
        mats = rotation_matrices(angles[idx]).transpose(1, 2) / scale[idx].view(-1, 1, 1)
        x = x.clone()
        x[idx.to(x.device)] = affine_resample(x[idx.to(x.device)], mats, voxel_size_mm)
    if bool(do_blur.any()):
        idx = torch.nonzero(do_blur).reshape(-1)
        sig = torch.cat([sig_xy[idx], sig_z[idx]], dim=1)
        if sigma_units == "mm":
            sig = sig / torch.tensor([float(v) for v in voxel_size_mm], dtype=sig.dtype)
        x = x.clone()
        x[idx.to(x.device)] = gaussian_blur(x[idx.to(x.device)], sig)
    return x


CONTRAST_SCALE_RANGE = (0.75, 1.33)  # reconstructions differ in scale by tens of percent (TKD vs MEDI)
MAX_NOISE_SD = 0.3  # in reference SDs: noisier and smoother maps than the training cohort's


def contrast_jitter(x: torch.Tensor, generator: torch.Generator | None = None, channel: int = 0) -> torch.Tensor:
    """Scale the (referenced) QSM channel by a random factor and add noise where it is not masked out."""
    b = x.shape[0]
    if b == 0:
        return x
    scale = _uniform(b, *CONTRAST_SCALE_RANGE, generator).to(x.device, x.dtype)
    sd = _uniform(b, 0.0, MAX_NOISE_SD, generator).to(x.device, x.dtype)
    noise = torch.randn(x[:, channel].shape, generator=generator).to(x.device, x.dtype)
    x = x.clone()
    q = x[:, channel]
    x[:, channel] = torch.where(q != 0, q * scale.view(-1, 1, 1, 1) + noise * sd.view(-1, 1, 1, 1), q)
    return x
