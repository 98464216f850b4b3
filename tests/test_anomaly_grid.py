"""The anomaly stage's dense grid with the shipped weights: the grid's geometry, artefacts in a simulated field of
normal sources (a cosmic ray in one band, a trail across a tile boundary, a diffuse ghost) scored above the 99th
percentile of the field's normal windows, one candidate for a trail, bright or faint (the line term), a ring
galaxy a ring candidate, scores that a constant added to the sky does not change and bfloat16's that follow
float32's. The candidates of hand-made windows and the evaluation's figures: tests/test_anomaly_candidates.py."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepfield.catalogs.anomaly_candidates import build_candidates, window_sigma
from deepfield.tasks.sim.artefacts import add_ghost, add_satellite_trail
from deepfield.tasks.stages._anomaly_grid import LINE_OFFSET, extract, grid_starts, refined, tile_windows
from deepfield.tasks.stages._pixels import forget_pixel_products
from deepfield.tasks.stages.anomaly import AnomalyStage
from deepfield.tasks.stages.background import BackgroundStage
from deepfield.tasks.trainsets.anomaly import training_fields
from deepfield.tasks.trainsets.fields import simulate_fields
from deepfield.tasks.zarr_store import all_tiles, open_store
from deepfield.tasks.zarr_read import read_tile

HALO = 64


class _Box:
    def __init__(self, y0, y1, x0, x1):
        self.y0, self.y1, self.x0, self.x1 = y0, y1, x0, x1


class _FieldTile:
    def __init__(self, shape, core):
        self.field_shape, self.core, self.box = shape, core, _Box(0, shape[0], 0, shape[1])


def test_grid_starts_and_every_pixel_in_one_tiles_windows():
    assert list(grid_starts(100, 32, 16)) == [0, 16, 32, 48, 64, 68]
    assert list(grid_starts(32, 32, 16)) == [0] and list(grid_starts(20, 32, 16)) == [0]
    cores = [_Box(y0, min(y0 + 128, 300), x0, min(x0 + 128, 250)) for y0 in (0, 128, 256) for x0 in (0, 128)]
    w = pd.concat([tile_windows(_FieldTile((300, 250), c), 32, 16) for c in cores], ignore_index=True)
    assert not w.duplicated(["ky", "kx"]).any()  # each window scored by one tile
    assert len(w) == len(grid_starts(300, 32, 16)) * len(grid_starts(250, 32, 16))
    cover = np.zeros((300, 250), int)
    for r in w.itertuples():
        cover[r.y0:r.y0 + 32, r.x0:r.x0 + 32] += 1
    assert cover.min() >= 1  # every pixel in at least one window


def test_extract_cuts_the_windows_with_zeros_outside():
    a = np.arange(3 * 50 * 61, dtype=np.float32).reshape(3, 50, 61) + 1
    y0, x0 = np.array([-5, 0, 10, 30, 40]), np.array([-3, 50, 7, 40, 0])
    got, twice = extract([a, 2 * a], y0, x0, 16)
    for k, (y, x) in enumerate(zip(y0, x0)):
        want = np.zeros((3, 16, 16), np.float32)
        ys, xs = slice(max(y, 0), min(y + 16, 50)), slice(max(x, 0), min(x + 16, 61))
        want[:, ys.start - y:ys.stop - y, xs.start - x:xs.stop - x] = a[:, ys, xs]
        np.testing.assert_array_equal(got[k], want)
    np.testing.assert_array_equal(twice, 2 * got)
    assert got.flags["C_CONTIGUOUS"] and got.shape == (5, 3, 16, 16)


@pytest.mark.parametrize("shape,stride", [((300, 250), 16), ((1000, 1000), 16), ((300, 250), 8), ((40, 33), 16)])
def test_coarse_windows_hold_every_pixel_and_refinement_adds_the_neighbours(shape, stride):
    core = 128
    cores = [_Box(y0, min(y0 + core, shape[0]), x0, min(x0 + core, shape[1]))
             for y0 in range(0, shape[0], core) for x0 in range(0, shape[1], core)]
    tiles = [tile_windows(_FieldTile(shape, c), 32, stride).assign(tile=k) for k, c in enumerate(cores)]
    w = pd.concat(tiles, ignore_index=True)
    c = w[w.coarse]
    cover = np.zeros(shape, int)
    for r in c.itertuples():
        cover[r.y0:r.y0 + 32, r.x0:r.x0 + 32] += 1
    assert cover.min() >= 1  # the coarse windows alone hold every pixel
    n = len(grid_starts(shape[0], 32, stride)) * len(grid_starts(shape[1], 32, stride))
    assert len(w) == n and len(c) < 0.3 * n + 2 * np.sqrt(n) + 1  # about a quarter of the grid
    t = tiles[0]
    ky, kx, co = t.ky.to_numpy(), t.kx.to_numpy(), t.coarse.to_numpy()
    score = np.where(co, 1.0, np.nan)
    assert (refined(ky, kx, co, score, 0.0) == co).all()  # nothing flagged: the coarse windows only
    assert refined(ky, kx, co, score, 1.0).all()  # every window
    hot = int(np.flatnonzero(co & (ky == min(2, ky.max())) & (kx == min(2, kx.max())))[0])  # inside the tile
    score[hot] = 10.0
    for keep in (refined(ky, kx, co, score, 0.0, above=5.0), refined(ky, kx, co, score, 1e-9)):
        near = (np.abs(ky - ky[hot]) <= 1) & (np.abs(kx - kx[hot]) <= 1)
        assert (keep == (co | near)).all()  # the hot window's eight neighbours, nothing else


def test_coarse_to_fine_scores_its_windows_as_the_dense_grid_does(field):
    """The default stage (coarse to fine) against every window of the grid (refine 1), tile by tile: the same
    scores where both score, about half the windows, and every window of the dense grid's top 1 % kept."""
    stage = field["stage"]
    dense_stage = AnomalyStage(rescore=0, refine=1.0)
    dense_stage.setup("cpu")
    assert stage.refine < 1
    dense = pd.concat([dense_stage.windows(t) for t in field["tiles"]], ignore_index=True)
    fine = field["clean"]
    assert len(fine) < 0.6 * len(dense) and fine.coarse.sum() < 0.3 * len(dense)
    both = fine.merge(dense, on=["field", "ky", "kx"], suffixes=("", "_dense"))
    assert len(both) == len(fine)
    np.testing.assert_allclose(both.score, both.score_dense, rtol=1e-5, atol=1e-5)
    top = dense[dense.score >= np.percentile(dense.score, 99)]
    assert top.set_index(["ky", "kx"]).index.isin(fine.set_index(["ky", "kx"]).index).all()


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """A 1024^2 field of normal sources (galaxies, stars, masked defects; no anomalies), its tiles read with halo
    and background-subtracted, and the anomaly stage with the shipped weights."""
    work = tmp_path_factory.mktemp("anomaly-grid")
    root = open_store(simulate_fields(training_fields(seed=424242, n_fields=1, size=1024), work, workers=1))
    stage = AnomalyStage(rescore=0)  # precision auto: bfloat16 on a CPU that computes it, else float32
    stage.setup("cpu")
    raw = [read_tile(root, t, HALO) for t in all_tiles(root, HALO)]
    tiles = [read_tile(root, t, HALO) for t in all_tiles(root, HALO)]
    for t in tiles:
        BackgroundStage().run(t, pd.DataFrame())
    clean = pd.concat([stage.windows(t) for t in tiles], ignore_index=True)
    return dict(root=root, stage=stage, raw=raw, tiles=tiles, clean=clean)


def _copy(tile):
    """A copy of `tile` whose pixels the test may change: without the detection image made of the old ones
    (_pixels.forget_pixel_products)."""
    import copy
    t = copy.copy(tile)
    t.image, t.tables = tile.image.copy(), {}
    t.meta = dict(tile.meta)
    forget_pixel_products(t.meta)
    return t


def _sky_sigma(tile, band: str) -> float:
    b = tile.bands.index(band)
    return float(1 / np.sqrt(np.median(tile.invvar[b][tile.invvar[b] > 0])))


def _near(w: pd.DataFrame, x: float, y: float, reach: float) -> pd.DataFrame:
    return w[(np.abs(w.x - x) <= reach) & (np.abs(w.y - y) <= reach)]


def test_artefacts_score_above_the_99th_percentile_of_normal_windows(field):
    stage, p99 = field["stage"], float(np.percentile(field["clean"].score, 99))
    maps = []
    for tile in field["tiles"]:
        t = _copy(tile)
        ox, oy = t.box.x0, t.box.y0
        g, r = t.bands.index("g"), t.bands.index("r")
        # a cosmic ray in g only: four pixels of 100 sky sigma (the simulator draws 20-500)
        for dx in range(4):
            yy, xx = 300 - oy, 700 + dx - ox
            if 0 <= yy < t.image.shape[1] and 0 <= xx < t.image.shape[2]:
                t.image[g, yy, xx] += 100 * _sky_sigma(t, "g")
        # a satellite trail in r of 20 sky sigma on its axis (the simulator draws 2-50), crossing the boundary
        # x = 512 of two tiles
        add_satellite_trail(t.image[r], 380 - ox, 90 - oy, 660 - ox, 200 - oy, 1.2, 20 * _sky_sigma(t, "r"))
        # a ghost: an annulus of 4 sky sigma per pixel in every band, 40 px wide
        for b in ("g", "r", "i"):
            add_ghost(t.image[t.bands.index(b)], 700 - ox, 700 - oy, 60.0, 40.0, 4 * _sky_sigma(t, b))
        maps.append(stage.windows(t))
    w = pd.concat(maps, ignore_index=True)
    got = dict(cosmic_ray=_near(w, 701, 300, 16).score.max(), trail=_near(w, 520, 145, 16).score.max(),
               ghost=w[np.abs(np.hypot(w.x - 700, w.y - 700) - 60) <= 10].score.max())
    assert min(got.values()) > p99, (got, p99)
    # the trail is one candidate, however many windows and tiles it crosses
    both = pd.concat([field["clean"][~field["clean"].set_index(["ky", "kx"]).index.isin(
        w.set_index(["ky", "kx"]).index)], w], ignore_index=True)
    sigma, stats = window_sigma(both.score.to_numpy(), both.model_peak.to_numpy())  # as build_candidates
    assert stats["log"] and stats["bins"] >= 2  # by brightness: the stage's windows carry model_peak
    cut = float(np.percentile(sigma, 99))
    cand, _ = build_candidates(both, cut, stage.stride)
    on_trail = cand[(cand.x.between(380, 660)) & (cand.y.between(80, 210))
                    & (np.abs((cand.y - 90) - (cand.x - 380) * 110 / 280) < 20)]
    assert len(on_trail) == 1, cand.head(10)
    assert on_trail.n_windows.iloc[0] >= 8


def test_a_faint_trail_is_one_linear_candidate_by_its_line_term(field):
    """A satellite trail 4 sky sigma on its axis in r alone (the simulator draws 2-50), across the tile boundary
    x = 512: no pixel of it stands much above the noise, but its windows' line term does (the best 7.4, every
    normal window's 4.0 or less); it is one candidate (its pieces on one line joined), shape "linear", in r, placed on the
    trail. The normal windows' line term stays below LINE_OFFSET + 2 (the merge's sigma 2) but for a few in a
    thousand."""
    stage, clean = field["stage"], field["clean"]
    x0, y0, x1, y1 = 150.0, 380.0, 900.0, 470.0
    maps = []
    for tile in field["tiles"]:
        t = _copy(tile)
        r = t.bands.index("r")
        add_satellite_trail(t.image[r], x0 - t.box.x0, y0 - t.box.y0, x1 - t.box.x0, y1 - t.box.y0, 1.2,
                            4 * _sky_sigma(t, "r"))
        maps.append(stage.windows(t))
    w = pd.concat(maps, ignore_index=True)
    dist = np.abs((w.y - y0) * (x1 - x0) - (w.x - x0) * (y1 - y0)) / np.hypot(x1 - x0, y1 - y0)
    on = w[(dist < 16) & w.x.between(x0 + 16, x1 - 16) & w.coarse]  # the line term is taken on the coarse windows
    assert (w.line[~w.coarse] > 0).any() and (clean.line[~clean.coarse] > 0).sum() < 0.1 * len(clean)  # by lines
    assert on.line.median() > LINE_OFFSET + 1, on[["x", "y", "line", "score"]]  # 4.9; the normal windows' 99th 1.9
    assert (on.line_band[on.line > LINE_OFFSET] == "r").all()
    assert (clean.line > LINE_OFFSET + 2).mean() < 0.005 and clean.line.max() < on.line.max()
    both = pd.concat([clean[~clean.set_index(["ky", "kx"]).index.isin(w.set_index(["ky", "kx"]).index)], w],
                     ignore_index=True)
    cand, stats = build_candidates(both, 4.0, stage.stride)
    assert stats["line_windows"] >= len(on) // 2
    near = cand[np.abs((cand.y - y0) * (x1 - x0) - (cand.x - x0) * (y1 - y0)) / np.hypot(x1 - x0, y1 - y0) < 3]
    trail = near[near.x.between(x0, x1)]
    assert len(trail) == 1, cand.head(10)
    # most of its windows: 23 coarse ones and their neighbours
    assert trail["shape"].iloc[0] == "linear" and "r" in trail.bands.iloc[0] and trail.n_windows.iloc[0] >= 20


def test_a_ring_galaxy_is_a_ring_candidate_and_normal_light_none(field):
    """The simulator's ring galaxy (i = 21, ring radius 2", two knots, a nucleus 2.5 mag fainter) drawn into a
    tile of the normal field: the windows about it carry the ring term, many times the noise, and the merge lists
    it as one "ring" candidate within 3 px of its centre (the rim's, not the moat's deepest point beside the
    nucleus); no window of the normal field (galaxies, stars, masked
    defects: 1024^2 px) has a ring term that the merge would rank at 2.5 sigma (sigma_grow)."""
    import galsim

    from deepfield.tasks.sim.anomalies import RingGalaxy
    from deepfield.tasks.stages._rings import RING_OFFSET
    stage, clean = field["stage"], field["clean"]
    assert (clean.ring - RING_OFFSET).max() < 2.5, clean.sort_values("ring").tail(3)
    tile = field["tiles"][0]
    t = _copy(tile)
    cx, cy = 300.0, 280.0  # field pixels, in the tile's core
    bands = list(t.bands)
    ring = RingGalaxy(id=1, ra=0.0, dec=0.0, z=0.1, ring_mag={b: 21.2 for b in bands},
                      nucleus_mag={b: 23.7 for b in bands}, ring_radius=2.0, ring_width=0.25, q=0.8, pa=30.0,
                      knot_angles=(40.0, 200.0), knot_fracs=(0.15, 0.1))
    for k, b in enumerate(bands):
        psf = galsim.Gaussian(fwhm=float(t.psf_fwhm[k]))
        img = galsim.Convolve(ring.profile(b, float(t.zeropoints[k])), psf).drawImage(
            nx=81, ny=81, scale=float(t.pixel_scale)).array
        y0, x0 = int(cy) - 40 - t.box.y0, int(cx) - 40 - t.box.x0
        t.image[k, y0:y0 + 81, x0:x0 + 81] += img.astype(t.image.dtype)
    w = stage.windows(t)
    near = _near(w, cx, cy, 16)
    assert near.ring.max() >= RING_OFFSET + 10, near[["x", "y", "ring", "score"]]
    both = pd.concat([clean[~clean.set_index(["ky", "kx"]).index.isin(w.set_index(["ky", "kx"]).index)], w],
                     ignore_index=True)
    cand, _ = build_candidates(both, 5.0, stage.stride)
    ringed = cand[cand["shape"] == "ring"]
    assert len(ringed) == 1, cand.head()
    assert np.hypot(ringed.x.iloc[0] - cx, ringed.y.iloc[0] - cy) <= 3.0  # at the ring's centre (its rim's)


def test_scores_unchanged_by_a_constant_sky(field):
    """In float32: the background stage takes the constant out, and the scores are the same to 2e-3 (bfloat16's
    rounding alone moves them by up to a few per cent: the next test)."""
    stage = AnomalyStage(rescore=0, precision="float32")
    stage.setup("cpu")
    tile = field["raw"][0]
    a, b = _copy(tile), _copy(tile)
    b.image = b.image + np.float32(50.0) * np.array([_sky_sigma(tile, x) for x in tile.bands], np.float32)[:, None, None]
    for t in (a, b):
        BackgroundStage().run(t, pd.DataFrame())
    sa, sb = stage.windows(a).score.to_numpy(), stage.windows(b).score.to_numpy()
    np.testing.assert_allclose(sb, sa, rtol=2e-3, atol=2e-3)


def test_bfloat16_scores_follow_float32(field):
    """precision bfloat16 (the default `auto` on a CPU with AVX512-BF16 or AMX; emulated, slower, elsewhere)
    against float32 on every window of a tile: each score within 8 % (the median within 1.5 %; 4.2 and 0.54 %
    measured), the ranking the same (Spearman > 0.998) and the windows of the top 2 % the same but for a tenth
    of them."""
    from scipy.stats import spearmanr
    tile = field["tiles"][0]
    scores = {}
    for precision in ("float32", "bfloat16"):
        stage = AnomalyStage(rescore=0, refine=1.0, precision=precision)
        stage.setup("cpu")
        assert stage.arithmetic == precision
        scores[precision] = stage.windows(tile).score.to_numpy(np.float64)
    a, b = scores["float32"], scores["bfloat16"]
    rel = np.abs(b - a) / np.abs(a)
    assert np.median(rel) < 0.015 and rel.max() < 0.08, (np.median(rel), rel.max())
    assert spearmanr(a, b)[0] > 0.998
    k = max(1, len(a) // 50)
    top_a, top_b = set(np.argsort(-a)[:k]), set(np.argsort(-b)[:k])
    assert len(top_a & top_b) >= 0.9 * k, (len(top_a & top_b), k)
