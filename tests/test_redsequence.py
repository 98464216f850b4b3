"""The red-sequence matched-filter cluster finder (the baseline of the image-based cluster finder) on mock
catalogs: the simulator's field galaxies and clusters with photometric errors of the survey's depth."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.coordinates import SkyCoord

from deepfield.flows.evaluate.baseline_redsequence import find_clusters
from deepfield.tasks.astro import arcsec_per_mpc, red_sequence_model
from deepfield.tasks.sim.clusters import sample_cluster
from deepfield.tasks.sim.config import DEFAULT_BANDS, SimConfig
from deepfield.tasks.sim.population import sample_field_galaxies

BANDS = ["g", "r", "i", "z"]


def mock_catalog(seed: int, clusters: list[tuple[float, float, float, float]], side: float = 16.0,
                 mag_limit: float = 24.5) -> pd.DataFrame:
    """A catalog of `side` arcmin square around (150, 2): field galaxies (tasks.sim.population) and clusters
    (dra, ddec in deg, z, richness; tasks.sim.clusters), magnitudes scattered by the error of each band's
    5-sigma depth, cut at i < mag_limit."""
    rng = np.random.default_rng(seed)
    bp = {b: DEFAULT_BANDS[b].bandpass for b in BANDS}
    half = side / 120.0

    def positions(n):
        return 150.0 + rng.uniform(-half, half, n) / np.cos(np.radians(2.0)), 2.0 + rng.uniform(-half, half, n)

    gals = sample_field_galaxies(rng, SimConfig(bands=BANDS), side * side, positions, 0, bp)
    for k, (dra, ddec, z, lam) in enumerate(clusters):
        gals += sample_cluster(rng, k + 1, 150.0 + dra, 2.0 + ddec, z, lam, 10_000_000 * (k + 1), bp, "i", 25.0)[1]
    rows = []
    for g in gals:
        r = dict(ra=g.ra, dec=g.dec)
        for b in BANDS:
            err = 0.2171 * 10 ** (0.4 * (g.mag[b] - DEFAULT_BANDS[b].m5))  # 1.0857 / (S/N), S/N = 5 at m5
            r[f"mag_auto_{b}"], r[f"magerr_auto_{b}"] = g.mag[b] + rng.normal(0, err), err
        rows.append(r)
    cat = pd.DataFrame(rows)
    return cat[cat.mag_auto_i < mag_limit].reset_index(drop=True)


def test_red_sequence_model_matches_the_simulated_cluster_colours():
    m = red_sequence_model(BANDS)
    assert m.colours.shape == (len(m.z), 3) and m.z[0] == pytest.approx(0.1)
    k = int(np.argmin(np.abs(m.z - 0.5)))
    bp = {b: DEFAULT_BANDS[b].bandpass for b in BANDS}
    _, members = sample_cluster(np.random.default_rng(0), 1, 150.0, 2.0, float(m.z[k]), 30, 100, bp, "i", 24.0)
    col = np.array([[g.mag[a] - g.mag[b] for a, b in zip(BANDS[:-1], BANDS[1:])] for g in members])
    np.testing.assert_allclose(np.median(col, axis=0), m.colours[k], atol=0.03)  # 0.04 mag member scatter


@pytest.mark.parametrize("seed, clusters", [
    (1, [(-0.05, -0.04, 0.3, 40), (0.04, 0.05, 0.5, 60), (0.05, -0.05, 0.7, 80)]),
    (2, [(0.0, 0.0, 0.4, 25), (0.06, 0.06, 0.9, 60), (-0.06, 0.05, 0.6, 30)]),
    (3, []),
])
def test_finds_the_clusters_and_nothing_else(seed, clusters):
    """Every cluster (richness 25-80, z 0.3-0.9) found once, within 0.3 Mpc, |dz| <= 0.05 (1 + z), and no
    detection that is not a cluster (none at all in the field without clusters)."""
    found = find_clusters(mock_catalog(seed, clusters))
    assert len(found) == len(clusters), found
    if not clusters:
        return
    pos = SkyCoord(found.ra.values, found.dec.values, unit="deg")
    for dra, ddec, z, _ in clusters:
        d = pos.separation(SkyCoord(150.0 + dra, 2.0 + ddec, unit="deg")).arcsec
        ok = (d < 0.3 * arcsec_per_mpc(z)) & (np.abs(found.z - z) <= 0.05 * (1 + z))
        assert ok.sum() == 1, (z, found.assign(sep=d))
    assert (found.richness > 3).all() and (found.significance > 5).all()
