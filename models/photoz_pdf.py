"""The p(z) summary that both photo-z methods give (models/photoz.py's reference sets, models/photoz_cnn.py's
network): the quantile columns, their width, the density and PIT they imply, the calibration of their spread and
the figures that score them.

The density summary: `QUANTILES` of the neighbours' redshifts (a library's: weighted), the interval about the median
widened by the factor `spread` (fitted on held-out reference galaxies so that the 68 % interval covers 68 %: a
finite set of neighbours spans less than the density it samples; a library set has one per bin of the reference
band's S/N, `spread_snr`, as its likelihood is too narrow for faint galaxies), no narrower than a Gaussian of sigma
WIDTH_FLOOR (1 + z) (`floored`: where one library galaxy takes all the weight its redshift was every quantile) and
clipped to [0, Z_MAX]. p(z) between quantiles is uniform (`pdf`), so it integrates to one by construction and the
PIT of a true z is the piecewise-linear CDF (`cdf`).

Point estimate `z_phot`: the median; `z_phot_err`: half the 16-84 % width.
"""
from __future__ import annotations

import numpy as np

__all__ = ["Z_MAX", "QUANTILES", "QUANTILE_COLUMNS", "WIDTH_FLOOR", "MAG_BINS", "neighbour_quantiles",
           "quantiles_from_probs", "widened", "floored", "snr_spread", "weighted_quantiles", "cdf", "pdf",
           "fit_spread", "binned_figures", "nmad_figures"]

Z_MAX = 4.0  # the simulator draws galaxies at z < 3.4
QUANTILES = (0.025, 0.16, 0.5, 0.84, 0.975)
QUANTILE_COLUMNS = ("z_phot_q025", "z_phot_q16", "z_phot_q50", "z_phot_q84", "z_phot_q975")
# the narrowest p(z): its 68 % interval at least +-WIDTH_FLOOR (1 + z) about the median (the others in proportion,
# as a Gaussian's). A library's weights are likelihoods of discrete galaxies, and where one candidate fits far
# better than the rest all quantiles were its redshift: on seed 7's held-out pair (2 x 2048^2, galaxies at i < 25)
# 15 rows of width 0 had NMAD 0.11 and 103 of widths under 0.01 (1 + z) NMAD 0.016, their 68 % intervals covering
# 0 and 0.43, while those of widths 0.01-0.02 (NMAD 0.013) covered 0.69
WIDTH_FLOOR = 0.01
_FLOOR_SIGMAS = np.array([-1.959964, -0.994458, 0.0, 0.994458, 1.959964])  # standard normal at QUANTILES


def neighbour_quantiles(zn: np.ndarray, spread: float) -> np.ndarray:
    """(n, len(QUANTILES)) quantiles from sorted neighbour redshifts (n, k), widened about the median by `spread`
    and clipped to [0, Z_MAX]."""
    return widened(np.quantile(zn, QUANTILES, axis=1).T, spread)


def widened(q: np.ndarray, spread) -> np.ndarray:
    """Quantiles q (n, len(QUANTILES)) widened about their median by `spread` (a number, or (n, 1) one per row),
    clipped to [0, Z_MAX] and kept non-decreasing: every p(z) summary's last step (neighbours, a library's
    weighted candidates, the CNN's binned density)."""
    med = q[:, [QUANTILES.index(0.5)]]
    return np.maximum.accumulate(np.clip(med + spread * (q - med), 0.0, Z_MAX), axis=1)


def quantiles_from_probs(probs: np.ndarray, edges: np.ndarray, spread: float = 1.0) -> np.ndarray:
    """(n, len(QUANTILES)) quantiles of binned densities `probs` (n, bins) (uniform within a bin: the CDF is
    piecewise linear through the bin edges), widened about the median by `spread`, clipped to [0, Z_MAX] and
    kept non-decreasing."""
    cdf = np.concatenate([np.zeros((len(probs), 1)), np.cumsum(probs, axis=1)], axis=1)
    cdf /= cdf[:, -1:]
    q = np.empty((len(probs), len(QUANTILES)))
    for i, c in enumerate(cdf):
        q[i] = np.interp(QUANTILES, c, edges)
    return widened(q, spread)


def floored(q: np.ndarray, width: float = WIDTH_FLOOR) -> np.ndarray:
    """Quantiles q (n, len(QUANTILES)) no narrower about their median than a Gaussian of sigma `width` (1 + z):
    each lower quantile at most, each upper one at least, the Gaussian's; clipped to [0, Z_MAX], non-decreasing."""
    med = q[:, [QUANTILES.index(0.5)]]
    g = med + width * (1.0 + med) * _FLOOR_SIGMAS[None, :]
    out = np.where(_FLOOR_SIGMAS < 0, np.minimum(q, g), np.maximum(q, g))
    return np.maximum.accumulate(np.clip(out, 0.0, Z_MAX), axis=1)


def snr_spread(snr: np.ndarray, spread_snr: tuple, spread: float) -> np.ndarray:
    """The spread of rows with reference-band S/N `snr` by the bins `spread_snr` ((lowest S/N, spread), ...,
    increasing; below the first edge or NaN, the first bin's), or `spread` for all where there are no bins."""
    if not spread_snr:
        return np.full(len(snr), spread)
    edges = np.array([e for e, _ in spread_snr], float)
    values = np.array([v for _, v in spread_snr], float)
    k = np.searchsorted(edges, np.nan_to_num(snr, nan=0.0), side="right") - 1
    return values[np.clip(k, 0, len(values) - 1)]


def weighted_quantiles(z: np.ndarray, w: np.ndarray, spread, rows_sorted: bool = False) -> np.ndarray:
    """(n, len(QUANTILES)) quantiles of each row's redshifts z (n, c) with weights w (n, c) (the first z whose
    cumulative weight reaches each quantile), widened about the median by `spread` (a number, or (n, 1) one per
    row) and clipped to [0, Z_MAX]; `rows_sorted`: each row of z is in increasing order already."""
    if rows_sorted:
        zs, ws = z, w
    else:
        o = np.argsort(z, axis=1)
        zs, ws = np.take_along_axis(z, o, 1), np.take_along_axis(w, o, 1)
    cw = np.cumsum(ws, axis=1)
    cw /= cw[:, -1:]
    pos = np.stack([(cw < p).sum(1) for p in QUANTILES], axis=1).clip(0, z.shape[1] - 1)
    return widened(np.take_along_axis(zs, pos, 1), spread)


def _knots(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z knots, CDF values) of the piecewise-linear CDF through the quantiles q (n, len(QUANTILES)), with
    CDF 0 at z = 0 and 1 at Z_MAX."""
    q = np.atleast_2d(np.asarray(q, float))
    zk = np.concatenate([np.zeros((len(q), 1)), q, np.full((len(q), 1), Z_MAX)], axis=1)
    pk = np.concatenate([[0.0], QUANTILES, [1.0]])
    return zk, pk


def cdf(q: np.ndarray, z: np.ndarray) -> np.ndarray:
    """P(Z <= z) of each row's density (quantiles q), at that row's z: the PIT of a true z."""
    zk, pk = _knots(q)
    z = np.broadcast_to(np.asarray(z, float), (len(zk),))
    return np.array([np.interp(zz, kk, pk) for zz, kk in zip(z, zk)])


def pdf(q: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(n, len(grid)) densities of each row (quantiles q) on `grid`: uniform between neighbouring quantiles
    (each interval holds its quantiles' difference in probability); where quantiles coincide, the mass
    between them sits in the grid cell that holds them. Integrates to one over [0, Z_MAX] (the integral on a
    grid covering it is the sum of density times cell width)."""
    zk, pk = _knots(q)
    grid = np.asarray(grid, float)
    edges = np.concatenate([[grid[0] - 0.5 * (grid[1] - grid[0])], 0.5 * (grid[1:] + grid[:-1]),
                            [grid[-1] + 0.5 * (grid[-1] - grid[-2])]])
    width = np.diff(edges)
    out = np.empty((len(zk), len(grid)))
    for i, kk in enumerate(zk):
        # the CDF at the cell edges, piecewise linear through the knots (steps where knots coincide)
        c = np.interp(edges, kk, pk, left=0.0, right=1.0)
        out[i] = np.diff(c) / width
    return out


def fit_spread(quantiles_at, z: np.ndarray, target: float = 0.68) -> float:
    """The spread (bisection on [0.5, 3], rounded to 1e-4) that makes the 16-84 % intervals of the galaxies with
    true redshifts `z` cover `target` of them; `quantiles_at(spread)` gives their (n, len(QUANTILES)) quantiles."""
    lo, hi = 0.5, 3.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        q = quantiles_at(mid)
        cov = np.mean((z >= q[:, QUANTILES.index(0.16)]) & (z <= q[:, QUANTILES.index(0.84)]))
        lo, hi = (mid, hi) if cov < target else (lo, mid)
    return round(0.5 * (lo + hi), 4)


MAG_BINS = ((0.0, 22.0), (22.0, 23.0), (23.0, 24.0), (0.0, 24.0), (24.0, 25.0))


def binned_figures(z_phot: np.ndarray, q: np.ndarray, z: np.ndarray, mag: np.ndarray) -> dict:
    """Figures of estimates `z_phot` with quantiles q (n, len(QUANTILES)) against true redshifts z, per bin of
    true magnitude `mag` (MAG_BINS; keys i_lt_22, i_22_23, ...): nmad_figures, the fraction estimated, the
    coverage of the 16-84 % and 2.5-97.5 % intervals and the PIT histogram (10 bins of the CDF at the true z,
    each 0.1 for a calibrated p(z))."""
    out = {}
    for lo, hi in MAG_BINS:
        inbin = (mag >= lo) & (mag < hi)
        s = inbin & np.isfinite(z_phot)
        f = nmad_figures(z_phot[s], z[s])
        f["estimated"] = float(s.sum() / inbin.sum()) if inbin.any() else float("nan")
        if s.any():
            f["coverage_68"] = float(np.mean((z[s] >= q[s, 1]) & (z[s] <= q[s, 3])))
            f["coverage_95"] = float(np.mean((z[s] >= q[s, 0]) & (z[s] <= q[s, 4])))
            pit = cdf(q[s], z[s])
            f["pit_histogram"] = [round(float(v), 4) for v in np.histogram(pit, bins=10, range=(0, 1))[0] / s.sum()]
        out[f"i_{lo:g}_{hi:g}" if lo > 0 else f"i_lt_{hi:g}"] = f
    return out


def nmad_figures(z_phot: np.ndarray, z_true: np.ndarray) -> dict[str, float]:
    """sigma_NMAD of dz = (z_phot - z)/(1 + z) (1.4826 x the median absolute deviation from the median), the
    outlier fraction (|dz| > 0.15), the bias (median dz) and the count."""
    dz = (np.asarray(z_phot, float) - z_true) / (1 + np.asarray(z_true, float))
    ok = np.isfinite(dz)
    dz = dz[ok]
    if len(dz) == 0:
        return {"n": 0, "sigma_nmad": float("nan"), "outliers": float("nan"), "bias": float("nan")}
    med = float(np.median(dz))
    return {"n": int(len(dz)), "sigma_nmad": float(1.4826 * np.median(np.abs(dz - med))),
            "outliers": float(np.mean(np.abs(dz) > 0.15)), "bias": med}
