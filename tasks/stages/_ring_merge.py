"""The detect stage's ring galaxies as one source each (tasks/stages/detect.py, `merge_rings`).

A collisional ring galaxy is one galaxy whose light is a ring, star-forming knots on it and a faint nucleus.
The detectors split it: SEP's deblending and the learned detector's peaks find each knot and arc as a source
of its own (on `deepfield eval detect`'s fields, seed 20261201, 17 detections on the 4 ring galaxies, 15 of them
matching no true object, against 102 unmatched detections in all). The ring term's search
(tasks/stages/_rings.py: an enclosed depression with an even rim of at least 8 sigma, on the PSF-filtered and
the finer S/N map) finds the ring; the detections of one footprint within 1.2 times the ring's radius (the upper
quartile of its rim points' distances from its centre) of its centre are then one source: the segments joined, centred on the ring's centre (the mean of its rim points,
which the knots and an offset nucleus do not pull), its shape, flux and box those of the joined pixels.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ._detect_table import in_core, without_rows
from ._learned_split import _records

__all__ = ["REACH", "merge_rings"]

REACH = 16  # px: how far a ring's rim is looked for from its depression (the anomaly stage's half window)
RIM = 8.0  # the rim's least S/N on every ray (the anomaly stage's ring_rim default)
WITHIN = 1.2  # detections within this many ring radii of the centre are the ring's (knots lie on the rim)


def merge_rings(table: pd.DataFrame, segmap: np.ndarray, det: np.ndarray, snr: np.ndarray,
                rings: tuple[np.ndarray, np.ndarray, np.ndarray], core) -> tuple[pd.DataFrame, np.ndarray, int]:
    """(table, segmap, number of rings merged): `table` (the detect stage's columns, seg_id k on segmap pixels k)
    with the detections of each ring of `rings` ((x, y, depth) of the depressions, halo-array pixels) joined
    into one (module docstring). det: the detection image; snr: the S/N map the rims are found on; core: the tile
    core (field pixels) for is_primary. Rows are numbered again (seg_id 1..n, segmap to match)."""
    from ._rings import rims
    x, y, _ = rings
    if not len(x) or table.empty:
        return table, segmap, 0
    cx, cy, radius = rims(snr, x, y, REACH)
    table = table.copy()
    tx, ty = table.x_tile.to_numpy(float), table.y_tile.to_numpy(float)
    drop = np.zeros(len(table), bool)
    merged = 0
    for k in range(len(x)):
        d = np.hypot(tx - cx[k], ty - cy[k])
        near = np.flatnonzero((d <= WITHIN * max(radius[k], 1.0)) & ~drop)
        if len(near) < 2:
            continue
        group = table.blend_id.to_numpy()[near[np.argmin(d[near])]]
        members = near[table.blend_id.to_numpy()[near] == group]
        if len(members) < 2:
            continue
        keep = members[np.argmax(table.flux_det.to_numpy()[members])]
        ids = table.seg_id.to_numpy()[members]
        on = np.isin(segmap, ids)
        segmap[on] = table.seg_id.iloc[keep]
        pix = np.flatnonzero(on)
        rec = _records(pix, np.zeros(len(pix), np.int64), det, 1)
        row = table.index[keep]
        ox, oy = table.x.iloc[keep] - tx[keep], table.y.iloc[keep] - ty[keep]  # the tile's offset in the field
        table.loc[row, ["x_tile", "y_tile"]] = [cx[k], cy[k]]
        table.loc[row, ["x", "y"]] = [cx[k] + ox, cy[k] + oy]
        for c in ("a", "b", "theta"):
            table.loc[row, c] = float(rec[c][0])
        table.loc[row, "npix"] = int(rec["npix"][0])
        table.loc[row, "flux_det"] = float(rec["flux"][0])
        table.loc[row, "peak_det"] = float(rec["peak"][0])
        for c, f in (("xmin_tile", "xmin"), ("xmax_tile", "xmax"), ("ymin_tile", "ymin"), ("ymax_tile", "ymax")):
            table.loc[row, c] = int(rec[f][0])
        table.loc[row, "det_flag"] = int(np.bitwise_or.reduce(table.det_flag.to_numpy()[members]))
        table.loc[row, "is_primary"] = bool(in_core(cx[k] + ox, cy[k] + oy, core))
        drop[members[members != keep]] = True
        merged += 1
    if not merged:
        return table, segmap, 0
    # a dropped member's pixels are its ring's kept row's already
    out, segmap = without_rows(table, segmap, drop)
    return out, segmap, merged
