"""What an input image's FITS headers say, read the same way for every survey: its celestial WCS (checked: a
singular or non-finite transform is an InputError naming the file), a numeric keyword from a list of synonyms,
and its AB zero point (header keywords, FLUXMAG0 or a calibrated BUNIT). tasks/fits_input.py assembles a
field from them."""
from __future__ import annotations

import math
import re

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from .fits_files import InputError

__all__ = ["ZP_KEYS", "BUNIT_ZP", "FWHM_KEYS", "celestial_wcs", "fwhm_in_pixels", "header_value", "zeropoint"]

ZP_KEYS = ("MAGZERO", "ZEROPNT", "MAGZPT", "PHOTZP")  # AB magnitude of one image unit
# BUNIT of calibrated images -> the AB zero point of one such unit (m = ZP - 2.5 log10 flux)
BUNIT_ZP = {"nanomaggy": 22.5, "nanomaggies": 22.5, "nmgy": 22.5, "njy": 31.4, "ujy": 23.9, "microjy": 23.9,
            "mjy": 16.4, "jy": 8.9}
FWHM_KEYS = ("PSF_FWHM", "SEEING", "FWHM")


def celestial_wcs(path, header: fits.Header, where: str) -> WCS | None:
    """The image's celestial WCS; None when it has none at all (no CTYPE); InputError when invalid."""
    if "CTYPE1" not in header and "CTYPE2" not in header:
        return None
    try:
        w = WCS(header, naxis=2)
    except Exception as exc:
        raise InputError(path, f"invalid WCS{where}: {exc}") from None
    if not w.has_celestial:
        raise InputError(path, f"no celestial WCS{where} (CTYPE {header.get('CTYPE1')!r}, {header.get('CTYPE2')!r})")
    if "CRVAL1" not in header or "CRVAL2" not in header:
        raise InputError(path, f"invalid celestial WCS{where}: CRVAL1/CRVAL2 missing")
    c = w.celestial
    try:
        m = c.pixel_scale_matrix
        scale = float(np.max(np.abs(m))) if np.all(np.isfinite(m)) else 0.0
        if scale == 0 or abs(np.linalg.det(m)) <= 1e-10 * scale * scale:
            raise ValueError("singular CD/PC matrix")
        world = c.all_pix2world([[0.0, 0.0], [10.0, 10.0]], 0)
        if not np.all(np.isfinite(world)):
            raise ValueError("pixel to sky transform gives non-finite coordinates")
    except Exception as exc:
        raise InputError(path, f"invalid celestial WCS{where}: {exc}") from None
    return c


def _first_card(headers, keys) -> tuple[fits.Header, str] | None:
    """(header, keyword) of the first of `keys` with a value in the first of `headers` that has one."""
    for h in headers:
        for k in keys:
            if k in h and h[k] is not None and str(h[k]).strip() != "":
                return h, k
    return None


def header_value(headers, keys, path, what):
    card = _first_card(headers, keys)
    if card is None:
        return None
    h, k = card
    try:
        v = float(h[k])
    except (TypeError, ValueError):
        raise InputError(path, f"invalid {what} {k} = {h[k]!r}") from None
    if not math.isfinite(v):
        raise InputError(path, f"invalid {what} {k} = {h[k]!r}")
    return v


def fwhm_in_pixels(headers, keys=FWHM_KEYS) -> bool:
    """Whether the card header_value reads the FWHM from says, in its comment, that it is in pixels ("[pixel]",
    "FWHM in pix", ...; and not in arcsec): some pipelines write the seeing so, and read as arcsec such a value
    made every PSF-scaled aperture several times too wide."""
    card = _first_card(headers, keys)
    if card is None:
        return False
    comment = str(card[0].comments[card[1]]).lower()
    return bool(re.search(r"pix|\bpx\b", comment)) and "arcsec" not in comment


def zeropoint(headers, path, where: str, band: str, notes: list[str]) -> float:
    """The AB zero point of an image from its headers: MAGZERO, ZEROPNT, MAGZPT or PHOTZP (AB magnitude of one
    unit); else FLUXMAG0 (the flux of magnitude 0: ZP = 2.5 log10 FLUXMAG0); else a calibrated BUNIT
    (nanomaggies 22.5, nJy 31.4, uJy 23.9, Jy 8.9). InputError naming the file when none is there."""
    zp = header_value(headers, ZP_KEYS, path, "zero point")
    if zp is not None:
        return zp
    f0 = header_value(headers, ("FLUXMAG0",), path, "FLUXMAG0")
    if f0 is not None:
        if f0 <= 0:
            raise InputError(path, f"invalid FLUXMAG0 = {f0!r}{where}: the flux of magnitude 0 must be positive")
        notes.append(f"band {band}: zero point 2.5 log10(FLUXMAG0) = {2.5 * math.log10(f0):.4f}")
        return 2.5 * math.log10(f0)
    for h in headers:
        unit = str(h.get("BUNIT", "")).strip().lower().replace(" ", "").replace("µ", "u")
        if unit in BUNIT_ZP:
            notes.append(f"band {band}: zero point {BUNIT_ZP[unit]} from BUNIT = {h['BUNIT']!r}")
            return BUNIT_ZP[unit]
    raise InputError(path, f"no zero point in header{where} ({', '.join(ZP_KEYS)}, FLUXMAG0 or a calibrated "
                           "BUNIT such as nanomaggy) and none configured (zeropoint:)")


# Keywords that name an exposure's filter, in the order read: BAND (Rubin, deepfield's simulator), FILTER (most
# cameras: HSC 'HSC-I2', DECam 'g DECam SDSS c0001 4720.0 1520.0', MegaCam 'r.MP9602', OmegaCAM 'OCAM_r_SDSS',
# Rubin 'r_57'), then less common spellings and Pan-STARRS' HIERARCH FPA.FILTER ('r.00000').
FILTER_KEYS = ("BAND", "FILTER", "FILTNAME", "FILTNAM", "FILTER1", "FPA.FILTER")
_FILTER_LETTER = re.compile(r"^([ugrizy])(?:'|\d{1,5})?$", re.IGNORECASE)


def filter_band(headers) -> tuple[str, str, str] | None:
    """(keyword, value, band letter) of the first filter keyword (FILTER_KEYS) in `headers` whose value names one
    of u g r i z y, or None: a value names a band when exactly one of its words (split at spaces and . _ - / , : ;
    ( )) is that letter, alone or followed by a prime or digits ('HSC-I2', "r'", 'r_57'); narrow bands, other
    systems' names ('F814W', 'VR', 'VIS') and values with two letters ('g+r') name none. Written here: the
    cameras' own conventions, which no library maps."""
    for h in headers:
        for k in FILTER_KEYS:
            try:
                val = h.get(k)
            except (KeyError, ValueError):
                val = None
            if not isinstance(val, str) or not val.strip():
                continue
            letters = {m.group(1).lower() for w in re.split(r"[\s._\-/,:;()]+", val.strip())
                       if (m := _FILTER_LETTER.match(w))}
            if len(letters) == 1:
                return k, val.strip(), letters.pop()
    return None


def check_filter(headers, band: str, path, what: str) -> None:
    """Refuse a file given as band `band` whose header's filter keyword (filter_band) names another of u g r i z y:
    a file listed under the wrong band would make a catalog with that band's fluxes swapped, exit 0. A band
    outside u g r i z y (VIS, J, NUV, ...) or a header that names none is not checked."""
    if band.lower() not in "ugrizy" or len(band) != 1:
        return
    found = filter_band(headers)
    if found is not None and found[2] != band.lower():
        k, val, letter = found
        raise InputError(path, f"given as the {what} of band {band}, but its header's {k} = {val!r} is band "
                               f"{letter}: a file listed under the wrong band? (if the header is wrong, set "
                               f"check_filter: false for this field)")
