"""Imaging physics of the phantom: dipole field, TKD inversion, coil bias, Rician noise."""
from __future__ import annotations

import numpy as np
from scipy import fft

B0_WORLD = np.array([0.0, 0.0, 1.0])  # scanner z
TKD_THRESHOLD = 0.18


def b0_in_grid(affine: np.ndarray, b0_world: np.ndarray = B0_WORLD) -> np.ndarray:
    """B0 direction in the grid's voxel axes: an oblique slab sees B0 off its k axis."""
    directions = affine[:3, :3] / np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    v = directions.T @ b0_world
    return v / np.linalg.norm(v)


def dipole_kernel(shape: tuple[int, ...], voxel_sizes: np.ndarray, b0_dir: np.ndarray) -> np.ndarray:
    """Unit dipole response in k-space, D = 1/3 - (k.b)^2/|k|^2, D(0) = 1/3 (mean preserved)."""
    ks = np.meshgrid(*[fft.fftfreq(n, d=float(d)) for n, d in zip(shape, voxel_sizes)], indexing="ij")
    k2 = sum(k ** 2 for k in ks)
    kb = sum(k * b for k, b in zip(ks, b0_dir))
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 / 3.0 - kb ** 2 / k2
    d[(0,) * len(shape)] = 1.0 / 3.0
    return d


def _padded_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(fft.next_fast_len(int(n * 1.5)) for n in shape)


def simulate_qsm(chi: np.ndarray, mask: np.ndarray, affine: np.ndarray, noise_ppm: float,
                 rng: np.random.Generator, threshold: float = TKD_THRESHOLD) -> np.ndarray:
    """QSM (ppm) the way a scanner + reconstruction makes one: chi -> local field (+noise) -> TKD -> mask.

    Zero padding keeps the periodic FFT from wrapping fields round; the threshold trades streaking for
    underestimation near the magic-angle cone exactly as in real TKD maps.
    """
    shape = chi.shape
    pad = _padded_shape(shape)
    vox = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    d = dipole_kernel(pad, vox, b0_in_grid(affine))
    field = fft.ifftn(fft.fftn(chi * mask, s=pad, workers=1) * d, workers=1).real[tuple(slice(0, n) for n in shape)]
    field = (field + rng.normal(0.0, noise_ppm, size=shape)) * mask
    dinv = np.where(np.abs(d) > threshold, 1.0 / np.where(d == 0, 1.0, d), np.sign(d + 1e-12) / threshold)
    chi_hat = fft.ifftn(fft.fftn(field, s=pad, workers=1) * dinv, workers=1).real[tuple(slice(0, n) for n in shape)]
    return (chi_hat * mask).astype(np.float32)


def bias_field(world_points: np.ndarray, rng: np.random.Generator, amplitude: float = 0.12) -> np.ndarray:
    """Smooth multiplicative receive-coil bias: exp of a random quadratic in scanner coordinates."""
    x = world_points / np.float32(100.0)
    terms = [x[0], x[1], x[2], x[0] * x[1], x[0] * x[2], x[1] * x[2], x[0] ** 2, x[1] ** 2, x[2] ** 2]
    coeffs = rng.normal(0.0, amplitude, size=len(terms))
    return np.exp(sum(np.float32(c) * t for c, t in zip(coeffs, terms))).astype(np.float32)


def rician(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise on both channels: Rician, as in MR."""
    real = image + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    return np.sqrt(real ** 2 + imag ** 2).astype(np.float32)
