"""Semi-real MS participants: real COSMOS QSM background, real lesion shapes, simulated rims, real FLAIR.

One participant per Ljubljana patient (sub-<patient>), one session per clinical grid (ses-<grid>): the
same lesions scanned on several scanners. Per session, the head (semireal_head.py) is mirrored or not,
placed in the scanner by a known rigid transform, and imaged:

* QSM: the susceptibility (COSMOS chi with the lesions' cores, rims, edge veins written in) is built on a
  grid with the QSM's in-plane axes and 1 mm along the slice axis covering the whole brain, turned into a
  local field by the dipole forward model, averaged over each acquired slice (thick slices, partial
  coverage: the slab sees the field of tissue outside it), given noise and inverted by TKD on the slab,
  so rims blur, streak and are underestimated as in real QSM;
* magnitude (T2*-weighted, QSM grid): from the head's FLAIR by a tissue-contrast map, darkened by
  paramagnetic susceptibility (R2*), averaged over the slices, with its own bias field and Rician noise;
* FLAIR: the real FLAIR (patient07 or 19, own lesions inpainted) with this patient's lesions painted in,
  on its own 1 mm sagittal grid whose header differs from the QSM's by a known rigid transform.

Truth: lesion instances (FLAIR grid, shipped as `desc-lesion_dseg`), rim+ by the consensus rule measured
on the simulated rim sources in the QSM grid (shipped as `desc-rim_dseg`), QSM-grid truth maps, every
transform and every drawn parameter, outside the BIDS dataset.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import fft, ndimage

from .. import __version__
from .anatomy import random_rotation, rng_for
from .dataset import BIDS_VERSION, DERIV_NAME, FLAIR_SIDECAR, MAG_SIDECAR, _write_json, _write_pair, write_truth
from .physics import b0_in_grid, bias_field, dipole_kernel, rician
from .semireal_head import PATIENTS, Head, Volume, load_head
from .families import Family, get_family
from .semireal_lesions import (COUNTED_VOXELS, LesionDesign, PatientLesions, design_patient, in_arc, rim_band,
                               rim_modulation, zlib_crc)
from .simulate import FLAIR_AXES, grid_affine, rigid
from .tv import TV_ITERATIONS, tv_invert
from .warp import Warp, draw_warp

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridSpec:
    """An acquisition grid of the QSM/magnitude (voxel mm, shape) and its BIDS session label."""

    voxel: tuple[float, float, float]
    shape: tuple[int, int, int]
    session: str


GRIDS: dict[str, GridSpec] = {
    "0.75x0.75x3": GridSpec((0.75, 0.75, 3.0), (288, 288, 48), "075x075x3"),  # Zhang et al. 2022
    "1x1x1": GridSpec((1.0, 1.0, 1.0), (224, 224, 144), "1x1x1"),
    "0.6x0.6x2": GridSpec((0.6, 0.6, 2.0), (352, 352, 64), "06x06x2"),
    # grids of the generator families (families.py)
    "1x1x3": GridSpec((1.0, 1.0, 3.0), (224, 224, 44), "1x1x3"),
    "0.9x0.9x2": GridSpec((0.9, 0.9, 2.0), (240, 240, 64), "09x09x2"),
}
_PLAIN_GRIDS = ("0.75x0.75x3", "1x1x1", "0.6x0.6x2")  # the plain semi-real cohort's grids
HELD_OUT_PATIENTS = tuple(range(15, 21))
HELD_OUT_GRIDS = ("0.6x0.6x2",)
FLAIR_SHAPE = (208, 192, 160)  # sagittal 1 mm: A-P, S-I, L-R
MIN_LESION_VOXELS = COUNTED_VOXELS  # in each grid; the app drops instances below 10 QSM voxels
RIM_SEEN = 0.15  # share of a QSM voxel filled by rim source for the rim to count as seen there
RULE_COVERAGE = 2.0 / 3.0  # consensus rim+ criterion: rim around >= 2/3 of the edge ...
RULE_SLICES = 2  # ... on >= 2 slices
RULE_MIN_EDGE = 6  # slices with fewer in-plane edge voxels are too small to judge
FIELD_NOISE_PPM = (0.0006, 0.0012)  # at the 0.75x0.75x3 mm voxel; scales with 1/voxel volume
TKD_THRESHOLD = 0.18
R2STAR_PER_PPM_TE = 1.2  # R2* (1/s per ppm) x TE (s): paramagnetic tissue darkens the magnitude
PAD_MM = 30.0

QSM_SIDECAR = {"Units": "ppm", "MagneticFieldStrength": 3, "EchoTime": [0.006, 0.012, 0.018, 0.024, 0.030],
               "RepetitionTime": 0.035, "FlipAngle": 15, "MRAcquisitionType": "3D", "Manufacturer": "qsmrim-synth",
               "QSMMethod": "TKD (threshold 0.18) of the local field simulated from COSMOS chi + lesions",
               "B0Direction": "scanner z"}


def split_of(patient: int, grid: str) -> str:
    """'test' for the held-out judging set (patients 15-20 and the 0.6x0.6x2 mm grid), else 'train'."""
    return "test" if patient in HELD_OUT_PATIENTS or grid in HELD_OUT_GRIDS else "train"


# --------------------------------------------------------------------------------------------------
# Sampling source volumes into any grid


def _sample(volume: Volume, index_to_world: np.ndarray, shape: tuple[int, int, int], order: int,
            cval: float, chunk: int = 2_000_000, warp: Warp | None = None) -> np.ndarray:
    """`volume` at the voxel centres of a grid (index -> the volume's world), slab by slab (bounded memory).

    With a `warp`, each point is moved by its displacement in the volume's world before sampling."""
    to_vox = np.linalg.inv(volume.affine) @ index_to_world
    out = np.empty(shape, volume.data.dtype if order == 0 else np.float32)
    per = max(1, chunk // (shape[0] * shape[1]))
    ii, jj = np.meshgrid(np.arange(shape[0], dtype=np.float64), np.arange(shape[1], dtype=np.float64),
                         indexing="ij")
    for k0 in range(0, shape[2], per):
        ks = np.arange(k0, min(k0 + per, shape[2]), dtype=np.float64)
        pts = np.stack([np.broadcast_to(ii[..., None], ii.shape + ks.shape),
                        np.broadcast_to(jj[..., None], jj.shape + ks.shape),
                        np.broadcast_to(ks, ii.shape + ks.shape)])
        if warp is None:
            src = np.tensordot(to_vox[:3, :3], pts, axes=1) + to_vox[:3, 3].reshape(3, 1, 1, 1)
        else:
            world = np.tensordot(index_to_world[:3, :3], pts, axes=1) + index_to_world[:3, 3].reshape(3, 1, 1, 1)
            world = world + warp.displacement(world)
            inv = np.linalg.inv(volume.affine)
            src = np.tensordot(inv[:3, :3], world, axes=1) + inv[:3, 3].reshape(3, 1, 1, 1)
        out[:, :, k0:k0 + len(ks)] = ndimage.map_coordinates(volume.data, src, order=order, cval=cval,
                                                             prefilter=False)
    return out


def _points(index_to_world: np.ndarray, sl: tuple[slice, slice, slice]) -> np.ndarray:
    """World coordinates (3, ...) of the voxel centres in `sl`."""
    axes = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float64) for s in sl], indexing="ij")
    return np.tensordot(index_to_world[:3, :3], np.stack(axes), axes=1) + index_to_world[:3, 3].reshape(3, 1, 1, 1)


@dataclass(frozen=True)
class Fields:
    """Head quantities sampled into one grid."""

    chi: np.ndarray  # float32 ppm, COSMOS, zero outside the brain
    brain: np.ndarray  # bool
    sdf: np.ndarray  # float32 mm (source frame), negative inside a lesion
    nearest: np.ndarray  # int32 nearest lesion's source id
    labels: np.ndarray  # int32 source id inside lesions (within the brain), else 0


def _fields(head: Head, lesions: PatientLesions, to_cosmos: np.ndarray, shape: tuple[int, int, int],
            with_chi: bool = True, warp: Warp | None = None) -> Fields:
    """Head quantities in a grid; a `warp` bends the background (brain mask, chi), never the lesions."""
    to_mni = head.cosmos_to_mni @ to_cosmos
    brain = _sample(head.brain, to_cosmos, shape, 1, 0.0, warp=warp) > 0.5
    chi = (_sample(head.chi_ppm, to_cosmos, shape, 1, 0.0, warp=warp) * brain).astype(np.float32) if with_chi else None
    sdf = _sample(lesions.sdf_mm, to_mni, shape, 1, 50.0)
    nearest = _sample(lesions.nearest, to_mni, shape, 0, 0)
    labels = np.where((sdf < 0) & brain, nearest, 0).astype(np.int32)
    return Fields(chi, brain, sdf, nearest, labels)


# --------------------------------------------------------------------------------------------------
# One session


@dataclass(frozen=True)
class Geometry:
    """Every transform of one session (RAS world mm, 4x4)."""

    head_to_cosmos: np.ndarray  # head frame (brain-centred, maybe mirrored) -> COSMOS world
    head_to_scanner: np.ndarray  # head frame -> QSM world
    flair_to_qsm: np.ndarray  # FLAIR world -> QSM world (the rigid FLAIR-to-QSM truth)
    qsm_affine: np.ndarray
    flair_affine: np.ndarray
    mirrored: bool
    flair_shape: tuple[int, int, int] = FLAIR_SHAPE

    def qsm_to_cosmos(self) -> np.ndarray:
        return self.head_to_cosmos @ np.linalg.inv(self.head_to_scanner) @ self.qsm_affine

    def flair_to_cosmos(self) -> np.ndarray:
        return self.head_to_cosmos @ np.linalg.inv(self.head_to_scanner) @ self.flair_to_qsm @ self.flair_affine


def flair_grid_shape(voxel: tuple[float, float, float]) -> tuple[int, int, int]:
    """The FLAIR grid of voxel size `voxel` (mm, index order) covering the 1 mm FLAIR's field of view."""
    return tuple(int(round(n / float(v))) for n, v in zip(FLAIR_SHAPE, voxel))


def draw_geometry(head: Head, spec: GridSpec, rng: np.random.Generator, family: Family | None = None,
                  extra: np.random.Generator | None = None,
                  flair_voxel: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Geometry:
    """The session's transforms; a randomised family (with its own `extra` stream) widens the head's pose.

    `flair_voxel` (mm along the FLAIR's A-P, S-I, L-R index axes) sets the FLAIR grid; same field of view."""
    centre = (head.brain.affine @ np.r_[ndimage.center_of_mass(head.brain.data), 1.0])[:3]
    mirrored = bool(rng.random() < 0.5)
    head_to_cosmos = rigid(np.diag([-1.0 if mirrored else 1.0, 1.0, 1.0]), centre)
    head_to_scanner = rigid(random_rotation(rng, (8, 6, 5)), np.clip(rng.normal(0, 2.5, size=3), -5, 5))
    if family is not None and extra is not None:
        mirrored = bool(extra.random() < family.mirror_share)
        scale = float(extra.uniform(*family.head_scale))
        head_to_cosmos = rigid(np.diag([-1.0 if mirrored else 1.0, 1.0, 1.0]) / scale, centre)
        head_to_scanner = rigid(random_rotation(extra, family.head_rotation_deg),
                                np.clip(extra.normal(0, 2.5, size=3), -5, 5))
    slab = random_rotation(rng, (6, 0, 3))  # slab angulation
    # Thin slabs do not cover the whole brain: shift them up or down by up to 10 mm.
    qsm_centre = rng.uniform(-2, 2, size=3) + np.array([0.0, 0.0, rng.uniform(-10, 10)])
    qsm_affine = grid_affine(slab, np.array(spec.voxel), spec.shape, qsm_centre)
    flair_to_qsm = rigid(random_rotation(rng, (4, 4, 4)), rng.uniform(-5, 5, size=3))
    flair_shape = flair_grid_shape(flair_voxel)
    flair_affine = grid_affine(FLAIR_AXES, np.array(flair_voxel, float), flair_shape, rng.uniform(-3, 3, size=3))
    return Geometry(head_to_cosmos, head_to_scanner, flair_to_qsm, qsm_affine, flair_affine, mirrored, flair_shape)


@dataclass(frozen=True)
class FineGrid:
    """The simulation grid: QSM in-plane axes (cropped to the brain), `factor` sub-slices per QSM slice."""

    affine: np.ndarray  # fine index -> QSM world
    shape: tuple[int, int, int]
    offset: tuple[int, int]  # (i0, j0) of the fine grid in QSM indices
    k_start: int  # QSM slice index (may be < 0) where fine slice 0 begins
    factor: int


def fine_grid(geom: Geometry, spec: GridSpec, head: Head, margin_mm: float = 8.0) -> FineGrid:
    factor = max(1, int(round(spec.voxel[2] / 1.0)))
    cosmos_to_qsm_index = np.linalg.inv(geom.qsm_to_cosmos())
    idx = np.argwhere(head.brain.data > 0.5)[::7]
    world = head.brain.affine @ np.c_[idx, np.ones(len(idx))].T
    q = (cosmos_to_qsm_index @ world)[:3]
    margin = np.array([margin_mm / v for v in spec.voxel])
    lo = np.floor(q.min(axis=1) - margin).astype(int)
    hi = np.ceil(q.max(axis=1) + margin).astype(int) + 1
    i0, j0 = max(lo[0], 0), max(lo[1], 0)
    i1, j1 = min(hi[0], spec.shape[0]), min(hi[1], spec.shape[1])
    k_start, k_stop = int(lo[2]), int(hi[2])
    shape = (i1 - i0, j1 - j0, (k_stop - k_start) * factor)
    # fine (a, b, c) -> QSM continuous index (i0 + a, j0 + b, k_start + (c - (factor - 1) / 2) / factor)
    fine_to_index = np.eye(4)
    fine_to_index[:3, 3] = [i0, j0, k_start - (factor - 1) / (2.0 * factor)]
    fine_to_index[2, 2] = 1.0 / factor
    return FineGrid(geom.qsm_affine @ fine_to_index, shape, (i0, j0), k_start, factor)


def _slice_average(fine: np.ndarray, grid: FineGrid, spec: GridSpec) -> np.ndarray:
    """Fine slices averaged into the acquired QSM slices (box slice profile), pasted into the full grid."""
    out = np.zeros(spec.shape, np.float32)
    n_k = fine.shape[2] // grid.factor
    avg = fine[:, :, :n_k * grid.factor].reshape(fine.shape[0], fine.shape[1], n_k, grid.factor).mean(axis=3)
    lo = max(0, -grid.k_start)
    hi = min(n_k, spec.shape[2] - grid.k_start)
    i0, j0 = grid.offset
    out[i0:i0 + fine.shape[0], j0:j0 + fine.shape[1], grid.k_start + lo:grid.k_start + hi] = avg[:, :, lo:hi]
    return out


@dataclass(frozen=True)
class Inversion:
    """How a session's field becomes a map: TKD (threshold), Tikhonov D/(D^2+l) or gradient-l2 D/(D^2+l|k/kmax|^2)."""

    method: str = "tkd"
    threshold: float = TKD_THRESHOLD
    lam: float = 0.02

    def describe(self) -> str:
        if self.method == "tkd":
            return f"TKD (threshold {self.threshold:.3f})"
        if self.method == "tv":
            return f"total variation (lambda {self.lam:.2e}, ADMM, {TV_ITERATIONS} iterations)"
        return f"{self.method} (lambda {self.lam:.3f}), closed form"


def _inverse_kernel(d: np.ndarray, pad: tuple[int, ...], vox: np.ndarray, inversion: Inversion) -> np.ndarray:
    if inversion.method == "tkd":
        t = inversion.threshold
        return np.where(np.abs(d) > t, 1.0 / np.where(d == 0, 1.0, d), np.sign(d + 1e-12) / t).astype(np.float32)
    if inversion.method == "tikhonov":
        return (d / (d * d + inversion.lam)).astype(np.float32)
    if inversion.method == "gradient-l2":
        ks = np.meshgrid(*[fft.fftfreq(n, d=float(v)) * 2.0 * float(v) for n, v in zip(pad, vox)], indexing="ij")
        k2 = sum(k ** 2 for k in ks) / 3.0  # |k / k_nyquist|^2 averaged over the axes: 0 at DC, 1 at the corner
        return (d / (d * d + inversion.lam * k2 + 1e-6)).astype(np.float32)
    raise ValueError(f"unknown inversion {inversion.method!r}")


def _convolve_dipole(data: np.ndarray, affine: np.ndarray, inverse: bool, inversion: Inversion | None = None
                     ) -> np.ndarray:
    """Dipole forward model (chi -> field) or an inverse (TKD by default), zero-padded by PAD_MM."""
    if inverse and inversion is not None and inversion.method == "tv":
        return tv_invert(data, affine, inversion.lam, pad_mm=PAD_MM)
    vox = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    pad = tuple(fft.next_fast_len(int(n + 2 * PAD_MM / v)) for n, v in zip(data.shape, vox))
    d = dipole_kernel(pad, vox, b0_in_grid(affine)).astype(np.float32)
    if inverse:
        d = _inverse_kernel(d, pad, vox, inversion or Inversion())
    spectrum = fft.rfftn(data.astype(np.float32), s=pad, workers=1)
    half = d[..., :spectrum.shape[-1]]
    out = fft.irfftn(spectrum * half, s=pad, workers=1)
    return out[tuple(slice(0, n) for n in data.shape)].astype(np.float32)


def _edit_lesions(chi: np.ndarray, fields: Fields, lesions: PatientLesions, to_cosmos: np.ndarray,
                  cosmos_of_mni: np.ndarray, h: float) -> np.ndarray:
    """Write each lesion's core, rim (or arc) and edge vein into `chi`; returns the rim-source fraction.

    The core is the local reference tissue (median chi 1-4 mm outside the lesion) plus the drawn offset,
    keeping half of the background's own texture; rims are shells of signed distance in the covered arc.
    """
    rim = np.zeros(chi.shape, np.float32)
    near = np.where(fields.sdf < 4.0, fields.nearest, 0)
    for label, sl in enumerate(ndimage.find_objects(near), start=1):
        if sl is None or label not in lesions.designs:
            continue
        design = lesions.designs[label]
        own = near[sl] == label
        sdf = fields.sdf[sl]
        brain = fields.brain[sl]
        bg = chi[sl]
        shell = own & brain & (sdf >= 1.0) & (sdf <= 4.0)
        if shell.sum() >= 5:
            ref = float(np.median(bg[shell]))
        else:
            ref = float(np.median(bg[own & brain])) if (own & brain).any() else 0.0
        w_in = np.clip(0.5 - sdf / h, 0.0, 1.0) * own * brain
        core = ref + design.chi_core + design.chi_hyper * np.clip(-sdf / 2.0, 0.0, 1.0)
        lesion_chi = core + 0.5 * np.clip(bg - ref, -0.03, 0.03)
        new = (1.0 - w_in) * bg + w_in * lesion_chi
        if design.has_rim_source:
            # Outward normal = gradient of the signed distance, taken to world axes (inverse transpose).
            grad = np.stack(np.gradient(sdf)) if min(sdf.shape) > 1 else np.zeros((3,) + sdf.shape)
            normal = np.tensordot(np.linalg.inv(to_cosmos[:3, :3]).T, grad, axes=1)
            azimuth = np.arctan2(normal[1], normal[0])
            band = rim_band(sdf, design, h) * own * brain * in_arc(azimuth, design)
            if design.rim_modulation > 0:
                band = band * rim_modulation(azimuth, design)
            new = new + design.rim_chi * band
            rim[sl] = np.maximum(rim[sl], np.minimum(band, 1.0))
        chi[sl] = np.where(own, new, bg).astype(np.float32)
        if design.kind == "vein":
            _add_vein(chi, fields.brain, design, to_cosmos, cosmos_of_mni, h)
    return rim


def _add_vein(chi: np.ndarray, brain: np.ndarray, design: LesionDesign, to_cosmos: np.ndarray,
              cosmos_of_mni: np.ndarray, h: float) -> None:
    """A straight vein segment (partial-volume tube) along the lesion edge."""
    p = (cosmos_of_mni @ np.r_[design.vein_point_mni, 1.0])[:3]
    d = cosmos_of_mni[:3, :3] @ np.array(design.vein_direction_mni)
    d /= np.linalg.norm(d)
    a, b = p - d * design.vein_length / 2.0, p + d * design.vein_length / 2.0
    to_index = np.linalg.inv(to_cosmos)
    corners = np.array([to_index @ np.r_[e + s, 1.0] for e in (a, b)
                        for s in np.array(np.meshgrid(*[[-3, 3]] * 3)).reshape(3, -1).T])[:, :3]
    lo = np.maximum(np.floor(corners.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 1, chi.shape)
    if np.any(hi <= lo):
        return
    sl = tuple(slice(int(x), int(y)) for x, y in zip(lo, hi))
    pts = _points(to_cosmos, sl)
    ab = b - a
    t = np.clip(np.tensordot(ab, pts - a.reshape(3, 1, 1, 1), axes=1) / float(ab @ ab), 0.0, 1.0)
    dist = np.sqrt(np.sum((pts - (a.reshape(3, 1, 1, 1) + ab.reshape(3, 1, 1, 1) * t)) ** 2, axis=0))
    frac = np.clip((design.vein_radius + 0.5 * h - dist) / h, 0.0, 1.0) * brain[sl]
    chi[sl] = (chi[sl] * (1 - frac) + design.vein_chi * frac).astype(np.float32)


def consensus_rule(lesion: np.ndarray, rim_seen: np.ndarray, sectors: int = 16) -> tuple[bool, int, float]:
    """(rim+, slices meeting the rule, best slice coverage) of one lesion in the QSM grid.

    Per slice (k), the edge band of the lesion's largest in-plane piece (its edge voxels and the ring of
    voxels just outside it) is split into `sectors` azimuth sectors around the slice's centroid; a sector is covered when a seen rim
    voxel lies in its part of the band. The slice meets the rule when >= RULE_COVERAGE of the sectors that
    hold band voxels are covered; rim+ needs RULE_SLICES such slices. Slices with < RULE_MIN_EDGE edge
    voxels, or slivers without an inside, are too small to judge and skipped. The outer ring is part of the
    band so that both sides of an elongated cross-section count (an arc along one side covers half).
    """
    cross = np.zeros((3, 3), bool)
    cross[1, :] = cross[:, 1] = True
    good, best = 0, 0.0
    for k in range(lesion.shape[2]):
        pieces, n = ndimage.label(lesion[:, :, k], np.ones((3, 3), bool))
        if n == 0:
            continue
        # The largest piece of the cross-section: what a rater judges "around" on that slice.
        piece = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
        edge = piece & ~ndimage.binary_erosion(piece, cross, border_value=0)
        if edge.sum() < RULE_MIN_EDGE or not (piece & ~edge).any():
            continue
        band = edge | (ndimage.binary_dilation(piece, cross) & ~lesion[:, :, k])
        centre = np.argwhere(piece).mean(axis=0)

        def sector(points: np.ndarray) -> set[int]:
            angle = np.arctan2(points[:, 1] - centre[1], points[:, 0] - centre[0])
            return set(np.minimum(((angle + np.pi) / (2 * np.pi) * sectors).astype(int), sectors - 1).tolist())

        present = sector(np.argwhere(band))
        covered = sector(np.argwhere(band & rim_seen[:, :, k]))
        cover = len(covered & present) / len(present)
        best = max(best, cover)
        good += cover >= RULE_COVERAGE
    return good >= RULE_SLICES, good, best


@dataclass
class SessionResult:
    qsm_ppm: np.ndarray
    magnitude: np.ndarray
    flair: np.ndarray
    flair_labels: np.ndarray  # int32, kept lesions 1..n
    qsm_labels: np.ndarray
    rim_dseg_flair: np.ndarray
    rim_dseg_qsm: np.ndarray
    rim_fraction_qsm: np.ndarray
    geometry: Geometry
    rows: list[dict]
    seconds: float
    acquisition: Acquisition | None = None
    variations: "Variations | None" = None


def _relabel(lut_src: dict[int, int], labels: np.ndarray) -> np.ndarray:
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int32)
    for src, new in lut_src.items():
        if src < lut.size:
            lut[src] = new
    return lut[labels]


def _centroids(labels: np.ndarray, affine: np.ndarray, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros((0, 3))
    com = np.array(ndimage.center_of_mass(np.ones_like(labels), labels, range(1, n + 1))).reshape(n, 3)
    return (affine @ np.c_[com, np.ones(n)].T)[:3].T


def _truth(lesions: PatientLesions, kept: list[int], labels_q: np.ndarray, labels_f: np.ndarray,
           nearest_q: np.ndarray, rim_q: np.ndarray, geom, spec, count_q: np.ndarray, count_f: np.ndarray
           ) -> tuple[list[dict], np.ndarray]:
    """One truth row per kept lesion (the consensus rule on its rim source in the QSM grid) and the
    lesion-id -> rim label look-up (1 rim-, 2 rim+)."""
    seen = (rim_q >= RIM_SEEN)
    rows, rim_lut = [], np.zeros(len(kept) + 1, np.uint8)
    cq, cf = _centroids(labels_q, geom.qsm_affine, len(kept)), _centroids(labels_f, geom.flair_affine, len(kept))
    boxes = ndimage.find_objects(labels_q)
    for i, src in enumerate(kept, start=1):
        design = lesions.designs[src]
        sl = tuple(slice(max(s.start - 3, 0), min(s.stop + 3, n)) for s, n in zip(boxes[i - 1], spec.shape))
        mask = labels_q[sl] == i
        own_rim = seen[sl] & (nearest_q[sl] == src) & design.has_rim_source
        positive, slices, best = consensus_rule(mask, own_rim)
        rim_lut[i] = 2 if positive else 1
        rows.append({"lesion_id": i, "source_lesion": src, "rim_positive": int(positive), "kind": design.kind,
                     "rule_slices": slices, "rule_best_coverage": round(best, 4),
                     "voxels_flair": int(count_f[src]), "voxels_qsm": int(count_q[src]),
                     "volume_source_mm3": design.volume_mm3,
                     "centroid_x_mm": cf[i - 1, 0], "centroid_y_mm": cf[i - 1, 1], "centroid_z_mm": cf[i - 1, 2],
                     "qsm_centroid_x_mm": cq[i - 1, 0], "qsm_centroid_y_mm": cq[i - 1, 1],
                     "qsm_centroid_z_mm": cq[i - 1, 2],
                     "chi_core_ppm": design.chi_core, "chi_hyper_ppm": design.chi_hyper,
                     "rim_chi_ppm": design.rim_chi, "rim_thickness_mm": design.rim_thickness if design.has_rim_source else 0.0,
                     "rim_coverage_designed": design.rim_coverage, "rim_position": design.rim_position if design.has_rim_source else "n/a",
                     "vein_chi_ppm": design.vein_chi, "flair_contrast": design.flair_contrast,
                     "rim_modulation": design.rim_modulation})
    return rows, rim_lut


@dataclass(frozen=True)
class Acquisition:
    """A session's drawn reconstruction settings (families.py); the defaults are the plain semi-real ones."""

    inversion: Inversion = Inversion()
    noise_scale: float = 1.0
    background_field_ppm: float = 0.0
    map_scale: float = 1.0
    map_offset_ppm: float = 0.0


def draw_acquisition(family: Family, rng: np.random.Generator) -> Acquisition:
    method = str(family.inversion[int(rng.integers(len(family.inversion)))])
    inversion = Inversion(method, float(rng.uniform(*family.tkd_threshold)), float(rng.uniform(*family.tikhonov_lambda)))
    return Acquisition(inversion, float(rng.uniform(*family.noise_scale)),
                       float(rng.uniform(*family.background_field_ppm)), float(rng.uniform(*family.map_scale)),
                       float(rng.uniform(*family.map_offset_ppm)))


@dataclass(frozen=True)
class Variations:
    """A session's draws of the later generator variations (a stream of their own, so the families that do
    not use them draw exactly what they drew before): background warp, TV lambda, FLAIR voxel size."""

    warp: Warp | None = None
    tv_lambda: float = 0.0
    flair_voxel: tuple[float, float, float] = (1.0, 1.0, 1.0)


def draw_variations(family: Family, rng: np.random.Generator) -> Variations:
    warp = draw_warp(rng, family.warp_mm, family.warp_wavelength_mm) if family.warp_mm[1] > 0 else None
    tv_lambda = float(rng.uniform(*family.tv_lambda))
    voxel = tuple(float(v) for v in family.flair_voxels[int(rng.integers(len(family.flair_voxels)))])
    return Variations(warp, tv_lambda, voxel)


def _background_field(world: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A residual background field (ppm): a smooth random second-order polynomial of scanner position,
    scaled to `amplitude` at 80 mm (what an imperfect background removal leaves near the brain's edge)."""
    x = world / np.float32(80.0)
    terms = [x[0], x[1], x[2], x[0] * x[1], x[0] * x[2], x[1] * x[2], x[0] ** 2 - x[1] ** 2, x[2] ** 2]
    coeffs = rng.normal(0.0, 1.0, size=len(terms))
    coeffs = coeffs / np.linalg.norm(coeffs)
    return (amplitude * sum(np.float32(c) * t for c, t in zip(coeffs, terms))).astype(np.float32)


def _session_draws(family: Family | None, seed: int, patient: int, grid: str
                   ) -> tuple[Family | None, np.random.Generator | None, Acquisition, Variations]:
    """A randomised family's own streams: pose and reconstruction (`extra`), and the later variations
    (warp, TV weight, FLAIR voxel) from a third stream only the families that use them touch."""
    if family is not None and not family.randomised:
        family = None
    extra = rng_for(seed, patient, 500_000 * (1 + list(GRIDS).index(grid)) + zlib_crc(family.name)) if family else None
    acq = draw_acquisition(family, extra) if family else Acquisition()
    var = Variations()
    if family is not None and family.varies:
        var = draw_variations(family, rng_for(seed, patient, 700_000 * (1 + list(GRIDS).index(grid))
                                              + zlib_crc(family.name)))
        if acq.inversion.method == "tv":
            acq = Acquisition(Inversion("tv", acq.inversion.threshold, var.tv_lambda), acq.noise_scale,
                              acq.background_field_ppm, acq.map_scale, acq.map_offset_ppm)
    return family, extra, acq, var


def simulate_session(head: Head, lesions: PatientLesions, grid: str, seed: int, family: Family | None = None
                     ) -> SessionResult:
    """All images and truth of one patient on one grid (deterministic in seed, patient, grid, family).

    Without a family (or with `semireal`) the session is the plain semi-real one, bit for bit; a randomised
    family draws its pose and reconstruction from a stream of its own.
    """
    start = time.perf_counter()
    spec = GRIDS[grid]
    rng = rng_for(seed, lesions.patient, 1 + list(GRIDS).index(grid))
    family, extra, acq, var = _session_draws(family, seed, lesions.patient, grid)
    geom = draw_geometry(head, spec, rng, family, extra, var.flair_voxel)
    qsm_to_cosmos, flair_to_cosmos = geom.qsm_to_cosmos(), geom.flair_to_cosmos()
    warp = var.warp

    # Which lesions this session can show: >= MIN_LESION_VOXELS in both grids.
    q = _fields(head, lesions, qsm_to_cosmos, spec.shape, with_chi=False, warp=warp)
    f = _fields(head, lesions, flair_to_cosmos, geom.flair_shape, with_chi=False, warp=warp)
    n_src = max(lesions.designs) + 1 if lesions.designs else 1
    count_q = np.bincount(q.labels.ravel(), minlength=n_src)
    count_f = np.bincount(f.labels.ravel(), minlength=n_src)
    kept = [s for s in sorted(lesions.designs) if count_q[s] >= MIN_LESION_VOXELS and count_f[s] >= MIN_LESION_VOXELS]
    new_id = {s: i + 1 for i, s in enumerate(kept)}

    # Susceptibility on the fine grid -> field -> slice average -> noise -> TKD on the slab.
    fg = fine_grid(geom, spec, head)
    fine_to_cosmos = geom.head_to_cosmos @ np.linalg.inv(geom.head_to_scanner) @ fg.affine
    fine = _fields(head, lesions, fine_to_cosmos, fg.shape, warp=warp)
    h = float(np.mean(np.sqrt(np.sum(fg.affine[:3, :3] ** 2, axis=0))))
    chi = fine.chi.copy()
    rim_fine = _edit_lesions(chi, fine, lesions, fine_to_cosmos, np.linalg.inv(head.cosmos_to_mni), h)
    field = _convolve_dipole(chi, fg.affine, inverse=False)
    field_q = _slice_average(field, fg, spec)
    del field
    brain_q = ndimage.binary_erosion(q.brain, iterations=1)
    noise = float(rng.uniform(*FIELD_NOISE_PPM)) * (0.75 * 0.75 * 3.0) / float(np.prod(spec.voxel))
    field_q = (field_q + rng.normal(0.0, noise * acq.noise_scale, size=spec.shape).astype(np.float32)) * brain_q
    if acq.background_field_ppm > 0:
        world = _points(geom.qsm_affine, tuple(slice(0, n) for n in spec.shape)).astype(np.float32)
        field_q = field_q + _background_field(world, acq.background_field_ppm, extra) * brain_q
        del world
    qsm = _convolve_dipole(field_q, geom.qsm_affine, inverse=True, inversion=acq.inversion) * brain_q
    if acq.map_scale != 1.0 or acq.map_offset_ppm != 0.0:
        qsm = ((qsm * acq.map_scale + acq.map_offset_ppm) * brain_q).astype(np.float32)
    rim_q = _slice_average(rim_fine, fg, spec)

    # Magnitude: FLAIR-derived tissue contrast, darkened by paramagnetic tissue, thick slices, bias, noise.
    flair_src = head.flairs[lesions.flair_patient]
    wm = float(np.median(flair_src.data[flair_src.data > np.percentile(flair_src.data[flair_src.data > 0], 40)]))
    to_mni_fine = head.cosmos_to_mni @ fine_to_cosmos
    base = _sample(flair_src, to_mni_fine, fg.shape, 1, 0.0) / wm
    paint = np.clip(0.5 - fine.sdf / h, 0.0, 1.0) * fine.brain
    contrast = _design_lut(lesions, "flair_contrast", fine.nearest)
    base = base * (1 - paint) + paint * contrast
    mag = np.interp(base, [0.0, 0.5, 1.0, 1.3, 2.0], [1.0, 0.9, 0.65, 0.8, 0.85]).astype(np.float32)
    mag = mag * np.exp(-R2STAR_PER_PPM_TE * np.clip(chi, 0.0, None)) * fine.brain
    del base, paint, contrast, chi, rim_fine, fine
    mag_q = _slice_average(mag.astype(np.float32), fg, spec)
    world_q = _points(geom.qsm_affine, tuple(slice(0, n) for n in spec.shape)).astype(np.float32)
    mag_q = rician(mag_q * bias_field(world_q, rng), 0.02, rng) * ndimage.binary_dilation(q.brain, iterations=2)

    # FLAIR: the real FLAIR with the lesions painted in, on its own grid (thick voxels: averaged 1 mm samples).
    ref = _flair_reference(flair_src, lesions)
    flair = _painted_flair(head, lesions, flair_src, ref, flair_to_cosmos, f, geom, warp)
    world_f = _points(geom.flair_affine, tuple(slice(0, n) for n in geom.flair_shape)).astype(np.float32)
    flair = rician(flair * bias_field(world_f, rng, amplitude=0.15), 0.015 * wm, rng) * (flair > 0)
    del world_f, world_q

    # Truth: kept lesions, the consensus rule on the rim sources in the QSM grid.
    labels_q = _relabel(new_id, q.labels)
    labels_f = _relabel(new_id, f.labels)
    rows, rim_lut = _truth(lesions, kept, labels_q, labels_f, q.nearest, rim_q, geom, spec, count_q, count_f)
    return SessionResult(qsm, mag_q, flair.astype(np.float32), labels_f, labels_q, rim_lut[labels_f],
                         rim_lut[labels_q], rim_q, geom, rows, time.perf_counter() - start, acq, var)


def _paint_flair(flair_src: Volume, to_mni: np.ndarray, shape: tuple[int, int, int], f: Fields,
                 lesions: PatientLesions, ref: np.ndarray) -> np.ndarray:
    flair = _sample(flair_src, to_mni, shape, 1, 0.0)
    paint = np.clip(0.5 - f.sdf / 1.0, 0.0, 1.0) * f.brain
    contrast = _design_lut(lesions, "flair_contrast", f.nearest) * ref[f.nearest]
    return flair * (1 - paint) + paint * contrast * (1.0 + 0.3 * (flair / np.maximum(ref[f.nearest], 1e-3) - 1.0))


def _painted_flair(head: Head, lesions: PatientLesions, flair_src: Volume, ref: np.ndarray,
                   flair_to_cosmos: np.ndarray, f: Fields, geom: Geometry, warp: Warp | None) -> np.ndarray:
    """The FLAIR with the lesions painted in. A voxel longer than ~1.5 mm along an axis is the mean of
    1 mm-spaced samples along it (partial volume, as a thick-slice FLAIR blurs small lesions)."""
    voxel = np.sqrt(np.sum(geom.flair_affine[:3, :3] ** 2, axis=0))
    factors = [max(1, int(round(v))) for v in voxel]
    if factors == [1, 1, 1]:
        return _paint_flair(flair_src, head.cosmos_to_mni @ flair_to_cosmos, geom.flair_shape, f, lesions, ref)
    out = np.zeros(geom.flair_shape, np.float32)
    offsets = [(np.arange(n) - (n - 1) / 2.0) / n for n in factors]
    for da in offsets[0]:
        for db in offsets[1]:
            for dc in offsets[2]:
                shift = np.eye(4)
                shift[:3, 3] = [da, db, dc]
                to_cosmos = flair_to_cosmos @ shift
                sub = _fields(head, lesions, to_cosmos, geom.flair_shape, with_chi=False, warp=warp)
                out += _paint_flair(flair_src, head.cosmos_to_mni @ to_cosmos, geom.flair_shape, sub, lesions, ref)
    return out / np.float32(np.prod(factors))


def _design_lut(lesions: PatientLesions, attr: str, nearest: np.ndarray) -> np.ndarray:
    lut = np.ones(max(lesions.designs, default=0) + 1, np.float32)
    for src, design in lesions.designs.items():
        lut[src] = getattr(design, attr)
    return lut[nearest]


def _flair_reference(flair: Volume, lesions: PatientLesions) -> np.ndarray:
    """Per lesion, the median FLAIR of the tissue 1-4 mm around it (what it is brighter than)."""
    near = np.where((lesions.sdf_mm.data >= 1.0) & (lesions.sdf_mm.data <= 4.0) & (flair.data > 0),
                    lesions.nearest.data, 0)
    n = max(lesions.designs, default=0) + 1
    ref = np.full(n, float(np.median(flair.data[flair.data > 0])), np.float32)
    values = ndimage.median(flair.data, near, range(1, n)) if n > 1 else []
    for label, value in enumerate(np.atleast_1d(values), start=1):
        if np.isfinite(value) and value > 0:
            ref[label] = value
    return ref


# --------------------------------------------------------------------------------------------------
# The dataset


def _qsm_sidecar(res: SessionResult, family: Family | None) -> tuple[dict, float]:
    """The Chimap's sidecar and the factor from ppm to its stored units."""
    if family is None or not family.randomised or res.acquisition is None:
        return QSM_SIDECAR, 1.0
    acq = res.acquisition
    factor = 1000.0 if family.units == "ppb" else 1.0
    method = (f"{acq.inversion.describe()} of the local field simulated from the {family.background} map + "
              f"lesions (family {family.name})")
    return {**QSM_SIDECAR, "Units": family.units, "QSMMethod": method}, factor


def _write_session(bids: Path, truth: Path, patient: int, grid: str, res: SessionResult,
                   family: Family | None = None) -> None:
    sub, ses = f"{patient:02d}", GRIDS[grid].session
    rel = Path(f"sub-{sub}") / f"ses-{ses}" / "anat"
    stem = f"sub-{sub}_ses-{ses}"
    anat, deriv, tdir = bids / rel, bids / "derivatives" / DERIV_NAME / rel, truth / rel
    g = res.geometry
    sidecar, factor = _qsm_sidecar(res, family)
    _write_pair(anat / f"{stem}_Chimap.nii.gz", res.qsm_ppm * np.float32(factor), g.qsm_affine, np.float32, sidecar)
    _write_pair(anat / f"{stem}_part-mag_T2starw.nii.gz", np.clip(np.round(res.magnitude * 1000), 0, 32767),
                g.qsm_affine, np.int16, MAG_SIDECAR)
    _write_pair(anat / f"{stem}_FLAIR.nii.gz", np.clip(np.round(res.flair * 10), 0, 32767), g.flair_affine,
                np.int16, FLAIR_SIDECAR)
    flair_uri = f"bids:raw:{(rel / f'{stem}_FLAIR.nii.gz').as_posix()}"
    common = {"Sources": [flair_uri], "SpatialReference": flair_uri}
    _write_pair(deriv / f"{stem}_desc-lesion_dseg.nii.gz", res.flair_labels, g.flair_affine, np.int32,
                {**common, "Description": "one integer per lesion (lesion_id): real lesion shapes "
                                          "(Lesjak et al. 2017), confluent lesions kept split"})
    _write_pair(deriv / f"{stem}_desc-rim_dseg.nii.gz", res.rim_dseg_flair, g.flair_affine, np.uint8,
                {**common, "Description": "rim+ by the consensus rule (rim around >= 2/3 of the edge on >= 2 "
                                          "QSM slices) measured on the simulated rim sources",
                 "Labels": {"0": "background", "1": "rim-", "2": "rim+"}})
    tsrc = {"Sources": [f"bids:raw:{(rel / f'{stem}_Chimap.nii.gz').as_posix()}"]}
    _write_pair(tdir / f"{stem}_space-QSM_desc-lesion_dseg.nii.gz", res.qsm_labels, g.qsm_affine, np.int32, tsrc)
    _write_pair(tdir / f"{stem}_space-QSM_desc-rim_dseg.nii.gz", res.rim_dseg_qsm, g.qsm_affine, np.uint8, tsrc)
    _write_pair(tdir / f"{stem}_space-QSM_desc-rimsource_probseg.nii.gz", res.rim_fraction_qsm, g.qsm_affine,
                np.float32, {**tsrc, "Description": "share of each QSM voxel filled by simulated rim source"})


def _acquisition_row(family: Family | None, res: SessionResult) -> dict:
    if family is None or not family.randomised or res.acquisition is None:
        return {}
    acq = res.acquisition
    return {"family": family.name, "background": family.background, "inversion": acq.inversion.method,
            "tkd_threshold": round(acq.inversion.threshold, 4), "lambda": round(acq.inversion.lam, 4),
            "noise_scale": round(acq.noise_scale, 3), "background_field_ppm": round(acq.background_field_ppm, 4),
            "map_scale": round(acq.map_scale, 3), "map_offset_ppm": round(acq.map_offset_ppm, 4),
            "units": family.units, **_variation_row(family, res)}


def _variation_row(family: Family, res: SessionResult) -> dict:
    if not family.varies or res.variations is None:
        return {}
    var = res.variations
    return {"warp_mm": round(var.warp.amplitude_mm, 3) if var.warp is not None else 0.0,
            "warp_min_wavelength_mm": round(var.warp.min_wavelength_mm, 2) if var.warp is not None else 0.0,
            "tv_lambda": f"{var.tv_lambda:.3e}" if res.acquisition.inversion.method == "tv" else "",
            "flair_voxel_mm": "x".join(f"{v:g}" for v in var.flair_voxel)}


def _readme(patients: list[int], grids: list[str]) -> str:
    return ("Semi-real MS dataset made by qsmrim-synth --semi-real. Not real patients: the QSM background is the\n"
            "COSMOS map of the 2016 ISMRM QSM challenge (Langkammer et al., MRM 2018), the lesion shapes and\n"
            "locations are the consensus masks of the Ljubljana MS database (Lesjak et al., Neuroinformatics 2017,\n"
            "CC-BY), the FLAIR is a real FLAIR of that database with the lesions painted in; paramagnetic rims\n"
            "and confounders are simulated through the dipole forward model, noise and TKD. One subject per\n"
            f"patient ({', '.join(f'{p:02d}' for p in patients)}), one session per QSM grid ({', '.join(grids)}).\n"
            "Lesion instances and rim labels are in derivatives/lesions; the truth is kept outside this dataset.\n")


def _prepare(out_dir: Path, truth_dir: Path, overwrite: bool) -> None:
    for path in (out_dir, truth_dir):
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{path} is not empty (use --overwrite to replace a semi-real dataset)")
            for item in path.iterdir():
                if item.name == "head":  # the cached head registration stays valid
                    continue
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        path.mkdir(parents=True, exist_ok=True)


def _write_dataset_files(out_dir: Path, generated: list[dict], participants: list[dict], patients: list[int],
                         grids: list[str]) -> None:
    """The dataset-level files: descriptions (raw and the truth derivatives), participants table and README."""
    _write_json(out_dir / "dataset_description.json", {
        "Name": "qsmrim-synth semi-real MS dataset", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
        "License": "CC-BY-4.0 (derived from CC-BY lesion masks and the public QSM challenge data)",
        "GeneratedBy": generated,
        "ReferencesAndLinks": ["Lesjak et al. 2017, Neuroinformatics, doi:10.1007/s12021-017-9348-7",
                               "Langkammer et al. 2018, Magn Reson Med, doi:10.1002/mrm.26830"]})
    pd.DataFrame(participants).to_csv(out_dir / "participants.tsv", sep="\t", index=False)
    _write_json(out_dir / "participants.json", {
        "patient": {"Description": "Ljubljana patient whose lesion masks this participant carries"},
        "grids": {"Description": "QSM grids made for this patient, one session each (see sub-*_sessions.tsv)"},
        "split": {"Description": "train, or test for the held-out judging patients 15-20; sessions on the "
                                 "0.6x0.6x2 mm grid are held out as well (split column of sub-*_sessions.tsv)"},
        "flair_source": {"Description": "whose real FLAIR is the FLAIR background"},
        "group": {"Description": "diagnosis"}})
    (out_dir / "README").write_text(_readme(patients, grids))
    _write_json(out_dir / "derivatives" / DERIV_NAME / "dataset_description.json", {
        "Name": "Lesion instances and rim labels (semi-real ground truth)", "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative", "GeneratedBy": generated, "DatasetLinks": {"raw": "../../"}})


def generate_semireal(out_dir: Path, data_dir: Path, patients: list[int] | None = None,
                      grids: list[str] | None = None, seed: int = 0, truth_dir: Path | None = None,
                      overwrite: bool = False, head_cache: Path | None = None, family: str | None = None) -> Path:
    """Write the semi-real BIDS dataset to `out_dir`; return the truth directory.

    Each session depends only on (seed, patient, grid, family): selecting fewer patients or grids never
    changes the others. The head registration is cached in `head_cache` (default `<truth>/head/`; reused
    when it was made from the same data, so several cohorts can share it). `family` (families.py) picks a
    generator family; its grids are the default grids.
    """
    fam = get_family(family) if family else None
    patients = sorted(set(patients or PATIENTS))
    default_grids = list(fam.grids) if fam is not None and fam.randomised else [g for g in GRIDS if g in _PLAIN_GRIDS]
    grids = list(dict.fromkeys(grids or default_grids))
    if bad := [p for p in patients if p not in PATIENTS]:
        raise ValueError(f"patients must be within 1-20, got {bad}")
    if bad := [g for g in grids if g not in GRIDS]:
        raise ValueError(f"grids must be among {list(GRIDS)}, got {bad}")
    out_dir = Path(out_dir)
    truth_dir = Path(truth_dir) if truth_dir else out_dir.with_name(out_dir.name + "_truth")
    _prepare(out_dir, truth_dir, overwrite)
    head = load_head(data_dir, Path(head_cache) if head_cache else truth_dir / "head",
                     fam.background if fam is not None else "cosmos")
    _write_json(truth_dir / "head" / "head.json", {k: v for k, v in head.registration.items()})
    lesion_rows, session_rows, participants, transforms = [], [], [], {}
    for patient in patients:
        lesions = design_patient(data_dir, patient, seed, fam)
        sub = f"sub-{patient:02d}"
        participants.append({"participant_id": sub, "patient": f"patient{patient:02d}",
                             "grids": ",".join(grids), "split": split_of(patient, ""),
                             "flair_source": f"patient{lesions.flair_patient:02d}", "group": "MS"})
        sessions = []
        for grid in grids:
            res = simulate_session(head, lesions, grid, seed, fam)
            _write_session(out_dir, truth_dir, patient, grid, res, fam)
            ses = f"ses-{GRIDS[grid].session}"
            n_rim = sum(r["rim_positive"] for r in res.rows)
            LOGGER.info("%s %s (%s): %d lesions, %d rim+, %.1f s", sub, ses, grid, len(res.rows), n_rim, res.seconds)
            sessions.append({"session_id": ses, "grid": grid, "voxel_size_mm": "x".join(map(str, GRIDS[grid].voxel)),
                             "split": split_of(patient, grid)})
            session_rows.append({"participant_id": sub, "session_id": ses, "patient": patient, "grid": grid,
                                 "split": split_of(patient, grid), "n_lesions": len(res.rows), "n_rimplus": n_rim,
                                 "mirrored": int(res.geometry.mirrored), "seconds": round(res.seconds, 2),
                                 **_acquisition_row(fam, res)})
            for row in res.rows:
                lesion_rows.append({"participant_id": sub, "session_id": ses, "grid": grid, **row})
            g = res.geometry
            transforms.setdefault(sub, {})[ses] = {
                "flair_to_qsm_world": g.flair_to_qsm.tolist(), "flair_affine": g.flair_affine.tolist(),
                "qsm_affine": g.qsm_affine.tolist(), "head_to_qsm_world": g.head_to_scanner.tolist(),
                "head_to_cosmos_world": g.head_to_cosmos.tolist(), "mirrored": g.mirrored}
        pd.DataFrame(sessions).to_csv(out_dir / sub / f"{sub}_sessions.tsv", sep="\t", index=False)
    fam_text = f" family={fam.name}" if fam is not None else ""
    generated = [{"Name": "qsmrim-synth", "Version": __version__,
                  "Description": f"--semi-real seed={seed} patients={patients} grids={grids}{fam_text}"}]
    if fam is not None:
        _write_json(truth_dir / "family.json", fam.to_dict())
    _write_dataset_files(out_dir, generated, participants, patients, grids)
    write_truth(truth_dir, lesion_rows, ("sessions", session_rows), {
        "convention": ("flair_to_qsm_world is a 4x4 rigid matrix M with x_qsm = M @ [x_flair, 1] (RAS+ mm, NIfTI "
                       "world of each image); FLAIR voxel -> QSM voxel is inv(qsm_affine) @ M @ flair_affine. "
                       "head_to_qsm_world places the brain-centred head frame in the scanner; "
                       "head_to_cosmos_world maps it to the COSMOS map's world (a mirror when mirrored)."),
        "cosmos_to_mni_world": head.cosmos_to_mni.tolist(), "subjects": transforms})
    return truth_dir
