"""Training of the photo-z reference set (`deepfield train photoz`): simulated fields measured by the pipeline,
matched to their truth (tasks/trainsets/photoz.py), become the k-nearest-neighbour reference set of
models/photoz.py.

- Data: one 2048^2 field per seed (the simulator's defaults: HSC-like depth, bands g, r, i, z unless --bands),
  each measured by the default run's measuring stages in this process (tasks/trainsets/photoz.py: seed_tables,
  which keeps each seed's matched galaxies under the work directory, `seed<N>/photoz_<flux>.parquet`: a killed
  run resumes from the seeds it finished, and a rerun with more seeds measures only the new ones). This module
  fits on those tables (models import nothing else of deepfield).
- Fitting: the last seed's field is held out. On it, k is chosen from `K_CHOICES` (the smallest sigma_NMAD at
  i < 24 with every band; ties to the larger k), then `spread` (models/photoz.py) so that the 68 % intervals of
  the held-out galaxies at i < 25 cover 68 % (bisection). The shipped reference set then holds every seed's
  galaxies, the held-out field's too.
- Record: the bands, k, spread, the photometry, the seeds and counts, and the held-out figures (sigma_NMAD,
  outliers, bias, coverage at i < 24 and in magnitude bins) with the command line; models/cards/photoz_knn.md
  repeats them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .photoz import QUANTILE_COLUMNS, PhotoZKNN, binned_figures
from .photoz import fit_spread as bisect_spread
from .progress import say

K_CHOICES = (16, 24, 32, 48, 64)


def usable_mask(t: pd.DataFrame, bands: list[str]) -> np.ndarray:
    """True for the rows with a finite flux and a positive error in every band."""
    f = t[[f"flux_{b}" for b in bands]].to_numpy(float)
    e = t[[f"fluxerr_{b}" for b in bands]].to_numpy(float)
    return np.isfinite(f).all(axis=1) & (e > 0).all(axis=1)


def usable(t: pd.DataFrame, bands: list[str]) -> pd.DataFrame:
    """Rows with a finite flux and a positive error in every band."""
    return t[usable_mask(t, bands)]


def estimator(t: pd.DataFrame, bands: list[str], k: int, spread: float = 1.0) -> PhotoZKNN:
    e = t[[f"fluxerr_{b}" for b in bands]].to_numpy(float)
    return PhotoZKNN(bands, t[[f"flux_{b}" for b in bands]].to_numpy(float), t.z.to_numpy(float),
                     np.median(e, axis=0), k=k, spread=spread, ref_band="i" if "i" in bands else bands[-1])


def figures(est: PhotoZKNN, t: pd.DataFrame, bands: list[str]) -> dict:
    """Held-out figures of `est` on the galaxies `t` with the bands `bands` (models.photoz.binned_figures)."""
    res = est.predict(t[[f"flux_{b}" for b in bands]].to_numpy(float),
                      t[[f"fluxerr_{b}" for b in bands]].to_numpy(float), bands)
    q = np.stack([res[c] for c in QUANTILE_COLUMNS], axis=1)
    return binned_figures(res["z_phot"], q, t.z.to_numpy(float), t.mag_true.to_numpy(float))


def fit_spread(est: PhotoZKNN, t: pd.DataFrame, bands: list[str], target: float = 0.68) -> float:
    """The spread that makes the 68 % intervals of `t` cover `target` (models.photoz.fit_spread)."""
    zn = est.neighbours(t[[f"flux_{b}" for b in bands]].to_numpy(float), bands)
    return bisect_spread(lambda s: est.quantiles(zn, s), t.z.to_numpy(float), target)


def train(command: str, tables: list[pd.DataFrame], seeds: list[int], size: int = 2048, flux: str = "aper",
          bands: list[str] | None = None) -> tuple[dict, dict]:
    """From each seed's matched galaxies (`tables`, tasks/trainsets/photoz.py: seed_tables), fit k and spread on
    the last seed's, return (record, state) for the weights file (module docstring)."""
    import torch
    if len(tables) < 2:
        raise ValueError("train photoz: give at least two seeds (the last one's field is held out for fitting)")
    have = [c[len("flux_"):] for c in tables[0].columns if c.startswith("flux_")]
    use = [b for b in (bands or have) if b in have]
    ref = pd.concat(tables[:-1], ignore_index=True)
    held = tables[-1]
    ref_u, held_u = usable(ref, use), usable(held, use)
    say(f"reference {len(ref_u)} galaxies from seeds {seeds[:-1]}, held out {len(held_u)} from seed {seeds[-1]}")
    scores = {}
    for k in K_CHOICES:
        f = figures(estimator(ref_u, use, k), held_u, use)["i_lt_24"]
        scores[k] = f["sigma_nmad"]
        say(f"  k {k}: i < 24 sigma_NMAD {f['sigma_nmad']:.4f}, outliers {f['outliers']:.3f}, bias {f['bias']:+.4f}")
    k = min(K_CHOICES, key=lambda kk: (round(scores[kk], 4), -kk))
    est = estimator(ref_u, use, k)
    bright = held_u[held_u.mag_true < 25]
    spread = fit_spread(est, bright, use)
    est.spread = spread
    held_figs = figures(est, held_u, use)
    say(f"k {k}, spread {spread}: held out i < 24 " + ", ".join(f"{key} {v}" for key, v in held_figs["i_lt_24"].items()
                                                                if key != "pit_histogram"))
    final = usable(pd.concat(tables, ignore_index=True), use)
    fl = final[[f"flux_{b}" for b in use]].to_numpy(np.float32)
    soft = np.median(final[[f"fluxerr_{b}" for b in use]].to_numpy(float), axis=0)
    arch = {"bands": use, "n": int(len(final)), "k": int(k), "spread": float(spread),
            "ref_band": "i" if "i" in use else use[-1], "flux_kind": flux}
    record = {"arch": arch, "command": command, "seed": int(seeds[0]), "seeds": [int(s) for s in seeds],
              "data": {"field_size": size, "fields": len(seeds), "galaxies": int(len(final)),
                       "held_out_seed": int(seeds[-1]), "photometry": f"flux_{flux}_<band>",
                       "magnitude_range_true": [float(final.mag_true.min()), float(final.mag_true.max())]},
              "model_selection": {"k_sigma_nmad_i_lt_24": {str(kk): v for kk, v in scores.items()}},
              "metrics": {"held_out": held_figs}}
    state = {"flux": torch.tensor(fl), "z": torch.tensor(final.z.to_numpy(np.float32)),
             "soft": torch.as_tensor(soft, dtype=torch.float64)}
    return record, state
