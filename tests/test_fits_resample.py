"""tasks.fits_input, bands on another pixel grid than the reference band's (tiny hand-made files): resampled onto
it (tasks/fits_align.py: flux, masks, noise per unit area, the PSF widened by the interpolation) and registered
onto its sources first where the band's WCS is off (tasks/fits_register.py)."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from deepfield.tasks import maskbits
from deepfield.tasks.fits_input import load_field
from deepfield.tasks.fits_noise import LAG

from _fits_inputs import NX, NY, SCALE, make_wcs, smooth_sky, spec, write_band


def test_resampled_band(tmp_path):
    wi = make_wcs()
    wg = make_wcs(crpix=(38.2, 35.7), rot_deg=17.0)

    def iv(img):  # the invvar that matches the (noiseless) image's own scatter, as the ingest checks it
        d = (img[:, :-LAG] - img[:, LAG:]).ravel() / np.sqrt(2)
        return np.full((NY, NX), 1 / (1.4826 * np.median(np.abs(d - np.median(d)))) ** 2, np.float32)
    ivg = iv(smooth_sky(wg, (NY, NX)))
    files = {
        "i": write_band(tmp_path, "i", smooth_sky(wi, (NY, NX)), wi, invvar=iv(smooth_sky(wi, (NY, NX)))),
        "g": write_band(tmp_path, "g", smooth_sky(wg, (NY, NX)), wg, invvar=ivg,
                        mask=np.where(np.arange(NX) == 40, maskbits.BAD, 0).astype(np.int16) * np.ones((NY, 1),
                                                                                                   np.int16)),
    }
    f = load_field(spec(files))
    assert f.bands == ["i", "g"] and f.resampled == ["g"]
    assert any("band g resampled onto the i grid with reproject_interp" in n for n in f.notes)
    k = f.bands.index("g")
    inner = (slice(15, NY - 15), slice(15, NX - 15))
    ok = f.mask[k][inner] == 0
    ratio = f.image[k][inner][ok] / f.image[0][inner][ok]
    assert np.all(np.abs(ratio - 1) < 0.01)
    assert f.image[k][inner][ok].sum() == pytest.approx(f.image[0][inner][ok].sum(), rel=1e-3)
    nodata = (f.mask[k] & maskbits.NO_DATA) != 0
    assert nodata.any() and not nodata[inner].any()  # rotated corners fall outside the g image
    assert np.all(f.invvar[k][nodata] == 0) and np.all(f.image[k][nodata] == 0)
    assert ((f.mask[k] & maskbits.BAD) != 0).sum() > NY  # the bad column follows, rotated
    assert np.allclose(f.invvar[k][inner][ok], ivg[0, 0])
    assert np.array_equal(f.image[0], smooth_sky(wi, (NY, NX)))  # the reference band is untouched


def test_a_band_of_coarser_pixels_keeps_its_noise_and_its_psf_width(tmp_path):
    """White noise of sigma 2 on 0.4" pixels (its invvar 1/4) resampled onto an i grid of 0.2" pixels: each input
    pixel's noise is shared by the four output pixels within it, so sums over blocks of output pixels scatter as
    the invvar (1/4 / area = 1) says, where taken per pixel (1/4 / area^2 = 4) it gave errors of half the scatter;
    the header's PSF FWHM of 0.8" is widened by the bilinear interpolation (a triangle 0.4" wide, variance
    0.4^2 / 6) to sqrt(0.8^2 + 2.3548^2 0.4^2 / 6) = 0.8876"; the noise check runs on the band's own pixels."""
    big = (256, 256)
    wi = make_wcs(crpix=(128.5, 128.5), shape=big)
    wg = make_wcs(crpix=(64.5, 64.5), scale=2 * SCALE, shape=(128, 128))
    rng = np.random.default_rng(3)
    files = {"i": write_band(tmp_path, "i", rng.normal(0, 1, big).astype(np.float32), wi,
                             invvar=np.ones(big, np.float32)),
             "g": write_band(tmp_path, "g", rng.normal(0, 2, (128, 128)).astype(np.float32), wg,
                             invvar=np.full((128, 128), 0.25, np.float32), fwhm=0.8)}
    f = load_field(spec(files))
    k = f.bands.index("g")
    assert f.resampled == ["g"] and f.psf_fwhm[k] == pytest.approx(np.sqrt(0.8 ** 2 + 2.3548 ** 2 * 0.16 / 6), rel=1e-4)
    inner = f.image[k][16:-16, 16:-16]
    assert np.allclose(f.invvar[k][16:-16, 16:-16], 1.0)
    for n in (8, 16):  # sums over n x n output pixels: their error from the invvar is n, their scatter n too
        sums = inner[: inner.shape[0] // n * n, : inner.shape[1] // n * n]
        sums = sums.reshape(inner.shape[0] // n, n, -1, n).sum(axis=(1, 3))
        assert 0.85 < sums.std() / n < 1.1, (n, sums.std() / n)
    assert not any("scatter" in note or "rescaled" in note for note in f.notes), f.notes


def _stars_on(w: WCS, shape, ra, dec, sigma_px=1.6, flux=3000.0, seed=0) -> np.ndarray:
    """Gaussian stars at (ra, dec) drawn on the grid of `w` with unit white noise."""
    y, x = np.mgrid[: shape[0], : shape[1]]
    img = np.random.default_rng(seed).normal(0, 1, shape)
    for xs, ys in zip(*w.all_world2pix(ra, dec, 0)):
        img += flux / (2 * np.pi * sigma_px ** 2) * np.exp(-((x - xs) ** 2 + (y - ys) ** 2) / (2 * sigma_px ** 2))
    return img.astype(np.float32)


def test_a_band_whose_wcs_is_off_is_registered_onto_the_reference_bands_sources(tmp_path):
    """Stars drawn in i and g at the same sky positions; g on a grid turned by 10 degrees, its header's CRVAL off
    by 0.4" in Dec (a band from another reduction): resampled by that WCS its stars landed 2 px from i's. Its
    sources are matched to i's, its WCS shifted by the offset measured (0.4"), and the resampled g's stars lie on
    i's within 0.05 px; the same band with a right WCS is resampled without a shift."""
    import sep
    shape = (256, 256)
    wi = make_wcs(crpix=(128.5, 128.5), shape=shape)
    rng = np.random.default_rng(4)
    xs, ys = rng.uniform(20, 236, 60), rng.uniform(20, 236, 60)
    ra, dec = wi.all_pix2world(xs, ys, 0)
    wg = make_wcs(crpix=(128.5, 128.5), rot_deg=10.0, shape=shape)
    g_image = _stars_on(wg, shape, ra, dec, seed=2)
    wrong = wg.deepcopy()
    wrong.wcs.crval = wrong.wcs.crval + np.array([0.0, 0.4 / 3600])
    ones = np.ones(shape, np.float32)
    files = {"i": write_band(tmp_path, "i", _stars_on(wi, shape, ra, dec, seed=1), wi, invvar=ones)}
    (tmp_path / "right").mkdir()
    right = dict(files, g=write_band(tmp_path / "right", "g", g_image, wg, invvar=ones))
    files["g"] = write_band(tmp_path, "g", g_image, wrong, invvar=ones)

    def star_offsets(f):
        k = f.bands.index("g")
        ok = (xs > 40) & (xs < 216) & (ys > 40) & (ys < 216)  # inside the turned grid's cover
        pos = [sep.winpos(np.ascontiguousarray(f.image[j], np.float64), xs[ok], ys[ok], 1.6)[:2] for j in (0, k)]
        return np.median(pos[1][0] - pos[0][0]), np.median(pos[1][1] - pos[0][1])

    f = load_field(spec(files))
    (note,) = [n for n in f.notes if "sources lay" in n]
    assert "band g: its sources lay 0.40" in note and "from the reference band i's" in note, note
    dx, dy = star_offsets(f)
    assert abs(dx) < 0.05 and abs(dy) < 0.05, (dx, dy)
    f = load_field(spec(right))
    assert f.resampled == ["g"] and not any("sources lay" in n for n in f.notes)
    dx, dy = star_offsets(f)
    assert abs(dx) < 0.05 and abs(dy) < 0.05, (dx, dy)
