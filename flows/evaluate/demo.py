"""The demo's figures of merit (`deepfield demo`) against the simulation's truth: completeness of the merged
catalog for primary truth galaxies and stars brighter than i = 24 matched within 1 arcsec, and the photometric
redshifts of the primary truth galaxies brighter than i = 24 matched within 0.5 arcsec."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from astropy.coordinates import SkyCoord

__all__ = ["demo_completeness", "demo_photoz"]


def demo_completeness(truth_path: Path, merge: dict, mag_limit: float = 24.0) -> dict:
    """Fraction of primary truth galaxies and stars brighter than mag_limit in i with a catalog
    source within 1 arcsec."""
    truth = pd.read_parquet(truth_path)
    t = truth[truth.is_primary & truth.kind.isin(["galaxy", "star", "bcg"]) & (truth.mag_i < mag_limit)]
    cat = pd.read_parquet(merge["paths"]["parquet"], columns=["ra", "dec"])
    if len(t) == 0 or len(cat) == 0:
        return dict(n=len(t), matched=0, fraction=0.0)
    _, sep, _ = SkyCoord(t.ra.values, t.dec.values, unit="deg").match_to_catalog_sky(
        SkyCoord(cat.ra.values, cat.dec.values, unit="deg"))
    matched = int(np.sum(sep.arcsec < 1.0))
    return dict(n=len(t), matched=matched, fraction=matched / len(t))



def demo_photoz(truth_path: Path, merge: dict, mag_limit: float = 24.0) -> dict | None:
    """sigma_NMAD, outlier fraction and bias (models.photoz_pdf.nmad_figures) of the catalog's z_phot for the primary
    truth galaxies brighter than mag_limit in i matched within 0.5 arcsec; None when the catalog has no z_phot
    (the photoz stage did not run)."""
    import pyarrow.dataset as ds

    from deepfield.models.photoz_pdf import nmad_figures
    path = merge["paths"]["parquet"]
    if "z_phot" not in ds.dataset(path, format="parquet").schema.names:
        return None
    truth = pd.read_parquet(truth_path)
    t = truth[truth.is_primary & truth.kind.isin(["galaxy", "bcg"]) & (truth.mag_i < mag_limit)]
    cat = pd.read_parquet(path, columns=["ra", "dec", "z_phot"])
    if len(t) == 0 or len(cat) == 0:
        return None
    idx, sep, _ = SkyCoord(t.ra.values, t.dec.values, unit="deg").match_to_catalog_sky(
        SkyCoord(cat.ra.values, cat.dec.values, unit="deg"))
    m = sep.arcsec < 0.5
    return nmad_figures(cat.z_phot.to_numpy(float)[idx[m]], t.z.to_numpy(float)[m])
