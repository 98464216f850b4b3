"""Photometric redshifts from a catalog's colours: the colour baseline of issue 23, from a reference set of two
kinds.

- *Library* sets (`noiseless`, the shipped g, r, i, z set since 2026-12-04): the true galaxies of simulated fields,
  every one the simulator drew, with their noiseless fluxes in nJy on the photometry's scale (the true total
  fluxes times each band's median measured-over-true ratio of bright matched galaxies) and their true redshifts
  (`deepfield train photoz`, models/train_photoz.py: train_library). A galaxy's redshift density is the
  library's redshifts weighted by the likelihood of its measured fluxes (Gaussian, its own errors widened by
  SYS_FLOOR of the flux) given each library galaxy's fluxes scaled by the best factor, times a prior of width
  MAG_SIGMA on that factor in magnitudes: the library's own magnitude and redshift distribution is the prior.
  Weighing every library galaxy costs too much, so the CANDIDATES nearest in the features below (an approximate
  search) are weighed. The noise enters once, the galaxy's own: with measured references it enters twice (the
  reference's too), which left sigma_NMAD 10 % worse (models/cards/photoz_knn.md).
- *Measured* sets: simulated galaxies measured by the pipeline's own stages (their fluxes in every band, in nJy)
  with their true redshifts. A galaxy's redshift density is the distribution of the true redshifts of its k
  nearest reference galaxies in colour-magnitude space. Because the reference galaxies went through the same
  simulator depth, the same measurement and the same noise, the neighbours of an observed colour are drawn from
  p(z | observed colours, magnitude), prior included: no template fitting, no noise model of our own. The
  u g r i z y and u g r i sets are of this kind.

- Features, for the bands the survey and the reference set share (any subset of two or more, in wavelength
  order): asinh magnitudes (Lupton et al. 1999, softened at each band's typical 1-sigma flux of the reference
  set, so faint and negative fluxes keep a place) of adjacent band pairs as colours, and the reference band's
  asinh magnitude (i, else the reddest shared band) weighted by the reference set's `mag_weight` (chosen with k
  at training, models/train_photoz.py; `MAG_WEIGHT` for sets made before it was; a band set the survey shares
  with it may have its own, `mag_weights`: with fewer colours the magnitude prior counts for more), which brings
  in the magnitude prior and the noise level.
- The density summary (quantiles, their width, p(z) and its PIT; models/photoz_pdf.py): the quantiles of the
  neighbours' redshifts (a library's: weighted), widened by the set's `spread`; `z_phot` their median.

The reference set ships as the registry's model `photoz_knn` (`PhotoZReference`: the fluxes, redshifts and
softenings as a torch module's buffers in `models/weights/photoz_knn.pt`, with its training record), so that the
ledger, the provenance and the band checks treat it as every other model.

Written here rather than taken from a photo-z package: scipy's cKDTree answers the queries (about 10 us per
galaxy for k nearest, 60 us for a library's candidates) and what is specific to photo-z (the features, the
likelihood, the quantile summary and its calibration) is a few lines here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .photoz_hybrid import CNNTerm, combined_quantiles
from .photoz_pdf import QUANTILE_COLUMNS, floored, neighbour_quantiles, snr_spread, weighted_quantiles

__all__ = ["PhotoZKNN", "PhotoZReference", "band_order", "asinh_mag"]

MAG_WEIGHT = 0.25  # one magnitude of brightness counts as a quarter magnitude of colour (sets before 2026-12-04)
NJY_AB = 31.4  # AB magnitude of 1 nJy
# library sets (`noiseless`): a flux error floor of this fraction of the flux per band (the measured colours'
# departures from the library's, which the errors do not hold: colour gradients in the aperture, blending), the
# magnitude prior's width (a library galaxy scaled by more than this in magnitude counts less) and the candidates
# weighed per galaxy. Chosen by leaving each of the ten training seeds out in turn (models/cards/photoz_knn.md)
SYS_FLOOR = 0.03
MAG_SIGMA = 0.5
CANDIDATES = 200
SEARCH_EPS = 1.0
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
    noiseless: bool = False  # a library: `flux` holds noiseless fluxes (library_quantiles), not measured ones
    sys_floor: float = SYS_FLOOR
    mag_sigma: float = MAG_SIGMA
    candidates: int = CANDIDATES
    # library sets: ((lowest S/N, spread), ...) by the reference band's measured S/N, increasing; the intervals of a
    # galaxy in a bin are widened by its spread instead of `spread` (faint galaxies' errors are wider than
    # Gaussian: blends, noise peaks)
    spread_snr: tuple = ()
    info: dict = field(default_factory=dict)
    _trees: dict = field(default_factory=dict, repr=False)
    _sorted: bool | None = field(default=None, repr=False)  # z in increasing order (found once)

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

    def library_weights(self, flux: np.ndarray, fluxerr: np.ndarray, use: list[str]
                        ) -> tuple[np.ndarray, np.ndarray]:
        """For a library (`noiseless`): the `candidates` library galaxies nearest in colour-magnitude space to
        each row of fluxes and errors (n, len(use)) in nJy, (n, c) indices, and each one's weight, the
        likelihood of the measured fluxes given its noiseless fluxes scaled by the best factor a (weighted
        least squares), errors widened by `sys_floor` x |flux|, times a Gaussian prior of width `mag_sigma` on
        2.5 log10 a (the library's own magnitudes carry the prior on magnitude and redshift)."""
        idx = [self.bands.index(b) for b in use]
        c = min(self.candidates, len(self.z))
        # approximate neighbours (each within 1 + SEARCH_EPS of the true k-th distance): the candidates are weighed
        # by their likelihood next, and the search takes half the time of an exact one
        _, j = self.tree(use).query(self.features(flux, use), k=c, eps=SEARCH_EPS)
        j = np.atleast_2d(j).reshape(len(flux), c)
        if self._z_sorted():  # the library in redshift order (as training saves it): candidates in z order too
            j.sort(axis=1)
        w = 1.0 / (fluxerr ** 2 + (self.sys_floor * flux) ** 2)  # (n, b)
        out = np.empty(j.shape)
        for k in range(0, len(flux), 256):  # (rows, candidates, bands) blocks of a few MB
            lib = self.flux[j[k:k + 256]][:, :, idx]
            f, wk = flux[k:k + 256, None, :], w[k:k + 256, None, :]
            a = np.clip((lib * f * wk).sum(2) / np.maximum((lib * lib * wk).sum(2), 1e-300), 1e-3, 1e3)
            chi2 = ((f - a[:, :, None] * lib) ** 2 * wk).sum(2) + (2.5 * np.log10(a) / self.mag_sigma) ** 2
            out[k:k + 256] = np.exp(-0.5 * (chi2 - chi2.min(axis=1, keepdims=True)))
        return j, out

    def library_quantiles(self, flux: np.ndarray, fluxerr: np.ndarray, use: list[str],
                          spread: float | np.ndarray | None = None, cnn: CNNTerm | None = None) -> np.ndarray:
        """(n, len(QUANTILES)) quantiles of the library's redshifts weighted by library_weights, widened about
        the median by `spread` (a number or one per row; by default the set's own: `spread_snr` by the reference
        band's S/N where the set has it, else `spread`) and clipped to [0, Z_MAX]. `cnn`: the CNN's p(z) of these
        rows (NaN rows: none): the quantiles of those rows are of the CNN's p(z) times their candidates' density,
        tempered (models/photoz_hybrid.py: combined_quantiles; a row where that has no mass keeps these)."""
        j, w = self.library_weights(flux, fluxerr, use)
        if spread is None:
            r = use.index(self.feature_band(use))
            spread = self.row_spread(flux[:, r] / fluxerr[:, r])[:, None]
        q = weighted_quantiles(self.z[j], w, spread, self._z_sorted())
        if cnn is not None:
            on = np.flatnonzero(np.isfinite(cnn.probs).all(axis=1))
            if len(on):
                qc = combined_quantiles(cnn.probs[on], cnn.edges, cnn.prior, self.z[j[on]], w[on], cnn.power)
                ok = np.isfinite(qc).all(axis=1)
                q[on[ok]] = qc[ok]
        return q

    def row_spread(self, snr: np.ndarray) -> np.ndarray:
        """The spread of rows with reference-band S/N `snr`: that of their `spread_snr` bin (below the first
        edge, the first), else `spread` for all."""
        return snr_spread(snr, self.spread_snr, self.spread)

    def _z_sorted(self) -> bool:
        if self._sorted is None:
            self._sorted = bool(np.all(np.diff(self.z) >= 0))
        return self._sorted

    def quantiles(self, zn: np.ndarray, spread: float | None = None) -> np.ndarray:
        """neighbour_quantiles of `zn` with `spread`, else the set's own."""
        return neighbour_quantiles(zn, self.spread if spread is None else spread)

    def predict(self, flux: np.ndarray, fluxerr: np.ndarray, bands: list[str], cnn: CNNTerm | None = None
                ) -> dict[str, np.ndarray]:
        """Estimates for fluxes and errors (n, len(bands)) in nJy: z_phot, z_phot_err, the quantile columns and
        z_phot_flag (module docstring). Bands not in the reference set are not used; a row whose flux is not
        finite in a band is estimated from its other bands. `cnn` (a library set only): the CNN's p(z) per row
        (NaN rows: none), combined with the rows' candidates (models/photoz_hybrid.py)."""
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
            if self.noiseless:
                ee = e[np.ix_(rows, sel)]
                ee = np.where(np.isfinite(ee) & (ee > 0), ee, self.soft[[self.bands.index(b) for b in use]])
                q = self.library_quantiles(f[np.ix_(rows, sel)], ee, use, cnn=cnn.rows(rows) if cnn else None)
            else:
                q = self.quantiles(self.neighbours(f[np.ix_(rows, sel)], use))
            q = floored(q)
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


class PhotoZReference(torch.nn.Module):
    """The reference set as a module of the model registry: buffers `flux` (n, bands) nJy, `z` (n,), `soft`
    (bands,) nJy; `estimator()` is the PhotoZKNN that answers the queries (on the CPU, with numpy)."""

    def __init__(self, bands: list[str], n: int, k: int = 48, spread: float = 1.0, ref_band: str = "i",
                 flux_kind: str = "aper", mag_weight: float = MAG_WEIGHT, mag_weights: dict | None = None,
                 noiseless: bool = False, sys_floor: float = SYS_FLOOR, mag_sigma: float = MAG_SIGMA,
                 candidates: int = CANDIDATES, spread_snr: list | None = None):
        super().__init__()
        self.bands, self.k, self.spread, self.ref_band, self.flux_kind = list(bands), k, spread, ref_band, flux_kind
        self.noiseless, self.sys_floor = bool(noiseless), float(sys_floor)
        self.mag_sigma, self.candidates = float(mag_sigma), int(candidates)
        self.spread_snr = tuple((float(e), float(v)) for e, v in (spread_snr or ()))
        self.mag_weight, self.mag_weights = float(mag_weight), {str(b): float(w) for b, w in (mag_weights or {}).items()}
        self.register_buffer("flux", torch.zeros(n, len(bands), dtype=torch.float32))
        self.register_buffer("z", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("soft", torch.ones(len(bands), dtype=torch.float64))
        self._estimator: PhotoZKNN | None = None

    def estimator(self) -> PhotoZKNN:
        if self._estimator is None:
            self._estimator = PhotoZKNN(self.bands, self.flux.cpu().double().numpy(), self.z.cpu().double().numpy(),
                                        self.soft.cpu().numpy(), k=self.k, spread=self.spread, ref_band=self.ref_band,
                                        mag_weight=self.mag_weight, mag_weights=dict(self.mag_weights),
                                        noiseless=self.noiseless, sys_floor=self.sys_floor,
                                        mag_sigma=self.mag_sigma, candidates=self.candidates,
                                        spread_snr=self.spread_snr)
        return self._estimator

