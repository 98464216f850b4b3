"""Sky, noise, exposure map, detector defects and saturation of a simulated image.

Noise model: an image in ADU (MAGZERO = zeropoint) with the sky subtracted. Each pixel holds
Poisson counts of (source + sky) electrons, divided by the effective gain times the relative
exposure; the sky level and gain are set so that the 5-sigma point-source depth of the band is
met (sigma_sky = F5 / (5 sqrt(NEA)), gain = sky / sigma_sky^2). The inverse-variance map is that
of the sky alone (as Legacy Surveys' invvar): 1 / sigma_sky^2 scaled by the exposure map, zero on
masked pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .. import maskbits


@dataclass(frozen=True)
class NoiseSpec:
    """Noise properties of one field and band, all in ADU."""

    sky: float  # sky level per pixel that was subtracted
    sigma: float  # sky noise per pixel at relative exposure 1
    gain: float  # effective electrons per ADU at relative exposure 1


def noise_spec(m5: float, sky_mag: float, zeropoint: float, pixel_scale: float, nea_pix: float) -> NoiseSpec:
    """Sky level, sky sigma and gain meeting a 5-sigma depth m5 with a PSF of NEA nea_pix pixels."""
    sky = 10 ** (-0.4 * (sky_mag - zeropoint)) * pixel_scale**2
    f5 = 10 ** (-0.4 * (m5 - zeropoint))
    sigma = f5 / (5.0 * np.sqrt(nea_pix))
    return NoiseSpec(sky=float(sky), sigma=float(sigma), gain=float(sky / sigma**2))


def smooth_field(shape: tuple[int, int], rng: np.random.Generator, n_modes: int = 6) -> np.ndarray:
    """A smooth random field of zero mean and unit standard deviation (sum of a few low-order
    cosine modes across the image), float32 (ny, nx)."""
    ny, nx = shape
    y = np.linspace(0, 1, ny, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, nx, dtype=np.float32)[None, :]
    out = np.zeros(shape, np.float32)
    for _ in range(n_modes):
        kx, ky = rng.uniform(0.2, 1.5, 2)
        px, py = rng.uniform(0, 2 * np.pi, 2)
        out += (np.cos(np.pi * kx * x + px) * np.cos(np.pi * ky * y + py)).astype(np.float32)
    return (out - out.mean()) / max(float(out.std()), 1e-6)


def exposure_map(shape: tuple[int, int], rng: np.random.Generator, variation: float) -> np.ndarray:
    """Relative exposure (mean 1) varying smoothly by +-variation (dither coverage), float32."""
    return np.clip(1.0 + variation * smooth_field(shape, rng), 0.3, None).astype(np.float32)


def add_noise(model: np.ndarray, spec: NoiseSpec, expmap: np.ndarray, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """Poisson-noise realisation of a noiseless sky-subtracted model; returns (image, invvar).

    model: (ny, nx) ADU, sky not included; expmap: relative exposure (ny, nx).
    """
    g = spec.gain * expmap.astype(np.float64)
    electrons = rng.poisson(np.clip(model + spec.sky, 0.0, None) * g)
    image = (electrons / g - spec.sky).astype(np.float32)
    invvar = (expmap / spec.sigma**2).astype(np.float32)
    return image, invvar


def saturate(model: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Saturated pixels and bleed trails of a noiseless model.

    Charge above `level` in a saturated column flows along the column (as in a CCD): each run of
    saturated pixels in a column is extended up and down by the number of full wells its excess
    charge fills. Returns boolean (sat, bleed) masks; bleed excludes the originally saturated pixels.
    """
    sat = model >= level
    bleed = np.zeros_like(sat)
    if not sat.any():
        return sat, bleed
    ny = model.shape[0]
    labels, n = ndimage.label(sat)
    for sl in ndimage.find_objects(labels):
        rows, cols = sl
        for j in range(cols.start, cols.stop):
            col = sat[rows, j]
            if not col.any():
                continue
            idx = np.nonzero(col)[0] + rows.start
            excess = float(np.sum(model[idx, j] - level))
            extra = int(np.ceil(excess / level))
            lo, hi = idx.min(), idx.max()
            bleed[max(lo - extra // 2 - extra % 2, 0):lo, j] = True
            bleed[hi + 1:min(hi + 1 + extra // 2, ny), j] = True
    bleed &= ~sat
    return sat, bleed


def detector_defects(shape: tuple[int, int], rng: np.random.Generator, n_columns: int,
                     pixel_fraction: float) -> np.ndarray:
    """Boolean map of bad columns (full or partial) and isolated bad pixels."""
    ny, nx = shape
    bad = np.zeros(shape, bool)
    for _ in range(n_columns):
        x = int(rng.integers(0, nx))
        y0 = int(rng.integers(0, ny))
        kind = rng.integers(0, 3)  # whole column, from y0 up, from y0 down (a charge trap)
        if kind == 0:
            bad[:, x] = True
        elif kind == 1:
            bad[y0:, x] = True
        else:
            bad[:y0 + 1, x] = True
    n_pix = int(rng.poisson(pixel_fraction * ny * nx))
    bad[rng.integers(0, ny, n_pix), rng.integers(0, nx, n_pix)] = True
    return bad


def finalize(image: np.ndarray, invvar: np.ndarray, sat: np.ndarray, bleed: np.ndarray, bad: np.ndarray,
             level: float, spec: NoiseSpec, rng: np.random.Generator) -> np.ndarray:
    """Apply saturation, bleed and defects in place; return the uint16 mask.

    Saturated and bleed pixels read the saturation level; bad pixels read garbage (dead or hot);
    all of them get zero inverse variance, their mask bits and ZERO_WEIGHT.
    """
    mask = np.zeros(image.shape, np.uint16)
    sat = sat | (image >= level)  # cosmic rays and hot pixels can saturate too
    image[sat | bleed] = level
    mask[sat | bleed] |= maskbits.SAT
    mask[bleed] |= maskbits.BLEED
    n_bad = int(bad.sum())
    image[bad] = np.where(rng.uniform(size=n_bad) < 0.5, -spec.sky,
                          rng.uniform(5, 50, n_bad) * spec.sigma).astype(np.float32)
    mask[bad] |= maskbits.BAD
    invvar[sat | bleed | bad] = 0.0
    mask[invvar <= 0] |= maskbits.ZERO_WEIGHT
    return mask
