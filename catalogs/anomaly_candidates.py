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
- the line term (models/anomaly_lines.line_terms; the `line` column, since stage version 7): a window whose line
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
- the score terms (catalogs/score_terms.py): the lens and merger stages' candidates, strong lenses and mergers
  the generator's residual hardly sees, each lift the window nearest it to a sigma calibrated on the stage's
  false alarms per window, at the source, with the shape hint "lens" or "merger".
- regions (catalogs/anomaly_regions.py): the windows at sigma >= `sigma_grow` connected on the field's grid
  that hold one at `sigma_cut`, points split out, a trail's pieces on one line joined, regions of overlapping
  fields joined, each with a shape hint.
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

from .anomaly_regions import merge_fields, regions
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
        rows += regions(w.reset_index(drop=True), w._sigma.to_numpy(), sigma_cut, grow, stride)
    c = pd.DataFrame(rows, columns=[k for k in CANDIDATE_COLUMNS if k not in
                                    ("anomaly_rank", "source_id", "source_anomaly_sigma")])
    c = merge_fields(c, match_arcsec)
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
