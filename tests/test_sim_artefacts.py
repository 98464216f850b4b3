"""Behaviour of the simulator's instrumental artefacts: trails, cosmic rays, ghosts, hot pixels,
amplifier offsets, and their sampling per field."""
import json
import math

import galsim
import numpy as np
import pytest

from deepfield.tasks.sim import artefacts as A
from deepfield.tasks.sim.config import ArtefactConfig

PIX = 0.2


# ------------------------------------------------------------------ trails

def test_trail_flux_per_length_and_locality():
    img = np.zeros((300, 400), np.float32)
    sig, sb = 1.7, 10.0
    e = A.add_satellite_trail(img, -0.5, 40.0, 399.5, 260.0, sig, sb)
    theta = math.atan2(220.0, 400.0)
    # a column integrates the cross-section over a vertical cut: per unit length x cos(theta)
    for col in (100, 200, 300):
        per_length = img[:, col].sum() * math.cos(theta)
        assert per_length == pytest.approx(sb * math.sqrt(2 * math.pi) * sig, rel=0.02)
    yy, xx = np.mgrid[0:300, 0:400]
    d = np.abs((xx + 0.5) * 220.0 - (yy - 40.0) * 400.0) / math.hypot(220.0, 400.0)
    assert np.all(img[d > 6 * sig] == 0)
    assert img[d < 0.3].min() > 0.9 * sb
    assert e["type"] == "satellite_trail" and e["x"] == pytest.approx(199.5) and e["npix"] > 0


def test_steep_trail_and_bad_arguments():
    img = np.zeros((200, 100), np.float32)
    A.add_satellite_trail(img, 50.0, -0.5, 60.0, 199.5, 1.5, 4.0)
    assert img[100].sum() == pytest.approx(4.0 * math.sqrt(2 * math.pi) * 1.5, rel=0.02)
    with pytest.raises(ValueError):
        A.add_satellite_trail(img, 1, 1, 1, 1, 1.5, 4.0)
    with pytest.raises(ValueError):
        A.add_satellite_trail(img, 0, 0, 5, 5, 0.0, 4.0)
    with pytest.raises(ValueError):
        A.add_satellite_trail(np.zeros(10), 0, 0, 5, 5, 1.0, 4.0)


# ------------------------------------------------------------------ ghosts

def test_ghost_is_annulus():
    img = np.zeros((300, 300), np.float32)
    e = A.add_ghost(img, 150.0, 140.0, radius_pix=50.0, width_pix=30.0, amplitude=2.0)
    yy, xx = np.mgrid[0:300, 0:300]
    r = np.hypot(xx - 150.0, yy - 140.0)
    ring, centre, outside = img[np.abs(r - 50) < 5].mean(), img[r < 20].mean(), img[r > 80].mean()
    assert ring == pytest.approx(2.0, rel=0.02)
    assert ring > 100 * max(centre, outside, 1e-6)
    assert np.all(img[r > 80] == 0) or outside < 1e-4
    assert e["flux"] == pytest.approx(2.0 * 2 * math.pi * 50 * 30, rel=0.03)
    with pytest.raises(ValueError):
        A.add_ghost(img, 10, 10, 20, 50, 1.0)


# ------------------------------------------------------------------ cosmic rays and hot pixels

def test_cosmic_rays_are_sharp():
    rng = np.random.default_rng(3)
    img = np.zeros((256, 256), np.float64)
    crs = A.add_cosmic_rays(img, rng, 40, sky_sigma=5.0)
    assert len(crs) == 40 and {c["shape"] for c in crs} == {"hit", "worm"}
    psf_peak_frac = galsim.Moffat(beta=3.5, fwhm=0.75 / PIX).drawImage(nx=33, ny=33, scale=1).array.max()
    total = np.zeros_like(img)
    for c in crs:
        ys, xs, v = A._cosmic_ray_pixels(c, img.shape)
        total[ys, xs] += v
        assert v.max() >= 20 * 5.0 * 0.4 and len(v) == c["npix"]
        if c["shape"] == "hit":
            assert v.max() / v.sum() > 0.6 > 5 * psf_peak_frac
            w = v / v.sum()
            var = np.sum(w * ((xs - np.sum(w * xs)) ** 2 + (ys - np.sum(w * ys)) ** 2))
            assert math.sqrt(var) < 0.7
        else:  # a worm is thin across its track
            cov = np.cov(np.vstack([xs, ys]), aweights=v)
            assert math.sqrt(max(np.linalg.eigvalsh(cov)[0], 0)) < 0.7
            assert c["length_pix"] >= 2 and len(v) >= 2
    np.testing.assert_allclose(img, total)


def test_hot_pixels_and_amp_offset():
    rng = np.random.default_rng(4)
    img = np.zeros((64, 128), np.float32)
    hp = A.add_hot_pixels(img, rng, 6, (100.0, 200.0))
    for h in hp:
        p = np.array(h["pixels"])
        assert 1 <= len(p) <= 4 and np.all(img[p[:, 1], p[:, 0]] >= h["amplitude"] - 1e-3)
        assert 100 <= h["amplitude"] <= 200
    assert np.count_nonzero(img) <= sum(h["npix"] for h in hp)
    img = np.zeros((64, 128), np.float32)
    e = A.add_amp_offset(img, 32, 64, 3.0, gradient=0.01)
    assert np.all(img[:, :32] == 0) and np.all(img[:, 64:] == 0)
    assert img[:, 32:64].mean() == pytest.approx(3.0, abs=1e-5) and img[63, 40] > img[0, 40]
    assert e["npix"] == 64 * 32
    with pytest.raises(ValueError):
        A.add_amp_offset(img, 100, 200, 1.0)


# ------------------------------------------------------------------ field sampling

def _sample(seed):
    cfg = ArtefactConfig(satellite_trails=2.0, amp_artefact_prob=1.0, cosmic_rays=10)
    bands = ["g", "r"]
    return A.sample_field_artefacts(np.random.default_rng(seed), cfg, (512, 512), bands,
                                    {"g": 3.0, "r": 5.0}, {"g": 1.4, "r": 1.3},
                                    [(100.0, 400.0, 5e6), (300.0, 250.0, 2e6)], field_id=3)


def test_sample_field_artefacts_deterministic_and_complete():
    a, b = _sample(42), _sample(42)
    assert a == b and a != _sample(43)
    json.dumps(a)
    ids = [e["anomaly_id"] for e in a]
    assert len(set(ids)) == len(ids) and all(300000 <= i < 400000 for i in ids)
    for e in a:
        assert {"anomaly_id", "type", "band", "x", "y", "npix"} <= set(e)
        assert e["band"] in ("g", "r", "all")
    types = {e["type"] for e in a}
    assert {"cosmic_ray", "ghost", "hot_pixels", "amp_offset"} <= types
    assert sum(e["type"] == "ghost" for e in a) == 2
    assert sum(e["type"] == "cosmic_ray" and e["band"] == "g" for e in a) == 10
    for e in a:
        if e["type"] == "satellite_trail":
            on_edge = [e[k] in (-0.5, 0.0, 511.0, 511.5) for k in ("x0", "y0", "x1", "y1")]
            assert on_edge[0] or on_edge[1]
    img1, img2 = np.zeros((512, 512), np.float32), np.zeros((512, 512), np.float32)
    A.apply_artefacts(img1, "g", a, np.random.default_rng(0))
    A.apply_artefacts(img2, "g", b, np.random.default_rng(99))
    np.testing.assert_array_equal(img1, img2)
    assert img1.max() > 0
    r_only = np.zeros((512, 512), np.float32)
    A.apply_artefacts(r_only, "r", [e for e in a if e["band"] == "g"], None)
    assert not r_only.any()
    with pytest.raises(ValueError):
        A.sample_field_artefacts(np.random.default_rng(0), ArtefactConfig(), (512, 512), ["i"],
                                 {"g": 1.0}, {"g": 1.0}, [], 0)
