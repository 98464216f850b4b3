"""Pixel helpers shared by the stages (background, detect, measure; stamps for lens and deblend).

All arrays are 2-d (y, x) over a tile's halo box unless stated otherwise; SEP wants C-contiguous,
native-byte-order arrays, which these helpers return (float64).
"""
from __future__ import annotations

import math

import numpy as np
import sep

from .. import maskbits

# SEP keeps a fixed-size pixel stack and a per-parent limit on deblended children; survey tiles with
# halo hold a million pixels or more, so raise both above SEP's defaults (300000 and 1024).
_MIN_PIXSTACK = 300_000
_SUB_OBJECT_LIMIT = 4096


def configure_sep(npix: int) -> None:
    """Size SEP's global buffers for an image of `npix` pixels (process-wide setting)."""
    need = max(_MIN_PIXSTACK, int(npix))
    if sep.get_extract_pixstack() < need:
        sep.set_extract_pixstack(need)
    if sep.get_sub_object_limit() < _SUB_OBJECT_LIMIT:
        sep.set_sub_object_limit(_SUB_OBJECT_LIMIT)


def band_pixels(tile, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, err, bad) of band index `b`.

    data: image with non-finite values set to 0 (image units); err: 1-sigma noise per pixel,
    1/sqrt(invvar), 0 where invvar <= 0; bad: True where the pixel carries any mask bit, has
    invvar <= 0 or a non-finite value (these pixels never enter a sum)."""
    # the same values as the plain form (np.where(finite, img, 0), np.where(bad, 0, 1 / sqrt(invvar))), made in
    # place in the float64 copies: a third of the time (tests/test_stages.py checks it to the bit)
    data = np.array(tile.image[b], dtype=np.float64, order="C")
    err = np.array(tile.invvar[b], dtype=np.float64, order="C")
    finite = np.isfinite(data)
    finite &= np.isfinite(err)
    bad = np.asarray(tile.mask[b]) != 0
    bad |= ~finite
    with np.errstate(invalid="ignore"):
        bad |= ~(err > 0)
    data[~finite] = 0.0
    err[bad] = 1.0
    np.sqrt(err, out=err)
    np.divide(1.0, err, out=err)
    err[bad] = 0.0
    return data, err, bad


def masked_sum_error_scale(bad: np.ndarray, x, y, r, flags, subpix: int) -> np.ndarray:
    """The factor sqrt(A / (A - A_masked)) that the errors of SEP's circular sums with mask `bad` (True: masked)
    need, A the aperture's area on the image and A_masked its masked part; 1 where SEP set no APER_HASMASKED
    in `flags` or nothing is left unmasked.

    SEP fills an aperture's masked pixels with the mean of the rest: it scales the sum by A / (A - A_masked),
    but the variance by the same factor rather than its square, so that the error it returns is that of the
    whole aperture unmasked, however much of it was masked (pure noise, a circle of 5 px 80 % masked: scatter
    40, error 8.8). The areas are SEP's own sums of the indicator images, with the same sub-pixel sampling."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    scale = np.ones(len(x))
    rows = np.flatnonzero((np.asarray(flags, np.int64) & sep.APER_HASMASKED) != 0)
    if len(rows) == 0:
        return scale
    rr = np.broadcast_to(np.asarray(r, float), x.shape)[rows]
    area = sep.sum_circle(np.ones(bad.shape), x[rows], y[rows], rr, subpix=subpix)[0]
    masked = sep.sum_circle(np.ascontiguousarray(bad, np.float64), x[rows], y[rows], rr, subpix=subpix)[0]
    left = area - masked
    ok = left > 1e-9 * np.maximum(area, 1.0)
    scale[rows[ok]] = np.sqrt(area[ok] / left[ok])
    return scale


def band_unit_scales(tile) -> np.ndarray | None:
    """Each band's image unit in the first band's, by their zero points: 10^(-0.4 (zp_b - zp_0)) (B,), or None
    where the bands share one zero point (or the tile carries none), so that their pixels need no scaling."""
    zps = getattr(tile, "zeropoints", None)
    if zps is None or len(zps) < tile.image.shape[0]:
        return None
    zps = np.asarray(zps[:tile.image.shape[0]], np.float64)
    return 10.0 ** (-0.4 * (zps - zps[0])) if np.any(zps != zps[0]) else None


def detection_image(tile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse-variance weighted mean of the bands: (det, noise, bad), each (y, x) float64/bool.

    det = sum_b w_b img_b / sum_b w_b with w_b = invvar_b on unmasked pixels (0 on masked ones), so
    a pixel masked in one band is detected from the others; noise = 1 / sqrt(sum_b w_b) is its
    1-sigma error; bad marks pixels with no usable band (det and noise are 0 there).

    The bands are taken in one flux unit, that of the first band's zero point (img_b times c_b =
    10^(-0.4 (zp_b - zp_0)), invvar_b over c_b^2; c_b is exactly 1 for bands of the same zero point): in each
    band's own unit a band stored in units 10 times smaller weighed 10 times less, so that the detection image,
    and with it the footprints, the Kron apertures and the catalog, depended on the units the bands came in
    (g and r of the simulator's fields at zero points 29.5 and 24.5 instead of 27: the Kron fluxes in g moved by
    0.8 of their errors, 2,470 sources against 2,454)."""
    num = np.zeros(tile.image.shape[1:], dtype=np.float64)
    wsum = np.zeros_like(num)
    scale = band_unit_scales(tile)
    for b in range(tile.image.shape[0]):
        data, _err, bad = band_pixels(tile, b)
        w = np.where(bad, 0.0, np.asarray(tile.invvar[b], dtype=np.float64))
        c = 1.0 if scale is None else float(scale[b])
        if c != 1.0:  # img_b c_b weighed by invvar_b / c_b^2
            w /= c
        num += w * data
        wsum += w if c == 1.0 else w / c
    bad = ~(wsum > 0)
    safe = np.where(bad, 1.0, wsum)
    det = np.ascontiguousarray(np.where(bad, 0.0, num / safe))
    noise = np.ascontiguousarray(np.where(bad, 0.0, 1.0 / np.sqrt(safe)))
    return det, noise, np.ascontiguousarray(bad)


# what the stages keep in tile.meta that is made of the tile's pixels: the detection image
# (tile_detection_image), the detect stage's filtered S/N map (filtered_snr) and the rings it found
# (tasks/stages/_rings.py); the background stage, which changes the pixels, drops them (forget_pixel_products)
PIXEL_PRODUCTS = ("detection_image", "detection_snr", "detect_rings")


def forget_pixel_products(meta: dict) -> None:
    """Drop from a tile's `meta` what was made of its pixels before they changed (PIXEL_PRODUCTS)."""
    for key in PIXEL_PRODUCTS:
        meta.pop(key, None)


def tile_detection_image(tile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """detection_image(tile), made once per tile: kept in `tile.meta["detection_image"]` for the stages after the
    first that asks (detect, measure, anomaly). Only the background stage changes a tile's pixels, before them,
    and it drops what is kept (forget_pixel_products)."""
    meta = getattr(tile, "meta", None)
    if not isinstance(meta, dict):
        return detection_image(tile)
    if "detection_image" not in meta:
        meta["detection_image"] = detection_image(tile)
    return meta["detection_image"]


def filtered_snr(det: np.ndarray, noise: np.ndarray, bad: np.ndarray, fwhm_px: float, mask_snr: float = 5.0,
                 grow: int = 5) -> tuple[np.ndarray, float]:
    """The detection image's S/N filtered by a Gaussian of `fwhm_px`, in units of its measured noise (float32),
    and that noise's scale: how much noisier the detection image is after the detection filter (a Gaussian of
    `fwhm_px`) than its per-pixel `noise` predicts for white noise: the robust scatter (1.4826 MAD) of the
    filtered S/N image det / noise over sky pixels, over the white-noise value. About 1 for independent pixels;
    other than 1 when neighbouring pixels share their noise (a resampled coadd: the filter then averages less of
    it away, and the same threshold would cut into the noise) or when `noise` is off by a factor. Sky pixels:
    usable, the whole filter on usable pixels, and more than `grow` pixels from any filtered S/N above
    `mask_snr` (sources). Written here because SEP and photutils measure the RMS of the unfiltered image, not of
    the filtered one that the threshold applies to. The map is the anomaly stage's ring term's
    (tasks/stages/_rings.py)."""
    from scipy import ndimage
    good = ~bad
    sig = max(float(fwhm_px), 0.5) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    filt, white = snr_filtered(det, noise, bad, fwhm_px)

    def result(scale: float) -> tuple[np.ndarray, float]:
        return filt * np.float32(1.0 / (white * scale)), scale

    if good.sum() < 2000:
        return result(1.0)
    inner = ndimage.minimum_filter(good, size=2 * int(math.ceil(3.5 * sig)) + 1)  # the whole filter usable
    src = ndimage.maximum_filter(filt > mask_snr * white, size=2 * grow + 1)
    sky = inner & ~src
    vals = filt[sky]
    if vals.size < 1000:
        return result(1.0)
    step = max(1, vals.size // 300_000)
    vals = vals[::step].astype(np.float64)
    sigma = 1.4826 * float(np.median(np.abs(vals - np.median(vals))))
    return result(sigma / white if np.isfinite(sigma) and sigma > 0 else 1.0)


def snr_filtered(det: np.ndarray, noise: np.ndarray, bad: np.ndarray, fwhm_px: float) -> tuple[np.ndarray, float]:
    """The detection image's S/N (det / noise, 0 where `bad`) filtered by a Gaussian of `fwhm_px` (3.5 sigma
    wide), float32, and the filtered image's sigma for unit white noise (the root sum of the kernel's squares)."""
    from scipy import ndimage
    sig = max(float(fwhm_px), 0.5) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    good = ~bad
    snr = np.where(good, det / np.where(good, noise, 1.0), 0.0).astype(np.float32)
    filt = ndimage.gaussian_filter(snr, sig, truncate=3.5)
    delta = np.zeros((2 * int(4 * sig) + 3,) * 2, np.float32)
    delta[delta.shape[0] // 2, delta.shape[1] // 2] = 1
    return filt, float(np.sqrt((ndimage.gaussian_filter(delta, sig, truncate=3.5) ** 2).sum()))


def band_fwhm_pixels(tile) -> list[float | None]:
    """Each band's PSF FWHM in pixels (its FWHM in arcsec over the pixel scale in arcsec/pixel); None for a band
    without a usable FWHM, and every band None without a pixel scale."""
    scale = float(tile.pixel_scale or 0)
    fwhm = list(tile.psf_fwhm or [None] * len(tile.bands))
    return [float(f) / scale if f is not None and np.isfinite(f) and f > 0 and scale > 0 else None for f in fwhm]


DEFAULT_FWHM_PX = 3.0  # the PSF FWHM (pixels) the stages assume where the tile gives none (fwhm_pixels's default)


def fwhm_pixels(tile, default_px: float) -> float:
    """The tile's reference PSF FWHM in pixels: the largest known band FWHM, so that apertures and filters suit
    the worst-seeing band; `default_px` where no band has a FWHM."""
    known = [f for f in band_fwhm_pixels(tile) if f is not None]
    return max(known) if known else float(default_px)


def gaussian_kernel(fwhm_px: float) -> np.ndarray:
    """A normalised 2-d Gaussian of FWHM `fwhm_px` pixels on a (2h+1, 2h+1) grid, h = ceil(1.5 FWHM)
    (3.5 sigma), for SEP's detection filter."""
    sigma = max(float(fwhm_px), 0.5) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    h = max(1, int(math.ceil(1.5 * max(float(fwhm_px), 0.5))))
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    k = np.exp(-0.5 * (xx ** 2 + yy ** 2) / sigma ** 2)
    return np.ascontiguousarray(k / k.sum())


# mask bits whose pixels carry no usable light for the learned stages (set to 0 in their stamps)
UNUSABLE = maskbits.UNUSABLE


def cut_stamp(arr: np.ndarray, y0: int, x0: int, size: int, fill=0) -> np.ndarray:
    """The (..., size, size) window of `arr` (..., ny, nx) whose first pixel is (y0, x0); the part outside
    the array is `fill`."""
    ny, nx = arr.shape[-2:]
    out = np.full(arr.shape[:-2] + (size, size), fill, dtype=arr.dtype)
    ys, xs = slice(max(y0, 0), min(y0 + size, ny)), slice(max(x0, 0), min(x0 + size, nx))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[..., ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = arr[..., ys, xs]
    return out



def centred_stamps(image: np.ndarray, invvar: np.ndarray, usable: np.ndarray, x: np.ndarray, y: np.ndarray,
                   size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, bands, size, size) float32 stamps of `image` (bands, ny, nx) centred on the nearest pixels to
    (x, y) (array pixel coordinates, as training stamps put the source within half a pixel of the centre),
    0 where `usable` is False or outside the array, and (N, bands) sky sigmas 1 / sqrt(median invvar) over
    each stamp's usable pixels (1 where it has none)."""
    nb = image.shape[0]
    out = np.zeros((len(x), nb, size, size), np.float32)
    sig = np.ones((len(x), nb), np.float32)
    c = (size - 1) / 2.0
    for k, (x0, y0) in enumerate(zip(np.rint(np.asarray(x) - c).astype(int), np.rint(np.asarray(y) - c).astype(int))):
        ok = cut_stamp(usable, y0, x0, size, fill=False)
        out[k] = np.where(ok, cut_stamp(image, y0, x0, size), 0.0)
        sig[k] = _stamp_sigmas(cut_stamp(invvar, y0, x0, size), ok)
    return out, sig


def _stamp_sigmas(inv: np.ndarray, ok: np.ndarray, scale: float = 1.0) -> list[float]:
    """Each band's sky sigma of a stamp's inverse variance `inv` (bands, S, S) over its `ok` pixels with weight,
    scale / sqrt(median invvar); 1 for a band without any (centred_stamps, resampled_stamps)."""
    out = []
    for iv, o in zip(inv, ok):
        v = iv[o & (iv > 0)]
        out.append(scale / np.sqrt(np.median(v)) if v.size else 1.0)
    return out


def overlaps(lo: float, step: float, n_out: int, k0: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) lengths of overlap between output pixels [lo + i step, lo + (i + 1) step) and input pixels
    [k0 + k, k0 + k + 1) (pixel-edge coordinates, one input pixel long each)."""
    e = lo + step * np.arange(n_out + 1)
    k = k0 + np.arange(n_in)
    return np.clip(np.minimum(e[1:, None], k[None, :] + 1) - np.maximum(e[:-1, None], k[None, :]), 0.0, None)


def resampled_stamps(image: np.ndarray, invvar: np.ndarray, usable: np.ndarray, x: np.ndarray, y: np.ndarray,
                     size: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """centred_stamps on another pixel grid: (N, bands, size, size) float32 stamps whose pixels are `ratio` times
    the side of `image`'s (the networks' training pixel scale over the field's), each centred on (x, y) itself
    (array pixel coordinates), and (N, bands) the sky sigmas a pixel of that side would have at the field's depth.

    Each output pixel holds the light of the area it covers: the input pixels (0 where `usable` is False or
    outside the array) weighted by their overlap with it, separably in y and x (exact area-weighted rebinning,
    flux conserved, whether the output pixels are larger or smaller). Written here because the stamps are small
    and many: two matrix products per stamp and band, where reproject's adaptive or exact resampling works on
    whole WCS-described images. The sigma is the input's, 1 / sqrt(median invvar) over the stamp's usable pixels,
    times `ratio` (white noise over an area ratio^2 pixels), so that each pixel's signal over it is the S/N per
    unit area the network saw in training at the same depth; the noise's texture is not the same (averaged where
    the output pixels are larger, spread over neighbours where they are smaller)."""
    nb = image.shape[0]
    out = np.zeros((len(x), nb, size, size), np.float32)
    sig = np.ones((len(x), nb), np.float32)
    half = size * ratio / 2.0
    for k, (xc, yc) in enumerate(zip(np.asarray(x, float), np.asarray(y, float))):
        # pixel-centre coordinates c -> edge coordinates c + 0.5: input pixel j spans [j, j + 1)
        lox, loy = xc + 0.5 - half, yc + 0.5 - half
        x0, y0 = int(math.floor(lox)), int(math.floor(loy))
        # the field pixels the stamp covers, a square of the larger of its two spans
        n = max(int(math.ceil(lox + 2 * half)) - x0, int(math.ceil(loy + 2 * half)) - y0)
        ok = cut_stamp(usable, y0, x0, n, fill=False)
        img = np.where(ok, cut_stamp(image, y0, x0, n), 0.0)
        wy = overlaps(loy, ratio, size, y0, n)
        wx = overlaps(lox, ratio, size, x0, n)
        out[k] = wy @ img @ wx.T  # (size, n) (bands, n, n) (n, size): the bands broadcast
        sig[k] = _stamp_sigmas(cut_stamp(invvar, y0, x0, n), ok, ratio)
    return out, sig
