"""The anomaly stage's dense grid: windows of the model's stamp size laid over every field at a fixed stride, so
that every pixel of a field lies in at least one scored window whatever the sources are.

Window (ky, kx) of a field of shape (ny, nx) starts at field pixel (y, x) = (min(ky stride, ny - size),
min(kx stride, nx - size)): the grid is the field's, not the tile's, so the windows of neighbouring tiles
interlock and a region that crosses a tile boundary is one connected set of windows (catalogs/anomalies.py).
A tile scores the windows whose centre pixel lies in its core (`tile_windows`); its halo (at least half a
window, see AnomalyStage) holds the rest of their pixels.

Coarse to fine (`refined`): the windows of even grid index on both axes, and the last window of each axis, are
the *coarse* grid. Its step is two strides, at most one window (the stride is at most half a window), so the
coarse windows alone hold every pixel of the field, and they are a uniform subsample of the grid. The stage
scores them first and then only the windows next to (one grid step from) the coarse windows that score highest;
the windows it leaves out lie where every coarse window around them scored low.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

# the line term (models/anomaly_lines.line_terms): the merge ranks a window by its line S/N less LINE_OFFSET, at most
# LINE_SIGMA_MAX, where that is more than its sigma-score (catalogs/anomaly_candidates.line_sigma; the calibration
# in its docstring)
LINE_OFFSET = 2.0
LINE_SIGMA_MAX = 8.0
LINE_REFINE = 3.0  # a coarse window's line above this: its neighbours are scored, with the line term (the
#   stage's cost: at LINE_OFFSET, 2, the normal windows so flagged added 5 % to the windows scored on a test field)


__all__ = ["grid_starts", "tile_windows", "window_stamps", "refined"]


def grid_starts(n: int, size: int, stride: int) -> np.ndarray:
    """Start pixels of the windows along one axis of length n: 0, stride, 2 stride ..., the last one clamped to
    n - size so that the windows reach the far edge (one window at 0 when n <= size)."""
    last = max(n - size, 0)
    k = np.arange(-(-last // stride) + 1)
    return np.minimum(k * stride, last)


def tile_windows(tile, size: int, stride: int) -> pd.DataFrame:
    """The windows the tile scores: ky, kx (grid indices in the field), y0, x0 (first field pixel), yc, xc
    (centre, field pixels) and `coarse` (on the coarse grid: module docstring), for every window whose centre
    pixel lies in the tile core."""
    ny, nx = tile.field_shape if tile.field_shape[0] else (tile.box.y1, tile.box.x1)
    cols = {}
    for axis, n, lo, hi in (("y", ny, tile.core.y0, tile.core.y1), ("x", nx, tile.core.x0, tile.core.x1)):
        s = grid_starts(int(n), size, stride)
        centre = s + (min(size, int(n)) - 1) / 2.0
        keep = (np.floor(centre + 0.5) >= lo) & (np.floor(centre + 0.5) < hi)
        k = np.flatnonzero(keep)
        cols[axis] = (k, s[keep], centre[keep], (k % 2 == 0) | (k == len(s) - 1))
    ky, kx = np.meshgrid(cols["y"][0], cols["x"][0], indexing="ij")
    y0, x0 = np.meshgrid(cols["y"][1], cols["x"][1], indexing="ij")
    yc, xc = np.meshgrid(cols["y"][2], cols["x"][2], indexing="ij")
    cy, cx = np.meshgrid(cols["y"][3], cols["x"][3], indexing="ij")
    return pd.DataFrame({"ky": ky.ravel(), "kx": kx.ravel(), "y0": y0.ravel(), "x0": x0.ravel(),
                         "yc": yc.ravel(), "xc": xc.ravel(), "coarse": (cy & cx).ravel()})


def refined(ky: np.ndarray, kx: np.ndarray, coarse: np.ndarray, score: np.ndarray, fraction: float,
            above: float = np.inf) -> np.ndarray:
    """Which of a tile's windows (grid indices ky, kx; `coarse` as tile_windows gives it) to score: the coarse
    ones, and every window within one grid step (of the eight around) of a *flagged* coarse window, flagged
    being among the ceil(`fraction` x n) highest of the n coarse windows' `score` (NaN for the others) or at
    least `above`. fraction 1 (or above -inf): every window."""
    ky, kx, coarse = np.asarray(ky), np.asarray(kx), np.asarray(coarse, bool)
    if fraction >= 1 or len(ky) == 0:
        return np.ones(len(ky), bool)
    s = np.asarray(score, np.float64)[coarse]
    flagged = np.zeros(len(s), bool)
    n_top = int(np.ceil(fraction * len(s)))
    if n_top:
        flagged[np.argsort(-np.nan_to_num(s, nan=-np.inf), kind="stable")[:n_top]] = True
    flagged |= s >= above
    flag = np.zeros(len(ky), bool)
    flag[np.flatnonzero(coarse)[flagged]] = True
    return coarse | _next_to(ky, kx, flag)


def _next_to(ky: np.ndarray, kx: np.ndarray, flag: np.ndarray) -> np.ndarray:
    """Which of a tile's windows (grid indices ky, kx) are `flag`ged or one grid step (of the eight around) from a
    flagged one."""
    from scipy.ndimage import binary_dilation
    y, x = ky - ky.min(), kx - kx.min()
    grid = np.zeros((y.max() + 1, x.max() + 1), bool)
    grid[y[flag], x[flag]] = True
    return binary_dilation(grid, np.ones((3, 3), bool))[y, x]


def refine_scores(score: np.ndarray, line: np.ndarray) -> np.ndarray:
    """The scores `refined` flags coarse windows by: the windows' scores, infinite where the line term is above
    LINE_REFINE, so that the windows around a faint trail's are scored too."""
    return np.where(np.nan_to_num(np.asarray(line, np.float64)) > LINE_REFINE, np.inf, np.asarray(score, np.float64))


def line_neighbours(ky: np.ndarray, kx: np.ndarray, coarse: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Which of a tile's windows take the line term besides the coarse ones: those one grid step (of the eight
    around) from a coarse window whose `line` (NaN or any value for the others) is above LINE_REFINE."""
    ky, kx, coarse = np.asarray(ky), np.asarray(kx), np.asarray(coarse, bool)
    flag = coarse & (np.nan_to_num(np.asarray(line, np.float64)) > LINE_REFINE)
    if not flag.any():
        return np.zeros(len(ky), bool)
    return _next_to(ky, kx, flag) & ~coarse


def window_stamps(image: np.ndarray, invvar: np.ndarray, usable: np.ndarray, y0: np.ndarray, x0: np.ndarray,
                  size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stamps (N, B, size, size) of the windows whose first pixels are (y0, x0) in the arrays' frame, 0 where
    not `usable` or outside the arrays; (N, B) sky sigmas, 1 / sqrt(median invvar) over each window's usable
    pixels (1 where none); and (N, B, size, size) each pixel's noise sigma in units of its window's sky sigma
    (from the inverse variance; 0 where the pixel has no weight)."""
    n, nb = len(y0), image.shape[0]
    if n == 0:
        z = np.zeros((0, nb, size, size), np.float32)
        return z, np.ones((0, nb), np.float32), z.copy()
    win, iv = extract([np.where(usable, image, 0).astype(np.float32), np.where(usable, invvar, 0).astype(np.float32)],
                      y0, x0, size)  # outside the arrays: no data
    ok = iv > 0
    flat = iv.reshape(n, nb, -1)
    full = ok.reshape(n, nb, -1).all(-1)
    med = np.empty((n, nb), np.float32)
    med[full] = np.median(flat[full], axis=-1)
    part = ~full
    if part.any():
        with np.errstate(all="ignore"):
            med[part] = np.nanmedian(np.where(flat[part] > 0, flat[part], np.nan), axis=-1)
    sig = np.where(np.isfinite(med) & (med > 0), 1.0 / np.sqrt(np.where(med > 0, med, 1.0)), 1.0).astype(np.float32)
    with np.errstate(divide="ignore"):
        noise = np.where(ok, 1.0 / np.sqrt(np.where(ok, iv, 1.0)) / sig[:, :, None, None], 0.0).astype(np.float32)
    return np.where(ok, win, 0.0).astype(np.float32), sig, noise


def tile_inputs(image: np.ndarray, invvar: np.ndarray, usable: np.ndarray, counted: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The network input (scale_snr of the pixels over their band's sky sigma) and each pixel's noise in units
    of that sigma, over whole (B, ny, nx) arrays at once: the grid's windows overlap four times over, so this is
    done once per pixel rather than once per window. The band's sky sigma is 1 / sqrt(median invvar) over the
    arrays' usable pixels (a window's own median, as window_stamps takes it for training and for the sources'
    stamps, differs from it only where the depth changes within a tile)."""
    from deepfield.models.anomaly_gan import scale_snr
    ok = usable & (invvar > 0)
    sig = np.array([1.0 / np.sqrt(np.median(v[o])) if o.any() else 1.0 for v, o in zip(invvar, ok)], np.float32)
    snr = np.where(ok, image, 0.0).astype(np.float32) / sig[:, None, None]
    with np.errstate(divide="ignore"):
        noise = np.where(ok, 1.0 / np.sqrt(np.where(ok, invvar, 1.0)) / sig[:, None, None], 0.0).astype(np.float32)
    if counted is not None:
        noise[~counted] = 0.0
    return scale_snr(snr), noise


def extract(arrays: list[np.ndarray], y0: np.ndarray, x0: np.ndarray, size: int) -> list[np.ndarray]:
    """(N, B, size, size) windows of each (B, ny, nx) array starting at (y0, x0) in the arrays' frame, 0 outside."""
    y0, x0 = np.asarray(y0, np.int64), np.asarray(x0, np.int64)
    if len(y0) == 0:
        return [np.zeros((0, a.shape[0], size, size), a.dtype) for a in arrays]
    ny, nx = arrays[0].shape[1:]
    py0, px0 = max(0, -int(y0.min())), max(0, -int(x0.min()))
    py1, px1 = max(0, int(y0.max()) + size - ny), max(0, int(x0.max()) + size - nx)
    from numpy.lib.stride_tricks import sliding_window_view
    out = []
    for a in arrays:
        if py0 or px0 or py1 or px1:
            a = np.pad(a, ((0, 0), (py0, py1), (px0, px1)))
        # every size x size window of `a` as a view (y, x, band, size, size), then the windows wanted copied
        # block by block: a fifteenth of the time of indexing each pixel
        view = sliding_window_view(a, (size, size), axis=(1, 2)).transpose(1, 2, 0, 3, 4)
        out.append(np.ascontiguousarray(view[y0 + py0, x0 + px0]))
    return out
