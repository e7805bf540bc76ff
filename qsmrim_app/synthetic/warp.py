"""A smooth random non-linear warp of the background head (displacement in mm of the background's world).

Why: mirroring, rotating and rescaling one real brain still shows a model the same anatomy; a smooth
displacement of a few millimetres at 20-40 mm wavelengths bends ventricles, sulci, veins and deep grey
matter the way two real brains differ after affine alignment. Only the background's sampling (its
susceptibility and brain mask) is warped: lesions, rims and the FLAIR stay where the truth puts them, so
the truth labels still match what is painted.

The displacement is a sum of `modes` plane waves per component, d_i(x) = A sum_m a_im sin(2 pi k_m . x + p_m)
with |k_m| = 1 / wavelength_m and sum_m |a_im| = 1, so |d_i| <= A everywhere and every derivative is
bounded by 2 pi A / min(wavelength): smooth by construction, evaluated analytically at any point.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WARP_MODES = 6


@dataclass(frozen=True)
class Warp:
    """Displacement field parameters (world mm): wave vectors (m, 3), phases (m,), weights (3, m)."""

    amplitude_mm: float
    wavevectors: np.ndarray
    phases: np.ndarray
    weights: np.ndarray

    @property
    def min_wavelength_mm(self) -> float:
        return float(1.0 / np.max(np.linalg.norm(self.wavevectors, axis=1)))

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """d(x) for world points of shape (3, ...): same shape, mm."""
        flat = points.reshape(3, -1)
        arg = 2.0 * np.pi * (self.wavevectors @ flat) + self.phases[:, None]  # (m, n)
        out = self.amplitude_mm * (self.weights @ np.sin(arg))
        return out.reshape(points.shape)

    def jacobian(self, points: np.ndarray) -> np.ndarray:
        """d d_i / d x_j at world points (3, n): shape (n, 3, 3)."""
        arg = 2.0 * np.pi * (self.wavevectors @ points) + self.phases[:, None]
        c = np.cos(arg)  # (m, n)
        return self.amplitude_mm * 2.0 * np.pi * np.einsum("im,mn,mj->nij", self.weights, c, self.wavevectors)


def draw_warp(rng: np.random.Generator, amplitude: tuple[float, float], wavelength: tuple[float, float],
              modes: int = WARP_MODES) -> Warp | None:
    """One session's warp: amplitude and each mode's wavelength uniform in their ranges (None if zero)."""
    amp = float(rng.uniform(*amplitude))
    lengths = rng.uniform(*wavelength, size=modes)
    directions = rng.normal(size=(modes, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=modes)
    weights = rng.normal(size=(3, modes))
    weights /= np.sum(np.abs(weights), axis=1, keepdims=True)
    if amp <= 0.0:
        return None
    return Warp(amp, directions / lengths[:, None], phases, weights)
