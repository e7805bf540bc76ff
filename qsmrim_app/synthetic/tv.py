"""Total-variation regularised dipole inversion (ADMM, data term solved in Fourier space).

Why: real QSM maps are made by more than closed-form inversions; iterative l1/TV solutions (MEDI, FANSI,
"fast TV-QSM" of Bilgic et al. 2014) flatten texture, sharpen edges and trade streaks for staircase,
which changes how a faint rim looks. A generator family that reconstructs with TV shows the model such
maps. Written for this project from the ADMM textbook splitting (Boyd et al. 2011):

    min_x 1/2 || D x - f ||^2 + lam || G x ||_1        with z = G x (anisotropic TV, mm units)

    x <- F^-1 [ (D F f + rho E^H F(z - u)) / (D^2 + rho |E|^2) ]    (exact, diagonal in Fourier space)
    z <- shrink(G x + u, lam / rho);   u <- u + G x - z

G is the forward difference divided by the voxel size (periodic on the zero-padded box, so its Fourier
eigenvalues E make the x-step exact). The box is the field's non-zero support plus `pad_mm` on each side,
so memory and time scale with the brain, not the acquisition grid. A fixed number of iterations keeps
the cost and the result deterministic.
"""
from __future__ import annotations

import numpy as np
from scipy import fft

from .physics import b0_in_grid, dipole_kernel

TV_ITERATIONS = 20
TV_RHO_FACTOR = 20.0  # rho = factor x lambda: fast enough to converge in TV_ITERATIONS on these fields


def _support_box(data: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    nz = np.argwhere(data != 0)
    if nz.size == 0:
        return tuple(slice(0, n) for n in data.shape)
    lo = np.maximum(nz.min(axis=0) - margin, 0)
    hi = np.minimum(nz.max(axis=0) + 1 + margin, data.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _grad(x: np.ndarray, vox: np.ndarray) -> list[np.ndarray]:
    """Periodic forward differences (per mm) along each axis."""
    return [((np.roll(x, -1, axis=a) - x) / np.float32(vox[a])).astype(np.float32) for a in range(3)]


def _grad_adjoint(z: list[np.ndarray], vox: np.ndarray) -> np.ndarray:
    """G^T z (minus the backward-difference divergence)."""
    out = np.zeros_like(z[0])
    for a in range(3):
        out += (np.roll(z[a], 1, axis=a) - z[a]) / np.float32(vox[a])
    return out


def _shrink(v: np.ndarray, t: float) -> np.ndarray:
    return (np.sign(v) * np.maximum(np.abs(v) - np.float32(t), 0.0)).astype(np.float32)


def tv_invert(field: np.ndarray, affine: np.ndarray, lam: float, iterations: int = TV_ITERATIONS,
              pad_mm: float = 30.0, rho: float | None = None) -> np.ndarray:
    """Susceptibility (same units as `field`) from a local field on a grid with `affine` (B0 = scanner z).

    `lam` weighs the TV term against the data term (field in ppm: 1e-4 to 1e-3 is the usual range).
    """
    vox = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    box = _support_box(field)
    f = np.asarray(field[box], np.float32)
    pad = tuple(fft.next_fast_len(int(n + 2 * pad_mm / v)) for n, v in zip(f.shape, vox))
    d = dipole_kernel(pad, vox, b0_in_grid(affine)).astype(np.float32)
    half = pad[2] // 2 + 1
    d = d[..., :half]
    freqs = [2.0 * np.pi * np.arange(n) / n for n in pad]
    e2 = np.zeros((pad[0], pad[1], half), np.float32)
    for a, (w, v) in enumerate(zip(freqs, vox)):
        shape = [1, 1, 1]
        shape[a] = -1
        w = w[:half] if a == 2 else w
        e2 += ((2.0 - 2.0 * np.cos(w)) / v ** 2).astype(np.float32).reshape(shape)
    rho = float(rho if rho is not None else TV_RHO_FACTOR * lam)
    denom = (d * d + np.float32(rho) * e2).astype(np.float32)
    denom[0, 0, 0] = max(float(denom[0, 0, 0]), 1e-6)
    padded = np.zeros(pad, np.float32)
    padded[tuple(slice(0, n) for n in f.shape)] = f
    data_term = (fft.rfftn(padded, workers=1) * d).astype(np.complex64)
    del padded
    x = fft.irfftn(data_term / denom, s=pad, workers=1).astype(np.float32)  # a Tikhonov-like start
    z = _grad(x, vox)
    u = [np.zeros(pad, np.float32) for _ in range(3)]
    for _ in range(iterations):
        w = [zi - ui for zi, ui in zip(z, u)]
        rhs = data_term + np.float32(rho) * fft.rfftn(_grad_adjoint(w, vox), workers=1)
        del w
        x = fft.irfftn(rhs / denom, s=pad, workers=1).astype(np.float32)
        g = _grad(x, vox)
        for a in range(3):
            v = g[a] + u[a]
            z[a] = _shrink(v, lam / rho)
            u[a] = (v - z[a]).astype(np.float32)
        del g
    out = np.zeros(field.shape, np.float32)
    out[box] = x[tuple(slice(0, n) for n in f.shape)]
    return out
