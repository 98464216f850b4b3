"""The photo-z stage's method `hybrid` (issue 23): the CNN's p(z) from the galaxy's stamps and photometry
(models/photoz_cnn.py) times the colour baseline's density from its library candidates (models/photoz.py), tempered.

The CNN's softmax is p(z | stamps, photometry) with its training set's redshifts as the prior; the library's
likelihood-weighted candidates are samples of p(z | colours) with the library as the prior. Their product over
the prior, p_cnn(z) x [p_knn(z) / prior(z)]^power, on the CNN's bins, adds what the library's likelihood knows
that the CNN does not (a fine grid of noiseless colours, and the row's own errors) to what the CNN learned from
galaxies as this pipeline measures them (their colours' departures from the noiseless library's: colour gradients
in the aperture, neighbours' light; and the stamps). The colours enter both, so the product would count them
twice: `power` tempers the colour baseline's term. p_knn is the histogram of the row's candidates' redshifts,
weighted by their likelihoods, on the CNN's bins, smoothed by a Gaussian of SMOOTH_BINS bins and floored (a bin
without candidates still counts, 1e-4 of the row's mass). The prior is the library's own redshift distribution
(every galaxy the simulator drew, binned on the CNN's bins, smoothed over three bins, one count added per bin), a
property of the shipped weights, not of the sky the run sees. The product's quantiles are those of the binned
density (uniform within a bin), not widened.

Until 2026-12-07 (evening) the roles were the other way round: the library's candidates weighted by
[p_cnn / prior]^0.25. With the CNN trained on five times the galaxies (50 fields, models/cards/photoz_cnn.md) the
CNN alone gave a better CRPS than that (fields of seeds 1011-1013, 3,290 galaxies at i < 24: 0.0606 against
0.0640 at its best power, 0.75), as it can move a galaxy to a redshift none of its candidates has. Chosen on those
fields (neither set was made from them), by the mean CRPS of p(z) at i < 24: knn alone 0.0683, the CNN alone
0.0606; this product with power 0.0625 / 0.125 / 0.1875 / 0.25 / 0.375 (smoothing 1 bin, rows at S/N >= 10):
0.0604 / 0.0601 / 0.0603 / 0.0605 / 0.0611 (sigma_NMAD 0.0377 / 0.0374 / 0.0371 / 0.0366 / 0.0359; 68 % coverage
0.71 / 0.69 / 0.68 / 0.67 / 0.65); smoothing 0.5 / 1 / 2 / 3 bins at power 0.125 0.0601 / 0.0601 / 0.0602 /
0.0603: POWER 0.125, SMOOTH_BINS 1. Rows at S/N >= 0, 5, 10, 20 in the reference band: 0.0598, 0.0598, 0.0601,
0.0613. Nearly every row at i < 24 is above S/N 10 (99.6 %), and the rows under it are 57 % of all: the CNN runs
only above MIN_SNR 10, which keeps the stage near its budget; the others get the colour baseline's estimate.
With the CNN trained on 100 fields (2026-12-07, night) the same fields gave 0.0604 / 0.0600 / 0.0602 / 0.0604 /
0.0606 at the five powers: POWER kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .photoz_pdf import QUANTILES, quantiles_from_probs

__all__ = ["CNNTerm", "library_prior", "combined_quantiles", "POWER", "MIN_SNR", "SMOOTH_BINS"]

POWER = 0.125  # the colour baseline's term tempered: the CNN has seen the colours already
MIN_SNR = 10.0  # the CNN runs on the rows at or above this S/N in the reference band
SMOOTH_BINS = 1.0  # sigma of the Gaussian smoothing the candidates' histogram, in the CNN's bins
FLOOR = 1e-4  # the least mass of a bin of the colour baseline's smoothed histogram


def library_prior(z_library: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(bins,) density of the library's redshifts on the CNN's bins `edges` (bins + 1), smoothed over three bins,
    one count added per bin (no bin empty: the factor divides by it), normalised to sum to one."""
    h = np.histogram(np.asarray(z_library, float), bins=np.asarray(edges, float))[0].astype(float) + 1.0
    h = np.convolve(h, np.ones(3) / 3.0, mode="same")
    return h / h.sum()


def combined_quantiles(probs: np.ndarray, edges: np.ndarray, prior: np.ndarray, z: np.ndarray, w: np.ndarray,
                       power: float = POWER, smooth: float = SMOOTH_BINS) -> np.ndarray:
    """(n, len(QUANTILES)) quantiles of p_cnn(z) x [p_knn(z) / prior(z)]^power on the CNN's bins (module
    docstring): the CNN's softmax `probs` (n, bins) on `edges` (bins + 1), the prior (bins,), each row's library
    candidates' redshifts `z` (n, c) and likelihood weights `w` (n, c). A row whose product has no mass (its
    float32 softmax underflows wherever the colours put the galaxy, or its weights are all 0) is NaN: the caller
    keeps the colours' estimate for it."""
    from scipy.ndimage import gaussian_filter1d

    edges = np.asarray(edges, float)
    nb = len(edges) - 1
    n = len(probs)
    out = np.full((n, len(QUANTILES)), np.nan)
    if n == 0:
        return out
    w = np.nan_to_num(np.asarray(w, float), nan=0.0)
    idx = np.clip(np.searchsorted(edges, np.asarray(z, float), side="right") - 1, 0, nb - 1)
    # one weighted count over (row, bin) pairs: np.add.at gives the same sums in 6x the time (1.2 ms for 500 rows)
    hist = np.bincount((np.arange(n)[:, None] * nb + idx).ravel(), weights=w.ravel(), minlength=n * nb
                       ).reshape(n, nb)
    total = hist.sum(axis=1, keepdims=True)
    hist = np.divide(hist, total, out=np.zeros_like(hist), where=total > 0)
    if smooth > 0:
        hist = gaussian_filter1d(hist, smooth, axis=1, mode="nearest")
    p = np.asarray(probs, float) * ((hist + FLOOR) / np.asarray(prior, float)) ** float(power)
    mass = p.sum(axis=1)
    ok = np.isfinite(mass) & (mass > 0) & (total[:, 0] > 0)
    if ok.any():
        out[ok] = quantiles_from_probs(p[ok] / mass[ok, None], edges)
    return out


@dataclass(frozen=True)
class CNNTerm:
    """The CNN's softmax p(z) per row, `probs` (n, bins; a row of NaN where the CNN did not run), on the bins
    `edges`, with the prior and the power of the colour baseline's term (combined_quantiles)."""

    probs: np.ndarray
    edges: np.ndarray
    prior: np.ndarray
    power: float = POWER

    def rows(self, idx: np.ndarray) -> CNNTerm:
        """The term of the rows `idx`."""
        return CNNTerm(self.probs[idx], self.edges, self.prior, self.power)
