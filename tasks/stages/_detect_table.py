"""The detect stage's output table (tasks/stages/detect.py, "Output columns"): its columns, the table made from
the detections' SEP-style records, and rows taken out of it afterwards with the segmentation map numbered again
(the artefacts `reject_sharp` leaves out, the pieces `merge_rings` joins into their ring)."""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["COLUMNS", "empty_table", "in_core", "detections_table", "without_rows"]

COLUMNS = {
    "x": "f8", "y": "f8", "x_tile": "f8", "y_tile": "f8", "a": "f8", "b": "f8", "theta": "f8",
    "npix": "i8", "xmin_tile": "i8", "xmax_tile": "i8", "ymin_tile": "i8", "ymax_tile": "i8",
    "flux_det": "f8", "peak_det": "f8", "det_flag": "i8", "seg_id": "i8", "blend_id": "i8",
    "n_blend": "i8", "is_blended": "bool", "is_primary": "bool",
}


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})


def in_core(x_field, y_field, core) -> np.ndarray:
    """is_primary: the centroid's pixel, floor(coord + 0.5), lies in the tile core (field pixels)."""
    px, py = np.floor(np.asarray(x_field, float) + 0.5), np.floor(np.asarray(y_field, float) + 0.5)
    return (px >= core.x0) & (px < core.x1) & (py >= core.y0) & (py < core.y1)


def detections_table(tile, objs, blend_id: np.ndarray) -> pd.DataFrame:
    """The output table of detections `objs` (SEP's record fields) in blend groups `blend_id` (sorted); seg_id
    is the row index + 1."""
    n = len(objs)
    if n == 0:
        return empty_table()
    _, inverse, counts = np.unique(blend_id, return_inverse=True, return_counts=True)
    n_blend = counts[inverse]
    x_t, y_t = objs["x"].astype(float), objs["y"].astype(float)
    x_f, y_f = x_t + tile.box.x0, y_t + tile.box.y0
    out = pd.DataFrame({
        "x": x_f, "y": y_f, "x_tile": x_t, "y_tile": y_t,
        "a": objs["a"].astype(float), "b": objs["b"].astype(float), "theta": objs["theta"].astype(float),
        "npix": objs["npix"].astype(np.int64),
        "xmin_tile": objs["xmin"].astype(np.int64), "xmax_tile": objs["xmax"].astype(np.int64),
        "ymin_tile": objs["ymin"].astype(np.int64), "ymax_tile": objs["ymax"].astype(np.int64),
        "flux_det": objs["flux"].astype(float), "peak_det": objs["peak"].astype(float),
        "det_flag": objs["flag"].astype(np.int64), "seg_id": np.arange(1, n + 1, dtype=np.int64),
        "blend_id": blend_id, "n_blend": n_blend.astype(np.int64), "is_blended": n_blend > 1,
        "is_primary": in_core(x_f, y_f, tile.core),
    })
    return out.astype(COLUMNS)


def without_rows(table: pd.DataFrame, segmap: np.ndarray, drop: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """`table` (seg_id = row index + 1) without the rows `drop` (bool), and `segmap` numbered to match: the rows
    left 1..n in order, the pixels still valued as a dropped row above n (the stages after detect then mask them
    as another detection's); blend groups counted again."""
    n, keep = len(table), ~np.asarray(drop, bool)
    lut = np.zeros(n + 1, np.int32)
    lut[1:][keep] = np.arange(1, keep.sum() + 1)
    lut[1:][~keep] = np.arange(keep.sum() + 1, n + 1)
    out = table[keep].reset_index(drop=True)
    out["seg_id"] = np.arange(1, len(out) + 1, dtype=np.int64)
    out["n_blend"] = out.groupby("blend_id")["blend_id"].transform("size").astype(np.int64)
    out["is_blended"] = out["n_blend"] > 1
    return out.astype(COLUMNS), lut[segmap]
