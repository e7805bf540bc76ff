"""What each lesion is made of: kind and drawn parameters (the rim and confounder design).

Per participant a rim+ rate ~ Beta(0.9, 9) (mean 9 %, many people near zero, a few with many) and, per
confounder kind, a rate ~ Beta(2, 28) (mean 6.7 %) clipped to 2-12 %. Counts are binomial; rim+ designs
go preferentially to larger lesions (weight ~ sqrt(volume), lesions < 40 mm^3 excluded), confounders to
any remaining lesion. The label is *not* the design: rule.py judges every rim on the simulated QSM grid.
Confluent pairs: per pair, 'each' (each instance rendered with its own design and edge) or 'union' (the
pair shares the first instance's design and any rim follows the union's outer edge, judged on the union).
"""
from __future__ import annotations

import numpy as np

from .placement import Lesion

RIM_KINDS = ("rim_positive", "short_arc", "single_slice_ring")
CONFOUNDERS = ("diffuse_paramagnetic", "short_arc", "single_slice_ring", "central_vein", "edge_vein",
               "diamagnetic_focus")


def participant_rates(rng: np.random.Generator, has_bleed: bool) -> dict[str, float]:
    rates = {"rim_positive": float(rng.beta(0.9, 9.0))}
    for kind in CONFOUNDERS + (("near_haemorrhage",) if has_bleed else ()):
        rates[kind] = float(np.clip(rng.beta(2.0, 28.0), 0.02, 0.12))
    return rates


def _visible_amplitude(rng: np.random.Generator) -> float:
    """Rim amplitude over NAWM as seen on the QSM grid: log-normal, median 14 ppb, within 4-40."""
    return float(np.clip(np.exp(rng.normal(np.log(14.0), 0.45)), 4.0, 40.0))


def _vessel(rng: np.random.Generator) -> dict:
    return {"vein_radius_mm": float(rng.uniform(0.3, 0.8)), "vein_ppb": float(rng.uniform(150, 450)),
            "vein_direction": _direction(rng).tolist(), "vein_bend_mm": float(rng.uniform(-1.5, 1.5)),
            "vein_extra_length_mm": float(rng.uniform(4, 10))}


def _direction(rng: np.random.Generator, max_elevation_deg: float | None = None) -> np.ndarray:
    while True:
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        if max_elevation_deg is None or abs(np.degrees(np.arcsin(v[2]))) <= max_elevation_deg:
            return v


def draw_params(rng: np.random.Generator, kind: str, slice_mm: float) -> dict:
    """Every parameter of one lesion of this kind (directions are in the head frame)."""
    p: dict = {"kind": kind, "core_ppb": float(rng.uniform(-8, 8)), "core_heterogeneity_ppb": float(rng.uniform(0, 3))}
    if kind in RIM_KINDS:
        p.update({"rim_thickness_mm": float(rng.uniform(0.5, 2.5)), "rim_shift_mm": float(rng.uniform(-1.0, 1.0)),
                  "rim_visible_ppb": _visible_amplitude(rng), "rim_variation": float(rng.uniform(0.0, 0.5))})
    if kind == "rim_positive":
        p.update({"core_ppb": float(rng.uniform(-10, 10)), "core_heterogeneity_ppb": float(rng.uniform(0, 4)),
                  "rim_coverage": float(rng.uniform(0.75, 1.0)), "rim_axis": _direction(rng).tolist()})
        if rng.random() < 0.25:  # many paramagnetic rim lesions also have a central vein
            p.update(_vessel(rng))
    elif kind == "short_arc":
        p.update({"rim_coverage": float(rng.uniform(0.1, 0.35)), "rim_axis": _direction(rng, 25.0).tolist()})
    elif kind == "single_slice_ring":
        p.update({"rim_coverage": 1.0, "rim_axis": [0.0, 0.0, 1.0],
                  "ring_height_mm": float(rng.uniform(0.3, 0.9) * slice_mm)})
    elif kind == "diffuse_paramagnetic":
        core = float(rng.uniform(5, 30))
        p.update({"core_ppb": core, "core_heterogeneity_ppb": float(rng.uniform(0, 0.3) * core)})
    elif kind in ("central_vein", "edge_vein"):
        p.update(_vessel(rng))
        if kind == "edge_vein":
            p["vein_edge_offset_mm"] = float(rng.uniform(-0.5, 1.0))
    elif kind == "diamagnetic_focus":
        p.update({"focus_radius_mm": float(rng.uniform(0.6, 1.5)), "focus_ppb": float(rng.uniform(-80, -30))})
    return p


def assign_kinds(rng: np.random.Generator, lesions: list[Lesion], rates: dict[str, float],
                 volumes_mm3: np.ndarray, slice_mm: float, min_rim: int = 0) -> None:
    """Give every lesion a kind and its parameters (in ``lesion.params``), pairs' mode included.
    ``min_rim``: at least that many rim+ designs (the small test participants only)."""
    n = len(lesions)
    kinds = ["plain"] * n
    for i, lesion in enumerate(lesions):
        if lesion.near_bleed:
            kinds[i] = "near_haemorrhage"
    free = [i for i in range(n) if kinds[i] == "plain"]
    eligible = [i for i in free if volumes_mm3[i] >= 40.0]
    n_rim = min(max(int(rng.binomial(n, rates["rim_positive"])), min_rim), len(eligible))
    if n_rim:
        weights = np.sqrt(volumes_mm3[eligible])
        for i in rng.choice(eligible, size=n_rim, replace=False, p=weights / weights.sum()):
            kinds[int(i)] = "rim_positive"
    for kind in CONFOUNDERS:
        free = [i for i in range(n) if kinds[i] == "plain"]
        count = min(int(rng.binomial(n, rates[kind])), len(free))
        for i in rng.choice(free, size=count, replace=False) if count else []:
            kinds[int(i)] = kind
    for i, lesion in enumerate(lesions):
        lesion.params = draw_params(rng, kinds[i], slice_mm)
    # Confluent pairs: 'each' or 'union' per pair, at random.
    for lesion in lesions:
        if lesion.partner is not None and lesion.partner > lesion.lesion_id:
            mode = "union" if rng.random() < 0.5 else "each"
            other = lesions[lesion.partner - 1]
            lesion.params["confluent_mode"] = other.params["confluent_mode"] = mode
            if mode == "union":
                other.params = dict(lesion.params, kind=lesion.params["kind"])
                other.params["union_with"] = lesion.lesion_id
                lesion.params["union_with"] = other.lesion_id
