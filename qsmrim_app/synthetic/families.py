"""Named families of the semi-real generator: background, rim physics and reconstruction drawn together.

Why: a model trained on one generator's narrow choices (rims of 20-60 ppb around 80-100 % of the edge,
one background brain, one TKD inversion) learns those choices instead of "a paramagnetic rim". Each family
below is a *distribution* of generator settings; families differ from one another in background brain,
rim physics and reconstruction at once, so that leaving one family out of training
(benchmarks/bench_families.py) asks whether what was learnt transfers to data made another way.

The ranges are meant to contain other reasonable simulators and what the literature reports for rims on
QSM (a few to tens of ppb above the local tissue after inversion, sub-millimetre to 2.5 mm thick, arcs
to full rings; the consensus rule decides rim+ afterwards on the simulated truth, so coverages are drawn on
both sides of its 2/3 boundary). They were fixed before any model was scored on a family and are never
tuned to make a model win.

`semireal` is the generator as it was before families existed (the bundled model's cohort); the others
are domain-randomised. Every family is deterministic in (seed, patient, grid).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

Range = tuple[float, float]
#: Which lesions the `-small` families may give a rim or a confounder: from 20 mm3 (about 3.4 mm across, just
#: above the usual 3 mm lesion definition) and 4 mm tall (two slices of a 2 mm grid); the generator's default
#: is 80-12,000 mm3 and 9 mm (Family.eligible_volume_mm3, eligible_height_mm).
SMALL_LESIONS = dict(eligible_volume_mm3=(20.0, 12000.0), eligible_height_mm=4.0)


@dataclass(frozen=True)
class Family:
    """One generator family: every drawn quantity as a (low, high) uniform range or a discrete choice."""

    name: str
    description: str
    background: str = "cosmos"  # semireal_head.BACKGROUNDS key: whose real QSM is the head's texture
    grids: tuple[str, ...] = ("0.75x0.75x3", "1x1x1")  # semireal.GRIDS keys the family's sessions use
    # lesion biology (semireal_lesions.lesion_designs)
    rim_fraction: float = 0.05  # share of counted lesions given a rim source of coverage `rim_coverage`
    confounder_fraction: float = 0.05  # share given each confounder kind
    confounders: tuple[str, ...] = ("arc", "vein", "hyper")
    # Which lesions may get a rim or a confounder (mm3, mm): the generator's 80-12,000 mm3 and 9 mm made
    # rim+ lesions large (median 327 mm3 vs 56 for rim-) and taught the models size as evidence of a rim
    # (docs/families.md, the blind family); the `-small` families lower both.
    eligible_volume_mm3: Range = (80.0, 12000.0)
    eligible_height_mm: float = 9.0
    rim_chi: Range = (0.02, 0.06)  # ppm above the local tissue (before the blur of the inversion)
    rim_thickness: Range = (0.6, 2.0)  # mm
    full_ring_share: float = 0.5
    rim_coverage: Range = (0.8, 1.0)  # share of the edge's azimuth (kind 'rim', when not a full ring)
    arc_coverage: Range = (0.15, 0.5)  # kind 'arc'
    position_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # inside, on, outside the edge
    rim_modulation: Range = (0.0, 0.0)  # depth of a cosine modulation of the rim along the edge
    rim_core_hyper_share: float = 0.0  # rims whose core is also iron-laden (heterogeneous core)
    core_chi: Range = (-0.004, 0.012)
    hyper_chi: Range = (0.02, 0.045)  # iron-laden core (kind 'hyper', and rims with such a core)
    dia_chi: Range = (-0.05, -0.02)  # diamagnetic focus in the core (kind 'dia')
    vein_chi: Range = (0.25, 0.45)
    vein_radius: Range = (0.35, 0.7)
    vein_offset: Range = (0.0, 0.0)  # mm the vein axis is moved into the lesion (crossing when > radius)
    flair_contrast: Range = (1.35, 1.9)
    # head placement (semireal.draw_geometry)
    mirror_share: float = 0.5
    head_rotation_deg: tuple[float, float, float] = (8.0, 6.0, 5.0)
    head_scale: Range = (1.0, 1.0)  # isotropic rescaling of the head (brain and lesions together)
    warp_mm: Range = (0.0, 0.0)  # bound of a smooth random displacement of the background (warp.py)
    warp_wavelength_mm: Range = (20.0, 40.0)  # wavelengths of the warp's plane waves
    # acquisition and reconstruction (semireal.simulate_session)
    noise_scale: Range = (1.0, 1.0)  # x the semi-real field noise
    inversion: tuple[str, ...] = ("tkd",)  # one drawn per session: tkd | tikhonov | gradient-l2 | tv
    tkd_threshold: Range = (0.18, 0.18)
    tikhonov_lambda: Range = (0.02, 0.02)  # tikhonov: D / (D^2 + l); gradient-l2: D / (D^2 + l |k/kmax|^2)
    tv_lambda: Range = (1e-4, 1e-3)  # tv: weight of |grad chi|_1 (per mm) against 1/2 |D chi - field|^2 (ppm)
    background_field_ppm: Range = (0.0, 0.0)  # residual background field left in (smooth, before inversion)
    map_scale: Range = (1.0, 1.0)  # reconstruction/unit scale error of the map
    map_offset_ppm: Range = (0.0, 0.0)
    units: str = "ppm"  # ppm or ppb in the written Chimap
    flair_voxels: tuple[tuple[float, float, float], ...] = ((1.0, 1.0, 1.0),)  # FLAIR voxel (A-P, S-I, L-R mm)

    @property
    def varies(self) -> bool:
        """Whether the family uses a variation drawn from the second stream (warp, TV, FLAIR grid)."""
        return (self.warp_mm[1] > 0 or "tv" in self.inversion
                or tuple(map(tuple, self.flair_voxels)) != ((1.0, 1.0, 1.0),))

    @property
    def randomised(self) -> bool:
        return self.name != "semireal"

    def to_dict(self) -> dict:
        return asdict(self)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("semireal", "the semi-real generator before families (the bundled model's training cohort): COSMOS, "
                       "rims 20-60 ppb around 80-100 % of the edge, TKD 0.18"),
    Family("cosmos-faint", "COSMOS background rescaled and rotated; faint thin rims (5-30 ppb, 0.3-1.5 mm), "
                           "coverage 0.45-1.0 and arcs 0.1-0.7 (both sides of the 2/3 rule), modulated along the "
                           "edge, mostly on/inside the FLAIR edge; crossing veins and diamagnetic foci; TKD at "
                           "0.1-0.25 and a Tikhonov inversion, residual background field, 1x1x3 and 0.75x0.75x3 mm",
           grids=("1x1x3", "0.75x0.75x3"), rim_fraction=0.12, confounder_fraction=0.06,
           confounders=("arc", "vein", "hyper", "dia"), rim_chi=(0.005, 0.03), rim_thickness=(0.3, 1.5),
           full_ring_share=0.25, rim_coverage=(0.45, 1.0), arc_coverage=(0.1, 0.7), position_weights=(2, 2, 1),
           rim_modulation=(0.0, 0.8), rim_core_hyper_share=0.2, core_chi=(-0.01, 0.015), hyper_chi=(0.01, 0.05),
           vein_chi=(0.15, 0.45), vein_radius=(0.25, 1.0), vein_offset=(-0.5, 1.5), flair_contrast=(1.2, 2.0),
           head_rotation_deg=(15.0, 10.0, 10.0), head_scale=(0.9, 1.1), noise_scale=(0.7, 2.0),
           inversion=("tkd", "tikhonov"), tkd_threshold=(0.1, 0.25), tikhonov_lambda=(0.01, 0.06),
           background_field_ppm=(0.0, 0.02), map_scale=(0.8, 1.2), map_offset_ppm=(-0.01, 0.01)),
    Family("ich-a-strong", "patient A's in-vivo QSM (other person, other reconstruction, a haemorrhage) as "
                           "background; strong thick rims (20-80 ppb, 1-2.5 mm), often outside the FLAIR edge, "
                           "coverage 0.5-1.0, iron-laden cores; wide veins; gradient-regularised l2 inversion "
                           "or TKD, maps in ppb, 0.9x0.9x2 and 1x1x1 mm",
           background="ich-a", grids=("0.9x0.9x2", "1x1x1"), rim_fraction=0.12, confounder_fraction=0.06,
           confounders=("arc", "vein", "hyper", "dia"), rim_chi=(0.02, 0.08), rim_thickness=(1.0, 2.5),
           full_ring_share=0.4, rim_coverage=(0.5, 1.0), arc_coverage=(0.15, 0.6), position_weights=(1, 1, 2),
           rim_modulation=(0.0, 0.5), rim_core_hyper_share=0.3, core_chi=(-0.005, 0.02), hyper_chi=(0.02, 0.07),
           vein_chi=(0.2, 0.5), vein_radius=(0.4, 1.2), vein_offset=(-0.5, 1.0), flair_contrast=(1.3, 2.2),
           mirror_share=0.5, head_rotation_deg=(12.0, 8.0, 8.0), head_scale=(0.95, 1.1), noise_scale=(0.5, 1.5),
           inversion=("gradient-l2", "tkd"), tkd_threshold=(0.12, 0.2), tikhonov_lambda=(0.02, 0.1),
           background_field_ppm=(0.0, 0.03), map_scale=(0.85, 1.15), units="ppb"),
    Family("ich-b-mixed", "patient B's in-vivo QSM (a third person and reconstruction, a large haemorrhage) "
                          "as background; rims 10-50 ppb of any thickness and position, coverage 0.4-1.0, "
                          "strongly modulated; veins crossing lesions; Tikhonov or TKD 0.15-0.3, "
                          "thick-slice grids 1x1x3 and 0.75x0.75x3 mm",
           background="ich-b", grids=("1x1x3", "0.75x0.75x3"), rim_fraction=0.12, confounder_fraction=0.06,
           confounders=("arc", "vein", "hyper", "dia"), rim_chi=(0.01, 0.05), rim_thickness=(0.4, 2.5),
           full_ring_share=0.3, rim_coverage=(0.4, 1.0), arc_coverage=(0.1, 0.65), position_weights=(1, 1, 1),
           rim_modulation=(0.2, 1.0), rim_core_hyper_share=0.25, core_chi=(-0.01, 0.02), hyper_chi=(0.015, 0.06),
           vein_chi=(0.15, 0.4), vein_radius=(0.3, 0.9), vein_offset=(0.0, 2.0), flair_contrast=(1.25, 2.1),
           head_rotation_deg=(10.0, 10.0, 10.0), head_scale=(0.9, 1.05), noise_scale=(0.8, 2.5),
           inversion=("tikhonov", "tkd"), tkd_threshold=(0.15, 0.3), tikhonov_lambda=(0.01, 0.05),
           background_field_ppm=(0.0, 0.02), map_scale=(0.8, 1.25), map_offset_ppm=(-0.02, 0.02)),
    Family("cosmos-thick", "COSMOS background mirrored/rotated/rescaled; rims 10-60 ppb, 0.5-2.5 mm, "
                           "coverage 0.5-1.0, on or outside the edge, with heterogeneous and iron-laden cores "
                           "and diamagnetic foci; TKD 0.12-0.22 or gradient-l2, 0.6x0.6x2 and 1x1x1 mm",
           grids=("0.6x0.6x2", "1x1x1"), rim_fraction=0.12, confounder_fraction=0.06,
           confounders=("arc", "vein", "hyper", "dia"), rim_chi=(0.01, 0.06), rim_thickness=(0.5, 2.5),
           full_ring_share=0.35, rim_coverage=(0.5, 1.0), arc_coverage=(0.1, 0.6), position_weights=(1, 2, 2),
           rim_modulation=(0.0, 0.6), rim_core_hyper_share=0.3, core_chi=(-0.01, 0.02), hyper_chi=(0.01, 0.06),
           vein_chi=(0.15, 0.45), vein_radius=(0.3, 1.0), vein_offset=(-0.5, 1.5), flair_contrast=(1.2, 2.0),
           head_rotation_deg=(15.0, 10.0, 10.0), head_scale=(0.9, 1.1), noise_scale=(0.7, 1.8),
           inversion=("tkd", "gradient-l2"), tkd_threshold=(0.12, 0.22), tikhonov_lambda=(0.02, 0.08),
           background_field_ppm=(0.0, 0.02), map_scale=(0.85, 1.2)),
    Family("warped-tv", "COSMOS background non-linearly warped (smooth displacement up to 4 mm, 20-40 mm "
                        "wavelengths) as well as mirrored/rotated/rescaled; rims 5-80 ppb, 0.3-2.5 mm, coverage "
                        "0.4-1.0 and arcs 0.1-0.7, any position, modulated; all confounders; mostly a "
                        "total-variation (ADMM) inversion, else TKD 0.1-0.3 or gradient-l2; noise 0.5-2.5x; "
                        "FLAIR at 1 mm, 1x1x3 mm or 0.9x0.9x2 mm; 0.9x0.9x2 and 1x1x3 mm QSM",
           grids=("0.9x0.9x2", "1x1x3"), rim_fraction=0.12, confounder_fraction=0.06,
           confounders=("arc", "vein", "hyper", "dia"), rim_chi=(0.005, 0.08), rim_thickness=(0.3, 2.5),
           full_ring_share=0.3, rim_coverage=(0.4, 1.0), arc_coverage=(0.1, 0.7), position_weights=(1, 1, 1),
           rim_modulation=(0.0, 1.0), rim_core_hyper_share=0.25, core_chi=(-0.01, 0.02), hyper_chi=(0.01, 0.07),
           vein_chi=(0.15, 0.5), vein_radius=(0.25, 1.2), vein_offset=(-0.5, 2.0), flair_contrast=(1.2, 2.2),
           head_rotation_deg=(15.0, 10.0, 10.0), head_scale=(0.9, 1.1), warp_mm=(1.0, 4.0),
           warp_wavelength_mm=(20.0, 40.0), noise_scale=(0.5, 2.5), inversion=("tv", "tv", "tkd", "gradient-l2"),
           tkd_threshold=(0.1, 0.3), tikhonov_lambda=(0.01, 0.1), tv_lambda=(1e-4, 1e-3),
           background_field_ppm=(0.0, 0.03), map_scale=(0.8, 1.25), map_offset_ppm=(-0.02, 0.02),
           flair_voxels=((1.0, 1.0, 1.0), (1.0, 1.0, 3.0), (0.9, 0.9, 2.0))),
    # Two families on our own TV inversions of real tissue fields (own_inversion.py): the same people as
    # `ich-a` and `cosmos`, another reconstruction of their texture. Rim prevalence differs from the
    # others' 12 % (8 % and 16 %) so that base rates vary across training families as they do across sites.
    Family("tv-ich-a", "patient A's tissue field inverted by our own TV (another reconstruction of the "
                       "ich-a texture), warped up to 3 mm; rims 5-60 ppb, 0.3-2 mm, coverage 0.4-1.0, mostly on "
                       "the edge, modulated; fewer rims (8 %), more confounders (8 % each); Tikhonov, TKD "
                       "0.1-0.3 or TV; low FLAIR contrast at 1 mm or 1x1x3 mm; maps in ppb, 1x1x3 and 0.6x0.6x2",
           background="ich-a-tv", grids=("1x1x3", "0.6x0.6x2"), rim_fraction=0.08, confounder_fraction=0.08,
           confounders=("arc", "vein", "hyper", "dia"), rim_chi=(0.005, 0.06), rim_thickness=(0.3, 2.0),
           full_ring_share=0.3, rim_coverage=(0.4, 1.0), arc_coverage=(0.1, 0.7), position_weights=(1, 2, 1),
           rim_modulation=(0.0, 0.8), rim_core_hyper_share=0.2, core_chi=(-0.01, 0.02), hyper_chi=(0.01, 0.06),
           vein_chi=(0.15, 0.5), vein_radius=(0.25, 1.0), vein_offset=(-0.5, 2.0), flair_contrast=(1.1, 1.8),
           head_rotation_deg=(12.0, 10.0, 10.0), head_scale=(0.9, 1.1), warp_mm=(0.5, 3.0),
           warp_wavelength_mm=(20.0, 40.0), noise_scale=(0.6, 2.5), inversion=("tikhonov", "tkd", "tv"),
           tkd_threshold=(0.1, 0.3), tikhonov_lambda=(0.01, 0.08), tv_lambda=(1e-4, 1e-3),
           background_field_ppm=(0.0, 0.03), map_scale=(0.8, 1.25), map_offset_ppm=(-0.02, 0.02), units="ppb",
           flair_voxels=((1.0, 1.0, 1.0), (1.0, 1.0, 3.0))),
    Family("cosmos-tv-mixed", "the COSMOS person's tissue field inverted by our own TV, mirrored/rotated/"
                              "rescaled and warped up to 2 mm; rims 5-50 ppb, 0.3-2.5 mm, coverage 0.45-1.0, "
                              "any position, inside more often; more rims (16 %); gradient-l2, TKD 0.12-0.25 "
                              "or Tikhonov; FLAIR at 1 mm or 0.9x0.9x2 mm; 0.75x0.75x3 and 1x1x1 mm",
           background="cosmos-tv", grids=("0.75x0.75x3", "1x1x1"), rim_fraction=0.16, confounder_fraction=0.06,
           confounders=("arc", "vein", "hyper", "dia"), rim_chi=(0.005, 0.05), rim_thickness=(0.3, 2.5),
           full_ring_share=0.35, rim_coverage=(0.45, 1.0), arc_coverage=(0.1, 0.65), position_weights=(2, 1, 1),
           rim_modulation=(0.0, 1.0), rim_core_hyper_share=0.3, core_chi=(-0.01, 0.02), hyper_chi=(0.01, 0.06),
           vein_chi=(0.15, 0.45), vein_radius=(0.3, 1.2), vein_offset=(-0.5, 1.5), flair_contrast=(1.2, 2.1),
           head_rotation_deg=(15.0, 10.0, 10.0), head_scale=(0.85, 1.15), warp_mm=(0.0, 2.0),
           warp_wavelength_mm=(25.0, 45.0), noise_scale=(0.5, 2.0), inversion=("gradient-l2", "tkd", "tikhonov"),
           tkd_threshold=(0.12, 0.25), tikhonov_lambda=(0.01, 0.08), background_field_ppm=(0.0, 0.02),
           map_scale=(0.85, 1.2), map_offset_ppm=(-0.01, 0.01), flair_voxels=((1.0, 1.0, 1.0), (0.9, 0.9, 2.0))),
    # Two families whose rims and confounders also reach small lesions (SMALL_LESIONS): every other family keeps
    # the generator's 80 mm3 and 9 mm, which made rim+ lesions large and taught the models size as evidence of a
    # rim. Thin rims dominate (a 2.5 mm rim would fill a small lesion); the 2/3-of-the-edge-on-2-slices rule
    # still decides rim+, so a small lesion's rim seen on one slice is a rim- lesion, as for raters.
    Family("ich-b-small", "patient B's in-vivo QSM as background; rims and confounders also on small lesions "
                          "(20 mm3 and 4 mm tall up): rims 5-50 ppb, 0.3-1.5 mm, coverage 0.4-1.0, any "
                          "position, modulated; 14 % of lesions given a rim; all confounders; TV, gradient-l2 "
                          "or TKD 0.1-0.25; FLAIR at 1 mm or 0.9x0.9x2 mm; 1x1x1 and 0.9x0.9x2 mm",
           background="ich-b", grids=("1x1x1", "0.9x0.9x2"), rim_fraction=0.14, confounder_fraction=0.06,
           confounders=("arc", "vein", "hyper", "dia"), **SMALL_LESIONS,
           rim_chi=(0.005, 0.05), rim_thickness=(0.3, 1.5), full_ring_share=0.3, rim_coverage=(0.4, 1.0),
           arc_coverage=(0.1, 0.65), position_weights=(1, 1, 1), rim_modulation=(0.0, 0.8),
           rim_core_hyper_share=0.2, core_chi=(-0.01, 0.02), hyper_chi=(0.01, 0.06), vein_chi=(0.15, 0.45),
           vein_radius=(0.25, 0.9), vein_offset=(-0.5, 1.5), flair_contrast=(1.15, 2.0),
           head_rotation_deg=(12.0, 10.0, 10.0), head_scale=(0.9, 1.1), warp_mm=(0.0, 2.0),
           warp_wavelength_mm=(20.0, 40.0), noise_scale=(0.6, 2.0), inversion=("tv", "gradient-l2", "tkd"),
           tkd_threshold=(0.1, 0.25), tikhonov_lambda=(0.01, 0.08), tv_lambda=(1e-4, 1e-3),
           background_field_ppm=(0.0, 0.02), map_scale=(0.85, 1.2), map_offset_ppm=(-0.01, 0.01),
           flair_voxels=((1.0, 1.0, 1.0), (0.9, 0.9, 2.0))),
    Family("cosmos-small", "COSMOS background warped up to 3 mm, mirrored/rotated/rescaled; rims and "
                           "confounders also on small lesions (20 mm3 and 4 mm tall up): rims 5-60 ppb, "
                           "0.3-2 mm, coverage 0.45-1.0, mostly inside or on the edge; 12 % given a rim; "
                           "Tikhonov, TKD 0.12-0.3 or TV; maps in ppb; FLAIR at 1 mm or 1x1x3 mm; "
                           "0.6x0.6x2 and 0.75x0.75x3 mm",
           grids=("0.6x0.6x2", "0.75x0.75x3"), rim_fraction=0.12, confounder_fraction=0.06,
           confounders=("arc", "vein", "hyper", "dia"), **SMALL_LESIONS,
           rim_chi=(0.005, 0.06), rim_thickness=(0.3, 2.0), full_ring_share=0.35, rim_coverage=(0.45, 1.0),
           arc_coverage=(0.1, 0.7), position_weights=(2, 2, 1), rim_modulation=(0.0, 1.0),
           rim_core_hyper_share=0.25, core_chi=(-0.01, 0.02), hyper_chi=(0.01, 0.06), vein_chi=(0.15, 0.5),
           vein_radius=(0.25, 1.0), vein_offset=(-0.5, 2.0), flair_contrast=(1.2, 2.1),
           head_rotation_deg=(15.0, 10.0, 10.0), head_scale=(0.85, 1.15), warp_mm=(0.5, 3.0),
           warp_wavelength_mm=(20.0, 45.0), noise_scale=(0.5, 2.5), inversion=("tikhonov", "tkd", "tv"),
           tkd_threshold=(0.12, 0.3), tikhonov_lambda=(0.01, 0.08), tv_lambda=(1e-4, 1e-3),
           background_field_ppm=(0.0, 0.03), map_scale=(0.8, 1.25), map_offset_ppm=(-0.02, 0.02), units="ppb",
           flair_voxels=((1.0, 1.0, 1.0), (1.0, 1.0, 3.0))),
)}


def get_family(name: str | None) -> Family:
    """The named family (None: the plain semi-real generator)."""
    if name is None:
        return FAMILIES["semireal"]
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r} (one of {', '.join(FAMILIES)})")
    return FAMILIES[name]
