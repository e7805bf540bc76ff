"""One blind-family participant, from seed and index alone: every array of the BIDS dataset plus truth.

Stages draw from their own generators (SeedSequence(seed, spawn_key=(index, stage))), so a participant
depends only on the seed and its index, never on how many participants were asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from . import contrast, design, physics, rule
from .backgrounds import SOURCES, Background, load_background
from .geometry import homogeneous, rigid
from .grids import Acquisition, draw_acquisition
from .placement import Lesion, mni_grid, place_lesions
from .reconstruction import reconstruct
from .render import fraction_inside, make_shape, render_edit

BACKGROUND_NAMES = tuple(SOURCES)
MIN_LESIONS = 30  # the spec's lower bound of lesions (>= 10 QSM voxels) per participant
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


def _draw_pose_and_target(rng: np.random.Generator, bg: Background, small: bool) -> tuple[np.ndarray, int]:
    """The participant's MNI->head affine (a small rigid + scale perturbation of the background's) and its
    target lesion count: the first draws of the placement stage, so they come before placement's own."""
    perturb = rigid(rng.uniform(-3, 3, 3), rng.uniform(-3, 3, 3)) @ homogeneous(np.diag(rng.uniform(0.96, 1.04, 3)))
    target = int(rng.integers(6, 10)) if small else int(round(np.exp(rng.uniform(np.log(30), np.log(150)))))
    return perturb @ bg.mni_to_head, target


def _grid_voxel_counter(head_from_mni_vox: np.ndarray, acq: Acquisition) -> Callable[[np.ndarray], int]:
    """Placement's ">= 10 QSM voxels as rendered" check: a candidate's voxel count on the QSM grid."""
    qsm = acq.qsm

    def grid_voxels(mni_voxels: np.ndarray) -> int:
        got = fraction_inside(make_shape(mni_voxels, head_from_mni_vox, 8), acq.qsm_from_head, qsm.affine, qsm.shape)
        return 0 if got is None else int((got[2] >= 0.5).sum())

    return grid_voxels


def _qsm_lesion_masks(lesions: list[Lesion], shapes: dict, acq: Acquisition
                      ) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Lesion ids (first come, >= half inside), partial-volume fraction and bounding boxes on the QSM grid:
    the truth masks and what the rule judges."""
    qsm = acq.qsm
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
    return qsm_ids, qsm_fraction, boxes


def _render_groups(lesions: list[Lesion]) -> list[list[Lesion]]:
    """Lesions in render order, a 'union' confluent pair as one group (it is rendered with the union's edge)."""
    groups: list[list[Lesion]] = []
    for les in lesions:
        if les.params.get("confluent_mode") == "union":
            if les.partner is not None and les.partner < les.lesion_id:
                continue
            groups.append([les, lesions[les.partner - 1]])
        else:
            groups.append([les])
    return groups


def _render_edits(rrng: np.random.Generator, lesions: list[Lesion], shapes: dict, head_from_mni_vox: np.ndarray,
                  acq: Acquisition, psf_sigma: float) -> tuple[np.ndarray, np.ndarray, dict[int, dict]]:
    """Summed rim and other susceptibility edits on the QSM grid, one render per group, and each lesion's
    render info (with its group): the render stage's draws, in lesion order."""
    qsm = acq.qsm
    rim_total = np.zeros(qsm.shape, dtype=np.float32)
    other_total = np.zeros(qsm.shape, dtype=np.float32)
    group_info: dict[int, dict] = {}
    for group in _render_groups(lesions):
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
    return rim_total, other_total, group_info


def _judge_rim(les: Lesion, members: list[int], boxes: dict, qsm_ids: np.ndarray, rim_seen: np.ndarray,
               voxel: np.ndarray, judged: dict[int, rule.RuleResult]) -> rule.RuleResult | None:
    """The consensus rule on the simulated rim of a lesion (its 'union' group judged once, cached in
    ``judged``), or None for a lesion off the grid or without a rim."""
    p = les.params
    if les.lesion_id not in boxes or "rim_visible_ppb" not in p:
        return None
    key = min(members)
    if key not in judged:
        lo = np.min([boxes[m][0] for m in members if m in boxes], axis=0)
        hi = np.max([boxes[m][1] for m in members if m in boxes], axis=0)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        lesion_mask = np.isin(qsm_ids[sl], members)
        visible = rim_seen[sl] >= rule.visible_threshold(p["rim_visible_ppb"])
        judged[key] = rule.judge(lesion_mask, visible, voxel)
    return judged[key]


def _truth_rows(label: str, lesions: list[Lesion], group_info: dict[int, dict], boxes: dict,
                qsm_ids: np.ndarray, rim_seen: np.ndarray, volumes: np.ndarray, voxel: np.ndarray) -> list[dict]:
    """One truth row per lesion: its label from the rule on the simulated QSM, provenance and parameters."""
    truth: list[dict] = []
    judged: dict[int, rule.RuleResult] = {}
    for les in lesions:
        p = les.params
        info = group_info.get(les.lesion_id, {})
        result = _judge_rim(les, info.get("group", [les.lesion_id]), boxes, qsm_ids, rim_seen, voxel, judged)
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
    return truth


def _flair(frng: np.random.Generator, bg: Background, acq: Acquisition, lesions: list[Lesion], shapes: dict,
           truth: list[dict]) -> tuple[np.ndarray, dict, np.ndarray]:
    """FLAIR on its own grid (image, parameters, lesion ids); adds each lesion's FLAIR ratio and voxel
    count to its truth row. The FLAIR stage's draws: one ratio per lesion, then the image's."""
    flair_grid = acq.flair
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
    return flair_img, flair_params, fids


def _rim_dseg(truth: list[dict], fids: np.ndarray) -> np.ndarray:
    """The FLAIR-grid rim label map: 2 for a rim+ lesion's voxels, 1 for a rim- lesion's, 0 elsewhere."""
    lut = np.zeros(len(truth) + 1, dtype=np.uint8)
    for row in truth:
        lut[row["lesion_id"]] = 2 if row["rim_positive"] else 1
    return lut[fids]


def simulate(seed: int, index: int, data_dir: str, small: bool = False) -> Participant:
    """Build participant ``index`` (1-based) of the family with ``seed``."""
    label = f"b{index:03d}"
    bg = load_background(str(data_dir), choose_background(seed, index))
    acq = draw_acquisition(stage_rng(seed, index, "acquisition"), bg, small)
    qsm = acq.qsm
    voxel = qsm.voxel_mm

    rng = stage_rng(seed, index, "placement")
    mni_to_head, target = _draw_pose_and_target(rng, bg, small)
    drng = stage_rng(seed, index, "design")
    rates = design.participant_rates(drng, bg.bleed is not None)
    n_near = int(drng.binomial(target, rates["near_haemorrhage"])) if "near_haemorrhage" in rates else 0
    head_from_mni_vox = mni_to_head @ mni_grid(str(data_dir))[1]
    placement = place_lesions(rng, str(data_dir), bg, mni_to_head, target, n_near, acq.in_slab,
                              min_volume_mm3=14.0 * float(np.prod(voxel)),
                              grid_voxels=_grid_voxel_counter(head_from_mni_vox, acq),
                              min_count=0 if small else MIN_LESIONS)
    lesions = placement.lesions
    shapes = {les.lesion_id: make_shape(les.voxels, head_from_mni_vox, 8) for les in lesions}
    volumes = np.array([len(les.voxels) * shapes[les.lesion_id].scale ** 3 for les in lesions])
    design.assign_kinds(drng, lesions, rates, volumes, float(voxel[2]), min_rim=2 if small else 0)
    qsm_ids, qsm_fraction, boxes = _qsm_lesion_masks(lesions, shapes, acq)

    rrng = stage_rng(seed, index, "render")
    prng = stage_rng(seed, index, "physics")
    psf_sigma = float(prng.uniform(0.3, 0.5))
    rim_total, other_total, group_info = _render_edits(rrng, lesions, shapes, head_from_mni_vox, acq, psf_sigma)

    # Background on the QSM grid and tissue for the magnitude.
    tissue = contrast.head_model_on_grid(bg, qsm.affine, qsm.shape, acq.qsm_from_head,
                                         ("chi", "mask", "wm", "csf", "deep_gm"),
                                         slice_samples=2 if voxel[2] >= 2.0 else 1)
    mask = tissue["mask"] >= 0.5
    edits = physics.psf_blur(rim_total + other_total, psf_sigma)
    chi_true = np.where(mask, tissue["chi"] + edits, 0).astype(np.float32)
    mrng = stage_rng(seed, index, "magnitude")
    mag, mag_clean, mag_params = contrast.magnitude(mrng, tissue, chi_true, qsm_fraction)
    chi_out, rim_seen, phys = reconstruct(prng, index, tissue["chi"], chi_true, edits, rim_total, mask, mag_clean,
                                          voxel, acq.b0_index, psf_sigma)

    truth = _truth_rows(label, lesions, group_info, boxes, qsm_ids, rim_seen, volumes, voxel)
    flair_img, flair_params, fids = _flair(stage_rng(seed, index, "flair"), bg, acq, lesions, shapes, truth)
    params = {"subject": label, "background": bg.name, "outline_dice": bg.outline_dice,
              "target_lesions": target, "placed_lesions": len(lesions), "candidates": placement.candidates,
              "rejected": placement.rejected, "source_patients": placement.patients, "rates": rates,
              **acq.params, **phys, "magnitude": mag_params, "flair": flair_params}
    return Participant(label, (chi_out / 1000.0).astype(np.float32), mag, flair_img.astype(np.float32), fids,
                       _rim_dseg(truth, fids), acq, truth, params,
                       {"desc-edits_ppb": edits, "desc-rimseen_ppb": rim_seen.astype(np.float32),
                        "desc-lesions_dseg": qsm_ids})
