"""Enclosed depressions of the light: the anomaly stage's ring term (tasks/stages/anomaly.py, `ring`).

A galaxy's light falls from its centre outwards (Sersic bulges and discs, seen through a monotonic PSF), and so
does a blend's away from each member. A collisional ring galaxy's does not: its ring encloses a region fainter
than the ring all round, and an Einstein ring or a tidal loop can do the same. The WGAN's reconstruction
residual hardly sees it (the generator draws a smooth bright blob, and bright galaxies' residuals are large
anyway: on `deepfield eval anomaly`'s fields none of the 12 ring galaxies of either pair of fields reached the top
1 % of the windows by the sigma-score), while the depression itself is many times the noise.

On S/N maps of the detection image (the inverse-variance weighted mean of the bands) at two scales, filtered by
a Gaussian of the PSF FWHM (the detect stage's map: in units of its measured noise) and of FINE (half) the PSF
FWHM (a small ring, 1-1.5" in radius, is blurred shut by the first; in units of white noise's filtered sigma
times the measured scale):

- candidates: local minima (3 x 3) whose highest S/N along each of the four axis directions out to `reach` px
  (coarsely, over 4 x 4 px blocks: a superset) is at least `rim` and at least `min_depth` above them, with no
  pixel without data within the filter's half-width (a saturated star's masked core is a hole in the detection
  image, not in the sky);
- depth of each: along 16 rays from the minimum out to `reach` px, the highest S/N of each ray; the depth is the
  lowest of those 16 highs less S/N at the minimum, kept where that lowest high is at least `rim`. A depression
  enclosed all round has a bright rim on every ray; the sky beside a galaxy, the saddle between two galaxies and
  a galaxy's outskirts are open to at least one side. (A ray may cross a ring at a brighter point than its
  lowest saddle: the depth is an upper bound of the depression's.) The rim must also be even: its lowest ray
  high at least EVEN (half) the median of the 16. Three or more galaxies close about a fainter middle enclose a
  depression too, but their rim is their cores with deep saddles between them: on a test survey three edge-on
  discs (i 20.5-21.4) 8-10 px about their middle made one 14 deep, its lowest high 0.35-0.41 of the median,
  where the ring galaxies' were 0.59-0.96 (24 rings on four fields).
- of the depressions within `reach` of each other (a nucleus leaves a minimum on each side of it in the moat;
  both scales see most rings), the deepest.

`ring_depth` gives each grid window the largest depth inside it (0 without one) and where it lies. Measured on
the simulator's fields (four 2048^2 fields, seeds 20261125 and 20261201, `reach` 16 px, `rim` 8): the ring
galaxies' depths 12 to 171 but for the faintest and smallest (i 21.7-23 with a ring radius of 1.2-1.6", or
an i 22.7 ring seen at q 0.55: 0 to 6); no other depression deeper than 4.4 but a cosmic ray's curved track (7.9).
The merge ranks a window by the larger of its sigma-score and the depth less RING_OFFSET
(catalogs/anomaly_candidates.py). Cost: 0.035 core-s per Mpx of tile core (8 tiles, one thread), spent once:
the detect stage searches the tile for its `merge_rings` (tasks/stages/_ring_merge.py) and keeps what it found
for the anomaly stage (`tile.meta["detect_rings"]`).

Written here: photutils and SEP measure sources, not depressions; scikit-image's grey-level hole filling
(morphological reconstruction) gives the exact depth but took 0.3 core-s per Mpx over the bright footprints of
these fields.
"""
from __future__ import annotations

import numpy as np

__all__ = ["FINE", "RAYS", "RING_OFFSET", "depressions", "fine_snr", "ring_depth", "ring_search", "rims"]

RAYS = 16  # directions from a candidate minimum
BLOCK = 4  # px: the blocks of the candidates' coarse search
FINE = 0.5  # the finer scale's filter FWHM, in PSF FWHM
EVEN = 0.5  # a rim's lowest ray high at least this fraction of their median: one ring, not a group (docstring)
RING_OFFSET = 4.0  # sigma: the depth the noise reaches in bright footprints (module docstring), taken off the depth


def fine_snr(det: np.ndarray, noise: np.ndarray, bad: np.ndarray, fwhm_px: float, scale: float = 1.0
             ) -> np.ndarray:
    """The detection image's S/N filtered by a Gaussian of `fwhm_px`, in units of the filtered noise of white
    noise times `scale` (the measured correlated-noise scale at the PSF's, _pixels.filtered_snr's), float32."""
    from ._pixels import snr_filtered
    filt, white = snr_filtered(det, noise, bad, fwhm_px)
    return filt * np.float32(1.0 / (white * scale))


def ring_search(psf_snr: np.ndarray, det: np.ndarray, noise: np.ndarray, bad: np.ndarray, fwhm_px: float,
                scale: float, reach: int, rim: float, guard: int, box: tuple[int, int, int, int] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, depth) of the enclosed depressions at least RING_OFFSET deep on the S/N maps of both scales (module
    docstring): `psf_snr`, filtered by the PSF, and the detection image (det, noise, bad) filtered by FINE x the
    PSF FWHM `fwhm_px`; of those within `reach` px of each other, the deepest; box (y0, y1, x0, x1): only minima
    inside it."""
    fine = fine_snr(det, noise, bad, FINE * fwhm_px, scale)
    found = [depressions(m, bad, reach, RING_OFFSET, rim, guard, box) for m in (psf_snr, fine)]
    x, y, depth = (np.concatenate([f[k] for f in found]) for k in range(3))
    # one per ring: the deepest of those within `reach` of each other (a nucleus leaves a minimum on each side of
    # it in the moat, and both scales see most rings)
    keep: list[int] = []
    for k in np.argsort(-depth, kind="stable"):
        if all(np.hypot(x[k] - x[j], y[k] - y[j]) > reach for j in keep):
            keep.append(int(k))
    keep = np.array(keep, np.int64)
    return x[keep], y[keep], depth[keep]


def depressions(s: np.ndarray, bad: np.ndarray, reach: int, min_depth: float, rim: float, guard: int,
                box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, depth) of the enclosed depressions of the S/N map `s` (module docstring) at least `min_depth`
    deep whose rim is at least `rim` (S/N) on every ray; `guard`: candidates with a pixel of `bad` within this
    many px are left out; box (y0, y1, x0, x1): only candidates inside it."""
    from scipy import ndimage
    ny, nx = s.shape
    y0, y1, x0, x1 = box if box is not None else (0, ny, 0, nx)
    y0, y1, x0, x1 = max(y0, reach), min(y1, ny - reach), max(x0, reach), min(x1, nx - reach)
    if y1 <= y0 or x1 <= x0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    # the rays along the axes first, coarsely: over BLOCK x BLOCK blocks' maxima, the highest within reach // BLOCK
    # + 1 blocks right, left, up and down of each pixel's block (a superset of its ray's pixels), the lowest of
    # the four at least `rim` and `min_depth` above the pixel, which is a local minimum (3 x 3); then all 16 rays
    # at full resolution for those
    part = s[y0 - reach:y1 + reach, x0 - reach:x1 + reach]
    py, px = part.shape
    by, bx = -(-py // BLOCK), -(-px // BLOCK)
    pad = np.full((by * BLOCK, bx * BLOCK), -np.inf, np.float32)
    pad[:py, :px] = part
    rows = np.maximum.reduce([pad[k::BLOCK] for k in range(BLOCK)])
    blocks = np.maximum.reduce([rows[:, k::BLOCK] for k in range(BLOCK)])
    n = reach // BLOCK + 2  # the pixel's own block and reach // BLOCK + 1 beyond it
    low4 = None
    for axis in (0, 1):
        for origin in (-(n // 2), (n - 1) // 2):  # windows [b, b + n - 1] and [b - n + 1, b]
            m = ndimage.maximum_filter1d(blocks, n, axis=axis, origin=origin, mode="nearest")
            low4 = m if low4 is None else np.minimum(low4, m)
    low4 = np.repeat(np.repeat(low4, BLOCK, axis=0), BLOCK, axis=1)[reach:py - reach, reach:px - reach]
    c = part[reach:py - reach, reach:px - reach]
    ok = (low4 >= rim) & (low4 - c >= min_depth)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                ok &= c <= part[reach + dy:py - reach + dy, reach + dx:px - reach + dx]
    y, x = np.nonzero(ok)
    y, x = y + y0, x + x0
    if not len(y):
        return np.zeros(0), np.zeros(0), np.zeros(0)
    dy, dx = _rays(reach)
    highs = s[y[:, None, None] + dy[None], x[:, None, None] + dx[None]].max(axis=2)  # (n, RAYS)
    lowest = highs.min(axis=1)
    keep = (lowest - s[y, x] >= min_depth) & (lowest >= rim) & (lowest >= EVEN * np.median(highs, axis=1))
    y, x, lowest = y[keep], x[keep], lowest[keep]
    if len(y) and bad.any():
        d = np.arange(-guard, guard + 1)
        ok = ~bad[np.clip(y[:, None, None] + d[None, :, None], 0, ny - 1),
                  np.clip(x[:, None, None] + d[None, None, :], 0, nx - 1)].any(axis=(1, 2))
        y, x, lowest = y[ok], x[ok], lowest[ok]
    return x.astype(float), y.astype(float), (lowest - s[y, x]).astype(float)


def _rays(reach: int) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx), each (RAYS, reach) int: the pixel offsets of RAYS evenly spaced rays, 1 to `reach` px out."""
    ang = np.arange(RAYS) * (2 * np.pi / RAYS)
    r = np.arange(1, reach + 1)
    return (np.rint(np.sin(ang)[:, None] * r[None]).astype(np.int64),
            np.rint(np.cos(ang)[:, None] * r[None]).astype(np.int64))


def ring_depth(x: np.ndarray, y: np.ndarray, depth: np.ndarray, y0: np.ndarray, x0: np.ndarray, size: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For windows starting at (y0, x0) of `size` px (the arrays' pixels): the largest `depth` of the
    depressions at (x, y) inside each (0 for none) and its position (NaN for none)."""
    n = len(y0)
    best, bx, by = np.zeros(n, np.float32), np.full(n, np.nan), np.full(n, np.nan)
    for k in np.argsort(depth, kind="stable"):  # the deepest written last
        inside = (x[k] >= x0) & (x[k] < x0 + size) & (y[k] >= y0) & (y[k] < y0 + size)
        best[inside], bx[inside], by[inside] = depth[k], x[k], y[k]
    return best, bx, by


def rims(s: np.ndarray, x: np.ndarray, y: np.ndarray, reach: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rings about the depressions at pixels (x, y) of the S/N map `s`: each one's centre (x, y; the mean of
    the brightest point of each of the RAYS rays out to `reach` px, the rim, which the nucleus and the knots do not
    pull as they pull the light's centroid; the rays cast again from it twice, as a depression beside a nucleus
    lies off the centre) and radius (the upper quartile of the rim points' distances from it: a
    ray that meets a bright nucleus before the ring stops short of it, an inclined ring's rim is nearer on its
    minor axis, and a ray that meets a brighter neighbour beyond the ring goes past it)."""
    if not len(x):
        return np.zeros(0), np.zeros(0), np.zeros(0)
    dy, dx = _rays(reach)
    ny, nx = s.shape
    ray = np.arange(RAYS)[None]
    cx, cy = np.asarray(x, float), np.asarray(y, float)
    for _ in range(3):  # from the depression (off the centre beside a nucleus), then from the rim's mean
        xi = np.clip(np.rint(cx).astype(np.int64), reach, nx - 1 - reach)
        yi = np.clip(np.rint(cy).astype(np.int64), reach, ny - 1 - reach)
        k = s[yi[:, None, None] + dy[None], xi[:, None, None] + dx[None]].argmax(axis=2)  # (n, RAYS)
        px, py = xi[:, None] + dx[ray, k], yi[:, None] + dy[ray, k]
        cx, cy = px.mean(axis=1), py.mean(axis=1)
    return cx, cy, np.percentile(np.hypot(px - cx[:, None], py - cy[:, None]), 75, axis=1)
