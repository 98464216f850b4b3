"""The learned detector's training data and training loop (issue 17): the rendered library, scenes composed from
it (geometry of the rotations, reproducibility by seed, the simulator's counts and separations), the heat-map
targets and offsets, the peak finder, a short training run that lowers the loss, and the composed blends for the
deblender. The split of footprints at the peaks: test_learned_split.py; the shipped detector in the stages:
test_learned_detection_stage.py."""
from __future__ import annotations

import numpy as np
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


@pytest.mark.parametrize("scale", [0.168, 0.262])
def test_scenes_on_other_pixels_keep_positions_fluxes_and_noise_per_area(library, scale):
    """ComposeConfig.pixel_scales: a scene on pixels of another side holds one bright star where its truth says
    (the light centroid) with its flux, and its sky noise per pixel is the library grid's times the ratio of
    the pixel sides (the same noise per unit area); the rebinning conserves a smooth image's light."""
    from deepfield.tasks.trainsets.compose import rebin
    cfg = ComposeConfig(size=64, margin=0, galaxy_density_i25=0.0, star_density_i24=0.0, bright_star_rate=1.0,
                        depth_scatter=0.0, saturation_mag=5.0, pixel_scales=(scale, scale), pixel_scale_share=1.0)
    plain = compose_scene(library, cfg.model_copy(update=dict(pixel_scales=None)), np.random.default_rng(1), level=0)
    rng = np.random.default_rng(5)
    for _ in range(400):
        sc = compose_scene(library, cfg, rng, level=0)
        if len(sc.truth) == 1 and 20 < sc.truth.x[0] < 44 and 20 < sc.truth.y[0] < 44:
            break
    else:
        pytest.fail("no scene with one central star in 400 draws")
    ratio = scale / library.cfg.pixel_scale
    assert sc.image.shape[-1] == 64 and np.allclose(sc.sigma, plain.sigma * ratio, rtol=1e-5)
    t = sc.truth.iloc[0]
    j = library.bands.index("i")
    img = sc.image[j]
    yy, xx = np.mgrid[0:64, 0:64]
    w = np.where(np.hypot(xx - t.x, yy - t.y) < 12 / ratio, img, 0.0)
    assert (w * xx).sum() / w.sum() == pytest.approx(t.x, abs=0.1)
    assert (w * yy).sum() / w.sum() == pytest.approx(t.y, abs=0.1)
    assert img.sum() == pytest.approx(t.flux_i, rel=0.05)
    smooth = np.exp(-((np.mgrid[0:80, 0:80] - 40.0) ** 2).sum(axis=0) / 200.0)[None].astype(np.float32)
    assert rebin(smooth, ratio, int(80 / ratio)).sum() == pytest.approx(smooth.sum(), rel=1e-3)


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


def test_find_peaks_merges_peaks_pointing_at_one_centre():
    """Two peaks 3 px apart whose offsets point at centres 1.0 px apart are one source (the higher) with
    merge_radius 2; a third peak whose centre is 2.5 px from the higher one stays, and nothing merges with
    merge_radius 0."""
    from deepfield.models.detect_net import find_peaks
    heat = np.zeros((16, 16), np.float32)
    heat[8, 5], heat[8, 8], heat[11, 6] = 0.9, 0.6, 0.5
    off = np.zeros((2, 16, 16), np.float32)
    off[:, 8, 5], off[:, 8, 8] = (0.5, 0.0), (-1.5, 0.0)  # centres (5.5, 8) and (6.5, 8)
    off[:, 11, 6] = (0.0, -0.5)  # centre (6, 10.5): 2.55 px from (5.5, 8)
    assert len(find_peaks(heat, off, 0.4)) == 3
    p = find_peaks(heat, off, 0.4, merge_radius=2.0)
    assert p.tolist() == [[5.5, 8.0, pytest.approx(0.9)], [6.0, 10.5, pytest.approx(0.5)]]


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
    pixel), or on one member, whose neighbours outside the stamp are then unowned light, not members; without
    field galaxies the image is the members' images plus noise of the stated sigma; the deblender's examples are
    made from them (one per member)."""
    from deepfield.tasks.trainsets.blend_compose import BlendComposeConfig, compose_blends, training_batch

    cfg = BlendComposeConfig(field_faint_from=99.0, member_centred=0.0)
    a = compose_blends(library, cfg, 6, np.random.default_rng(3))
    b = compose_blends(library, cfg, 6, np.random.default_rng(3))
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["members"].equals(b["members"])
    m = a["members"]
    assert m.groupby("blend").size().between(2, 6).all()
    centre = m.groupby("blend")[["x", "y"]].mean().to_numpy()
    assert np.abs(centre - 23.5).max() < 1.3  # half a pixel of offset plus each member's sub-pixel centre
    c = compose_blends(library, BlendComposeConfig(field_faint_from=99.0, member_centred=1.0, offset=(4.0, 6.0)),
                       6, np.random.default_rng(4))
    for k, g in c["members"].groupby("blend"):
        assert np.hypot(g.x - 23.5, g.y - 23.5).min() < 1.3  # one member at the centre
        assert g[["x", "y"]].to_numpy().min() > -1 and g[["x", "y"]].to_numpy().max() < 48
        # companions 20-30 px away: some fall outside the stamp and their light is in the image, not in the truth
        assert len(c["truth"][k]) == len(g)
    assert (c["members"].groupby("blend").size() < 2).any()
    for k in range(6):
        resid = (a["images"][k] - a["truth"][k].sum(axis=0)) / a["sigma"][k][:, None, None]
        assert np.std(resid) == pytest.approx(1.0, abs=0.15)
    ex = training_batch(library, cfg, 0, 0, 4)
    assert len(ex["x"]) == len(compose_blends(library, cfg, 4, np.random.default_rng(
        np.random.SeedSequence([0, 0, 31])))["members"])


def test_a_short_image_head_training_run_lowers_the_loss(library):
    """The deblender's image head (the member's noiseless image as asinh(T / sigma)) on composed blends: 60
    steps lower the loss (pixel plus flux term, mean of steps 41-60 against 1-20: measured 2.12 -> 0.73) and the
    record keeps the head in its arch."""
    from deepfield.models.train_deblend import train_stream
    from deepfield.tasks.trainsets.blend_compose import BlendComposeConfig, training_batch, validation_set

    cfg = BlendComposeConfig()
    val = validation_set(library, cfg, 0, 8)
    rec, _ = train_stream(lambda step: training_batch(library, cfg, 0, step, 4), val, ref_index=2, zeropoint=27.0,
                          steps=60, lr=3e-3, seed=0, widths=(8, 8, 8, 8), threads=1, validate_every=20,
                          output="image")
    h = rec["history"]
    assert rec["arch"]["output"] == "image"
    loss = [r["train_pix"] + r["train_flux"] for r in h]
    assert loss[-1] < 0.6 * loss[0], h
