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


def _eligible_candidates(data_dir: str, patient: str, voxel_mm3: float,
                         min_volume_mm3: float) -> list[tuple[str, int, np.ndarray]]:
    """One patient's lesions as (patient, component, voxels), those too small in the head left out (they
    could never reach 10 QSM voxels, so they are not worth trying)."""
    return [(patient, comp, vox) for comp, vox in patient_components(data_dir, patient)
            if len(vox) * voxel_mm3 >= min_volume_mm3]


class _Placer:
    """The growing placement (MNI instance map, lesions, rejection counts, near-bleed lesions still owed)
    and the rules a candidate must pass; every draw goes to the one placement generator, in candidate order."""

    def __init__(self, rng: np.random.Generator, bg: Background, to_head: np.ndarray, shape: tuple[int, int, int],
                 in_slab: Callable[[np.ndarray], bool], n_near_bleed: int,
                 grid_voxels: Callable[[np.ndarray], int] | None, min_grid_voxels: int) -> None:
        self.rng, self.bg, self.to_head, self.shape, self.in_slab = rng, bg, to_head, shape, in_slab
        self.grid_voxels, self.min_grid_voxels = grid_voxels, min_grid_voxels
        self.instance = np.zeros(shape, dtype=np.int32)
        self.lesions: list[Lesion] = []
        self.rejected: dict[str, int] = {}
        self.bleed_targets = _bleed_targets(bg, in_slab) if (n_near_bleed and bg.bleed is not None) else None
        self.near_left = n_near_bleed if self.bleed_targets is not None and len(self.bleed_targets) else 0
        self.struct = np.ones((3, 3, 3), dtype=bool)

    def place_batch(self, batch: list[tuple[str, int, np.ndarray]], target: int) -> None:
        """Try the candidates in turn until ``target`` lesions are placed."""
        for patient, comp, voxels in batch:
            if len(self.lesions) >= target:
                break
            self._place_one(patient, comp, voxels)

    def _place_one(self, patient: str, comp: int, voxels: np.ndarray) -> None:
        """Accept the candidate at its first passing shift, or count why its last shift failed."""
        near = self.near_left > 0
        why = "none"
        for shift in self._shifts(voxels, near):
            why, moved, partner = self._fit(voxels + shift, near)
            if why != "ok":
                continue
            self._accept(patient, comp, moved, shift, partner, near)
            break
        if why != "ok":
            self.rejected[why] = self.rejected.get(why, 0) + 1

    def _shifts(self, voxels: np.ndarray, near: bool) -> list[np.ndarray]:
        """Four MNI shifts to try: around a drawn bleed-side target for a near-haemorrhage lesion, else none
        first and then three random ones (<= 5 voxels)."""
        if near:
            target_head = self.bleed_targets[self.rng.integers(len(self.bleed_targets))]
            target_vox = apply(np.linalg.inv(self.to_head), target_head[None])[0]
            return [np.round(target_vox - voxels.mean(axis=0)).astype(int) + self.rng.integers(-2, 3, 3)
                    for _ in range(4)]
        return [np.zeros(3, int)] + [self.rng.integers(-5, 6, 3) for _ in range(3)]

    def _fit(self, moved: np.ndarray, near: bool) -> tuple[str, np.ndarray, int | None]:
        """Why the shifted candidate fails, or 'ok' with its voxels (trimmed if confluent) and partner id."""
        if moved.min() < 1 or np.any(moved.max(axis=0) >= np.array(self.shape) - 1):
            return "outside_mni", moved, None
        why = _tissue_check(self.bg, apply(self.to_head, moved.astype(float)), self.in_slab, near) or "ok"
        if why != "ok":
            return why, moved, None
        why, moved, partner = self._confluence(moved)
        if why != "ok":
            return why, moved, None
        if self.grid_voxels is not None and self.grid_voxels(moved) < self.min_grid_voxels:
            return "under_10_qsm_voxels", moved, None
        return "ok", moved, partner

    def _confluence(self, moved: np.ndarray) -> tuple[str, np.ndarray, int | None]:
        """A candidate touching no placed lesion passes as is; touching exactly one unpaired lesion with small
        overlap it becomes its confluent partner with probability 0.5 (overlap trimmed), else 'overlap'."""
        lo, hi = moved.min(axis=0) - 1, moved.max(axis=0) + 2
        crop = self.instance[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        own = np.zeros(crop.shape, dtype=bool)
        own[tuple((moved - lo).T)] = True
        touching = np.unique(crop[ndimage.binary_dilation(own, self.struct)])
        touching = touching[touching > 0]
        if not touching.size:
            return "ok", moved, None
        other = self.lesions[int(touching[0]) - 1]
        overlap = int(np.count_nonzero(crop[own]))
        if (touching.size > 1 or other.partner is not None
                or overlap > 0.3 * min(len(moved), len(other.voxels))
                or self.rng.random() >= CONFLUENT_KEEP_PROBABILITY):
            return "overlap", moved, None
        moved = moved[crop[tuple((moved - lo).T)] == 0]
        if len(moved) < MIN_MNI_VOXELS:
            return "overlap", moved, None
        return "ok", moved, other.lesion_id

    def _accept(self, patient: str, comp: int, moved: np.ndarray, shift: np.ndarray, partner: int | None,
                near: bool) -> None:
        """Write the lesion into the instance map and the list, pairing it with its confluent partner."""
        lesion_id = len(self.lesions) + 1
        self.instance[tuple(moved.T)] = lesion_id
        lesion = Lesion(lesion_id, patient, comp, moved.astype(np.int32), tuple(int(s) for s in shift),
                        partner=partner, near_bleed=near)
        if partner is not None:
            self.lesions[partner - 1].partner = lesion_id
        self.lesions.append(lesion)
        if near:
            self.near_left -= 1


def place_lesions(rng: np.random.Generator, data_dir: str, bg: Background, mni_to_head: np.ndarray,
                  target: int, n_near_bleed: int, in_slab: Callable[[np.ndarray], bool],
                  min_volume_mm3: float = 0.0, grid_voxels: Callable[[np.ndarray], int] | None = None,
                  min_grid_voxels: int = 10, min_count: int = 0) -> Placement:
    """Draw and place about ``target`` lesions (see the module docstring for the rules); candidates
    smaller than ``min_volume_mm3`` in the head are skipped, and those that ``grid_voxels`` (the voxel count
    of a lesion's mask on the QSM grid, as rendered) puts under ``min_grid_voxels`` are rejected. When the
    first draw of patients leaves fewer than ``min_count`` lesions, further patients are drawn one by one."""
    shape, mni_affine = mni_grid(data_dir)
    to_head = mni_to_head @ mni_affine
    voxel_mm3 = abs(float(np.linalg.det(to_head[:3, :3])))
    order = list(rng.permutation(len(PATIENTS)))
    candidates: list[tuple[str, int, np.ndarray]] = []
    patients: list[str] = []
    while order and len(candidates) < 2 * target:
        patient = PATIENTS[order.pop(0)]
        patients.append(patient)
        candidates += _eligible_candidates(data_dir, patient, voxel_mm3, min_volume_mm3)
    batch = [candidates[i] for i in rng.permutation(len(candidates))]

    placer = _Placer(rng, bg, to_head, shape, in_slab, n_near_bleed, grid_voxels, min_grid_voxels)
    n_candidates = len(batch)
    placer.place_batch(batch, target)
    while len(placer.lesions) < min_count and order:
        # Short of the family's minimum (tissue ran out): one more patient's lesions, shuffled.
        patient = PATIENTS[order.pop(0)]
        patients.append(patient)
        extra = _eligible_candidates(data_dir, patient, voxel_mm3, min_volume_mm3)
        batch = [extra[i] for i in rng.permutation(len(extra))]
        n_candidates += len(batch)
        placer.place_batch(batch, target)
    return Placement(placer.lesions, placer.instance, mni_affine, patients, n_candidates, placer.rejected)


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
