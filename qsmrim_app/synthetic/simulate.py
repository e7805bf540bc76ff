"""One subject session: place the head in the scanner, sample both grids, make QSM, T2*w and FLAIR images."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .anatomy import Anatomy, SizeSpec, random_rotation
from .physics import bias_field, rician, simulate_qsm
from .render import (BRAIN_CODES, N_TISSUES, WM, Grid, inner_depth, lesion_boxes, render_lesions, render_tissue,
                     render_veins, rim_voxels)

MIN_LESION_VOXELS = 12  # in each grid; the app drops instances below 10 QSM voxels

# Per tissue code (see render.py): outside, scalp, skull, CSF, GM, WM, ventricle, thalamus, caudate,
# putamen, pallidum, nigra.
CHI_PPM = np.array([0, 0, 0, 0, 0.015, -0.025, 0, 0.02, 0.06, 0.07, 0.16, 0.14], np.float32)
DEEP_IRON = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1], bool)
FLAIR = np.array([0, 0.7, 0.06, 0.06, 0.68, 0.5, 0.05, 0.6, 0.66, 0.6, 0.5, 0.5], np.float32)
T2STAR = np.array([0, 0.55, 0.05, 0.95, 0.75, 0.62, 0.95, 0.64, 0.62, 0.55, 0.4, 0.35], np.float32)
assert len(CHI_PPM) == len(FLAIR) == len(T2STAR) == N_TISSUES

# Sagittal FLAIR voxel axes: i -> posterior, j -> inferior, k -> left-to-right (a proper rotation).
FLAIR_AXES = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def rigid(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = rotation, translation
    return m


def grid_affine(directions: np.ndarray, voxel: np.ndarray, shape: tuple[int, int, int],
                centre: np.ndarray) -> np.ndarray:
    """Affine whose grid centre lands on `centre` (world mm)."""
    lin = directions @ np.diag(voxel)
    return rigid(lin, centre - lin @ ((np.array(shape) - 1) / 2.0))


@dataclass
class SessionImages:
    """Everything one session writes, plus the truth about it."""

    qsm_affine: np.ndarray
    qsm_ppm: np.ndarray
    chi_true_ppm: np.ndarray  # noise-free susceptibility in the QSM grid (before the dipole round trip)
    qsm_lesions: np.ndarray  # int32 instance map in the QSM grid, same ids as FLAIR
    rim_voxels: np.ndarray  # bool, the paramagnetic rim voxels in the QSM grid
    magnitude: np.ndarray | None
    flair_affine: np.ndarray
    flair: np.ndarray
    flair_lesions: np.ndarray  # int32 instance map in the FLAIR grid
    rim_dseg: np.ndarray  # uint8 0/1/2 in the FLAIR grid
    flair_to_qsm: np.ndarray  # 4x4 FLAIR world -> QSM world
    head_to_scanner: np.ndarray
    lesions: list[dict] = field(default_factory=list)


def _keep_and_relabel(anat: Anatomy, ids_q: np.ndarray, ids_f: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Drop lesions too small in either grid; renumber the rest 1..n in placement order."""
    n = len(anat.lesions) + 1
    count_q = np.bincount(ids_q.ravel(), minlength=n)
    count_f = np.bincount(ids_f.ravel(), minlength=n)
    kept = [k for k in range(1, n) if count_q[k] >= MIN_LESION_VOXELS and count_f[k] >= MIN_LESION_VOXELS]
    lut = np.zeros(n, np.int32)
    lut[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)
    return lut[ids_q], lut[ids_f], [k - 1 for k in kept]


def _centroids(ids: np.ndarray, affine: np.ndarray, n: int) -> np.ndarray:
    com = np.array(ndimage.center_of_mass(np.ones_like(ids), ids, range(1, n + 1))).reshape(n, 3)
    return (affine @ np.c_[com, np.ones(n)].T)[:3].T


def simulate_session(anat: Anatomy, spec: SizeSpec, rng: np.random.Generator, deep_iron: float,
                     magnitude: bool = True, *, flair_to_qsm: np.ndarray | None = None,
                     qsm_shift_mm: np.ndarray | None = None) -> SessionImages:
    """Position the head, sample the anatomy into the QSM and FLAIR grids and simulate the images.

    ``flair_to_qsm`` (4x4 rigid, FLAIR world -> QSM world) replaces the drawn header offset and
    ``qsm_shift_mm`` moves the QSM grid's centre (a slab covering part of the brain): the registration
    benchmark's one-head cases. The random draws are the same either way, so datasets do not change.
    """
    head_to_scanner = rigid(random_rotation(rng, (8, 6, 5)), np.clip(rng.normal(0, 2.5, size=3), -5, 5))
    scanner_to_head = np.linalg.inv(head_to_scanner)
    qsm_dirs = random_rotation(rng, (6, 0, 3))  # slab angulation
    qsm_centre = rng.uniform(-2, 2, size=3) + (0.0 if qsm_shift_mm is None else np.asarray(qsm_shift_mm, float))
    qsm_affine = grid_affine(qsm_dirs, np.array(spec.qsm_voxel), spec.qsm_shape, qsm_centre)
    drawn = rigid(random_rotation(rng, (4, 4, 4)), rng.uniform(-5, 5, size=3))
    flair_to_qsm = drawn if flair_to_qsm is None else np.asarray(flair_to_qsm, float)
    flair_affine = grid_affine(FLAIR_AXES, np.full(3, spec.flair_voxel), spec.flair_shape, rng.uniform(-3, 3, size=3))
    gq = Grid(spec.qsm_shape, qsm_affine, scanner_to_head)
    gf = Grid(spec.flair_shape, flair_affine, scanner_to_head @ flair_to_qsm)

    tissue_q, tissue_f = render_tissue(anat, gq), render_tissue(anat, gf)
    ids_q, ids_f, kept = _keep_and_relabel(anat, render_lesions(anat, gq, tissue_q), render_lesions(anat, gf, tissue_f))
    lesions = [anat.lesions[k] for k in kept]

    chi_table = CHI_PPM * np.where(DEEP_IRON, deep_iron, 1.0).astype(np.float32)
    chi = chi_table[tissue_q]
    mag = T2STAR[tissue_q].copy()
    rims = np.zeros(spec.qsm_shape, bool)
    for label, sl in lesion_boxes(ids_q).items():
        lesion = lesions[label - 1]
        mask = ids_q[sl] == label
        depth = inner_depth(mask)
        core = np.float32(lesion.chi_core)
        if lesion.kind == "hyper":  # centrally weighted: brighter inside than at the edge
            core = core * np.clip(depth / 2.0, 0.5, 1.0).astype(np.float32)[mask]
        chi[sl][mask] = CHI_PPM[WM] + core
        mag[sl][mask] = T2STAR[WM] + rng.uniform(0.08, 0.15)
        if lesion.rim_positive:
            rim = rim_voxels(lesion, mask, depth, gq, sl)
            chi[sl][rim] += np.float32(lesion.chi_rim)
            mag[sl][rim] -= np.float32(0.06)
            rims[sl] |= rim
    veins_q = render_veins(anat, gq)
    chi = chi * (1 - veins_q) + np.float32(anat.vein_chi) * veins_q
    brain = np.isin(tissue_q, BRAIN_CODES)
    chi_true = (chi * brain).astype(np.float32)
    qsm = simulate_qsm(chi_true, brain, qsm_affine, float(rng.uniform(0.0006, 0.0012)), rng)

    mag_img = None
    if magnitude:
        mag = mag * (1 - veins_q) + np.float32(0.22) * veins_q
        mag = ndimage.gaussian_filter(mag, 0.5) * bias_field(gq.world_points(), rng)
        mag_img = rician(mag, 0.02, rng)

    flair = FLAIR[tissue_f].copy()
    for label, sl in lesion_boxes(ids_f).items():
        mask = ids_f[sl] == label
        flair[sl][mask] = np.float32(lesions[label - 1].flair)
    veins_f = render_veins(anat, gf)
    flair = flair * (1 - veins_f) + np.float32(0.4) * veins_f
    flair = ndimage.gaussian_filter(flair, 0.6) * bias_field(gf.world_points(), rng, amplitude=0.15)
    flair = rician(flair, 0.02, rng)

    rim_lut = np.array([0] + [2 if les.rim_positive else 1 for les in lesions], np.uint8)
    n = len(lesions)
    cf, cq = _centroids(ids_f, flair_affine, n), _centroids(ids_q, qsm_affine, n)
    vox_f, vox_q = np.bincount(ids_f.ravel(), minlength=n + 1), np.bincount(ids_q.ravel(), minlength=n + 1)
    rows = [dict(lesion_id=i + 1, rim_positive=int(les.rim_positive), kind=les.kind, voxels_flair=int(vox_f[i + 1]),
                 centroid_x_mm=cf[i, 0], centroid_y_mm=cf[i, 1], centroid_z_mm=cf[i, 2],
                 voxels_qsm=int(vox_q[i + 1]), qsm_centroid_x_mm=cq[i, 0], qsm_centroid_y_mm=cq[i, 1],
                 qsm_centroid_z_mm=cq[i, 2], location=les.location, chi_core_ppm=les.chi_core,
                 chi_rim_ppm=les.chi_rim, rim_coverage=les.rim_coverage, rim_thickness_vox=les.rim_thickness)
            for i, les in enumerate(lesions)]
    return SessionImages(qsm_affine, qsm, chi_true, ids_q, rims, mag_img, flair_affine, flair, ids_f,
                         rim_lut[ids_f], flair_to_qsm, head_to_scanner, rows)
