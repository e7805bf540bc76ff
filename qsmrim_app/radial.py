"""Radial-profile features: the quantities a rater reads off a rim, measured in mm around the boundary.

A paramagnetic rim is a band of raised susceptibility at (or just outside) the lesion edge around most
of its circumference; a vein is a short bright tube touching one side; a paramagnetic core is bright
inside. These features describe exactly that, on the physical-space patch (fixed mm grid, so the same
lesion gives the same numbers on any QSM grid) and relative to the lesion's local reference tissue
(:mod:`qsmrim_app.reference`), so offsets and scales of the reconstruction cancel:

- mean and 90th percentile of the referenced QSM in 1 mm shells from 4 mm inside to 4 mm outside;
- the core, the rim peak (best shell between 1 mm inside and 2 mm outside), rim minus core and rim
  minus the tissue 3-4 mm out;
- the angular fraction of the edge that is paramagnetic: on each axial slice of the patch, the edge
  band (1 mm inside to 2 mm outside) is cut into 12 sectors around the lesion's centre, and a sector
  is paramagnetic when its 75th percentile exceeds the reference by k robust SDs (k = 1, 2). The
  consensus rim+ criterion (a rim around >= 2/3 of the edge on >= 2 slices) reads off the per-slice
  fractions: their maximum, mean, and the through-plane extent (mm) of slices at >= 2/3; plus the
  same fraction over 3D direction sectors of the whole edge.

The training-free floor of the issue tracker, the mean QSM of the lesion's 1-voxel inner shell minus
its core, is computed on the QSM grid in ppb (:func:`shell_minus_core_ppb`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

SHELL_EDGES_MM = (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0)
RIM_BAND_MM = (-1.0, 2.0)
CORE_MM = -2.0
SECTORS = 12
ELEVATION_BANDS = 6
SIGMA_LEVELS = (1, 2)
CONSENSUS_FRACTION = 2.0 / 3.0
from .model.inputs import FLOOR_COLUMN  # noqa: E402  (one definition)


def _shell_name(lo: float, hi: float) -> str:
    if hi <= 0:
        return f"in{int(-hi)}to{int(-lo)}mm"
    return f"out{int(lo)}to{int(hi)}mm"


def feature_names() -> list[str]:
    names = []
    for lo, hi in zip(SHELL_EDGES_MM[:-1], SHELL_EDGES_MM[1:]):
        names += [f"radial_{_shell_name(lo, hi)}_mean", f"radial_{_shell_name(lo, hi)}_p90"]
    names += ["radial_core_mean", "radial_lesion_mean", "radial_rim_peak", "radial_rim_minus_core",
              "radial_rim_minus_outside"]
    for k in SIGMA_LEVELS:
        names += [f"radial_arc_fraction_max_k{k}", f"radial_arc_fraction_mean_k{k}",
                  f"radial_arc_extent_mm_k{k}", f"radial_sphere_fraction_k{k}"]
    return names


def feature_descriptions() -> dict[str, str]:
    """Column descriptions for the derivatives' data dictionary."""
    out = {}
    for lo, hi in zip(SHELL_EDGES_MM[:-1], SHELL_EDGES_MM[1:]):
        where = f"{-hi:g}-{-lo:g} mm inside" if hi <= 0 else f"{lo:g}-{hi:g} mm outside"
        out[f"radial_{_shell_name(lo, hi)}_mean"] = f"Mean referenced QSM {where} the lesion boundary"
        out[f"radial_{_shell_name(lo, hi)}_p90"] = f"90th percentile of the referenced QSM {where} the lesion boundary"
    out["radial_core_mean"] = f"Mean referenced QSM deeper than {-CORE_MM:g} mm inside (the whole lesion if none)"
    out["radial_lesion_mean"] = "Mean referenced QSM inside the lesion"
    out["radial_rim_peak"] = "Highest 1 mm shell mean between 1 mm inside and 2 mm outside the boundary"
    out["radial_rim_minus_core"] = "radial_rim_peak minus radial_core_mean"
    out["radial_rim_minus_outside"] = "radial_rim_peak minus the mean 3-4 mm outside"
    for k in SIGMA_LEVELS:
        out[f"radial_arc_fraction_max_k{k}"] = (f"Largest per-slice fraction of edge sectors whose 75th percentile "
                                               f"exceeds the reference by {k} robust SD")
        out[f"radial_arc_fraction_mean_k{k}"] = f"Mean over slices of that fraction (k={k})"
        out[f"radial_arc_extent_mm_k{k}"] = (f"Through-plane extent (mm) of the slices where that fraction (k={k}) "
                                             "is at least 2/3")
        out[f"radial_sphere_fraction_k{k}"] = f"Fraction of 3D edge direction sectors paramagnetic at k={k}"
    return {name: desc + " (units: robust SDs of the local reference tissue)"
            if not name.startswith("radial_arc") and not name.startswith("radial_sphere") else desc
            for name, desc in out.items()}


def _sector_fractions(z: np.ndarray, band: np.ndarray, sector: np.ndarray, n_sectors: int) -> list[float]:
    """Fraction of occupied sectors whose 75th percentile exceeds each level in ``SIGMA_LEVELS``."""
    values, sectors = z[band], sector[band]
    if values.size == 0:
        return [np.nan] * len(SIGMA_LEVELS)
    p75 = np.full(n_sectors, np.nan)
    for s in np.unique(sectors):
        p75[s] = np.percentile(values[sectors == s], 75)
    occupied = np.isfinite(p75)
    return [float(np.mean(p75[occupied] > k)) for k in SIGMA_LEVELS]


def radial_features(patch: np.ndarray, reference: Sequence[float], spacing_mm: Sequence[float]) -> np.ndarray:
    """The :func:`feature_names` values of one raw patch (channels of ``patches.RAW_CHANNELS``)."""
    median, scale = float(reference[0]), float(reference[1])
    z = (patch[0].astype(np.float64) - median) / scale
    sd = patch[2].astype(np.float64)
    usable = patch[3] < 0.5  # other lesions are neither rim nor reference
    inside = sd < 0
    out: list[float] = []
    shell_means = {}
    for lo, hi in zip(SHELL_EDGES_MM[:-1], SHELL_EDGES_MM[1:]):
        sel = (sd >= lo) & (sd < hi) & usable
        mean = float(z[sel].mean()) if sel.any() else np.nan
        p90 = float(np.percentile(z[sel], 90)) if sel.any() else np.nan
        shell_means[(lo, hi)] = mean
        out += [mean, p90]
    core_sel = sd < CORE_MM
    core = float(z[core_sel].mean()) if core_sel.any() else float(z[inside].mean())
    lesion = float(z[inside].mean())
    rim_shells = [m for (lo, hi), m in shell_means.items() if lo >= RIM_BAND_MM[0] and hi <= RIM_BAND_MM[1]]
    rim_shells = [m for m in rim_shells if np.isfinite(m)]
    rim_peak = max(rim_shells) if rim_shells else np.nan
    outside = shell_means[(3.0, 4.0)]
    out += [core, lesion, rim_peak, rim_peak - core, rim_peak - outside]

    spacing = np.asarray(spacing_mm, dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(sd.shape, spacing)], indexing="ij"))
    band = (sd >= RIM_BAND_MM[0]) & (sd <= RIM_BAND_MM[1]) & usable
    per_slice: list[list[float]] = []
    for k in range(sd.shape[2]):
        ins = inside[:, :, k]
        if not ins.any() or not band[:, :, k].any():
            continue
        cx, cy = grid[0, :, :, k][ins].mean(), grid[1, :, :, k][ins].mean()
        angle = np.arctan2(grid[1, :, :, k] - cy, grid[0, :, :, k] - cx)
        sector = np.minimum(((angle + np.pi) / (2 * np.pi) * SECTORS).astype(int), SECTORS - 1)
        per_slice.append(_sector_fractions(z[:, :, k], band[:, :, k], sector, SECTORS))
    fractions = np.asarray(per_slice, dtype=np.float64).reshape(-1, len(SIGMA_LEVELS))
    centre = np.array([grid[a][inside].mean() for a in range(3)])
    rel = grid - centre[:, None, None, None]
    azimuth = np.arctan2(rel[1], rel[0])
    radius = np.sqrt((rel ** 2).sum(axis=0)) + 1e-9
    cos_elev = np.clip(rel[2] / radius, -1, 1)  # equal-area bands in cos(elevation)
    sector3d = (np.minimum(((azimuth + np.pi) / (2 * np.pi) * SECTORS).astype(int), SECTORS - 1) * ELEVATION_BANDS
                + np.minimum(((cos_elev + 1) / 2 * ELEVATION_BANDS).astype(int), ELEVATION_BANDS - 1))
    sphere = _sector_fractions(z, band, sector3d, SECTORS * ELEVATION_BANDS)
    for j, _ in enumerate(SIGMA_LEVELS):
        col = fractions[:, j] if fractions.size else np.zeros(0)
        col = col[np.isfinite(col)]
        out += [float(col.max()) if col.size else np.nan, float(col.mean()) if col.size else np.nan,
                float(np.sum(col >= CONSENSUS_FRACTION) * spacing[2]), sphere[j]]
    return np.asarray(out, dtype=np.float32)


def radial_table(patches: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """(N, len(feature_names())) for N raw patches and their (N, 2) references."""
    patches = np.asarray(patches)
    if patches.shape[0] == 0:
        return np.zeros((0, len(feature_names())), np.float32)
    return np.stack([radial_features(p, r, spacing_mm) for p, r in zip(patches, reference)])


def shell_minus_core_ppb(qsm_ppb: np.ndarray, instances: np.ndarray, lesion_ids: Sequence[int]) -> np.ndarray:
    """The training-free floor: mean QSM (ppb) of the 1-voxel inner shell minus that of the core.

    The inner shell is the lesion voxels with a 6-connected non-lesion neighbour; a lesion with no
    core (all shell) scores 0.
    """
    ids = [int(i) for i in lesion_ids]
    out = np.zeros(len(ids), dtype=np.float64)
    if not ids:
        return out
    boxes = ndimage.find_objects(np.asarray(instances).astype(np.int32, copy=False), max_label=max(ids))
    for n, lesion_id in enumerate(ids):
        crop = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in boxes[lesion_id - 1])
        mask = np.asarray(instances[crop]) == lesion_id
        core = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
        shell = mask & ~core
        values = np.asarray(qsm_ppb[crop], dtype=np.float64)
        if core.any() and shell.any():
            out[n] = values[shell].mean() - values[core].mean()
    return out
