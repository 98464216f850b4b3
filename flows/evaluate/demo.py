"""The demo's figure of merit (`deepfield demo`): completeness of the merged catalog against the simulation's
truth, for primary truth galaxies and stars brighter than i = 24 matched within 1 arcsec."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from astropy.coordinates import SkyCoord

__all__ = ["demo_completeness"]


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

