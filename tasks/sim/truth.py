"""Truth catalogs of a simulated survey: objects, clusters, lenses and anomalies, as tables.

Objects have one row per (object, field) for every field whose pixels hold the object's centre;
`is_primary` marks the row of the field that owns the position (nearest field centre), so
selecting is_primary rows gives each object exactly once.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .sources import mag_to_flux

BLEND_RADIUS_HLR = 2.0  # footprint radius = 2 x PSF-convolved half-light radius


def blend_groups(x: np.ndarray, y: np.ndarray, radius: np.ndarray, ids: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Friends-of-friends groups of sources whose footprints overlap (distance < r_a + r_b).

    Returns (blend_id, n_blend): blend_id is the smallest source id of the group (the source's own
    id when isolated) and n_blend the group size.
    """
    n = len(x)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tree = cKDTree(np.column_stack([x, y]))
    pairs = tree.query_pairs(r=2 * float(np.max(radius)), output_type="ndarray")
    if len(pairs):
        d = np.hypot(x[pairs[:, 0]] - x[pairs[:, 1]], y[pairs[:, 0]] - y[pairs[:, 1]])
        pairs = pairs[d < radius[pairs[:, 0]] + radius[pairs[:, 1]]]
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)) if len(pairs) \
        else coo_matrix((n, n))
    _, labels = connected_components(graph, directed=False)
    df = pd.DataFrame({"label": labels, "id": ids})
    return (df.groupby("label")["id"].transform("min").to_numpy(np.int64),
            df.groupby("label")["id"].transform("size").to_numpy(np.int64))


def object_rows(field_name: str, field_index: int, placed_in: list, owner: dict[int, int], bands: list[str],
                zeropoint: float, ref_band: str, psf_fwhm_ref: float, pixel_scale: float,
                per_band: dict[str, dict], detect_mag: float) -> pd.DataFrame:
    """Truth rows of the sources whose centres lie in one field.

    placed_in: render.Placed of those sources; owner: source id -> owning field index;
    per_band: band -> {source id: (blendedness, snr)} from the renderer; detect_mag: sources
    fainter than this in the reference band are left out of blend groups (they are undetectable).
    """
    rows = []
    for p in placed_in:
        s = p.source
        row = s.truth()
        row.update(field=field_name, x=p.x, y=p.y, is_primary=owner[s.id] == field_index)
        for b in bands:
            row[f"mag_{b}"] = s.mag[b]
            row[f"flux_{b}"] = mag_to_flux(s.mag[b], zeropoint)
            blend, sn = per_band[b].get(s.id, (np.nan, 0.0))
            row[f"snr_{b}"] = sn
            if b == ref_band:
                row["blendedness"] = blend
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    hlr_conv = np.sqrt(df["hlr"].to_numpy() ** 2 + (psf_fwhm_ref / 2) ** 2) / pixel_scale
    radius = BLEND_RADIUS_HLR * hlr_conv
    visible = (df[f"mag_{ref_band}"] < detect_mag).to_numpy()
    blend_id = df["id"].to_numpy(np.int64).copy()
    n_blend = np.ones(len(df), np.int64)
    if visible.any():
        bid, nb = blend_groups(df["x"].to_numpy()[visible], df["y"].to_numpy()[visible], radius[visible],
                               df["id"].to_numpy(np.int64)[visible])
        blend_id[visible], n_blend[visible] = bid, nb
    df["blend_id"], df["n_blend"] = blend_id, n_blend
    return df


def anomaly_row(anomaly_id: int, kind: str, field_name: str, band: str, x: float, y: float, ra: float,
                dec: float, is_primary: bool, params: dict) -> dict:
    """One anomaly truth row; type-specific parameters go into a JSON `params` column."""
    clean = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in params.items()}
    return dict(anomaly_id=int(anomaly_id), type=kind, field=field_name, band=band, x=float(x), y=float(y),
                ra=float(ra), dec=float(dec), is_primary=bool(is_primary),
                params=json.dumps(clean, sort_keys=True, default=float))
