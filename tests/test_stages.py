"""Tests of the SEP-based tile stages (detect, measure, with the background before them) and the stage registry,
on synthetic tiles drawn with GalSim (tests/_tiles.py); the background stage's own tests are in
tests/test_background.py."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.coordinates import SkyCoord

from _tiles import BANDS, BOX, CORE, FWHM, SCALE, SIGMA, ZP, draw, field_wcs, galaxy, make_tile, point
from deepfield.tasks import maskbits
from deepfield.tasks.stages import DEFAULT_STAGES, STAGES, make_stage
from deepfield.tasks.stages.background import BackgroundStage
from deepfield.tasks.stages.base import Stage
from deepfield.tasks.stages.detect import DetectStage
from deepfield.tasks.stages.measure import MeasureStage
from deepfield.tasks.tiling import Box


def match(det: pd.DataFrame, xt, yt):
    """Index of and distance to the nearest detection (tile frame) of each truth position."""
    d = np.hypot(det["x_tile"].to_numpy()[None, :] - np.asarray(xt)[:, None],
                 det["y_tile"].to_numpy()[None, :] - np.asarray(yt)[:, None])
    return d.argmin(axis=1), d.min(axis=1)


def snr(flux, b=0):
    """Optimal S/N of a point source of `flux` in band b: flux / (sigma sqrt(4 pi s^2))."""
    s = FWHM / SCALE / 2.3548
    return flux / (SIGMA[b] * np.sqrt(4 * np.pi * s ** 2))


# a scene of isolated sources: bright stars, fainter stars, galaxies, one in the halo
SCENE = [
    point(50.3, 60.7, [20000, 30000, 25000]),
    point(100.6, 45.2, [8000, 9000, 10000]),
    point(110.1, 110.9, [40000, 50000, 45000]),
    point(70.8, 120.4, [1500, 2000, 2200]),
    point(130.2, 75.5, [600, 900, 1000]),
    galaxy(60.4, 95.1, [6000, 9000, 11000]),
    galaxy(95.7, 80.3, [3000, 4500, 5500], hlr=0.8, e1=-0.3, e2=0.1),
    point(15.4, 140.6, [10000, 12000, 11000]),  # in the halo (core starts at tile x = 32)
]
STARS_BRIGHT = [0, 1, 2]


def run_chain(tile, background=False, measure=None):
    stages = ([BackgroundStage()] if background else []) + [DetectStage(), measure or MeasureStage()]
    src = pd.DataFrame()
    for st in stages:
        src = st.run(tile, src)
    return src


@pytest.fixture(scope="module")
def scene():
    tile, _, _ = make_tile(SCENE, seed=1)
    # the scene's PSF is a Moffat of index 4.5 (tests/_tiles.py): the Gaussian apertures' normalisation takes it
    return tile, run_chain(tile, measure=MeasureStage(radii_fwhm=(1.0, 0.5, 2.0), radii_arcsec=(1.0, 2.0),
                                                      gaap_psf_beta=4.5))


def test_protocol_and_registry():
    for name in DEFAULT_STAGES:
        st = make_stage(name)
        assert isinstance(st, Stage) and st.name == name and isinstance(st.version, str)
        st.setup("cpu")
    assert set(STAGES) == {"anomaly", "background", "cluster", "deblend", "detect", "lens", "measure", "merger",
                           "photoz"}
    assert make_stage("detect", thresh=3.0).thresh == 3.0
    with pytest.raises(ValueError, match="known stages: anomaly, background, cluster, deblend, detect, lens, measure"):
        make_stage("no-such-stage")
    with pytest.raises(ValueError, match="stage .detect.: unknown parameter .nonsense."):
        make_stage("detect", nonsense=1)


def test_detection_positions_and_field_frame(scene):
    tile, det = scene
    assert {"x", "y", "x_tile", "y_tile", "a", "b", "theta", "npix", "det_flag", "blend_id", "n_blend",
            "is_blended", "is_primary"} <= set(det.columns)
    np.testing.assert_allclose(det["x"] - det["x_tile"], BOX.x0)
    np.testing.assert_allclose(det["y"] - det["y_tile"], BOX.y0)
    xt = np.array([s["x"] for s in SCENE])
    yt = np.array([s["y"] for s in SCENE])
    assert all(snr(s["flux"][0]) > 20 for s in SCENE)
    idx, dist = match(det, xt, yt)
    assert np.all(dist < 0.5), dist
    # field frame: truth field positions against the field-frame columns
    np.testing.assert_allclose(det["x"].to_numpy()[idx], xt + BOX.x0, atol=0.5)
    np.testing.assert_allclose(det["y"].to_numpy()[idx], yt + BOX.y0, atol=0.5)
    assert len(set(idx)) == len(SCENE)  # one detection per source
    assert not det["is_blended"].to_numpy()[idx].any()


def test_radec_matches_wcs(scene):
    tile, det = scene
    xt = np.array([s["x"] for s in SCENE]) + BOX.x0
    yt = np.array([s["y"] for s in SCENE]) + BOX.y0
    truth = field_wcs().pixel_to_world(xt, yt)
    idx, _ = match(det, xt - BOX.x0, yt - BOX.y0)
    got = SkyCoord(det["ra"].to_numpy()[idx], det["dec"].to_numpy()[idx], unit="deg")
    sep_as = got.separation(truth).arcsec
    bright = np.array([snr(s["flux"][0]) > 100 for s in SCENE])
    assert np.all(sep_as[bright] < 0.05), sep_as


def test_auto_mags_and_apertures(scene):
    tile, det = scene
    idx, _ = match(det, [SCENE[k]["x"] for k in STARS_BRIGHT], [SCENE[k]["y"] for k in STARS_BRIGHT])
    for b, band in enumerate(BANDS):
        truth = ZP[b] - 2.5 * np.log10([SCENE[k]["flux"][b] for k in STARS_BRIGHT])
        got = det[f"mag_auto_{band}"].to_numpy()[idx]
        assert np.all(np.abs(got - truth) < 0.05), (band, got - truth)
        # aperture fluxes grow with radius (pixels: 2, 4, 8 = 2 arcsec, and 1 arcsec = 4 px)
        f = [det[f"flux_{c}_{band}"].to_numpy()[idx] for c in ("aper", "aper_2fwhm", "aper_2as")]
        f_half = det[f"flux_aper_0p5fwhm_{band}"].to_numpy()[idx]
        assert np.all(f_half < f[0]) and np.all(f[0] < f[1])
        np.testing.assert_allclose(f[1], f[2])  # 2 FWHM = 2 arcsec here
        np.testing.assert_allclose(det[f"flux_aper_1as_{band}"].to_numpy()[idx], f[0])
        np.testing.assert_allclose(det[f"flux_auto_{band}"].to_numpy()[idx], f[1], rtol=0.03)
    assert {"ra", "dec", "kron_radius", "flag_edge", "flag_masked", "flag_saturated", "flag_blended",
            "mag_aper_g", "fluxerr_aper_g", "fluxerr_auto_g", "magerr_auto_g"} <= set(det.columns)
    assert not det[["flag_masked", "flag_saturated", "flag_edge"]].to_numpy().any()


def test_primary_core_vs_halo(scene):
    tile, det = scene
    idx, _ = match(det, [SCENE[-1]["x"], SCENE[0]["x"]], [SCENE[-1]["y"], SCENE[0]["y"]])
    assert not det["is_primary"].iloc[idx[0]]
    assert det["is_primary"].iloc[idx[1]]
    # the rule, exactly: floor(coord + 0.5) inside the core
    px, py = np.floor(det["x"] + 0.5), np.floor(det["y"] + 0.5)
    inside = (px >= CORE.x0) & (px < CORE.x1) & (py >= CORE.y0) & (py < CORE.y1)
    assert (det["is_primary"] == inside).all()


def star_in_60_noise_draws(masked_from: int | None = None) -> pd.DataFrame:
    """The catalog rows of one star (fluxes 3000, 4000, 5000) measured on 60 draws of the noise; `masked_from`:
    columns from this one on masked (BAD) in the first band."""
    truth = [point(40.2, 40.7, [3000, 4000, 5000])]
    clean = draw(truth, (80, 80))
    box, core = Box(500, 580, 700, 780), Box(510, 570, 710, 770)
    rows = []
    for seed in range(60):
        tile, _, _ = make_tile(truth, seed=seed, shape=(80, 80), box=box, core=core, noiseless=clean)
        if masked_from is not None:
            tile.mask[0, :, masked_from:] |= maskbits.BAD
        det = run_chain(tile)
        i, d = match(det, [40.2], [40.7])
        assert d[0] < 0.5
        rows.append(det.iloc[i[0]])
    return pd.DataFrame(rows)


def test_errors_match_scatter():
    res = star_in_60_noise_draws()
    for band in BANDS:
        scatter, err = res[f"flux_aper_{band}"].std(), res[f"fluxerr_aper_{band}"].median()
        assert 0.8 < scatter / err < 1.2, (band, scatter, err)
        # the Kron aperture itself varies with the noise (as in Source Extractor, FLUXERR_AUTO leaves
        # that out), so the AUTO scatter runs some 20-30% above its error
        scatter, err = res[f"flux_auto_{band}"].std(), res[f"fluxerr_auto_{band}"].median()
        assert 0.8 < scatter / err < 1.5, (band, scatter, err)
        # the aperture error is the noise summed over the aperture: sigma sqrt(pi r^2)
        r = FWHM / SCALE
        assert res[f"fluxerr_aper_{band}"].median() == pytest.approx(SIGMA[BANDS.index(band)] * np.sqrt(np.pi) * r, rel=0.02)


def test_errors_match_scatter_with_most_of_the_aperture_masked():
    """A star whose centre and the columns right of it are masked in the first band (a bad-column block, a
    coverage edge): SEP fills the masked pixels with the mean of the rest, scaling the sum up, and returned the
    error of the aperture unmasked, half or less of the scatter; now the errors of the circular and the Kron
    apertures are the scatter of those scaled sums."""
    res = star_in_60_noise_draws(masked_from=40)
    band = BANDS[0]
    assert ((res.phot_flag & 32) != 0).all()
    scatter, err = res[f"flux_aper_{band}"].std(), res[f"fluxerr_aper_{band}"].median()
    unmasked = SIGMA[0] * np.sqrt(np.pi) * FWHM / SCALE  # what SEP returned
    assert err > 1.2 * unmasked and 0.8 < scatter / err < 1.2, (scatter, err, unmasked)
    scatter, err = res[f"flux_auto_{band}"].std(), res[f"fluxerr_auto_{band}"].median()
    assert 0.8 < scatter / err < 1.5, (scatter, err)


def test_close_pair_is_deblended():
    sep_px = 1.5 * FWHM / SCALE
    truth = [point(60.0, 64.3, [20000] * 3), point(60.0 + sep_px, 64.3, [15000] * 3),
             point(30.0, 30.0, [10000] * 3)]
    tile, _, _ = make_tile(truth, seed=3, shape=(128, 128), box=Box(0, 128, 0, 128), core=Box(0, 128, 0, 128))
    det = run_chain(tile)
    idx, dist = match(det, [s["x"] for s in truth], [s["y"] for s in truth])
    assert len(set(idx)) == 3 and np.all(dist < 1.0), dist
    pair = det.iloc[idx[:2]]
    assert pair["is_blended"].all() and pair["flag_blended"].all()
    assert pair["blend_id"].nunique() == 1 and (pair["n_blend"] == 2).all()
    single = det.iloc[idx[2]]
    assert not single["is_blended"] and single["blend_id"] != pair["blend_id"].iloc[0]
    assert det["blend_id"].groupby(det["blend_id"]).size().max() == 2


def test_saturated_and_masked_flags():
    truth = [point(50.0, 50.0, [60000] * 3), point(110.0, 100.0, [8000] * 3)]
    tile, _, _ = make_tile(truth, seed=4)
    tile.mask[1, 49:52, 49:52] |= maskbits.SAT
    tile.mask[0, 100, 113] |= maskbits.BAD
    det = run_chain(tile)
    idx, dist = match(det, [50.0, 110.0], [50.0, 100.0])
    assert np.all(dist < 0.5)
    sat, other = det.iloc[idx[0]], det.iloc[idx[1]]
    assert sat["flag_saturated"] and sat["flag_masked"]
    assert not other["flag_saturated"] and other["flag_masked"]


def test_edge_flag_only_at_field_edges():
    # field corner tile: the halo box starts at the field origin (clipped) -> low sides are edges
    truth = [point(2.0, 60.0, [8000] * 3), point(60.0, 157.5, [8000] * 3), point(80.0, 80.0, [8000] * 3)]
    tile, _, _ = make_tile(truth, seed=5, box=Box(0, 160, 0, 160), core=Box(0, 128, 0, 128))
    det = run_chain(tile)
    idx, _ = match(det, [s["x"] for s in truth], [s["y"] for s in truth])
    # x = 2 touches the field's left edge; y = 157.5 touches the halo's top, not a field edge
    assert list(det["flag_edge"].iloc[idx]) == [True, False, False]


def test_kron_flux_leaves_out_a_neighbours_light():
    """A faint galaxy 16 px from a bright star: with the detect stage's segmentation masking (measure's default)
    its Kron flux is within 30 % of the truth in every band (what is left is the star's wing inside the galaxy's
    own segment); without it, the Kron ellipse takes in the star and the flux is many times the truth."""
    truth = [point(70.0, 80.0, [60000, 80000, 70000]), galaxy(86.0, 80.0, [1500, 2000, 2500], hlr=0.4)]
    errs = {}
    for masked in (True, False):
        e = []
        for seed in range(4):
            tile, _, _ = make_tile(truth, seed=seed)
            det = run_chain(tile, measure=MeasureStage(mask_neighbours=masked))
            (k,), (d,) = match(det, [86.0], [80.0])
            assert d < 1.0
            e.append([det[f"flux_auto_{band}"].to_numpy()[k] / truth[1]["flux"][b] - 1 for b, band in enumerate(BANDS)])
        errs[masked] = np.median(e, axis=0)
    assert np.all(np.abs(errs[True]) < 0.30), errs
    assert np.all(errs[False] > 5.0), errs


def test_measure_writes_gaussian_aperture_fluxes(scene):
    """The stage's flux_gaap_<b> of the scene's bright stars (Moffat PSF of index 4.5, the same FWHM in every
    band): the Gaussian-weighted sum, with sigma_b = sqrt(sigma_g^2 - sigma_psf^2), sigma_g = 1.5 PSF sigmas, of
    each star drawn alone without noise, divided by the weight's response to a unit point source under that
    Moffat PSF integrated over the pixels (point_response, from moffat_weight, checked here against a numerical
    integral), within 1 %: a point source's total flux, within 2 %, and so the truth's colours."""
    from scipy.integrate import quad

    from deepfield.tasks.stages.measure import PIXEL_VAR, gaussian_aperture, moffat_weight, point_response
    tile, src = scene
    idx, d = match(src, [SCENE[i]["x"] for i in STARS_BRIGHT], [SCENE[i]["y"] for i in STARS_BRIGHT])
    assert (d < 1).all()
    fwhm = FWHM / SCALE
    sig_p = fwhm / 2.3548
    sig_g = 1.5 * sig_p
    sig_b = np.sqrt(sig_g ** 2 - sig_p ** 2)
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / 4.5) - 1))
    by_hand = quad(lambda r: 3.5 / (np.pi * alpha ** 2) * (1 + (r / alpha) ** 2) ** -4.5
                   * np.exp(-r ** 2 / (2 * sig_b ** 2)) * 2 * np.pi * r, 0, np.inf)[0]
    assert moffat_weight(fwhm, sig_b, 4.5) == pytest.approx(by_hand, rel=1e-6)
    var = sig_b ** 2 + PIXEL_VAR
    norm = point_response(fwhm, sig_b, 4.5)
    assert norm == pytest.approx(sig_b ** 2 / var * moffat_weight(fwhm, np.sqrt(var), 4.5), rel=1e-9)
    for k, i in zip(idx, STARS_BRIGHT):
        f = np.array([src[f"flux_gaap_{b}"].iloc[k] for b in BANDS])
        alone = draw([SCENE[i]])
        x, y = src.x_tile.iloc[k], src.y_tile.iloc[k]
        ok = np.zeros(alone.shape[1:], bool)
        expect = np.array([gaussian_aperture(alone[b].astype(float), np.ones(ok.shape), ok, np.array([x]),
                                             np.array([y]), sig_b)[0][0] for b in range(len(BANDS))]) / norm
        true = np.array(SCENE[i]["flux"], float)
        assert f == pytest.approx(expect, rel=0.01)
        assert f == pytest.approx(true, rel=0.02)
        assert all(src[f"fluxerr_gaap_{b}"].iloc[k] > 0 for b in BANDS)
    with pytest.raises(ValueError, match="gaap_sigma_psf"):
        MeasureStage(gaap_sigma_psf=(0.9,))


def test_the_catalog_does_not_depend_on_the_bands_units():
    """Band g stored in units 100 times smaller (zero point 5 mag fainter: the image times 100, the inverse
    variance over 10^4) and band i in units 10 times larger: the same sources, positions and AB magnitudes, Kron
    and deblended, as a survey must give whatever units its bands come in. The detection image had weighed each
    band in its own unit, g then 100 times more than r, and its detections and apertures followed g alone; the
    deblender's templates had weighed the members' brightness by their light summed in the bands' own units."""
    import copy

    from deepfield.tasks.stages.deblend import DeblendStage
    # the scene and a blend of a blue and a red galaxy, which the deblender's templates share
    scene = SCENE + [galaxy(120.0, 138.0, [9000, 5000, 2000], hlr=0.5), galaxy(131.0, 141.0, [1500, 4000, 9000], hlr=0.5)]
    tile, _, _ = make_tile(scene, seed=1)
    other = copy.deepcopy(tile)
    for b, k in ((0, 100.0), (2, 0.1)):
        other.image[b] *= np.float32(k)
        other.invvar[b] /= np.float32(k * k)
        other.zeropoints[b] += 2.5 * np.log10(k)
    deblend = DeblendStage()
    deblend.setup("cpu")
    a, b = (deblend.run(t, run_chain(t)) for t in (tile, other))
    assert len(a) == len(b) == len(scene) and (a["n_blend"] == 2).sum() == 2
    assert np.allclose(a["x"], b["x"], atol=1e-3) and np.allclose(a["y"], b["y"], atol=1e-3)
    for band in BANDS:
        assert np.allclose(a[f"mag_auto_{band}"], b[f"mag_auto_{band}"], atol=2e-4), band
        assert np.allclose(a[f"mag_deblend_{band}"], b[f"mag_deblend_{band}"], atol=2e-4), band
