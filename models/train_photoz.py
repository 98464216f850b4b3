"""Training of the photo-z reference set (`deepfield train photoz`): simulated fields measured by the pipeline,
matched to their truth (tasks/trainsets/photoz.py), become a reference set of models/photoz.py: a library set
(`train_library`, the default: the fields' true galaxies as noiseless references, the measured ones giving the
photometry's share of each band's total flux, the intervals' spreads and the figures, each seed left out in
turn) or a measured set (`train`, `--measured`, as below).

- Data: one 2048^2 field per seed (the simulator's defaults: HSC-like depth, bands g, r, i, z unless --bands),
  each measured by the default run's measuring stages in this process (tasks/trainsets/photoz.py: seed_tables,
  which keeps each seed's matched galaxies under the work directory, `seed<N>/photoz_<flux>.parquet`: a killed
  run resumes from the seeds it finished, and a rerun with more seeds measures only the new ones). This module
  fits on those tables (models import nothing else of deepfield).
- Fitting: k and the magnitude's weight among the features (models/photoz.py: `mag_weight`) are chosen from
  `K_CHOICES` x `MAG_WEIGHTS` by leaving each seed out in turn (its galaxies estimated from the other seeds'; with
  more than FOLDS seeds, each of FOLDS folds of seeds in turn), pooled: the smallest sigma_NMAD at true i < 24 with
  every band; ties to the larger k, then to the larger weight), and `spread` (models/photoz.py) so that the pooled
  68 % intervals at i < 25 cover 68 % (bisection).
  Before 2026-12-04 k alone was chosen, and the spread fitted, on the last seed's field. The last seed's field
  is still held out for the record's figures (the first seeds as the reference set). Each band set of two or
  more bands, fewer than all, gets its own magnitude weight the same way (`subset_weights`, with that k): a
  survey with fewer bands leans more on the magnitude prior. The shipped reference set
  then holds every seed's galaxies, the held-out field's too.
- Record: the bands, k, spread, the photometry, the seeds and counts, and the held-out figures (sigma_NMAD,
  outliers, bias, coverage at i < 24 and in magnitude bins) with the command line; models/cards/photoz_knn.md
  repeats them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .photoz import CANDIDATES, MAG_SIGMA, MAG_WEIGHT, NJY_AB, SYS_FLOOR, PhotoZKNN
from .photoz_pdf import (QUANTILE_COLUMNS, binned_figures, neighbour_quantiles, nmad_figures, snr_spread,
                         weighted_quantiles, widened)
from .photoz_pdf import fit_spread as bisect_spread
from .progress import say

K_CHOICES = (16, 24, 32, 48, 64)
# On the shipped g, r, i, z set, leave-one-out over its own galaxies at measured i < 24 (2026-12-04): weight 0.25
# (the only one before) 0.0408-0.0429 for k 24-48, 0.1 0.0383-0.0397, 0.05 0.0384-0.0389, 0 0.0460-0.0494
MAG_WEIGHTS = (0.05, 0.1, 0.25)
FOLDS = 10  # cross-validation folds of seeds (_oof_neighbours)
LIBRARY_MAG_WEIGHT = 0.05  # the magnitude's weight in the library's candidate search (the best k-NN weight)


def usable_mask(t: pd.DataFrame, bands: list[str]) -> np.ndarray:
    """True for the rows with a finite flux and a positive error in every band."""
    f = t[[f"flux_{b}" for b in bands]].to_numpy(float)
    e = t[[f"fluxerr_{b}" for b in bands]].to_numpy(float)
    return np.isfinite(f).all(axis=1) & (e > 0).all(axis=1)


def usable(t: pd.DataFrame, bands: list[str]) -> pd.DataFrame:
    """Rows with a finite flux and a positive error in every band."""
    return t[usable_mask(t, bands)]


def estimator(t: pd.DataFrame, bands: list[str], k: int, spread: float = 1.0, mag_weight: float = MAG_WEIGHT
              ) -> PhotoZKNN:
    e = t[[f"fluxerr_{b}" for b in bands]].to_numpy(float)
    return PhotoZKNN(bands, t[[f"flux_{b}" for b in bands]].to_numpy(float), t.z.to_numpy(float),
                     np.median(e, axis=0), k=k, spread=spread, ref_band="i" if "i" in bands else bands[-1],
                     mag_weight=mag_weight)


def figures(est: PhotoZKNN, t: pd.DataFrame, bands: list[str]) -> dict:
    """Held-out figures of `est` on the galaxies `t` with the bands `bands` (models.photoz_pdf.binned_figures)."""
    res = est.predict(t[[f"flux_{b}" for b in bands]].to_numpy(float),
                      t[[f"fluxerr_{b}" for b in bands]].to_numpy(float), bands)
    q = np.stack([res[c] for c in QUANTILE_COLUMNS], axis=1)
    return binned_figures(res["z_phot"], q, t.z.to_numpy(float), t.mag_true.to_numpy(float))


def _oof_neighbours(tabs: list[pd.DataFrame], bands: list[str], mag_weight: float, k_max: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each galaxy of `tabs` (one table per seed) with the seeds of the other folds as the reference set: the true
    redshifts of its `k_max` nearest reference galaxies, nearest first (n, k_max), its true z and its true
    magnitude. Up to FOLDS seeds each seed is its own fold (leave one seed out); with more, seed i is in fold
    i % FOLDS: ten neighbour trees instead of one per seed. On 100 fields (2026-12-07) the (k, weight) grid's
    pooled sigma_NMAD moved by at most 0.0002 (the same choice, k 64 and weight 0.1) and the pass over the
    band sets took about 3.5 minutes, where leaving each seed out had not finished it in 8."""
    folds = min(len(tabs), FOLDS)
    zn, z, mag = [], [], []
    for f in range(folds):
        out = [t for i, t in enumerate(tabs) if i % folds == f]
        ref = pd.concat([t for i, t in enumerate(tabs) if i % folds != f], ignore_index=True)
        est = estimator(ref, bands, k_max, mag_weight=mag_weight)
        for t in out:
            _, j = est.tree(bands).query(est.features(t[[f"flux_{b}" for b in bands]].to_numpy(float), bands),
                                         k=k_max)
            zn.append(est.z[np.atleast_2d(j)])
            z.append(t.z.to_numpy(float))
            mag.append(t.mag_true.to_numpy(float))
    return np.concatenate(zn), np.concatenate(z), np.concatenate(mag)


def cross_validation(tabs: list[pd.DataFrame], bands: list[str]) -> tuple[dict, dict, dict]:
    """sigma_NMAD at true i < 24 of every (k, magnitude weight) of K_CHOICES x MAG_WEIGHTS, each seed's galaxies
    estimated from the other seeds', pooled: ({(k, w): sigma_NMAD}, {(k, w): nmad_figures}, {w: the
    _oof_neighbours of weight w, max(K_CHOICES) of them}). Pooling ten fields' galaxies (about 11,000 at
    i < 24) rather than one held-out field's (about 1,100) makes the choice steadier: on one field the figures
    of neighbouring choices differ by 0.001-0.003, as much as the choices."""
    scores, figs, oof = {}, {}, {}
    for mw in MAG_WEIGHTS:
        zn, z, mag = oof[mw] = _oof_neighbours(tabs, bands, mw, max(K_CHOICES))
        sel = mag < 24
        for k in K_CHOICES:
            f = nmad_figures(np.median(zn[sel, :k], axis=1), z[sel])
            scores[(k, mw)], figs[(k, mw)] = f["sigma_nmad"], f
    return scores, figs, oof


def cv_spread(oof: tuple[np.ndarray, np.ndarray, np.ndarray], k: int, target: float = 0.68) -> float:
    """The spread (models.photoz_pdf.fit_spread) that makes the 68 % intervals of every seed's galaxies at true
    i < 25, each estimated from its `k` nearest in the other seeds' (`oof`: cross_validation's neighbours of the
    chosen weight, nearest first, at least k of them), cover `target`."""
    zn, z, mag = oof
    sel = mag < 25
    zs = np.sort(zn[sel, :k], axis=1)
    return bisect_spread(lambda s: neighbour_quantiles(zs, s), z[sel], target)


def subset_weights(tabs: list[pd.DataFrame], bands: list[str], k: int) -> tuple[dict, dict]:
    """For each band set of two or more of `bands`, fewer than all (in wavelength order, as the estimator keys
    them), the magnitude weight of MAG_WEIGHTS with the smallest pooled cross-validated (_oof_neighbours) sigma_NMAD
    at true i < 24 with `k` neighbours (ties to the larger weight): ({"grz": weight}, {"grz": {weight:
    sigma_NMAD}})."""
    from itertools import combinations
    chosen, table = {}, {}
    for n in range(2, len(bands)):
        for sub in combinations(bands, n):
            sub = list(sub)
            got = {}
            for w in MAG_WEIGHTS:
                zn, z, mag = _oof_neighbours(tabs, sub, w, k)
                sel = mag < 24
                got[w] = nmad_figures(np.median(zn[sel], axis=1), z[sel])["sigma_nmad"]
            key = "".join(sub)
            chosen[key] = min(got, key=lambda w: (round(got[w], 4), -w))
            table[key] = {str(w): v for w, v in got.items()}
    return chosen, table


def train(command: str, tables: list[pd.DataFrame], seeds: list[int], size: int = 2048, flux: str = "aper",
          bands: list[str] | None = None) -> tuple[dict, dict]:
    """From each seed's matched galaxies (`tables`, tasks/trainsets/photoz.py: seed_tables), fit k and spread on
    the last seed's, return (record, state) for the weights file (module docstring)."""
    import torch
    if len(tables) < 2:
        raise ValueError("train photoz: give at least two seeds (the last one's field is held out for fitting)")
    have = [c[len("flux_"):] for c in tables[0].columns if c.startswith("flux_")]
    use = [b for b in (bands or have) if b in have]
    tabs = [usable(t, use) for t in tables]
    ref_u, held_u = pd.concat(tabs[:-1], ignore_index=True), tabs[-1]
    say(f"choosing k and the magnitude weight by leaving each of {min(len(tables), FOLDS)} folds of the "
        f"{len(tables)} seeds out in turn; "
        f"held out for the record: {len(held_u)} galaxies of seed {seeds[-1]}")
    scores, cv, oof = cross_validation(tabs, use)
    for (k, mw), f in cv.items():
        say(f"  k {k}, magnitude weight {mw}: i < 24 sigma_NMAD {f['sigma_nmad']:.4f}, outliers "
            f"{f['outliers']:.3f}, bias {f['bias']:+.4f}")
    k, mw = min(scores, key=lambda km: (round(scores[km], 4), -km[0], -km[1]))
    spread = cv_spread(oof[mw], k)
    per_set, per_set_scores = subset_weights(tabs, use, k)
    say("magnitude weight of the band sets fewer than all: " + ", ".join(f"{b} {w}" for b, w in per_set.items()))
    est = estimator(ref_u, use, k, mag_weight=mw)
    est.mag_weights = dict(per_set)
    est.spread = spread
    held_figs = figures(est, held_u, use)
    say(f"k {k}, magnitude weight {mw}, spread {spread}: held out i < 24 " + ", ".join(f"{key} {v}" for key, v in held_figs["i_lt_24"].items()
                                                                if key != "pit_histogram"))
    final = pd.concat(tabs, ignore_index=True)
    fl = final[[f"flux_{b}" for b in use]].to_numpy(np.float32)
    soft = np.median(final[[f"fluxerr_{b}" for b in use]].to_numpy(float), axis=0)
    arch = {"bands": use, "n": int(len(final)), "k": int(k), "spread": float(spread),
            "ref_band": "i" if "i" in use else use[-1], "flux_kind": flux, "mag_weight": float(mw),
            "mag_weights": {b: float(w) for b, w in per_set.items()}}
    record = {"arch": arch, "command": command, "seed": int(seeds[0]), "seeds": [int(s) for s in seeds],
              "data": {"field_size": size, "fields": len(seeds), "galaxies": int(len(final)),
                       "held_out_seed": int(seeds[-1]), "photometry": f"flux_{flux}_<band>",
                       "magnitude_range_true": [float(final.mag_true.min()), float(final.mag_true.max())]},
              "model_selection": {"method": f"leave one of {min(len(tabs), FOLDS)} folds of seeds out, pooled, "
                                            "i < 24 (true)",
                                  "k_sigma_nmad_i_lt_24": {str(kk): v for (kk, w), v in scores.items() if w == mw},
                                  "k_mag_weight_sigma_nmad_i_lt_24": {f"{kk},{w}": v for (kk, w), v in scores.items()},
                                  "cross_validation_i_lt_24": cv[(k, mw)],
                                  "band_set_mag_weight_sigma_nmad_i_lt_24": per_set_scores},
              "metrics": {"held_out": held_figs}}
    state = {"flux": torch.tensor(fl), "z": torch.tensor(final.z.to_numpy(np.float32)),
             "soft": torch.as_tensor(soft, dtype=torch.float64)}
    return record, state


SNR_EDGES = (0.0, 8.0, 15.0, 30.0, 60.0)  # library sets: the reference band's S/N bins of their own spread
BRIGHT_SNR = 30.0  # library band ratios: from matched galaxies above this S/N in every band ...
BRIGHT_MAG = 23.0  # ... and brighter than this true magnitude


def truth_fluxes(truth: pd.DataFrame, bands: list[str]) -> np.ndarray:
    """(n, bands) true total fluxes in nJy of the truth rows, from their AB magnitudes `mag_<band>`."""
    return 10 ** (-0.4 * (truth[[f"mag_{b}" for b in bands]].to_numpy(float) - NJY_AB))


def bright_ratios(flux: np.ndarray, err: np.ndarray, true: np.ndarray, mag: np.ndarray) -> tuple[np.ndarray, int]:
    """(bands,) median measured / true flux of the rows (fluxes, errors, true fluxes (n, bands); true reference
    magnitudes (n,)) bright in every band (S/N > BRIGHT_SNR) and in true magnitude (< BRIGHT_MAG), and how many
    rows that is: what the photometry keeps of a galaxy's total flux. The library's band ratios and eval photoz's
    depth floor (flows/evaluate/photoz.py: truth_floor) both take them so."""
    bright = (flux / err > BRIGHT_SNR).all(axis=1) & (mag < BRIGHT_MAG)
    if not bright.any():
        return np.full(flux.shape[1], np.nan), 0
    return np.median(flux[bright] / true[bright], axis=0), int(bright.sum())


def band_ratios(tabs: list[pd.DataFrame], bands: list[str], ref: str) -> np.ndarray:
    """(bands,) bright_ratios of the matched galaxies of every seed, per band: their measured fluxes against the true
    fluxes `true_flux_<b>` of the truth galaxy each was matched to when its table was made (tasks/trainsets/photoz.py:
    matched_galaxies, one to one)."""
    lack = [b for b in bands if f"true_flux_{b}" not in tabs[0].columns]
    if lack:
        raise ValueError(f"train photoz --library: the matched galaxies have no true flux in band(s) {', '.join(lack)} "
                         "(true_flux_<band>); remove the seeds' tables from the work directory to measure them again")
    cols = [[f"{kind}_{b}" for b in bands] for kind in ("flux", "fluxerr", "true_flux")]
    ratios, n = bright_ratios(*(np.concatenate([t[c].to_numpy(float) for t in tabs]) for c in cols),
                              np.concatenate([t.mag_true.to_numpy(float) for t in tabs]))
    if n < 50:
        raise ValueError(f"train photoz --library: {n} bright matched galaxies (S/N > {BRIGHT_SNR:g} in every "
                         f"band, true {ref} < {BRIGHT_MAG:g}) to measure the photometry's share of the total flux; "
                         "give more or larger fields")
    return ratios


def library(truths: list[pd.DataFrame], bands: list[str], ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The library of the seeds' true galaxies (kind galaxy or bcg, every one the simulator drew): noiseless fluxes
    (n, bands) in nJy on the photometry's scale (true fluxes x `ratios`) and their true redshifts, in redshift
    order."""
    gal = [tr[tr.kind.astype(str).isin(["galaxy", "bcg"])] for tr in truths]
    flux = np.concatenate([truth_fluxes(g, bands) for g in gal]) * ratios
    z = np.concatenate([g.z.to_numpy(float) for g in gal])
    good = np.flatnonzero(np.isfinite(flux).all(axis=1) & np.isfinite(z))
    good = good[np.argsort(z[good], kind="stable")]  # in redshift order: the estimator's quantiles need no sort
    return flux[good], z[good]


def library_estimator(tabs: list[pd.DataFrame], truths: list[pd.DataFrame], bands: list[str], soft: np.ndarray,
                      spread: float = 1.0, mag_weight: float = LIBRARY_MAG_WEIGHT, **likelihood) -> PhotoZKNN:
    """A library set (models/photoz.py: `noiseless`) from the truth of the seeds `truths`, its band ratios from
    their measured galaxies `tabs` (kept in its `info`); `soft` the asinh softenings (the measured galaxies'
    median errors); `likelihood`: sys_floor, mag_sigma, candidates (models/photoz.py's defaults)."""
    ref = "i" if "i" in bands else bands[-1]
    ratios = band_ratios(tabs, bands, ref)
    flux, z = library(truths, bands, ratios)
    return PhotoZKNN(bands, flux, z, soft, spread=spread, ref_band=ref, mag_weight=mag_weight, noiseless=True,
                     info={"band_ratios": {b: float(r) for b, r in zip(bands, ratios)}}, **likelihood)


def train_library(command: str, tables: list[pd.DataFrame], truths: list[pd.DataFrame], seeds: list[int],
                  size: int = 2048, flux: str = "gaap", bands: list[str] | None = None, sys_floor: float = SYS_FLOOR,
                  mag_sigma: float = MAG_SIGMA, candidates: int = CANDIDATES) -> tuple[dict, dict]:
    """The library set (`deepfield train photoz`, the default): every seed's true galaxies as noiseless references,
    each measured galaxy's redshift density their redshifts weighted by the likelihood of its fluxes
    (models/photoz.py: library_weights). Figures and the spread by leaving each seed out in turn (its galaxies
    estimated from the other seeds' library and band ratios, pooled); the record's held-out figures are the last
    seed's from that pass. Returns (record, state) for the weights file."""
    import torch
    if len(tables) < 2:
        raise ValueError("train photoz: give at least two seeds (each is left out in turn)")
    have = [c[len("flux_"):] for c in tables[0].columns if c.startswith("flux_")]
    use = [b for b in (bands or have) if b in have]
    tabs = [usable(t, use) for t in tables]
    final = pd.concat(tabs, ignore_index=True)
    soft = np.median(final[[f"fluxerr_{b}" for b in use]].to_numpy(float), axis=0)
    like = dict(sys_floor=sys_floor, mag_sigma=mag_sigma, candidates=candidates)
    say(f"library: estimating each of the {len(tabs)} seeds' galaxies from the other seeds' true galaxies")
    parts = []
    for i, t in enumerate(tabs):
        est = library_estimator(tabs[:i] + tabs[i + 1:], truths[:i] + truths[i + 1:], use, soft, **like)
        j, w = est.library_weights(t[[f"flux_{b}" for b in use]].to_numpy(float),
                                   t[[f"fluxerr_{b}" for b in use]].to_numpy(float), use)
        r = est.feature_band(use)
        snr = (t[f"flux_{r}"] / t[f"fluxerr_{r}"]).to_numpy(float)
        parts.append((weighted_quantiles(est.z[j], w, 1.0), t.z.to_numpy(float), t.mag_true.to_numpy(float), snr))
    q1, z, mag, snr = (np.concatenate([p[k] for p in parts]) for k in range(4))
    # one spread per bin of the reference band's S/N (one for all left faint galaxies' intervals too narrow: at
    # i 24-25 they covered 0.47 when i < 24 covered 0.68), each fitted on the bin's galaxies at every magnitude
    spread = bisect_spread(lambda s: widened(q1[mag < 24], s), z[mag < 24])
    spread_snr = []
    for lo, hi in zip(SNR_EDGES, SNR_EDGES[1:] + (np.inf,)):
        b = (snr >= lo) & (snr < hi)
        if lo == SNR_EDGES[0]:
            b |= ~(snr >= lo)  # negative or NaN: the lowest bin, as the estimator puts them
        spread_snr.append((float(lo), bisect_spread(lambda s: widened(q1[b], s), z[b]) if b.sum() >= 200
                           else spread))
    row = snr_spread(snr, tuple(spread_snr), spread)
    q = widened(q1, row[:, None])
    zp = q[:, QUANTILE_COLUMNS.index("z_phot_q50")]
    pooled = binned_figures(zp, q, z, mag)
    last = np.arange(len(z)) >= len(z) - len(tabs[-1])
    held = binned_figures(zp[last], q[last], z[last], mag[last])
    f = pooled["i_lt_24"]
    say("spread by S/N " + ", ".join(f">= {lo:g}: {v}" for lo, v in spread_snr) + ": every seed left out in turn, "
        f"i < 24: sigma_NMAD {f['sigma_nmad']:.4f}, outliers {f['outliers']:.3f}, bias {f['bias']:+.4f}, 68 % "
        f"coverage {f['coverage_68']:.3f} (i 24-25: {pooled['i_24_25'].get('coverage_68', np.nan):.3f})")
    est = library_estimator(tabs, truths, use, soft, spread, **like)
    arch = {"bands": use, "n": int(len(est.z)), "k": int(candidates), "spread": float(spread),
            "ref_band": est.ref_band, "flux_kind": flux, "mag_weight": float(LIBRARY_MAG_WEIGHT), "mag_weights": {},
            "noiseless": True, "sys_floor": float(sys_floor), "mag_sigma": float(mag_sigma),
            "candidates": int(candidates), "spread_snr": [list(p) for p in spread_snr]}
    record = {"arch": arch, "command": command, "seed": int(seeds[0]), "seeds": [int(s) for s in seeds],
              "data": {"field_size": size, "fields": len(seeds), "library_galaxies": int(len(est.z)),
                       "measured_galaxies": int(len(final)), "held_out_seed": int(seeds[-1]),
                       "photometry": f"flux_{flux}_<band>",
                       "band_ratios": est.info["band_ratios"]},
              "model_selection": {"method": "leave one seed out, pooled (each seed's measured galaxies against the "
                                            "other seeds' library)", "pooled": pooled},
              "metrics": {"held_out": held}}
    state = {"flux": torch.tensor(est.flux.astype(np.float32)), "z": torch.tensor(est.z.astype(np.float32)),
             "soft": torch.as_tensor(soft, dtype=torch.float64)}
    return record, state


