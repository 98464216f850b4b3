"""The PSF FWHM of an image measured from its stars, for inputs whose headers and configuration give none.

Stars: SEP detections at S/N >= 30 (unflagged, more than 20 px from any other and from the edge, peak below
70 % of the brightest so that saturated cores stay out, half-light radius at least 1 px so that cosmic rays
and hot pixels stay out), of which the most compact, half-light radius within 15 % of the 10th percentile
(the stellar locus: at high S/N no galaxy is smaller than a star). photutils'
`fit_fwhm` fits a circular Gaussian to the central 5 x 5 pixels of each (the core, where a Moffat or Kolmogorov
profile is Gaussian-like; the wings would widen it); the pixel's own width is taken out in quadrature
(a pixel-integrated Gaussian has FWHM^2 + 8 ln 2 / 12 px^2), and the median over the stars is the estimate
(`measure_fwhm`). On the simulator's Moffat (beta 3.5) PSFs of 2.5-3.7 px in a 2048^2 field it is 3-9 % above
the true FWHM, by band: the core is not a Gaussian's, and at S/N 30 about half of the most compact sources are
compact galaxies (r50 alone does not tell them from stars). So `measure_fwhms`, which the ingest calls for the
bands without a FWHM, takes the estimates on: the stars of the stellar locus of the concentration (the response
to a Gaussian weight of the estimate's sigma, tasks/stages/_psf_shape.py) and the FWHMs of Moffat PSFs of one
index for all those bands fitted to their responses to four Gaussian weights: within 1 % of the true FWHMs
(+0.3, +0.7, +0.2, -0.2 % in g, r, i, z; index 3.50 for 3.5) on the same field, about 0.35 s a band. Before
(2026-12-05) the estimates were the FWHMs, and on that field the photo-z went from sigma_NMAD 0.0440 (FWHMs
from the headers) to 0.0472.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["measure_fwhm", "measure_fwhms", "MIN_STARS"]

MIN_STARS = 5
MIN_R50 = 1.0  # px: half-light radius of a Gaussian of FWHM 2 px; anything smaller is a pixel artefact
PIXEL_TERM = 8.0 * math.log(2.0) / 12.0  # FWHM^2 that integrating over a pixel adds to a Gaussian, px^2


def _central(shape: tuple[int, int], side: int) -> tuple[slice, slice]:
    """The slices of the central (at most) side x side pixels of an image of `shape`."""
    y0, x0 = max(0, (shape[0] - side) // 2), max(0, (shape[1] - side) // 2)
    return slice(y0, y0 + side), slice(x0, x0 + side)


def measure_fwhm(image: np.ndarray, invvar: np.ndarray, mask: np.ndarray, max_side: int = 2048
                 ) -> tuple[float | None, int]:
    """(FWHM in pixels or None, stars used) of one band (module docstring); the central `max_side`^2
    pixels of a larger image are enough."""
    import sep
    from photutils.psf import fit_fwhm

    sl = _central(image.shape, max_side)
    data = np.ascontiguousarray(image[sl], dtype=np.float64)
    iv = np.asarray(invvar[sl], dtype=np.float64)
    bad = np.ascontiguousarray((np.asarray(mask[sl]) != 0) | ~(iv > 0) | ~np.isfinite(data))
    data[bad] = 0.0
    if (~bad).sum() < 10_000:
        return None, 0
    try:
        data = data - sep.Background(data, mask=bad).back()
        err = np.ascontiguousarray(np.where(bad, 0.0, 1.0 / np.sqrt(np.where(bad, 1.0, iv))))
        if sep.get_extract_pixstack() < data.size:
            sep.set_extract_pixstack(data.size)
        obj = sep.extract(data, 30.0, err=err, mask=bad, minarea=5, deblend_cont=1.0, clean=False)
    except Exception:  # SEP's buffer limits on a pathological image: no measurement rather than a crash
        return None, 0
    obj = obj[obj["flag"] == 0]
    if len(obj) < MIN_STARS:
        return None, 0
    x, y = obj["x"], obj["y"]
    h, w = data.shape
    inside = (x > 20) & (y > 20) & (x < w - 21) & (y < h - 21) & (obj["peak"] < 0.7 * obj["peak"].max())
    # isolation from every other detection (a k-d tree, not the n^2 distances, for crowded images)
    from scipy.spatial import cKDTree
    d, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)
    ok = inside & (d[:, 1] > 20)
    if ok.sum() < MIN_STARS:
        return None, 0
    r50, _ = sep.flux_radius(data, x[ok], y[ok], 6.0 * obj["a"][ok], 0.5, mask=bad, subpix=5)
    good = np.isfinite(r50) & (r50 >= MIN_R50)  # cosmic rays and hot pixels are sharper than any sampled PSF
    if good.sum() < MIN_STARS:
        return None, 0
    star = good & (r50 < 1.15 * np.percentile(r50[good], 10))
    if star.sum() < MIN_STARS:
        return None, int(star.sum())
    xy = np.column_stack([x[ok][star], y[ok][star]])[:200]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fwhm = np.asarray(fit_fwhm(data, xypos=xy, fit_shape=5), float)
        except Exception:
            return None, 0
    fwhm = fwhm[np.isfinite(fwhm) & (fwhm ** 2 > PIXEL_TERM)]
    if fwhm.size < MIN_STARS:
        return None, int(fwhm.size)
    return float(math.sqrt(np.median(fwhm) ** 2 - PIXEL_TERM)), int(fwhm.size)


def measure_fwhms(images: list[np.ndarray], invvars: list[np.ndarray], masks: list[np.ndarray], max_side: int = 2048
                  ) -> list[tuple[float | None, int, str, float | None]]:
    """(FWHM in pixels or None, stars used, how, Moffat index or None) of each of a field's bands (on one pixel
    grid): measure_fwhm's
    estimate from the stars' cores ("core"), then, from the stars of the stellar locus of the central `max_side`^2
    pixels, the FWHMs of Moffat PSFs of one index for all the bands fitted to them
    (tasks/stages/_psf_shape.py: fwhms_from_stars; "Moffat fit, index <beta>"), where a band has enough stars.
    On the simulator's Moffat stars the fit is within 1 % of the true FWHMs, the core's estimate 3-9 % above. The
    fit's index (the same for every band it fitted, None for the others) goes into the store beside the FWHMs, and
    the measure stage takes it rather than fitting the same stars again (MeasureStage.psf_betas)."""
    from .stages._psf_shape import fwhms_from_stars
    first = [measure_fwhm(im, iv, m, max_side) for im, iv, m in zip(images, invvars, masks)]
    if not any(f for f, _ in first):
        return [(f, n, "core", None) for f, n in first]
    sl = _central(images[0].shape, max_side)
    fitted, beta, counts = fwhms_from_stars([im[sl] for im in images], [m[sl] for m in masks],
                                            [f or 0.0 for f, _ in first])
    return [(f, c, f"Moffat fit, index {beta:.2f}", beta) if f is not None else (f0, n0, "core", None)
            for (f0, n0), f, c in zip(first, fitted, counts)]
