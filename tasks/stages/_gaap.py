"""Gaussian-aperture photometry's pieces: the Gaussian-weighted sums about each source (`gaussian_aperture`) and
a circular Moffat PSF's response to the weight, continuous (`moffat_weight`) and integrated over the pixels
(`point_response`), which normalises the sums in the measure stage and models the stars in
tasks/stages/_psf_shape.py. Its own module so that both import it (the measure stage's docstring says how the
stage uses them)."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["FWHM_SIGMA", "PIXEL_VAR", "point_response", "moffat_weight", "gaussian_aperture"]


PIXEL_VAR = 1.0 / 12.0  # px^2: the variance of a pixel's box, by which pixel integration widens what it samples
FWHM_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # a Gaussian's FWHM over its sigma


# _moffat_integral's rule: exp-sinh nodes v = exp(pi/2 sinh t), t in [-4.5, 4.5] at steps of 1/32 (289 nodes)
_ES_T = np.arange(-4.5, 4.5 + 1 / 64, 1 / 32)
_ES_V = np.exp(0.5 * np.pi * np.sinh(_ES_T))
_ES_W = _ES_V * 0.5 * np.pi * np.cosh(_ES_T) / 32.0


def _moffat_integral(beta, x):
    """(beta - 1) U(1, 2 - beta, x), U Tricomi's confluent hypergeometric function: the integral over u >= 0 of
    (beta - 1) (1 + u)^-beta exp(-x u), a Moffat PSF's response to a Gaussian weight (moffat_weight). Takes arrays
    (broadcast). Integrated numerically, all entries at once: u = v / (beta + x), so that the integrand falls off
    over about one unit of v, by the exp-sinh rule (the trapezoid rule in t for v = exp(pi/2 sinh t), whose error
    falls double-exponentially with the nodes for an integrand analytic on the half line): within 2e-12 of scipy's
    adaptive quad (epsrel 1e-11) for indices 1.01-1000 and x 1e-4 to 1e4, about 15 us an entry.

    Not scipy.special.hyperu, which this used before 2026-12-05: besides NaN for a nearly Gaussian Moffat under a
    wide weight (which was integrated one entry at a time with quad, 0.2 of the 0.8 core-s of a field's index fit),
    it returns finite and wrong values (7,666 for 0.774, -0.71 for 0.751, -1,065 for 0.771 at the fit's weight of
    1.5 PSF sigma: the response lies in 0-1) for indices of about 54-167 at the arguments the measure stage asks
    for (x about 0.2-0.3 times the index), so that a PSF with an index there (nearly Gaussian) was fitted and
    normalised with nonsense."""
    beta, x = np.broadcast_arrays(np.asarray(beta, float), np.asarray(x, float))
    b, a = beta.reshape(-1, 1), x.reshape(-1, 1)
    c = b + a
    out = np.empty(b.shape[0])
    for k in range(0, len(out), 4096):  # bounded temporaries: 4096 x 289 doubles
        s = slice(k, k + 4096)
        v = _ES_V[None, :] / c[s]
        f = np.exp(-b[s] * np.log1p(v) - a[s] * v)
        out[s] = (b[s, 0] - 1.0) * (f @ _ES_W) / c[s, 0]
    return out.reshape(beta.shape)


def point_response(fwhm, sigma, beta):
    """The response of the Gaussian weight of `sigma` pixels, sampled at pixel centres, to a star of unit flux
    whose image is a circular Moffat PSF (FWHM `fwhm` pixels, index `beta`) integrated over the pixels: the pixel
    box convolved into the weight makes it, to second order, a Gaussian of variance sigma^2 + 1/12 and the same
    integral, so the response is sigma^2 / (sigma^2 + 1/12) moffat_weight(fwhm, sqrt(sigma^2 + 1/12), beta). On
    GalSim's pixel-integrated Moffat stars of index 2.5, 3.5 and 4.5 this recovers the index to 0.1 from the
    stars' responses (tasks/stages/_psf_shape.py), where the bare moffat_weight gives 0.1-0.4 less (more for
    sharper seeing), and a star's normalised flux is its total to 0.5 %, not 1 % under it. Takes arrays."""
    fwhm, sigma, beta = (np.asarray(v, float) for v in (fwhm, sigma, beta))
    var = sigma ** 2 + PIXEL_VAR
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    out = sigma ** 2 / var * _moffat_integral(beta, alpha ** 2 / (2.0 * var))
    return float(out) if out.ndim == 0 else out


def moffat_weight(fwhm: float, sigma: float, beta: float) -> float:
    """The response of a circular Gaussian weight exp(-r^2 / 2 sigma^2) to a point source of unit flux under a
    circular Moffat PSF of FWHM `fwhm` (the same unit as sigma) and index `beta` > 1, the PSF
    M(r) = (beta - 1) / (pi alpha^2) (1 + r^2 / alpha^2)^-beta with alpha = fwhm / (2 sqrt(2^(1/beta) - 1)):
    the integral of M(r) exp(-r^2 / 2 sigma^2) 2 pi r dr, which with u = r^2 / alpha^2 is
    (beta - 1) U(1, 2 - beta, alpha^2 / (2 sigma^2)), U Tricomi's confluent hypergeometric function. It tends to 1
    for a weight much wider than the PSF; for a Gaussian PSF of sigma s the response would be
    sigma^2 / (sigma^2 + s^2). The pixel's own width is left out here (point_response puts it in): without it a
    star's flux comes out about 1 % under its total at the simulator's 0.2" pixels."""
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return float(_moffat_integral(beta, alpha ** 2 / (2.0 * sigma ** 2)))


def gaussian_aperture(data: np.ndarray, err: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray,
                      sigma: float, segmap: np.ndarray | None = None, seg_id: np.ndarray | None = None,
                      reach: float = 4.0, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Sums of `data` (2-d) weighted by exp(-r^2 / 2 sigma^2) about each (x, y) (array pixel coordinates, pixel
    centres at integers) out to `reach` sigma, and their errors sqrt(sum w^2 err^2). Pixels that are `bad`,
    outside the array or (with `segmap`, `seg_id`) in another detection's segment are left out, and both sums
    are scaled up by the weight of every pixel over the weight of those kept; NaN where under 30 % of the weight
    is kept. `data` and `err` must be finite where `bad` is False (as band_pixels gives them)."""
    n = len(x)
    f, e = np.full(n, np.nan), np.full(n, np.nan)
    if n == 0:
        return f, e
    ny, nx = data.shape
    h = int(math.ceil(reach * sigma))
    off = np.arange(-h, h + 1)
    flat_data, flat_err, flat_bad = data.ravel(), err.ravel(), bad.ravel()
    flat_seg = np.ravel(segmap) if segmap is not None and seg_id is not None else None
    for k in range(0, n, chunk):
        xs, ys = np.asarray(x[k:k + chunk], float), np.asarray(y[k:k + chunk], float)
        xi, yi = np.rint(xs).astype(np.int64), np.rint(ys).astype(np.int64)
        cols, rows = xi[:, None] + off, yi[:, None] + off  # (m, 2h+1)
        gx = np.exp(-0.5 * (cols - xs[:, None]) ** 2 / sigma ** 2)  # the weight is separable: 2 x (m, 2h+1) exps
        gy = np.exp(-0.5 * (rows - ys[:, None]) ** 2 / sigma ** 2)
        total = gy.sum(1) * gx.sum(1)
        inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
        # flat indices once, np.take for each array: 0.6 of the time of indexing every array by (y, x)
        idx = (np.clip(rows, 0, ny - 1) * nx)[:, :, None] + np.clip(cols, 0, nx - 1)[:, None, :]
        keep = inside & ~np.take(flat_bad, idx)
        if flat_seg is not None:
            sv = np.take(flat_seg, idx)
            keep &= (sv == 0) | (sv == np.asarray(seg_id[k:k + chunk])[:, None, None])
        wk = np.where(keep, gy[:, :, None] * gx[:, None, :], 0.0)
        kept = wk.sum((1, 2))
        scale = np.where(kept > 0.3 * total, total / np.maximum(kept, 1e-300), np.nan)
        f[k:k + chunk] = (wk * np.take(flat_data, idx)).sum((1, 2)) * scale
        e[k:k + chunk] = np.sqrt(((wk * np.take(flat_err, idx)) ** 2).sum((1, 2))) * scale
    return f, e
