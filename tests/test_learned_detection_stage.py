"""The shipped learned detector inside the stages (issue 17): a close pair gives two sources, a large clumpy
spiral one, a star crossed by a bad column one; one-pixel defects are interpolated before detection and do not
keep a footprint from its peak's centre; the int8 detector finds what the float one does; a field without the
detector's bands is refused before the run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def _scene_tile(profiles: list, n: int, seed: int):
    """A (no-halo) tile of n x n px holding the GalSim `profiles` (band -> profile, each) at HSC-like seeing and
    depth in g, r, i, z, with Gaussian sky noise."""
    import galsim
    from astropy.wcs import WCS

    from deepfield.tasks.sim.config import DEFAULT_BANDS
    from deepfield.tasks.tiling import Box, TileId
    from deepfield.tasks.trainsets.stamp_survey import StampSurvey
    from deepfield.tasks.zarr_read import Tile

    bands, scale, zp = ["g", "r", "i", "z"], 0.2, 27.0
    ss = StampSurvey()
    sigma = np.array([ss.noise_sigma(b, DEFAULT_BANDS[b].psf_fwhm) for b in bands], np.float32)
    img = np.zeros((4, n, n), np.float32)
    for j, b in enumerate(bands):
        psf = galsim.Moffat(beta=3.5, fwhm=DEFAULT_BANDS[b].psf_fwhm)
        for prof in profiles:
            img[j] += galsim.Convolve(prof[b], psf).drawImage(nx=n, ny=n, scale=scale).array
    img += np.random.default_rng(seed).normal(size=img.shape).astype(np.float32) * sigma[:, None, None]
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval, w.wcs.crpix, w.wcs.cdelt = [150.0, 2.0], [n / 2, n / 2], [-scale / 3600, scale / 3600]
    box = Box(0, n, 0, n)
    invvar = np.broadcast_to((1 / sigma ** 2)[:, None, None], img.shape).astype(np.float32).copy()
    return Tile(id=TileId("t", 0, 0), bands=bands, image=img, invvar=invvar, mask=np.zeros(img.shape, np.uint16),
                box=box, core=box, wcs=w, zeropoints=[zp] * 4, psf_fwhm=[DEFAULT_BANDS[b].psf_fwhm for b in bands],
                pixel_scale=scale, field_shape=(n, n))


def _galaxy(mag: float, hlr: float, dx: float, dy: float, q: float = 0.8, beta: float = 30.0, knots: float = 0.0,
            seed: int = 1) -> dict:
    """band -> GalSim profile of a flat-spectrum disk (+ knots) galaxy, offset (dx, dy) arcsec."""
    import galsim
    flux = 10 ** (-0.4 * (mag - 27.0))
    out = {}
    for b in ("g", "r", "i", "z"):
        gal = galsim.Exponential(half_light_radius=hlr, flux=flux * (1 - knots))
        if knots:
            gal = gal + galsim.RandomKnots(60, half_light_radius=hlr, flux=flux * knots, rng=galsim.BaseDeviate(seed))
        out[b] = gal.shear(q=q, beta=beta * galsim.degrees).shift(dx, dy)
    return out


CLOSE_PAIR_SEP = 0.8 * (0.6 + 0.5)  # arcsec: 0.8 x the sum of the two half-light radii


def _close_pair(seed: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Two disk galaxies (i 21.0 and 21.4, half-light radii 0.6" and 0.5") CLOSE_PAIR_SEP apart through detect,
    measure and deblend: (table, true x of each in the tile, true i flux of each)."""
    from deepfield.tasks.stages.deblend import DeblendStage
    from deepfield.tasks.stages.detect import DetectStage
    from deepfield.tasks.stages.measure import MeasureStage

    n, d = 64, CLOSE_PAIR_SEP
    pair = [_galaxy(21.0, 0.6, -d / 2, 0.0, q=0.7, beta=20), _galaxy(21.4, 0.5, d / 2, 0.0, q=0.6, beta=100)]
    tile = _scene_tile(pair, n, seed)
    t = DetectStage(method="learned").run(tile, pd.DataFrame())
    t = DeblendStage().run(tile, MeasureStage().run(tile, t))
    return t, (n - 1) / 2 + np.array([-d / 2, d / 2]) / 0.2, 10 ** (-0.4 * (np.array([21.0, 21.4]) - 27.0))


@pytest.mark.slow
def test_a_close_pair_gives_two_sources():
    """The pair gives two detections, each within 1 px of a true centre, deblended together, and their deblended
    i fluxes add up to the pair's light within 5 % (within 0.5 % with the symmetric templates; the U-Net's
    fractions missed 7-10 %, small in the faint wings)."""
    for seed in range(3):
        t, x, f = _close_pair(seed)
        assert len(t) == 2, t[["x_tile", "y_tile"]]
        near = np.hypot(t.x_tile.to_numpy()[:, None] - x[None], t.y_tile.to_numpy()[:, None] - 31.5)
        assert (near.min(axis=0) < 1.0).all() and len(set(near.argmin(axis=0))) == 2, near
        assert (t.deblend_method == "symmetric").all() and t.blend_id.nunique() == 1
        assert t.flux_deblend_i.sum() == pytest.approx(f.sum(), rel=0.05)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 17 open: the brighter member comes out 14-23 % low and the fainter "
                   "19-35 % high with the symmetric templates (the U-Net: 14-27 % and 7-12 %), the detector placing "
                   "the fainter one's centre 0.35-0.5 px towards its neighbour; the sum is within 0.5 %")
def test_a_close_pair_is_measured_within_15_percent():
    """Issue 17's target: each member's deblended i flux within 15 % of its truth."""
    for seed in range(3):
        t, x, f = _close_pair(seed)
        k = np.hypot(t.x_tile.to_numpy()[:, None] - x[None], t.y_tile.to_numpy()[:, None] - 31.5).argmin(axis=0)
        assert np.all(np.abs(t.flux_deblend_i.to_numpy()[k] / f - 1) < 0.15)


@pytest.mark.slow
def test_a_large_clumpy_spiral_is_one_source():
    """A bright (i 17.5) disk galaxy of 3" half-light radius with 30 % of its light in 60 star-forming knots is
    one detection for the learned detector (SEP's deblending may shred it)."""
    from deepfield.tasks.stages.detect import DetectStage

    n = 160
    for seed in (1, 2):
        tile = _scene_tile([_galaxy(17.5, 3.0, 0.0, 0.0, q=0.6, knots=0.3, seed=seed)], n, seed)
        t = DetectStage(method="learned").run(tile, pd.DataFrame())
        d = np.hypot(t.x_tile - (n - 1) / 2, t.y_tile - (n - 1) / 2)
        assert (d < 5 * 3.0 / 0.2).sum() == 1, t[["x_tile", "y_tile", "peak_det"]]


def _star(mag: float, dx: float, dy: float) -> dict:
    """band -> GalSim point source of a flat spectrum, offset (dx, dy) arcsec."""
    import galsim
    return {b: galsim.DeltaFunction(flux=10 ** (-0.4 * (mag - 27.0))).shift(dx, dy) for b in ("g", "r", "i", "z")}


def test_one_pixel_defects_are_interpolated_before_detection():
    """fill_thin_defects: a bad column between usable pixels takes their mean (image and inverse variance) and
    becomes usable; a defect three pixels wide, and masked pixels that are not defects, stay masked."""
    from deepfield.tasks.stages._learned_split import fill_thin_defects
    img = np.tile(np.arange(10, dtype=np.float32) * 2.0, (4, 1))
    ivar = np.ones((4, 10), np.float32)
    unusable = np.zeros((4, 10), bool)
    defect = np.zeros((4, 10), bool)
    defect[:, 3] = True          # a bad column
    defect[0, 6:9] = True        # a wide defect
    unusable |= defect
    unusable[2, 5] = True        # saturated, not a defect
    img[defect] = -99.0
    fill_thin_defects(img, ivar, unusable, defect)
    assert (img[:, 3] == 6.0).all() and not unusable[:, 3].any() and (ivar[:, 3] == 1.0).all()
    assert unusable[0, 6:9].all() and (img[0, 6:9] == -99.0).all() and unusable[2, 5]


def test_peaks_outside_every_footprint_share_their_discs_by_distance():
    """_outside_sources: two peaks outside every footprint, 3.6 px apart with discs of 3.4 px, each keep their
    own pixel and every shared pixel goes to the nearer peak (the earlier at equal distance); a pixel another
    source has is nobody's. Before, the earlier disc took the later peak's centre, whose Kron circle then held no
    pixel of its own (its fluxes NaN)."""
    from deepfield.tasks.stages._learned_split import _outside_sources
    det = np.ones((20, 24))
    seg = np.zeros((20, 24), np.int32)
    seg[10, 13] = 7  # another source's pixel, within both discs
    peaks = np.array([[10.0, 10.0], [13.6, 10.0], [3.0, 3.0]])
    px, py = np.rint(peaks[:, 0]).astype(int), np.rint(peaks[:, 1]).astype(int)
    rows, idx = _outside_sources(det, seg, peaks, px, py, np.array([0, 1]), 3.4, None, 7)
    assert list(idx) == [0, 1] and list(rows["x"]) == [10.0, 13.6]
    assert seg[10, 10] == 8 and seg[10, 14] == 9 and seg[10, 13] == 7
    yy, xx = np.mgrid[0:20, 0:24]
    d0, d1 = np.hypot(xx - 10.0, yy - 10.0), np.hypot(xx - 13.6, yy - 10.0)
    both = (d0 <= 3.4) & (d1 <= 3.4) & (seg != 7)
    assert both.sum() >= 8
    assert (seg[both] == np.where(d1[both] < d0[both], 9, 8)).all()
    assert (seg[(d0 <= 3.4) & (d1 > 3.4)] == 8).all() and (seg[(d1 <= 3.4) & (d0 > 3.4) & (seg != 7)] == 9).all()
    assert rows["npix"].sum() == ((d0 <= 3.4) | (d1 <= 3.4)).sum() - 1
    taken = np.full((20, 24), 3, np.int32)  # every pixel another source's: no source, nothing written
    rows, idx = _outside_sources(det, taken, peaks, px, py, np.array([0]), 3.4, None, 7)
    assert len(rows) == 0 and len(idx) == 0 and (taken == 3).all()


def test_a_kron_aperture_wholly_in_other_segments_is_summed_without_them():
    """The measure stage leaves other detections' segments out of the Kron sums; where they cover the whole
    aperture (SEP's sum is then NaN with only APER_HASMASKED set) the aperture is summed without them, not left
    NaN: the same fluxes as with `mask_neighbours` off."""
    from deepfield.tasks.stages.detect import DetectStage
    from deepfield.tasks.stages.measure import MeasureStage
    tile = _scene_tile([_galaxy(22.0, 0.3, 0.0, 0.0)], 48, 3)
    t = DetectStage(method="sep").run(tile, pd.DataFrame())
    assert len(t) == 1
    plain = MeasureStage(mask_neighbours=False).run(tile, t)
    tile.meta["segmap"] = np.full(tile.image.shape[1:], int(t.seg_id.iloc[0]) + 1, np.int32)  # not its own
    masked = MeasureStage().run(tile, t)
    for b in tile.bands:
        f = masked[f"flux_auto_{b}"].to_numpy()
        assert np.isfinite(f).all() and np.allclose(f, plain[f"flux_auto_{b}"].to_numpy())
    assert masked.flux_auto_i.iloc[0] == pytest.approx(10 ** (-0.4 * (22.0 - 27.0)), rel=0.2)


def test_thin_defects_do_not_keep_a_footprint_from_its_peak():
    """The detect stage's unusable plane for peak_centres (DetectStage._mask_planes): a bad column the network saw
    interpolated does not count; a wide defect, a saturated pixel, a pixel without inverse variance and the
    detection image's own bad pixels do, in whichever band."""
    from types import SimpleNamespace

    from deepfield.tasks import maskbits
    from deepfield.tasks.stages.detect import DetectStage
    mask = np.zeros((2, 6, 10), np.uint16)
    invvar = np.ones((2, 6, 10), np.float32)
    mask[0, :, 3] = maskbits.BAD          # a bad column in one band, usable pixels either side
    mask[1, 1, 5:8] = maskbits.BAD        # a defect three pixels wide
    mask[1, 4, 8] = maskbits.SAT
    invvar[0, 5, 0] = 0.0
    bad = np.zeros((6, 10), bool)
    bad[0, 9] = True
    tile = SimpleNamespace(image=np.zeros((2, 6, 10), np.float32), invvar=invvar, mask=mask)
    unusable, saturated = DetectStage._mask_planes(tile, bad)
    expect = np.zeros((6, 10), bool)
    expect[1, 5:8] = expect[4, 8] = expect[5, 0] = expect[0, 9] = True
    assert (unusable == expect).all()
    assert saturated.sum() == 1 and saturated[4, 8]


@pytest.mark.slow
def test_a_star_crossed_by_a_bad_column_is_one_source():
    """A masked bad column through a bright star in one band (the survey has three per field and band) leaves
    the star one detection, within half a pixel of its centre: the detect stage interpolates one-pixel defects
    before the network (left masked, an i 18.7 star of the test survey came out as two)."""
    from deepfield.tasks import maskbits
    from deepfield.tasks.stages.detect import DetectStage

    n = 64
    for seed, (dx, col, band) in enumerate([(-0.02, 32, 2), (0.0, 31, 2), (0.3, 32, 2), (-0.02, 32, 1)]):
        tile = _scene_tile([_star(18.7, dx * 0.2, 0.0)], n, seed)
        cx = (n - 1) / 2 + dx  # the column within half a pixel of the centre, as in the survey's case
        tile.mask[band][:, col] |= maskbits.BAD | maskbits.ZERO_WEIGHT
        tile.invvar[band][:, col] = 0.0
        tile.image[band][:, col] = -5.0
        t = DetectStage().run(tile, pd.DataFrame())
        d = np.hypot(t.x_tile - cx, t.y_tile - (n - 1) / 2)
        assert (d < 5).sum() == 1 and d.min() < 0.5, t[["x_tile", "y_tile"]]


@pytest.mark.slow
def test_the_int8_detector_finds_what_the_float_one_does():
    """The stage's default int8 detector (activation ranges saved with the weights) against float32 on a scene
    of a close pair, a faint galaxy and a clumpy spiral: the same sources, centres within a quarter pixel (the
    detector's own median error for blend members at i 22-24 is 0.14 px, and int8 adds 0.01 to it on the
    held-out fields), the heat map within 0.1 everywhere; the shipped weights carry the ranges."""
    from deepfield.models.detect_net import detector_input, heat_and_offsets
    from deepfield.tasks.stages.detect import INT8_KEY, DetectStage

    n = 128
    d = CLOSE_PAIR_SEP
    tile = _scene_tile([_galaxy(21.0, 0.6, -d / 2 - 4, -3, q=0.7, beta=20), _galaxy(21.4, 0.5, d / 2 - 4, -3, q=0.6),
                        _galaxy(24.3, 0.3, 6.0, 6.0), _galaxy(18.5, 1.5, 5.0, -6.0, knots=0.3)], n, 4)
    q, f = DetectStage(), DetectStage(precision="float32")
    q.setup("cpu"), f.setup("cpu")
    assert getattr(q.model, "quantized", False) and not getattr(f.model, "quantized", False)
    assert INT8_KEY in f.model.training_info
    tq, tf = q.run(tile, pd.DataFrame()), f.run(tile, pd.DataFrame())
    assert len(tq) == len(tf) >= 4
    dist = np.hypot(tq.x.to_numpy()[:, None] - tf.x.to_numpy()[None], tq.y.to_numpy()[:, None] - tf.y.to_numpy()[None])
    assert dist.min(axis=1).max() < 0.25
    inp = detector_input(tile.image, tile.invvar, np.zeros(tile.image.shape, bool))
    assert np.abs(heat_and_offsets(q.model, inp)[0] - heat_and_offsets(f.model, inp)[0]).max() < 0.1


def test_the_int8_detector_is_cached_traced_and_gives_the_same_heat_maps(tmp_path, monkeypatch):
    """The int8 detector is built once (FX quantisation, about 2 s) and kept traced in the user's cache: a second
    stage loads it without building, and both give the heat maps and offsets of the network built in this
    process, to the bit, on inputs of sizes neither was traced at; a damaged cache file is made again."""
    import deepfield.models.detect_net as dn
    from deepfield.models.registry import create_model
    from deepfield.tasks.stages.detect import INT8_KEY, DetectStage

    monkeypatch.setenv("DEEPFIELD_CACHE_DIR", str(tmp_path))
    first = DetectStage()
    first.setup("cpu")
    (cached,) = list((tmp_path / "torch").glob("detect-int8-*.pt"))
    built = dn.quantized_for_inference(net := create_model("detect_net"), net.training_info[INT8_KEY])

    def no_build(*a, **k):
        raise AssertionError("built again although cached")
    with monkeypatch.context() as m:
        m.setattr(dn, "quantized_for_inference", no_build)
        second = DetectStage()
        second.setup("cpu")
    assert second.model.quantized and second.model.bands == list(net.bands)
    rng = np.random.default_rng(5)
    for shape in [(1 + len(net.bands), 333, 517), (1 + len(net.bands), 128, 96)]:
        x = (rng.normal(size=shape) * 3).astype(np.float32)
        x[-1] = (rng.random(shape[1:]) < 0.05).astype(np.float32)
        want = dn.heat_and_offsets(built, x)
        for stage in (first, second):
            got = dn.heat_and_offsets(stage.model, x)
            assert all(np.array_equal(a, b) for a, b in zip(got, want))
    cached.write_bytes(cached.read_bytes()[:5000])  # cut short: not loadable, made again
    third = DetectStage()
    third.setup("cpu")
    assert cached.stat().st_size > 5000 and np.array_equal(dn.heat_and_offsets(third.model, x)[0], want[0])


def test_the_int8_detector_runs_on_the_configured_quantized_engine(tmp_path, monkeypatch):
    """`int8_engine` (default onednn) is the engine the int8 network is packed with: one cached network per
    engine, the packed network runs the same whatever the process's engine is later, and the two engines' heat
    maps agree within int8's tolerance (0.1, as against float32 above)."""
    import torch
    from deepfield.models.detect_net import detector_input, heat_and_offsets
    from deepfield.tasks.stages.detect import DetectStage

    monkeypatch.setenv("DEEPFIELD_CACHE_DIR", str(tmp_path))
    before = torch.backends.quantized.engine
    try:
        one = DetectStage()
        one.setup("cpu")
        assert one.int8_engine == "onednn" and torch.backends.quantized.engine == "onednn"
        other = DetectStage(int8_engine="x86")
        other.setup("cpu")
        assert torch.backends.quantized.engine == "x86"
        assert len(list((tmp_path / "torch").glob("detect-int8-*.pt"))) == 2  # one per engine
        tile = _scene_tile([_galaxy(21.0, 0.6, -4.0, -3.0), _galaxy(24.0, 0.3, 6.0, 6.0)], 96, 4)
        assert len(one.run(tile, pd.DataFrame())) >= 2
        inp = detector_input(tile.image, tile.invvar, np.zeros(tile.image.shape, bool))
        h1 = heat_and_offsets(one.model, inp)[0]
        torch.backends.quantized.engine = "onednn"
        assert np.array_equal(heat_and_offsets(one.model, inp)[0], h1)  # packed with its own engine
        h2 = heat_and_offsets(other.model, inp)[0]
        assert np.abs(h1 - h2).max() < 0.1 and h1.max() > 0.5
    finally:
        torch.backends.quantized.engine = before


def test_a_field_without_the_detectors_bands_is_refused_before_the_run():
    """The learned detector runs on any of its bands (g, r, i, z) that a field has; a field with none of them is
    refused by the band check before any tile (with SEP's method it is not)."""
    from deepfield.tasks.stages.registry import BandError, check_bands

    check_bands([("detect", {})], {"legacy": ["g", "r", "z"], "one": ["i"]})
    with pytest.raises(BandError, match=r"stage 'detect': the learned detector takes bands g, r, i, z .*field 'vis'"):
        check_bands([("detect", {})], {"legacy": ["g", "r", "z"], "vis": ["VIS"]})
    check_bands([("detect", {"method": "sep"})], {"vis": ["VIS"]})


def test_the_network_runs_where_the_core_needs_it_and_finds_what_it_finds_over_the_tile(monkeypatch):
    """A 256^2 tile with a 128^2 core: the detector's network runs on the core, the footprints that reach it and
    its reach about them (_learned_split.network_box; here under two thirds of the tile), its heat map there equal to
    the whole tile's to the last bit beyond NET_REACH of the box's edges, and the primary sources (a close pair in
    the core, a spiral across the core's edge, a faint galaxy) those of the network run over the whole tile,
    while galaxies in the halo alone stay outside the box."""
    import deepfield.tasks.stages.detect as detect
    from deepfield.tasks.stages._learned_split import NET_REACH, network_box
    from deepfield.tasks.stages.detect import DetectStage
    from deepfield.tasks.tiling import Box

    n, d = 256, CLOSE_PAIR_SEP
    tile = _scene_tile([_galaxy(21.0, 0.6, -d / 2 - 2, -3, q=0.7, beta=20), _galaxy(21.4, 0.5, d / 2 - 2, -3, q=0.6),
                        _galaxy(24.3, 0.3, 4.0, 5.0), _galaxy(19.0, 1.2, 12.5, -4.0, knots=0.3),
                        _galaxy(21.5, 0.5, -22.0, 22.0), _galaxy(22.0, 0.4, 22.0, 22.5)], n, 5)
    tile.core = Box(64, 192, 64, 192)
    stage = DetectStage()
    stage.setup("cpu")
    boxed = stage.run(tile, pd.DataFrame())
    region = network_box(tile, stage.parent_segmap, 2.0 * 3.0)
    assert region is not None
    y0, y1, x0, x1 = region
    assert y0 % 4 == 0 and x0 % 4 == 0 and (y1 - y0) * (x1 - x0) < 0.67 * n * n, region
    _, heat, known = stage._peaks(tile, 3.0, region)
    monkeypatch.setattr(detect, "network_box", lambda *a: None)
    whole = stage.run(tile, pd.DataFrame())
    _, full, none = stage._peaks(tile, 3.0, None)
    assert none is None and known.sum() == (y1 - y0) * (x1 - x0)
    inner = (slice(y0 + NET_REACH if y0 else 0, y1 - NET_REACH if y1 < n else n),
             slice(x0 + NET_REACH if x0 else 0, x1 - NET_REACH if x1 < n else n))
    assert np.array_equal(heat[inner], full[inner])
    cols = ["x", "y", "a", "b", "npix", "flux_det", "n_blend", "det_flag"]
    a, b = (t[t.is_primary][cols].reset_index(drop=True) for t in (boxed, whole))
    assert len(a) >= 4 and len(a) == len(b)
    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=0, atol=1e-9)
    assert len(whole[~whole.is_primary]) >= 2  # the halo's galaxies, found by the whole tile's network
