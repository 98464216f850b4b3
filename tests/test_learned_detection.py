"""The learned detector's training data and training loop (issue 17): the rendered library, scenes composed from
it (geometry of the rotations, reproducibility by seed, the simulator's counts and separations), the heat-map
targets, and a short training run that lowers the loss."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepfield.tasks.trainsets.compose import ComposeConfig, compose_scene, transform_offset
from deepfield.tasks.trainsets.library import LibraryConfig, build_library, load_library


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A small library: 240 galaxies over two seeing levels (a few seconds)."""
    out = tmp_path_factory.mktemp("library")
    cfg = LibraryConfig(galaxies=240, giants=6, seeing=(0.9, 1.1), seed=3, star_offsets=2)
    build_library(cfg, out, workers=1)
    return load_library(out, cfg)


def _centroid(img: np.ndarray) -> tuple[float, float]:
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    t = img.sum()
    c = (img.shape[0] - 1) / 2
    return float((img * xx).sum() / t - c), float((img * yy).sum() / t - c)


def test_library_entries_are_centred_where_recorded(library):
    """Each rendered galaxy's light centroid is its recorded sub-pixel offset (bright, compact ones: no
    truncation), and it stays so under every rotation and mirror the composer applies."""
    s = library.sizes[0]
    info = library.gal_info[s]
    i = int(np.argmin(info["mag"]))
    img = library.gal[s][i].astype(np.float64)[library.bands.index("i")]
    assert _centroid(img) == pytest.approx((float(info["dx"][i]), float(info["dy"][i])), abs=0.02)
    for k in range(4):
        for flip in (False, True):
            r = np.rot90(img, k)
            r = r[:, ::-1] if flip else r
            assert _centroid(r) == pytest.approx(transform_offset(float(info["dx"][i]), float(info["dy"][i]), k, flip),
                                                 abs=0.02)


def test_library_refuses_another_configuration(library, tmp_path):
    with pytest.raises(FileNotFoundError, match="no galaxy library"):
        load_library(tmp_path)
    other = library.cfg.model_copy(update=dict(seed=4))
    build_library(library.cfg.model_copy(update=dict(galaxies=10, giants=0)), tmp_path, workers=1)
    with pytest.raises(ValueError, match="another configuration"):
        load_library(tmp_path, other)


def test_scenes_are_reproducible_by_seed(library):
    cfg = ComposeConfig(size=64, pair_rate=0.3, cosmic_rays=1.0, bright_star_rate=0.5)
    a = compose_scene(library, cfg, np.random.default_rng(11))
    b = compose_scene(library, cfg, np.random.default_rng(11))
    c = compose_scene(library, cfg, np.random.default_rng(12))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.truth.equals(b.truth)
    assert not np.array_equal(a.image, c.image)


def test_scenes_carry_masked_bad_columns_as_the_survey_does(library):
    """Bad columns and pixels (the simulator's detector defects) are masked BAD with zero weight, and the
    detector's input is zero there with the unusable fraction set: a star crossed by one is one source to learn."""
    from deepfield.tasks import maskbits
    from deepfield.models.detect_net import detector_input
    cfg = ComposeConfig(size=64, bad_columns=3.0, bad_pixel_fraction=1e-3)
    sc = compose_scene(library, cfg, np.random.default_rng(5))
    bad = (sc.mask & maskbits.BAD) != 0
    assert bad.any() and (sc.invvar[bad] == 0).all() and (sc.invvar[~bad & (sc.mask == 0)] > 0).all()
    col = bad.mean(axis=1) > 0.3  # (band, x): columns mostly bad
    assert col.sum() >= 3
    x = detector_input(sc.image, sc.invvar, (sc.mask & maskbits.BAD) != 0)
    assert (x[:-1][bad] == 0).all() and (x[-1][bad.any(axis=0)] > 0).all()


def test_scene_sources_sit_where_the_truth_says(library):
    """A scene of one bright star: its light centroid in every band is the truth position, and its flux the
    truth flux (noise aside)."""
    cfg = ComposeConfig(size=64, margin=0, galaxy_density_i25=0.0, star_density_i24=0.0, bright_star_rate=1.0,
                        depth_scatter=0.0, saturation_mag=5.0)
    rng = np.random.default_rng(5)
    for _ in range(400):
        sc = compose_scene(library, cfg, rng)
        if len(sc.truth) == 1 and 20 < sc.truth.x[0] < 44 and 20 < sc.truth.y[0] < 44:
            break
    else:
        pytest.fail("no scene with one central star in 400 draws")
    t = sc.truth.iloc[0]
    j = library.bands.index("i")
    img = sc.image[j]
    yy, xx = np.mgrid[0:64, 0:64]
    w = np.where(np.hypot(xx - t.x, yy - t.y) < 12, img, 0.0)
    assert (w * xx).sum() / w.sum() == pytest.approx(t.x, abs=0.1)
    assert (w * yy).sum() / w.sum() == pytest.approx(t.y, abs=0.1)
    assert img.sum() == pytest.approx(t.flux_i, rel=0.05)


def test_scenes_follow_the_simulators_counts_and_separations(library):
    """Plain composed scenes against the simulator's own sky (tasks.sim.catalog, the same population model):
    galaxies per arcmin^2 in i bins and the nearest-neighbour separations of galaxies brighter than i = 25."""
    from deepfield.tasks.sim.catalog import build_survey_catalog
    from deepfield.tasks.sim.config import SimConfig

    cfg = ComposeConfig(size=128, margin=0, mag_range=(17.5, 26.5))
    rng = np.random.default_rng(1)
    scenes = [compose_scene(library, cfg, rng) for _ in range(120)]
    area = 120 * (128 * 0.2 / 60) ** 2
    gal = np.concatenate([s.truth.mag_i[s.truth.kind == "galaxy"].to_numpy() for s in scenes])
    sim = SimConfig(seed=2, size=2048, fields=1, population=dict(clusters_per_field=0, lenses_per_field=0,
                                                                 ring_galaxies_per_field=0, mergers_per_field=0,
                                                                 close_pairs_per_field=0))
    sky = build_survey_catalog(sim)
    smag = np.array([s.mag["i"] for s in sky.sources if s.kind == "galaxy"])
    # the simulator samples a margin around the field too: its area from the positions' extent
    ra, dec = sky.positions()
    sim_area = (np.ptp(ra) * np.cos(np.radians(np.mean(dec))) * 60) * (np.ptp(dec) * 60)
    for lo, hi in ((20, 22), (22, 24), (24, 25), (25, 26)):
        ours = np.sum((gal >= lo) & (gal < hi)) / area
        theirs = np.sum((smag >= lo) & (smag < hi)) / sim_area
        assert ours == pytest.approx(theirs, rel=0.2), (lo, hi, ours, theirs)

    def nn_sep(x, y):
        d = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
        np.fill_diagonal(d, np.inf)
        return d.min(axis=1)
    ours = np.concatenate([nn_sep(*(s.truth[(s.truth.kind == "galaxy") & (s.truth.mag_i < 25)][["x", "y"]]
                                    .to_numpy().T)) for s in scenes]) * 0.2
    # Poisson: P(nn < r) = 1 - exp(-n pi r^2) at the counts' density of i < 25 galaxies (45 per arcmin^2)
    n = 45.0 / 3600
    for r in (2.0, 4.0):
        inner = ours[np.isfinite(ours)]
        assert np.mean(inner < r) == pytest.approx(1 - np.exp(-n * np.pi * r ** 2), abs=0.05)


def test_heat_targets_mark_centres_and_ignore_the_faint():
    from deepfield.models.detect_net import heat_targets
    heat, weight, off, omask = heat_targets((32, 32), np.array([[10.3, 20.6]]), np.array([[5.0, 5.0]]))
    assert heat[21, 10] == 1.0 and omask[21, 10] == 1.0 and omask.sum() == 1
    assert off[:, 21, 10] == pytest.approx([0.3, -0.4], abs=1e-6)
    assert heat[21, 12] == pytest.approx(np.exp(-(1.7 ** 2 + 0.4 ** 2) / 2), rel=1e-5)
    assert weight[5, 5] == 0 and weight[4, 3] == 0 and weight[20, 10] == 1 and weight[8, 8] == 1


def test_offsets_are_taught_around_each_centre_towards_the_nearest():
    """With reach 1 the 3 x 3 pixels around a centre pixel point at that centre (weight 1 at the centre pixel,
    less around it); where two centres' neighbourhoods meet, a pixel points at the nearer one."""
    from deepfield.models.detect_net import OFFSET_NEAR_WEIGHT, heat_targets
    _, _, off, omask = heat_targets((32, 32), np.array([[10.3, 20.6], [11.6, 21.0]]), np.zeros((0, 2)),
                                    reach=1)
    assert omask[21, 10] == 1.0 and omask[21, 12] == 1.0
    assert off[:, 21, 10] == pytest.approx([0.3, -0.4], abs=1e-6) and off[:, 21, 12] == pytest.approx([-0.4, 0.0])
    assert omask[20, 9] == OFFSET_NEAR_WEIGHT and off[:, 20, 9] == pytest.approx([1.3, 0.6], abs=1e-6)
    assert off[:, 21, 11] == pytest.approx([0.6, 0.0], abs=1e-6)  # 0.6 px from the second, 0.81 from the first
    assert off[:, 20, 11] == pytest.approx([-0.7, 0.6], abs=1e-6)  # 0.92 px from the first, 1.17 from the second
    assert (omask > 0).sum() == 9 + 9 - 3 and omask[18, 10] == 0


def test_find_peaks_keeps_local_maxima_with_offsets():
    from deepfield.models.detect_net import find_peaks
    heat = np.zeros((16, 16), np.float32)
    heat[4, 4], heat[4, 5], heat[10, 12] = 0.9, 0.5, 0.45
    off = np.zeros((2, 16, 16), np.float32)
    off[:, 10, 12] = (0.25, -0.5)
    p = find_peaks(heat, off, 0.4)
    assert p.tolist() == [[4.0, 4.0, pytest.approx(0.9)], [12.25, 9.5, pytest.approx(0.45)]]


def test_find_peaks_takes_one_pixel_of_a_plateau():
    """Two adjacent pixels of equal heat (the int8 network's coarser output) are one peak, at the pixel whose
    offset points least away from it."""
    from deepfield.models.detect_net import find_peaks
    heat = np.zeros((12, 12), np.float32)
    heat[5, 5] = heat[5, 6] = 0.7
    off = np.zeros((2, 12, 12), np.float32)
    off[:, 5, 5], off[:, 5, 6] = (0.45, 0.0), (-0.2, 0.1)
    p = find_peaks(heat, off, 0.4)
    assert p.tolist() == [[pytest.approx(5.8), pytest.approx(5.1), pytest.approx(0.7)]]


def test_a_peak_in_a_saturated_core_is_not_a_second_source():
    """A star's masked core is a hole in its footprint; the detector's peak there lies outside every footprint
    but on unusable pixels, and must not become a source beside the star's footprint."""
    from deepfield.tasks.stages._pixels import gaussian_kernel
    from deepfield.tasks.stages.detect import OBJ_FIELDS, split_by_peaks
    n = 40
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(xx - 20, yy - 20)
    det = np.where(r < 10, 100 * np.exp(-r / 3), 0).astype(np.float64)
    bad = r < 2.5
    det[bad] = 0
    pseg = ((r < 10) & ~bad).astype(np.int32)
    parent = np.zeros(1, [(f, "f8") for f in OBJ_FIELDS])
    parent[0] = (20, 20, 4, 4, 0, pseg.sum(), 10, 30, 10, 30, det.sum(), det.max(), 0)
    heat = np.where(r < 2, 0.9, 0.0)
    peaks = np.array([[20.0, 20.0, 0.9]])
    for hole, expect in ((bad, 1), (None, 2)):  # without the mask the peak would be a second source
        objs = split_by_peaks(det, gaussian_kernel(3.0), parent, pseg, peaks, heat, 0.3, 100.0, 3.0, hole)[0]
        assert len(objs) == expect


@pytest.mark.slow
def test_a_short_training_run_lowers_the_loss(library, tmp_path):
    """60 steps on composed scenes lower the heat-map loss (mean over steps 41-60 against 1-20); a run stopped
    at 20 steps and resumed from its checkpoint ends with the weights of the uninterrupted run."""
    import torch

    from deepfield.models.train_detect import train
    from deepfield.tasks.trainsets.detection import DetectTrainConfig, training_batch, validation_set

    cfg = DetectTrainConfig()
    cfg.compose.size = 48
    val = validation_set(library, cfg, 0, 4)
    kw = dict(lr=3e-3, seed=0, bands=tuple(library.bands), widths=(8, 8, 8), threads=1, validate_every=20)

    def batches(step: int) -> dict:
        return training_batch(library, cfg, 0, step, 8)
    rec, state = train(batches, val, steps=60, checkpoint=tmp_path / "a.ckpt", **kw)
    first, last = rec["history"][0]["heat_loss"], rec["history"][-1]["heat_loss"]
    assert last < 0.75 * first, rec["history"]
    ck = tmp_path / "b.ckpt"
    assert train(batches, val, steps=60, checkpoint=ck, stop_after=20, **kw) is None
    assert torch.load(ck, weights_only=False)["step"] == 20
    rec2, state2 = train(batches, val, steps=60, checkpoint=ck, **kw)
    for k in state:
        torch.testing.assert_close(state2[k], state[k], msg=k)
    assert [h["step"] for h in rec2["history"]] == [20, 40, 60]


def test_composed_blends_for_the_deblender(library):
    """Composed blends: reproducible by seed; the stamp is centred on the members' mean position (to half a
    pixel); without field galaxies the image is the members' images plus noise of the stated sigma; the
    deblender's examples are made from them (one per member)."""
    from deepfield.tasks.trainsets.blend_compose import BlendComposeConfig, compose_blends, training_batch

    cfg = BlendComposeConfig(field_faint_from=99.0)
    a = compose_blends(library, cfg, 6, np.random.default_rng(3))
    b = compose_blends(library, cfg, 6, np.random.default_rng(3))
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["members"].equals(b["members"])
    m = a["members"]
    assert m.groupby("blend").size().between(2, 4).all()
    centre = m.groupby("blend")[["x", "y"]].mean().to_numpy()
    assert np.abs(centre - 23.5).max() < 1.3  # half a pixel of offset plus each member's sub-pixel centre
    for k in range(6):
        resid = (a["images"][k] - a["truth"][k].sum(axis=0)) / a["sigma"][k][:, None, None]
        assert np.std(resid) == pytest.approx(1.0, abs=0.15)
    ex = training_batch(library, cfg, 0, 0, 4)
    assert len(ex["x"]) == len(compose_blends(library, cfg, 4, np.random.default_rng(
        np.random.SeedSequence([0, 0, 31])))["members"])


# --- the shipped detector in the stages -------------------------------------------------------------------------

def _scene_tile(profiles: list, n: int, seed: int):
    """A (no-halo) tile of n x n px holding the GalSim `profiles` (band -> profile, each) at HSC-like seeing and
    depth in g, r, i, z, with Gaussian sky noise."""
    import galsim
    from astropy.wcs import WCS

    from deepfield.tasks.sim.config import DEFAULT_BANDS
    from deepfield.tasks.tiling import Box, TileId
    from deepfield.tasks.trainsets.stamp_survey import StampSurvey
    from deepfield.tasks.zarr_store import Tile

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
    i fluxes add up to the pair's light within 15 % (they miss 7-10 %: the fractions are small in the faint wings,
    where the training target T_m / (T + 0.1 sigma) is)."""
    for seed in range(3):
        t, x, f = _close_pair(seed)
        assert len(t) == 2, t[["x_tile", "y_tile"]]
        near = np.hypot(t.x_tile.to_numpy()[:, None] - x[None], t.y_tile.to_numpy()[:, None] - 31.5)
        assert (near.min(axis=0) < 1.0).all() and len(set(near.argmin(axis=0))) == 2, near
        assert (t.deblend_method == "unet").all() and t.blend_id.nunique() == 1
        assert t.flux_deblend_i.sum() == pytest.approx(f.sum(), rel=0.15)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 17 open: the brighter member comes out 14-27 % low and the fainter "
                   "7-12 % high, the detector placing the fainter one's centre 0.35-0.5 px towards its neighbour")
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
    from deepfield.tasks.stages.detect import fill_thin_defects
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


def test_a_field_without_the_detectors_bands_is_refused_before_the_run():
    """The learned detector runs on any of its bands (g, r, i, z) that a field has; a field with none of them is
    refused by the band check before any tile (with SEP's method it is not)."""
    from deepfield.tasks.stages.registry import BandError, check_bands

    check_bands([("detect", {})], {"legacy": ["g", "r", "z"], "one": ["i"]})
    with pytest.raises(BandError, match=r"stage 'detect': the learned detector takes bands g, r, i, z .*field 'vis'"):
        check_bands([("detect", {})], {"legacy": ["g", "r", "z"], "vis": ["VIS"]})
    check_bands([("detect", {"method": "sep"})], {"vis": ["VIS"]})
