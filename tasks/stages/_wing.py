"""Fluxes of saturated sources from their PSF wings (the measure stage's `flux_wing_<b>`): the amplitude of the
band's PSF model (a circular Moffat of the band's FWHM and index, of unit total flux, integrated over each pixel)
fitted by inverse-variance weighted least squares to the usable pixels about the source, so that the masked
(saturated) core and bleed trail, which hold most of a bright star's light, are left out and the rest of its
profile gives the total. The apertures fill a masked core with the mean of the rest of the aperture, which for a
star's core is far too little: an i 9.7 star's Kron flux came out at 0.003 of its truth in i, i 13.4-17.3 stars'
at 0.04-0.80. Written here: SEP and photutils fit PSFs to unmasked stars (photutils' PSFPhotometry takes a mask,
but wants a fitted model grid per star and runs a non-linear fit of position and flux; here the position is the
detection's and only the flux, a linear parameter, is fitted, one source at a time for the few saturated ones)."""
from __future__ import annotations

import math

import numpy as np

from .. import maskbits

__all__ = ["moffat_pixels", "wing_flux", "wing_fluxes"]

SUB = 4  # sub-pixel samples per axis integrating the model over each pixel
WING_FWHM = 6.0  # the fit's radius in PSF FWHM beyond the masked core's edge
MIN_PIXELS = 20  # fewer usable pixels than this: no flux


def moffat_pixels(dx: np.ndarray, dy: np.ndarray, fwhm: float, beta: float) -> np.ndarray:
    """A circular Moffat of FWHM `fwhm` (px), index `beta` and unit total flux, integrated over the pixels whose
    centres lie at offsets (dx, dy) px from its centre (SUB x SUB samples per pixel)."""
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    peak = (beta - 1.0) / (math.pi * alpha * alpha)
    off = (np.arange(SUB) + 0.5) / SUB - 0.5
    out = np.zeros(np.broadcast(dx, dy).shape)
    for sy in off:
        for sx in off:
            out += peak * (1.0 + ((dx + sx) ** 2 + (dy + sy) ** 2) / (alpha * alpha)) ** (-beta)
    return out / (SUB * SUB)


def wing_flux(data: np.ndarray, err: np.ndarray, bad: np.ndarray, x: float, y: float, fwhm: float, beta: float,
              core: float, segmap: np.ndarray | None = None, seg_id: int = 0) -> tuple[float, float]:
    """(flux, error) of the PSF fitted to the usable pixels (not `bad`, err > 0; with `segmap`, no other
    detection's segment) within `core` + WING_FWHM FWHM px of (x, y), `core` the radius of the masked core;
    (nan, nan) with fewer than MIN_PIXELS such pixels."""
    ny, nx = data.shape
    r = core + WING_FWHM * fwhm
    y0, y1 = max(int(math.floor(y - r)), 0), min(int(math.ceil(y + r)) + 1, ny)
    x0, x1 = max(int(math.floor(x - r)), 0), min(int(math.ceil(x + r)) + 1, nx)
    if y1 <= y0 or x1 <= x0:
        return math.nan, math.nan
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dx, dy = xx - x, yy - y
    use = (dx * dx + dy * dy <= r * r) & ~bad[y0:y1, x0:x1] & (err[y0:y1, x0:x1] > 0)
    if segmap is not None:
        s = segmap[y0:y1, x0:x1]
        use &= (s == 0) | (s == seg_id)
    if np.count_nonzero(use) < MIN_PIXELS:
        return math.nan, math.nan
    m = moffat_pixels(dx[use], dy[use], fwhm, beta)
    w = err[y0:y1, x0:x1][use] ** -2.0
    smm = float(np.sum(w * m * m))
    if not smm > 0:
        return math.nan, math.nan
    return float(np.sum(w * data[y0:y1, x0:x1][use] * m)) / smm, 1.0 / math.sqrt(smm)


def wing_fluxes(tile, pixels, x, y, fwhm_b, beta_b, neighbours: dict) -> dict[str, np.ndarray]:
    """{flux_wing_<b>, fluxerr_wing_<b>: values} (wing_flux) of a tile's sources (tile-frame x, y; `pixels` the
    bands' (data, err, bad) of band_pixels; `neighbours` the measure stage's segmap and seg_id, or empty): for the
    saturated sources (a SAT pixel, not a bleed trail's, within a pixel of the centre in some band), NaN for the
    others; the fit reaches WING_FWHM FWHM beyond the band's saturated core about the source (its equivalent
    radius)."""
    from scipy import ndimage

    n = len(x)
    cols = {}
    cx = np.clip(np.floor(x + 0.5).astype(np.int64), 0, max(tile.image.shape[2] - 1, 0))
    cy = np.clip(np.floor(y + 0.5).astype(np.int64), 0, max(tile.image.shape[1] - 1, 0))
    cores = []  # per band: the saturated cores' labels and sizes
    hit = np.zeros(n, bool)
    for ib in range(len(tile.bands)):
        m = np.asarray(tile.mask[ib])
        sat = ((m & maskbits.SAT) != 0) & ((m & maskbits.BLEED) == 0)
        lab, nlab = ndimage.label(sat) if sat.any() else (None, 0)
        if lab is not None:
            near = ndimage.maximum_filter(lab, size=3)[cy, cx] if n else np.zeros(0, np.int64)
            hit |= near > 0
            cores.append((near, np.bincount(lab.ravel(), minlength=nlab + 1)))
        else:
            cores.append((None, None))
    seg = neighbours.get("segmap")
    ids = neighbours.get("seg_id")
    for ib, band in enumerate(tile.bands):
        f, e = np.full(n, np.nan), np.full(n, np.nan)
        near, size = cores[ib]
        data, err, bad = pixels[ib]
        for k in np.flatnonzero(hit):
            core = math.sqrt(size[near[k]] / math.pi) if near is not None and near[k] > 0 else 0.0
            f[k], e[k] = wing_flux(data, err, bad, float(x[k]), float(y[k]), float(fwhm_b[ib]),
                                   float(beta_b[ib]), core, seg, int(ids[k]) if ids is not None else 0)
        cols[f"flux_wing_{band}"], cols[f"fluxerr_wing_{band}"] = f, e
    return cols
