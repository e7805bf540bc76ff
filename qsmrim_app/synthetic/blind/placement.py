"""Carrying real Ljubljana MS lesion masks into a background's white matter.

Lesions are the 26-connected components (>= ``MIN_MNI_VOXELS`` at 1 mm) of the patients' consensus
masks in MNI space. A participant draws source patients in random order until it has about twice its
target count of candidates, shuffles them and accepts each one whose voxels, carried into the head by the
participant's MNI->head affine, lie in the brain (>= 2 mm from its edge), in white-matter-like tissue
(mean likeness >= 0.45), with >= 10 voxels on the QSM grid as rendered (after the slice profile and
partial volume; candidates under 14 voxel volumes are not even tried), outside iron-rich deep grey matter, >= 3 mm from a haemorrhage and inside the QSM
slab; a rejected candidate is tried again at up to three integer shifts (<= 5 mm) in MNI space. Lesions
live in one MNI-space instance map (int32); a candidate that touches exactly one placed, unpaired lesion
(overlap <= 30 % of the smaller) becomes a confluent pair with probability 0.5, else it is dropped.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from scipy import ndimage

from .backgrounds import Background
from .geometry import apply, sample

PATIENTS = tuple(f"patient{i:02d}" for i in range(1, 21))
GOLD = "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz"
MIN_MNI_VOXELS = 30
CONFLUENT_KEEP_PROBABILITY = 0.5


@dataclass
class Lesion:
    """One placed lesion instance: its voxels in MNI space (1 mm indices) and where it came from."""

    lesion_id: int
    patient: str
    component: int
    voxels: np.ndarray          # (N, 3) int MNI voxel indices (after any shift)
    shift_vox: tuple[int, int, int]
    partner: int | None = None  # confluent partner's id
    near_bleed: bool = False
    params: dict = field(default_factory=dict)

    @property
    def centroid_mni_vox(self) -> np.ndarray:
        return self.voxels.mean(axis=0)


@functools.lru_cache(maxsize=24)
def patient_components(data_dir: str, patient: str) -> tuple[tuple[int, np.ndarray], ...]:
    """(component number, voxel indices) of one patient's lesions >= MIN_MNI_VOXELS, scan order."""
    img = nib.load(str(Path(data_dir) / "open_ms_data" / patient / GOLD))
    mask = np.asarray(img.dataobj) > 0
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    objects = ndimage.find_objects(labels)
    out = []
    for i, sl in enumerate(objects, start=1):
        local = np.argwhere(labels[sl] == i)
        if len(local) >= MIN_MNI_VOXELS:
            out.append((i, (local + [s.start for s in sl]).astype(np.int32)))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def mni_grid(data_dir: str) -> tuple[tuple[int, int, int], np.ndarray]:
    img = nib.load(str(Path(data_dir) / "open_ms_data" / PATIENTS[0] / GOLD))
    return tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, dtype=float)


@dataclass
class Placement:
    """The participant's lesions and the MNI-space instance map they were drawn into."""

    lesions: list[Lesion]
    instance_map: np.ndarray   # int32 on the MNI grid
    mni_affine: np.ndarray
    patients: list[str]
    candidates: int
    rejected: dict[str, int]


def _tissue_check(bg: Background, head_pts: np.ndarray, in_slab: Callable[[np.ndarray], bool],
                  near_bleed: bool) -> str | None:
    """Why these head-frame points are not acceptable lesion tissue, or None."""
    vox = apply(bg.vox_from_head, head_pts)
    edge = sample(bg.edge_distance_mm, vox)
    if edge.min() < 2.0:
        return "brain_edge"
    if not in_slab(head_pts):
        return "slab"
    if bg.bleed_distance_mm is not None and sample(bg.bleed_distance_mm, vox, cval=99.0).min() < (1.5 if near_bleed else 3.0):
        return "haemorrhage"
    if sample(bg.deep_gm, vox).mean() > 0.3:
        return "deep_grey"
    if sample(bg.wm, vox).mean() < (0.3 if near_bleed else 0.45):
        return "not_white_matter"
    return None


def place_lesions(rng: np.random.Generator, data_dir: str, bg: Background, mni_to_head: np.ndarray,
                  target: int, n_near_bleed: int, in_slab: Callable[[np.ndarray], bool],
                  min_volume_mm3: float = 0.0, grid_voxels: Callable[[np.ndarray], int] | None = None,
                  min_grid_voxels: int = 10) -> Placement:
    """Draw and place about ``target`` lesions (see the module docstring for the rules); candidates
    smaller than ``min_volume_mm3`` in the head are skipped, and those that ``grid_voxels`` (the voxel count
    of a lesion's mask on the QSM grid, as rendered) puts under ``min_grid_voxels`` are rejected."""
    shape, mni_affine = mni_grid(data_dir)
    to_head = mni_to_head @ mni_affine
    voxel_mm3 = abs(float(np.linalg.det(to_head[:3, :3])))
    order = list(rng.permutation(len(PATIENTS)))
    candidates: list[tuple[str, int, np.ndarray]] = []
    patients: list[str] = []
    while order and len(candidates) < 2 * target:
        patient = PATIENTS[order.pop(0)]
        patients.append(patient)
        candidates += [(patient, comp, vox) for comp, vox in patient_components(data_dir, patient)
                       if len(vox) * voxel_mm3 >= min_volume_mm3]
    candidates = [candidates[i] for i in rng.permutation(len(candidates))]

    instance = np.zeros(shape, dtype=np.int32)
    lesions: list[Lesion] = []
    rejected: dict[str, int] = {}
    bleed_targets = _bleed_targets(bg, in_slab) if (n_near_bleed and bg.bleed is not None) else None
    near_left = n_near_bleed if bleed_targets is not None and len(bleed_targets) else 0
    struct = np.ones((3, 3, 3), dtype=bool)

    for patient, comp, voxels in candidates:
        if len(lesions) >= target:
            break
        near = near_left > 0
        if near:
            target_head = bleed_targets[rng.integers(len(bleed_targets))]
            target_vox = apply(np.linalg.inv(to_head), target_head[None])[0]
            shifts = [np.round(target_vox - voxels.mean(axis=0)).astype(int) + rng.integers(-2, 3, 3)
                      for _ in range(4)]
        else:
            shifts = [np.zeros(3, int)] + [rng.integers(-5, 6, 3) for _ in range(3)]
        why = "none"
        for shift in shifts:
            moved = voxels + shift
            if moved.min() < 1 or np.any(moved.max(axis=0) >= np.array(shape) - 1):
                why = "outside_mni"
                continue
            why = _tissue_check(bg, apply(to_head, moved.astype(float)), in_slab, near) or "ok"
            if why != "ok":
                continue
            lo, hi = moved.min(axis=0) - 1, moved.max(axis=0) + 2
            crop = instance[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            own = np.zeros(crop.shape, dtype=bool)
            own[tuple((moved - lo).T)] = True
            touching = np.unique(crop[ndimage.binary_dilation(own, struct)])
            touching = touching[touching > 0]
            partner = None
            if touching.size:
                other = lesions[int(touching[0]) - 1]
                overlap = int(np.count_nonzero(crop[own]))
                if (touching.size > 1 or other.partner is not None
                        or overlap > 0.3 * min(len(moved), len(other.voxels))
                        or rng.random() >= CONFLUENT_KEEP_PROBABILITY):
                    why = "overlap"
                    continue
                keep = crop[tuple((moved - lo).T)] == 0
                moved = moved[keep]
                if len(moved) < MIN_MNI_VOXELS:
                    why = "overlap"
                    continue
                partner = other.lesion_id
            if grid_voxels is not None and grid_voxels(moved) < min_grid_voxels:
                why = "under_10_qsm_voxels"
                continue
            lesion_id = len(lesions) + 1
            instance[tuple(moved.T)] = lesion_id
            lesion = Lesion(lesion_id, patient, comp, moved.astype(np.int32), tuple(int(s) for s in shift),
                            partner=partner, near_bleed=near)
            if partner is not None:
                lesions[partner - 1].partner = lesion_id
            lesions.append(lesion)
            if near:
                near_left -= 1
            break
        if why != "ok":
            rejected[why] = rejected.get(why, 0) + 1
    return Placement(lesions, instance, mni_affine, patients, len(candidates), rejected)


def _bleed_targets(bg: Background, in_slab: Callable[[np.ndarray], bool]) -> np.ndarray:
    """Head positions 4-9 mm from the bleed in white-matter-like brain: where 'near haemorrhage'
    lesions are centred."""
    ok = ((bg.bleed_distance_mm >= 4.0) & (bg.bleed_distance_mm <= 9.0) & (bg.wm > 0.3)
          & (bg.edge_distance_mm > 6.0))
    pts = apply(bg.head_from_vox, np.argwhere(ok).astype(float))
    if len(pts) == 0:
        return pts
    inside = np.array([in_slab(p[None]) for p in pts[:: max(1, len(pts) // 400)]])
    return pts[:: max(1, len(pts) // 400)][inside]
