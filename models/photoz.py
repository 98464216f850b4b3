"""Photometric redshifts from a catalog's colours: the k-nearest-neighbour baseline of issue 23.

The estimator keeps a *reference set*: simulated galaxies measured by the pipeline's own stages (their
deblended fluxes in every band, in nJy) with their true redshifts (`deepfield train photoz`, tasks/trainsets/
photoz.py). A galaxy's redshift density is the distribution of the true redshifts of its k nearest reference
galaxies in colour-magnitude space. Because the reference galaxies went through the same simulator depth, the
same measurement and the same noise, the neighbours of an observed colour are drawn from p(z | observed colours,
magnitude), prior included: no template fitting, no noise model of our own.

- Features, for the bands the survey and the reference set share (any subset of two or more, in wavelength
  order): asinh magnitudes (Lupton et al. 1999, softened at each band's typical 1-sigma flux of the reference
  set, so faint and negative fluxes keep a place) of adjacent band pairs as colours, and the reference band's
  asinh magnitude (i, else the reddest shared band) weighted by the reference set's `mag_weight` (chosen with k
  at training, models/train_photoz.py; `MAG_WEIGHT` for sets made before it was; a band set the survey shares
  with it may have its own, `mag_weights`: with fewer colours the magnitude prior counts for more), which brings
  in the magnitude prior and the noise level.
- The density summary: `QUANTILES` of the neighbours' redshifts, the interval about the median widened by the
  factor `spread` (fitted on held-out reference galaxies so that the 68 % interval covers 68 %: a finite set of
  neighbours spans less than the density it samples) and clipped to [0, Z_MAX]. p(z) between quantiles is
  uniform (`pdf`), so it integrates to one by construction and the PIT of a true z is the piecewise-linear CDF
  (`cdf`).
- Point estimate `z_phot`: the median; `z_phot_err`: half the 16-84 % width.

The reference set ships as the registry's model `photoz_knn` (`PhotoZReference`: the fluxes, redshifts and
softenings as a torch module's buffers in `models/weights/photoz_knn.pt`, with its training record), so that the
ledger, the provenance and the band checks treat it as every other model.

Why k nearest neighbours rather than a library: scipy's cKDTree answers the queries (about 10 us per galaxy);
what is specific to photo-z (the features, the quantile summary and its calibration) is a few lines here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Z_MAX", "QUANTILES", "QUANTILE_COLUMNS", "MAG_BINS", "PhotoZKNN", "PhotoZReference", "pdf", "cdf",
           "nmad_figures", "binned_figures", "fit_spread", "neighbour_quantiles"]

Z_MAX = 4.0  # the simulator draws galaxies at z < 3.4
QUANTILES = (0.025, 0.16, 0.5, 0.84, 0.975)
QUANTILE_COLUMNS = ("z_phot_q025", "z_phot_q16", "z_phot_q50", "z_phot_q84", "z_phot_q975")
MAG_WEIGHT = 0.25  # one magnitude of brightness counts as a quarter magnitude of colour (sets before 2026-12-04)
NJY_AB = 31.4  # AB magnitude of 1 nJy
WAVELENGTH_ORDER = "ugrizy"  # as tasks/astro.py (models import nothing else of deepfield)

# z_phot_flag bits
FLAG_LOW_SNR = 1  # reference band S/N < 5
FLAG_BROAD = 2  # half 16-84 % width > 0.15 (1 + z_phot)
FLAG_BANDS_MISSING = 4  # a shared band's flux is not finite: estimated from the others
FLAG_NO_ESTIMATE = 8  # fewer than two usable bands: z_phot is NaN


def band_order(bands) -> list[str]:
    """`bands` in wavelength order (known bands first, then the others as given)."""
    known = [b for b in WAVELENGTH_ORDER if b in bands]
    return known + [b for b in bands if b not in known]


def asinh_mag(flux: np.ndarray, soft: float) -> np.ndarray:
    """Asinh magnitude (AB) of `flux` in nJy softened at `soft` nJy (Lupton, Gunn & Szalay 1999)."""
    b = soft
    return NJY_AB - 2.5 / np.log(10) * (np.arcsinh(flux / (2 * b)) + np.log(b))


@dataclass
class PhotoZKNN:
    bands: list[str]  # the reference set's bands, wavelength order
    flux: np.ndarray  # (n, bands) nJy, deblended fluxes of the reference galaxies
    z: np.ndarray  # (n,) true redshifts
    soft: np.ndarray  # (bands,) softening, nJy: the reference set's median 1-sigma flux error per band
    k: int = 48
    spread: float = 1.0
    ref_band: str = "i"
    mag_weight: float = MAG_WEIGHT
    mag_weights: dict = field(default_factory=dict)  # band set ("grz") -> its own weight, chosen at training
    info: dict = field(default_factory=dict)
    _trees: dict = field(default_factory=dict, repr=False)

    def shared(self, have) -> list[str]:
        """The reference bands among `have`, wavelength order."""
        return [b for b in self.bands if b in set(have)]

    def feature_band(self, use: list[str]) -> str:
        return self.ref_band if self.ref_band in use else use[-1]

    def features(self, flux: np.ndarray, use: list[str]) -> np.ndarray:
        """(n, len(use)) features of fluxes (n, len(use)) in nJy, bands `use` (wavelength order)."""
        idx = [self.bands.index(b) for b in use]
        mu = asinh_mag(flux, self.soft[idx])
        cols = [mu[:, i] - mu[:, i + 1] for i in range(len(use) - 1)]
        cols.append(self.weight(use) * mu[:, use.index(self.feature_band(use))])
        return np.stack(cols, axis=1)

    def weight(self, use: list[str]) -> float:
        """The magnitude's weight among the features of the bands `use`: the band set's own (`mag_weights`),
        else `mag_weight`."""
        return float(self.mag_weights.get("".join(use), self.mag_weight))

    def tree(self, use: list[str]):
        key = tuple(use)
        if key not in self._trees:
            from scipy.spatial import cKDTree
            idx = [self.bands.index(b) for b in use]
            self._trees[key] = cKDTree(self.features(self.flux[:, idx], use))
        return self._trees[key]

    def neighbours(self, flux: np.ndarray, use: list[str], exclude_self: bool = False) -> np.ndarray:
        """(n, k) true redshifts of the k nearest reference galaxies (sorted)."""
        k = min(self.k + int(exclude_self), len(self.z))
        _, j = self.tree(use).query(self.features(flux, use), k=k)
        j = np.atleast_2d(j)
        if exclude_self:
            j = j[:, 1:]
        return np.sort(self.z[j], axis=1)

    def quantiles(self, zn: np.ndarray, spread: float | None = None) -> np.ndarray:
        """neighbour_quantiles of `zn` with `spread`, else the set's own."""
        return neighbour_quantiles(zn, self.spread if spread is None else spread)

    def predict(self, flux: np.ndarray, fluxerr: np.ndarray, bands: list[str]) -> dict[str, np.ndarray]:
        """Estimates for fluxes and errors (n, len(bands)) in nJy: z_phot, z_phot_err, the quantile columns and
        z_phot_flag (module docstring). Bands not in the reference set are not used; a row whose flux is not
        finite in a band is estimated from its other bands."""
        flux = np.asarray(flux, float).reshape(len(flux), len(bands))
        fluxerr = np.asarray(fluxerr, float).reshape(flux.shape)
        n = len(flux)
        out = {c: np.full(n, np.nan) for c in ("z_phot", "z_phot_err", *QUANTILE_COLUMNS)}
        flag = np.zeros(n, np.int16)
        use_all = self.shared(bands)
        if len(use_all) < 2 or n == 0:
            out["z_phot_flag"] = np.full(n, FLAG_NO_ESTIMATE, np.int16)
            return out
        cols = [bands.index(b) for b in use_all]
        f, e = flux[:, cols], fluxerr[:, cols]
        good = np.isfinite(f)
        flag[~good.all(axis=1)] |= FLAG_BANDS_MISSING
        patterns = {tuple(g) for g in good}
        for pat in patterns:
            rows = np.flatnonzero((good == np.array(pat)).all(axis=1))
            use = [b for b, ok in zip(use_all, pat) if ok]
            if len(use) < 2:
                flag[rows] |= FLAG_NO_ESTIMATE
                continue
            sel = [i for i, ok in enumerate(pat) if ok]
            q = self.quantiles(self.neighbours(f[np.ix_(rows, sel)], use))
            for i, c in enumerate(QUANTILE_COLUMNS):
                out[c][rows] = q[:, i]
            ref = use.index(self.feature_band(use))
            snr = f[rows, sel[ref]] / np.where(e[rows, sel[ref]] > 0, e[rows, sel[ref]], np.nan)
            flag[rows[~(snr >= 5)]] |= FLAG_LOW_SNR
        out["z_phot"] = out["z_phot_q50"].copy()
        out["z_phot_err"] = 0.5 * (out["z_phot_q84"] - out["z_phot_q16"])
        broad = out["z_phot_err"] > 0.15 * (1 + out["z_phot"])
        flag[broad] |= FLAG_BROAD
        out["z_phot_flag"] = flag
        return out


def neighbour_quantiles(zn: np.ndarray, spread: float) -> np.ndarray:
    """(n, len(QUANTILES)) quantiles from sorted neighbour redshifts (n, k), widened about the median by `spread`
    and clipped to [0, Z_MAX]."""
    q = np.quantile(zn, QUANTILES, axis=1).T
    med = q[:, [QUANTILES.index(0.5)]]
    q = np.clip(med + spread * (q - med), 0.0, Z_MAX)
    return np.maximum.accumulate(q, axis=1)


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


class PhotoZReference(torch.nn.Module):
    """The reference set as a module of the model registry: buffers `flux` (n, bands) nJy, `z` (n,), `soft`
    (bands,) nJy; `estimator()` is the PhotoZKNN that answers the queries (on the CPU, with numpy)."""

    def __init__(self, bands: list[str], n: int, k: int = 48, spread: float = 1.0, ref_band: str = "i",
                 flux_kind: str = "aper", mag_weight: float = MAG_WEIGHT, mag_weights: dict | None = None):
        super().__init__()
        self.bands, self.k, self.spread, self.ref_band, self.flux_kind = list(bands), k, spread, ref_band, flux_kind
        self.mag_weight, self.mag_weights = float(mag_weight), {str(b): float(w) for b, w in (mag_weights or {}).items()}
        self.register_buffer("flux", torch.zeros(n, len(bands), dtype=torch.float32))
        self.register_buffer("z", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("soft", torch.ones(len(bands), dtype=torch.float64))
        self._estimator: PhotoZKNN | None = None

    def estimator(self) -> PhotoZKNN:
        if self._estimator is None:
            self._estimator = PhotoZKNN(self.bands, self.flux.cpu().double().numpy(), self.z.cpu().double().numpy(),
                                        self.soft.cpu().numpy(), k=self.k, spread=self.spread, ref_band=self.ref_band,
                                        mag_weight=self.mag_weight, mag_weights=dict(self.mag_weights))
        return self._estimator

