"""The participant report: one self-contained `sub-X[_ses-Y].html` built from the derivatives.

It never recomputes the analysis: it reads the QSM, the registered FLAIR and the lesion map (all in the
QSM grid), the per-lesion table and the run's summary, and lays them out so a rater can check the
registration and review every lesion (rim+ first, then by decreasing probability) quickly.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from ..derivatives import write_text
from ._html import (
    Plane,
    esc,
    figure_data_uri,
    fixed as _fixed,
    fmt,
    img_tag,
    kv_table,
    label_edges,
    new_figure,
    page,
    png_data_uri,
    robust_window,
    table,
    window_to_uint8,
)

QSM_WINDOW = {"ppb": (-150.0, 150.0), "ppm": (-0.15, 0.15)}
TILE_PX = 80  # pixels per panel side: 100 lesions stay around 1-2 MB
TILE_GAP = 2
TILE_SCALE = 1.5  # shown larger than stored: small files, readable tiles (CSS keeps pixels crisp)
FOV_MM = (24.0, 96.0)  # tile field of view: at least some context, at most a good part of a hemisphere
THIS_LESION_RGB = (255, 48, 48)
OTHER_LESION_RGB = (0, 190, 255)
SPLIT_SIBLING_RGB = (255, 200, 0)  # lesions cut from the same confluent component (--lesion-split auto)
SUMMARY_LABELS = {
    "n_lesions": "Lesions",
    "n_rimplus": "Rim+ lesions",
    "lesion_volume_mm3": "Lesion volume (mm³)",
    "rimplus_volume_mm3": "Rim+ volume (mm³)",
    "threshold": "Probability threshold",
    "operating_point": "Operating point",
    "model_id": "Model",
    "n_rimplus_expected": "Expected rim+ lesions (sum of the rim+ probabilities, calibrated when the model has a map)",
    "n_rimplus_ci_low": "Rim+ count, 95 % interval: low",
    "n_rimplus_ci_high": "Rim+ count, 95 % interval: high",
    "calibration": "Calibration of the probabilities",
}


IDENTITY_KEYS = ("participant_id", "session")  # the summary's own copy of what the page title already says


def _label(prefix: str, value: str) -> str:
    value = str(value)
    return value if value.startswith(f"{prefix}-") else f"{prefix}-{value}"


def _load(path: Path | None, what: str, notes: list[str], dtype: type = np.float32) -> nib.Nifti1Image | None:
    """Load an image or note why not: a report should still render when part of a run failed."""
    if path is None or not Path(path).is_file():
        notes.append(f"WARNING (report): {what} not found ({path}); its panels are left out.")
        return None
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes a visible note, not a crash
        notes.append(f"WARNING (report): could not read {what} ({path}): {exc}")
        return None
    return nib.Nifti1Image(data.reshape(data.shape[:3]) if data.ndim > 3 else data, img.affine)


def _same_grid(ref: nib.Nifti1Image, other: nib.Nifti1Image | None, what: str,
               notes: list[str]) -> nib.Nifti1Image | None:
    if other is None:
        return None
    if other.shape[:3] != ref.shape[:3] or not np.allclose(other.affine, ref.affine, atol=1e-3):
        notes.append(f"WARNING (report): {what} is not on the QSM grid ({other.shape} vs {ref.shape}); left out.")
        return None
    return other


def order_lesions(lesion_table: pd.DataFrame) -> pd.DataFrame:
    """Review order: rim+ first, then decreasing probability (missing last), then lesion id."""
    if lesion_table.empty:
        return lesion_table.copy()
    df = lesion_table.copy()
    rim = pd.to_numeric(df.get("rim_positive", pd.Series(0, index=df.index)), errors="coerce").fillna(0)
    prob = pd.to_numeric(df.get("probability", pd.Series(np.nan, index=df.index)), errors="coerce")
    keys = pd.DataFrame({"rim": -rim, "prob": (-prob).fillna(np.inf), "id": df["lesion_id"].astype(int)})
    return df.loc[keys.sort_values(["rim", "prob", "id"], kind="mergesort").index]


def _centre_voxel(row: pd.Series, affine: np.ndarray, labels: np.ndarray | None, lesion_id: int) -> np.ndarray | None:
    """Lesion centre in voxel indices: the table's world centroid, else the lesion map's centre of mass."""
    cols = ("centroid_x_mm", "centroid_y_mm", "centroid_z_mm")
    xyz = pd.to_numeric(pd.Series([row.get(c) for c in cols]), errors="coerce").to_numpy(dtype=float)
    if np.all(np.isfinite(xyz)):
        return nib.affines.apply_affine(np.linalg.inv(affine), xyz)
    if labels is not None and np.any(labels == lesion_id):
        return np.asarray(ndimage.center_of_mass(labels == lesion_id))
    return None


def _sample(img2d: np.ndarray, plane: Plane, centre: tuple[float, float], fov_mm: float, order: int,
            cval: float) -> np.ndarray:
    """Resample a screen slice to a TILE_PX square of `fov_mm` around `centre` (physical aspect kept)."""
    offsets = (np.arange(TILE_PX) - (TILE_PX - 1) / 2.0) * (fov_mm / TILE_PX)
    rows = centre[0] + offsets / plane.row_mm
    cols = centre[1] + offsets / plane.col_mm
    grid = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(img2d, grid, order=order, mode="constant", cval=cval, prefilter=False)


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _lesion_tile(
    lesion_id: int,
    voxel: np.ndarray,
    volume_mm3: float,
    qsm: np.ndarray,
    flair: np.ndarray | None,
    labels: np.ndarray | None,
    plane: Plane,
    qsm_window: tuple[float, float],
    flair_window: tuple[float, float],
    siblings: frozenset[int] = frozenset(),
) -> tuple[np.ndarray, int]:
    """RGB sprite [QSM | QSM + outline | FLAIR + outline] through the lesion's axial (k) slice.

    Outlines: this lesion red, lesions split from the same confluent component (``siblings``)
    yellow, every other lesion blue, so a rater sees at a glance where a blob was cut.
    """
    shape = qsm.shape
    k = int(np.clip(round(float(voxel[plane.axis])), 0, shape[plane.axis] - 1))
    lab2d = plane.take(labels, k) if labels is not None else None
    if lab2d is not None and not np.any(lab2d == lesion_id) and np.any(labels == lesion_id):
        # non-convex lesion whose centre falls outside it: show its largest slice instead
        counts = np.sum(labels == lesion_id, axis=tuple(a for a in range(3) if a != plane.axis))
        k = int(np.argmax(counts))
        lab2d = plane.take(labels, k)
    centre = plane.to_screen(voxel, shape)
    diameter = (6.0 * max(volume_mm3, 0.0) / math.pi) ** (1.0 / 3.0) if math.isfinite(volume_mm3) else 0.0
    extent = 0.0
    if lab2d is not None and np.any(lab2d == lesion_id):
        rr, cc = np.nonzero(lab2d == lesion_id)
        extent = max(np.ptp(rr) * plane.row_mm, np.ptp(cc) * plane.col_mm)
    fov = float(np.clip(max(4.0 * diameter, 1.6 * extent), *FOV_MM))

    grey_q = window_to_uint8(_sample(plane.take(qsm, k), plane, centre, fov, 1, np.nan), *qsm_window)
    panels = [np.repeat(grey_q[..., None], 3, axis=2), np.repeat(grey_q[..., None], 3, axis=2)]
    if flair is not None:
        grey_f = window_to_uint8(_sample(plane.take(flair, k), plane, centre, fov, 1, np.nan), *flair_window)
        panels.append(np.repeat(grey_f[..., None], 3, axis=2))
    # small ticks on the plain QSM panel point at the centre without covering the rim
    mid = TILE_PX // 2
    for r0, c0 in ((slice(0, 4), mid), (slice(TILE_PX - 4, TILE_PX), mid)):
        panels[0][r0, c0] = THIS_LESION_RGB
    for r0, c0 in ((mid, slice(0, 4)), (mid, slice(TILE_PX - 4, TILE_PX))):
        panels[0][r0, c0] = THIS_LESION_RGB
    if lab2d is not None:
        lab = _sample(lab2d.astype(np.float32), plane, centre, fov, 0, 0.0).astype(np.int64)
        this = _outline(lab == lesion_id)
        sibling = np.isin(lab, list(siblings)) if siblings else np.zeros(lab.shape, dtype=bool)
        other = _outline((lab > 0) & (lab != lesion_id) & ~sibling)
        sibling = _outline(sibling)
        for panel in panels[1:]:
            panel[other] = OTHER_LESION_RGB
            panel[sibling] = SPLIT_SIBLING_RGB
            panel[this] = THIS_LESION_RGB
    for panel in panels:
        label_edges(panel, *plane.col_labels)
    gap = np.full((TILE_PX, TILE_GAP, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for i, panel in enumerate(panels):
        parts.extend([gap, panel] if i else [panel])
    return np.concatenate(parts, axis=1), k


BRAIN_ERODE_MM = 4.0  # cuts the scalp (as bright as brain on FLAIR) off at the dark skull
CLOSE_MM = 2.0  # sulci narrower than about twice this are filled
MASK_VOXEL_MM = 1.5  # the brain mask is found on a grid about this coarse
SAGITTAL_OFFSET_MM = 12.0  # the sagittal cut goes through the right hemisphere, not the midline's fissure


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample: the cut maximising the between-class variance."""
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight = np.cumsum(hist).astype(float)
    mean = np.cumsum(hist * centres)
    total, grand = weight[-1], mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (grand * weight - total * mean) ** 2 / (weight * (total - weight))
    between[~np.isfinite(between)] = -1.0
    best = np.flatnonzero(between >= between.max() * (1.0 - 1e-9))  # empty bins between classes tie:
    return float(edges[1:][int(best[len(best) // 2])])  # take the middle of the gap


def flair_brain_mask(flair: np.ndarray, zooms: Sequence[float], seed: Sequence[float] | None = None,
                     erode_mm: float = BRAIN_ERODE_MM) -> np.ndarray:
    """The brain of the registered FLAIR from its own intensities: what the registration contour traces.

    Otsu's threshold over the non-zero voxels separates tissue from CSF, skull and background; an erosion
    of `erode_mm` detaches the scalp, the component at `seed` (voxel indices; the largest one otherwise) is
    kept and grown back inside the threshold, then closed by CLOSE_MM so thin sulci do not clutter the
    contour. Ventricles stay holes, so their edges are traced too. Taken from the FLAIR alone, never from
    the QSM, so the contour over the QSM shows the alignment.
    """
    full = np.nan_to_num(np.asarray(flair, dtype=np.float32))
    # on a grid of about MASK_VOXEL_MM (a display contour needs no finer; 4 distance maps of a 0.75 mm grid
    # would take tens of seconds), brought back to the image's grid at the end
    step = tuple(max(1, int(round(MASK_VOXEL_MM / float(z)))) for z in zooms)
    data = full[::step[0], ::step[1], ::step[2]]
    zooms = tuple(float(z) * s for z, s in zip(zooms, step))
    seed = None if seed is None else tuple(float(c) / s for c, s in zip(seed, step))
    brain = _brain_mask_on_grid(data, zooms, seed, erode_mm)
    for axis, s in enumerate(step):
        brain = np.repeat(brain, s, axis=axis)
    return brain[: full.shape[0], : full.shape[1], : full.shape[2]]


def _brain_mask_on_grid(data: np.ndarray, zooms: tuple[float, ...], seed: tuple[float, ...] | None,
                        erode_mm: float) -> np.ndarray:
    """flair_brain_mask's work on one grid."""
    values = data[data > 0]
    if values.size < 100:
        return np.zeros(data.shape, dtype=bool)
    tissue = data > _otsu(values)
    core = ndimage.distance_transform_edt(tissue, sampling=zooms) > erode_mm
    labels, n = ndimage.label(core)
    if n == 0:
        labels, n = ndimage.label(tissue)
        if n == 0:
            return tissue
    keep = 0
    if seed is not None:
        ijk = tuple(int(np.clip(round(float(c)), 0, d - 1)) for c, d in zip(seed, data.shape))
        keep = int(labels[ijk])
    if keep == 0:
        keep = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    grown = (ndimage.distance_transform_edt(labels != keep, sampling=zooms) <= erode_mm + max(zooms)) & tissue
    pieces, _ = ndimage.label(grown)
    brain = np.isin(pieces, np.unique(pieces[labels == keep]))
    # a closing of CLOSE_MM fills sulci and the fissure (thin CSF) and keeps the ventricles: a readable contour
    dilated = ndimage.distance_transform_edt(~brain, sampling=zooms) <= CLOSE_MM
    return ndimage.distance_transform_edt(dilated, sampling=zooms) > CLOSE_MM


@dataclass(frozen=True)
class RegistrationCut:
    """One orthogonal cut of the registration check, as drawn (screen orientation of `plane`)."""

    view: str
    plane: Plane
    index: int
    qsm: np.ndarray
    flair: np.ndarray
    brain: np.ndarray  # the FLAIR's brain mask (flair_brain_mask) on this cut


def registration_cuts(qsm: np.ndarray, flair: np.ndarray, affine: np.ndarray) -> list[RegistrationCut]:
    """Sagittal, coronal and axial cuts through the brain centre, radiological, with the FLAIR's brain.

    The sagittal cut is moved SAGITTAL_OFFSET_MM to the patient's right: through the midline it would cut
    along the interhemispheric fissure, whose CSF the contour then traces.
    """
    support = np.isfinite(qsm) & (qsm != 0)
    if not support.any():
        support = flair > 0
    centre = (np.asarray(ndimage.center_of_mass(support)) if support.any() else (np.asarray(qsm.shape) - 1) / 2.0)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    brain = flair_brain_mask(flair, zooms, seed=centre)
    names = {0: "sagittal", 1: "coronal", 2: "axial"}
    ornt = nib.orientations.io_orientation(affine)
    cuts = []
    for axis in sorted(range(3), key=lambda a: -ornt[a, 0]):
        plane = Plane.from_affine(affine, axis)
        at = centre[axis]
        if ornt[axis, 0] == 0:  # the voxel axis along world x: +1 voxel moves ornt[axis, 1] * zoom mm in x
            at += ornt[axis, 1] * SAGITTAL_OFFSET_MM / zooms[axis]
        idx = int(np.clip(round(at), 0, qsm.shape[axis] - 1))
        cuts.append(RegistrationCut(names[int(ornt[axis, 0])], plane, idx, plane.take(qsm, idx),
                                    plane.take(flair, idx), plane.take(brain, idx)))
    return cuts


def _gate_paragraph(registration: Mapping[str, Any]) -> str:
    """The registration gate's verdict and the target used, in words (empty when not recorded)."""
    if "RegistrationGate" not in registration:
        return ""
    value, limit = registration.get("RegistrationGateValueMM"), registration.get("RegistrationGateThresholdMM")
    target = esc(str(registration.get("RegistrationTarget", "n/a")))
    if registration["RegistrationGate"] == "n/a":
        return (f'<p class="msg-warning">Registration gate not measured: '
                f'{esc(str(registration.get("RegistrationGateNotMeasured", "")))}; target: {target}. Check the '
                "overlay below.</p>")
    if registration["RegistrationGate"] == "fail":
        return (f'<p class="msg-error"><strong>Registration gate FAILED</strong>: the registered FLAIR disagrees with the '
                f"brain outlines by {fmt(value)} mm (threshold {fmt(limit)} mm; target: {target}). Lesion masks and "
                "FLAIR patches may sample the wrong tissue; this unit's counts are left out of the group analysis "
                "unless the group level runs with --keep-failed-registration.</p>")
    return (f"<p>Registration gate passed: {fmt(value)} mm disagreement with the brain outlines "
            f"(threshold {fmt(limit)} mm); target: {target}.</p>")


def _registration_figure(qsm: np.ndarray, flair: np.ndarray, affine: np.ndarray,
                         qsm_window: tuple[float, float], flair_window: tuple[float, float]) -> str:
    """Three orthogonal cuts through the brain centre: the FLAIR's brain contour over QSM, and a checkerboard."""
    fig = new_figure(10.5, 7.0)
    axes = fig.subplots(2, 3)
    for col, cut in enumerate(registration_cuts(qsm, flair, affine)):
        plane, q, f = cut.plane, cut.qsm, cut.flair
        extent = (0, q.shape[1] * plane.col_mm, q.shape[0] * plane.row_mm, 0)
        ax = axes[0, col]
        ax.imshow(np.nan_to_num(q), cmap="gray", vmin=qsm_window[0], vmax=qsm_window[1], extent=extent,
                  interpolation="nearest")
        yy = (np.arange(q.shape[0]) + 0.5) * plane.row_mm
        xx = (np.arange(q.shape[1]) + 0.5) * plane.col_mm
        if cut.brain.any() and not cut.brain.all():
            ax.contour(xx, yy, cut.brain.astype(np.float32), levels=[0.5], colors=["#ff3030"], linewidths=0.8)
        ax.set_title(f"{cut.view} (voxel index {cut.index} of axis {'ijk'[plane.axis]})", fontsize=9)
        # checkerboard of the two windowed images, 16 mm squares
        qn = np.clip((np.nan_to_num(q) - qsm_window[0]) / (qsm_window[1] - qsm_window[0]), 0, 1)
        qn[~np.isfinite(q) | (q == 0)] = 0.0  # outside the QSM mask: black like the FLAIR background
        fn = np.clip((np.nan_to_num(f) - flair_window[0]) / (flair_window[1] - flair_window[0]), 0, 1)
        rr = (np.arange(q.shape[0]) * plane.row_mm // 16).astype(int)
        cc = (np.arange(q.shape[1]) * plane.col_mm // 16).astype(int)
        board = ((rr[:, None] + cc[None, :]) % 2).astype(bool)
        axes[1, col].imshow(np.where(board, qn, fn), cmap="gray", vmin=0, vmax=1, extent=extent,
                            interpolation="nearest")
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel("")
            w, h = extent[1], extent[2]
            style = dict(color="yellow", fontsize=9, fontweight="bold", ha="center", va="center")
            ax.text(0.03 * w, 0.5 * h, plane.col_labels[0], **style)
            ax.text(0.97 * w, 0.5 * h, plane.col_labels[1], **style)
            ax.text(0.5 * w, 0.04 * h, plane.row_labels[0], **style)
            ax.text(0.5 * w, 0.96 * h, plane.row_labels[1], **style)
    axes[0, 0].set_ylabel("QSM + FLAIR brain contour", fontsize=9)
    axes[1, 0].set_ylabel("checkerboard QSM/FLAIR", fontsize=9)
    fig.tight_layout()
    return figure_data_uri(fig, dpi=90)


def _summary_section(subject: str, session: str | None, summary: Mapping[str, Any], n_rows: int, n_rim: int,
                     inputs: Mapping[str, str], versions: Mapping[str, str]) -> str:
    n_lesions = summary.get("n_lesions", n_rows)
    n_rimplus = summary.get("n_rimplus", n_rim)
    headline = (
        f"<p><b>{esc(fmt(n_lesions))}</b> lesion(s), <b>{esc(fmt(n_rimplus))}</b> classified rim+"
        f" (probability threshold {esc(fmt(summary.get('threshold')))},"
        f" operating point {esc(fmt(summary.get('operating_point')))},"
        f" model {esc(fmt(summary.get('model_id')))}).</p>"
    )
    if summary.get("n_rimplus_expected") is not None and str(summary.get("n_rimplus_expected")) != "nan":
        headline += (f"<p>Expected rim+ count {esc(fmt(summary['n_rimplus_expected']))}, 95 % interval "
                     f"{esc(fmt(summary.get('n_rimplus_ci_low')))}-{esc(fmt(summary.get('n_rimplus_ci_high')))} "
                     f"(from the rim+ probabilities, calibrated when the model has a map; calibration: {esc(fmt(summary.get('calibration')))}).</p>")
    known = [(SUMMARY_LABELS[k], summary[k]) for k in SUMMARY_LABELS if k in summary]
    extra = [(k, v) for k, v in summary.items() if k not in SUMMARY_LABELS and k not in IDENTITY_KEYS]
    ident = [("Participant", subject)] + ([("Session", session)] if session else [])
    return (
        '<section id="summary"><h2>Summary</h2>' + headline
        + kv_table(ident + known + extra)
        + "<h3>Inputs found</h3>" + kv_table(inputs, "No inputs were recorded.")
        + "<h3>Software versions</h3>" + kv_table(versions, "No versions were recorded.")
        + "</section>"
    )


def split_groups(lesion_table: pd.DataFrame) -> dict[int, list[int]]:
    """Confluent component id -> the lesion ids split from it (from the tables' ``split_from``)."""
    if "split_from" not in lesion_table or lesion_table.empty:
        return {}
    component = pd.to_numeric(lesion_table["split_from"], errors="coerce")
    groups: dict[int, list[int]] = {}
    for lesion_id, comp in zip(lesion_table["lesion_id"].astype(int), component):
        if pd.notna(comp):
            groups.setdefault(int(comp), []).append(int(lesion_id))
    return {k: sorted(v) for k, v in sorted(groups.items())}


def _split_of(lesion_id: int, groups: Mapping[int, list[int]]) -> tuple[int | None, list[int]]:
    for comp, ids in groups.items():
        if lesion_id in ids:
            return comp, [i for i in ids if i != lesion_id]
    return None, []


def _rater_labels(annotations: pd.DataFrame | None) -> dict[int, float]:
    """lesion_id -> the rater's label (1 rim+, 0 rim-, NaN unlabelled); empty without annotations."""
    if annotations is None or annotations.empty:
        return {}
    values = pd.to_numeric(annotations["rim_positive"], errors="coerce")
    return dict(zip(annotations["lesion_id"].astype(int), values))


def _rater_caption(lesion_id: int, rim: bool, rater: Mapping[int, float]) -> str:
    """' · rater: rim+' for the tile caption, marked when it disagrees with the model."""
    if lesion_id not in rater:
        return ""
    value = rater[lesion_id]
    if pd.isna(value):
        return "<br>rater: no label"
    css = "ok" if bool(int(value) == 1) == rim else "bad"
    return f'<br>rater: <span class="{css}">{esc(_rater_cell(value))}</span>'


def _lesion_sections(ordered: pd.DataFrame, tiles: Mapping[int, tuple[str, int, int]], qsm_units: str,
                     qsm_window: tuple[float, float], has_flair: bool, dseg_has_lesions: bool,
                     rater: Mapping[int, float] | None = None) -> str:
    if ordered.empty:
        note = (" The lesion map does contain labelled voxels, so the table and map disagree: check the run's "
                "messages below." if dseg_has_lesions else "")
        return ('<section id="lesions"><h2>Lesions</h2><p class="empty-lesions">No lesions were found for this '
                f"participant: there is nothing to review.{esc(note)}</p></section>")
    rows, figures = [], []
    groups = split_groups(ordered)
    for rank, (_, row) in enumerate(ordered.iterrows(), start=1):
        lid = int(row["lesion_id"])
        comp, siblings = _split_of(lid, groups)
        split_cell = (f"{comp} (with {', '.join(map(str, siblings))})" if comp is not None else "")
        split_caption = (f"<br>split from confluent component {comp} with lesion(s) "
                         f"{esc(', '.join(map(str, siblings)))} (yellow)" if comp is not None else "")
        rim = _is_rim(row.get("rim_positive"))
        tag = '<span class="tag rimpos">rim+</span>' if rim else '<span class="tag rimneg">rim−</span>'
        prob, unc = row.get("probability"), row.get("uncertainty")
        vol = row.get("volume_mm3")
        rows.append([
            str(rank), f'<a href="#lesion-{lid}">{lid}</a>', tag, esc(_fixed(prob, 3)), esc(_fixed(unc, 3)),
            esc(_fixed(vol, 1)), esc(fmt(row.get("voxels"))),
            esc(", ".join(_fixed(row.get(c), 1) for c in ("centroid_x_mm", "centroid_y_mm", "centroid_z_mm"))),
            esc(split_cell),
        ])
        uri, k, width = tiles.get(lid, (None, -1, 0))
        legend = "QSM | QSM + outline | FLAIR + outline" if has_flair else "QSM | QSM + outline"
        size = f' title="{esc(legend)}" width="{round(TILE_SCALE * width)}"'
        image = (img_tag(uri, f"lesion {lid}: {legend}", "tile", size) if uri
                 else "<p>(no image: QSM not available)</p>")
        figures.append(
            f'<figure class="lesion{" rimpos" if rim else ""}" id="lesion-{lid}">{image}<figcaption>'
            f"<b>Lesion {lid}</b> {tag} #{rank}<br>p = {esc(_fixed(prob, 3))} ± {esc(_fixed(unc, 3))}"
            f" · {esc(_fixed(vol, 1))} mm³{f' · k = {k}' if k >= 0 else ''}{split_caption}"
            f"{_rater_caption(lid, rim, rater or {})}</figcaption></figure>"
        )
    panels = "QSM | QSM + outline | FLAIR + outline" if has_flair else "QSM | QSM + outline"
    caption = (
        f'<p class="caption">Each tile: {panels}, through the lesion centre on the axial (k) slice of the QSM '
        f"grid (the slice index k is given), radiological convention as on the review page (the patient's right"
        f" on the image's left, labelled R and L on each panel; anterior up). "
        f"QSM in {esc(qsm_units)}, fixed window {fmt(qsm_window[0])} to {fmt(qsm_window[1])} {esc(qsm_units)}"
        " (paramagnetic bright); FLAIR window: 1st-99.5th percentile of the brain. Red: this lesion's outline"
        " (and centre ticks on the plain QSM); yellow: lesions split from the same confluent component"
        " (--lesion-split auto); blue: other lesions. Field of view adapts to lesion size "
        f"({FOV_MM[0]:.0f}-{FOV_MM[1]:.0f} mm).</p>"
    )
    table_html = table(
        ["#", "lesion", "class", "probability", "uncertainty", "volume (mm³)", "voxels", "centroid x, y, z (mm)",
         "split from component"],
        rows, numeric=[True, True, False, True, True, True, True, False, False],
    )
    split_note = ""
    if groups:
        listing = "; ".join(f"component {comp}: lesions {', '.join(map(str, ids))}" for comp, ids in groups.items())
        split_note = (f'<p class="split-summary">{len(groups)} confluent component(s) were split automatically '
                      f"into {sum(map(len, groups.values()))} lesions ({esc(listing)}). Check their tiles: "
                      "yellow outlines are the other parts of the same component.</p>")
    return (
        '<section id="review"><h2>Review list</h2><p class="caption">Rim+ first, then by decreasing '
        "probability; click a lesion id to jump to its tile.</p>" + split_note + table_html + "</section>"
        '<section id="lesions"><h2>Lesion mosaic</h2>' + caption
        + '<div class="mosaic">' + "".join(figures) + "</div></section>"
    )


def _is_rim(value: Any) -> bool:
    try:
        return bool(int(float(value)) == 1)
    except (TypeError, ValueError):
        return False


def rater_vs_model(lesion_table: pd.DataFrame, annotations: pd.DataFrame) -> pd.DataFrame:
    """One row per lesion: the rater's label beside the model's, disagreements first.

    Columns `lesion_id, rater` (1 rim+, 0 rim-, NaN unlabelled), `model` (1/0), `probability`, `status`
    (`missed`: rater rim+, model rim-; `extra`: model rim+, rater rim-; `agree`; `unlabelled`). Within a
    status, decreasing probability, so the closest calls of each kind are together.
    """
    rater = annotations[["lesion_id", "rim_positive"]].rename(columns={"rim_positive": "rater"})
    rater = rater.assign(lesion_id=rater["lesion_id"].astype(int),
                         rater=pd.to_numeric(rater["rater"], errors="coerce"))
    ids = lesion_table["lesion_id"].astype(int).to_numpy() if "lesion_id" in lesion_table else np.zeros(0, int)
    calls = lesion_table["rim_positive"] if "rim_positive" in lesion_table else pd.Series(0, index=lesion_table.index)
    probability = (pd.to_numeric(lesion_table["probability"], errors="coerce").to_numpy(dtype=float)
                   if "probability" in lesion_table else np.full(len(ids), np.nan))
    model = pd.DataFrame({"lesion_id": ids, "model": [float(_is_rim(v)) for v in calls],
                          "probability": probability})
    both = model.merge(rater, on="lesion_id", how="outer")
    status = np.select([both["rater"].isna() | both["model"].isna(), (both["rater"] == 1) & (both["model"] == 0),
                        (both["rater"] == 0) & (both["model"] == 1)], ["unlabelled", "missed", "extra"], "agree")
    both["status"] = status
    order = {"missed": 0, "extra": 1, "agree": 2, "unlabelled": 3}
    keys = pd.DataFrame({"s": both["status"].map(order), "p": (-both["probability"]).fillna(np.inf),
                         "id": both["lesion_id"]})
    return both.loc[keys.sort_values(["s", "p", "id"], kind="mergesort").index].reset_index(drop=True)


def _rater_cell(value: Any) -> str:
    if pd.isna(value):
        return "no label"
    return "rim+" if int(value) == 1 else "rim\u2212"


def _annotations_section(lesion_table: pd.DataFrame, annotations: pd.DataFrame | None) -> str:
    """The rater's rim labels given as input, lesion by lesion beside the model's calls."""
    head = '<section id="annotations"><h2>Rater vs model</h2>'
    if annotations is None:
        return ""
    both = rater_vs_model(lesion_table, annotations)
    labelled = both[both["status"] != "unlabelled"]
    n_rater = int((labelled["rater"] == 1).sum())
    n_model = int((labelled["model"] == 1).sum())
    missed, extra = (both["status"] == "missed").sum(), (both["status"] == "extra").sum()
    agree = int((both["status"] == "agree").sum())
    found = n_rater - int(missed)
    text = (f"<p class=\"rater-summary\">The rim annotations given as input label <b>{len(labelled)}</b> of "
            f"{len(both)} lesion(s): the rater calls <b>{n_rater}</b> rim+, the model <b>{n_model}</b> of the same "
            f"lesions. They agree on <b>{agree}</b> of {len(labelled)}: the model finds {found} of the rater's "
            f"{n_rater} rim+ lesion(s), misses {int(missed)} and calls {int(extra)} rim+ that the rater marked "
            "rim\u2212.</p>")
    rows = []
    for _, row in both.iterrows():
        lid = int(row["lesion_id"])
        css = {"missed": "bad", "extra": "bad", "agree": "ok"}.get(row["status"], "")
        status = {"missed": "disagree: rater rim+, model rim\u2212", "extra": "disagree: model rim+, rater rim\u2212",
                  "agree": "agree", "unlabelled": "not labelled by the rater"}[row["status"]]
        model = "n/a" if pd.isna(row["model"]) else ("rim+" if int(row["model"]) == 1 else "rim\u2212")
        rows.append([f'<a href="#lesion-{lid}">{lid}</a>', esc(_rater_cell(row["rater"])), esc(model),
                     esc(_fixed(row["probability"], 3)), f'<span class="{css}">{esc(status)}</span>'])
    return (head + text + '<p class="caption">Disagreements first (rater rim+ the model missed, then model rim+ '
            "the rater marked rim\u2212), each by decreasing probability; the rater's label is the majority of "
            "the annotation's voxels in the lesion.</p>"
            + table(["lesion", "rater", "model", "probability", ""], rows,
                    numeric=[True, False, False, True, False]) + "</section>")


def _messages_section(messages: Sequence[str]) -> str:
    if not messages:
        return '<section id="messages"><h2>Errors and warnings</h2><p>None were recorded for this run.</p></section>'
    items = []
    for msg in messages:
        low = str(msg).lower()
        css = "msg-error" if "error" in low.split(":")[0] or low.startswith("error") else "msg-warning"
        items.append(f'<li class="{css}">{esc(msg)}</li>')
    return f'<section id="messages"><h2>Errors and warnings</h2><ul>{"".join(items)}</ul></section>'


def _tiles(ordered: pd.DataFrame, affine: np.ndarray, qsm_data: np.ndarray, flair_data: np.ndarray | None,
           labels: np.ndarray | None, qsm_window: tuple[float, float], flair_window: tuple[float, float],
           notes: list[str]) -> dict[int, tuple[str, int, int]]:
    """lesion_id -> (sprite PNG data URI, frames, frame width) of every lesion with a centre."""
    tiles: dict[int, tuple[str, int, int]] = {}
    groups = split_groups(ordered)
    plane = Plane.from_affine(affine, 2)
    for _, row in ordered.iterrows():
        lid = int(row["lesion_id"])
        voxel = _centre_voxel(row, affine, labels, lid)
        if voxel is None:
            notes.append(f"WARNING (report): lesion {lid} has no centroid and is not in the map; no tile.")
            continue
        vol = float(pd.to_numeric(pd.Series([row.get("volume_mm3")]), errors="coerce").iloc[0])
        sprite, k = _lesion_tile(lid, voxel, vol, qsm_data, flair_data, labels, plane, qsm_window,
                                 flair_window, frozenset(_split_of(lid, groups)[1]))
        tiles[lid] = (png_data_uri(sprite), k, sprite.shape[1])
    return tiles


def _registration_section(qsm_data: np.ndarray | None, flair_data: np.ndarray | None, affine: np.ndarray | None,
                          qsm_units: str, qsm_window: tuple[float, float], flair_window: tuple[float, float],
                          registration: Mapping[str, Any] | None) -> str:
    reg_html = '<section id="registration"><h2>Registration check</h2>' + _gate_paragraph(registration or {})
    if qsm_data is not None and flair_data is not None:
        uri = _registration_figure(qsm_data, flair_data, affine, qsm_window, flair_window)
        reg_html += (
            img_tag(uri, "registration check: FLAIR contour over QSM and QSM/FLAIR checkerboard")
            + '<p class="caption">Top: QSM (' + esc(qsm_units) + ", window "
            + f"{fmt(qsm_window[0])} to {fmt(qsm_window[1])}) with the outline of the brain in the registered "
            "FLAIR (red: its own Otsu threshold, the scalp cut off at the skull, sulci closed; ventricle edges "
            "inside). It should follow the QSM's brain edge and ventricles. Bottom: 16 mm checkerboard "
            "alternating QSM and FLAIR; edges should continue across squares. Cuts through the brain centre "
            f"(sagittal: {SAGITTAL_OFFSET_MM:.0f} mm to the right of it, off the midline); "
            "radiological convention (the patient's right on the image's left, as labelled).</p>"
        )
    else:
        reg_html += "<p>No registration figure: the QSM or the registered FLAIR is not available.</p>"
    return reg_html + kv_table(registration or {}, "No registration check values were recorded.") + "</section>"


def write_participant_report(
    out_file: Path,
    *,
    subject: str,
    session: str | None,
    qsm: Path,
    flair_in_qsm: Path,
    lesions_dseg: Path,
    lesion_table: pd.DataFrame,
    summary: Mapping[str, Any],
    inputs: Mapping[str, str],
    versions: Mapping[str, str],
    registration: Mapping[str, Any] | None = None,
    messages: Sequence[str] = (),
    qsm_units: str = "ppb",
    annotations: pd.DataFrame | None = None,
) -> Path:
    """Write `out_file` (a self-contained HTML page) for one participant/session and return its path.

    Missing or mismatched images do not abort the report; they become warnings on the page, because the
    report is most needed exactly when part of a run went wrong. `annotations` (lesion_id, rim_positive:
    the rater's labels carried onto the lesions) adds the rater-vs-model section and the rater's label to
    each tile.
    """
    if qsm_units not in QSM_WINDOW:
        raise ValueError(f"qsm_units must be one of {sorted(QSM_WINDOW)}, got {qsm_units!r}")
    subject = _label("sub", subject)
    session = _label("ses", session) if session else None
    notes: list[str] = []
    qsm_img = _load(qsm, "QSM", notes)
    flair_img = _load(flair_in_qsm, "FLAIR in QSM space", notes)
    dseg_img = _load(lesions_dseg, "lesion map", notes, dtype=np.int32)
    if qsm_img is not None:
        flair_img = _same_grid(qsm_img, flair_img, "FLAIR in QSM space", notes)
        dseg_img = _same_grid(qsm_img, dseg_img, "lesion map", notes)
    qsm_data = np.asanyarray(qsm_img.dataobj) if qsm_img is not None else None
    flair_data = np.asanyarray(flair_img.dataobj) if flair_img is not None else None
    labels = np.asanyarray(dseg_img.dataobj) if dseg_img is not None else None

    ordered = order_lesions(lesion_table)
    n_rim = int(sum(_is_rim(v) for v in ordered.get("rim_positive", [])))
    n_summary = pd.to_numeric(pd.Series([summary.get("n_lesions")]), errors="coerce").iloc[0]
    if pd.notna(n_summary) and int(n_summary) != len(ordered):
        notes.append(f"WARNING (report): summary says {summary['n_lesions']} lesions, the table has {len(ordered)}.")
    if labels is not None:
        in_map = set(np.unique(labels[labels > 0]).tolist())
        missing = sorted(set(ordered["lesion_id"].astype(int)) - in_map) if not ordered.empty else []
        if missing:
            notes.append(f"WARNING (report): lesion ids {missing} are in the table but not in the lesion map.")

    qsm_window = QSM_WINDOW[qsm_units]
    flair_window = robust_window(flair_data) if flair_data is not None else (0.0, 1.0)
    tiles: dict[int, tuple[str, int, int]] = {}
    if qsm_data is not None and not ordered.empty:
        tiles = _tiles(ordered, qsm_img.affine, qsm_data, flair_data, labels, qsm_window, flair_window, notes)

    title = f"qsmrim: {subject}" + (f" {session}" if session else "")
    body = _summary_section(subject, session, summary, len(ordered), n_rim, inputs, versions)
    body += _registration_section(qsm_data, flair_data, qsm_img.affine if qsm_img is not None else None,
                                  qsm_units, qsm_window, flair_window, registration)
    body += _annotations_section(ordered, annotations)
    body += _lesion_sections(ordered, tiles, qsm_units, qsm_window, flair_data is not None,
                             bool(labels is not None and np.any(labels > 0)), _rater_labels(annotations))
    body += _messages_section([*messages, *notes])
    nav = [("summary", "Summary"), ("registration", "Registration")]
    nav += [("annotations", "Rater vs model")] if annotations is not None else []
    nav += [("review", "Review list")] if not ordered.empty else []
    nav += [("lesions", "Lesions"), ("messages", "Errors and warnings")]
    return write_text(Path(out_file), page(title, nav, body))
