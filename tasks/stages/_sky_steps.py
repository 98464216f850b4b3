"""Sharp steps in the sky level along the columns or the rows of a band: an amplifier's offset (a bias or gain
jump over a strip of columns, the simulator's `amp_offset`; real imagers read out through several amplifiers)
that the instrument's calibration left behind.

A smooth background model (SEP's meshes, `box` 64 px, median-filtered over 3 meshes) cannot follow a step: it
spreads it over a mesh or two, which leaves the pixels next to the step on its high side above the model, up to
the step's height. On the held-out fields of `deepfield eval detect` (seed 20261201) an i-band strip 0.34 image
units (about 3 sky sigma) low put 14 false detections along its two edges, 2 to 8 px from them.

Found per band on the tile with its halo, before the smooth model (masked pixels left out):
1. The level of each column (row): its median over every `every`-th row (column; 8), which sources and artefacts
   covering less than half of it do not move much (a source mask taken from a smooth model would not do: next
   to a step the model's error masks the very pixels that show it); J(x), the mean level of the `width`
   columns from x on less that of the `width` columns before x. A step of height h gives a triangular |J|
   peaking at h on the step; a smooth gradient gives a small J everywhere.
2. A step: a local maximum of |J| at least `nsigma` times J's robust scatter over the tile (1.4826 times its
   median absolute deviation) and at least `min_jump` sky sigma, that is sharp: a line with a step, fitted to
   the levels of the 2 `width` columns about it (at the best of the positions within two columns), gives a
   step of at least 0.6 J (a ramp over the `width` columns, or a galaxy's outskirts, goes into the line; a
   bright line along a column or two, a diffraction spike or a trail, fits no step at all).
3. Its height along the step: a straight line fitted (Theil and Sen's, robust to a block with a bright source
   beside the step) to its height in blocks of rows (columns), each the median
   of the `width` columns after the step less that of those before, less the sky's slope across the step times
   `width` (the slope of that line); the simulator's amplifiers drift
   along their length, and a real one's bias can too.
The correction subtracts each step's height from the image beyond it, which leaves the band continuous across
it; the smooth model then takes the level as before. A band without steps is left as it was, to the bit. Steps
across the columns are not looked for in a tile (with its halo) under 256 px high, nor across the rows in one
under 256 px wide: their lines are too short to tell a step from the noise.

Written here: source-extraction libraries (SEP, photutils' Background2D) model smooth backgrounds only, and the
instrument pipelines that fix amplifier offsets (overscan, per-amplifier flats) need the raw frames and their
amplifier geometry, which a coadd or a calibrated image no longer carries.
"""
from __future__ import annotations

import numpy as np

__all__ = ["find_steps", "remove_steps"]


def _level(data: np.ndarray, usable: np.ndarray, every: int) -> tuple[np.ndarray, np.ndarray]:
    """Median level of each column over every `every`-th row (robust to the sources and artefacts that cover less
    than half of it; unusable pixels count as the band's median), and the number of usable pixels it saw."""
    sub, ok = data[::every], usable[::every]
    some = sub[::4, ::4][ok[::4, ::4]]  # the fill need not be exact: a sample's median
    fill = np.median(some) if some.size else 0.0
    # each column's values made contiguous (and float32) first, then one partition at the middle (the upper
    # median for an even count): a third of np.median's time along the contiguous axis, which is itself 5
    # times faster than across the rows
    lines = np.ascontiguousarray(np.where(ok, sub, fill).T, dtype=np.float32)
    k = lines.shape[1] // 2
    return np.partition(lines, k, axis=1)[:, k].astype(np.float64), ok.sum(axis=0)


def _jumps(level: np.ndarray, count: np.ndarray, width: int, min_count: int) -> np.ndarray:
    """J(x) (module docstring) for x = width .. len - width, NaN where either side has fewer than `min_count`
    sky pixels in any of its lines."""
    ok = count >= min_count
    v = np.where(ok, level, 0.0)
    c = np.concatenate([[0.0], np.cumsum(v)])
    k = np.concatenate([[0], np.cumsum(ok)])
    m = len(level)
    x = np.arange(width, m - width + 1)
    n_l, n_r = k[x] - k[x - width], k[x + width] - k[x]
    with np.errstate(invalid="ignore", divide="ignore"):
        j = (c[x + width] - c[x]) / n_r - (c[x] - c[x - width]) / n_l
    j[(n_l < width) | (n_r < width)] = np.nan
    out = np.full(m, np.nan)
    out[x] = j
    return out


def find_steps(data: np.ndarray, usable: np.ndarray, sigma: float, axis: int = 0, width: int = 16,
               nsigma: float = 8.0, min_jump: float = 0.15, blocks: int = 8, every: int = 8) -> list[dict]:
    """Steps across the columns (axis 0: a step between columns x - 1 and x) or the rows (axis 1) of `data`
    (y, x), from its `usable` pixels (bool, y x), `sigma` the sky noise per pixel (module docstring). Each:
    {"at": x (or y), "jump": its mean height (from the lines' levels), "coef": (a, b) of the height a + b * (t -
    centre) along the step, t the row (column) index, "centre"}."""
    if axis == 1:
        return find_steps(data.T, usable.T, sigma, 0, width, nsigma, min_jump, blocks, every)
    ny, nx = data.shape
    if nx < 4 * width + 4 or ny < 4 * blocks * every:
        return []
    level, count = _level(data, usable, every)
    min_count = max(8, (ny // every) // 2)  # a column at least half usable
    j = _jumps(level, count, width, min_count)
    good = np.isfinite(j)
    if good.sum() < 4 * width:
        return []
    scatter = 1.4826 * np.median(np.abs(j[good] - np.median(j[good])))
    cut = max(nsigma * scatter, min_jump * sigma)
    a = np.where(good, np.abs(j), 0.0)
    steps = []
    for x in np.argsort(-a, kind="stable"):
        if a[x] < cut:
            break
        if any(abs(x - s["at"]) < 2 * width for s in steps):
            continue  # on the slope of a step already found
        if a[x] < a[max(0, x - 2 * width):x + 2 * width + 1].max():
            continue
        # where exactly, and the sky's slope across it: a line with a step fitted to the levels of the 2 `width`
        # columns about each position within 2 of the peak of |J| (noise can move that peak by a column), the
        # best fit taken (the difference of the two sides' medians is the step plus the slope times `width`)
        best = None
        for at in range(max(width, x - 2), min(nx - width, x + 3)):
            c = np.arange(at - width, at + width)
            use = count[c] >= min_count
            if use[:width].sum() < width // 2 or use[width:].sum() < width // 2:
                continue
            design = np.stack([np.ones(len(c)), c - at + 0.5, (c >= at).astype(float)], axis=1)[use]
            coef, *_ = np.linalg.lstsq(design, level[c][use], rcond=None)
            rss = float(np.sum((design @ coef - level[c][use]) ** 2))
            if best is None or rss < best[0]:
                best = (rss, at, coef[1], coef[2])
        if best is None:
            continue
        _, at, slope, height = best
        if not (np.sign(height) == np.sign(j[x]) and abs(height) >= 0.6 * abs(j[x]) and abs(height) >= cut):
            continue  # not sharp: a ramp (its slope takes it), or a source's outskirts
        x = at
        # the height along the step, block by block of rows
        edges = np.linspace(0, ny, blocks + 1).astype(int)
        t, h = [], []
        for y0, y1 in zip(edges[:-1], edges[1:]):
            sl, sr = usable[y0:y1, x - width:x], usable[y0:y1, x:x + width]
            if sl.sum() >= 4 * width and sr.sum() >= 4 * width:
                t.append((y0 + y1 - 1) / 2)
                h.append(np.median(data[y0:y1, x:x + width][sr]) - np.median(data[y0:y1, x - width:x][sl])
                         - slope * width)
        centre = (ny - 1) / 2
        if len(t) >= 3:  # Theil and Sen's line: a block with a bright source beside the step is an outlier
            tt, hh = np.asarray(t) - centre, np.asarray(h)
            i, k = np.triu_indices(len(tt), 1)
            b = float(np.median((hh[k] - hh[i]) / (tt[k] - tt[i])))
            a0 = float(np.median(hh - b * tt))
        else:
            a0, b = float(height), 0.0
        steps.append(dict(at=int(x), jump=float(height), coef=(float(a0), float(b)), centre=float(centre)))
    return sorted(steps, key=lambda s: s["at"])


def remove_steps(image: np.ndarray, steps: list[dict], axis: int = 0) -> None:
    """Subtract, in place, each step's height (find_steps's, same `axis`) from `image` (y, x) beyond it."""
    for s in steps:
        a, b = s["coef"]
        if axis == 0:
            t = np.arange(image.shape[0]) - s["centre"]
            image[:, s["at"]:] -= (a + b * t)[:, None].astype(image.dtype)
        else:
            t = np.arange(image.shape[1]) - s["centre"]
            image[s["at"]:, :] -= (a + b * t)[None, :].astype(image.dtype)
