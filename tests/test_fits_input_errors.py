"""tasks.fits_input: bad inputs are refused with an InputError naming the file and the problem (tiny hand-made
files): missing, not FITS, truncated, empty, a bad WCS, shapes that disagree, duplicate bands, nothing usable."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from deepfield.tasks import maskbits
from deepfield.tasks.fits_input import load_field

from _fits_inputs import NX, NY, header, make_field, make_wcs, noise, raises, spec, write_band


@pytest.fixture
def field(tmp_path):
    """A 64 x 80 field in g, r, i on one TAN grid with image, invvar and (our) mask files (make_field)."""
    return make_field(tmp_path)


def test_missing_file(field):
    d, files, _ = field
    files["r"]["invvar"] = str(d / "nope.fits")
    raises(spec(files), d / "nope.fits", "no such file")


def test_not_fits(field):
    d, files, _ = field
    (d / "text.fits").write_text("hello, I am not a FITS file\n" * 200)
    files["g"]["mask"] = str(d / "text.fits")
    raises(spec(files), d / "text.fits", "not a FITS file")


@pytest.mark.parametrize("cut", [100, 3000, 2880 * 2])
@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_truncated(field, cut):
    _d, files, _ = field
    p = files["r"]["image"]
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[: len(raw) - cut] if cut != 100 else raw[:2880 + 100])
    raises(spec(files), p, "truncated")


def test_empty_image(tmp_path):
    p = tmp_path / "empty.fits"
    fits.PrimaryHDU(header=header(make_wcs(), MAGZERO=27.0)).writeto(p)
    raises(spec({"i": {"image": str(p)}}), p, "empty image")
    p3 = tmp_path / "cube.fits"
    fits.PrimaryHDU(np.zeros((2, NY, NX), np.float32)).writeto(p3)
    raises(spec({"i": {"image": str(p3)}}), p3, "empty image")
    raises(spec({"i": {"image": str(p3), "hdu": 0}}), p3, "empty image")


@pytest.mark.parametrize("case,phrase", [
    ("none", "no celestial WCS"), ("linear", "no celestial WCS"), ("singular", "singular CD/PC matrix"),
    ("nocrval", "CRVAL1/CRVAL2 missing")])
def test_bad_wcs(tmp_path, case, phrase):
    w = make_wcs()
    h = header(None if case == "none" else w, MAGZERO=27.0)
    if case == "linear":
        h["CTYPE1"], h["CTYPE2"] = "LINEAR", "LINEAR"
    if case == "singular":
        h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = 1e-5, 2e-5, 1e-5, 2e-5
        for k in ("PC1_1", "PC1_2", "PC2_1", "PC2_2"):
            h.remove(k, ignore_missing=True)
    if case == "nocrval":
        del h["CRVAL1"], h["CRVAL2"]
    p = tmp_path / "i.fits"
    fits.PrimaryHDU(np.random.default_rng(0).normal(size=(NY, NX)).astype(np.float32), h).writeto(p)
    raises(spec({"i": {"image": str(p), "invvar": None}}), p, phrase)


def test_shape_mismatch_without_wcs(tmp_path):
    files = {"i": write_band(tmp_path, "i", noise((NY, NX)), make_wcs(), invvar=np.ones((NY, NX)))}
    files["g"] = write_band(tmp_path, "g", noise((NY, NX - 2), 1), None, invvar=np.ones((NY, NX - 2)))
    raises(spec(files), files["g"]["image"], "no celestial WCS to align it")
    same = {"i": files["i"], "r": write_band(tmp_path, "r", noise((NY, NX), 2), None, invvar=np.ones((NY, NX)))}
    f = load_field(spec(same))  # no WCS but the same shape: taken to be on the reference grid
    assert f.resampled == [] and any("no WCS" in n for n in f.notes)


def test_duplicate_band_case(field):
    _d, files, _ = field
    files["G"] = dict(files["g"])
    raises(spec(files), files["G"]["image"], "duplicate band")


def test_all_pixels_masked(field):
    """An inverse variance of zeros or NaNs is blamed on the invvar file, a mask that masks everything on the
    mask file."""
    _d, files, data = field
    p = files["r"]["invvar"]
    fits.PrimaryHDU(np.zeros((NY, NX), np.float32)).writeto(p, overwrite=True)
    raises(spec(files), p, "no pixel of band r has a positive, finite inverse variance")
    fits.PrimaryHDU(np.full((NY, NX), np.nan, np.float32)).writeto(p, overwrite=True)
    raises(spec(files), p, "no pixel of band r has a positive, finite inverse variance")
    m = np.full((NY, NX), maskbits.BAD, np.int16)
    fits.PrimaryHDU(data["r"]["invvar"]).writeto(p, overwrite=True)
    fits.PrimaryHDU(m).writeto(files["r"]["mask"], overwrite=True)
    raises(spec(files), files["r"]["mask"], "all pixels masked")


@pytest.mark.parametrize("kind", ["invvar", "variance", "mask"])
def test_aux_shape_mismatch(field, kind):
    d, files, _ = field
    p = d / f"small-{kind}.fits"
    fits.PrimaryHDU(np.ones((NY, NX - 1), np.int16 if kind == "mask" else np.float32)).writeto(p)
    if kind == "variance":
        del files["g"]["invvar"]
    files["g"][kind] = str(p)
    raises(spec(files), p, "differs from the image shape")


def test_float_mask(field):
    _d, files, _ = field
    fits.PrimaryHDU(np.zeros((NY, NX), np.float32)).writeto(files["i"]["mask"], overwrite=True)
    raises(spec(files), files["i"]["mask"], "not an integer image")


def test_a_band_listed_under_another_bands_name_is_refused(field):
    """g's and r's images swapped in the configuration (their headers say BAND = 'g' and 'r'): refused naming the
    file, the band it was given as and the header's, where the catalog would have carried the two bands' fluxes
    swapped; a noise map from another band likewise. With check_filter: false the field loads, swapped."""
    d, files, data = field
    files["g"]["image"], files["r"]["image"] = files["r"]["image"], files["g"]["image"]
    err = raises(spec(files), files["g"]["image"], "given as the image of band g, but its header's BAND = 'r'")
    assert "check_filter: false" in err.problem
    loaded = load_field(spec(files, check_filter=False))
    assert np.array_equal(loaded.image[loaded.bands.index("g")], data["r"]["image"])

    (d / "again").mkdir()
    _, files, _ = make_field(d / "again")
    with fits.open(files["i"]["invvar"], mode="update") as h:
        h[0].header["FILTER"] = "HSC-R2"
    raises(spec(files), files["i"]["invvar"], "given as the invvar of band i, but its header's FILTER = 'HSC-R2'")


def test_filter_keywords_of_other_cameras_name_the_bands(field):
    """The cameras' FILTER values are read as their bands (HSC, DECam, MegaCam, OmegaCAM, Rubin, a primed SDSS
    name); a value naming no single u g r i z y (HST's F814W, DECam's VR, narrow bands, g+r) is not checked."""
    from deepfield.tasks.fits_headers import filter_band
    named = {"HSC-I2": "i", "g DECam SDSS c0001 4720.0 1520.0": "g", "r.MP9602": "r", "OCAM_r_SDSS": "r",
             "r_57": "r", "i'": "i", "HSC-Y": "y", "z": "z"}
    for value, band in named.items():
        assert filter_band([header(FILTER=value)])[2] == band, value
    for value in ("F814W", "VR DECam c0007 6300.0 2600.0", "NB0921", "g+r", "open", "VIS"):
        assert filter_band([header(FILTER=value)]) is None, value
    d, files, _ = field
    with fits.open(files["r"]["image"], mode="update") as h:
        del h[0].header["BAND"]
        h[0].header["FILTER"] = "VR DECam c0007 6300.0 2600.0"
    assert load_field(spec(files)).bands == ["g", "r", "i"]
    # one mask file for every band, its primary header naming the first: not a band's own header, not checked
    hdus = [fits.PrimaryHDU(header=header(FILTER="g"))]
    for k, b in enumerate("gri"):
        hdus.append(fits.ImageHDU(fits.getdata(files[b]["mask"]), header(EXTNAME=f"M{b}")))
        files[b].update(mask=str(d / "masks.fits"), mask_hdu=k + 1)
    fits.HDUList(hdus).writeto(d / "masks.fits")
    assert load_field(spec(files)).bands == ["g", "r", "i"]
