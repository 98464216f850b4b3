"""The PSF's Moffat index measured from a field's stars, for the measure stage's Gaussian-aperture fluxes.

`flux_gaap_<b>` is the Gaussian-weighted sum divided by a unit point source's response to the weight
(measure.point_response). For a given FWHM that response depends on the PSF's wings: at the measure stage's
weights a Moffat index of 2.5 instead of 3.5 raises it by 10-13 %, by different amounts in bands of different
seeing (colours off by up to 3 %; a Gaussian PSF, 7 %), and on a simulated field whose PSFs had index 2.5 the
photo-z went from sigma_NMAD 0.0444 to 0.0467 and outliers 9.8 to 12.8 %. Surveys' PSFs differ, so the index is
measured from each field's stars rather than assumed.

`field_betas`: in the central (at most) 2048 x 2048 pixels of the field, the bright isolated stars' response to
circular Gaussian weights of 1, 1.25, 1.5 and 2 PSF sigmas (weights at pixel centres about the star's centroid, out
to 4 sigma, as measure.gaussian_aperture), each over the star's flux within 3 FWHM (less the mean of an annulus of
3 to 4 FWHM: within 5 FWHM a faint star's flux had twice the noise); each band's medians over the stars are
matched by least squares, all bands at once, to the same ratios of a pixel-integrated circular Moffat of the
band's FWHM (measure.point_response), whose index is the field's. Stars: local maxima above PEAK_SNR times the
pixel noise, every pixel within 4 FWHM unmasked, no other such maximum within 8 FWHM, and the stellar locus of
their concentration (the response at 1 sigma, which for a PSF of this FWHM lies between the Moffat of index
BETA_MIN, 2, and the Gaussian: flatter is a galaxy, sharper a cosmic ray or a hot pixel; the locus is the most
concentrated group of three within 2 LOCUS, and its stars every candidate within LOCUS of their median, at least
MIN_STARS), found in the band that finds most and taken in every band. On simulated fields of index 3.5 and 2.5
(19-26 stars per band in 2048^2 px) it gives 3.49 and 2.49; on Gaussian stars (the Moffat's limit of large
index, the last of BETAS) 193, with which their normalised fluxes are their totals to 0.3 %. A field with fewer
than MIN_STARS stars (most 1024^2 fields), or a band without a FWHM, gets None: the stage's `gaap_psf_beta`.

Written here rather than taken from a PSF-modelling package (PSFEx, piff): those need catalogs and configuration
outside the pipeline and model much more than the one number the normalisation needs.
"""
from __future__ import annotations

import math

import numpy as np

from ._gaap import FWHM_SIGMA as _FWHM_SIGMA

__all__ = ["band_betas", "field_betas", "fwhms_from_stars", "moffat_ratios", "SIGMAS", "MIN_STARS"]

SIGMAS = (1.0, 1.25, 1.5, 2.0)  # Gaussian weights' sigmas in units of the band's PSF sigma (FWHM / 2.3548)
PEAK_SNR = 30.0  # a star's peak pixel over the pixel noise
MIN_STARS = 8
LOCUS = 0.03  # stars: the response at 1 sigma within this of the locus's median
RADIUS, ANNULUS, ISOLATION = 3.0, 4.0, 8.0  # in FWHM: total flux within, background annulus to, no neighbour within
MAX_SIDE = 2048
# candidates, 3.2 % apart; the last, about 1000, is the Gaussian to 0.05 % at the weights used (a Gaussian PSF is the
# limit of the Moffat's at large index): a fit there is a Gaussian PSF, one at the first no measurement
BETAS = 1.3 * (60.0 / 1.3) ** (np.arange(209) / 120.0)  # 1.3 .. 997; the first 121 the grid to 60 of before
BETA_MIN = 2.0  # the flattest PSF whose stars are taken for stars (flatter sources are galaxies)


def _enclosed(r: float, alpha: float, beta: np.ndarray) -> np.ndarray:
    """A circular Moffat's flux within radius r (unit total)."""
    return 1.0 - (1.0 + (r / alpha) ** 2) ** (1.0 - beta)


def moffat_ratios(fwhm: float, beta, psf_fwhm: float | None = None) -> np.ndarray:
    """(len(beta), len(SIGMAS)): a pixel-integrated circular Moffat's (FWHM `fwhm` px, indices `beta`) response to
    each Gaussian weight of SIGMAS (measure.point_response) over its flux within RADIUS FWHM less the annulus mean
    (as band_betas measures stars). With `psf_fwhm`, the Moffat's FWHM is that, the weights and radii still those
    of `fwhm` (as fwhms_from_stars measures stars with an estimate of the FWHM)."""
    from ._gaap import point_response
    psf = fwhm if psf_fwhm is None else psf_fwhm
    beta = np.atleast_1d(np.asarray(beta, float))[:, None]
    sig = np.asarray(SIGMAS, float)[None, :] * (fwhm / _FWHM_SIGMA)
    resp = point_response(psf, sig, beta)
    alpha = psf / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    r1, r2 = RADIUS * fwhm, ANNULUS * fwhm
    e1, e2 = _enclosed(r1, alpha, beta), _enclosed(r2, alpha, beta)
    total = e1 - r1 ** 2 / (r2 ** 2 - r1 ** 2) * (e2 - e1)
    # the background subtracted under each weight: the annulus mean times the weight's sum 2 pi sigma^2
    bg = (e2 - e1) / (math.pi * (r2 ** 2 - r1 ** 2))
    return (resp - bg * 2.0 * math.pi * sig ** 2) / total


def _prepare(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float] | None:
    """(pixels, usable, sky level, pixel noise) of one band of a deepfield store, where a pixel without weight or
    without a finite value carries a mask bit (the ingest's ZERO_WEIGHT, NO_DATA): usable is mask 0; the sky and
    the noise are the median and 1.4826 MAD of a sample of the usable pixels (sources widen them a little: they
    only set the threshold of the stars' peaks). None with too few usable pixels."""
    good = mask == 0
    step = max(1, image.size // 400_000)
    sample = image.reshape(-1)[::step][good.reshape(-1)[::step]].astype(np.float64)
    if sample.size < 1000:
        return None
    sky = float(np.median(sample))
    sigma = 1.4826 * float(np.median(np.abs(sample - sky)))
    if not (math.isfinite(sigma) and sigma > 0):
        return None
    return image, good, sky, sigma


def _ratios(data: np.ndarray, good: np.ndarray, yy: np.ndarray, xx: np.ndarray, fwhm: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """(ratios (n, len(SIGMAS)), usable (n,)) of the sources peaking at pixels (yy, xx): the responses to the
    Gaussian weights over the flux within RADIUS FWHM less the annulus mean (module docstring); usable where every
    pixel to ANNULUS FWHM is, inside the image, and the flux is positive."""
    ny, nx = data.shape
    r_in, r_out = RADIUS * fwhm, ANNULUS * fwhm
    h = int(math.ceil(r_out)) + 1
    inside = (yy >= h) & (xx >= h) & (yy < ny - h) & (xx < nx - h)
    out = np.full((len(yy), len(SIGMAS)), np.nan)
    if not inside.any():
        return out, inside
    off = np.arange(-h, h + 1)
    sy, sx = yy[inside, None, None] + off[None, :, None], xx[inside, None, None] + off[None, None, :]
    stamps = data[sy, sx].astype(np.float64)  # (n, 2h + 1, 2h + 1)
    clean = good[sy, sx].all(axis=(1, 2))  # no saturated core, no masked or missing pixel up to the annulus
    def less_ring(cy, cx):  # (r^2 about (cy, cx), the stamps less their annulus mean about it)
        r2 = (off[None, :, None] - cy[:, None, None]) ** 2 + (off[None, None, :] - cx[:, None, None]) ** 2
        ring = (r2 >= r_in ** 2) & (r2 < r_out ** 2)
        return r2, stamps - ((stamps * ring).sum(axis=(1, 2)) / ring.sum(axis=(1, 2)))[:, None, None]
    zero = np.zeros(len(stamps))
    _, sub = less_ring(zero, zero)
    # centroid: first moments of the 5 x 5 pixels about the peak, the sky taken off
    c = slice(h - 2, h + 3)
    core = np.clip(sub[:, c, c], 0, None)
    w = np.maximum(core.sum(axis=(1, 2)), 1e-30)
    r2, sub = less_ring((core * off[None, h - 2:h + 3, None]).sum(axis=(1, 2)) / w,
                        (core * off[None, None, h - 2:h + 3]).sum(axis=(1, 2)) / w)
    total = (sub * (r2 < r_in ** 2)).sum(axis=(1, 2))
    s_psf = fwhm / _FWHM_SIGMA
    rat = np.empty((len(sub), len(SIGMAS)))
    for j, k in enumerate(SIGMAS):
        sig = k * s_psf
        wgt = np.exp(-r2 / (2.0 * sig * sig)) * (r2 <= (4.0 * sig) ** 2)
        rat[:, j] = (sub * wgt).sum(axis=(1, 2)) / np.where(total > 0, total, np.nan)
    out[inside] = rat
    usable = np.zeros(len(yy), bool)
    usable[inside] = clean & (total > 0) & np.isfinite(rat).all(axis=1)
    return out, usable


def _stars(data: np.ndarray, good: np.ndarray, sky: float, sigma: float, fwhm: float, min_stars: int = MIN_STARS
           ) -> tuple[np.ndarray, np.ndarray]:
    """(yy, xx) peak pixels of one band's stars: isolated local maxima above PEAK_SNR sigma on the stellar locus of
    the concentration (module docstring); none when fewer than `min_stars`."""
    yy, xx = np.nonzero((data > sky + PEAK_SNR * sigma)[1:-1, 1:-1])  # the few pixels above the threshold only
    yy, xx = yy + 1, xx + 1
    v = data[yy, xx]
    peak = np.ones(len(yy), bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                peak &= v >= data[yy + dy, xx + dx]
    yy, xx = yy[peak], xx[peak]
    none = np.zeros(0, np.int64)
    if len(yy) < min_stars:
        return none, none
    from scipy.spatial import cKDTree
    d, _ = cKDTree(np.column_stack([xx, yy])).query(np.column_stack([xx, yy]), k=2)
    iso = d[:, 1] > ISOLATION * fwhm
    yy, xx = yy[iso], xx[iso]
    rat, ok = _ratios(data, good, yy, xx, fwhm)
    conc = rat[:, 0]
    # a PSF's concentration: between the Moffat of index BETA_MIN and the Gaussian (the most concentrated Moffat)
    # of this FWHM, LOCUS either side; sharper is a cosmic ray or a hot pixel, flatter a galaxy
    flat, sharp = moffat_ratios(fwhm, [BETA_MIN, BETAS[-1]])[:, 0]
    ok &= (conc <= sharp + LOCUS) & (conc >= flat - LOCUS)
    # the locus: the most concentrated group of three within 2 LOCUS of each other, and every candidate within
    # LOCUS of its median (fewer than MIN_STARS: no locus; the next group down would be compact galaxies)
    top = np.sort(conc[ok])[::-1]
    lo = np.searchsorted(-top, -(top - 2.0 * LOCUS), side="right")  # top[i:lo[i]]: within 2 LOCUS under top[i]
    seed = np.nonzero(lo - np.arange(len(top)) >= 3)[0]
    if not len(seed):
        return none, none
    level = float(np.median(top[seed[0]:lo[seed[0]]]))
    star = ok & (np.abs(conc - level) <= LOCUS)
    if star.sum() < min_stars:
        return none, none
    return yy[star], xx[star]


def _vertex(fit: np.ndarray) -> float | None:
    """The index at the least of `fit` (over BETAS): the vertex of the parabola in log(beta) through the least
    value and its neighbours; BETAS[-1] at the last (a Gaussian PSF: before 2026-12-05 the last was 60 and a
    no measurement, so a field of Gaussian stars got `gaap_psf_beta` 3.5, its stars' normalised fluxes 16-23 %
    high and its colours 5.7 % off); None at the first (flatter than any Moffat in the range)."""
    k = int(np.argmin(fit))
    if k == len(BETAS) - 1:
        return float(BETAS[-1])
    if k == 0:
        return None
    a, b, c = fit[k - 1], fit[k], fit[k + 1]
    den = a - 2.0 * b + c
    step = float(np.log(BETAS[1] / BETAS[0]))
    shift = 0.5 * (a - c) / den if den > 0 else 0.0
    return float(BETAS[k] * np.exp(np.clip(shift, -1.0, 1.0) * step))


def band_betas(images: np.ndarray, masks: np.ndarray, fwhms: list[float | None]) -> tuple[float | None, list[int]]:
    """(the field's Moffat index or None, stars used per band) from (bands, ny, nx) pixels of a deepfield store (any
    mask bit excludes a pixel) whose PSF FWHMs are `fwhms` pixels. The stars are those of the band that finds most
    (a star is one in every band; the locus of a band with few stars is the least sure), taken in every band at
    its own peak within a pixel, less those whose concentration there is off the band's median by more than
    2 LOCUS (a neighbour or a defect in that band). One index for all bands, fitted to every band's median
    ratios at once (each band's squared residuals weighted by its number of stars; the model has each band's
    FWHM and the pixel): per band, 8-13 stars had scattered it by up to 0.4 between the bands of one field, and a
    PSF's wings come from the atmosphere and the optics alike in every band."""
    nb = len(fwhms)
    prepared = [_prepare(images[i], masks[i]) if fwhms[i] and fwhms[i] > 0 else None for i in range(nb)]
    found = [_stars(*p, fwhms[i]) if p is not None else (np.zeros(0, np.int64),) * 2
             for i, p in enumerate(prepared)]
    ref = max(range(nb), key=lambda i: len(found[i][0]))
    yy, xx = found[ref]
    counts = [0] * nb
    if len(yy) < MIN_STARS:
        return None, counts
    cost = np.zeros(len(BETAS))
    for i, p in enumerate(prepared):
        if p is None:
            continue
        data, good = p[0], p[1]
        ny, nx = data.shape
        # the band's own peak within a pixel (bands of one field share their pixel grid, not their centroids)
        by, bx = yy.copy(), xx.copy()
        best = np.full(len(yy), -np.inf)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                v = data[np.clip(yy + dy, 0, ny - 1), np.clip(xx + dx, 0, nx - 1)]
                take = v > best
                best[take], by[take], bx[take] = v[take], (yy + dy)[take], (xx + dx)[take]
        rat, ok = _ratios(data, good, by, bx, fwhms[i])
        if ok.sum() >= 3:
            conc = rat[:, 0]
            ok &= np.abs(conc - np.median(conc[ok])) <= 2.0 * LOCUS
        counts[i] = int(ok.sum())
        if counts[i] >= 3:
            med = np.median(rat[ok], axis=0)
            cost += counts[i] * ((moffat_ratios(fwhms[i], BETAS) - med[None, :]) ** 2).sum(axis=1)
    if sum(counts) < MIN_STARS:
        return None, counts
    return _vertex(cost), counts


FWHM_FACTORS = np.geomspace(0.8, 1.25, 91)  # fwhms_from_stars: the FWHM's candidates about the estimate, 0.5 % apart


def fwhms_from_stars(images: list[np.ndarray], masks: list[np.ndarray], fwhm0: list[float],
                     min_stars: int = MIN_STARS) -> tuple[list[float | None], float | None, list[int]]:
    """(each band's FWHM in px or None, the Moffat index or None, stars used per band) of the PSFs of bands of one
    field from their stars, found and measured in each band as band_betas does but with the band's estimate
    `fwhm0` (px) for the weights and radii: the FWHMs (FWHM_FACTORS times each estimate) and one index for all the
    bands (BETAS) of the Moffats whose ratios (moffat_ratios with psf_fwhm) are nearest the stars' medians, each
    band's squared residuals weighted by its stars. One index: alone, a band's FWHM and index trade against each
    other along a valley of the fit (a wider PSF of sharper wings), and its stars' noise picks the point. A band
    with fewer than `min_stars` stars or a FWHM at either end of FWHM_FACTORS gets None; all get None with the index
    at the first of BETAS. `images` and `masks` as for band_betas (any mask bit excludes a pixel).

    For the ingest (tasks/psf_measure.py), where bands have no FWHM in their headers or configuration: on the
    simulator's Moffat stars (index 3.5) of 2.5-3.7 px in a 2048^2 field the FWHMs come out 0.6-1.6 % above the
    true ones, where a Gaussian fitted to each star's 5 x 5 core (the estimate) is 3-9 % above: the core is not a
    Gaussian's, and at S/N 30 compact galaxies are half of the most compact sources, which the stellar locus of the
    concentration (_stars) leaves out."""
    nb = len(images)
    meds, counts = [None] * nb, [0] * nb
    for k in range(nb):
        p = _prepare(images[k], masks[k]) if fwhm0[k] and fwhm0[k] > 0 else None
        if p is None:
            continue
        yy, xx = _stars(*p, fwhm0[k], min_stars)
        rat, ok = _ratios(p[0], p[1], yy, xx, fwhm0[k])
        counts[k] = int(ok.sum())
        if counts[k] >= min_stars:
            meds[k] = np.median(rat[ok], axis=0)
    use = [k for k in range(nb) if meds[k] is not None]
    if not use:
        return [None] * nb, None, counts
    nf, nbeta = len(FWHM_FACTORS), len(BETAS)

    def cost(k: int, fi: np.ndarray, bj: np.ndarray) -> np.ndarray:  # (len(fi), len(bj))
        return np.array([((moffat_ratios(fwhm0[k], BETAS[bj], fwhm0[k] * FWHM_FACTORS[i]) - meds[k][None, :]) ** 2
                          ).sum(axis=1) for i in fi])
    # every 6th FWHM and 8th index, then each band's FWHMs within 12 steps of its least and the indices within 8 of
    # the least (the response takes about 15 us a value, _gaap._moffat_integral: the whole grid would take seconds a
    # band)
    fc, bc = np.arange(0, nf, 6), np.arange(0, nbeta, 8)
    coarse = {k: cost(k, fc, bc) for k in use}
    jc = int(np.argmin(sum(counts[k] * coarse[k].min(axis=0) for k in use)))
    bf = np.arange(max(0, bc[jc] - 8), min(nbeta, bc[jc] + 9))
    fine = {}
    for k in use:
        i0 = int(fc[int(np.argmin(coarse[k][:, jc]))])
        fi = np.arange(max(0, i0 - 12), min(nf, i0 + 13))
        fine[k] = (fi, cost(k, fi, bf))
    jb = int(np.argmin(sum(counts[k] * fine[k][1].min(axis=0) for k in use)))
    if bf[jb] == 0:
        return [None] * nb, None, counts
    out: list[float | None] = [None] * nb
    for k in use:
        fi, c = fine[k]
        i = int(fi[int(np.argmin(c[:, jb]))])
        if 0 < i < nf - 1:
            out[k] = float(fwhm0[k] * FWHM_FACTORS[i])
    return out, float(BETAS[bf[jb]]), counts


def field_betas(group, bands: list[str], fwhm_px: list[float | None]) -> list[float | None]:
    """The field's Moffat index (band_betas) for each of its bands (None for a band without a FWHM, and for all
    without enough stars) from the central at most MAX_SIDE^2 pixels of the field of the store group `group` (its
    bands `bands`, FWHMs in pixels `fwhm_px`), read with the store's checksums."""
    from ..zarr_read import read_checked
    _, ny, nx = group.attrs["shape"]
    field = group.path.rsplit("/", 1)[-1]
    y0, x0 = max(0, (ny - MAX_SIDE) // 2), max(0, (nx - MAX_SIDE) // 2)
    sl = (slice(None), slice(y0, min(ny, y0 + MAX_SIDE)), slice(x0, min(nx, x0 + MAX_SIDE)))
    what = "the PSF's stars"
    image, mask = (read_checked(group, field, a, sl, what) for a in ("image", "mask"))
    beta, _ = band_betas(image, mask, fwhm_px)
    return [beta if f else None for f in fwhm_px]
