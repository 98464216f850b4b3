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

from ._pixels import gaussian_kernel

SAFETY = 0.8
REACH = 2  # pixels around the detection's centre where its sharpest pixel is looked for


def neighbour_ratio(fwhm_px: float) -> float:
    """Mean of the 8 neighbours over the centre pixel for a pixel-integrated Gaussian of FWHM `fwhm_px`
    centred on a pixel (the smallest ratio over sub-pixel positions)."""
    s = max(float(fwhm_px), 1e-3) / (2 * np.sqrt(2 * np.log(2))) * np.sqrt(2)
    d0 = erf(0.5 / s)  # a pixel's share along one axis, centred
    d1 = 0.5 * (erf(1.5 / s) - erf(0.5 / s))  # the next pixel's
    return float((4 * d0 * d1 + 4 * d1 * d1) / (8 * d0 * d0))


def _windows(tile, b: int, yi: np.ndarray, xi: np.ndarray, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, err, bad) of band index b in (n, 2h+1, 2h+1) windows centred on the pixels (yi, xi), taken from
    the tile's arrays by index (no copy of the whole band): as _pixels.band_pixels gives them, and bad outside
    the arrays."""
    ny, nx = tile.image.shape[1:]
    d = np.arange(-h, h + 1)
    yy, xx = yi[:, None, None] + d[None, :, None], xi[:, None, None] + d[None, None, :]
    outside = (yy < 0) | (yy >= ny) | (xx < 0) | (xx >= nx)
    yy, xx = np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)
    img = np.asarray(tile.image[b])[yy, xx].astype(np.float64)
    iv = np.asarray(tile.invvar[b])[yy, xx].astype(np.float64)
    finite = np.isfinite(img) & np.isfinite(iv)
    bad = outside | (np.asarray(tile.mask[b])[yy, xx] != 0) | ~finite | ~(iv > 0)
    data = np.where(finite & ~outside, img, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.where(bad, 0.0, 1.0 / np.sqrt(np.where(bad, 1.0, iv)))
    return data, err, bad


def sharp_and_present(tile, x: np.ndarray, y: np.ndarray, fwhm_px: list[float], only_sharp: float | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per detection (tile-frame centres x, y) and band: (sharp S/N, matched-filter S/N), each (n, bands);
    NaN where the band has no usable pixels there. fwhm_px: each band's PSF FWHM in pixels. only_sharp: the
    matched filter only for the detections whose sharp S/N reaches it in some band (NaN for the others: the
    stage asks no more, and most detections are not sharp)."""
    n, nb = len(x), len(tile.bands)
    sharp = np.full((n, nb), np.nan)
    present = np.full((n, nb), np.nan)
    if n == 0:
        return sharp, present
    ny, nx = tile.image.shape[1:]
    xi = np.clip(np.floor(np.asarray(x) + 0.5).astype(np.int64), 0, nx - 1)
    yi = np.clip(np.floor(np.asarray(y) + 0.5).astype(np.int64), 0, ny - 1)
    w, k = REACH + 1, 2 * REACH + 1
    for b in range(nb):
        rho = SAFETY * neighbour_ratio(fwhm_px[b])
        data, err, bad = _windows(tile, b, yi, xi, w)
        # every 3x3 block of the (2w+1)^2 window, centred on its inner k x k pixels
        blocks = np.lib.stride_tricks.sliding_window_view(data, (3, 3), axis=(1, 2))  # (n, k, k, 3, 3)
        centre = blocks[..., 1, 1]
        n8 = (blocks.sum(axis=(-1, -2)) - centre) / 8
        usable = ~np.lib.stride_tricks.sliding_window_view(bad, (3, 3), axis=(1, 2)).any(axis=(-1, -2))
        sigma = err[:, 1:1 + k, 1:1 + k] * np.sqrt(1 + 1 / (8 * rho * rho))
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(usable & (sigma > 0), (centre - n8 / rho) / sigma, -np.inf)
        best = snr.reshape(n, k * k).max(axis=1)
        sharp[:, b] = np.where(np.isfinite(best), best, np.nan)
    rows = np.arange(n) if only_sharp is None else np.flatnonzero((np.nan_to_num(sharp, nan=-np.inf)
                                                                    >= only_sharp).any(axis=1))
    if len(rows) == 0:
        return sharp, present
    for b in range(nb):  # matched filter: sum(k d) / sqrt(sum(k^2 sigma^2)) over the usable pixels
        kern = gaussian_kernel(fwhm_px[b])
        data, err, bad = _windows(tile, b, yi[rows], xi[rows], kern.shape[0] // 2)
        wk = np.where(bad, 0.0, kern[None])
        var = (wk * wk * err * err).sum(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            present[rows, b] = np.where(var > 0, (wk * data).sum(axis=(1, 2)) / np.sqrt(var), np.nan)
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
