"""Symmetric, monotonic templates of the deblend stage (tasks/stages/_templates.py) against hand-computed
geometry and noiseless blends of known light (a simulated galaxy pair: tests/test_deblend.py)."""
from __future__ import annotations

import numpy as np

from deepfield.tasks.stages._templates import (blend_templates, geometry, mirror_pad, symmetric_monotonic,
                                               template_fractions)


def _path_minimum(img: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """Reference: each pixel of a symmetric template (B, S, S) takes the minimum along its path of one-pixel
    steps towards the centre, followed pixel by pixel."""
    b, s, _ = img.shape
    cy, cx = centre
    out = img.copy()
    for y in range(s):
        for x in range(s):
            py, px, m = y, x, img[:, y, x].copy()
            while np.hypot(cy - py, cx - px) > 1.0:
                d = np.hypot(cy - py, cx - px)
                py, px = int(np.rint(py + (cy - py) / d)), int(np.rint(px + (cx - px) / d))
                m = np.minimum(m, img[:, py, px])
            out[:, y, x] = m
    return out


def test_pointer_doubling_is_the_minimum_along_each_path():
    """The vectorised monotonic projection equals the pixel-by-pixel walk to the centre, and the symmetric step
    is min(I(x), I(2c - x)) with light from outside the stamp counted as 0, for two centres at once."""
    rng = np.random.default_rng(0)
    s = 21
    img = rng.uniform(0, 1, (2, s, s)).astype(np.float32)
    centres = np.array([(10.0, 10.0), (6.3, 13.6)])
    got = symmetric_monotonic(np.stack([img, img]), geometry(s, centres))
    for k, (cy, cx) in enumerate(centres):
        sym = np.zeros_like(img)
        for y in range(s):
            for x in range(s):
                my, mx = int(np.rint(2 * cy)) - y, int(np.rint(2 * cx)) - x
                if 0 <= my < s and 0 <= mx < s:
                    sym[:, y, x] = min(img[0, y, x], img[0, my, mx]), min(img[1, y, x], img[1, my, mx])
        np.testing.assert_array_equal(got[k], _path_minimum(sym, (cy, cx)))


def test_a_symmetric_monotonic_profile_is_its_own_template():
    """A round Gaussian centred on a pixel is symmetric and monotonic: its template is itself (no smoothing)."""
    s = 31
    yy, xx = np.mgrid[0:s, 0:s]
    g = np.exp(-((yy - 15) ** 2 + (xx - 15) ** 2) / (2 * 3.0 ** 2)).astype(np.float32)[None]
    t = blend_templates(g, np.array([(15.0, 15.0)]), smooth=0.0)
    np.testing.assert_allclose(t[0], g, rtol=1e-6, atol=0)


def test_noiseless_pair_is_shared_by_the_templates():
    """Two noiseless round Gaussians (sigma 2.5 and 2 px, flux ratio 4, 7 px apart): sharing the pixels in
    proportion to the templates gives each its own flux within 2 %; the fainter one's template holds none of the
    bright one's light (under 2 % of its peak 8 px from its centre, 1 px from the bright one's, where the bright
    one's light is 2.4 times the faint one's peak)."""
    s = 48
    yy, xx = np.mgrid[0:s, 0:s]
    centres = np.array([(24.0, 20.0), (24.0, 27.0)])
    prof = [4 * np.exp(-((yy - 24) ** 2 + (xx - 20) ** 2) / (2 * 2.5 ** 2)) / (2 * np.pi * 2.5 ** 2),
            np.exp(-((yy - 24) ** 2 + (xx - 27) ** 2) / (2 * 2.0 ** 2)) / (2 * np.pi * 2.0 ** 2)]
    image = (prof[0] + prof[1]).astype(np.float32)[None] * 1000
    t = blend_templates(image, centres, smooth=0.0)
    flux = (template_fractions(image, centres, smooth=0.0) * image[None]).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(flux, [4000, 1000], rtol=0.02)
    assert t[1, 0, 24, 19] < 0.02 * t[1, 0, 24, 27]


def test_mirror_images_beyond_the_stamp_come_from_the_grown_stamp():
    """A bright exponential disk (scale 4 px, flux 50,000) 12 px right of a 48 px stamp's centre and a faint
    Gaussian (sigma 1.5 px, flux 300) 22 px left of it, noiseless: the bright one's mirror image of the faint
    one's pixels lies beyond the stamp. Read from the grown stamp (mirror_pad: 25 px), each member gets its own
    light within 1 %; counted as 0 there, as before 2026-12-05, the bright one had no template on the faint one's
    side and the faint one took the wing: 8.8 times its flux."""
    s, margin = 48, 48
    yy, xx = np.mgrid[0:s + 2 * margin, 0:s + 2 * margin] - margin
    disk = 50000 * np.exp(-np.hypot(yy - 24, xx - 36) / 4.0) / (2 * np.pi * 4.0 ** 2)
    faint = 300 * np.exp(-((yy - 24) ** 2 + (xx - 14) ** 2) / (2 * 1.5 ** 2)) / (2 * np.pi * 1.5 ** 2)
    centres = np.array([(24.0, 36.0), (24.0, 14.0)])
    pad = mirror_pad(s, centres)
    assert pad == 25  # the mirror of the stamp's first column about the disk's centre: x = 2 x 36 - 0 = 72 = 47 + 25
    image = (disk + faint).astype(np.float32)[None]
    stamp = image[:, margin:margin + s, margin:margin + s]
    grown = image[:, margin - pad:margin + s + pad, margin - pad:margin + s + pad]
    true = [disk[margin:margin + s, margin:margin + s].sum(), faint[margin:margin + s, margin:margin + s].sum()]
    flux = (template_fractions(stamp, centres, smooth=0.0, grown=grown) * stamp[None]).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(flux, true, rtol=0.01)
    before = (template_fractions(stamp, centres, smooth=0.0) * stamp[None]).sum(axis=(1, 2, 3))
    assert before[1] > 5 * true[1]
    # smoothed as the stage does, the same
    flux = (template_fractions(stamp, centres, smooth=0.5, grown=grown) * stamp[None]).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(flux, true, rtol=0.02)


def test_a_saturated_core_constrains_no_template():
    """A bright star (Moffat, index 3, FWHM 4 px, flux 10^6) whose 5 x 5 px core is saturated (masked: 0 in the
    stamp, as the deblend stage cuts it) and a faint Gaussian galaxy (sigma 2 px, flux 2,000) 14 px from it,
    noiseless, in two bands. Told which pixels are unknown, each member gets what it gets when the core is
    measured (within 1 %): the star its light outside the core, the galaxy its own within 10 %, smoothed as the
    stage does; a masked pixel on the galaxy (a cosmic ray) costs it that pixel's light only. With the core
    counted as 0, as before 2026-12-06, the star's template was all but empty (it kept 17 % of its light) and
    the galaxy took its wing: 46-92 times its flux."""
    s = 48
    yy, xx = np.mgrid[0:s, 0:s]
    alpha = 4.0 / (2 * np.sqrt(2 ** (1 / 3.0) - 1))
    star = 1e6 * (3.0 - 1) / (np.pi * alpha ** 2) * (1 + ((yy - 20) ** 2 + (xx - 20) ** 2) / alpha ** 2) ** -3.0
    gal = 2000 * np.exp(-((yy - 20) ** 2 + (xx - 34) ** 2) / (2 * 2.0 ** 2)) / (2 * np.pi * 2.0 ** 2)
    centres = np.array([(20.0, 20.0), (20.0, 34.0)])
    core = (np.abs(yy - 20) <= 2) & (np.abs(xx - 20) <= 2)
    full = np.stack([star + gal, 0.5 * star + gal]).astype(np.float32)
    image = full.copy()
    image[:, core] = 0.0
    for smooth in (0.0, 0.5):
        measured = (template_fractions(full, centres, smooth=smooth) * full[None]).sum(axis=(2, 3))
        flux = (template_fractions(image, centres, smooth=smooth, unknown=core) * image[None]).sum(axis=(2, 3))
        np.testing.assert_allclose(flux[0], [star[~core].sum(), 0.5 * star[~core].sum()], rtol=0.01)
        np.testing.assert_allclose(flux[1], measured[1], rtol=0.01)
        np.testing.assert_allclose(flux[1], gal.sum(), rtol=0.10)
    hit = core.copy()
    hit[20, 35] = True  # a masked pixel on the galaxy
    image_hit = image.copy()
    image_hit[:, 20, 35] = 0.0
    flux = (template_fractions(image_hit, centres, smooth=0.5, unknown=hit) * image_hit[None]).sum(axis=(2, 3))
    np.testing.assert_allclose(flux[1], measured[1] - gal[20, 35], rtol=0.02)
    before = (template_fractions(image, centres, smooth=0.5) * image[None]).sum(axis=(2, 3))
    assert (before[1] > 40 * gal.sum()).all() and (before[0] < 0.2 * star[~core].sum()).all()
