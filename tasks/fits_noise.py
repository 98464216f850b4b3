"""The checks of one band's pixels at ingest (tasks/fits_input.py): enough usable pixels, not empty or
constant, and an inverse variance that agrees with the image's own noise: refused when it is off by more than
NOISE_RATIO at the pixel scale, rescaled (with a note) when it is off by more than RESCALE_RATIO on the scale
of apertures (`block_noise`), where a resampled coadd keeps its full noise.

Cost. These checks were the largest part of an ingest's CPU time (0.53 s of the 1.46 s of one 2048^2 field in
g, r, i, z; 0.16 s, then 0.07 s with SAMPLE pixels picked by stride; tests/benchmarks/bench_ingest.py): the
robust statistics are exact medians by selection on the float32 samples (`_median`, the same values as numpy's
median of the float64 samples), and the aperture-scale noise is measured on at most about MAX_BLOCKS blocks
(stripes of them, one in every `step`), summed with a few whole-array operations.
"""
from __future__ import annotations

import math

import numpy as np

from .fits_files import InputError

__all__ = ["check_pixels", "block_noise", "MIN_USABLE", "NOISE_RATIO", "BLOCK", "RESCALE_RATIO", "MAX_BLOCKS"]

MIN_USABLE = 0.01  # a band with fewer usable pixels than this fraction is refused
NOISE_RATIO = 3.0  # the image's pixel scatter and the invvar's noise may differ by this factor at most
BLOCK = 4  # the aperture-scale noise is measured over sums of BLOCK x BLOCK pixels
RESCALE_RATIO = 1.2  # the inverse variance is rescaled when the aperture-scale noise differs by more than this
MAX_BLOCKS = 65_536  # blocks measured for the aperture-scale noise at most (all of a 1024^2 image) ...
STRIPE = 28  # ... in stripes of this many rows of blocks (with 2 more either side) on larger images
LAG = 8  # px between the pixels whose differences measure the pixel noise (_pixel_scatter)
SAMPLE = 250_000  # usable pixels sampled for the pixel-scale statistics, about (their 1.4826 MAD to 0.3 %)


def _select(a: np.ndarray, k: int, two: bool) -> tuple:
    """The k-th smallest element of the 1-d array `a` (0-based, no NaN), and the (k+1)-th when `two`: exactly
    what np.partition gives, about four times faster on a million elements. The ranks are bracketed by two
    values of a sorted strided sample of about 4096, only the elements between them are partitioned, and a
    bracket that misses (a sample unlike the whole) falls back to partitioning all of `a`."""
    n = a.size
    ks = [k, k + 1] if two else [k]
    if n > 32_768:
        s = np.sort(a[:: n // 4096])
        m = s.size
        # 5 sigma either side: the rank of a quantile in a sample of m scatters by sqrt(m p (1 - p)) <= sqrt(m) / 2
        j, d = k * m / n, 2.5 * math.sqrt(m) + 2
        lo, hi = s[max(0, int(j - d))], s[min(m - 1, int(j + d) + 1)]
        below = int(np.count_nonzero(a < lo))
        inside = a[(a >= lo) & (a <= hi)]
        if below <= k and ks[-1] < below + inside.size:
            inside.partition([q - below for q in ks])
            return tuple(inside[q - below] for q in ks)
    part = np.partition(a, ks)
    return tuple(part[q] for q in ks)


def _median(a: np.ndarray) -> float:
    """np.median(a.astype(np.float64)) of a 1-d float array (not modified), by selection on `a` itself (float32
    moves half the bytes; the middle elements are converted after)."""
    n = a.size
    mid = _select(a, (n - 1) // 2, two=n % 2 == 0)
    return float(np.mean(np.array(mid, np.float64)))


def _inverse_sqrt_median(invvar: np.ndarray) -> float:
    """np.median(1 / np.sqrt(invvar.astype(np.float64))) of positive values, without the transform of every
    element: it is decreasing, so the median's elements are the transforms of the middle elements of
    `invvar`."""
    n = invvar.size
    mid = _select(invvar, (n - 1) // 2, two=n % 2 == 0)
    return float(np.mean(1.0 / np.sqrt(np.array(mid, np.float64))))


def check_pixels(b, notes: list[str]) -> None:
    """Refuse a band that holds no measurement: too few usable pixels (unmasked, positive invvar), every
    usable pixel 0, or all of them one value; and an inverse variance whose noise disagrees with the
    image's own pixel scatter by more than NOISE_RATIO (a variance or sigma map given as invvar, another
    unit), naming the file to blame. A disagreement of more than 1.5 is a note."""
    usable = b.mask == 0
    usable &= b.invvar > 0
    n, total = int(np.count_nonzero(usable)), usable.size
    if n < MIN_USABLE * total:
        masked = float(np.mean(b.mask != 0))
        blame = b.mask_path if (b.mask_path is not None and masked > 1 - MIN_USABLE) else (
            b.noise_path if b.noise_path is not None and float(np.mean(b.invvar > 0)) < MIN_USABLE else b.path)
        raise InputError(blame, f"band {b.name} has {n} usable pixels of {total} ({100 * n / total:.2g} %; "
                                f"{100 * masked:.3g} % masked): too few to measure anything")
    # every step-th pixel, then its usable ones: about SAMPLE pixels (n / step), without a pass over the whole
    # image to select the usable pixels first
    step = max(1, n // SAMPLE)
    picked = usable.reshape(-1)[::step]
    vals = b.image.reshape(-1)[::step][picked]  # float32: the medians below are those of its float64 values
    if not np.any(vals):
        raise InputError(b.path, f"every usable pixel of band {b.name} is 0: an empty image")
    if np.ptp(vals) == 0:
        raise InputError(b.path, f"every usable pixel of band {b.name} is {vals[0]:g}: a constant image")
    if b.noise_path is None:
        return  # invvar was estimated from these very pixels
    scatter = _pixel_scatter(b.image, usable, step, picked, vals)
    expected = _inverse_sqrt_median(b.invvar.reshape(-1)[::step][picked])
    ratio = scatter / expected if expected > 0 else np.inf
    if not (1 / NOISE_RATIO <= ratio <= NOISE_RATIO):
        raise InputError(b.noise_path, f"the inverse variance of band {b.name} implies a pixel noise of {expected:.4g} "
                                       f"but the image's pixels scatter by {scatter:.4g} (1.4826 MAD of differences "
                                       f"{LAG} px apart over sqrt 2; ratio {ratio:.3g}): a variance or sigma map "
                                       f"given as invvar, or another unit?")
    # the noise on the scale of apertures: scatter of BLOCK x BLOCK sums over usable blocks, per pixel. Equal to
    # the pixel scatter for independent pixels; for a resampled coadd the pixel scatter is smaller (neighbours
    # share their noise) while sums over apertures keep the full noise, which is what flux errors need
    block = block_noise(b.image, usable)
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


def _pixel_scatter(image: np.ndarray, usable: np.ndarray, step: int, picked: np.ndarray, vals: np.ndarray) -> float:
    """The pixel noise of the image: 1.4826 MAD of the differences between the sampled usable pixels (`vals`,
    every `step`-th pixel where `picked`) and the pixels LAG px to their right, over sqrt(2). Smooth structure
    cancels in the differences: the MAD of the pixels themselves read a sky left in the image (a level and a
    gradient of 20 sigma across a 1024^2 field) as noise, 7 times the inverse variance's, and refused the field
    as if its noise map were in other units. Differences LAG px apart are independent for noise correlated over
    fewer pixels (a resampled coadd), so they measure the pixels' own scatter. The pixels' MAD about their median
    when too few pixels have a usable partner (an image under 2 LAG px wide)."""
    nx = image.shape[-1]
    idx = np.arange(0, usable.size, step)[picked]
    ok = idx % nx < nx - LAG
    ok[ok] = usable.reshape(-1)[idx[ok] + LAG]
    if np.count_nonzero(ok) >= 100:
        d = (vals[ok].astype(np.float64) - image.reshape(-1)[idx[ok] + LAG]) / math.sqrt(2.0)
    else:
        d = vals.astype(np.float64)
    d -= _median(d)
    np.abs(d, out=d)
    return 1.4826 * _median(d)


def block_noise(image: np.ndarray, usable: np.ndarray) -> float | None:
    """The noise per pixel on the scale of apertures: the robust scatter (1.4826 MAD) of the differences of
    BLOCK x BLOCK pixel sums two blocks apart along x, over sqrt(2) BLOCK; the pixel noise for independent
    pixels. Differences two blocks apart are independent for noise correlated over fewer than BLOCK pixels,
    and smooth structure (a sky gradient, an amplifier offset) cancels in them. Blocks with a source are left
    out: those more than 3 sigma above the median block and their neighbours within two blocks (three passes),
    so faint galaxies inflate the figure by under 10 % on the simulator's fields; only blocks whose pixels are
    all usable count. None with under 200 pairs.

    An image of more than MAX_BLOCKS blocks is measured on stripes of STRIPE rows of blocks, one stripe in every
    `step` (step = blocks // MAX_BLOCKS), each summed with two more rows of blocks above and below, so that
    the sources' neighbours are left out exactly as over the whole image (every step-th row alone reads 2-3 %
    high: the neighbours of a source in the rows between are missed). tests/benchmarks/bench_ingest.py --noise
    shows the figure of each of the `step` stripe offsets of a 2048^2 image beside the one from every row."""
    ny, nx = (n - n % BLOCK for n in image.shape)
    if ny == 0 or nx < 3 * BLOCK:
        return None
    step = max(1, (ny // BLOCK) * (nx // BLOCK) // MAX_BLOCKS)
    return _block_noise_stripes(image, usable, step, 0)


def _block_sums(image: np.ndarray, usable: np.ndarray, r0: int, r1: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of the BLOCK x BLOCK blocks of rows of blocks r0 .. r1 - 1, and whether all their pixels are usable.
    The sums are exact in float64 (16 float32 values), so the order of the additions does not change them."""
    rows = image[r0 * BLOCK:r1 * BLOCK, :nx].reshape(r1 - r0, BLOCK, nx).astype(np.float64)
    cols = sum(rows[:, k] for k in range(BLOCK)).reshape(r1 - r0, nx // BLOCK, BLOCK)
    u = usable[r0 * BLOCK:r1 * BLOCK, :nx].view(np.uint8).reshape(r1 - r0, BLOCK, nx)
    u = np.bitwise_and.reduce([u[:, k] for k in range(BLOCK)]).reshape(r1 - r0, nx // BLOCK, BLOCK)
    ok = np.bitwise_and.reduce([u[..., k] for k in range(BLOCK)]).view(bool)
    return sum(cols[..., k] for k in range(BLOCK)), ok


def _block_noise_stripes(image: np.ndarray, usable: np.ndarray, step: int, offset: int) -> float | None:
    """block_noise from the stripes offset, offset + step, ... of STRIPE rows of blocks (all rows: step 1)."""
    from scipy import ndimage
    ny, nx = (n - n % BLOCK for n in image.shape)
    nby, pad = ny // BLOCK, 2  # the exclusion reaches two blocks
    if step == 1:
        spans = [(0, nby, 0, nby)]
    else:
        spans = [(max(0, r - pad), min(nby, r + STRIPE + pad), r, min(nby, r + STRIPE))
                 for r in range(offset * STRIPE, nby, step * STRIPE)]
    parts = [_block_sums(image, usable, e0, e1, nx) for e0, e1, _, _ in spans]
    inner = [slice(i0 - e0, i1 - e0) for e0, _, i0, i1 in spans]
    sums = np.concatenate([p[0][k] for p, k in zip(parts, inner)])
    ok = np.concatenate([p[1][k] for p, k in zip(parts, inner)])
    if ok.sum() < 400:
        return None
    med = _median(sums[ok])
    sd = 1.4826 * _median(np.abs(sums[ok] - med))
    for _ in range(3):
        bright = np.concatenate([ndimage.maximum_filter((p[0] - med) > 3.0 * sd, size=5)[k]
                                 for p, k in zip(parts, inner)])
        rest = sums[ok & ~bright]
        if rest.size < 400:
            return None
        med = _median(rest)
        sd = 1.4826 * _median(np.abs(rest - med))
    ok &= ~bright
    pair = ok[:, 2:] & ok[:, :-2]
    diff = (sums[:, 2:] - sums[:, :-2])[pair]
    if diff.size < 200:
        return None
    return 1.4826 * _median(np.abs(diff - _median(diff))) / (math.sqrt(2.0) * BLOCK)
