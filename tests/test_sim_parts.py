"""Unit tests of the simulator's parts against hand-computed or analytic truth."""
from __future__ import annotations

import galsim
import numpy as np
import pytest
from pydantic import ValidationError

from deepfield.tasks import astro
from deepfield.tasks.sim import clusters
from deepfield.tasks.sim.config import SimConfig
from deepfield.tasks.sim.layout import survey_layout
from deepfield.tasks.sim.noise import add_noise, noise_spec, saturate
from deepfield.tasks.sim.population import sample_power_law_mags
from deepfield.tasks.sim.psf import PSFSpec, noise_equivalent_area
from deepfield.tasks.sim.truth import blend_groups


def test_red_sequence_reddens_with_redshift():
    g_r = [float(astro.colour("E", z, "LSST_g.dat", "LSST_r.dat")) for z in (0.1, 0.3)]
    r_i = [float(astro.colour("E", z, "LSST_r.dat", "LSST_i.dat")) for z in (0.3, 0.7)]
    assert 0.7 < g_r[0] < 1.1  # SDSS red sequence at z ~ 0.1: g - r ~ 0.9-1.0
    assert g_r[1] > g_r[0] + 0.3  # the 4000 A break leaves g
    assert r_i[1] > r_i[0] + 0.3  # and then r
    blue = float(astro.colour("Im", 0.3, "LSST_g.dat", "LSST_r.dat"))
    assert blue < g_r[1] - 0.5


def test_k_correction_vanishes_at_zero_redshift():
    assert abs(float(astro.k_correction("E", 0.0, "LSST_i.dat"))) < 1e-9
    # apparent magnitude grows with distance: m*(0.6) fainter than m*(0.3)
    assert astro.m_star(0.6, "LSST_i.dat") > astro.m_star(0.3, "LSST_i.dat") + 1.0


def test_power_law_magnitudes_have_the_requested_slope():
    rng = np.random.default_rng(1)
    m = sample_power_law_mags(rng, 200000, 0.31, 18.0, 26.0)
    counts, edges = np.histogram(m, np.arange(18.0, 26.01, 0.5))
    slope = np.polyfit(0.5 * (edges[1:] + edges[:-1]), np.log10(counts), 1)[0]
    assert slope == pytest.approx(0.31, abs=0.01)


def test_noise_meets_the_five_sigma_depth():
    """A point source at m5 measured with the optimal (PSF-weighted) estimator has S/N = 5."""
    psf = PSFSpec(fwhm=0.7, beta=3.5)
    nea = noise_equivalent_area(psf, 0.2)
    spec = noise_spec(m5=25.0, sky_mag=20.5, zeropoint=27.0, pixel_scale=0.2, nea_pix=nea)
    p = psf.image(65, 0.2)
    flux = 10 ** (-0.4 * (25.0 - 27.0))
    rng = np.random.default_rng(2)
    estimates = []
    for _ in range(400):
        img, ivar = add_noise((flux * p).astype(np.float32), spec, np.ones_like(p, np.float32), rng)
        estimates.append(np.sum(img * p) / np.sum(p * p))
    snr = flux / np.std(estimates)
    assert snr == pytest.approx(5.0, rel=0.1)
    assert ivar.mean() == pytest.approx(1 / spec.sigma**2)


def test_saturation_conserves_charge_along_columns():
    model = np.zeros((200, 50), np.float32)
    model[100, 25] = 1000.0  # 10 full wells of 100 in one pixel
    sat, bleed = saturate(model, 100.0)
    assert sat.sum() == 1 and sat[100, 25]
    assert bleed[:, 25].sum() == 9  # the excess (900) fills 9 more wells along the column
    assert not bleed[:, :25].any() and not bleed[:, 26:].any()


def test_cluster_profile_and_richness():
    rng = np.random.default_rng(3)
    bps = {"g": "LSST_g.dat", "r": "LSST_r.dat", "i": "LSST_i.dat"}
    params, members = clusters.sample_cluster(rng, 1, 150.0, 2.0, 0.4, 60.0, 1000, bps, "i", 26.0)
    assert members[0].kind == "bcg" and members[0].mag["i"] < params.m_star
    assert all(m.cluster_id == 1 and m.z == 0.4 for m in members)
    sep = np.array([np.hypot((m.ra - params.ra) * np.cos(np.radians(2.0)), m.dec - params.dec) * 3600
                    for m in members])
    R = params.r_lambda_arcsec
    assert sep.max() <= R * 1.01
    inner = (sep < 0.2 * R).sum() / (np.pi * (0.2 * R) ** 2)
    outer = ((sep > 0.5 * R) & (sep < R)).sum() / (np.pi * (R**2 - (0.5 * R) ** 2))
    assert inner > 5 * outer  # projected NFW: steeply falling
    bright = sum(m.mag["i"] < params.m_star + 1.75 for m in members)
    assert params.richness == bright  # every member lies within R_lambda
    assert abs(params.richness - 60) < 4 * np.sqrt(60)


def test_blend_groups_from_hand_geometry():
    x = np.array([0.0, 3.0, 20.0, 5.5, 100.0])
    y = np.zeros(5)
    r = np.array([2.0, 2.0, 2.0, 1.0, 2.0])
    ids = np.array([10, 11, 12, 13, 14])
    bid, n = blend_groups(x, y, r, ids)
    # 0-1 overlap (3 < 4), 1-3 overlap (2.5 < 3), 3-2 do not (14.5 > 3), 4 alone
    assert list(bid) == [10, 10, 12, 10, 14]
    assert list(n) == [3, 3, 1, 3, 1]


def test_neighbouring_fields_overlap_by_the_configured_margin():
    cfg = SimConfig(size=1000, fields=4, overlap=30.0, pixel_scale=0.2)
    lay = survey_layout(cfg)
    w0 = lay[0].wcs()
    for k in (1, 2):  # east and north neighbours
        x, y = w0.all_world2pix(lay[k].ra, lay[k].dec, 0)
        step = np.hypot(x - (cfg.size - 1) / 2, y - (cfg.size - 1) / 2) * cfg.pixel_scale
        assert step == pytest.approx(cfg.size * cfg.pixel_scale - cfg.overlap, abs=0.05)
    assert lay[1].ra > lay[0].ra and lay[2].dec > lay[0].dec


def test_config_rejects_bad_input():
    with pytest.raises(ValidationError, match="duplicate"):
        SimConfig(bands=["g", "g"])
    with pytest.raises(ValidationError, match="band_specs"):
        SimConfig(bands=["g", "q"])
    with pytest.raises(ValidationError, match="overlap"):
        SimConfig(size=100, fields=2, overlap=15.0)
    with pytest.raises(ValidationError):
        SimConfig(population={"not_a_key": 1})


def test_render_stamp_matches_galsim_flux():
    from deepfield.tasks.sim.render import Placed, render_sources
    from deepfield.tasks.sim.sources import Galaxy
    g = Galaxy(id=1, ra=0, dec=0, mag={"i": 20.0}, bulge_frac={"i": 0.3}, hlr_disk=0.8, hlr_bulge=0.3,
               q_disk=0.5, q_bulge=0.8, pa=30.0, z=0.3, sed="Sbc")
    img, stamps = render_sources([Placed(g, 64.3, 60.7)], "i", 27.0, (128, 128),
                                 galsim.Moffat(beta=3.5, fwhm=0.7), 0.7, 3.5, 0.2, 0.1, keep_stamps=True)
    assert img.sum() == pytest.approx(10 ** (-0.4 * (20 - 27)), rel=0.01)
    yy, xx = np.mgrid[0:128, 0:128]
    assert np.sum(xx * img) / img.sum() == pytest.approx(64.3, abs=0.02)
    assert np.sum(yy * img) / img.sum() == pytest.approx(60.7, abs=0.02)
    # position angle east of north: pa = 30 deg tilts the major axis from +y towards -x (east)
    cxy = np.sum((xx - 64.3) * (yy - 60.7) * img)
    assert cxy < 0
