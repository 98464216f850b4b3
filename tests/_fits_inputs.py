"""Helpers of the tasks.fits_input tests: tiny hand-made FITS bands (a WCS, headers, a smooth sky or noise), the
field fixture of three bands and the checks of one InputError."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from deepfield.tasks import maskbits
from deepfield.tasks.fits_input import InputError, load_field
from deepfield.tasks.ingest_config import FieldSpec

NY, NX = 64, 80
SCALE = 0.2  # arcsec


def make_wcs(crpix=(40.5, 32.5), rot_deg=0.0, scale=SCALE, shape=(NY, NX)) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = list(crpix)
    c, s = np.cos(np.radians(rot_deg)), np.sin(np.radians(rot_deg))
    w.wcs.cd = scale / 3600 * np.array([[-c, s], [s, c]])
    w.pixel_shape = shape[::-1]
    return w


def header(w: WCS | None = None, **cards) -> fits.Header:
    h = w.to_header() if w is not None else fits.Header()
    for k, v in cards.items():
        h[k] = v
    return h


def smooth_sky(w: WCS, shape) -> np.ndarray:
    """A smooth blob defined on the sky, sampled at the pixel centres of `w`."""
    y, x = np.mgrid[: shape[0], : shape[1]]
    ra, dec = w.all_pix2world(x, y, 0)
    du = (ra - 150.0) * np.cos(np.radians(2.0)) * 3600
    dv = (dec - 2.0) * 3600
    return (100.0 + 50.0 * np.exp(-(du ** 2 + dv ** 2) / (2 * 4.0 ** 2))).astype(np.float32)


def write_band(d, band, image, w=None, invvar=None, mask=None, mask_cards=True, zp=27.0, fwhm=0.8):
    cards = {"BAND": band}
    if zp is not None:
        cards["MAGZERO"] = zp
    if fwhm is not None:
        cards["PSF_FWHM"] = fwhm
    out = {"image": d / f"f-{band}-image.fits"}
    fits.PrimaryHDU(image, header(w, **cards)).writeto(out["image"])
    if invvar is not None:
        out["invvar"] = d / f"f-{band}-invvar.fits"
        fits.PrimaryHDU(invvar, header(w)).writeto(out["invvar"])
    if mask is not None:
        out["mask"] = d / f"f-{band}-mask.fits"
        mh = header(w)
        if mask_cards:
            for key, bit, comment in maskbits.header_cards():
                mh[key] = (bit, comment)
        fits.PrimaryHDU(mask, mh).writeto(out["mask"])
    return {k: str(v) for k, v in out.items()}


def make_field(tmp_path):
    """(directory, files, data): a 64 x 80 field in g, r, i on one TAN grid with image, invvar and (our) mask files."""
    rng = np.random.default_rng(1)
    w = make_wcs()
    data = {}
    for k, b in enumerate("gri"):
        img = rng.normal(0, 1 + k, (NY, NX)).astype(np.float32)
        iv = np.full((NY, NX), 1 / (1 + k) ** 2, np.float32)
        m = np.zeros((NY, NX), np.int16)
        m[5, 7] = maskbits.SAT | maskbits.BLEED
        m[:, 3] = maskbits.BAD
        data[b] = dict(image=img, invvar=iv, mask=m)
    files = {b: write_band(tmp_path, b, **data[b], w=w, zp=27.0 + k / 10, fwhm=0.7 + k / 10)
             for k, b in enumerate("gri")}
    return tmp_path, files, data


def spec(files, **kw) -> FieldSpec:
    return FieldSpec.model_validate(dict(name="f1", bands=files, **kw))


def raises(s: FieldSpec, path, phrase: str) -> InputError:
    with pytest.raises(InputError) as e:
        load_field(s)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and phrase in msg, msg
    assert str(e.value.path) == str(path) and phrase in e.value.problem
    return e.value


def noise(shape, seed=0) -> np.ndarray:
    """Unit-sigma Gaussian sky noise (matching an invvar of 1)."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def mef(path, hdus):
    fits.HDUList([fits.PrimaryHDU(header=header(MAGZERO=26.5))] + hdus).writeto(path)
