"""Real lesion shapes (Ljubljana masks, MNI grid) and the rim/confounder design drawn for each of them.

A lesion's biology (kind, rim thickness/amplitude/coverage/position, core susceptibility, FLAIR
contrast, an edge vein) depends only on (seed, patient, lesion), so the same patient made on several
grids shows the same lesions: like one patient scanned on several scanners. Whether a lesion is rim+
is decided afterwards on the simulated truth with the consensus rule (semireal.py), not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .anatomy import rng_for
from .semireal_head import FLAIR_PATIENTS, PATIENTS, Volume, lesion_instances

if TYPE_CHECKING:
    from .families import Family

#: Share of lesions (>= COUNTED_VOXELS in the 1 mm source) that get a paramagnetic rim around >= 80 % of
#: their edge; in Zhang et al. 2022 4.25 % of lesions were rim+, in other cohorts 5-10 %.
RIM_FRACTION = 0.05
#: Each confounder kind (short arc, edge vein, hyperintense core) gets the same share as true rims and is
#: drawn from the same size range, so lesion size alone does not tell rim+ from its look-alikes.
CONFOUNDER_FRACTION = 0.05
COUNTED_VOXELS = 12
#: Rims need room: chronic active lesions are rarely tiny, and the rule asks for >= 2 slices.
ELIGIBLE_VOLUME_MM3 = (80.0, 12000.0)
ELIGIBLE_HEIGHT_MM = 9.0
KINDS = ("plain", "rim", "arc", "vein", "hyper", "dia")
POSITIONS = ("inside", "on", "outside")


@dataclass(frozen=True)
class LesionDesign:
    """What one real lesion becomes (susceptibilities in ppm, lengths in mm of the source frame)."""

    source_id: int  # instance label in the patient's MNI instance map
    kind: str
    volume_mm3: float
    height_mm: float
    centroid_mni: tuple[float, float, float]
    chi_core: float  # offset of the core from the local reference tissue
    chi_hyper: float  # extra, centrally weighted core susceptibility (kind "hyper")
    flair_contrast: float  # lesion / local white matter on FLAIR
    rim_chi: float
    rim_thickness: float
    rim_coverage: float  # designed share of the edge (azimuth) covered
    rim_position: str  # inside | on | outside the lesion edge
    rim_azimuth: float  # radians, centre of the covered arc
    vein_point_mni: tuple[float, float, float] | None
    vein_direction_mni: tuple[float, float, float] | None
    vein_radius: float
    vein_length: float
    vein_chi: float
    rim_modulation: float = 0.0  # depth of a cosine modulation of the rim along the edge (families)
    rim_modulation_cycles: int = 1
    rim_modulation_phase: float = 0.0

    @property
    def has_rim_source(self) -> bool:
        return self.kind in ("rim", "arc")


@dataclass(frozen=True)
class PatientLesions:
    """A patient's instances in MNI space with the fields every grid samples from."""

    patient: int
    labels: Volume  # int32 instances
    sdf_mm: Volume  # float32 signed distance to the union of lesions, negative inside
    nearest: Volume  # int32: label of the nearest lesion voxel (for attributing a rim to its lesion)
    designs: dict[int, LesionDesign]
    flair_patient: int  # whose FLAIR is the background of this patient


def flair_source_for(patient: int) -> int:
    """Patients alternate between the two real FLAIRs (07 and 19): two anatomies' worth of FLAIR texture."""
    return FLAIR_PATIENTS[patient % len(FLAIR_PATIENTS)]


def _geometry(labels: np.ndarray, affine: np.ndarray) -> dict[int, tuple[float, float, np.ndarray, tuple]]:
    """Per label: volume (mm3), height along the MNI superior axis (mm), centroid (world) and bbox."""
    voxel = float(abs(np.linalg.det(affine[:3, :3])))
    out = {}
    for label, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels[sl] == label
        idx = np.argwhere(mask) + [s.start for s in sl]
        centroid = (affine @ np.r_[idx.mean(axis=0), 1.0])[:3]
        height = float(np.ptp(idx[:, 2]) + 1) * float(np.linalg.norm(affine[:3, 2]))
        out[label] = (float(mask.sum()) * voxel, height, centroid, sl)
    return out


def is_eligible(volume: float, height: float, eligible_volume: tuple[float, float] = ELIGIBLE_VOLUME_MM3,
                eligible_height: float = ELIGIBLE_HEIGHT_MM) -> bool:
    """Whether a lesion (volume in mm3, height in mm) may get a rim or a confounder."""
    return eligible_volume[0] <= volume <= eligible_volume[1] and height >= eligible_height


def _rates(data_dir, rim_fraction: float = RIM_FRACTION, confounder_fraction: float = CONFOUNDER_FRACTION,
           eligible_volume: tuple[float, float] = ELIGIBLE_VOLUME_MM3, eligible_height: float = ELIGIBLE_HEIGHT_MM
           ) -> tuple[float, float]:
    """Per eligible lesion probabilities of a rim and of each confounder so the cohort's shares are met."""
    counted = eligible = 0
    for p in PATIENTS:
        geo = _geometry(lesion_instances(data_dir, p).data, np.eye(4))
        for volume, height, _, _ in geo.values():
            counted += volume >= COUNTED_VOXELS
            eligible += is_eligible(volume, height, eligible_volume, eligible_height)
    return min(0.24, rim_fraction * counted / eligible), min(0.24, confounder_fraction * counted / eligible)


_RATE_CACHE: dict[tuple, tuple[float, float]] = {}


def cohort_rates(data_dir, rim_fraction: float = RIM_FRACTION, confounder_fraction: float = CONFOUNDER_FRACTION,
                 eligible_volume: tuple[float, float] = ELIGIBLE_VOLUME_MM3,
                 eligible_height: float = ELIGIBLE_HEIGHT_MM) -> tuple[float, float]:
    key = (str(data_dir), rim_fraction, confounder_fraction, tuple(eligible_volume), eligible_height)
    if key not in _RATE_CACHE:
        _RATE_CACHE[key] = _rates(data_dir, rim_fraction, confounder_fraction, tuple(eligible_volume), eligible_height)
    return _RATE_CACHE[key]


def _edge_vein(rng: np.random.Generator, labels: np.ndarray, label: int, sl: tuple, affine: np.ndarray,
               radius: float) -> tuple[tuple, tuple]:
    """A straight vein tangent to the lesion surface at a random edge voxel, just outside it."""
    box = tuple(slice(max(s.start - 3, 0), min(s.stop + 3, n)) for s, n in zip(sl, labels.shape))
    mask = labels[box] == label
    sdf = np.where(mask, -(ndimage.distance_transform_edt(mask) - 0.5),
                   ndimage.distance_transform_edt(~mask) - 0.5)
    edge = np.argwhere(mask & (sdf > -1.0))
    point = edge[rng.integers(len(edge))]
    grad = np.array([g[tuple(point)] for g in np.gradient(sdf)])
    norm = float(np.linalg.norm(grad))
    normal = grad / norm if norm > 0 else np.array([1.0, 0.0, 0.0])
    direction = np.cross(normal, rng.normal(size=3))
    direction /= np.linalg.norm(direction) + 1e-9
    origin = np.array([b.start for b in box])
    world = (affine @ np.r_[origin + point + normal * (0.5 + radius), 1.0])[:3]
    world_dir = affine[:3, :3] @ direction
    return tuple(world.tolist()), tuple((world_dir / np.linalg.norm(world_dir)).tolist())


def _draw_kind(u: float, volume: float, height: float, rim_rate: float, confounder_rate: float,
               kinds: tuple[str, ...], eligible_volume: tuple[float, float] = ELIGIBLE_VOLUME_MM3,
               eligible_height: float = ELIGIBLE_HEIGHT_MM) -> str:
    """A lesion's kind from one uniform draw `u`: rim, one of the confounder `kinds` or plain; lesions
    outside the eligible volume and height are plain (the draw is still made, so others do not shift)."""
    if not is_eligible(volume, height, eligible_volume, eligible_height):
        return "plain"
    if u < rim_rate:
        return "rim"
    if u < rim_rate + len(kinds) * confounder_rate:
        return kinds[min(len(kinds) - 1, int((u - rim_rate) / confounder_rate))]
    return "plain"


def lesion_designs(data_dir, patient: int, seed: int, labels: Volume | None = None,
                   family: "Family | None" = None) -> dict[int, LesionDesign]:
    """The drawn design of every lesion of one patient (cheap: no distance fields of the whole grid).

    Without a family (or with `semireal`) the draws are those of the generator before families existed,
    bit for bit; a randomised family draws its ranges, the extra quantities from a stream of their own.
    """
    if family is not None and not family.randomised:
        family = None
    if family is not None:
        return _family_designs(data_dir, patient, seed, labels, family)
    inst = labels if labels is not None else lesion_instances(data_dir, patient)
    rim_rate, confounder_rate = cohort_rates(data_dir)
    rng = rng_for(seed, patient, 100)
    designs = {}
    for label, (volume, height, centroid, sl) in _geometry(inst.data, inst.affine).items():
        kind = _draw_kind(rng.random(), volume, height, rim_rate, confounder_rate, KINDS[2:5])
        # Every draw happens for every lesion, so a kind change never shifts the other lesions' values.
        full_ring = rng.random() < 0.5
        draws = dict(chi_core=float(rng.uniform(-0.004, 0.012)), chi_hyper=float(rng.uniform(0.02, 0.045)),
                     flair_contrast=float(rng.uniform(1.35, 1.9)), rim_chi=float(rng.uniform(0.02, 0.06)),
                     rim_thickness=float(rng.uniform(0.6, 2.0)),
                     rim_coverage=1.0 if full_ring else float(rng.uniform(0.8, 1.0)),
                     arc_coverage=float(rng.uniform(0.15, 0.5)),
                     rim_position=POSITIONS[int(rng.integers(3))], rim_azimuth=float(rng.uniform(-np.pi, np.pi)),
                     vein_radius=float(rng.uniform(0.35, 0.7)), vein_length=float(rng.uniform(12.0, 24.0)),
                     vein_chi=float(rng.uniform(0.25, 0.45)))
        point = direction = None
        if kind == "vein":
            point, direction = _edge_vein(rng_for(seed, patient, 10_000 + label), inst.data, label, sl,
                                          inst.affine, draws["vein_radius"])
        designs[label] = LesionDesign(
            source_id=label, kind=kind, volume_mm3=volume, height_mm=height,
            centroid_mni=tuple(float(c) for c in centroid), chi_core=draws["chi_core"],
            chi_hyper=draws["chi_hyper"] if kind == "hyper" else 0.0, flair_contrast=draws["flair_contrast"],
            rim_chi=draws["rim_chi"] if kind in ("rim", "arc") else 0.0, rim_thickness=draws["rim_thickness"],
            rim_coverage=draws["rim_coverage"] if kind == "rim" else (draws["arc_coverage"] if kind == "arc" else 0.0),
            rim_position=draws["rim_position"], rim_azimuth=draws["rim_azimuth"],
            vein_point_mni=point, vein_direction_mni=direction, vein_radius=draws["vein_radius"],
            vein_length=draws["vein_length"], vein_chi=draws["vein_chi"] if kind == "vein" else 0.0)
    return designs


def _u(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def _family_designs(data_dir, patient: int, seed: int, labels: Volume | None, family) -> dict[int, LesionDesign]:
    """A randomised family's designs: every range from `family`, every draw made for every lesion."""
    inst = labels if labels is not None else lesion_instances(data_dir, patient)
    # Up to 45 % of the eligible lesions get a rim, the confounder kinds share the rest: enough rim+
    # lesions per generated head to train on (the prevalence of a cohort is not what a family is about).
    rim_rate, confounder_rate = cohort_rates(data_dir, family.rim_fraction, family.confounder_fraction,
                                             family.eligible_volume_mm3, family.eligible_height_mm)
    rim_rate = min(0.45, rim_rate * 0.45 / 0.24) if rim_rate >= 0.24 else rim_rate
    confounder_rate = min(confounder_rate, (1.0 - rim_rate) / max(1, len(family.confounders)))
    rng = rng_for(seed, patient, 100 + zlib_crc(family.name))
    weights = np.asarray(family.position_weights, float)
    weights = weights / weights.sum()
    kinds = tuple(family.confounders)
    designs = {}
    for label, (volume, height, centroid, sl) in _geometry(inst.data, inst.affine).items():
        kind = _draw_kind(rng.random(), volume, height, rim_rate, confounder_rate, kinds,
                          family.eligible_volume_mm3, family.eligible_height_mm)
        full_ring = rng.random() < family.full_ring_share
        d = dict(chi_core=_u(rng, family.core_chi), chi_hyper=_u(rng, family.hyper_chi),
                 chi_dia=_u(rng, family.dia_chi), rim_hyper=bool(rng.random() < family.rim_core_hyper_share),
                 flair_contrast=_u(rng, family.flair_contrast), rim_chi=_u(rng, family.rim_chi),
                 rim_thickness=_u(rng, family.rim_thickness),
                 rim_coverage=1.0 if full_ring else min(1.0, _u(rng, family.rim_coverage)),
                 arc_coverage=_u(rng, family.arc_coverage),
                 rim_position=POSITIONS[int(rng.choice(3, p=weights))], rim_azimuth=float(rng.uniform(-np.pi, np.pi)),
                 vein_radius=_u(rng, family.vein_radius), vein_length=float(rng.uniform(12.0, 24.0)),
                 vein_chi=_u(rng, family.vein_chi), vein_offset=_u(rng, family.vein_offset),
                 modulation=_u(rng, family.rim_modulation), cycles=int(rng.integers(1, 4)),
                 phase=float(rng.uniform(-np.pi, np.pi)))
        point = direction = None
        if kind == "vein":
            # the axis sits (0.5 + radius) mm outside the edge; an offset moves it in (touching, crossing)
            point, direction = _edge_vein(rng_for(seed, patient, 10_000 + label), inst.data, label, sl,
                                          inst.affine, d["vein_radius"] - d["vein_offset"])
        hyper = {"hyper": d["chi_hyper"], "dia": d["chi_dia"]}.get(kind, 0.0)
        if kind == "rim" and d["rim_hyper"]:
            hyper = d["chi_hyper"]
        designs[label] = LesionDesign(
            source_id=label, kind=kind, volume_mm3=volume, height_mm=height,
            centroid_mni=tuple(float(c) for c in centroid), chi_core=d["chi_core"], chi_hyper=hyper,
            flair_contrast=d["flair_contrast"],
            rim_chi=d["rim_chi"] if kind in ("rim", "arc") else 0.0, rim_thickness=d["rim_thickness"],
            rim_coverage=d["rim_coverage"] if kind == "rim" else (d["arc_coverage"] if kind == "arc" else 0.0),
            rim_position=d["rim_position"], rim_azimuth=d["rim_azimuth"],
            vein_point_mni=point, vein_direction_mni=direction, vein_radius=d["vein_radius"],
            vein_length=d["vein_length"], vein_chi=d["vein_chi"] if kind == "vein" else 0.0,
            rim_modulation=d["modulation"], rim_modulation_cycles=d["cycles"], rim_modulation_phase=d["phase"])
    return designs


def zlib_crc(text: str) -> int:
    """A stable small integer per name (Python's hash() is salted per process)."""
    import zlib

    return zlib.crc32(text.encode()) % 100_000


def design_patient(data_dir, patient: int, seed: int, family: "Family | None" = None) -> PatientLesions:
    """Instances, distance fields and the drawn design of every lesion of one patient."""
    inst = lesion_instances(data_dir, patient)
    labels = inst.data
    inside = labels > 0
    d_out, nearest_idx = ndimage.distance_transform_edt(~inside, return_indices=True)
    d_in = ndimage.distance_transform_edt(inside)
    sdf = np.where(inside, -(d_in - 0.5), d_out - 0.5).astype(np.float32)
    nearest = labels[tuple(nearest_idx)].astype(np.int32)
    del nearest_idx, d_out, d_in
    return PatientLesions(patient, inst, Volume(sdf, inst.affine), Volume(nearest, inst.affine),
                          lesion_designs(data_dir, patient, seed, inst, family), flair_source_for(patient))


def rim_band(sdf: np.ndarray, design: LesionDesign, h: float) -> np.ndarray:
    """Share of a voxel of size ~h (mm) inside the rim shell [s0, s0 + thickness] of signed distance."""
    t = design.rim_thickness
    s0 = {"inside": -t, "on": -t / 2.0, "outside": 0.0}[design.rim_position]
    lo, hi = np.maximum(sdf - h / 2.0, s0), np.minimum(sdf + h / 2.0, s0 + t)
    return np.clip((hi - lo) / h, 0.0, 1.0).astype(np.float32)


def in_arc(normal_azimuth: np.ndarray, design: LesionDesign) -> np.ndarray:
    """Voxels whose outward edge normal points (in the head's axial plane) into the covered arc.

    Using the local surface normal, not the angle around the centroid, makes a designed coverage c cover
    a share c of the edge of every cross-section, also of tilted or curved lesions.
    """
    if design.rim_coverage >= 1.0:
        return np.ones(normal_azimuth.shape, bool)
    delta = np.angle(np.exp(1j * (normal_azimuth - design.rim_azimuth)))
    return np.abs(delta) <= np.pi * design.rim_coverage


def rim_modulation(normal_azimuth: np.ndarray, design: LesionDesign) -> np.ndarray:
    """Rim strength along the edge: 1 + m cos(n (azimuth - phase)), never negative (patchy real rims)."""
    if design.rim_modulation <= 0.0:
        return np.ones(normal_azimuth.shape, np.float32)
    wave = np.cos(design.rim_modulation_cycles * (normal_azimuth - design.rim_modulation_phase))
    return np.clip(1.0 + design.rim_modulation * wave, 0.0, None).astype(np.float32)
