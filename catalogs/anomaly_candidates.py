"""Anomaly candidates from the anomaly stage's dense grid (the tiles' `anomaly_map` side tables): regions of
high-scoring windows, each listed once however many windows, tiles or fields cover it.

- sigma-score of a window, compared with the windows of the run as bright as it: the generator reproduces
  bright stars and galaxies less well than the sky, so their scores run higher and, ranked against every
  window alone, they filled the top of the list. The windows are put in up to 20 bins of equal counts (at least
  MIN_BIN, 500, windows each) by the brightness of their reconstruction (`model_peak`, the model's brightest
  pixel in sky sigmas); with l = log(score), sigma = (l - (m + m_b) / 2) / sqrt(s * s_b), with m, s the median
  and 1.4826 MAD of l over every window and m_b, s_b over the window's bin: half the way from the plain
  sigma-score to one within its bin. Robust statistics, because the anomalies themselves are the tail; a
  window's meaning depends on the survey's depth and seeing, its rank within the run does not (Storey-Fisher
  et al. 2021 use sigma-scores the same way). Measured on `deepfield eval anomaly`'s fields (griz weights, fast
  mode, two held-out pairs of 2048^2 fields, seeds 20261125 and 20261201), ranking by this sigma instead of the
  score: AUROC 0.822 -> 0.837 and 0.918 -> 0.937, injected anomalies in the top 1 % 34 -> 49 % and 40 -> 54 %
  (cosmic rays 38 -> 54 %, 46 -> 62 %; hot pixels 33 -> 68 %, 33 -> 57 %); lenses, mergers and ring galaxies,
  bright themselves, lose 0.02-0.04 of AUROC (0.87-0.97 still) and the few of them in the top 1 %. Fully within
  the bin (not half-way) took lenses to AUROC 0.55-0.64. The normal windows' sigma is then nearly Gaussian
  (99th and 99.9th percentiles 4.1-4.2 and 6.6-7.2), and of the windows at sigma >= 5, 6-7 % are normal,
  against 59-65 % (and a 99th percentile of 31) with (score - median) / (1.4826 MAD) over every window, the
  sigma-score before 2026-12-02, which `window_sigma` still gives without `model_peak` (windows written by
  an older stage version have none). The statistics are taken over the stage's coarse windows (the `coarse`
  column, since stage version 4: a uniform sample of the grid; the stage scores the other windows only around
  high-scoring ones, which would bias them high), over every window where the column is absent.
- the ring term (tasks/stages/_rings.py; the `ring` column, since stage version 6): a window whose enclosed
  depression's depth less RING_OFFSET (4) is more than its sigma-score is ranked by that instead
  (`ranked_sigma`), its position the ring's centre; the noise's depressions stay below RING_OFFSET, a ring
  galaxy's went 12 to 171 deep on the simulator's fields, where the sigma-score had none above the normal windows'
  99th percentile. A candidate whose peak window is ranked by its ring has the shape hint "ring".
- the line term (models/anomaly_gan.line_terms; the `line` column, since stage version 7): a window whose line
  S/N less LINE_OFFSET (2), at most LINE_SIGMA_MAX (8), is more than its sigma-score (and ring term) is ranked by
  that instead (`line_sigma`), its position the line's point nearest the window's centre and its band the line's:
  a faint satellite trail. On `deepfield eval anomaly`'s two pairs of fields (seeds 20261125 and 20261201) the
  normal windows' line S/N has its 99th, 99.9th and 99.99th percentiles at 1.8-1.9, 2.8-3.2 and 3.9-5.2 (at most
  4.7 and 8.0), and the normal windows above a sigma of 4.1 (their 99th percentile), 5 and 6.6 were 0-0.4 %,
  0-1.2 % and 0 % more with the line term (the same with an offset of 3), while the one trail that no window ranked above the 99th
  percentile (4 sigma on its axis in r, along the field's edge: 3.7) went to 6.8. The cap: beyond the normal
  windows' own line S/N there is no measured rate of false alarms to rank a line by, and a bright trail's windows
  have sigma-scores of their own (7.6-11.7 at the best); without it a bright trail's 200-1,000 windows, ranked at
  up to 85, filled the top 1 % of those fields' windows (the injected anomalies in it 0.55 -> 0.26 and
  0.58 -> 0.12; with it 0.55 and 0.58, every figure against the normal windows the same).
- trails in pieces: a trail that faint dips under sigma_grow here and there along its length and broke into
  several regions; regions ranked by their line term whose line points lie on one straight line are one
  (`_join_lines`).
- the score terms (catalogs/score_terms.py): the lens and merger stages' candidates, strong lenses and mergers
  the generator's residual hardly sees, each lift the window nearest it to a sigma calibrated on the stage's
  false alarms per window, at the source, with the shape hint "lens" or "merger".
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
- source: the catalog's nearest primary source within `match_arcsec` of the peak, if any (`source_id`, and its
  own `anomaly_sigma` from its centred stamp).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from deepfield.tasks.astro import unit_vectors
from deepfield.tasks.stages._anomaly_grid import LINE_OFFSET, LINE_SIGMA_MAX
from deepfield.tasks.stages._rings import RING_OFFSET

from .score_terms import SCORE_TERMS, ScoreTerm, score_term, with_lens_term

__all__ = ["CANDIDATE_COLUMNS", "build_candidates", "line_sigma", "ranked_sigma", "window_sigma"]

CANDIDATE_COLUMNS = ("anomaly_rank", "field", "ra", "dec", "x", "y", "anomaly_sigma", "score", "score_paper",
                     "extent_arcsec", "n_windows", "bands", "shape", "source_id", "source_anomaly_sigma")


MAX_BINS = 20  # brightness bins of the sigma-scores (module docstring)
MIN_BIN = 500  # windows per bin at least: fewer windows, fewer bins; under 2 x MIN_BIN, no bins


def _robust(v: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 MAD of v (the scale 1 when it is 0)."""
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med))) * 1.4826
    return med, (mad if mad > 0 else 1.0)


def window_sigma(score: np.ndarray, model_peak: np.ndarray | None = None, reference: np.ndarray | None = None
                 ) -> tuple[np.ndarray, dict]:
    """sigma-scores of the windows' scores and the statistics (module docstring): with `model_peak`, each
    window against the run's windows and those of its brightness bin (log scores); without it (or with fewer
    than 2 x MIN_BIN usable windows), (score - median) / (1.4826 MAD) over every window. `reference` (bool per
    window; default all): the windows the statistics are taken over, a uniform sample of the grid (the
    coarse grid's windows: those the stage scored around high-scoring ones would bias them high). Windows whose
    score is not finite get NaN."""
    s = np.asarray(score, np.float64)
    ok = np.isfinite(s)
    ref = np.ones(len(s), bool) if reference is None else np.asarray(reference, bool)
    if not (ok & ref).any():
        ref = np.ones(len(s), bool)
    peak = None if model_peak is None else np.asarray(model_peak, np.float64)
    if peak is not None and np.isfinite(peak[ok]).all():  # a window without one (older tables): none binned
        good = ok & np.isfinite(peak) & (s > 0)
        nb = min(MAX_BINS, int((good & ref).sum()) // MIN_BIN)
        if nb >= 2:
            ls = np.log(np.where(good, s, 1.0))
            feat = np.log1p(np.maximum(peak, 0.0))
            edges = np.quantile(feat[good & ref], np.linspace(0, 1, nb + 1))
            b = np.clip(np.searchsorted(edges, feat, side="right") - 1, 0, nb - 1)
            med, scale = _robust(ls[good & ref])
            mb, sb = np.zeros(nb), np.ones(nb)
            for k in range(nb):
                in_k = good & ref & (b == k)
                if in_k.any():  # tied edges (many equal peaks) can leave a bin empty
                    mb[k], sb[k] = _robust(ls[in_k])
            sigma = np.where(good, (ls - 0.5 * (med + mb[b])) / np.sqrt(scale * sb[b]), np.nan)
            return sigma, dict(median=med, scale=scale, n=int((good & ref).sum()), log=True, bins=nb,
                               bin_edges_model_peak=[float(x) for x in np.expm1(edges)],
                               bin_median=[float(x) for x in mb], bin_scale=[float(x) for x in sb])
    med, scale = _robust(s[ok & ref]) if (ok & ref).any() else (0.0, 1.0)
    return np.where(ok, (s - med) / scale, np.nan), dict(median=med, scale=scale, n=int((ok & ref).sum()), log=False)


def ranked_sigma(sigma: np.ndarray, ring: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The windows' ranking sigma (module docstring): the larger of `sigma` (window_sigma's; NaN for none) and the
    ring term's depth less RING_OFFSET, and where the ring term is the larger (bool). ring None (windows of a stage
    version before 6): `sigma` unchanged."""
    sigma = np.asarray(sigma, np.float64)
    if ring is None:
        return sigma, np.zeros(len(sigma), bool)
    r = np.nan_to_num(np.asarray(ring, np.float64), nan=0.0) - RING_OFFSET
    wins = (r > 0) & ~(sigma >= r)
    return np.where(wins, r, sigma), wins


def line_sigma(sigma: np.ndarray, line: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The windows' ranking sigma with the line term (module docstring): the larger of `sigma` and the line S/N
    less LINE_OFFSET (at most LINE_SIGMA_MAX), and where the line term is the larger (bool). line None (windows
    of a stage version before 7): `sigma` unchanged."""
    sigma = np.asarray(sigma, np.float64)
    if line is None:
        return sigma, np.zeros(len(sigma), bool)
    r = np.minimum(np.nan_to_num(np.asarray(line, np.float64), nan=0.0) - LINE_OFFSET, LINE_SIGMA_MAX)
    wins = (r > 0) & ~(sigma >= r)
    return np.where(wins, r, sigma), wins


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


def _regions(w: pd.DataFrame, sigma: np.ndarray, cut: float, grow: float, stride: float) -> list[dict]:
    """The regions of one field's windows (module docstring)."""
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


def _merge_fields(c: pd.DataFrame, match_arcsec: float) -> pd.DataFrame:
    """One row per group of candidates of different fields that overlap on the sky (module docstring)."""
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


def build_candidates(maps: pd.DataFrame, sigma_cut: float, stride: float, sources: pd.DataFrame | None = None,
                     match_arcsec: float = 1.5, sigma_grow: float | None = None,
                     terms: tuple[ScoreTerm, ...] = SCORE_TERMS) -> tuple[pd.DataFrame, dict]:
    """Candidates (CANDIDATE_COLUMNS, ranked by anomaly_sigma, rank 1 the highest) from the run's windows `maps`
    (the anomaly_map tables concatenated) and the statistics of the windows' sigma-scores. sources: the
    catalog's primary sources (source_id, ra, dec and anomaly_sigma when scored) for the coincidences, and with
    field, x, y and the `terms`' columns (lens_score, merger_score: the lens and merger stages') for the score
    terms (a term whose column is absent ranks nothing).
    sigma_grow: regions grow through windows of at least this sigma (default sigma_cut / 2)."""
    grow = sigma_cut / 2 if sigma_grow is None else sigma_grow
    sigma, stats = window_sigma(maps["score"].to_numpy(),
                                maps["model_peak"].to_numpy() if "model_peak" in maps.columns else None,
                                maps["coarse"].to_numpy(bool) if "coarse" in maps.columns else None)
    sigma, ringed = ranked_sigma(sigma, maps["ring"].to_numpy() if "ring" in maps.columns else None)
    sigma, lined = line_sigma(sigma, maps["line"].to_numpy() if "line" in maps.columns else None)
    ringed &= ~lined
    hint = np.where(ringed, "ring", "").astype(object)  # the term that ranks each window ("" the sigma-score)
    at = np.full(len(maps), -1, np.int64)  # the source a score term's window is placed at
    for term in terms:  # each a larger sigma than all before it takes the window
        t, src = score_term(maps, sources, stride, term)
        sigma, won = with_lens_term(sigma, t)
        hint[won], at[won] = term.hint, src[won]
    ringed, scored = hint == "ring", at >= 0
    lined &= ~scored
    stats["ring_windows"], stats["line_windows"] = int(ringed.sum()), int(lined.sum())
    stats.update({f"{term.hint}_windows": int((hint == term.hint).sum()) for term in terms})
    if ringed.any() or lined.any() or scored.any():  # one copy of the windows for every placement
        maps = maps.copy()
        for c in ("peak_x", "peak_y", "ra", "dec"):
            # a window ranked by its ring term is placed at its ring's centre, one ranked by its line term on the
            # line (and given the line's band), one ranked by a score term at its source (a lens's deflector, a
            # merger's nucleus); windows without a ring or line term have no such columns
            if ringed.any():
                maps.loc[ringed, c] = maps.loc[ringed, f"ring_{c.removeprefix('peak_')}"].to_numpy()
            if lined.any():
                maps.loc[lined, c] = maps.loc[lined, f"line_{c.removeprefix('peak_')}"].to_numpy()
            if scored.any():
                maps.loc[scored, c] = sources[c.removeprefix("peak_")].to_numpy(float)[at[scored]]
        if lined.any():
            maps.loc[lined, "band"] = maps.loc[lined, "line_band"].to_numpy()
    rows = []
    for _, w in maps.assign(_sigma=sigma, _hint=hint, _line=lined).groupby("field", sort=True):
        rows += _regions(w.reset_index(drop=True), w._sigma.to_numpy(), sigma_cut, grow, stride)
    c = pd.DataFrame(rows, columns=[k for k in CANDIDATE_COLUMNS if k not in
                                    ("anomaly_rank", "source_id", "source_anomaly_sigma")])
    c = _merge_fields(c, match_arcsec)
    c["source_id"] = pd.array([pd.NA] * len(c), dtype="Int64")
    c["source_anomaly_sigma"] = np.full(len(c), np.nan, np.float32)
    if sources is not None and len(sources) and len(c):
        d, j = cKDTree(unit_vectors(sources.ra.to_numpy(), sources.dec.to_numpy())).query(
            unit_vectors(c.ra.to_numpy(), c.dec.to_numpy()))
        near = np.degrees(2 * np.arcsin(np.clip(d / 2, 0, 1))) * 3600.0 <= match_arcsec
        c.loc[near, "source_id"] = sources.source_id.to_numpy()[j[near]]
        if "anomaly_sigma" in sources.columns:
            c.loc[near, "source_anomaly_sigma"] = sources.anomaly_sigma.to_numpy(np.float32)[j[near]]
    c = c.sort_values(["anomaly_sigma", "field", "y", "x"], ascending=[False, True, True, True], kind="stable")
    c.insert(0, "anomaly_rank", np.arange(1, len(c) + 1))
    return c.reset_index(drop=True)[list(CANDIDATE_COLUMNS)], stats
