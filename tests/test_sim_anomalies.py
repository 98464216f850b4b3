"""Behaviour of the simulator's astrophysical anomalies: ring galaxies and mergers."""
import json

import galsim
import numpy as np
import pytest

from deepfield.tasks.sim import anomalies as A
from deepfield.tasks.sim.sources import Galaxy

BANDPASSES = {"g": "LSST_g.dat", "r": "LSST_r.dat", "i": "LSST_i.dat"}
TRUTH_KEYS = set(Galaxy(id=0, ra=0, dec=0, mag={"i": 20}, bulge_frac={"i": 0.3}, hlr_disk=1,
                        hlr_bulge=0.3, q_disk=0.7, q_bulge=0.9, pa=0, z=0.1, sed="Sbc").truth())
PIX = 0.2
PSF = galsim.Moffat(beta=3.5, fwhm=0.75)


def _draw(src, band="i", n=121):
    return galsim.Convolve(src.profile(band, 27.0), PSF).drawImage(nx=n, ny=n, scale=PIX).array


def _radius_grid(n, x0=0.0, y0=0.0):
    c = (np.arange(n) - (n - 1) / 2) * PIX
    xx, yy = np.meshgrid(c, c)
    return np.hypot(xx - x0, yy - y0)


# ------------------------------------------------------------------ astrophysical anomalies

def test_ring_galaxy_has_central_dip():
    mag = {"i": 20.5}
    rg = A.RingGalaxy(id=7, ra=150.0, dec=2.0, ring_mag=mag, nucleus_mag={"i": 25.0}, ring_radius=2.0,
                      ring_width=0.2, q=1.0, pa=30.0, z=0.2, knot_angles=(10.0, 130.0, 250.0),
                      knot_fracs=(0.1, 0.1, 0.1), nucleus_dx=0.2)
    img = _draw(rg)
    r = _radius_grid(img.shape[0])
    assert img[r < 0.4].mean() < 0.3 * img[np.abs(r - 2.0) < 0.2].mean()
    assert img.sum() == pytest.approx(10 ** (-0.4 * (rg.mag["i"] - 27)), rel=0.01)
    t = rg.truth()
    assert set(t) == TRUTH_KEYS and t["kind"] == "ring_galaxy" and t["anomaly_id"] == 7
    at = rg.anomaly_truth()
    assert at["type"] == "ring_galaxy" and at["ring_radius"] == 2.0
    json.dumps(at)


def test_sampled_ring_galaxy_is_blue_ring_with_red_nucleus():
    rg = A.sample_ring_galaxy(np.random.default_rng(5), 11, 150.0, 2.0, BANDPASSES, "i")
    assert 19 <= rg.mag["i"] <= 23 and 0.05 <= rg.z <= 0.4 and 1 <= rg.ring_radius <= 3
    ring_gi = rg.ring_mag["g"] - rg.ring_mag["i"]
    assert rg.nucleus_mag["g"] - rg.nucleus_mag["i"] > ring_gi
    with pytest.raises(ValueError):
        A.sample_ring_galaxy(np.random.default_rng(5), 11, 150.0, 2.0, BANDPASSES, "y")


def test_merger_tails_beyond_3_arcsec():
    m = A.sample_merger(np.random.default_rng(6), 12, 150.0, 2.0, BANDPASSES, "i")
    assert 19 <= m.mag["i"] <= 23 and 3 <= m.tail_length <= 8 and m.kind == "merger"
    assert set(m.truth()) == TRUTH_KEYS and m.truth()["anomaly_id"] == 12
    n = 161
    full = _draw(m, n=n)
    nuclei = galsim.Add([m.gal1.profile("i", 27.0).shift(m.dx1, m.dy1),
                         m.gal2.profile("i", 27.0).shift(m.dx2, m.dy2)])
    gals = galsim.Convolve(nuclei, PSF).drawImage(nx=n, ny=n, scale=PIX).array
    far = (_radius_grid(n, m.dx1, m.dy1) > 3) & (_radius_grid(n, m.dx2, m.dy2) > 3)
    tail_flux = 10 ** (-0.4 * (m.tail_mag["i"] - 27))
    excess = (full - gals)[far].sum()
    assert excess > 0.3 * tail_flux
    assert excess > 1.0 * gals[far].sum()
    # both tails, not one: flux on each side of the line through the nuclei
    x, y, _, w = m.tail_points()
    far_pts = (np.hypot(x - m.dx1, y - m.dy1) > 3) & (np.hypot(x - m.dx2, y - m.dy2) > 3)
    side = np.sign((x - m.dx2) * (m.dy1 - m.dy2) - (y - m.dy2) * (m.dx1 - m.dx2))
    assert w[far_pts & (side > 0)].sum() > 0.05 and w[far_pts & (side < 0)].sum() > 0.05
    json.dumps(m.anomaly_truth())
