"""Classical galaxy-cluster finder on the source catalog: a red-sequence matched filter, the baseline the
image-based cluster finder is measured against (after Gladders & Yee 2000's red-sequence method and the
colour and luminosity filters of redMaPPer, Rykoff et al. 2014).

For every trial redshift z of a grid (0.1-1.0, step 0.02):
1. the red-sequence model (tasks.astro.red_sequence_model): the colours of an early-type galaxy at z (the E
   template through the survey's bandpasses; redMaPPer calibrates the same thing on spectroscopic clusters)
   and the apparent magnitude m*(z) of an L* red galaxy (passive evolution);
2. every catalog galaxy gets a membership weight w = exp(-chi^2 / 2) (catalogs.redsequence.membership, the
   merge's own: 0 outside m* - 3 < m < m* + 1.75, i.e. brighter than 0.2 L*), chi^2 summed over the
   adjacent-band colours with an intrinsic red-sequence width of 0.05 mag added in quadrature to the
   photometric errors;
3. the weights are binned on a 6" grid of the tangent plane and smoothed with a Gaussian of 0.15 Mpc at z;
   local maxima more than 3 standard deviations above the map's mean are candidate centres;
4. a candidate's richness is the sum of w within 0.5 Mpc minus the background expected there (the mean
   weight density times the area), and its significance that excess over the background's Poisson noise,
   sqrt(density of w^2 x area); candidates above `threshold` (5) are kept. (The smoothed map's own
   standard deviation understates the tail of a sparse field: with it, 7-11 sigma peaks were noise.)
Candidates from all redshifts are then merged: within 1 Mpc (about R_lambda) of a more significant one, at
its redshift, they are dropped (at 0.5 Mpc, the outskirts of rich clusters came out as extra clusters),
so each cluster keeps the redshift of its most significant filter, refined by a parabola through the
smoothed map's significance at the neighbouring redshifts.

Written here rather than taken from a library: redMaPPer (the reference implementation) needs a spectroscopic
training set and a calibrated red-sequence model per survey, and no maintained PyPI package does a plain
matched filter on a catalog.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from deepfield.catalogs.redsequence import membership
from deepfield.tasks.astro import RedSequenceModel, arcsec_per_mpc, red_sequence_model

__all__ = ["find_clusters"]

GRID_ARCSEC = 6.0
MERGE_MPC = 1.0  # a candidate within this of a more significant one (at its redshift) is the same cluster
PEAK_THRESHOLD = 3.0  # sigma of the smoothed map for a candidate peak


def _tangent_plane(ra0: float, dec0: float):
    """An astropy WCS of the gnomonic (TAN) projection about (ra0, dec0) in arcsec, 0-based pixel (0, 0)
    there, x increasing with RA."""
    from astropy.wcs import WCS
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [1.0, 1.0]
    w.wcs.cdelt = [1 / 3600, 1 / 3600]
    return w


def find_clusters(cat: pd.DataFrame, bands: list[str] | None = None, ref_band: str = "i", threshold: float = 5.0,
                  model: RedSequenceModel | None = None) -> pd.DataFrame:
    """Clusters in a source catalog (columns ra, dec, mag_auto_<b>, magerr_auto_<b>; stars included are
    harmless, they are not red-sequence coloured at most redshifts). Returns ra, dec, z, significance,
    richness (background-subtracted red-sequence weight within 0.5 Mpc), most significant first."""
    bands = bands or ["g", "r", "i", "z"]
    model = model or red_sequence_model(bands, ref_band)
    plane = _tangent_plane(float(np.median(cat.ra)), float(np.median(cat.dec)))
    x, y = plane.wcs_world2pix(cat.ra.to_numpy(float), cat.dec.to_numpy(float), 0)
    x0, y0 = x.min(), y.min()
    nx, ny = int((x.max() - x0) // GRID_ARCSEC) + 1, int((y.max() - y0) // GRID_ARCSEC) + 1
    ix, iy = ((x - x0) // GRID_ARCSEC).astype(int), ((y - y0) // GRID_ARCSEC).astype(int)
    occupied = np.zeros((ny, nx), bool)
    occupied[iy, ix] = True
    footprint = ndimage.binary_closing(occupied, iterations=3)
    rows, sig_by_z = [], []
    for k, z in enumerate(model.z):
        w = membership(cat, model, k)
        grid = np.zeros((ny, nx))
        np.add.at(grid, (iy, ix), w)
        scale = arcsec_per_mpc(float(z))
        smooth = ndimage.gaussian_filter(grid, 0.15 * scale / GRID_ARCSEC, mode="constant")
        inside = smooth[footprint]
        bg = np.mean(inside)
        noise = np.std(inside) or 1e-12  # red-sequence weights are sparse: the median and MAD of the map are ~0
        sig = np.where(footprint, (smooth - bg) / noise, 0.0)
        sig_by_z.append(sig)
        peaks = (sig == ndimage.maximum_filter(sig, size=5)) & (sig > PEAK_THRESHOLD)
        area = max(footprint.sum() * GRID_ARCSEC ** 2, 1.0)
        density, density2 = w.sum() / area, (w * w).sum() / area  # per arcsec^2
        r = 0.5 * scale
        for py, px in zip(*np.nonzero(peaks)):
            cx, cy = x0 + (px + 0.5) * GRID_ARCSEC, y0 + (py + 0.5) * GRID_ARCSEC
            near = np.hypot(x - cx, y - cy) < r
            a = np.pi * r * r
            excess = float(w[near].sum() - density * a)
            significance = excess / np.sqrt(max(density2 * a, 1e-12))
            if significance > threshold:
                rows.append(dict(x=cx, y=cy, k=k, z=float(z), significance=significance, richness=excess,
                                 py=py, px=px))
    if not rows:
        return pd.DataFrame(columns=["ra", "dec", "z", "significance", "richness"])
    cand = pd.DataFrame(rows).sort_values("significance", ascending=False).reset_index(drop=True)
    keep = []
    for r in cand.itertuples():
        if all(np.hypot(r.x - q.x, r.y - q.y) > MERGE_MPC * arcsec_per_mpc(q.z) for q in keep):
            keep.append(r)
    out = []
    for r in keep:
        z = r.z
        if 0 < r.k < len(model.z) - 1:  # parabola through the significance at the neighbouring redshifts
            s = [sig_by_z[j][r.py, r.px] for j in (r.k - 1, r.k, r.k + 1)]
            den = s[0] - 2 * s[1] + s[2]
            if den < 0:
                z = float(r.z + 0.5 * (s[0] - s[2]) / den * (model.z[1] - model.z[0]))
        ra, dec = plane.wcs_pix2world(r.x, r.y, 0)
        out.append(dict(ra=float(ra) % 360, dec=float(dec), z=z, significance=r.significance, richness=r.richness))
    return pd.DataFrame(out)
