"""Background maps made by our own inversion of a real tissue field (issue 18: "a tissue phase there lets
you run your own inversions on a real field").

Why: a background map is one person's anatomy *and* one reconstruction's texture. Inverting the real
tissue field of the same person ourselves (total variation, tv.py) gives the same anatomy with another
reconstruction's texture, so a family can tell the two apart.

Units. The two tissue fields in ../shared/data carry no trustworthy unit (patient A's: "radians, TE stated
as 1.25, units unclear"). Rather than guess an echo time and field strength, the unit is *fitted*: the
field is compared with the forward field of the same person's published map (D * chi, same grid, B0 along
the third axis), and the least-squares scale within the eroded brain mask converts it to ppm. This assumes
only that the published map has the right overall scale; the fitted scale and the correlation of the fit
are logged and written to the head cache (`<background>_inversion.json`). A correlation well below 1 means
the two disagree on more than a scale, and the inversion refuses.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import fft, ndimage

from .physics import b0_in_grid, dipole_kernel
from .tv import tv_invert

LOGGER = logging.getLogger(__name__)

#: key -> (tissue field, brain mask, the same person's published map used for the unit fit, whose head
#: registration it shares (same person, same grid)).
OWN_INVERSIONS: dict[str, tuple[str, str, str, str]] = {
    "cosmos-tv": ("qsm_challenge_2016/phs_tissue.nii.gz", "qsm_challenge_2016/msk.nii.gz",
                  "qsm_challenge_2016/chi_cosmos.nii.gz", "cosmos"),
    "ich-a-tv": ("qsm_ich/patientA_desc-tissue_phase.nii.gz", "qsm_ich/patientA_desc-brain_mask.nii.gz",
                 "qsm_ich/patientA_Chimap.nii.gz", "ich-a"),
}
OWN_TV_LAMBDA = 3e-4  # the middle (log scale) of the families' TV range, fixed before any model was scored
MIN_FIT_CORRELATION = 0.5
_VERSION = "1"


def _forward(chi: np.ndarray, affine: np.ndarray, pad_mm: float = 30.0) -> np.ndarray:
    vox = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    pad = tuple(fft.next_fast_len(int(n + 2 * pad_mm / v)) for n, v in zip(chi.shape, vox))
    d = dipole_kernel(pad, vox, b0_in_grid(affine)).astype(np.float32)
    spectrum = fft.rfftn(chi.astype(np.float32), s=pad, workers=1)
    out = fft.irfftn(spectrum * d[..., :spectrum.shape[-1]], s=pad, workers=1)
    return out[tuple(slice(0, n) for n in chi.shape)].astype(np.float32)


def fit_field_unit(field: np.ndarray, reference_chi: np.ndarray, mask: np.ndarray, affine: np.ndarray
                   ) -> tuple[float, float]:
    """(ppm per unit of `field`, correlation): least squares of field ~ a * (D * chi) in the eroded mask."""
    inner = ndimage.binary_erosion(mask, iterations=3)
    model = _forward(reference_chi * mask, affine)[inner].astype(np.float64)
    data = field[inner].astype(np.float64)
    a = float(np.dot(data, model) / np.dot(model, model))
    r = float(np.corrcoef(data, model)[0, 1])
    return 1.0 / a, r


def own_inversion(data_dir: Path, key: str, cache_dir: Path | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(chi ppm, brain mask 0/1, affine, info) of background `key`: the real tissue field in ppm (fitted
    unit), inverted by TV with OWN_TV_LAMBDA, zero outside the mask. Cached as .npy in `cache_dir`."""
    field_rel, mask_rel, ref_rel, _ = OWN_INVERSIONS[key]
    img = nib.load(str(Path(data_dir) / field_rel))
    affine = np.asarray(img.affine, float)
    mask = (np.asarray(nib.load(str(Path(data_dir) / mask_rel)).dataobj, np.float32) > 0.5)
    stamp = [_VERSION, OWN_TV_LAMBDA] + [(Path(data_dir) / r).stat().st_size for r in (field_rel, mask_rel, ref_rel)]
    if cache_dir is not None:
        cache = Path(cache_dir)
        info_path, chi_path = cache / f"{key}_inversion.json", cache / f"{key}_chi.npy"
        if info_path.is_file() and chi_path.is_file() and json.loads(info_path.read_text()).get("stamp") == stamp:
            return np.load(chi_path), mask.astype(np.float32), affine, json.loads(info_path.read_text())
    field = np.nan_to_num(np.asarray(img.dataobj, np.float32)) * mask
    reference = np.nan_to_num(np.asarray(nib.load(str(Path(data_dir) / ref_rel)).dataobj, np.float32))
    ppm_per_unit, r = fit_field_unit(field, reference, mask, affine)
    if not np.isfinite(r) or r < MIN_FIT_CORRELATION:
        raise ValueError(f"{field_rel}: the tissue field does not match the forward field of {ref_rel} "
                         f"(correlation {r:.2f}); its unit cannot be fitted")
    chi = (tv_invert(field * np.float32(ppm_per_unit), affine, OWN_TV_LAMBDA) * mask).astype(np.float32)
    info = {"stamp": stamp, "field": field_rel, "unit_reference": ref_rel, "ppm_per_field_unit": ppm_per_unit,
            "fit_correlation": r, "inversion": f"total variation, lambda {OWN_TV_LAMBDA:g} (tv.py)"}
    LOGGER.info("%s: %s in ppm = %.4g x stored value (fit r = %.3f); TV-inverted", key, field_rel, ppm_per_unit, r)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        np.save(chi_path, chi)
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    return chi, mask.astype(np.float32), affine, info
