"""The photo-z stage's method `hybrid` (issue 23): the colour baseline's library candidates (models/photoz.py),
each weighted also by the CNN's p(z) from the galaxy's stamps (models/photoz_cnn.py), tempered.

The library's likelihood weights w_i of a galaxy's candidates are samples of p(z | colours) with the library as
the prior; the CNN's softmax is p(z | stamps, photometry) with its training set's redshifts as the prior. Their
product over the prior, p(z | colours) x [p_cnn(z) / prior(z)]^power, adds what the CNN knows that the library
does not: it learned from galaxies as this pipeline measures them (their colours' departures from the noiseless
library's: colour gradients in the aperture, neighbours' light), and it sees the stamps. On the simulator's
fields the stamps add little (the CNN trained and run with its stamps zeroed does as well,
models/cards/photoz_cnn.md), so the gain is mostly the second, learned reading of the photometry. The CNN also
sees the colours the library's likelihood counts, so the product counts them twice: `power` tempers the CNN's
term. The prior is the library's own redshift distribution (every galaxy the simulator drew, binned on the CNN's
bins, smoothed over three bins, one count added per bin), a property of the shipped weights, not of the sky the
run sees.

Chosen on fields that neither set was made from (seeds 1011-1013, 3,290 galaxies at i < 24, g r i z; the rows at
S/N >= 20): the mean CRPS of p(z) at i < 24 0.06833 (knn alone), 0.06673, 0.06675, 0.06694, 0.06727 for power
0.25, 0.5, 0.75, 1 (sigma_NMAD 0.0392 -> 0.0380, 0.0384, 0.0376, 0.0373; 68 % coverage 0.72 -> 0.70, 0.68, 0.66,
0.63): POWER 0.25. The prior taken as the CNN's mean p(z) over those galaxies instead of the library's changed
sigma_NMAD by at most 0.0004. Rows under MIN_SNR in the reference band gain little (on the held-out fields of
`deepfield eval photoz`, the CNN on every row and on those at S/N >= 20 alone gave the same sigma_NMAD at i < 24
to 0.0003) and are most of the rows: the CNN runs only above it, which keeps the stage under its budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CNNTerm", "library_prior", "candidate_factor", "POWER", "MIN_SNR"]

POWER = 0.25  # the CNN's term tempered: it sees the colours the library's likelihood already counts
MIN_SNR = 20.0  # the CNN weighs the candidates of rows at or above this S/N in the reference band


def library_prior(z_library: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(bins,) density of the library's redshifts on the CNN's bins `edges` (bins + 1), smoothed over three bins,
    one count added per bin (no bin empty: the factor divides by it), normalised to sum to one."""
    h = np.histogram(np.asarray(z_library, float), bins=np.asarray(edges, float))[0].astype(float) + 1.0
    h = np.convolve(h, np.ones(3) / 3.0, mode="same")
    return h / h.sum()


def _at(values: np.ndarray, centres: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Each row's binned `values` (n, bins) interpolated linearly between bin centres `centres` (uniform) at that
    row's redshifts z (n, c); beyond the first or last centre, that bin's value."""
    step = float(centres[1] - centres[0])
    t = np.clip((z - centres[0]) / step, 0.0, len(centres) - 1.0)
    i0 = np.minimum(t.astype(np.int64), len(centres) - 2)
    f = t - i0
    lo = np.take_along_axis(values, i0, 1) if values.ndim == 2 else values[i0]
    hi = np.take_along_axis(values, i0 + 1, 1) if values.ndim == 2 else values[i0 + 1]
    return lo * (1.0 - f) + hi * f


def candidate_factor(probs: np.ndarray, edges: np.ndarray, prior: np.ndarray, z: np.ndarray,
                     power: float = POWER) -> np.ndarray:
    """(n, c) weights [p_cnn(z) / prior(z)]^power of each row's candidates at redshifts z (n, c), from the CNN's
    softmax `probs` (n, bins) on `edges` and the prior (bins,); floored at 1e-30 of a row's largest, so a row's
    candidates never all weigh 0. A row whose CNN gives every candidate 0 (its float32 softmax underflows where
    the colours put the galaxy) gets weights 1: the colours' estimate, not one of a zero total weight."""
    edges = np.asarray(edges, float)
    centres = 0.5 * (edges[1:] + edges[:-1])
    ratio = _at(np.asarray(probs, float), centres, z) / _at(np.asarray(prior, float), centres, z)
    top = ratio.max(axis=1, keepdims=True)
    usable = np.isfinite(top) & (top > 0)
    ratio = np.where(usable, np.maximum(ratio, 1e-30 * np.where(usable, top, 1.0)), 1.0)
    return ratio ** float(power)


@dataclass(frozen=True)
class CNNTerm:
    """The CNN's softmax p(z) per row, `probs` (n, bins; a row of NaN where the CNN did not run), on the bins
    `edges`, with the prior it is divided by and the power it is raised to (candidate_factor)."""

    probs: np.ndarray
    edges: np.ndarray
    prior: np.ndarray
    power: float = POWER

    def rows(self, idx: np.ndarray) -> CNNTerm:
        """The term of the rows `idx`."""
        return CNNTerm(self.probs[idx], self.edges, self.prior, self.power)
