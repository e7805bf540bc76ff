"""Backgrounds of the blind family: three real in-vivo susceptibility maps and their tissue model.

Each background is read in its own grid and given a *head frame*: its world coordinates, re-signed so
that the fitted MNI->head affine has positive determinant (the sources do not document their axis
directions; the brain-outline fit decides anterior/superior), and centred on the brain's centroid.
From the susceptibility alone (no magnitude is shipped with the maps) a crude tissue model is derived:
white-matter likeness (diamagnetic relative to the brain median after 1.5 mm smoothing, away from the
brain edge), CSF (a band at the brain surface plus flat, near-zero deep regions: the ventricles), iron-rich
deep grey matter (strongly paramagnetic, deep) and, for the two haemorrhage patients, the bleed
(smoothed susceptibility above 0.25 ppm in a large component). See docs/blind_family.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, optimize

from .geometry import apply, homogeneous, rotation, sample

#: name -> (susceptibility map, brain mask or None (= non-zero support), has a haemorrhage)
SOURCES: dict[str, tuple[str, str | None, bool]] = {
    "cosmos": ("qsm_challenge_2016/chi_cosmos.nii.gz", "qsm_challenge_2016/msk.nii.gz", False),
    "ichA": ("qsm_ich/patientA_Chimap.nii.gz", "qsm_ich/patientA_desc-brain_mask.nii.gz", True),
    "ichB": ("qsm_ich/patientB_Chimap.nii.gz", "qsm_ich/patientB_desc-brain_mask.nii.gz", True),
}
MNI_FLAIR = "open_ms_data/patient07/FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"
BLEED_PPB = 250.0          # smoothed susceptibility above which tissue is haemorrhage
BLEED_MIN_MM3 = 500.0      # smallest bleed component (veins and sinuses are thinner/smaller)


@dataclass(frozen=True)
class Background:
    """One real susceptibility map with its head frame and tissue model (arrays in its own grid)."""

    name: str
    chi_ppb: np.ndarray          # float32, reference-subtracted (brain median = 0)
    mask: np.ndarray             # bool brain mask
    head_from_vox: np.ndarray    # 4x4: voxel index -> head frame (mm)
    zooms: tuple[float, float, float]
    wm: np.ndarray               # float32 0..1 white-matter likeness
    csf: np.ndarray              # float32 0..1
    deep_gm: np.ndarray          # float32 0..1 iron-rich deep grey matter
    bleed: np.ndarray | None     # bool haemorrhage, None where the person has none
    bleed_distance_mm: np.ndarray | None  # distance to the bleed (mm), None without one
    edge_distance_mm: np.ndarray  # distance to the brain's edge (mm)
    mni_to_head: np.ndarray      # 4x4 affine fit of the MNI brain outline onto this brain
    outline_dice: float
    reference_ppb: float          # the median that was subtracted

    @property
    def vox_from_head(self) -> np.ndarray:
        return np.linalg.inv(self.head_from_vox)

    def head_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Min and max head coordinates (mm) of the brain mask."""
        idx = np.argwhere(self.mask)
        pts = apply(self.head_from_vox, idx[:: max(1, len(idx) // 20000)])
        return pts.min(axis=0), pts.max(axis=0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))).astype(np.float32)


@functools.lru_cache(maxsize=2)
def mni_brain(data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """The MNI brain outline (the skull-stripped Ljubljana FLAIR's support) and its affine."""
    img = nib.load(str(Path(data_dir) / MNI_FLAIR))
    data = np.asarray(img.dataobj, dtype=np.float32)
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(data > 10.0, iterations=2))
    labels, n = ndimage.label(mask)
    if n > 1:
        mask = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return mask, np.asarray(img.affine, dtype=float)


def _outline_fit(mask: np.ndarray, affine: np.ndarray, mni_mask: np.ndarray,
                 mni_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Affine MNI world -> background world maximising the soft Dice of the brain outlines.

    Searched over the sign of the antero-posterior and infero-superior axes (the sources' directions
    are undocumented), each started from matched centroids and second moments, refined by Powell on a
    4 mm lattice (9 parameters: translation, rotation, log scales). Returns (affine, flips, dice).
    """
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    step = np.maximum(1, np.round(5.0 / zooms)).astype(int)
    lo = np.maximum(np.argwhere(mask).min(axis=0) - np.ceil(10.0 / zooms).astype(int), 0)
    sub = mask[lo[0]:: step[0], lo[1]:: step[1], lo[2]:: step[2]].astype(np.float32)
    idx = np.indices(sub.shape).reshape(3, -1).T * step + lo
    world = apply(affine, idx).astype(np.float32)
    target = sub.ravel()
    inside = world[target > 0]
    c_b, sd_b = inside.mean(axis=0), inside.std(axis=0)
    mni_soft = ndimage.gaussian_filter(mni_mask.astype(np.float32), 1.5)
    mni_idx = np.argwhere(mni_mask)[::50]
    mni_world = apply(mni_affine, mni_idx)
    c_m, sd_m = mni_world.mean(axis=0), mni_world.std(axis=0)
    inv_mni = np.linalg.inv(mni_affine)

    def build(p: np.ndarray, flips: np.ndarray) -> np.ndarray:
        lin = rotation(p[3:6]) @ np.diag(np.exp(p[6:9]) * sd_b / sd_m * flips)
        return homogeneous(lin, c_b + p[:3] - lin @ c_m)

    def cost(p: np.ndarray, flips: np.ndarray) -> float:
        to_mni = inv_mni @ np.linalg.inv(build(p, flips))
        m = sample(mni_soft, apply(to_mni, world))
        return -2.0 * float((m * target).sum()) / float(m.sum() + target.sum() + 1e-6)

    best = None
    for flips in (np.array([1, 1, 1.0]), np.array([1, -1, 1.0]), np.array([1, 1, -1.0]), np.array([1, -1, -1.0])):
        res = optimize.minimize(cost, np.zeros(9), args=(flips,), method="Powell",
                                options={"maxiter": 1, "maxfev": 60, "xtol": 1e-2, "ftol": 1e-3})
        if best is None or res.fun < best[2]:
            best = (res.x, flips, res.fun)
    params, flips, _ = best
    res = optimize.minimize(cost, params, args=(flips,), method="Powell",
                            options={"maxiter": 4, "maxfev": 300, "xtol": 1e-2, "ftol": 1e-4})
    return build(res.x, flips), flips, float(-res.fun)


def _local_std(chi: np.ndarray, size: np.ndarray) -> np.ndarray:
    mean = ndimage.uniform_filter(chi, size)
    sq = ndimage.uniform_filter(chi * chi, size)
    return np.sqrt(np.maximum(sq - mean * mean, 0)).astype(np.float32)


@functools.lru_cache(maxsize=3)
def load_background(data_dir: str, name: str) -> Background:
    """Read one background and derive its head frame and tissue model (deterministic, cached)."""
    chi_rel, mask_rel, has_bleed = SOURCES[name]
    root = Path(data_dir)
    img = nib.load(str(root / chi_rel))
    chi = np.asarray(img.dataobj, dtype=np.float32) * 1000.0  # ppm -> ppb
    chi = np.nan_to_num(chi)
    mask = (np.asarray(nib.load(str(root / mask_rel)).dataobj) > 0) if mask_rel else chi != 0
    mask &= chi != 0
    affine = np.asarray(img.affine, dtype=float)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))

    eroded = ndimage.binary_erosion(mask, iterations=2)
    reference = float(np.median(chi[eroded]))
    chi = np.where(mask, chi - reference, 0).astype(np.float32)

    mni_mask, mni_affine = mni_brain(data_dir)
    fit, flips, dice = _outline_fit(mask, affine, mni_mask, mni_affine)
    # Head frame: background world re-signed (so the MNI->head map keeps handedness) and centred.
    centre = apply(affine, np.argwhere(mask)[::20]).mean(axis=0)
    resign = homogeneous(np.diag(flips), -np.diag(flips) @ centre)
    head_from_vox = resign @ affine
    mni_to_head = resign @ fit

    smooth = ndimage.gaussian_filter(chi, 1.5 / zooms).astype(np.float32)
    edge = ndimage.distance_transform_edt(mask, sampling=zooms).astype(np.float32)
    std3 = _local_std(chi, np.maximum(1, np.round(3.0 / zooms)).astype(int))
    wm = _sigmoid(-(smooth + 4.0) / 3.0) * _sigmoid((edge - 5.0) / 1.5) * mask
    flat = std3 < np.percentile(std3[mask], 15)
    ventricles = ndimage.gaussian_filter(((edge > 15.0) & flat & (np.abs(smooth) < 5.0)).astype(np.float32),
                                         1.0 / zooms)
    csf = np.clip(_sigmoid((2.0 - edge) / 0.7) * mask + ventricles, 0, 1).astype(np.float32)
    deep_gm = (_sigmoid((smooth - 25.0) / 8.0) * (edge > 15.0)).astype(np.float32)

    bleed = bleed_distance = None
    if has_bleed:
        hot = ndimage.gaussian_filter(chi, 2.0 / zooms) > BLEED_PPB
        labels, n = ndimage.label(hot)
        sizes = np.bincount(labels.ravel()) * float(np.prod(zooms))
        keep = [i for i in range(1, n + 1) if sizes[i] >= BLEED_MIN_MM3]
        bleed = ndimage.binary_dilation(np.isin(labels, keep), iterations=1) if keep else None
        if bleed is not None:
            bleed_distance = ndimage.distance_transform_edt(~bleed, sampling=zooms).astype(np.float32)
            wm = wm * _sigmoid((bleed_distance - 2.0) / 0.5)
    return Background(name=name, chi_ppb=chi, mask=mask, head_from_vox=head_from_vox,
                      zooms=tuple(float(z) for z in zooms), wm=wm.astype(np.float32), csf=csf,
                      deep_gm=deep_gm, bleed=bleed, bleed_distance_mm=bleed_distance, edge_distance_mm=edge,
                      mni_to_head=mni_to_head, outline_dice=dice, reference_ppb=reference)
