"""Galaxy-galaxy strong lenses (tasks/sim/lensing.py)."""
from __future__ import annotations

import dataclasses

import galsim
import numpy as np
import pytest
from astropy.cosmology import Planck18

from deepfield.tasks.sim import lensing
from deepfield.tasks.sim.sources import mag_to_flux

BANDS = {"g": "LSST_g.dat", "i": "LSST_i.dat"}
ZP = 27.0


def make_params(**kw) -> lensing.LensParams:
    base = dict(lens_id=7, ra=150.0, dec=2.0, z_d=0.5, z_s=2.0, sigma_v=280.0, theta_e=1.5, q=1.0,
                pa=0.0, gamma_ext=0.0, phi_ext=0.0, beta_x=0.0, beta_y=0.0, src_hlr=0.2, src_n=1.0,
                src_q=1.0, src_pa=0.0, src_sed="Im", src_mag={"g": 23.5, "i": 23.2},
                defl_mag={"g": 21.0, "i": 19.2}, defl_hlr=1.0, defl_q=0.9)
    base.update(kw)
    return lensing.LensParams(**base)


def test_sampled_theta_e_matches_sis_formula():
    rng = np.random.default_rng(3)
    for k in range(3):
        p = lensing.sample_lens(rng, k, 150.0, 2.0, (0.8, 3.0), BANDS, "i")
        assert 0.8 <= p.theta_e <= 3.0
        assert 0.2 <= p.z_d <= 0.8 and p.z_s >= p.z_d + 0.3 and 200 <= p.sigma_v <= 380
        # flat cosmology: D_ds = (D_M(z_s) - D_M(z_d)) / (1 + z_s)
        dm_d = Planck18.comoving_transverse_distance(p.z_d).value
        dm_s = Planck18.comoving_transverse_distance(p.z_s).value
        ratio = (dm_s - dm_d) / dm_s
        theta = 4 * np.pi * (p.sigma_v / 299792.458) ** 2 * ratio * 206264.806
        assert p.theta_e == pytest.approx(theta, rel=1e-6)
        assert set(p.src_mag) == set(p.defl_mag) == set(BANDS)
        assert p.defl_mag["g"] > p.defl_mag["i"] + 1.0  # red deflector
        assert np.hypot(p.beta_x, p.beta_y) <= 0.5 * p.theta_e


def test_sample_lens_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="theta_e"):
        lensing.sample_lens(rng, 0, 0.0, 0.0, (10.0, 20.0), BANDS, "i")
    with pytest.raises(ValueError, match="ref_band"):
        lensing.sample_lens(rng, 0, 0.0, 0.0, (0.8, 3.0), BANDS, "r")


def test_deterministic():
    a = lensing.sample_lens(np.random.default_rng(11), 1, 150.0, 2.0, (0.8, 3.0), BANDS, "i")
    b = lensing.sample_lens(np.random.default_rng(11), 1, 150.0, 2.0, (0.8, 3.0), BANDS, "i")
    c = lensing.sample_lens(np.random.default_rng(12), 1, 150.0, 2.0, (0.8, 3.0), BANDS, "i")
    assert a == b
    assert a != c


def test_einstein_ring_for_aligned_source():
    p = make_params()
    scale = 0.05
    size = lensing.grid_size(p, scale)
    surface, mu = lensing.lensed_source_surface(p, scale, size)
    assert surface.shape == (size, size)
    assert surface.sum() == pytest.approx(mu)
    assert mu > 5
    c = (np.arange(size) - (size - 1) / 2) * scale
    x, y = np.meshgrid(c, c)
    r = np.hypot(x, y)
    edges = np.arange(0, r.max(), scale)
    idx = np.digitize(r.ravel(), edges)
    prof = np.bincount(idx, surface.ravel(), minlength=len(edges) + 1)
    cnt = np.bincount(idx, minlength=len(edges) + 1)
    good = cnt > 0
    centres = np.append(edges, edges[-1] + scale) - scale / 2
    r_peak = centres[good][np.argmax(prof[good] / cnt[good])]
    assert abs(r_peak - p.theta_e) <= 2 * scale
    # ring: azimuthally uniform around theta_e (8 sectors of the annulus hold equal flux)
    in_ring = np.abs(r - p.theta_e) < 0.5
    sector = ((np.arctan2(y, x) + np.pi) / (np.pi / 4)).astype(int) % 8
    sectors = np.bincount(sector[in_ring], surface[in_ring], minlength=8)
    assert sectors.min() > 0.95 * sectors.max()
    assert surface[r < 0.3 * p.theta_e].sum() < 0.01 * mu  # no central image


def test_sis_magnification_matches_point_source_value():
    # SIS, compact source at beta = theta_e/2: images at 1.5, 0.5 theta_e; mu = 2 theta_e/beta = 4
    p = make_params(beta_x=0.75, src_hlr=0.05)
    scale = 0.025
    _, mu = lensing.lensed_source_surface(p, scale, lensing.grid_size(p, scale))
    assert mu == pytest.approx(4.0, rel=0.03)


def test_offset_source_multiple_images_and_flux():
    p = make_params(q=0.8, pa=30.0, gamma_ext=0.04, phi_ext=100.0, beta_x=0.45, beta_y=-0.1,
                    src_hlr=0.15, src_q=0.6, src_pa=45.0)
    system = lensing.LensSystem(id=p.lens_id, params=p, pixel_scale=0.2)
    truth = system.lens_truth()
    assert truth["n_images"] in (2, 4)
    mu = truth["magnification"]
    assert mu > 1
    lensed = system.arc_profile("i", ZP).drawImage(nx=200, ny=200, scale=0.05, method="no_pixel")
    assert lensed.array.sum() == pytest.approx(mag_to_flux(p.src_mag["i"], ZP) * mu, rel=0.01)
    assert system.arc_mags()["i"] == pytest.approx(p.src_mag["i"] - 2.5 * np.log10(mu))
    assert truth["mag_arc_g"] == pytest.approx(system.arc_mags()["g"])
    assert truth["mag_src_i"] == p.src_mag["i"] and truth["mag_defl_g"] == p.defl_mag["g"]
    # source-protocol truth columns match Galaxy.truth()
    t = system.truth()
    assert t["kind"] == "lens" and t["lens_id"] == 7 and t["z"] == p.z_d and t["sed"] == "E"
    assert set(t) == {"id", "kind", "ra", "dec", "z", "sed", "hlr", "hlr_disk", "hlr_bulge", "q",
                      "pa", "n_bulge", "cluster_id", "lens_id", "pair_id", "anomaly_id"}
    assert system.size == pytest.approx(p.theta_e + p.src_hlr)
    assert system.mag["i"] < min(p.defl_mag["i"], system.arc_mags()["i"])


@pytest.mark.parametrize("beta, n_img", [((0.45, -0.1), 2), ((0.05, -0.05), 4)])
def test_compact_source_matches_point_magnification(beta, n_img):
    p = make_params(q=0.8, pa=30.0, gamma_ext=0.04, phi_ext=100.0, beta_x=beta[0], beta_y=beta[1],
                    src_hlr=0.04)
    x, y = lensing.image_positions(p)
    assert len(x) == n_img
    lens, kw, _, _ = lensing.lenstronomy_models(p)
    mu_pt = np.abs(lens.magnification(x, y, kw)).sum()
    _, mu = lensing.lensed_source_surface(p, 0.02, lensing.grid_size(p, 0.02))
    assert mu == pytest.approx(mu_pt, rel=0.1)


def test_stamp_has_arcs():
    p = make_params(q=0.8, pa=60.0, beta_x=0.2, beta_y=0.1)
    psf = galsim.Moffat(beta=3.5, fwhm=0.7)
    n, pix = 41, 0.2
    full = lensing.render_lens_stamp(p, "g", ZP, psf, n, pix)
    defl = lensing.render_lens_stamp(p, "g", ZP, psf, n, pix, include_source=False)
    arcs = lensing.render_lens_stamp(p, "g", ZP, psf, n, pix, include_deflector=False)
    assert full.shape == (n, n)
    np.testing.assert_allclose(full, defl + arcs, rtol=1e-6, atol=1e-6 * full.max())
    c = (np.arange(n) - (n - 1) / 2) * pix
    x, y = np.meshgrid(c, c)
    annulus = np.abs(np.hypot(x, y) - p.theta_e) < 0.6
    arc_flux = mag_to_flux(p.src_mag["g"], ZP) * lensing.LensSystem(7, p, pix).magnification
    excess = full[annulus].sum() - defl[annulus].sum()
    assert excess > 0.5 * arc_flux
    assert arcs.sum() == pytest.approx(arc_flux, rel=0.02)


def test_bad_inputs():
    with pytest.raises(ValueError):
        lensing.lensed_source_surface(make_params(theta_e=-1.0), 0.05, 101)
    with pytest.raises(ValueError):
        lensing.lensed_source_surface(make_params(), 0.0, 101)
    with pytest.raises(ValueError, match="band"):
        lensing.LensSystem(1, make_params(), 0.2).profile("z", ZP)
    assert dataclasses.is_dataclass(lensing.LensSystem)


def _moments(surface, scale):
    n = surface.shape[0]
    c = (np.arange(n) - (n - 1) / 2) * scale
    x, y = np.meshgrid(c, c)
    w = surface / surface.sum()
    return (w * x * x).sum(), (w * y * y).sum(), (w * x * y).sum()


def test_angle_conventions_east_of_north():
    # SIE mass major axis along pa: pa=0 extends the convergence north (+y), pa=90 east (-x)
    for pa, major, minor in [(0.0, (0.0, 1.0), (1.0, 0.0)), (90.0, (-1.0, 0.0), (0.0, 1.0))]:
        lens, kw, _, _ = lensing.lenstronomy_models(make_params(q=0.6, pa=pa))
        assert lens.kappa(*major, kw) > 1.5 * lens.kappa(*minor, kw)
    lens, kw, _, _ = lensing.lenstronomy_models(make_params(q=0.6, pa=45.0))
    assert lens.kappa(-1.0, 1.0, kw) > 1.5 * lens.kappa(1.0, 1.0, kw)
    # nearly unlensed source with pa=45 points north-east: east is -x, so <xy> < 0
    p = make_params(theta_e=1e-4, src_q=0.4, src_pa=45.0, src_hlr=0.3)
    xx, yy, xy = _moments(lensing.lensed_source_surface(p, 0.05, 101)[0], 0.05)
    assert xy < -0.3 * xx
