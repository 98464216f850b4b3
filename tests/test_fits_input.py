"""tasks.fits_input: reading one field's FITS inputs (tiny hand-made files): bands, HDUs, noise, masks, zero
points, multi-extension files. The refusals of bad inputs are in test_fits_input_errors.py, bands on other grids
(resampling, registration) in test_fits_resample.py."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import xxhash
from astropy.io import fits
from astropy.wcs import WCS

from deepfield.tasks import maskbits
from deepfield.tasks.fits_files import file_digest
from deepfield.tasks.fits_input import load_field, sha256_file
from deepfield.tasks.ingest_config import FieldSpec

from _fits_inputs import NX, NY, SCALE, header, make_field, make_wcs, mef, raises, spec, write_band


@pytest.fixture
def field(tmp_path):
    """A 64 x 80 field in g, r, i on one TAN grid with image, invvar and (our) mask files (make_field)."""
    return make_field(tmp_path)


def test_happy_path(field):
    _d, files, data = field
    files["g"]["zeropoint"] = 30.5
    f = load_field(spec(files))
    assert f.name == "f1" and f.bands == ["g", "r", "i"]
    for arr, dt in ((f.image, np.float32), (f.invvar, np.float32), (f.mask, np.uint16)):
        assert arr.shape == (3, NY, NX) and arr.dtype == dt and arr.dtype.isnative
    for k, b in enumerate("gri"):
        assert np.array_equal(f.image[k].view(np.uint32), data[b]["image"].view(np.uint32))
        assert np.array_equal(f.invvar[k], data[b]["invvar"])
        assert np.array_equal(f.mask[k], data[b]["mask"].astype(np.uint16))  # our MP keywords: bits kept
    assert f.zeropoints == [30.5, 27.1, 27.2]
    assert f.psf_fwhm == pytest.approx([0.7, 0.8, 0.9])
    assert f.pixel_scale == pytest.approx(SCALE)
    assert f.resampled == []
    assert WCS(f.wcs_header).has_celestial and f.wcs_header["CTYPE1"] == "RA---TAN"
    read = [p for b in "gri" for p in files[b].values() if isinstance(p, str)]
    assert set(f.checksums) == set(read)
    for p in read:  # xxh3_128 of the files read (ingest passes its own digests); sha256 on request
        assert f.checksums[p] == xxhash.xxh3_128(open(p, "rb").read()).hexdigest() == file_digest(p)
        assert sha256_file(p) == file_digest(p, "sha256") == hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_hdu_selection_and_defaults(tmp_path):
    img = np.arange(NY * NX, dtype=np.float32).reshape(NY, NX) % 7 - 3
    p = tmp_path / "multi.fits"
    fits.HDUList([fits.PrimaryHDU(header=header(MAGZERO=25.0)),
                  fits.ImageHDU(img, header(make_wcs(), EXTNAME="SCI")),
                  fits.ImageHDU(img * 2, header(make_wcs(), EXTNAME="OTHER"))]).writeto(p)
    f = load_field(spec({"r": {"image": str(p)}}))  # first HDU with 2-d data; MAGZERO from the primary
    assert np.array_equal(f.image[0], img) and f.zeropoints == [25.0] and f.psf_fwhm == [None]
    assert np.all(f.mask == 0) and np.all(f.invvar == f.invvar[0, 0, 0]) and f.invvar[0, 0, 0] > 0
    assert any("1.4826" in n for n in f.notes)
    assert np.array_equal(load_field(spec({"r": {"image": str(p), "hdu": "other"}})).image[0], img * 2)
    assert np.array_equal(load_field(spec({"r": {"image": str(p), "hdu": 2}})).image[0], img * 2)
    raises(spec({"r": {"image": str(p), "hdu": 5}}), p, "no HDU 5")
    raises(spec({"r": {"image": str(p), "hdu": "nope"}}), p, "no HDU named")


def test_noise_estimate_and_variance(tmp_path):
    rng = np.random.default_rng(3)
    img = rng.normal(0, 2.0, (NY, NX)).astype(np.float32)
    files = {"i": write_band(tmp_path, "i", img, make_wcs())}
    f = load_field(spec(files))
    assert f.invvar[0, 0, 0] == pytest.approx(1 / 4.0, rel=0.1)
    var = np.full((NY, NX), 4.0, np.float32)
    var[0, :5] = 0
    fits.PrimaryHDU(var).writeto(tmp_path / "var.fits")
    files["i"]["variance"] = str(tmp_path / "var.fits")
    f = load_field(spec(files))
    assert f.invvar[0, 1, 1] == 0.25 and np.all(f.invvar[0, 0, :5] == 0)
    assert np.all(f.mask[0, 0, :5] == maskbits.ZERO_WEIGHT)


def test_noise_estimate_ignores_sky_structure_and_sources(tmp_path):
    """Without a noise map the constant inverse variance comes from the noise of 4 x 4-pixel sums with the
    sources left out: on a 400^2 image of noise 2.0 with a sky gradient (6 over the image), an amplifier
    quarter 6.0 high and 60 bright Gaussian sources it is within 6 % of the truth, where the image's own
    1.4826 MAD (the estimate before) is more than 25 % high."""
    rng = np.random.default_rng(5)
    n = 400
    yy, xx = np.mgrid[0:n, 0:n]
    img = rng.normal(0, 2.0, (n, n)) + 6.0 * xx / n
    img[:, 3 * n // 4:] += 6.0
    for x0, y0 in rng.uniform(10, n - 10, (60, 2)):
        img += 400.0 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 2.0 ** 2))
    img = img.astype(np.float32)
    files = {"i": write_band(tmp_path, "i", img, make_wcs(shape=(n, n)))}
    f = load_field(spec(files))
    assert f.invvar[0, 0, 0] ** -0.5 == pytest.approx(2.0, rel=0.06)
    assert any("noise of 4x4-pixel sums" in note for note in f.notes), f.notes
    mad = 1.4826 * np.median(np.abs(img - np.median(img)))
    assert mad > 1.25 * 2.0


def test_zero_point(tmp_path):
    files = {"i": write_band(tmp_path, "i", np.random.default_rng(0).normal(size=(NY, NX)).astype(np.float32),
                             make_wcs(), zp=None, fwhm=None)}
    raises(spec(files), files["i"]["image"], "no zero point in header (MAGZERO, ZEROPNT, MAGZPT, PHOTZP, FLUXMAG0")
    files["i"]["zeropoint"] = 28.0
    f = load_field(spec(files))
    assert f.zeropoints == [28.0] and f.psf_fwhm == [None]


def test_reference_band(field):
    _d, files, _ = field
    raises(spec(files, reference_band="z"), files["g"]["image"], "reference band 'z'")
    assert load_field(spec(files, reference_band="r")).bands == ["g", "r", "i"]


def test_nan_and_zero_weight_are_masked(field):
    _d, files, data = field
    img, iv = data["g"]["image"].copy(), data["g"]["invvar"].copy()
    img[10, 10], img[11, 12], img[12, 13] = np.nan, np.inf, -np.inf
    iv[20, 20], iv[21, 21], iv[22, 22], iv[10, 10] = 0, -1, np.nan, 0
    fits.PrimaryHDU(img, header(make_wcs(), MAGZERO=27.0)).writeto(files["g"]["image"], overwrite=True)
    fits.PrimaryHDU(iv).writeto(files["g"]["invvar"], overwrite=True)
    f = load_field(spec(files))
    for y, x in ((10, 10), (11, 12), (12, 13)):
        assert f.image[0, y, x] == 0 and f.invvar[0, y, x] == 0 and f.mask[0, y, x] & maskbits.NO_DATA
    for y, x in ((20, 20), (21, 21), (22, 22), (10, 10)):
        assert f.invvar[0, y, x] == 0 and f.mask[0, y, x] == maskbits.ZERO_WEIGHT | (
            maskbits.NO_DATA if (y, x) == (10, 10) else 0)
    assert f.mask[0, 11, 12] == maskbits.NO_DATA and np.isfinite(f.image).all()
    assert any("3 NaN/inf pixels masked NO_DATA" in n for n in f.notes)


def test_foreign_mask_becomes_bad(tmp_path):
    m = np.zeros((NY, NX), np.int32)
    m[1, 1], m[2, 2], m[3, 3] = 1, 4096, 1 << 20
    files = {"i": write_band(tmp_path, "i", np.random.default_rng(0).normal(size=(NY, NX)).astype(np.float32),
                             make_wcs(), invvar=np.ones((NY, NX), np.float32), mask=m, mask_cards=False)}
    f = load_field(spec(files))
    assert set(np.flatnonzero(f.mask[0])) == {1 * NX + 1, 2 * NX + 2, 3 * NX + 3}
    assert np.all(f.mask[0][m != 0] == maskbits.BAD)
    assert any("no MP<NAME> keywords" in n and "3 nonzero pixels set BAD" in n for n in f.notes)


def test_foreign_mask_planes_translated_by_their_mp_keywords(tmp_path):
    """A mask whose MP<NAME> keywords put our planes at other bits: each pixel's bits are translated, a bit no
    keyword declares sets BAD, and an MP keyword whose value is not a bit number (a logical T) declares nothing."""
    m = np.zeros((NY, NX), np.int32)
    m[1, 1], m[2, 2], m[3, 3], m[4, 4], m[5, 5] = 1 << 5, 1 << 9, (1 << 5) | (1 << 9), 1 << 12, 1 << 1
    files = {"i": write_band(tmp_path, "i", np.random.default_rng(0).normal(size=(NY, NX)).astype(np.float32),
                             make_wcs(), invvar=np.ones((NY, NX), np.float32), mask=m, mask_cards=False)}
    with fits.open(files["i"]["mask"], mode="update") as h:
        h[0].header["MPSAT"], h[0].header["MPBLEED"], h[0].header["MPBAD"] = 5, 9, True
    f = load_field(spec(files))
    assert f.mask[0, 1, 1] == maskbits.SAT and f.mask[0, 2, 2] == maskbits.BLEED
    assert f.mask[0, 3, 3] == maskbits.SAT | maskbits.BLEED and f.mask[0, 4, 4] == f.mask[0, 5, 5] == maskbits.BAD
    assert np.count_nonzero(f.mask[0]) == 5
    assert any("translated by their MP keywords; 2 pixels with undeclared bits set BAD" in n for n in f.notes)


def _afw_mask(tmp_path, m, planes):
    """A band whose mask declares its planes as Rubin's and HSC's afw masks do (MP_<NAME>, HIERARCH cards)."""
    files = {"i": write_band(tmp_path, "i", np.random.default_rng(0).normal(size=(NY, NX)).astype(np.float32),
                             make_wcs(), invvar=np.ones((NY, NX), np.float32), mask=m, mask_cards=False)}
    with fits.open(files["i"]["mask"], mode="update") as h:
        for name, bit in planes.items():
            h[0].header[f"HIERARCH MP_{name}"] = bit
    return files


AFW = dict(BAD=0, SAT=1, INTRP=2, CR=3, EDGE=4, DETECTED=5, DETECTED_NEGATIVE=6, SUSPECT=7, NO_DATA=8, FOO=16)


def test_afw_mask_planes(tmp_path):
    """An afw mask (MP_<NAME> keywords): DETECTED, which covers every source's footprint, and the other
    informational planes mask nothing; SAT, NO_DATA, CR and EDGE become ours; a plane deepfield does not know
    is BAD, named in the note, and masks nothing once listed in mask_ignore (a name or its bit)."""
    m = np.zeros((NY, NX), np.int32)
    m[10:30, 10:30] = 1 << 5  # a source's footprint
    m[12, 12] |= (1 << 2) | (1 << 7)  # interpolated and suspect, inside it
    m[1, 1], m[2, 2], m[3, 3], m[4, 4], m[5, 5], m[6, 6] = 1 << 1, 1 << 8, 1 << 3, 1 << 4, 1 << 16, (1 << 5) | (1 << 1)
    m[7, 7] = 1 << 20  # undeclared
    files = _afw_mask(tmp_path, m, AFW)
    f = load_field(spec(files))
    want = np.zeros((NY, NX), np.uint16)
    want[1, 1] = want[6, 6] = maskbits.SAT
    want[2, 2] = maskbits.NO_DATA
    want[3, 3] = want[4, 4] = want[5, 5] = want[7, 7] = maskbits.BAD
    assert np.array_equal(f.mask[0], want)
    note = next(n for n in f.notes if "translated by their MP keywords" in n)
    assert "DETECTED (" in note and "FOO (bit 16, 1 pixels)" in note and "1 pixels with undeclared bits set BAD" in note
    for ignore in (["foo"], ["MP_FOO"], [16]):
        f = load_field(spec(files, mask_ignore=ignore))
        assert f.mask[0, 5, 5] == 0 and np.count_nonzero(f.mask[0]) == np.count_nonzero(want) - 1
        assert not any("FOO (bit" in n for n in f.notes)


def test_mask_ignore_bits_without_keywords(tmp_path):
    """A mask without MP keywords: bits listed in mask_ignore mask nothing, every other nonzero bit BAD; a bit
    that sets BAD on more than 5 % of the pixels (a detection footprint here) is pointed out in the note."""
    m = np.zeros((NY, NX), np.int32)
    m[10:40, 10:40] = 1 << 5
    m[1, 1], m[2, 2], m[3, 3] = 1 << 5, 1, (1 << 5) | 2
    files = {"i": write_band(tmp_path, "i", np.random.default_rng(0).normal(size=(NY, NX)).astype(np.float32),
                             make_wcs(), invvar=np.ones((NY, NX), np.float32), mask=m, mask_cards=False)}
    f = load_field(spec(files))
    assert np.count_nonzero(f.mask[0]) == 903
    assert any(f"903 nonzero pixels set BAD ({100 * 903 / (NY * NX):.1f} % of the pixels: if those bits mark "
               "measured pixels" in n for n in f.notes), f.notes
    f = load_field(spec(files, mask_ignore=[5]))
    assert f.mask[0, 1, 1] == 0 and f.mask[0, 2, 2] == f.mask[0, 3, 3] == maskbits.BAD
    assert np.count_nonzero(f.mask[0]) == 2
    assert any("2 nonzero pixels set BAD; bits [5] masking nothing (mask_ignore)" in n for n in f.notes)


def test_mask_ignore_in_the_configuration(tmp_path):
    """The configuration's mask_ignore adds to every field's; a bit index beyond 62 is refused."""
    from deepfield.tasks.ingest_config import ConfigError, load_ingest_config
    cfg = tmp_path / "fields.yaml"
    cfg.write_text("mask_ignore: [STREAK2]\nfields:\n  - name: a\n    mask_ignore: [7]\n    bands: {i: {image: a.fits}}\n"
                   "  - name: b\n    bands: {i: {image: b.fits}}\n")
    assert [f.mask_ignore for f in load_ingest_config(cfg).fields] == [["STREAK2", 7], ["STREAK2"]]
    cfg.write_text("fields:\n  - name: a\n    mask_ignore: [70]\n    bands: {i: {image: a.fits}}\n")
    with pytest.raises(ConfigError, match="bit index 70"):
        load_ingest_config(cfg)


def test_sky_left_in_the_image_is_not_noise(tmp_path):
    """An image with its sky left in (a level of 30 sigma, a gradient of 20 sigma across, a ripple of 10): its
    noise map agrees with its noise, which the pixels' own MAD (5.9 sigma here) had taken the sky for, refusing
    the field as if the noise map were in other units. Accepted now, its inverse variance kept; an inverse
    variance 10 times too large is still refused."""
    n = 256
    yy, xx = np.mgrid[0:n, 0:n]
    img = (np.random.default_rng(3).normal(0, 2.0, (n, n)) + 2.0 * (30 + 20 * xx / n + 10 * np.sin(3 * yy / n)))
    files = {"i": write_band(tmp_path, "i", img.astype(np.float32), make_wcs(),
                             invvar=np.full((n, n), 0.25, np.float32))}
    f = load_field(spec(files))
    assert np.all(f.invvar[0] == np.float32(0.25))
    assert not any("rescaled" in note or "scatter" in note for note in f.notes), f.notes
    (tmp_path / "bad").mkdir()
    files = {"i": write_band(tmp_path / "bad", "i", img.astype(np.float32), make_wcs(),
                             invvar=np.full((n, n), 25.0, np.float32))}
    raises(spec(files), files["i"]["invvar"], "a variance or sigma map given as invvar")


def test_psf_fwhm_in_pixels_by_its_comment(tmp_path):
    """A header FWHM whose comment says pixels ("[pixel]", as some pipelines write the seeing) is made arcsec by
    the band's pixel scale, with a note; one that says arcsec, or nothing, is taken as arcsec."""
    rng = np.random.default_rng(0)
    files = {b: write_band(tmp_path, b, rng.normal(size=(NY, NX)).astype(np.float32), make_wcs(),
                           invvar=np.ones((NY, NX), np.float32), fwhm=None) for b in "gri"}
    for b, comment in zip("gri", ("[pixel] median FWHM", "FWHM, arcsec", "")):
        with fits.open(files[b]["image"], mode="update") as h:
            h[0].header["FWHM"] = (4.0, comment)
    f = load_field(spec(files))
    assert f.psf_fwhm[0] == pytest.approx(4.0 * SCALE) and f.psf_fwhm[1] == f.psf_fwhm[2] == 4.0
    assert any("PSF FWHM from the header in pixels (4 px" in n for n in f.notes), f.notes


def test_mef(tmp_path):
    rng = np.random.default_rng(5)
    w = make_wcs()
    hdus, imgs = [], {}
    for b in ("g", "r", "i"):
        imgs[b] = rng.normal(size=(NY, NX)).astype(np.float32)
        name = b if b == "r" else f"{b.upper()}_IMAGE"
        hdus.append(fits.ImageHDU(imgs[b], header(w, EXTNAME=name, PSF_FWHM=0.9)))
        hdus.append(fits.ImageHDU(np.ones((NY, NX), np.float32), header(EXTNAME=f"{b}_WEIGHT")))
        hdus.append(fits.ImageHDU(np.zeros((NY, NX), np.int16), header(EXTNAME=f"{b}_MASK")))
    hdus.append(fits.BinTableHDU.from_columns([fits.Column("a", "E", array=np.zeros(3))], name="CATALOG"))
    p = tmp_path / "field.fits"
    mef(p, hdus)
    f = load_field(FieldSpec(name="m", mef=p))
    assert f.bands == ["G", "r", "I"] and f.image.shape == (3, NY, NX)  # EXTNAME spelling kept
    for k, b in enumerate("gri"):
        assert np.array_equal(f.image[k], imgs[b])
    assert f.zeropoints == [26.5] * 3 and f.psf_fwhm == [0.9] * 3 and list(f.checksums) == [str(p)]
    assert np.all(f.invvar == 1) and np.all(f.mask == 0)


def test_mef_one_band_exposure(tmp_path):
    """A one-band exposure file as Rubin's and HSC's pipelines write it (HDUs IMAGE, MASK with MP_<NAME>
    keywords, VARIANCE; the band in the primary header): one band, named by BAND, its mask's DETECTED plane
    masking nothing, its invvar 1 / VARIANCE. Those HDUs had been read as three bands IMAGE, MASK, VARIANCE.
    Without a BAND or FILTER keyword the file is refused."""
    w = make_wcs()
    img = np.random.default_rng(2).normal(0, 2.0, (NY, NX)).astype(np.float32)
    m = np.zeros((NY, NX), np.int32)
    m[20:40, 20:40], m[3, 3] = 1 << 5, 1 << 1
    mh = header(EXTNAME="MASK")
    for name, bit in AFW.items():
        mh[f"HIERARCH MP_{name}"] = bit
    hdus = [fits.ImageHDU(img, header(w, EXTNAME="IMAGE", PSF_FWHM=0.9)), fits.ImageHDU(m, mh),
            fits.ImageHDU(np.full((NY, NX), 4.0, np.float32), header(EXTNAME="VARIANCE")),
            fits.BinTableHDU.from_columns([fits.Column("a", "E", array=np.zeros(3))], name="ARCHIVE_INDEX")]
    p = tmp_path / "calexp.fits"
    fits.HDUList([fits.PrimaryHDU(header=header(MAGZERO=27.0, BAND="i"))] + hdus).writeto(p)
    f = load_field(FieldSpec(name="x", mef=p))
    assert f.bands == ["i"] and f.image.shape == (1, NY, NX)
    assert np.array_equal(f.image[0], img) and np.all(f.invvar[0] == np.float32(0.25))
    assert f.mask[0, 3, 3] == maskbits.SAT and np.count_nonzero(f.mask[0]) == 1
    q = tmp_path / "noband.fits"
    fits.HDUList([fits.PrimaryHDU(header=header(MAGZERO=27.0))] + hdus).writeto(q)
    raises(FieldSpec(name="x", mef=q), q, "HDU 1 (IMAGE) names no band")


def test_mef_duplicate_band(tmp_path):
    w = make_wcs()
    img = np.ones((NY, NX), np.float32)
    p = tmp_path / "dup.fits"
    mef(p, [fits.ImageHDU(img, header(w, EXTNAME="g")), fits.ImageHDU(img, header(w, EXTNAME="i")),
            fits.ImageHDU(img, header(w, EXTNAME="G_IMAGE"))])
    raises(FieldSpec(name="m", mef=p), p, "duplicate band")
    p2 = tmp_path / "orphan.fits"
    mef(p2, [fits.ImageHDU(img, header(w, EXTNAME="i")), fits.ImageHDU(img, header(EXTNAME="z_MASK"))])
    raises(FieldSpec(name="m", mef=p2), p2, "no image HDU")


@pytest.mark.parametrize("kind", ["noise", "sorted", "reversed", "constant", "three values", "gradient"])
def test_fast_medians_are_numpys(kind):
    """The pixel checks' medians by bracketed selection (tasks/fits_noise.py) are numpy's medians of the float64
    values exactly, also where the strided sample misleads the bracket (sorted or periodic data: the fallback)."""
    from deepfield.tasks.fits_noise import _inverse_sqrt_median, _median
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 40_000, 40_001, 300_000, 300_001):
        a = rng.normal(0.0, 1.0, n).astype(np.float32)
        a = {"noise": a, "sorted": np.sort(a), "reversed": np.sort(a)[::-1].copy(),
             "constant": np.full(n, 1.5, np.float32), "three values": rng.integers(0, 3, n).astype(np.float32),
             "gradient": (np.arange(n) % 4096 + a).astype(np.float32)}[kind]
        before = a.copy()
        assert _median(a) == np.median(a.astype(np.float64)), n
        d = np.abs(a.astype(np.float64) - 0.3)
        assert _median(d) == np.median(d), n
        iv = np.abs(a) + np.float32(0.1)
        assert _inverse_sqrt_median(iv) == np.median(1.0 / np.sqrt(iv.astype(np.float64))), n
        assert np.array_equal(a, before)  # not reordered


def test_unsigned_16bit_read_mapped_as_astropy_reads_it(tmp_path):
    """An unsigned 16-bit image (int16 + BZERO 32768, the usual mask) is read from the memory map in one pass
    (tasks/fits_files.py) with astropy's values."""
    from deepfield.tasks.fits_files import FitsFiles
    vals = np.array([[0, 1, 2, 4, 255], [32767, 32768, 32769, 65534, 65535]], np.uint16)
    p = tmp_path / "m.fits"
    fits.PrimaryHDU(vals).writeto(p)
    assert fits.getheader(p)["BITPIX"] == 16 and fits.getheader(p)["BZERO"] == 32768
    files = FitsFiles()
    try:
        _, data = files.read(p, 0, "mask")
    finally:
        files.close()
    assert data.dtype == np.uint16 and data.dtype.isnative and np.array_equal(data, fits.getdata(p))
    assert np.array_equal(data, vals)
