"""From the edited susceptibility to the stored map: through a field and an inversion, or edited directly.

Participants with an odd index always go through a field, even ones with probability 0.3 (so at least
half of any family): dipole field of the edited map, noise weighted by 1/magnitude, a residual quadratic
background field, and one of three linear inversions (physics.py). The others: the edits blurred by a
Gaussian and added to the resampled map with a little smooth noise. Then every map is referenced (its
mean, its median or nothing), offset and scaled. Returns the map (ppb), the reconstructed rim component
(what the consensus rule judges) and the drawn parameters.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from . import physics
from .geometry import polynomial_field, smooth_field


def reconstruct(prng: np.random.Generator, index: int, background_ppb: np.ndarray, chi_true: np.ndarray,
                edits: np.ndarray, rim_total: np.ndarray, mask: np.ndarray, mag_clean: np.ndarray,
                voxel: np.ndarray, b0_index: np.ndarray, psf_sigma: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """(map in ppb, rim component as reconstructed in ppb, parameters); see the module docstring."""
    use_field = index % 2 == 1 or prng.random() < 0.3
    phys: dict = {"psf_sigma_vox": psf_sigma, "through_field": bool(use_field)}
    rim_blur = physics.psf_blur(rim_total, psf_sigma)
    if use_field:
        pshape = physics.padded_shape(mask.shape)
        kernel = physics.dipole_kernel(pshape, voxel, b0_index)
        method = physics.METHODS[int(prng.integers(3))]
        param = {"tkd": prng.uniform(0.12, 0.25), "tikhonov": prng.uniform(0.005, 0.03),
                 "gradient_l2": prng.uniform(0.02, 0.12)}[method]
        hfilt = physics.inversion_filter(method, kernel, pshape, voxel, float(param))
        field_ppb = physics.apply_filter(chi_true, kernel, pshape) * mask
        snr, te = float(prng.uniform(25, 80)), float(prng.uniform(15, 40))
        sigma = physics.field_noise_ppb(snr, te)
        weight = 1.0 / np.clip(mag_clean, 0.2, None)
        noise = prng.standard_normal(mask.shape).astype(np.float32) * np.float32(sigma) * weight * mask
        bg_amp = float(prng.uniform(1.0, 6.0))
        residual = polynomial_field(prng, mask.shape, 2, bg_amp) * mask
        chi_rec = physics.apply_filter(field_ppb + noise + residual, hfilt, pshape)
        rim_seen = physics.apply_filter(rim_blur, kernel * hfilt, pshape)
        phys.update({"inversion": method, "inversion_param": float(param), "field_snr": snr,
                     "effective_te_ms": te, "field_noise_ppb": sigma, "residual_background_ppb": bg_amp})
    else:
        s_in, s_sl = float(prng.uniform(0.3, 0.7)), float(prng.uniform(0.1, 0.4))
        blur = (s_in, s_in, s_sl)
        extra = float(prng.uniform(0.0, 2.0))
        noise = smooth_field(prng, mask.shape, 0.5) * np.float32(extra)
        chi_rec = background_ppb + ndimage.gaussian_filter(edits, blur) + noise
        rim_seen = ndimage.gaussian_filter(rim_blur, blur).astype(np.float32)
        phys.update({"inversion": "none (edited map)", "edit_blur_vox": list(blur), "extra_noise_ppb": extra})
    reference = ("mean", "median", "none")[int(prng.integers(3))]
    ref_value = {"mean": float(chi_rec[mask].mean()), "median": float(np.median(chi_rec[mask])), "none": 0.0}[reference]
    offset, scale = float(prng.uniform(-5, 5)), float(prng.uniform(0.92, 1.08))
    chi_out = np.where(mask, (chi_rec - ref_value + offset) * scale, 0).astype(np.float32)
    rim_seen = rim_seen * np.float32(scale)
    phys.update({"reference": reference, "offset_ppb": offset, "scale": scale})

    return chi_out, rim_seen, phys
