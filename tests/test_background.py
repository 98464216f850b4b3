"""The background stage (tasks/stages/background.py): the smooth SEP model and its source mask, and the sky steps
(amplifier offsets) it takes out first (tasks/stages/_sky_steps.py), on synthetic tiles (tests/_tiles.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from _tiles import BANDS, SIGMA, galaxy, make_tile, point
from deepfield.tasks import maskbits
from deepfield.tasks.stages.background import BackgroundStage
from deepfield.tasks.tiling import Box


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
