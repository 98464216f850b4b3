"""Tests of the measuring helpers on plain arrays: the Gaussian-aperture sums (tasks/stages/measure.py:
gaussian_aperture) against hand-computed fluxes, and band_pixels (tasks/stages/_pixels.py) against its plain
form."""
from __future__ import annotations

import numpy as np
import pytest

from deepfield.tasks import maskbits


def _gauss_image(shape, x0, y0, sigma, flux):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return flux * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / sigma ** 2) / (2 * np.pi * sigma ** 2)


def test_gaussian_aperture_colours_do_not_depend_on_the_seeing():
    """Gaussian-aperture (GAaP-like) fluxes as the measure stage takes them: with Gaussian PSFs of sigma 1.5 and
    2.5 px in two bands and sigma_g = 1.5 x 2.5 px, a point source of flux 1000 gives 1000 in both bands, and a
    Gaussian galaxy of sigma 2 px gives the pre-seeing weighted flux F sigma_g^2 / (sigma_g^2 + 2^2) in both
    (hand-computed), where a sharp circular aperture of 1 FWHM radius reads the two bands more than 10 % apart.
    Masked pixels and a neighbour's segment are left out and made up for by the weight kept."""
    from deepfield.tasks.stages.measure import gaussian_aperture
    shape, x0, y0, sig_g = (80, 80), 40.3, 37.8, 1.5 * 2.5
    err, bad = np.ones(shape), np.zeros(shape, bool)
    for sig_s, expect in ((0.0, 1000.0), (2.0, 1000.0 * sig_g ** 2 / (sig_g ** 2 + 4.0))):
        got, sharp = [], []
        for sig_p in (1.5, 2.5):
            img = _gauss_image(shape, x0, y0, np.hypot(sig_s, sig_p), 1000.0)
            sig_b = np.sqrt(sig_g ** 2 - sig_p ** 2)
            f, e = gaussian_aperture(img, err, bad, np.array([x0]), np.array([y0]), sig_b)
            got.append(f[0] * (sig_g / sig_b) ** 2)
            sharp.append(float(img[np.hypot(*np.mgrid[0:80, 0:80][::-1] - np.array([x0, y0])[:, None, None]) < 2.355 * 2.5].sum()))
            # the error: sqrt(sum w^2) for unit noise, w a Gaussian of sigma_b: sqrt(pi sigma_b^2)
            assert e[0] == pytest.approx(np.sqrt(np.pi) * sig_b, rel=2e-3)
        assert got == pytest.approx([expect, expect], rel=2e-3)
        if sig_s:
            assert abs(sharp[0] / sharp[1] - 1) > 0.1  # what the colour of a fixed aperture would carry
    # a masked block and a neighbour's segment: left out, the rest scaled up by the weight kept
    img = _gauss_image(shape, 40.0, 40.0, 2.0, 1000.0)
    full = gaussian_aperture(img, err, bad, np.array([40.0]), np.array([40.0]), 3.0)[0][0]
    holes = bad.copy()
    holes[40:, 40:] = True  # a quarter (and its two half-axes): the kept weight is measured, not assumed
    seg = np.zeros(shape, np.int32)
    seg[:40, :40] = 2  # another source's segment
    kept = gaussian_aperture(img, err, holes, np.array([40.0]), np.array([40.0]), 3.0, segmap=seg,
                             seg_id=np.array([1]))[0][0]
    yy, xx = np.mgrid[0:80, 0:80]
    w = np.exp(-0.5 * ((xx - 40.0) ** 2 + (yy - 40.0) ** 2) / 9.0) * ((abs(xx - 40) <= 12) & (abs(yy - 40) <= 12))
    keep = ~holes & (seg == 0)
    assert kept == pytest.approx((w * img * keep).sum() * w.sum() / (w * keep).sum(), rel=1e-9)
    # half the weight gone, the centre pixel with it (where this source is more peaked than the weight): the
    # scaled sum is still within 5 % of the whole one
    assert kept == pytest.approx(full, rel=0.05)
    seg[:, :] = 2  # nothing left: NaN, not zero
    assert np.isnan(gaussian_aperture(img, err, bad, np.array([40.0]), np.array([40.0]), 3.0, segmap=seg,
                                      seg_id=np.array([1]))[0][0])


def test_band_pixels_match_their_plain_form_to_the_bit():
    """stages._pixels.band_pixels (made in place, for speed) gives what its plain form gives, to the bit, with
    NaN and infinite pixels, an infinite, a negative and a NaN inverse variance and masked pixels: the image with
    non-finite values set to 0, 1/sqrt(invvar) with 0 where unusable, and the unusable pixels."""
    from types import SimpleNamespace

    from deepfield.tasks.stages._pixels import band_pixels
    rng = np.random.default_rng(3)
    image = rng.normal(0, 1, (3, 40, 50)).astype(np.float32)
    invvar = rng.uniform(0.5, 2, (3, 40, 50)).astype(np.float32)
    mask = np.zeros((3, 40, 50), np.uint16)
    image[0, 5:7, 5:9] = np.nan
    image[1, 8, 8] = np.inf
    invvar[1, 20:22, 5:9] = np.inf
    invvar[2, 30, 30] = -1
    invvar[2, 31, 30] = 0
    invvar[0, 12, 12] = np.nan
    mask[2, 1:4, 1:4] = maskbits.SAT
    tile = SimpleNamespace(image=image, invvar=invvar, mask=mask)
    for b in range(3):
        img, iv = image[b].astype(np.float64), invvar[b].astype(np.float64)
        finite = np.isfinite(img) & np.isfinite(iv)
        with np.errstate(invalid="ignore"):
            bad = (mask[b] != 0) | ~finite | ~(iv > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            plain = (np.where(finite, img, 0.0), np.where(bad, 0.0, 1.0 / np.sqrt(np.where(bad, 1.0, iv))), bad)
        for got, want in zip(band_pixels(tile, b), plain):
            assert got.dtype == want.dtype and got.flags["C_CONTIGUOUS"]
            assert got.tobytes() == want.tobytes()
    assert band_pixels(tile, 2)[2][30, 30] and band_pixels(tile, 2)[2][2, 2] and band_pixels(tile, 0)[1][12, 12] == 0


def test_a_compact_sources_kron_aperture_is_never_smaller_than_its_ellipse():
    """The AUTO aperture of a compact source (a round Gaussian of sigma 1.3 px, flux 1000, no noise; shapes a = b
    = 1 px, as a faint detection's isophotal moments give): the Kron ellipse of kron_k = 3.5 Kron radii (about
    1.6 for this profile, so about 5.6 px) holds the flux to 1 %. Before 2026-12-07 a Kron radius times sqrt(a b)
    under min_radius (1.75 px) swapped the ellipse for a circle of 1.75 px, which holds 1 - exp(-1.75^2 / (2
    1.3^2)) = 0.60 of it. With the ellipse bounded by a 5-pixel footprint (2.5 footprint radii, 3.15 px) the
    floor of kron_min = 3.5 a holds 1 - exp(-3.5^2 / (2 1.3^2)) = 0.973 (hand-computed; SEP's sums count the
    pixels whose centres are inside: within 2 %)."""
    from deepfield.tasks.stages._kron import kron_aperture
    sigma, x0, y0 = 1.3, 30.0, 31.0
    img = _gauss_image((64, 64), x0, y0, sigma, 1000.0)
    bad = np.zeros(img.shape, bool)
    one = np.array([1.0])
    args = (img, bad, np.array([x0]), np.array([y0]), one, one, np.array([0.0]))
    ap, kron, _ = kron_aperture(*args, None, {}, k=3.5, rmax=6.0, max_footprint=2.5, min_radius=1.75,
                                min_scale=3.5)
    assert 1.4 < kron[0] < 1.8 and not ap.circle[0]
    assert ap.sum(img)[0][0] == pytest.approx(1000.0, rel=0.01)
    ap, kron, _ = kron_aperture(*args, np.array([5.0]), {}, k=3.5, rmax=6.0, max_footprint=2.5, min_radius=1.75,
                                min_scale=3.5)
    assert ap.reach()[0] == pytest.approx(3.5) and kron[0] == pytest.approx(1.0)
    assert ap.sum(img)[0][0] == pytest.approx(1000.0 * (1 - np.exp(-3.5 ** 2 / (2 * sigma ** 2))), rel=0.02)


def test_kron_sums_count_a_neighbours_segment_as_its_mirror_image():
    """A round Gaussian (sigma 2 px, flux 1000, no noise) whose Kron aperture (a circle of 8 px) holds part of a
    neighbour's segment: with `mirror` (the measure stage's kron_mirror, Source Extractor's MASK_TYPE CORRECT)
    those pixels count as their mirror images about the centre, so the sum is the source's own light (the same
    pixels unmasked) to 0.1 %, whatever the neighbour adds there; SEP's area scaling instead fills them with the
    aperture's mean, which for a segment in the faint outskirts is too bright (hand-computed: more than 3 %)."""
    from deepfield.tasks.stages._kron import KronAperture
    x0, y0 = 30.0, 31.0
    img = _gauss_image((64, 64), x0, y0, 2.0, 1000.0)
    seg = np.ones(img.shape, np.int32)
    seg[:, 36:] = 2  # the neighbour's segment: columns 6 px and more to the right of the centre
    lit = img + np.where(seg == 2, 5.0, 0.0)  # the neighbour's light there
    one = np.array([1.0])

    def aperture(mirror: bool) -> KronAperture:
        return KronAperture(np.array([x0]), np.array([y0]), one, one, np.array([0.0]), np.array([8.0]),
                            np.array([False]), 1.75, dict(segmap=seg, seg_id=np.array([1], np.int32)), mirror=mirror)
    whole = KronAperture(np.array([x0]), np.array([y0]), one, one, np.array([0.0]), np.array([8.0]),
                         np.array([False]), 1.75).sum(img)[0][0]
    none = np.zeros(img.shape, bool)  # the stage always gives SEP a mask, which turns its area scaling on
    assert aperture(True).sum(lit, mask=none, masked=True)[0][0] == pytest.approx(whole, rel=1e-3)
    assert aperture(False).sum(lit, mask=none, masked=True)[0][0] > 1.03 * whole
    assert aperture(True).sum(lit, mask=none)[0][0] > whole + 50  # unmasked: the neighbour's light is in
