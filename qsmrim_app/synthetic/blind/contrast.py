"""FLAIR and GRE-magnitude synthesis from the background's tissue model and the placed lesions.

Magnitude (QSM grid): M = PD exp(-TE R2*), PD 0.68 (WM) / 0.80 (GM) / 1.0 (CSF), R2* 20 / 14 / 4 s^-1
plus kappa * max(chi, 0) with kappa ~ U(0.08, 0.15) s^-1 per ppb (iron and veins, haemorrhage darkest),
lesions PD +10 % and R2* -25 % (demyelination), TE ~ U(15, 25) ms, a multiplicative bias (quadratic
log-polynomial, up to U(5, 20) %) and Rician noise at SNR ~ U(20, 60) relative to the brain mean.
FLAIR (its own grid): WM 1, GM ~ U(1.15, 1.4), CSF ~ U(0.1, 0.3), iron-rich deep GM x U(0.85, 0.95);
lesions x U(1.3, 2.2) of WM each, with a smooth internal heterogeneity of U(5, 15) %, partial volume
from the fine sub-sampling; bias field up to U(10, 30) %, Rician noise at SNR ~ U(15, 40) (WM), scaled
to arbitrary units x U(300, 1000). Outside the brain both images are noise only (skull-stripped look).
"""
from __future__ import annotations

import numpy as np

from .backgrounds import Background
from .geometry import apply, polynomial_field, sample, smooth_field


def head_model_on_grid(bg: Background, grid_affine: np.ndarray, shape: tuple[int, int, int],
                       world_from_head: np.ndarray, names: tuple[str, ...],
                       slice_samples: int = 1) -> dict[str, np.ndarray]:
    """Tissue maps of the background sampled on a target grid (trilinear), slab by slab for memory.

    ``slice_samples`` > 1 averages that many points across the slice (thick slices)."""
    out = {name: np.zeros(shape, dtype=np.float32) for name in names}
    vox_from_index = bg.vox_from_head @ np.linalg.inv(world_from_head) @ grid_affine
    plane = np.indices(shape[:2]).reshape(2, -1).T.astype(np.float64)
    offsets = (np.arange(slice_samples) + 0.5) / slice_samples - 0.5
    sources = {"chi": bg.chi_ppb, "mask": bg.mask.astype(np.float32), "wm": bg.wm, "csf": bg.csf,
               "deep_gm": bg.deep_gm, "bleed": None if bg.bleed is None else bg.bleed.astype(np.float32)}
    for k in range(shape[2]):
        acc = {name: 0.0 for name in names}
        for off in offsets:
            pts = np.column_stack([plane, np.full(len(plane), k + off)])
            vox = apply(vox_from_index, pts)
            for name in names:
                if sources[name] is not None:
                    acc[name] = acc[name] + sample(sources[name], vox)
        for name in names:
            if sources[name] is not None:
                out[name][:, :, k] = (acc[name] / len(offsets)).reshape(shape[:2])
    return out


def rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    real = signal + rng.normal(0, sigma, signal.shape).astype(np.float32)
    imag = rng.normal(0, sigma, signal.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


def magnitude(rng: np.random.Generator, tissue: dict[str, np.ndarray], chi_ppb: np.ndarray,
              lesion_fraction: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """(noisy magnitude, noise-free magnitude, parameters) on the QSM grid."""
    wm, csf, mask = tissue["wm"], np.clip(tissue["csf"], 0, 1), tissue["mask"]
    gm = np.clip(1.0 - wm - csf, 0, 1)
    kappa, te = float(rng.uniform(0.08, 0.15)), float(rng.uniform(15, 25))
    pd = (0.68 * wm + 0.80 * gm + 1.0 * csf) * (1 + 0.10 * lesion_fraction)
    r2s = (20.0 * wm + 14.0 * gm + 4.0 * csf + kappa * np.maximum(chi_ppb, 0)) * (1 - 0.25 * lesion_fraction)
    clean = (pd * np.exp(-te * 1e-3 * r2s) * mask).astype(np.float32)
    bias_amp = float(rng.uniform(0.05, 0.2))
    clean *= np.exp(polynomial_field(rng, clean.shape, 2, bias_amp))
    snr = float(rng.uniform(20, 60))
    mean = float(clean[mask > 0.5].mean())
    noisy = rician(rng, clean, mean / snr) * np.float32(1000.0 / mean)
    return noisy, clean / np.float32(mean), {"te_ms": te, "kappa_per_ppb": kappa, "snr": snr,
                                             "bias_amplitude": bias_amp}


def flair(rng: np.random.Generator, tissue: dict[str, np.ndarray], lesion_fraction: np.ndarray,
          lesion_ratio: np.ndarray) -> tuple[np.ndarray, dict]:
    """FLAIR on its grid; ``lesion_ratio`` is each voxel's lesion brightness relative to WM."""
    wm, csf, mask, deep = tissue["wm"], np.clip(tissue["csf"], 0, 1), tissue["mask"], tissue["deep_gm"]
    gm = np.clip(1.0 - wm - csf, 0, 1)
    g, c, dg = float(rng.uniform(1.15, 1.4)), float(rng.uniform(0.1, 0.3)), float(rng.uniform(0.85, 0.95))
    tissue_signal = (wm + g * gm * (1 - deep * (1 - dg)) + c * csf) * mask
    het = float(rng.uniform(0.05, 0.15))
    texture = 1 + het * smooth_field(rng, mask.shape, 1.5)
    signal = (1 - lesion_fraction) * tissue_signal + lesion_fraction * lesion_ratio * texture
    bias_amp = float(rng.uniform(0.1, 0.3))
    signal = signal * np.exp(polynomial_field(rng, mask.shape, 2, bias_amp))
    snr = float(rng.uniform(15, 40))
    scale = float(rng.uniform(300, 1000))
    image = rician(rng, signal.astype(np.float32), 1.0 / snr) * np.float32(scale)
    return image, {"gm_ratio": g, "csf_ratio": c, "deep_gm_factor": dg, "lesion_heterogeneity": het,
                   "bias_amplitude": bias_amp, "snr": snr, "scale": scale}
