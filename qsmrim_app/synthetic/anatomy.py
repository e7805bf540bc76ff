"""A subject's anatomy and lesions as continuous shapes in a head frame (mm).

The head frame is RAS-like (x left-right, y posterior-anterior, z inferior-superior) centred on the
brain. Nothing here knows about voxels: `render.py` samples these shapes into any grid, so the QSM
and FLAIR grids of one subject show the same anatomy at different resolutions and orientations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

RIM_MINUS_KINDS: tuple[str, ...] = ("iso", "hypo", "hyper", "vein-confounder", "homogeneous-hyper")
RIM_MINUS_WEIGHTS: tuple[float, ...] = (0.35, 0.2, 0.25, 0.1, 0.1)


@dataclass(frozen=True)
class SizeSpec:
    """Everything that differs between the fast test phantom and the benchmark phantom."""

    qsm_shape: tuple[int, int, int]
    qsm_voxel: tuple[float, float, float]
    flair_shape: tuple[int, int, int]  # sagittal array order: (A-P, S-I, L-R)
    flair_voxel: float
    brain_radii: tuple[float, float, float]  # x, y, z semi-axes in mm
    n_lesions: tuple[int, int]  # inclusive range
    lesion_volume_mm3: tuple[float, float, float]  # median, min, max
    n_medullary_veins: int


SIZES: dict[str, SizeSpec] = {
    "small": SizeSpec((96, 96, 48), (1.6, 1.6, 2.6), (144, 120, 120), 1.2, (54.0, 64.0, 46.0), (6, 15),
                      (450.0, 110.0, 8000.0), 14),
    "full": SizeSpec((256, 256, 56), (0.75, 0.75, 3.0), (256, 256, 176), 1.0, (66.0, 80.0, 56.0), (50, 80),
                     (120.0, 40.0, 3400.0), 40),
}

# Zero-inflated negative binomial for rim+ counts: most patients have none, a few have many
# (Zhang et al. 2022: 4.25 % of lesions rim+, concentrated in a minority of patients).
CLINICAL_RIMPLUS_FRACTION = 0.0425
ZERO_INFLATION = 0.3
NB_DISPERSION = 0.8


def rng_for(seed: int, subject_index: int, stream: int) -> np.random.Generator:
    """Independent, reproducible stream per subject and purpose (counts, anatomy, session k)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(subject_index), int(stream)]))


def draw_counts(rng: np.random.Generator, spec: SizeSpec, rimplus_fraction: float) -> tuple[int, int]:
    """(n_lesions, n_rimplus) of one subject.

    Up to the clinical rate, rim+ counts follow the skewed zero-inflated negative binomial (most subjects
    none). A higher `rimplus_fraction` asks for an enriched dataset (demos, training): each subject gets
    the excess share of its remaining lesions, randomly rounded to a whole count, so rim+ lesions spread
    over every subject instead of piling into the few the skewed draw favours. At or below the clinical
    rate the draws are exactly those of the skewed model alone.
    """
    n_lesions = int(rng.integers(spec.n_lesions[0], spec.n_lesions[1] + 1))
    clinical = min(rimplus_fraction, CLINICAL_RIMPLUS_FRACTION)
    mean = clinical * n_lesions / (1.0 - ZERO_INFLATION)
    lam = rng.gamma(NB_DISPERSION, mean / NB_DISPERSION) if mean > 0 else 0.0
    n_rim = int(rng.poisson(lam))
    if rng.random() < ZERO_INFLATION:
        n_rim = 0
    n_rim = min(n_rim, n_lesions)
    if rimplus_fraction > clinical:  # E[n_rim] = clinical * n + (n - clinical * n) * excess = fraction * n
        excess = (rimplus_fraction - clinical) / (1.0 - clinical)
        n_rim += int(np.floor(excess * (n_lesions - n_rim) + rng.random()))
    return n_lesions, n_rim


def sample_lesion_counts(n_subjects: int, seed: int = 0, size: str = "small",
                         rimplus_fraction: float = 0.0425) -> list[tuple[int, int]]:
    """The counts `generate_dataset` draws for each subject, without building any image."""
    spec = SIZES[size]
    return [draw_counts(rng_for(seed, i, 0), spec, rimplus_fraction) for i in range(n_subjects)]


def random_rotation(rng: np.random.Generator, max_deg: tuple[float, float, float]) -> np.ndarray:
    """Small rotation with independent uniform angles about x, y, z."""
    angles = [rng.uniform(-m, m) for m in max_deg]
    return Rotation.from_euler("xyz", angles, degrees=True).as_matrix()


@dataclass(frozen=True)
class Ellipsoid:
    center: np.ndarray  # (3,) mm
    radii: np.ndarray  # (3,) mm
    rotation: np.ndarray  # (3, 3) columns are the ellipsoid axes

    def q(self, pts: np.ndarray) -> np.ndarray:
        """Normalised radius (<1 inside) of points shaped (3, ...)."""
        d = pts - self.center.reshape((3,) + (1,) * (pts.ndim - 1)).astype(pts.dtype)
        local = np.tensordot(self.rotation.T.astype(pts.dtype), d, axes=1)
        r = self.radii.reshape((3,) + (1,) * (pts.ndim - 1)).astype(pts.dtype)
        return np.sqrt(np.sum((local / r) ** 2, axis=0))

    @property
    def bound(self) -> float:
        return float(np.max(self.radii))


@dataclass(frozen=True)
class Tube:
    """A vein: a polyline with a radius (mm); paramagnetic on QSM, dark on T2*."""

    points: np.ndarray  # (K, 3)
    radius: float


@dataclass(frozen=True)
class Lesion:
    parts: tuple[Ellipsoid, ...]
    waves: np.ndarray  # (M, 3) wave vectors (rad/mm) of the boundary perturbation
    phases: np.ndarray  # (M,)
    amplitude: float
    kind: str  # "rim+" or one of RIM_MINUS_KINDS
    location: str  # periventricular, deep, juxtacortical, confluent
    chi_core: float  # ppm relative to white matter
    chi_rim: float  # ppm added on rim voxels (rim+ only)
    rim_thickness: int  # QSM voxels
    rim_coverage: float  # fraction of the edge's solid angle covered by the rim
    rim_direction: np.ndarray  # (3,) centre of the covered sector
    flair: float  # FLAIR intensity (white matter 0.5)

    @property
    def rim_positive(self) -> bool:
        return self.kind == "rim+"

    @property
    def center(self) -> np.ndarray:
        return self.parts[0].center

    @property
    def bound(self) -> float:
        return max(float(np.linalg.norm(p.center - self.center)) + p.bound for p in self.parts) * 1.3

    def level(self, pts: np.ndarray) -> np.ndarray:
        """Implicit function: < 1 inside the irregular lesion."""
        q = np.minimum.reduce([p.q(pts) for p in self.parts])
        d = pts - self.center.reshape((3,) + (1,) * (pts.ndim - 1)).astype(pts.dtype)
        phase = np.tensordot(self.waves.astype(pts.dtype), d, axes=1)
        phase += self.phases.reshape((-1,) + (1,) * (pts.ndim - 1)).astype(pts.dtype)
        return q + np.float32(self.amplitude) * np.sin(phase).mean(axis=0)


@dataclass(frozen=True)
class Anatomy:
    brain_radii: np.ndarray  # (3,)
    brain_waves: np.ndarray  # (M, 3) cortical surface undulation
    brain_phases: np.ndarray
    structures: tuple[tuple[str, Ellipsoid], ...]  # deep grey nuclei then ventricles, painted in order
    veins: tuple[Tube, ...]
    lesions: tuple[Lesion, ...]
    vein_chi: float

    def brain_q(self, pts: np.ndarray) -> np.ndarray:
        """Normalised brain radius (<1 inside) with a gently undulating surface."""
        r = self.brain_radii.reshape((3,) + (1,) * (pts.ndim - 1)).astype(pts.dtype)
        q = np.sqrt(np.sum((pts / r) ** 2, axis=0))
        phase = np.tensordot(self.brain_waves.astype(pts.dtype), pts, axes=1)
        phase += self.brain_phases.reshape((-1,) + (1,) * (pts.ndim - 1)).astype(pts.dtype)
        return q * (1.0 + np.float32(0.02) * np.sin(phase).mean(axis=0))


# Deep structures in units of the brain radii: (name, centre, radii). Mirrored left/right.
_DEEP = (
    ("thalamus", (0.12, -0.15, 0.02), (0.09, 0.15, 0.10)),
    ("caudate", (0.17, 0.20, 0.12), (0.05, 0.12, 0.08)),
    ("putamen", (0.33, 0.05, 0.00), (0.06, 0.17, 0.10)),
    ("pallidum", (0.26, 0.02, -0.02), (0.04, 0.10, 0.07)),
    ("nigra", (0.07, -0.12, -0.28), (0.035, 0.06, 0.04)),
)
_VENTRICLES = (
    ("ventricle", (0.10, 0.00, 0.18), (0.06, 0.32, 0.08)),
    ("ventricle", (0.13, 0.28, 0.10), (0.07, 0.12, 0.10)),
    ("ventricle", (0.16, -0.32, 0.08), (0.05, 0.12, 0.07)),
)


def _structures(rng: np.random.Generator, radii: np.ndarray) -> tuple[tuple[str, Ellipsoid], ...]:
    """Deep grey nuclei and lateral/third ventricles; ventricle size varies (atrophy)."""
    out: list[tuple[str, Ellipsoid]] = []
    ventricle_scale = rng.uniform(0.8, 1.5)
    for group, scale in ((_DEEP, 1.0), (_VENTRICLES, ventricle_scale)):
        for name, c, r in group:
            for side in (-1.0, 1.0):
                centre = np.array([side * c[0], c[1], c[2]]) * radii
                if name == "ventricle":
                    centre[0] = side * (c[0] * radii[0] + (scale - 1.0) * r[0] * radii[0] * 0.5)
                rad = np.array(r) * radii * (scale if name == "ventricle" else rng.uniform(0.9, 1.1))
                out.append((name, Ellipsoid(centre, rad, random_rotation(rng, (5, 5, 5)))))
    out.append(("ventricle", Ellipsoid(np.array([0.0, -0.02, -0.02]) * radii,
                                       np.array([0.02, 0.14, 0.10]) * radii * ventricle_scale, np.eye(3))))
    return tuple(out)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _veins(rng: np.random.Generator, radii: np.ndarray, n_medullary: int) -> list[Tube]:
    """Medullary veins running from the ventricles to the cortex, deep veins, the sagittal sinus."""
    veins: list[Tube] = []
    for _ in range(n_medullary):
        d = _unit(rng)
        d[2] = abs(d[2]) * 0.8
        d /= np.linalg.norm(d)
        inner = d * radii * 0.3
        outer = d * radii * 0.9
        mid = 0.5 * (inner + outer) + rng.normal(scale=3.0, size=3)
        veins.append(Tube(np.stack([inner, mid, outer]), float(rng.uniform(0.5, 0.9))))
    for side in (-1.0, 1.0):  # internal cerebral veins
        pts = np.array([[side * 0.03, 0.15, 0.10], [side * 0.03, -0.1, 0.08], [side * 0.02, -0.35, 0.02]])
        veins.append(Tube(pts * radii, float(rng.uniform(1.0, 1.4))))
    angles = np.linspace(0.15 * np.pi, 0.85 * np.pi, 7)  # superior sagittal sinus along the midline
    sinus = np.stack([np.zeros_like(angles), np.cos(angles) * 0.97, np.sin(angles) * 0.97], axis=1) * radii
    veins.append(Tube(sinus, float(rng.uniform(2.0, 2.8))))
    return veins


def _inside_any(point: np.ndarray, structures: tuple[tuple[str, Ellipsoid], ...], margin: float) -> bool:
    return any(float(e.q(point.reshape(3, 1))[0]) < margin for _, e in structures)


def _lesion_centre(rng: np.random.Generator, radii: np.ndarray, structures, location: str,
                   size: float) -> np.ndarray:
    """A centre in white matter: next to a ventricle, deep, or just below the cortex."""
    ventricles = [e for n, e in structures if n == "ventricle"]
    for _ in range(200):
        if location == "periventricular":
            vent = ventricles[int(rng.integers(len(ventricles)))]
            d = _unit(rng)
            d[2] = abs(d[2])
            surface = vent.center + vent.rotation @ (d * vent.radii) / np.linalg.norm(d)
            p = surface + d * (0.7 * size + 1.0)
        elif location == "juxtacortical":
            d = _unit(rng)
            p = d * radii * rng.uniform(0.74, 0.80)
        else:
            p = rng.uniform(-0.7, 0.7, size=3) * radii
        q_brain = float(np.sqrt(np.sum((p / radii) ** 2)))
        if q_brain < 0.8 - (0.0 if location == "juxtacortical" else size / radii.min() * 0.6) and \
                not _inside_any(p, structures, 1.15):
            return p
    return np.array([0.25, 0.1, 0.3]) * radii  # centrum semiovale: always white matter


def _lesion_shape(rng: np.random.Generator, centre: np.ndarray, volume: float) -> tuple:
    """1-3 overlapping ellipsoids plus a sinusoidal boundary perturbation: irregular, not a ball."""
    req = (3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0)
    elong = rng.uniform(1.0, 1.8)
    axes = np.array([elong, 1.0, rng.uniform(0.75, 1.0)])
    axes /= np.prod(axes) ** (1.0 / 3.0)
    rot = Rotation.random(random_state=rng).as_matrix()
    parts = [Ellipsoid(centre, req * axes, rot)]
    for _ in range(int(rng.integers(0, 3))):
        offset = _unit(rng) * req * rng.uniform(0.5, 0.8)
        parts.append(Ellipsoid(centre + offset, req * rng.uniform(0.45, 0.7, size=3),
                               Rotation.random(random_state=rng).as_matrix()))
    n_waves = 4
    wavelength = rng.uniform(0.8, 1.6, size=n_waves) * req
    waves = np.stack([_unit(rng) for _ in range(n_waves)]) * (2 * np.pi / wavelength)[:, None]
    return tuple(parts), waves, rng.uniform(0, 2 * np.pi, size=n_waves), float(rng.uniform(0.15, 0.3)), req


def _lesion_contrast(rng: np.random.Generator, kind: str) -> dict:
    """QSM (ppm relative to white matter) and FLAIR contrast of one lesion kind."""
    core = {"rim+": (-0.004, 0.008), "iso": (-0.004, 0.006), "hypo": (-0.02, -0.01), "hyper": (0.012, 0.025),
            "vein-confounder": (-0.004, 0.006), "homogeneous-hyper": (0.035, 0.06)}[kind]
    rim = kind == "rim+"
    return dict(chi_core=float(rng.uniform(*core)), chi_rim=float(rng.uniform(0.035, 0.07)) if rim else 0.0,
                rim_thickness=int(rng.integers(1, 3)) if rim else 0,
                rim_coverage=float(rng.uniform(0.55, 1.0)) if rim else 0.0,
                rim_direction=_unit(rng), flair=float(rng.uniform(0.95, 1.3)))


def make_anatomy(rng: np.random.Generator, spec: SizeSpec, n_lesions: int, n_rimplus: int) -> Anatomy:
    """Random brain (size, shape), nuclei, veins and `n_lesions` lesions of which `n_rimplus` rim+."""
    radii = np.array(spec.brain_radii) * rng.uniform(0.93, 1.05) * rng.uniform(0.96, 1.04, size=3)
    structures = _structures(rng, radii)
    veins = _veins(rng, radii, spec.n_medullary_veins)
    kinds = ["rim+"] * n_rimplus + list(rng.choice(RIM_MINUS_KINDS, size=n_lesions - n_rimplus,
                                                   p=RIM_MINUS_WEIGHTS))
    kinds = [str(k) for k in rng.permutation(kinds)]
    median, vmin, vmax = spec.lesion_volume_mm3
    lesions: list[Lesion] = []
    for i, kind in enumerate(kinds):
        volume = float(np.clip(median * np.exp(rng.normal(0.0, 0.9)) * (1.8 if kind == "rim+" else 1.0),
                               vmin, vmax))
        req = (3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0)
        if lesions and rng.random() < 0.2:  # confluent: touching an earlier lesion
            other = lesions[int(rng.integers(len(lesions)))]
            other_r = float(np.max(other.parts[0].radii))
            centre, location = other.center + _unit(rng) * (other_r + req) * 0.8, "confluent"
        else:
            location = str(rng.choice(["periventricular", "deep", "juxtacortical"], p=[0.55, 0.35, 0.1]))
            centre = _lesion_centre(rng, radii, structures, location, req)
        parts, waves, phases, amp, req = _lesion_shape(rng, centre, volume)
        lesions.append(Lesion(parts, waves, phases, amp, kind, location, **_lesion_contrast(rng, kind)))
        if kind == "vein-confounder":  # a vein running across the lesion edge
            edge_dir = _unit(rng)
            along = np.cross(edge_dir, _unit(rng))
            along /= np.linalg.norm(along)
            touch = centre + edge_dir * req * rng.uniform(0.8, 1.0)
            veins.append(Tube(np.stack([touch - along * 3 * req, touch, touch + along * 3 * req]),
                              float(rng.uniform(0.7, 1.0))))
        elif rng.random() < 0.3:  # central vein sign: common to rim+ and rim- lesions alike
            along = parts[0].rotation[:, 0]
            veins.append(Tube(np.stack([centre - along * 2 * req, centre + along * 2 * req]),
                              float(rng.uniform(0.4, 0.6))))
    waves = np.stack([_unit(rng) for _ in range(5)]) * (2 * np.pi / rng.uniform(15, 35, size=5))[:, None]
    return Anatomy(radii, waves, rng.uniform(0, 2 * np.pi, size=5), structures, tuple(veins), tuple(lesions),
                   float(rng.uniform(0.3, 0.45)))
