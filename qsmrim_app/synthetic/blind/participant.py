"""One blind-family participant, from seed and index alone: every array of the BIDS dataset plus truth.

Stages draw from their own generators (SeedSequence(seed, spawn_key=(index, stage))), so a participant
depends only on the seed and its index, never on how many participants were asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import contrast, design, physics, rule
from .backgrounds import SOURCES, Background, load_background
from .geometry import homogeneous, polynomial_field, rigid, smooth_field
from .grids import Acquisition, draw_acquisition
from .placement import Lesion, mni_grid, place_lesions
from .render import fraction_inside, make_shape, render_edit

BACKGROUND_NAMES = tuple(SOURCES)
STAGES = {"background": 0, "acquisition": 1, "placement": 2, "design": 3, "render": 4, "physics": 5,
          "magnitude": 6, "flair": 7}


def stage_rng(seed: int, index: int, stage: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index), STAGES[stage])))


@dataclass
class Participant:
    label: str
    qsm_ppm: np.ndarray
    magnitude: np.ndarray
    flair: np.ndarray
    lesion_dseg: np.ndarray
    rim_dseg: np.ndarray
    acquisition: Acquisition
    lesions: list[dict]
    params: dict
    truth_maps: dict[str, np.ndarray] = field(default_factory=dict)


def choose_background(seed: int, index: int) -> str:
    """Backgrounds in turn (the starting one set by the seed): each appears about equally often."""
    start = int(np.random.SeedSequence(int(seed)).generate_state(1)[0]) % len(BACKGROUND_NAMES)
    return BACKGROUND_NAMES[(start + index - 1) % len(BACKGROUND_NAMES)]


def simulate(seed: int, index: int, data_dir: str, small: bool = False) -> Participant:
    """Build participant ``index`` (1-based) of the family with ``seed``."""
    label = f"b{index:03d}"
    bg = load_background(str(data_dir), choose_background(seed, index))
    acq = draw_acquisition(stage_rng(seed, index, "acquisition"), bg, small)
    qsm = acq.qsm
    voxel = qsm.voxel_mm

    rng = stage_rng(seed, index, "placement")
    perturb = rigid(rng.uniform(-3, 3, 3), rng.uniform(-3, 3, 3)) @ homogeneous(np.diag(rng.uniform(0.96, 1.04, 3)))
    mni_to_head = perturb @ bg.mni_to_head
    target = int(rng.integers(6, 10)) if small else int(round(np.exp(rng.uniform(np.log(30), np.log(150)))))
    drng = stage_rng(seed, index, "design")
    rates = design.participant_rates(drng, bg.bleed is not None)
    n_near = int(drng.binomial(target, rates["near_haemorrhage"])) if "near_haemorrhage" in rates else 0
    head_from_mni_vox = mni_to_head @ mni_grid(str(data_dir))[1]

    def grid_voxels(mni_voxels: np.ndarray) -> int:
        got = fraction_inside(make_shape(mni_voxels, head_from_mni_vox, 8), acq.qsm_from_head, qsm.affine, qsm.shape)
        return 0 if got is None else int((got[2] >= 0.5).sum())

    placement = place_lesions(rng, str(data_dir), bg, mni_to_head, target, n_near, acq.in_slab,
                              min_volume_mm3=14.0 * float(np.prod(voxel)), grid_voxels=grid_voxels)
    lesions = placement.lesions
    shapes = {les.lesion_id: make_shape(les.voxels, head_from_mni_vox, 8) for les in lesions}
    volumes = np.array([len(les.voxels) * shapes[les.lesion_id].scale ** 3 for les in lesions])
    design.assign_kinds(drng, lesions, rates, volumes, float(voxel[2]), min_rim=2 if small else 0)

    # Lesion masks on the QSM grid (truth, and what the rule judges).
    qsm_ids = np.zeros(qsm.shape, dtype=np.int32)
    qsm_fraction = np.zeros(qsm.shape, dtype=np.float32)
    boxes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for les in lesions:
        got = fraction_inside(shapes[les.lesion_id], acq.qsm_from_head, qsm.affine, qsm.shape)
        if got is None:
            continue
        lo, hi, frac = got
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        qsm_fraction[sl] = np.maximum(qsm_fraction[sl], frac)
        view = qsm_ids[sl]
        view[(frac >= 0.5) & (view == 0)] = les.lesion_id
        boxes[les.lesion_id] = (lo, hi)

    # Edits: one render per group (a 'union' pair is one group with the union's edge).
    rrng = stage_rng(seed, index, "render")
    prng = stage_rng(seed, index, "physics")
    psf_sigma = float(prng.uniform(0.3, 0.5))
    rim_total = np.zeros(qsm.shape, dtype=np.float32)
    other_total = np.zeros(qsm.shape, dtype=np.float32)
    groups: list[list[Lesion]] = []
    for les in lesions:
        if les.params.get("confluent_mode") == "union":
            if les.partner is not None and les.partner < les.lesion_id:
                continue
            groups.append([les, lesions[les.partner - 1]])
        else:
            groups.append([les])
    group_info: dict[int, dict] = {}
    for group in groups:
        shape = shapes[group[0].lesion_id] if len(group) == 1 else make_shape(
            np.concatenate([g.voxels for g in group]), head_from_mni_vox, 8)
        edit = render_edit(rrng, shape, group[0].params, qsm.affine, qsm.shape, acq.qsm_from_head, psf_sigma)
        if edit is None:
            continue
        sl = tuple(slice(a, b) for a, b in zip(edit.lo, edit.hi))
        rim_total[sl] += edit.rim
        other_total[sl] += edit.other
        for g in group:
            group_info[g.lesion_id] = dict(edit.info, group=[x.lesion_id for x in group])

    # Background on the QSM grid and tissue for the magnitude.
    tissue = contrast.head_model_on_grid(bg, qsm.affine, qsm.shape, acq.qsm_from_head,
                                         ("chi", "mask", "wm", "csf", "deep_gm"),
                                         slice_samples=2 if voxel[2] >= 2.0 else 1)
    mask = tissue["mask"] >= 0.5
    edits = physics.psf_blur(rim_total + other_total, psf_sigma)
    chi_true = np.where(mask, tissue["chi"] + edits, 0).astype(np.float32)
    mrng = stage_rng(seed, index, "magnitude")
    mag, mag_clean, mag_params = contrast.magnitude(mrng, tissue, chi_true, qsm_fraction)

    use_field = index % 2 == 1 or prng.random() < 0.3
    phys: dict = {"psf_sigma_vox": psf_sigma, "through_field": bool(use_field)}
    rim_blur = physics.psf_blur(rim_total, psf_sigma)
    if use_field:
        pshape = physics.padded_shape(qsm.shape)
        kernel = physics.dipole_kernel(pshape, voxel, acq.b0_index)
        method = physics.METHODS[int(prng.integers(3))]
        param = {"tkd": prng.uniform(0.12, 0.25), "tikhonov": prng.uniform(0.005, 0.03),
                 "gradient_l2": prng.uniform(0.02, 0.12)}[method]
        hfilt = physics.inversion_filter(method, kernel, pshape, voxel, float(param))
        field_ppb = physics.apply_filter(chi_true, kernel, pshape) * mask
        snr, te = float(prng.uniform(25, 80)), float(prng.uniform(15, 40))
        sigma = physics.field_noise_ppb(snr, te)
        weight = 1.0 / np.clip(mag_clean, 0.2, None)
        noise = prng.standard_normal(qsm.shape).astype(np.float32) * np.float32(sigma) * weight * mask
        bg_amp = float(prng.uniform(1.0, 6.0))
        residual = polynomial_field(prng, qsm.shape, 2, bg_amp) * mask
        chi_rec = physics.apply_filter(field_ppb + noise + residual, hfilt, pshape)
        rim_seen = physics.apply_filter(rim_blur, kernel * hfilt, pshape)
        phys.update({"inversion": method, "inversion_param": float(param), "field_snr": snr,
                     "effective_te_ms": te, "field_noise_ppb": sigma, "residual_background_ppb": bg_amp})
    else:
        s_in, s_sl = float(prng.uniform(0.3, 0.7)), float(prng.uniform(0.1, 0.4))
        from scipy import ndimage
        blur = (s_in, s_in, s_sl)
        extra = float(prng.uniform(0.0, 2.0))
        noise = smooth_field(prng, qsm.shape, 0.5) * np.float32(extra)
        chi_rec = tissue["chi"] + ndimage.gaussian_filter(edits, blur) + noise
        rim_seen = ndimage.gaussian_filter(rim_blur, blur).astype(np.float32)
        phys.update({"inversion": "none (edited map)", "edit_blur_vox": list(blur), "extra_noise_ppb": extra})
    reference = ("mean", "median", "none")[int(prng.integers(3))]
    ref_value = {"mean": float(chi_rec[mask].mean()), "median": float(np.median(chi_rec[mask])), "none": 0.0}[reference]
    offset, scale = float(prng.uniform(-5, 5)), float(prng.uniform(0.92, 1.08))
    chi_out = np.where(mask, (chi_rec - ref_value + offset) * scale, 0).astype(np.float32)
    rim_seen = rim_seen * np.float32(scale)
    phys.update({"reference": reference, "offset_ppb": offset, "scale": scale})

    # The consensus rule on the simulated rims, per lesion (a 'union' pair judged as one).
    truth: list[dict] = []
    judged: dict[int, rule.RuleResult] = {}
    for les in lesions:
        p = les.params
        info = group_info.get(les.lesion_id, {})
        members = info.get("group", [les.lesion_id])
        result = None
        if les.lesion_id in boxes and "rim_visible_ppb" in p:
            key = min(members)
            if key not in judged:
                lo = np.min([boxes[m][0] for m in members if m in boxes], axis=0)
                hi = np.max([boxes[m][1] for m in members if m in boxes], axis=0)
                sl = tuple(slice(a, b) for a, b in zip(lo, hi))
                lesion_mask = np.isin(qsm_ids[sl], members)
                visible = rim_seen[sl] >= rule.visible_threshold(p["rim_visible_ppb"])
                judged[key] = rule.judge(lesion_mask, visible, voxel)
            result = judged[key]
        row = {"subject": label, "lesion_id": les.lesion_id,
               "rim_positive": int(bool(result and result.positive)),
               "kind": p["kind"], "source_patient": les.patient, "source_component": les.component,
               "mni_shift_vox": list(les.shift_vox), "volume_mm3": float(volumes[les.lesion_id - 1]),
               "qsm_voxels": int((qsm_ids == les.lesion_id).sum()) if les.lesion_id in boxes else 0,
               "confluent_with": les.partner, "confluent_mode": p.get("confluent_mode"),
               "rule_slices_covered": None if result is None else result.slices_covered,
               "rule_max_coverage": None if result is None else round(result.max_coverage, 3),
               "rim_fine_ppb": info.get("rim_fine_ppb")}
        row.update({k: v for k, v in p.items() if k not in ("kind", "confluent_mode", "union_with")})
        if les.lesion_id in boxes and "rim_visible_ppb" in p:
            sl = tuple(slice(a, b) for a, b in zip(*boxes[les.lesion_id]))
            seen = rim_seen[sl][rim_seen[sl] > 0.25 * max(float(rim_seen[sl].max()), 1e-6)]
            row["rim_seen_p95_ppb"] = float(np.percentile(seen, 95)) if seen.size else 0.0
        truth.append(row)

    # FLAIR on its own grid.
    flair_grid = acq.flair
    frng = stage_rng(seed, index, "flair")
    ftissue = contrast.head_model_on_grid(bg, flair_grid.affine, flair_grid.shape, acq.flair_from_head,
                                          ("mask", "wm", "csf", "deep_gm"))
    ffrac = np.zeros(flair_grid.shape, dtype=np.float32)
    fratio = np.ones(flair_grid.shape, dtype=np.float32)
    fids = np.zeros(flair_grid.shape, dtype=np.int32)
    ratios = frng.uniform(1.3, 2.2, len(lesions))
    for les, ratio in zip(lesions, ratios):
        got = fraction_inside(shapes[les.lesion_id], acq.flair_from_head, flair_grid.affine, flair_grid.shape)
        if got is None:
            continue
        lo, hi, frac = got
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        take = frac > ffrac[sl]
        ffrac[sl] = np.where(take, frac, ffrac[sl])
        fratio[sl] = np.where(take, np.float32(ratio), fratio[sl])
        view = fids[sl]
        view[(frac >= 0.5) & (view == 0)] = les.lesion_id
        truth[les.lesion_id - 1]["flair_ratio"] = float(ratio)
        truth[les.lesion_id - 1]["flair_voxels"] = int((view == les.lesion_id).sum())
    flair_img, flair_params = contrast.flair(frng, ftissue, ffrac, fratio)
    labels = {row["lesion_id"]: row["rim_positive"] for row in truth}
    lut = np.zeros(len(lesions) + 1, dtype=np.uint8)
    for lesion_id, positive in labels.items():
        lut[lesion_id] = 2 if positive else 1
    rim_dseg = lut[fids]

    params = {"subject": label, "background": bg.name, "outline_dice": bg.outline_dice,
              "target_lesions": target, "placed_lesions": len(lesions), "candidates": placement.candidates,
              "rejected": placement.rejected, "source_patients": placement.patients, "rates": rates,
              **acq.params, **phys, "magnitude": mag_params, "flair": flair_params}
    return Participant(label, (chi_out / 1000.0).astype(np.float32), mag, flair_img.astype(np.float32), fids,
                       rim_dseg, acq, truth, params,
                       {"desc-edits_ppb": edits, "desc-rimseen_ppb": rim_seen.astype(np.float32),
                        "desc-lesions_dseg": qsm_ids})
