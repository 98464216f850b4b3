"""Score terms of the anomaly candidates (catalogs/anomaly_candidates.py): a stage's per-source probability that
the source is an anomaly the anomaly stage's generator hardly sees, ranked among the grid's windows.

The lens term: the lens stage's candidates (catalog sources with `lens_score` >= LENS_MIN_SCORE, 0.5, the
lens merge step's threshold) are strong lenses, anomalies the generator's residual hardly sees (a faint blue
arc on a bright red galaxy: above the normal windows' 99th percentile 0.17-0.23 of the lenses by the
sigma-score). Each goes to the window whose centre is nearest it (`lens_term`), which is ranked by the larger of
its sigma and `lens_sigma(lens_score)`, at the source, with the shape hint "lens". lens_sigma is LENS_SIGMA
interpolated in logit(score): a lens candidate ranks with the windows whose sigma the normal windows exceed as
often as the lens stage's false candidates of that score or more occur per window (the two detectors'
false alarms per area made equal). Calibrated on `deepfield eval anomaly --fast-only`'s two pairs of fields (seeds
20261125 and 20261201, 32,258 windows each, the normal windows' sigma quantiles recorded by the evaluation) with
the lens weights of 2026-12-07 (trained with the lens stage's field candidates): of the candidates at >= 0.5 and
>= 0.99, 3 / 0 and 4 / 1 were false (16 and 17 candidates, 13 on a lens in each pair), false rates per window of
9.3e-5 / 1.6e-5 and 1.2e-4 / 3.1e-5 (a rate under one false candidate taken as half of one), where the normal
windows' sigma quantiles are 15.2 / 15.4 and 11.8 / 14.4: LENS_SIGMA is their mean, held above 0.99. The weights
before gave 14 false of 38 at >= 0.5 on an earlier run of the same fields (LENS_SIGMA 12.5 at 0.5, 14.4 at 0.99,
14.9 at 0.999). With the lens term the lenses above the normal windows' 99th percentile went 0.23 -> 1.00 and
0.17 -> 0.92 (the weights before), in the top 1 % of all windows 0.00 -> 0.92 (both pairs).

The merger term: the same for the merger stage's candidates (tasks/stages/merger.py: `merger_score` >=
MERGER_MIN_SCORE, 0.5), with MERGER_SIGMA and the shape hint "merger": mergers with tidal tails are the other
anomaly the generator's residual does not see (above the normal windows' 99th percentile 0.00-0.31 of them by
the sigma-score). A window both terms reach takes the larger. Calibrated as the lens term, on the same two
pairs of fields run with the shipped weights of 2026-12-06: of the candidates at >= 0.5, 0.9, 0.99, 14 / 2 / 0
and 19 / 4 / 1 were false (26 and 36 candidates, 12 and 17 on a merger), where the normal windows' sigma
quantiles are 10.3 / 15.2 / 15.4 and 7.2 / 11.8 / 14.4 (a rate under one false candidate taken as half of
one); MERGER_SIGMA is their mean, held above 0.99.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

__all__ = ["LENS_MIN_SCORE", "LENS_SIGMA", "LENS_TERM", "MERGER_MIN_SCORE", "MERGER_SIGMA", "MERGER_TERM", "SCORE_TERMS",
           "ScoreTerm", "lens_sigma", "lens_term", "score_term", "with_lens_term"]

LENS_MIN_SCORE = 0.5  # the lens merge step's default threshold: lens candidates from this score up
# the lens term's calibration: (lens_score, sigma) points, interpolated in logit(lens_score) (module docstring)
LENS_SIGMA = ((0.5, 13.5), (0.99, 14.9))
MERGER_MIN_SCORE = 0.5  # merger candidates from this merger_score up
# the merger term's calibration: (merger_score, sigma) points, as the lens term's (module docstring)
MERGER_SIGMA = ((0.5, 8.7), (0.9, 13.5), (0.99, 14.9))


@dataclass(frozen=True)
class ScoreTerm:
    """A stage's per-source probability ranked among the windows (module docstring: the lens and merger terms):
    the catalog column, the lowest score that counts, the (score, sigma) calibration points interpolated in
    logit(score), and the shape hint of a candidate ranked by it."""
    column: str
    min_score: float
    table: tuple[tuple[float, float], ...]
    hint: str

    def sigma(self, score: np.ndarray) -> np.ndarray:
        """The term's sigma of scores: the table interpolated in logit(score), held at its ends; NaN below
        min_score or for no score."""
        p = np.asarray(score, np.float64)
        ok = np.isfinite(p) & (p >= self.min_score)
        q = np.clip(np.where(ok, p, 0.5), 1e-7, 1 - 1e-7)
        at, val = np.array(self.table).T
        return np.where(ok, np.interp(np.log(q / (1 - q)), np.log(at / (1 - at)), val), np.nan)


LENS_TERM = ScoreTerm("lens_score", LENS_MIN_SCORE, LENS_SIGMA, "lens")
MERGER_TERM = ScoreTerm("merger_score", MERGER_MIN_SCORE, MERGER_SIGMA, "merger")
SCORE_TERMS = (LENS_TERM, MERGER_TERM)


def lens_sigma(score: np.ndarray) -> np.ndarray:
    """The lens term's sigma of lens scores (module docstring): LENS_SIGMA interpolated in logit(score), held at
    its ends; NaN below LENS_MIN_SCORE or for no score."""
    return LENS_TERM.sigma(score)


def lens_term(maps: pd.DataFrame, sources: pd.DataFrame | None, stride: float) -> tuple[np.ndarray, np.ndarray]:
    """score_term with the lens term."""
    return score_term(maps, sources, stride, LENS_TERM)


def score_term(maps: pd.DataFrame, sources: pd.DataFrame | None, stride: float, term: ScoreTerm = LENS_TERM
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per window of `maps` (field, x, y: its centre, field pixels), `term`'s sigma (NaN for none) and the
    row of `sources` (field, x, y and the term's column) it comes from (-1 for none): each source of score >=
    the term's min_score goes to the window whose centre is nearest it, if that window holds it (no more than
    `stride`, half a window, from its centre on either axis; the stage's coarse windows alone hold every pixel
    so); a window given several keeps the highest."""
    sig, row = np.full(len(maps), np.nan), np.full(len(maps), -1, np.int64)
    if sources is None or not len(sources) or not {term.column, "field", "x", "y"} <= set(sources.columns):
        return sig, row
    ls = term.sigma(sources[term.column].to_numpy(np.float64))
    have = np.flatnonzero(np.isfinite(ls))
    if not len(have) or not len(maps):
        return sig, row
    fields = maps["field"].to_numpy().astype(str)
    sfield = sources["field"].to_numpy().astype(str)
    for f in np.unique(sfield[have]):
        ix = np.flatnonzero(fields == f)
        if not len(ix):
            continue
        xy = np.c_[maps["x"].to_numpy(float)[ix], maps["y"].to_numpy(float)[ix]]
        mine = have[sfield[have] == f]
        sxy = np.c_[sources["x"].to_numpy(float)[mine], sources["y"].to_numpy(float)[mine]]
        _, j = cKDTree(xy).query(sxy, p=np.inf)
        for n, (k, jj) in enumerate(zip(mine, j)):
            w = ix[jj]
            if np.max(np.abs(xy[jj] - sxy[n])) <= stride and not ls[k] <= sig[w]:
                sig[w], row[w] = ls[k], k
    return sig, row


def with_lens_term(sigma: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The windows' ranking sigma with a score term (score_term's, e.g. the lens term): the larger of the two, and
    where the term is the larger (bool)."""
    sigma = np.asarray(sigma, np.float64)
    wins = np.isfinite(lens) & ~(sigma >= lens)
    return np.where(wins, lens, sigma), wins
