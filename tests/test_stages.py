"""Tests of the SEP-based tile stages (background, detect, measure) and the stage registry, on
synthetic tiles drawn with GalSim: known positions, fluxes, noise, zero points and a TAN WCS, over a
halo box offset from the field origin so that the field-frame offset matters."""
from __future__ import annotations

import galsim
import numpy as np
import pandas as pd
import pytest
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS

from deepfield.tasks import maskbits
from deepfield.tasks.stages import DEFAULT_STAGES, STAGES, make_stage
from deepfield.tasks.stages.background import BackgroundStage
from deepfield.tasks.stages.base import Stage
from deepfield.tasks.stages.detect import DetectStage
from deepfield.tasks.stages.measure import MeasureStage
from deepfield.tasks.tiling import Box, TileId
from deepfield.tasks.zarr_store import Tile

SCALE = 0.25  # arcsec / pixel
FWHM = 1.0  # arcsec, every band -> 4 px
BANDS = ["g", "r", "i"]
ZP = [30.0, 30.5, 29.5]
SIGMA = np.array([1.0, 1.5, 2.0])  # pixel noise per band, image units
BOX = Box(200, 360, 300, 460)  # halo box in the field, 160 x 160
CORE = Box(232, 328, 332, 428)  # 32 px halo on each side


def field_wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [512.0, 480.0]
    w.wcs.cdelt = [-SCALE / 3600.0, SCALE / 3600.0]
    w.wcs.radesys = "ICRS"
    return w


def psf() -> galsim.GSObject:
    return galsim.Moffat(beta=4.5, fwhm=FWHM)


def point(x, y, flux):
    """A point source at tile-frame (x, y) pixels with total flux per band (list)."""
    return dict(kind="star", x=x, y=y, flux=list(flux))


def galaxy(x, y, flux, hlr=0.5, e1=0.2, e2=-0.1):
    return dict(kind="gal", x=x, y=y, flux=list(flux), hlr=hlr, e1=e1, e2=e2)


def draw(truth, shape=BOX.shape, sky=None) -> np.ndarray:
    """(band, y, x) float32 noiseless image of the truth list (tile-frame positions)."""
    ny, nx = shape
    out = np.zeros((len(BANDS), ny, nx), dtype=np.float32)
    for b in range(len(BANDS)):
        im = galsim.ImageF(nx, ny, xmin=0, ymin=0, scale=SCALE)
        for s in truth:
            if s["kind"] == "star":
                prof = psf()
            else:
                prof = galsim.Convolve(galsim.Exponential(half_light_radius=s["hlr"]).shear(e1=s["e1"], e2=s["e2"]), psf())
            prof = prof.withFlux(s["flux"][b])
            prof.drawImage(image=im, center=galsim.PositionD(s["x"], s["y"]), add_to_image=True)
        out[b] = im.array
        if sky is not None:
            out[b] += sky[b]
    return out


def make_tile(truth, seed=0, shape=BOX.shape, box=BOX, core=CORE, sky=None, noiseless=None):
    """A Tile with Gaussian noise of SIGMA per band; returns (tile, noise-free image, noise)."""
    rng = np.random.default_rng(seed)
    clean = draw(truth, shape, sky) if noiseless is None else noiseless
    noise = (rng.standard_normal(clean.shape) * SIGMA[:, None, None]).astype(np.float32)
    invvar = np.broadcast_to((1.0 / SIGMA ** 2)[:, None, None], clean.shape).astype(np.float32).copy()
    tile = Tile(id=TileId("test", 1, 1), bands=list(BANDS), image=clean + noise, invvar=invvar,
                mask=np.zeros(clean.shape, dtype=np.uint16), box=box, core=core,
                wcs=field_wcs().slice(box.slices), zeropoints=list(ZP), psf_fwhm=[FWHM] * len(BANDS),
                pixel_scale=SCALE)
    return tile, clean, noise


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
    return tile, run_chain(tile, measure=MeasureStage(radii_fwhm=(1.0, 0.5, 2.0), radii_arcsec=(1.0, 2.0)))


def test_protocol_and_registry():
    for name in DEFAULT_STAGES:
        st = make_stage(name)
        assert isinstance(st, Stage) and st.name == name and isinstance(st.version, str)
        st.setup("cpu")
    assert set(STAGES) == {"anomaly", "background", "cluster", "deblend", "detect", "lens", "measure", "photoz"}
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


def test_errors_match_scatter():
    truth = [point(40.2, 40.7, [3000, 4000, 5000])]
    clean = draw(truth, (80, 80))
    box, core = Box(500, 580, 700, 780), Box(510, 570, 710, 770)
    rows = []
    for seed in range(60):
        tile, _, _ = make_tile(truth, seed=seed, shape=(80, 80), box=box, core=core, noiseless=clean)
        det = run_chain(tile)
        i, d = match(det, [40.2], [40.7])
        assert d[0] < 0.5
        rows.append(det.iloc[i[0]])
    res = pd.DataFrame(rows)
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


def test_background_removes_sky():
    ny = nx = 256
    yy, xx = np.mgrid[0:ny, 0:nx]
    sky = [50.0 + 0.02 * xx + 0.01 * yy, 80.0 - 0.015 * xx + 0.02 * yy, 20.0 + 0.02 * (xx + yy)]
    truth = [point(40.0 + 45 * k % 200, 30.0 + 37 * k % 190, [3000] * 3) for k in range(8)]
    box = Box(1000, 1256, 2000, 2256)
    tile, clean, noise = make_tile(truth, seed=6, shape=(ny, nx), box=box, core=Box(1032, 1224, 2032, 2224), sky=sky)
    stage = BackgroundStage()
    before = tile.image.copy()
    out = stage.run(tile, pd.DataFrame({"x": [1.0]}))
    assert list(out["x"]) == [1.0]
    assert not np.array_equal(before, tile.image)
    for b, band in enumerate(BANDS):
        resid = tile.image[b] - (clean[b] - sky[b] + noise[b])  # = true sky - estimated sky
        # the sky spans several sigma over the tile; what is left is the noise of the 64-px mesh
        # estimates (about 0.04 sigma rms, up to ~0.13 sigma at single pixels)
        assert np.sqrt(np.mean(resid ** 2)) < 0.1 * SIGMA[b] and abs(resid.mean()) < 0.03 * SIGMA[b], band
        assert np.ptp(sky[b]) > 3 * SIGMA[b]
        assert stage.last_stats[band]["rms"] == pytest.approx(SIGMA[b], rel=0.1)  # gradient within a mesh adds a little


def _stepped_tile(steps, seed=11, n=640):
    """A (n, n) tile (a 512 px core with its halo) of three bands with smooth skies, sources, noise and a bad
    column, plus sharp sky steps `steps`: (band, axis, at, height in sky sigma, drift along the step in sky
    sigma); returns (tile, true sky of each band, noise-free sources)."""
    yy, xx = np.mgrid[0:n, 0:n]
    smooth = [50.0 + 0.01 * xx + 0.006 * yy, 80.0 - 0.008 * xx + 0.01 * yy, 20.0 + 0.01 * (xx + yy)]
    sky = [s.copy() for s in smooth]
    for b, axis, at, h, drift in steps:
        along = (yy if axis == 0 else xx) / (n - 1) - 0.5
        beyond = (xx >= at) if axis == 0 else (yy >= at)
        sky[b] += beyond * (h + drift * along) * SIGMA[b]
    rng = np.random.default_rng(seed)
    truth = [point(rng.uniform(10, n - 10), rng.uniform(10, n - 10), [rng.uniform(500, 20000)] * 3)
             for _ in range(80)] + [galaxy(float(n / 2 + 3), 150.0, [30000] * 3, hlr=2.0)]
    box = Box(1000, 1000 + n, 2000, 2000 + n)
    tile, clean, _ = make_tile(truth, seed=seed, shape=(n, n), box=box, core=Box(1064, 936 + n, 2064, 1936 + n),
                               sky=sky)
    tile.mask[:, :, 100] |= maskbits.BAD  # a bad column, garbage under its mask
    tile.image[:, :, 100] = 1e4
    tile.invvar[:, :, 100] = 0
    return tile, sky, clean - np.stack(sky)


def test_sky_steps_are_found_and_taken_out():
    """Sharp steps of the sky (an amplifier's offset: 1.2 to 3 sky sigma, drifting along its length) across the
    columns and the rows are found where they are, with their heights, and taken out: beside each step, where a
    smooth model leaves the step's half (up to 1.5 sigma) over a few meshes, what is left of the sky is within
    0.15 sigma; a band without steps (and a tile whose steps are off) is the plain smooth model's, to the bit."""
    cases = [(0, 0, 180, 3.0, 0.4), (1, 0, 75, -1.2, 0.0), (1, 1, 230, 1.5, -0.3)]
    tile, sky, sources = _stepped_tile(cases)
    plain, _, _ = _stepped_tile(cases)
    stage = BackgroundStage()
    stage.run(tile, pd.DataFrame())
    assert tile.meta["counts"] == {"sky_steps": 3}  # for the ledger (tasks/tile_runner.py)
    BackgroundStage(steps=False).run(plain, pd.DataFrame())
    assert "counts" not in plain.meta
    for b, band in enumerate(BANDS):
        want = sorted(("x" if axis == 0 else "y", at + (2000 if axis == 0 else 1000), h)
                      for bb, axis, at, h, _ in cases if bb == b)
        got = stage.last_stats[band].get("steps", [])
        assert [(s["axis"], s["at"]) for s in got] == [(a, at) for a, at, _ in want], (band, got)
        for s, (_, _, h) in zip(got, want):
            # the recorded height (from the lines' medians over every 8th pixel) is within 0.35 sigma over seeds
            # 11-22 of this crowded tile, 0.1 as a rule; what the correction leaves is checked below
            assert s["jump"] == pytest.approx(h * SIGMA[b], abs=0.4 * SIGMA[b])
        left = tile.image[b] - sources[b]  # the true sky less the estimate (with the noise)
        near = np.zeros(left.shape, bool)
        for bb, axis, at, _, _ in cases:
            if bb == b:
                if axis == 0:
                    near[:, at - 8:at + 8] = True
                else:
                    near[at - 8:at + 8, :] = True
        near[:, 95:106] = False
        usable = tile.mask[b] == 0
        if near.any():
            # the noise's mean over these thousands of pixels is ~0.01 sigma; the smooth model alone leaves the
            # step's half beside it
            assert abs(np.mean(left[near & usable])) < 0.15 * SIGMA[b], band
        else:
            np.testing.assert_array_equal(tile.image[b], plain.image[b])
    # without the correction the high side of the 3-sigma step is left about a sigma above the model
    high = plain.image[0][:, 180:186] - sources[0][:, 180:186]
    assert np.mean(high[tile.mask[0][:, 180:186] == 0]) > 0.5 * SIGMA[0]


def test_no_sky_steps_are_found_in_smooth_skies_with_sources():
    """Smooth skies with a bright extended galaxy, stars, a bad column, a sky ramp over 30 columns (a gradient,
    not a step) and a bright line along two columns (a diffraction spike or a trail, unmasked, 8 sigma over 500
    rows) give no steps, and the background is the plain model's to the bit."""
    n = 640
    tile, _, _ = _stepped_tile([], seed=12)
    xx = np.arange(n)
    ramp = np.clip((xx - 350) / 30.0, 0, 1) * 1.0 * SIGMA[2]  # one sigma over 30 columns
    tile.image[2] += ramp[None, :].astype(np.float32)
    tile.image[1, 60:560, 480:482] += np.float32(8 * SIGMA[1])
    before = tile.image.copy()
    stage = BackgroundStage()
    stage.run(tile, pd.DataFrame())
    assert all("steps" not in stage.last_stats[b] for b in BANDS), stage.last_stats
    tile.image[:] = before
    BackgroundStage(steps=False).run(tile, pd.DataFrame())
    off = tile.image.copy()
    tile.image[:] = before
    stage.run(tile, pd.DataFrame())
    np.testing.assert_array_equal(tile.image, off)


def test_grown_source_mask_is_the_city_block_dilation():
    """The background's source mask grown by r pixels is every pixel within |dy| + |dx| <= r of a masked one
    (computed by hand from the distances), as scipy's iterated cross dilation gives it, at the image's edges,
    for r = 0 and for r beyond the image's size."""
    from scipy import ndimage

    from deepfield.tasks.stages.background import grow_mask
    rng = np.random.default_rng(3)
    for shape, r, p in (((64, 80), 6, 0.01), ((17, 9), 3, 0.05), ((5, 7), 9, 0.1), ((40, 40), 0, 0.02)):
        m = rng.random(shape) < p
        m[0, -1] = True  # a corner pixel
        before = m.copy()
        yy, xx = np.mgrid[:shape[0], :shape[1]]
        ys, xs = np.nonzero(m)
        d = np.min(np.abs(yy[..., None] - ys) + np.abs(xx[..., None] - xs), axis=-1)
        grown = grow_mask(m, r)
        np.testing.assert_array_equal(grown, d <= r)
        if r:
            np.testing.assert_array_equal(grown, ndimage.binary_dilation(m, iterations=r))
        np.testing.assert_array_equal(m, before)  # the input is left as it was


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
    """The stage's flux_gaap_<b> of the scene's bright stars (Moffat PSF, the same FWHM in every band): the
    Gaussian-weighted sum, with sigma_b = sqrt(sigma_g^2 - sigma_psf^2), sigma_g = 1.5 PSF sigmas, of each star
    drawn alone without noise, scaled by (sigma_g / sigma_b)^2, within 1 %; so their colours (band ratios) are
    the truth's. With a Moffat PSF that is 80-90 % of the total flux (the weight's normalisation holds for a
    Gaussian PSF): these fluxes are for colours."""
    from deepfield.tasks.stages.measure import gaussian_aperture
    tile, src = scene
    idx, d = match(src, [SCENE[i]["x"] for i in STARS_BRIGHT], [SCENE[i]["y"] for i in STARS_BRIGHT])
    assert (d < 1).all()
    sig_p = FWHM / SCALE / 2.3548
    sig_g = 1.5 * sig_p
    sig_b = np.sqrt(sig_g ** 2 - sig_p ** 2)
    for k, i in zip(idx, STARS_BRIGHT):
        f = np.array([src[f"flux_gaap_{b}"].iloc[k] for b in BANDS])
        alone = draw([SCENE[i]])
        x, y = src.x_tile.iloc[k], src.y_tile.iloc[k]
        ok = np.zeros(alone.shape[1:], bool)
        expect = np.array([gaussian_aperture(alone[b].astype(float), np.ones(ok.shape), ok, np.array([x]),
                                             np.array([y]), sig_b)[0][0] for b in range(len(BANDS))]) * (sig_g / sig_b) ** 2
        true = np.array(SCENE[i]["flux"], float)
        assert f == pytest.approx(expect, rel=0.01)
        assert f / f[0] == pytest.approx(true / true[0], rel=0.02)
        assert np.all((f / true > 0.8) & (f / true < 0.9))
        assert all(src[f"fluxerr_gaap_{b}"].iloc[k] > 0 for b in BANDS)
    with pytest.raises(ValueError, match="gaap_sigma_psf"):
        MeasureStage(gaap_sigma_psf=(0.9,))
