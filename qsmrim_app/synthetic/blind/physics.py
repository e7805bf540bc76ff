"""Field physics and reconstruction: dipole forward model, noise, residual background field, inversion.

The field is the relative frequency shift (ppb) of the edited susceptibility on the QSM grid, computed
in k-space with the continuous dipole kernel D(k) = 1/3 - (k.b)^2/|k|^2 (b = B0 along the scanner's z,
expressed along the possibly angulated grid's axes), on a zero-padded domain (>= 24 voxels per side) to
limit wrap-around. Inversions are linear k-space filters H(k), so the reconstruction of any part of the map
(the rims alone, for the consensus rule) is that filter applied to that part's field:
- ``tkd``: thresholded k-space division (|D| < t -> sign(D)/t), t ~ U(0.12, 0.25);
- ``tikhonov``: D / (D^2 + lambda), lambda ~ U(0.005, 0.03);
- ``gradient_l2``: D / (D^2 + lambda |G(k)|^2), |G|^2 the finite-difference gradient (normalised to max 1),
  lambda ~ U(0.02, 0.12).
"""
from __future__ import annotations

import numpy as np
from scipy import fft, ndimage

PAD = 24
METHODS = ("tkd", "tikhonov", "gradient_l2")


def padded_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(fft.next_fast_len(n + 2 * PAD, real=True) for n in shape)


def frequencies(shape: tuple[int, ...], voxel_mm: np.ndarray) -> list[np.ndarray]:
    """Physical spatial frequencies (1/mm) along each axis for an rfftn layout, broadcastable."""
    out = []
    for axis, (n, d) in enumerate(zip(shape, voxel_mm)):
        f = fft.rfftfreq(n, d) if axis == len(shape) - 1 else fft.fftfreq(n, d)
        view = [1] * len(shape)
        view[axis] = f.size
        out.append(f.reshape(view).astype(np.float32))
    return out


def dipole_kernel(shape: tuple[int, ...], voxel_mm: np.ndarray, b0: np.ndarray) -> np.ndarray:
    k = frequencies(shape, voxel_mm)
    k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    kb = k[0] * np.float32(b0[0]) + k[1] * np.float32(b0[1]) + k[2] * np.float32(b0[2])
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.float32(1 / 3) - kb ** 2 / k2
    d[0, 0, 0] = 0.0
    return d.astype(np.float32)


def inversion_filter(method: str, kernel: np.ndarray, shape: tuple[int, ...], voxel_mm: np.ndarray,
                     param: float) -> np.ndarray:
    if method == "tkd":
        safe = np.where(np.abs(kernel) < param, np.where(kernel < 0, -param, param), kernel)
        h = 1.0 / safe
    elif method == "tikhonov":
        h = kernel / (kernel ** 2 + param)
    elif method == "gradient_l2":
        g2 = sum((2 * np.sin(np.pi * f * d)) ** 2 for f, d in zip(frequencies(shape, voxel_mm), voxel_mm))
        g2 = g2 / g2.max()
        h = kernel / (kernel ** 2 + param * g2 + 1e-6)
    else:
        raise ValueError(f"unknown inversion {method!r}")
    h[0, 0, 0] = 0.0  # the mean is undetermined: referenced afterwards
    return h.astype(np.float32)


def _pad(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float32)
    out[PAD:PAD + image.shape[0], PAD:PAD + image.shape[1], PAD:PAD + image.shape[2]] = image
    return out


def _crop(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(image[PAD:PAD + shape[0], PAD:PAD + shape[1], PAD:PAD + shape[2]])


def apply_filter(image: np.ndarray, filt: np.ndarray, pshape: tuple[int, ...]) -> np.ndarray:
    """Multiply ``image`` by a k-space filter on the padded domain; returns the original-size result."""
    spectrum = fft.rfftn(_pad(image, pshape), workers=1)
    spectrum *= filt
    return _crop(fft.irfftn(spectrum, s=pshape, workers=1).astype(np.float32), image.shape)


def field_noise_ppb(snr: float, te_ms: float, b0_tesla: float = 3.0) -> float:
    """Standard deviation of the field (ppb) for magnitude SNR ``snr`` at effective echo time ``te_ms``:
    phase noise 1/SNR rad over 2 pi gamma B0 TE radians per ppm."""
    rad_per_ppb = 2 * np.pi * 42.577e6 * b0_tesla * te_ms * 1e-3 * 1e-9
    return float(1.0 / (snr * rad_per_ppb))


def psf_blur(image: np.ndarray, sigma_vox: float) -> np.ndarray:
    """The reconstruction's in-plane point spread (apodised k-space): Gaussian in plane, none across."""
    return ndimage.gaussian_filter(image, (sigma_vox, sigma_vox, 0)).astype(np.float32)
