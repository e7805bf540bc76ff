"""Small geometry helpers for the blind family: rotations, affines, point sampling.

Everything is in millimetres; a "pose" is a 4x4 rigid or affine matrix acting on homogeneous
column vectors. Kept apart so every other module shares one convention.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def rotation(angles_deg: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    """3x3 rotation: about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def homogeneous(linear: np.ndarray, translation: np.ndarray | None = None) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = linear
    if translation is not None:
        out[:3, 3] = translation
    return out


def rigid(angles_deg, translation_mm) -> np.ndarray:
    return homogeneous(rotation(angles_deg), np.asarray(translation_mm, dtype=float))


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 matrix to points of shape (N, 3)."""
    points = np.asarray(points, dtype=float)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def sample(volume: np.ndarray, index_points: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Values of ``volume`` at continuous voxel indices (N, 3), zero (``cval``) outside."""
    if index_points.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    return ndimage.map_coordinates(volume, index_points.T, order=order, mode="constant", cval=cval,
                                   prefilter=False).astype(np.float32, copy=False)


def grid_points(shape: tuple[int, ...]) -> np.ndarray:
    """All voxel indices of a grid as (N, 3) float array, C order."""
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    return idx


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float | tuple) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field (Gaussian-filtered white noise)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    std = float(field.std())
    return field / std if std > 0 else field


def polynomial_field(rng: np.random.Generator, shape: tuple[int, ...], degree: int, amplitude: float) -> np.ndarray:
    """A smooth low-order polynomial over the grid (coordinates scaled to -1..1), max |value| = amplitude."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    field = np.zeros(shape, dtype=np.float32)
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            for k in range(degree + 1 - i - j):
                if i + j + k == 0:
                    continue
                field = field + np.float32(rng.standard_normal()) * (x ** i) * (y ** j) * (z ** k)
    peak = float(np.abs(field).max())
    return field * np.float32(amplitude / peak) if peak > 0 else field
