"""Regions of the anomaly stage's grid windows (catalogs/anomaly_candidates.py ranks the windows and turns these
into the candidates): each feature one region, however many windows, tiles or fields cover it.

- regions: in each field, the windows of sigma >= `sigma_grow` (default half of `sigma_cut`) connected through
  their grid neighbours (eight around each; tasks/stages/_anomaly_grid.py's grid is the field's, so a region
  crossing a tile boundary is one region) that hold at least one window of sigma >= `sigma_cut`: the cut finds
  a feature, the lower threshold keeps a trail that fades along its length in one piece (hysteresis, as in
  edge detection). A region's peak is its highest window; ra, dec, x, y are that window's worst pixel, except
  for a linear region (a trail), whose position is the worst pixel of its window nearest the region's middle.
- points split out: a region can join a point-like feature to another feature, such as a cosmic ray on a
  trail, beside a galaxy or beside another cosmic ray. The windows are taken from the highest sigma down (a
  watershed): a window joins the group of its highest neighbour, and where it touches several groups they
  become one, except a point: a group whose peak is at least sigma_cut and at least `POINT_WINDOWS` (4) of
  whose windows, and most of them, have their worst pixel within `POINT_PX` (3) px of its peak window's
  (every window holding that pixel, 2 x 2 of the grid, found it the worst). A point stays a candidate of its
  own and takes only the windows that find its pixel the worst; the groups on its sides (a trail's two halves,
  a galaxy's skirts) are joined again at the end. A trail's windows find their worst pixels at different places
  along it, so a trail is not a point. On `deepfield eval anomaly`'s fields run with the default stages, 49
  injected anomalies with a window above sigma_cut (35 of the 180 cosmic rays, 6 lenses, 3 ring galaxies, 2
  trails) were listed under another feature's peak before; now 157 of the cosmic rays are candidates (131),
  all three trails (1), 9 of 12 ring galaxies (7), and the first 100 candidates are all true anomalies (95).
- bands: those of the region's windows at sigma >= sigma_cut (each window's worst pixel's band, or its line's).
- across fields: regions of overlapping fields within (extent_a + extent_b) / 2 + `match_arcsec` of each other
  on the sky are one candidate (the highest sigma kept, bands and window counts joined).
- shape hint: "ring", "lens" and "merger" (above); "point" when the windows' worst pixels all lie within 3 px of the peak's (one
  feature seen by every window: a cosmic ray, a hot pixel cluster, a compact galaxy), "linear" when they spread
  along one direction (the second-moment axis ratio >= 4 over at least two grid steps: a trail), "extended"
  otherwise.
- trails in pieces: a trail that faint dips under sigma_grow here and there along its length and broke into
  several regions; regions ranked by their line term whose line points lie on one straight line are one
  (`_join_lines`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from deepfield.tasks.astro import unit_vectors

__all__ = ["POINT_PX", "POINT_WINDOWS", "TRAIL_PX", "merge_fields", "regions"]


def _arcsec(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.degrees(2 * np.arcsin(np.clip(np.linalg.norm(u - v, axis=-1) / 2, 0, 1))) * 3600.0


def _shape(px: np.ndarray, py: np.ndarray, k: int, stride: float) -> str:
    dx, dy = px - px[k], py - py[k]
    if np.all(np.hypot(dx, dy) <= POINT_PX):
        return "point"
    cov = np.cov(np.vstack([px, py])) if len(px) > 1 else np.zeros((2, 2))
    w = np.sort(np.linalg.eigvalsh(cov))
    length = np.hypot(px.max() - px.min(), py.max() - py.min())
    if length >= 2 * stride and w[1] > 0 and w[0] <= w[1] / 16:  # axis ratio >= 4
        return "linear"
    return "extended"


TRAIL_PX = 128.0  # px: a linear region at least this long (a trail, not a cosmic ray's track) is placed at its middle
POINT_PX = 3.0  # px: windows whose worst pixels lie this close to their peak window's see one point-like feature
POINT_WINDOWS = 4  # windows that must see a group's peak pixel as their worst for it to be a point


def _watershed(ky: np.ndarray, kx: np.ndarray, px: np.ndarray, py: np.ndarray, sigma: np.ndarray, cut: float,
               grow: float, seeded: bool = True) -> np.ndarray:
    """Region label of every window of one field (0: none), points split out (module docstring); seeded=False:
    of the groups without a window at `cut` too (to be joined before the cut: _regions). Written
    here rather than taken from scikit-image's watershed: that one splits at every local maximum (a trail's
    bumps) unless given markers, and which groups stay apart is only known as they grow."""
    label = np.zeros(len(sigma), np.int64)
    warm = np.flatnonzero(sigma >= grow)
    if not len(warm):
        return label
    index = {(int(ky[i]), int(kx[i])): i for i in warm}
    parent = {}
    peak = {}  # root -> its highest window
    core = {}  # root -> its windows whose worst pixel is within POINT_PX of its peak window's
    size = {}  # root -> its number of windows
    kept = set()  # roots of the points: groups that stay candidates of their own

    def near(i, j):
        return np.hypot(px[i] - px[j], py[i] - py[j]) <= POINT_PX

    def neighbours(i):  # the warm windows among the eight grid neighbours of window i
        return [j for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy or dx)
                for j in [index.get((int(ky[i]) + dy, int(kx[i]) + dx))] if j is not None]

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in warm[np.argsort(-sigma[warm], kind="stable")]:
        roots = {find(j) for j in neighbours(i) if j in parent}  # those already taken
        parent[i], peak[i], core[i], size[i] = i, i, 1, 1
        if not roots:
            continue
        roots = sorted(roots, key=lambda r: -sigma[peak[r]])
        kept.update(r for r in roots if core[r] >= POINT_WINDOWS and 2 * core[r] >= size[r]
                    and sigma[peak[r]] >= cut)
        rest = [r for r in roots if r not in kept]
        seen = [r for r in roots if r in kept and near(i, peak[r])]
        top = seen[0] if seen else rest[0] if rest else None  # a point takes only the windows that see it
        if top is None:
            continue
        parent[i] = top
        core[top] += int(near(i, peak[top]))
        size[top] += 1
        for r in rest:  # the others it touches become one with it
            if r == top:
                continue
            parent[r] = top
            core[top] += core[r] if near(peak[r], peak[top]) else 0
            size[top] += size[r]
    # the groups a point lies across (a trail's two sides, a galaxy's skirts) are one again
    sides: dict = {}
    for i in [i for i in warm if find(i) in kept]:
        sides.setdefault(find(i), set()).update(neighbours(i))
    for touching in sides.values():
        side = sorted({find(j) for j in touching} - kept, key=lambda r: -sigma[peak[r]])
        for r in side[1:]:
            parent[r] = side[0]
    roots = np.array([find(i) for i in warm])
    kept_roots = {r for r in set(roots.tolist()) if sigma[peak[r]] >= cut or not seeded}
    ids = {r: k + 1 for k, r in enumerate(sorted(kept_roots))}
    label[warm] = [ids.get(r, 0) for r in roots]
    return label


LINE_JOIN_PX = 6.0  # px: regions ranked by their line term whose line points all lie this close to one line are one
LINE_JOIN_DEG = 12.0  # degrees: ... and whose directions lie this close to that line's (about one of line_terms')


def _join_lines(region: np.ndarray, px: np.ndarray, py: np.ndarray, angle: np.ndarray, sigma: np.ndarray,
                lined: np.ndarray) -> np.ndarray:
    """`region` with the regions that hold windows ranked by their line term (`lined`; px, py their line points,
    `angle` their lines' directions in degrees) made one where they lie on one straight line: a satellite trail is
    straight across the field, and one faint enough for the line term to find dips under sigma_grow here and
    there along its length (or passes under a bright star), which broke it into pieces. Two groups join when a
    line fitted to all their line points (the principal axis) passes within LINE_JOIN_PX of every one and within
    LINE_JOIN_DEG of the direction of each group's best line; groups are joined from the highest sigma down, over
    and over until no two join (the anomaly stage takes the line term on its coarse windows, two grid steps apart,
    and on their neighbours only next to a line: a faint trail's windows are often regions of their own).
    Written here: a handful of regions per field, whose test is this fit."""
    heads = [r for r in np.unique(region[region > 0]) if (lined & (region == r)).any()]
    if len(heads) < 2:
        return region
    pts = {r: np.flatnonzero(lined & (region == r)) for r in heads}
    top = {r: pts[r][int(np.argmax(sigma[pts[r]]))] for r in heads}

    def straight(ix: np.ndarray, ends: list[int]) -> bool:
        xy = np.column_stack([px[ix], py[ix]])
        xy = xy - xy.mean(0)
        _, vec = np.linalg.eigh(xy.T @ xy)
        d = vec[:, -1]  # the principal axis
        if np.abs(xy @ np.array([-d[1], d[0]])).max() > LINE_JOIN_PX:
            return False
        fit = np.degrees(np.arctan2(d[1], d[0])) % 180.0
        return all(abs((angle[e] - fit + 90.0) % 180.0 - 90.0) <= LINE_JOIN_DEG for e in ends)

    groups = {r: [r] for r in sorted(heads, key=lambda h: -sigma[top[h]])}  # the highest first
    joined = True
    while joined:  # until no two groups lie on one line
        joined = False
        for r in list(groups):
            for q in [h for h in groups if h != r and r in groups and h in groups]:
                both = groups[r] + groups[q]
                if straight(np.concatenate([pts[h] for h in both]), [top[h] for h in both]):
                    groups[r] = both
                    del groups[q]
                    joined = True
    out = region.copy()
    for r, members in groups.items():
        out[np.isin(region, members)] = r
    return out


def regions(w: pd.DataFrame, sigma: np.ndarray, cut: float, grow: float, stride: float) -> list[dict]:
    """The regions of one field's windows (module docstring), each a candidate's row without its rank and source
    (build_candidates adds them)."""
    if not (sigma >= cut).any():
        return []
    px, py = w.peak_x.to_numpy(float), w.peak_y.to_numpy(float)
    hint = w._hint.to_numpy() if "_hint" in w.columns else np.full(len(w), "")
    if "_line" in w.columns and w._line.any():  # the groups on one line joined, then those without a window at cut
        region = _watershed(w.ky.to_numpy(), w.kx.to_numpy(), px, py, sigma, cut, min(grow, cut), seeded=False)
        region = _join_lines(region, px, py, w.line_angle.to_numpy(float), sigma, w._line.to_numpy(bool))
        low = [r for r in np.unique(region[region > 0]) if sigma[region == r].max() < cut]
        region[np.isin(region, low)] = 0
    else:
        region = _watershed(w.ky.to_numpy(), w.kx.to_numpy(), px, py, sigma, cut, min(grow, cut))
    out = []
    for r in np.unique(region[region > 0]):
        ix = np.flatnonzero(region == r)
        k = int(np.argmax(sigma[ix]))
        p = ix[k]
        shape = hint[p] or _shape(px[ix], py[ix], k, stride)
        # a trail's position: its window nearest the middle of the region (its peak is anywhere along it)
        point = np.count_nonzero(np.hypot(px[ix] - px[p], py[ix] - py[p]) <= POINT_PX) >= 2
        long = shape == "linear" and not point and np.hypot(np.ptp(px[ix]), np.ptp(py[ix])) >= TRAIL_PX
        at = ix[int(np.argmin(np.hypot(px[ix] - px[ix].mean(), py[ix] - py[ix].mean())))] if long else p
        u = unit_vectors(w.ra.to_numpy()[ix], w.dec.to_numpy()[ix])
        extent = float(_arcsec(u[:, None, :], u[None, :, :]).max()) if len(ix) > 1 else 0.0
        out.append(dict(field=w.field.iloc[p], ra=float(w.ra.iloc[at]), dec=float(w.dec.iloc[at]),
                        x=float(px[at]), y=float(py[at]), anomaly_sigma=float(sigma[p]),
                        score=float(w.score.iloc[p]), score_paper=float(w.score_paper.iloc[p]),
                        extent_arcsec=extent, n_windows=int(len(ix)),
                        bands=",".join(sorted(set(w.band.to_numpy()[ix[sigma[ix] >= cut]].astype(str)))),
                        shape=shape))
    return out


def merge_fields(c: pd.DataFrame, match_arcsec: float) -> pd.DataFrame:
    """One row per group of candidates (`regions`' rows) of different fields that overlap on the sky (module
    docstring)."""
    if len(c) < 2 or c.field.nunique() < 2:
        return c
    c = c.sort_values("anomaly_sigma", ascending=False, kind="stable").reset_index(drop=True)
    u = unit_vectors(c.ra.to_numpy(), c.dec.to_numpy())
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
