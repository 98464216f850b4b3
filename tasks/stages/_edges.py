"""The measure stage's `flag_edge` (tasks/stages/measure.py): which sides of a tile's arrays are field edges
(`field_edges`), and which sources' footprints or apertures reach one (`edge_flags`)."""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["edge_flags", "field_edges"]


def field_edges(tile) -> tuple[bool, bool, bool, bool]:
    """Which sides of the halo arrays are field edges: (low y, high y, low x, high x).

    A side is a field edge where the halo box is clipped there: the halo width is the widest
    core-to-box margin on any side, and a side with a narrower margin was clipped. A tile with no
    margin anywhere (no halo, or a field no larger than a tile) treats every side as an edge. A tile
    attribute `field_shape` (ny, nx), where present, decides the high sides exactly."""
    box, core = tile.box, tile.core
    m = (core.y0 - box.y0, box.y1 - core.y1, core.x0 - box.x0, box.x1 - core.x1)
    halo = max(m)
    edges = [halo == 0 or mi < halo for mi in m]
    edges[0] = edges[0] or box.y0 == 0
    edges[2] = edges[2] or box.x0 == 0
    shape = getattr(tile, "field_shape", None)
    if shape is not None and len(shape) == 2 and min(shape) > 0:  # (0, 0): unknown
        edges = [box.y0 == 0, box.y1 >= shape[-2], box.x0 == 0, box.x1 >= shape[-1]]
    return tuple(bool(e) for e in edges)


def edge_flags(tile, src: pd.DataFrame, x, y, reach, shape) -> np.ndarray:
    """True where an aperture of radius `reach` (pixels) or the footprint meets a field edge."""
    lo_y, hi_y, lo_x, hi_x = field_edges(tile)
    ny, nx = shape
    touch = np.zeros(len(x), dtype=bool)
    bbox = all(c in src.columns for c in ("xmin_tile", "xmax_tile", "ymin_tile", "ymax_tile"))
    if lo_y:
        touch |= y - reach < -0.5
        touch |= bbox and (src["ymin_tile"].to_numpy() <= 0)
    if hi_y:
        touch |= y + reach > ny - 0.5
        touch |= bbox and (src["ymax_tile"].to_numpy() >= ny - 1)
    if lo_x:
        touch |= x - reach < -0.5
        touch |= bbox and (src["xmin_tile"].to_numpy() <= 0)
    if hi_x:
        touch |= x + reach > nx - 0.5
        touch |= bbox and (src["xmax_tile"].to_numpy() >= nx - 1)
    return touch
