"""Anomaly candidates from the anomaly stage's dense grid (the tiles' `anomaly_map` side tables): regions of
high-scoring windows, each listed once however many windows, tiles or fields cover it.

- sigma-score of a window: (score - median) / (1.4826 MAD) over every window of the run. Robust statistics,
  because the anomalies themselves are the tail; a window's meaning depends on the survey's depth and seeing,
  its rank within the run does not (Storey-Fisher et al. 2021 use sigma-scores the same way).
- regions: in each field, the windows of sigma >= `sigma_grow` (default half of `sigma_cut`) connected through
  their grid neighbours (eight around each; tasks/stages/_anomaly_grid.py's grid is the field's, so a region
  crossing a tile boundary is one region) that hold at least one window of sigma >= `sigma_cut`: the cut finds
  a feature, the lower threshold keeps a trail that fades along its length in one piece (hysteresis, as in
  edge detection). A region's peak is its highest window; ra, dec, x, y are that window's worst 2 x 2 px cell.
- across fields: regions of overlapping fields within (extent_a + extent_b) / 2 + `match_arcsec` of each other
  on the sky are one candidate (the highest sigma kept, bands and window counts joined).
- shape hint: "point" when the windows' worst cells all lie within 3 px of the peak's (one feature seen by every
  window: a cosmic ray, a hot pixel cluster, a compact galaxy), "linear" when they spread along one direction
  (the second-moment axis ratio >= 4 over at least two grid steps: a trail), "extended" otherwise.
- source: the catalog's nearest primary source within `match_arcsec` of the peak, if any (`source_id`, and its
  own `anomaly_sigma` from its centred stamp).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["CANDIDATE_COLUMNS", "build_candidates", "window_sigma"]

CANDIDATE_COLUMNS = ("anomaly_rank", "field", "ra", "dec", "x", "y", "anomaly_sigma", "score", "score_paper",
                     "extent_arcsec", "n_windows", "bands", "shape", "source_id", "source_anomaly_sigma")


def window_sigma(score: np.ndarray) -> tuple[np.ndarray, dict]:
    """sigma-scores of the windows' scores (module docstring) and the statistics (median, scale, n)."""
    s = np.asarray(score, np.float64)
    ok = np.isfinite(s)
    med = float(np.median(s[ok])) if ok.any() else 0.0
    mad = float(np.median(np.abs(s[ok] - med))) * 1.4826 if ok.any() else 1.0
    scale = mad if mad > 0 else 1.0
    return (s - med) / scale, dict(median=med, scale=scale, n=int(ok.sum()))


def _unit(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    r, d = np.radians(ra), np.radians(dec)
    return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])


def _arcsec(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.degrees(2 * np.arcsin(np.clip(np.linalg.norm(u - v, axis=-1) / 2, 0, 1))) * 3600.0


def _shape(px: np.ndarray, py: np.ndarray, k: int, stride: float) -> str:
    dx, dy = px - px[k], py - py[k]
    if np.all(np.hypot(dx, dy) <= 3.0):
        return "point"
    cov = np.cov(np.vstack([px, py])) if len(px) > 1 else np.zeros((2, 2))
    w = np.sort(np.linalg.eigvalsh(cov))
    length = np.hypot(px.max() - px.min(), py.max() - py.min())
    if length >= 2 * stride and w[1] > 0 and w[0] <= w[1] / 16:  # axis ratio >= 4
        return "linear"
    return "extended"


def _regions(w: pd.DataFrame, sigma: np.ndarray, cut: float, grow: float, stride: float) -> list[dict]:
    """The regions of one field's windows (module docstring)."""
    warm = sigma >= min(grow, cut)
    if not (sigma >= cut).any():
        return []
    ky, kx = w.ky.to_numpy(), w.kx.to_numpy()
    grid = np.zeros((ky.max() + 1, kx.max() + 1), bool)
    grid[ky[warm], kx[warm]] = True
    lab, _ = ndimage.label(grid, structure=np.ones((3, 3), bool))
    region = np.where(warm, lab[ky, kx], 0)
    seeded = np.unique(region[(sigma >= cut) & (region > 0)])
    out = []
    for r in seeded:
        ix = np.flatnonzero(region == r)
        k = int(np.argmax(sigma[ix]))
        p = ix[k]
        u = _unit(w.ra.to_numpy()[ix], w.dec.to_numpy()[ix])
        extent = float(_arcsec(u[:, None, :], u[None, :, :]).max()) if len(ix) > 1 else 0.0
        out.append(dict(field=w.field.iloc[p], ra=float(w.ra.iloc[p]), dec=float(w.dec.iloc[p]),
                        x=float(w.peak_x.iloc[p]), y=float(w.peak_y.iloc[p]), anomaly_sigma=float(sigma[p]),
                        score=float(w.score.iloc[p]), score_paper=float(w.score_paper.iloc[p]),
                        extent_arcsec=extent, n_windows=int(len(ix)),
                        bands=",".join(sorted(set(w.band.to_numpy()[ix].astype(str)))),
                        shape=_shape(w.peak_x.to_numpy(float)[ix], w.peak_y.to_numpy(float)[ix], k, stride)))
    return out


def _merge_fields(c: pd.DataFrame, match_arcsec: float) -> pd.DataFrame:
    """One row per group of candidates of different fields that overlap on the sky (module docstring)."""
    if len(c) < 2 or c.field.nunique() < 2:
        return c
    c = c.sort_values("anomaly_sigma", ascending=False, kind="stable").reset_index(drop=True)
    u = _unit(c.ra.to_numpy(), c.dec.to_numpy())
    tree = cKDTree(u)
    reach = np.radians((c.extent_arcsec.max() + match_arcsec) / 3600.0)
    taken = np.zeros(len(c), bool)
    rows = []
    for i in range(len(c)):
        if taken[i]:
            continue
        near = [j for j in tree.query_ball_point(u[i], 2 * np.sin(reach / 2)) if not taken[j] and j != i]
        near = [j for j in near if c.field[j] != c.field[i] and _arcsec(u[i], u[j]) <=
                (c.extent_arcsec[i] + c.extent_arcsec[j]) / 2 + match_arcsec]
        row = c.iloc[i].to_dict()
        if near:
            row["bands"] = ",".join(sorted(set(",".join([row["bands"], *c.bands[near]]).split(","))))
            row["n_windows"] = int(row["n_windows"] + c.n_windows[near].sum())
        taken[[i, *near]] = True
        rows.append(row)
    return pd.DataFrame(rows)


def build_candidates(maps: pd.DataFrame, sigma_cut: float, stride: float, sources: pd.DataFrame | None = None,
                     match_arcsec: float = 1.5, sigma_grow: float | None = None) -> tuple[pd.DataFrame, dict]:
    """Candidates (CANDIDATE_COLUMNS, ranked by anomaly_sigma, rank 1 the highest) from the run's windows `maps`
    (the anomaly_map tables concatenated) and the statistics of the windows' sigma-scores. sources: the
    catalog's primary sources (source_id, ra, dec and anomaly_sigma when scored) for the coincidences.
    sigma_grow: regions grow through windows of at least this sigma (default sigma_cut / 2)."""
    grow = sigma_cut / 2 if sigma_grow is None else sigma_grow
    sigma, stats = window_sigma(maps["score"].to_numpy())
    rows = []
    for _, w in maps.assign(_sigma=sigma).groupby("field", sort=True):
        rows += _regions(w.reset_index(drop=True), w._sigma.to_numpy(), sigma_cut, grow, stride)
    c = pd.DataFrame(rows, columns=[k for k in CANDIDATE_COLUMNS if k not in
                                    ("anomaly_rank", "source_id", "source_anomaly_sigma")])
    c = _merge_fields(c, match_arcsec)
    c["source_id"] = pd.array([pd.NA] * len(c), dtype="Int64")
    c["source_anomaly_sigma"] = np.full(len(c), np.nan, np.float32)
    if sources is not None and len(sources) and len(c):
        d, j = cKDTree(_unit(sources.ra.to_numpy(), sources.dec.to_numpy())).query(_unit(c.ra.to_numpy(),
                                                                                         c.dec.to_numpy()))
        near = np.degrees(2 * np.arcsin(np.clip(d / 2, 0, 1))) * 3600.0 <= match_arcsec
        c.loc[near, "source_id"] = sources.source_id.to_numpy()[j[near]]
        if "anomaly_sigma" in sources.columns:
            c.loc[near, "source_anomaly_sigma"] = sources.anomaly_sigma.to_numpy(np.float32)[j[near]]
    c = c.sort_values(["anomaly_sigma", "field", "y", "x"], ascending=[False, True, True, True], kind="stable")
    c.insert(0, "anomaly_rank", np.arange(1, len(c) + 1))
    return c.reset_index(drop=True)[list(CANDIDATE_COLUMNS)], stats
