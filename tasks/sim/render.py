"""Drawing sky sources onto an image: each source's profile convolved with the PSF, drawn by
GalSim into a stamp sized to the source, and added to the image.

Works on a whole field or on a single stamp: `render_sources` takes any list of sources with
pixel positions, so training-set builders call it on small images.
"""
from __future__ import annotations

from dataclasses import dataclass

import galsim
import numpy as np

GSPARAMS = galsim.GSParams(maximum_fft_size=16384)
STAMP_MIN, STAMP_MAX = 21, 1025


@dataclass
class Placed:
    """A source at a pixel position of the target image (0-based, pixel centres at integers)."""

    source: object
    x: float
    y: float


def stamp_half_size(source, flux: float, psf_fwhm: float, pixel_scale: float, noise_sigma: float,
                    beta: float) -> int:
    """Half width (pixels) of a stamp holding the source down to ~0.1 sigma of the sky noise.

    Point sources: the Moffat wing r ~ alpha (peak / threshold)^(1 / 2 beta); extended sources:
    8 half-light radii plus 2 FWHM.
    """
    fwhm_pix = psf_fwhm / pixel_scale
    alpha = fwhm_pix / (2.0 * np.sqrt(2 ** (1 / beta) - 1))
    peak = flux / (2.0 * fwhm_pix**2)
    wing = alpha * max(peak / (0.1 * noise_sigma), 1.0) ** (1.0 / (2 * beta))
    ext = (8.0 * getattr(source, "size", 0.0)) / pixel_scale + 2 * fwhm_pix
    half = int(np.ceil(max(wing, ext, 3 * fwhm_pix)))
    return int(np.clip(half, STAMP_MIN // 2, STAMP_MAX // 2))


def draw_source(profile: galsim.GSObject, psf: galsim.GSObject, x: float, y: float, half: int,
                pixel_scale: float) -> galsim.Image:
    """The PSF-convolved profile drawn in a (2 half + 1)^2 stamp centred near (x, y) (0-based),
    with GalSim bounds in the 1-based coordinates of the target image."""
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    bounds = galsim.BoundsI(ix - half + 1, ix + half + 1, iy - half + 1, iy + half + 1)
    stamp = galsim.ImageF(bounds, scale=pixel_scale)
    conv = galsim.Convolve(profile, psf, gsparams=GSPARAMS)
    conv.drawImage(stamp, center=galsim.PositionD(x + 1.0, y + 1.0))
    return stamp


def render_sources(placed: list[Placed], band: str, zeropoint: float, shape: tuple[int, int],
                   psf: galsim.GSObject, psf_fwhm: float, psf_beta: float, pixel_scale: float,
                   noise_sigma: float, keep_stamps: bool = False
                   ) -> tuple[np.ndarray, dict[int, galsim.Image]]:
    """Noiseless image (ny, nx) float32 in ADU of the placed sources in one band.

    Returns the image and, if keep_stamps, each source's own stamp by source id (for blendedness
    and per-source signal-to-noise).
    """
    ny, nx = shape
    full = galsim.ImageF(nx, ny, scale=pixel_scale)  # bounds (1..nx, 1..ny)
    stamps: dict[int, galsim.Image] = {}
    for p in placed:
        prof = p.source.profile(band, zeropoint)
        half = stamp_half_size(p.source, prof.flux, psf_fwhm, pixel_scale, noise_sigma, psf_beta)
        if (p.x + half < 0 or p.y + half < 0 or p.x - half > nx - 1 or p.y - half > ny - 1):
            continue
        stamp = draw_source(prof, psf, p.x, p.y, half, pixel_scale)
        overlap = stamp.bounds & full.bounds
        if overlap.isDefined():
            full[overlap] += stamp[overlap]
            if keep_stamps:
                stamps[p.source.id] = stamp
    return full.array.astype(np.float32, copy=False), stamps


def blendedness(stamp: galsim.Image, total: np.ndarray) -> float:
    """Bosch et al. (2018) blendedness 1 - <s, s> / <s, total> of a source's noiseless stamp s
    against the noiseless image of all sources; 0 for an isolated source."""
    full_bounds = galsim.BoundsI(1, total.shape[1], 1, total.shape[0])
    b = stamp.bounds & full_bounds
    if not b.isDefined():
        return float("nan")
    s = stamp[b].array.astype(np.float64)
    t = total[b.ymin - 1:b.ymax, b.xmin - 1:b.xmax].astype(np.float64)
    denom = float(np.sum(s * t))
    return float(1.0 - np.sum(s * s) / denom) if denom > 0 else float("nan")


def snr(stamp: galsim.Image, invvar: np.ndarray) -> float:
    """Optimal (matched-filter) signal-to-noise of a noiseless stamp given the inverse variance."""
    full_bounds = galsim.BoundsI(1, invvar.shape[1], 1, invvar.shape[0])
    b = stamp.bounds & full_bounds
    if not b.isDefined():
        return 0.0
    s = stamp[b].array.astype(np.float64)
    w = invvar[b.ymin - 1:b.ymax, b.xmin - 1:b.xmax].astype(np.float64)
    return float(np.sqrt(np.sum(s * s * w)))
