"""Detections that are not astronomical sources: light sharper than the PSF in one band, absent from the others.

An unrejected cosmic ray (a hit or a short worm) or a hot pixel is not convolved with the PSF: its pixel stands
above its eight neighbours by more than any source seen through the atmosphere and the optics can, and it is in
one band only. Both tests are needed. Sharpness alone would drop a galaxy that a cosmic ray lands on (it is
seen in the other bands), and one band alone would drop the sources that only one band detects (an i-band
dropout at z ~ 6 is found in z alone, but it is as wide as the PSF).

Sharpness (the cosmic-ray test of L.A.Cosmic, van Dokkum 2001, reduced to a pixel and its neighbours): for a
source no sharper than the PSF, centred on a pixel c, the mean of the eight neighbours n8 is at least rho * c,
rho the ratio for a Gaussian PSF of the band's FWHM integrated over the pixels (a Moffat of the same FWHM is
within 2 % of it at one and 1.4 pixels; a source off the pixel centre or wider than the PSF has a larger
ratio). The excess e = c - n8 / (SAFETY * rho) is then at most noise, with sigma_e = sigma sqrt(1 + 1 / (8
(SAFETY rho)^2)) for pixels of noise sigma; a detection is sharp in a band where e / sigma_e reaches `snr`
within two pixels of its centre (all nine pixels usable). SAFETY (0.8) allows the FWHM in the headers to be
20 % too large. Presence in a band: the PSF-weighted (matched-filter) flux at the detection's centre over its
noise. Written here because no library gives either per detection of a coadd: astroscrappy (L.A.Cosmic) cleans
whole single exposures and needs their gain and read noise, which a coadd has not.
"""
from __future__ import annotations

import numpy as np
from scipy.special import erf

from ._pixels import band_pixels, gaussian_kernel

SAFETY = 0.8
REACH = 2  # pixels around the detection's centre where its sharpest pixel is looked for


def neighbour_ratio(fwhm_px: float) -> float:
    """Mean of the 8 neighbours over the centre pixel for a pixel-integrated Gaussian of FWHM `fwhm_px`
    centred on a pixel (the smallest ratio over sub-pixel positions)."""
    s = max(float(fwhm_px), 1e-3) / (2 * np.sqrt(2 * np.log(2))) * np.sqrt(2)
    d0 = erf(0.5 / s)  # a pixel's share along one axis, centred
    d1 = 0.5 * (erf(1.5 / s) - erf(0.5 / s))  # the next pixel's
    return float((4 * d0 * d1 + 4 * d1 * d1) / (8 * d0 * d0))


def _stamps(arr: np.ndarray, yi: np.ndarray, xi: np.ndarray, h: int, fill) -> np.ndarray:
    """(n, 2h+1, 2h+1) windows of `arr` centred on the pixels (yi, xi); outside the array: `fill`."""
    pad = np.pad(arr, h, constant_values=fill)
    d = np.arange(-h, h + 1)
    return pad[(yi + h)[:, None, None] + d[None, :, None], (xi + h)[:, None, None] + d[None, None, :]]


def sharp_and_present(tile, x: np.ndarray, y: np.ndarray, fwhm_px: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per detection (tile-frame centres x, y) and band: (sharp S/N, matched-filter S/N), each (n, bands);
    NaN where the band has no usable pixels there. fwhm_px: each band's PSF FWHM in pixels."""
    n, nb = len(x), len(tile.bands)
    sharp = np.full((n, nb), np.nan)
    present = np.full((n, nb), np.nan)
    if n == 0:
        return sharp, present
    ny, nx = tile.image.shape[1:]
    xi = np.clip(np.floor(np.asarray(x) + 0.5).astype(np.int64), 0, nx - 1)
    yi = np.clip(np.floor(np.asarray(y) + 0.5).astype(np.int64), 0, ny - 1)
    for b in range(nb):
        data, err, bad = band_pixels(tile, b)
        rho = SAFETY * neighbour_ratio(fwhm_px[b])
        w = REACH + 1
        d, e, m = _stamps(data, yi, xi, w, 0.0), _stamps(err, yi, xi, w, 0.0), _stamps(bad, yi, xi, w, True)
        # every 3x3 block of the (2w+1)^2 window, centred on its inner (2 REACH + 1)^2 pixels
        k = 2 * REACH + 1
        blocks = np.lib.stride_tricks.sliding_window_view(d, (3, 3), axis=(1, 2))  # (n, k, k, 3, 3)
        centre = blocks[..., 1, 1]
        n8 = (blocks.sum(axis=(-1, -2)) - centre) / 8
        usable = ~np.lib.stride_tricks.sliding_window_view(m, (3, 3), axis=(1, 2)).any(axis=(-1, -2))
        sigma = e[:, 1:1 + k, 1:1 + k] * np.sqrt(1 + 1 / (8 * rho * rho))
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(usable & (sigma > 0), (centre - n8 / rho) / sigma, -np.inf)
        best = snr.reshape(n, -1).max(axis=1)
        sharp[:, b] = np.where(np.isfinite(best), best, np.nan)
        # matched filter: sum(k d) / sqrt(sum(k^2 sigma^2)) over the usable pixels
        kern = gaussian_kernel(fwhm_px[b])
        h = kern.shape[0] // 2
        d, e, m = _stamps(data, yi, xi, h, 0.0), _stamps(err, yi, xi, h, 0.0), _stamps(bad, yi, xi, h, True)
        wk = np.where(m, 0.0, kern[None])
        var = (wk * wk * e * e).sum(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            present[:, b] = np.where(var > 0, (wk * d).sum(axis=(1, 2)) / np.sqrt(var), np.nan)
    return sharp, present


def artefacts(sharp: np.ndarray, present: np.ndarray, snr: float, other_snr: float) -> np.ndarray:
    """Detections sharp in some band (sharp S/N >= snr) and not present in any other band (matched-filter
    S/N < other_snr there). With one band measured there is no other band to ask: nothing is an artefact."""
    n, nb = sharp.shape
    out = np.zeros(n, bool)
    measured = np.isfinite(present)
    for b in range(nb):
        others = np.delete(present, b, axis=1)
        has_other = np.delete(measured, b, axis=1).any(axis=1)
        quiet = np.where(np.isfinite(others), others < other_snr, True).all(axis=1)
        out |= (np.nan_to_num(sharp[:, b], nan=-np.inf) >= snr) & has_other & quiet
    return out
