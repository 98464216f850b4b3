"""The checks of one band's pixels at ingest (tasks/fits_input.py): enough usable pixels, not empty or
constant, and an inverse variance that agrees with the image's own noise: refused when it is off by more than
NOISE_RATIO at the pixel scale, rescaled (with a note) when it is off by more than RESCALE_RATIO on the scale
of apertures (`_block_noise`), where a resampled coadd keeps its full noise.
"""
from __future__ import annotations

import math

import numpy as np

from .fits_files import InputError

__all__ = ["check_pixels", "MIN_USABLE", "NOISE_RATIO", "BLOCK", "RESCALE_RATIO"]

MIN_USABLE = 0.01  # a band with fewer usable pixels than this fraction is refused
NOISE_RATIO = 3.0  # the image's pixel scatter and the invvar's noise may differ by this factor at most
BLOCK = 4  # the aperture-scale noise is measured over sums of BLOCK x BLOCK pixels
RESCALE_RATIO = 1.2  # the inverse variance is rescaled when the aperture-scale noise differs by more than this


def check_pixels(b, notes: list[str]) -> None:
    """Refuse a band that holds no measurement: too few usable pixels (unmasked, positive invvar), every
    usable pixel 0, or all of them one value; and an inverse variance whose noise disagrees with the
    image's own pixel scatter by more than NOISE_RATIO (a variance or sigma map given as invvar, another
    unit), naming the file to blame. A disagreement of more than 1.5 is a note."""
    usable = (b.mask == 0) & (b.invvar > 0)
    n, total = int(usable.sum()), usable.size
    if n < MIN_USABLE * total:
        masked = float(np.mean(b.mask != 0))
        blame = b.mask_path if (b.mask_path is not None and masked > 1 - MIN_USABLE) else (
            b.noise_path if b.noise_path is not None and float(np.mean(b.invvar > 0)) < MIN_USABLE else b.path)
        raise InputError(blame, f"band {b.name} has {n} usable pixels of {total} ({100 * n / total:.2g} %; "
                                f"{100 * masked:.3g} % masked): too few to measure anything")
    step = max(1, n // 1_000_000)
    vals = b.image[usable][::step].astype(np.float64)
    if not np.any(vals):
        raise InputError(b.path, f"every usable pixel of band {b.name} is 0: an empty image")
    if np.ptp(vals) == 0:
        raise InputError(b.path, f"every usable pixel of band {b.name} is {vals[0]:g}: a constant image")
    if b.noise_path is None:
        return  # invvar was estimated from these very pixels
    scatter = 1.4826 * float(np.median(np.abs(vals - np.median(vals))))
    expected = float(np.median(1.0 / np.sqrt(b.invvar[usable][::step].astype(np.float64))))
    ratio = scatter / expected if expected > 0 else np.inf
    if not (1 / NOISE_RATIO <= ratio <= NOISE_RATIO):
        raise InputError(b.noise_path, f"the inverse variance of band {b.name} implies a pixel noise of {expected:.4g} "
                                       f"but the image's pixels scatter by {scatter:.4g} (1.4826 MAD; ratio "
                                       f"{ratio:.3g}): a variance or sigma map given as invvar, or another unit?")
    # the noise on the scale of apertures: scatter of BLOCK x BLOCK sums over usable blocks, per pixel. Equal to
    # the pixel scatter for independent pixels; for a resampled coadd the pixel scatter is smaller (neighbours
    # share their noise) while sums over apertures keep the full noise, which is what flux errors need
    block = _block_noise(b.image, usable)
    if block is None:
        return
    bratio = block / expected
    # for noise the aperture-scale noise is at least about the pixel scatter (equal for independent pixels,
    # larger when neighbours share noise); far below it, the pixels' scatter is structure, not noise (a smooth
    # or noiseless image), and the comparison says nothing about the inverse variance
    if not (1 / RESCALE_RATIO <= bratio <= RESCALE_RATIO) and block >= 0.5 * scatter:
        b.invvar /= np.float32(bratio ** 2)
        notes.append(f"band {b.name}: inverse variance rescaled by 1/{bratio:.3g}^2: its noise ({expected:.4g}) "
                     f"disagrees with the noise measured over {BLOCK}x{BLOCK}-pixel sums ({block:.4g} per pixel)")
    if not (1 / 1.5 <= ratio <= 1.5):
        notes.append(f"band {b.name}: the image's pixel scatter {scatter:.4g} is {ratio:.3g} times the noise "
                     f"its inverse variance implies ({expected:.4g}); "
                     + ("correlated noise (a resampled image?): detection thresholds use the measured noise of "
                        "the filtered image" if ratio < 1 and 1 / RESCALE_RATIO <= bratio else "crowding?"))


def _block_noise(image: np.ndarray, usable: np.ndarray) -> float | None:
    """The noise per pixel on the scale of apertures: the robust scatter (1.4826 MAD) of the differences of
    BLOCK x BLOCK pixel sums two blocks apart along x, over sqrt(2) BLOCK; the pixel noise for independent
    pixels. Differences two blocks apart are independent for noise correlated over fewer than BLOCK pixels,
    and smooth structure (a sky gradient, an amplifier offset) cancels in them. Blocks with a source are left
    out: those more than 3 sigma above the median block and their neighbours within two blocks (three passes),
    so faint galaxies inflate the figure by under 10 % on the simulator's fields; only blocks whose pixels are
    all usable count. None with under 200 pairs."""
    from scipy import ndimage
    ny, nx = (n - n % BLOCK for n in image.shape)
    if ny == 0 or nx < 3 * BLOCK:
        return None
    step = max(1, (ny // BLOCK) * (nx // BLOCK) // 250_000)  # rows of blocks sampled on large images
    img = image[:ny, :nx].reshape(ny // BLOCK, BLOCK, nx // BLOCK, BLOCK)[::step]
    ok = usable[:ny, :nx].reshape(ny // BLOCK, BLOCK, nx // BLOCK, BLOCK)[::step].all(axis=(1, 3))
    sums = img.sum(axis=(1, 3), dtype=np.float64)
    if ok.sum() < 400:
        return None
    med = float(np.median(sums[ok]))
    sd = 1.4826 * float(np.median(np.abs(sums[ok] - med)))
    for _ in range(3):
        bright = ndimage.maximum_filter((sums - med) > 3.0 * sd, size=5)
        rest = sums[ok & ~bright]
        if rest.size < 400:
            return None
        med = float(np.median(rest))
        sd = 1.4826 * float(np.median(np.abs(rest - med)))
    ok &= ~bright
    pair = ok[:, 2:] & ok[:, :-2]
    diff = (sums[:, 2:] - sums[:, :-2])[pair]
    if diff.size < 200:
        return None
    return 1.4826 * float(np.median(np.abs(diff - np.median(diff)))) / (math.sqrt(2.0) * BLOCK)
