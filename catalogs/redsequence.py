"""Red-sequence membership of catalog galaxies, used by the merge's cluster step (catalogs/clusters.py) and by
the red-sequence baseline finder of `deepfield eval cluster` (flows/evaluate/baselines.py).

The model (tasks.astro.red_sequence_model) gives, per redshift, the colours of an early-type galaxy through
the survey's bandpasses and the apparent magnitude m*(z) of an L* red galaxy (passive evolution), as
redMaPPer (Rykoff et al. 2014) calibrates on spectroscopic clusters.

- `membership`: every catalog galaxy gets a weight w = exp(-chi^2 / 2) at a model redshift (0 outside
  m* - 3 < m < m* + 1.75, i.e. brighter than 0.2 L*), chi^2 summed over the adjacent-band colours with an
  intrinsic red-sequence width of 0.05 mag added in quadrature to the photometric errors.
- `refine_redshift`: the redshift of a cluster whose centre and rough redshift are known, where the excess
  red-sequence weight around the centre over the local background peaks.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from deepfield.tasks.astro import RedSequenceModel, arcsec_per_mpc, red_sequence_model, separation_arcsec

__all__ = ["INTRINSIC_WIDTH", "membership", "refine_redshift"]

INTRINSIC_WIDTH = 0.05  # mag, red-sequence colour scatter (the simulator's is 0.04)


def membership(cat: pd.DataFrame, model: RedSequenceModel, k: int) -> np.ndarray:
    """Red-sequence weights of every row at model redshift index k."""
    mags = np.stack([cat[f"mag_auto_{b}"].to_numpy(float) for b in model.bands], axis=1)
    errs = np.stack([cat[f"magerr_auto_{b}"].to_numpy(float) for b in model.bands], axis=1)
    col, cerr2 = mags[:, :-1] - mags[:, 1:], errs[:, :-1] ** 2 + errs[:, 1:] ** 2
    chi2 = np.nansum((col - model.colours[k]) ** 2 / (INTRINSIC_WIDTH ** 2 + np.nan_to_num(cerr2, nan=1.0)), axis=1)
    m = mags[:, model.bands.index(model.ref_band)]
    ok = np.isfinite(m) & (m > model.m_star[k] - 3) & (m < model.m_star[k] + 1.75) & np.isfinite(col).all(axis=1)
    return np.where(ok, np.exp(-0.5 * chi2), 0.0)


def refine_redshift(cat: pd.DataFrame, ra: float, dec: float, z0: float, bands: list[str], ref_band: str = "i",
                    radius_mpc: float = 0.3, half_width: float = 0.15, step: float = 0.01,
                    min_excess: float = 3.0) -> tuple[float, float]:
    """The red-sequence redshift of a cluster centred at (ra, dec) whose redshift is roughly z0: on a grid
    of z0 +- half_width, the excess red-sequence weight (`membership`) of the catalog's galaxies within
    radius_mpc of the centre over the weight density in an annulus of 2-4 times that radius (the local
    background), maximised over z and refined by a parabola through the neighbouring grid points.
    Returns (z, excess at z); z0 itself when no grid point has an excess of min_excess galaxies (too
    few members, or a catalog without the photometry), with the best excess found."""
    z = np.round(np.arange(max(0.05, z0 - half_width), min(1.3, z0 + half_width) + 1e-9, step), 4)
    if len(cat) == 0 or len(z) < 3:
        return float(z0), 0.0
    model = red_sequence_model(bands, ref_band, z=z)
    sep = separation_arcsec(ra, dec, cat.ra.to_numpy(float), cat.dec.to_numpy(float))
    excess = np.zeros(len(z))
    for k, zz in enumerate(z):
        r = radius_mpc * arcsec_per_mpc(float(zz))
        w = membership(cat, model, k)
        inner, ring = sep < r, (sep >= 2 * r) & (sep < 4 * r)
        excess[k] = w[inner].sum() - w[ring].sum() / 12.0  # the annulus has 12 times the inner area
    k = int(np.argmax(excess))
    if excess[k] < min_excess:
        return float(z0), float(excess[k])
    best = float(z[k])
    if 0 < k < len(z) - 1:
        den = excess[k - 1] - 2 * excess[k] + excess[k + 1]
        if den < 0:
            best += 0.5 * (excess[k - 1] - excess[k + 1]) / den * step
    return best, float(excess[k])
