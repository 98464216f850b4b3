"""The line term of the anomaly score (issue 18): a straight feature across a window's sky residual, such as a
faint satellite trail in one band, which the local score's worst pixel and worst quarter do not see
(line_terms; models/anomaly_gan.local_terms calls it, the anomaly stage takes it on its coarse windows and next to
a line, the merge ranks and joins by it: catalogs/anomaly_candidates.py, catalogs/anomaly_regions.py)."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["line_terms"]

LINE_BIN = 4  # px: the residual is summed over LINE_BIN x LINE_BIN cells first
LINE_ANGLES = 16  # directions over 180 degrees (11.25 degrees apart: a line 16 px from the centre is within 1.6 px)
LINE_OFFSET_CELLS = 4  # lines pass up to this many cells (16 px) either side of the window's centre: the
#   anomaly stage computes the term on its coarse windows, 32 px apart, which then see every line
LINE_SEGMENTS = 4  # pieces along the line, each of which must hold the feature (8 px each in a 32 px window)
LINE_HALF_WIDTH = 0.6  # cells: the strip |d| < 0.6 (cells whose centre is within 2.4 px of the line), against
#   the cells at 1.2 <= |d| < 1.8 on both sides, weighted to balance the strip. On a tile crossed by a trail 4
#   sigma at its peak pixel, 2 x 2 cells and 24 directions (sides -1) gave the trail's windows 8.1 (the 20th
#   best) against 4.5 for the best other window, at 0.14 ms per window of one thread (the fast mode's whole time
#   0.17 without it); 4 x 4 cells and 16 directions 6.2 against 3.2, at 0.025 ms; balanced, 5.7 against 2.6 (the
#   sides out to 2.4 or 3.0 cells: 5.9 against 3.0, 6.7 against 3.7)
LINE_MIN_COVER = 0.5  # a piece whose sky pixels are fewer than this fraction of its cells' pixels is no test


_LINE_MASKS: dict = {}


def _line_masks(cells: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """The line term's strips over a cells x cells grid (line_terms): weights W (cells^2, L) of every direction,
    offset and segment (L = LINE_ANGLES x offsets x LINE_SEGMENTS columns, segments last), +1 on the strip and
    minus the strip's cells over the sides' on the cells beside it (a piece's weights sum to 0; none where a piece
    has no side cells); W^2; each column's sum of W^2 (its noise variance over a window all sky, in cells); and (L / LINE_SEGMENTS, 3) the (dy, dx) of each
    line's point nearest the centre, in cells, and its direction (degrees from +x towards +y). Built once per
    size."""
    if cells not in _LINE_MASKS:
        c = (cells - 1) / 2
        v, u = np.mgrid[0:cells, 0:cells].astype(np.float64)  # v: row (y), u: column (x)
        cols, points = [], []
        step = cells / LINE_SEGMENTS
        for k in range(LINE_ANGLES):
            th = np.pi * k / LINE_ANGLES
            along = (u - c) * np.cos(th) + (v - c) * np.sin(th)
            across = -(u - c) * np.sin(th) + (v - c) * np.cos(th)
            for rho in range(-LINE_OFFSET_CELLS, LINE_OFFSET_CELLS + 1):
                d = np.abs(across - rho)
                strip, side = d < LINE_HALF_WIDTH, (d >= 2 * LINE_HALF_WIDTH) & (d < 3 * LINE_HALF_WIDTH)
                for seg in range(LINE_SEGMENTS):
                    piece = (along >= -cells / 2 + seg * step) & (along < -cells / 2 + (seg + 1) * step)
                    a, b = (strip & piece).sum(), (side & piece).sum()
                    # the sides weighted to sum to the strip's opposite: a constant level cancels
                    w = np.where(strip & piece, 1.0, np.where(side & piece, -a / max(b, 1), 0.0)) if b else 0 * d
                    cols.append(w.ravel())
                points.append((rho * np.cos(th), -rho * np.sin(th), np.degrees(th)))
        w = torch.as_tensor(np.array(cols, np.float32).T.copy())
        _LINE_MASKS[cells] = (w, w * w, (w * w).sum(0), np.array(points))
    return _LINE_MASKS[cells]


def line_terms(residual: torch.Tensor, sky: torch.Tensor) -> torch.Tensor:
    """The line term of windows (N, 5: S/N, the line's point nearest the centre, y and x in stamp pixels, its
    band's index and its direction, degrees from +x towards +y in [0, 180)) from
    their residuals over the model's sky, (x - G(z)) in units of each pixel's noise and 0 off the sky
    (N, B, S, S), and the sky mask (N, 1 or B, S, S; 1 on the sky).

    A faint satellite trail in one band is a line of pixels a few sigma above the sky that the generator does not
    draw: no pixel of it is worse than the noise's worst in a window (the pixel term), and over a quarter of the
    window it is one structure among the faint sources' residuals (the diffuse term). Summed along its length it
    stands far out: a trail 4 sigma at its peak pixel is 40 sigma over a 32 px window. The residual is summed over
    LINE_BIN x LINE_BIN cells, then along strips of LINE_ANGLES directions and offsets from the centre (up to
    LINE_OFFSET_CELLS cells) less the cells on both sides of the strip (weighted to balance it: a constant level
    cancels, and a gradient, a halo or a ghost's slope mostly), in LINE_SEGMENTS pieces along each strip, each
    piece's sum over its noise (the square root of its sky pixels' weights); a line's S/N is its weakest piece's
    (a compact source's residual is in one piece only: a line must hold all along), the window's the best line's
    in its best band. The sky is the pixels the model calls sky in every band; a piece with too few of them
    (LINE_MIN_COVER) counts 0. Done as one matrix product over precomputed strips (_line_masks): about a seventh
    of the fast mode's time per window it is taken for (the anomaly stage takes it on its coarse windows and their
    neighbours next to a line).
    Written here: the trail finders of survey pipelines (Hough and Radon transforms of whole images) work on the
    detection image, where a trail 4 sigma at its peak is one structure among the sources; this one works on the
    generator's residual, where the sources are gone."""
    n, nb, size = residual.shape[0], residual.shape[1], residual.shape[-1]
    if size % LINE_BIN:
        raise ValueError(f"line_terms: stamp size {size} is not a multiple of LINE_BIN {LINE_BIN}")
    cells = size // LINE_BIN
    w, w2, count, points = _line_masks(cells)
    sky = sky.float().amin(1, keepdim=True)  # sky in every band: one set of weights for all bands

    def cell_sums(a: torch.Tensor) -> torch.Tensor:  # (N, C, S, S) -> (N * C, cells^2)
        return torch.nn.functional.avg_pool2d(a, LINE_BIN).reshape(-1, cells * cells) * (LINE_BIN * LINE_BIN)

    num = cell_sums(residual.float() * sky) @ w  # (N * B, L)
    den = cell_sums(sky) @ w2  # (N, L)
    ok = den >= LINE_MIN_COVER * LINE_BIN * LINE_BIN * count
    inv = torch.where(ok, den.clamp_min(1.0).rsqrt(), torch.zeros_like(den))  # a piece without its sky: 0
    snr = (num.reshape(n, nb, -1) * inv[:, None, :]).reshape(n, nb, -1, LINE_SEGMENTS).amin(-1)  # weakest piece
    best, k = snr.flatten(1).max(1)  # the best line of the best band
    band, k = torch.div(k, snr.shape[2], rounding_mode="floor"), k % snr.shape[2]
    c = (size - 1) / 2
    p = torch.as_tensor(points, dtype=torch.float32)[k]
    return torch.stack([best, c + LINE_BIN * p[:, 0], c + LINE_BIN * p[:, 1], band.float(), p[:, 2]], 1)
