"""The anomaly stage's ring term (tasks/stages/_rings.py): enclosed depressions of the light found in ring galaxies
and nowhere in normal light, their windows, and the merge's ranking by them (catalogs/anomaly_candidates.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from deepfield.catalogs.anomaly_candidates import build_candidates, ranked_sigma
from deepfield.tasks.stages._pixels import filtered_snr, gaussian_kernel
from deepfield.tasks.stages._rings import RING_OFFSET, ring_depth, ring_search

FWHM = 3.6  # px, the PSF
SIG = FWHM / 2.3548


def _ring(yy, xx, x0, y0, radius, q, width, flux):
    """An elliptical Gaussian ring (major axis along x) seen through the Gaussian PSF, total `flux`."""
    r = np.hypot(xx - x0, (yy - y0) / q)
    img = np.exp(-0.5 * ((r - radius) / width) ** 2)
    return ndimage.gaussian_filter(img, SIG) * flux / img.sum()


def _blob(yy, xx, x0, y0, scale, q, flux, exponential=True):
    r = np.hypot(xx - x0, (yy - y0) / q)
    img = np.exp(-r / scale) if exponential else np.exp(-0.5 * (r / scale) ** 2)
    return ndimage.gaussian_filter(img, SIG) * flux / img.sum()


def _scene(seed: int = 7):
    """A 320^2 image of unit white noise with two ring galaxies (a large one, R = 11 px, and a small bright
    one, R = 6 px with q = 0.6, which only the finer scale resolves), each with a faint nucleus, and normal light:
    a bright exponential disc, an elongated one, two pairs of galaxies, a compact group of three galaxies about
    a fainter middle (a depression, but its rim uneven: deep saddles between the cores) and a saturated
    star whose core has no data."""
    n = 320
    yy, xx = np.mgrid[:n, :n].astype(float)
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, n))
    rings = [(60.0, 60.0, 11.0), (200.0, 70.0, 6.0)]  # x, y, radius
    img += _ring(yy, xx, 60, 60, 11, 0.8, 1.3, 4000) + _blob(yy, xx, 60.5, 59.5, 0.8, 1.0, 300, False)
    img += _ring(yy, xx, 200, 70, 6, 0.6, 1.0, 6000) + _blob(yy, xx, 200, 70, 0.8, 1.0, 600, False)
    img += _blob(yy, xx, 80, 200, 5.0, 0.9, 20000)  # a bright disc
    img += _blob(yy, xx, 200, 200, 6.0, 0.3, 8000)  # an elongated one
    img += _blob(yy, xx, 270, 180, 2.0, 0.8, 3000) + _blob(yy, xx, 278, 184, 2.0, 0.8, 2500)  # a close pair
    img += _blob(yy, xx, 140, 260, 1.5, 1.0, 2000) + _blob(yy, xx, 152, 262, 3.0, 0.5, 4000)  # a wider pair
    for a in (0, 120, 240):  # a compact group: three galaxies 9 px about a middle
        img += _blob(yy, xx, 140 + 9 * np.cos(np.radians(a)), 160 + 9 * np.sin(np.radians(a)), 1.5, 1.0, 4000)
    img += _blob(yy, xx, 260, 260, 1.2, 1.0, 2e5, False)  # a star, its core saturated
    bad = np.hypot(xx - 260, yy - 260) <= 3
    img[bad] = 0.0
    return img, np.ones_like(img), bad, rings


def _search(det, noise, bad, **kw):
    snr, scale = filtered_snr(det, noise, bad, FWHM)
    guard = gaussian_kernel(FWHM).shape[0] // 2
    return ring_search(snr, det, noise, bad, FWHM, scale, 16, 8.0, guard, **kw)


def test_ring_galaxies_have_deep_depressions_and_normal_light_none():
    det, noise, bad, rings = _scene()
    x, y, depth = _search(det, noise, bad)
    assert len(x), "no depression found"
    # inside each ring (beside its nucleus: the moat between the two is the deepest)
    inside = [np.hypot(x - rx, y - ry) <= 0.8 * r for rx, ry, r in rings]
    for (rx, ry, r), near in zip(rings, inside):
        assert near.any(), (rx, ry, list(zip(x, y, depth)))
        assert depth[near].max() >= RING_OFFSET + 5  # above the merge's sigma_cut
    elsewhere = ~np.logical_or.reduce(inside)
    assert not elsewhere.any(), list(zip(x[elsewhere], y[elsewhere], depth[elsewhere]))
    assert depth[inside[0]].max() >= 20  # the large ring's depression: many times the noise
    # only minima inside a box: the second ring's alone
    x2, y2, _ = _search(det, noise, bad, box=(40, 100, 170, 230))
    assert len(x2) and np.all(np.hypot(x2 - 200, y2 - 70) <= 0.8 * 6)


def test_noise_alone_has_no_depression():
    rng = np.random.default_rng(3)
    det = rng.standard_normal((400, 400))
    x, _, _ = _search(det, np.ones_like(det), np.zeros(det.shape, bool))
    assert len(x) == 0


def test_ring_depth_of_windows():
    """Each window's deepest depression inside it and where it lies, hand-computed."""
    x, y, d = np.array([10.0, 20.0, 40.0]), np.array([10.0, 12.0, 5.0]), np.array([5.0, 9.0, 30.0])
    y0, x0 = np.array([0, 0, 0, 16]), np.array([0, 8, 30, 0])
    depth, bx, by = ring_depth(x, y, d, y0, x0, 16)
    assert depth.tolist() == [5.0, 9.0, 30.0, 0.0]
    assert bx[:3].tolist() == [10.0, 20.0, 40.0] and np.isnan(bx[3]) and np.isnan(by[3])


def test_the_merge_ranks_a_window_by_its_ring():
    """A grid of windows of score 1 +- 0.1 where four windows hold a ring's depression (depth 20): one candidate,
    shape "ring", at the depression, sigma 20 - RING_OFFSET; the same windows without the ring column make none."""
    n = 20
    rng = np.random.default_rng(1)
    ky, kx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    w = pd.DataFrame({"field": "f", "ky": ky.ravel(), "kx": kx.ravel()})
    w["x"], w["y"] = w.kx * 16 + 15.5, w.ky * 16 + 15.5
    w["score"] = 1 + 0.1 * rng.standard_normal(len(w))
    w["peak_x"], w["peak_y"] = w.x, w.y
    w["ra"], w["dec"] = 10 + w.peak_x * 0.2 / 3600, w.peak_y * 0.2 / 3600
    w["score_paper"], w["band"] = w.score, "g"
    w["ring"] = np.float32(0.0)
    for c in ("ring_x", "ring_y", "ring_ra", "ring_dec"):
        w[c] = np.nan
    at = (w.ky.isin([7, 8])) & (w.kx.isin([7, 8]))
    w.loc[at, ["ring", "ring_x", "ring_y"]] = [20.0, 140.0, 141.0]
    w.loc[at, "ring_ra"], w.loc[at, "ring_dec"] = 10 + 140 * 0.2 / 3600, 141 * 0.2 / 3600
    sigma, wins = ranked_sigma(np.zeros(len(w)), w.ring.to_numpy())
    assert wins.sum() == 4 and np.allclose(sigma[at.to_numpy()], 20 - RING_OFFSET)
    cand, stats = build_candidates(w, 5.0, 16)
    assert len(cand) == 1 and stats["ring_windows"] == 4, cand
    c = cand.iloc[0]
    assert c["shape"] == "ring" and (c.x, c.y) == (140.0, 141.0) and c.n_windows == 4
    assert abs(c.anomaly_sigma - (20 - RING_OFFSET)) < 1e-6
    assert abs(c.ra - (10 + 140 * 0.2 / 3600)) < 1e-12
    none, _ = build_candidates(w.drop(columns=["ring"]), 5.0, 16)
    assert len(none) == 0


def _ring_tile(seed: int = 3):
    """A synthetic tile (tests/_tiles.py: 160^2 px, 0.25"/px, PSF FWHM 4 px, bands g, r, i) with a ring galaxy in
    its core (ring radius 10 px at q 0.85, three bright knots on it, a faint nucleus) and a pair of galaxies 9 px
    apart beside it."""
    from _tiles import BANDS, galaxy, make_tile, draw
    ny, nx = 160, 160
    yy, xx = np.mgrid[:ny, :nx].astype(float)
    cx, cy = 70.0, 75.0
    sig = 4.0 / 2.3548
    img = np.zeros((len(BANDS), ny, nx), np.float32)
    for b in range(len(BANDS)):
        r = np.hypot(xx - cx, (yy - cy) / 0.85)
        ring = np.exp(-0.5 * ((r - 10.0) / 1.2) ** 2)
        ring = ring / ring.sum() * 6000.0
        for a in (20.0, 150.0, 260.0):  # knots
            kx, ky = cx + 10 * np.cos(np.radians(a)), cy + 8.5 * np.sin(np.radians(a))
            ring += 900.0 * np.exp(-0.5 * ((xx - kx) ** 2 + (yy - ky) ** 2) / 0.6 ** 2) / (2 * np.pi * 0.36)
        ring += 300.0 * np.exp(-0.5 * ((xx - cx) ** 2 + (yy - cy) ** 2) / 0.8 ** 2) / (2 * np.pi * 0.64)
        img[b] = ndimage.gaussian_filter(ring, sig)
    pair = [galaxy(112.0, 60.0, [2500.0] * 3, hlr=0.4), galaxy(112.0, 69.0, [2000.0] * 3, hlr=0.4)]
    img += draw(pair)
    tile, _, _ = make_tile([], seed=seed, noiseless=img)
    return tile, (cx + tile.box.x0, cy + tile.box.y0), [(112.0 + tile.box.x0, 60.0 + tile.box.y0),
                                                        (112.0 + tile.box.x0, 69.0 + tile.box.y0)]


def test_the_detect_stage_makes_a_ring_galaxy_one_source():
    """The ring galaxy's knots and arcs, which the detector finds as sources of their own, are one source centred
    on the ring within 2 px, its segment all of theirs; the pair beside it stays two; merge_rings: false keeps
    the pieces."""
    from deepfield.tasks.stages.detect import DetectStage
    found = {}
    for merge in (False, True):
        tile, (cx, cy), pair = _ring_tile()
        stage = DetectStage(merge_rings=merge)
        stage.setup("cpu")
        out = stage.run(tile, pd.DataFrame())
        found[merge] = (out, tile.meta.get("detect_rings_merged", 0), stage.segmap)
    pieces, _, _ = found[False]
    on_ring = pieces[np.hypot(pieces.x - cx, pieces.y - cy) <= 13]
    assert len(on_ring) >= 2, on_ring  # the detector splits it
    out, merged, segmap = found[True]
    assert merged == 1
    near = out[np.hypot(out.x - cx, out.y - cy) <= 13]
    assert len(near) == 1 and np.hypot(near.x.iloc[0] - cx, near.y.iloc[0] - cy) <= 2.0, near
    assert (segmap == near.seg_id.iloc[0]).sum() == sum((found[False][2] == k).sum() for k in on_ring.seg_id)
    assert list(out.seg_id) == list(range(1, len(out) + 1)) and segmap.max() <= len(out)
    for px, py in pair:
        assert (np.hypot(out.x - px, out.y - py) <= 2).sum() == 1, out
