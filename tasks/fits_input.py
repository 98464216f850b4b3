"""Read and validate one field's FITS inputs (per-band files or one multi-extension file) into
(band, y, x) float32 image / float32 inverse variance / uint16 mask cubes on one pixel grid.

Every problem with the inputs is an InputError naming the file and the problem in one line.
Bands on another WCS grid than the reference band are resampled onto it with reproject_interp.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from . import maskbits
from .fits_align import resample_band, same_grid
from .fits_files import FitsFiles, InputError, file_digest, sha256_file  # noqa: F401  (re-exported)
from .fits_headers import FWHM_KEYS, celestial_wcs, check_filter, fwhm_in_pixels, header_value, zeropoint
from .fits_masks import mask_bits
from .fits_noise import block_noise, check_pixels
from .fits_register import register_band
from .fits_sources import band_sources, physical_names, reference_band
from .ingest_config import FieldSpec
from .psf_measure import measure_fwhms



@dataclass
class FieldImages:
    name: str
    bands: list[str]
    image: np.ndarray  # float32 (nband, ny, nx)
    invvar: np.ndarray  # float32 (nband, ny, nx)
    mask: np.ndarray  # uint16 (nband, ny, nx)
    wcs_header: fits.Header  # the reference band's celestial WCS
    zeropoints: list[float]
    psf_fwhm: list[float | None]  # arcsec
    pixel_scale: float  # arcsec / pixel
    checksums: dict[str, str] = field(default_factory=dict)  # absolute path -> content digest (file_digest)
    resampled: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # the PSF's Moffat index per band where the ingest fitted it with the FWHM (bands without a FWHM in their header
    # or configuration, tasks/psf_measure.py: measure_fwhms), else None; empty: none fitted
    psf_beta: list[float | None] = field(default_factory=list)


@dataclass
class _Band:
    name: str
    path: Path
    image: np.ndarray
    invvar: np.ndarray
    mask: np.ndarray
    wcs: WCS | None
    zeropoint: float
    psf_fwhm: float | None
    fwhm_px: float | None = None  # the header's PSF FWHM when its comment says pixels
    noise_path: Path | None = None  # the invvar or variance file, when given
    mask_path: Path | None = None


HUGE = 1e30  # |pixel| at or above this is no measurement (float32 tops out at 3.4e38): masked NO_DATA


def _fwhm_from_pixels(band: str, px: float, scale: float, notes: list[str]) -> float:
    """A header's PSF FWHM in pixels (its card comment says so) in arcsec at `scale` arcsec per pixel, noted."""
    fwhm = px * scale
    notes.append(f"band {band}: PSF FWHM from the header in pixels ({px:g} px, as its comment says): {fwhm:.3f}\"")
    return fwhm


def _load_band(files: FitsFiles, band: str, img: tuple, inv: tuple | None, var: tuple | None, msk: tuple | None,
               zp: float | None, fwhm: float | None, notes: list[str], dest=None, mask_ignore: tuple = (),
               filters: bool = True, shared: frozenset = frozenset(), saturation: float | None = None) -> _Band:
    """One band on its own grid; the file arguments are (path, hdu) with hdu an index, EXTNAME or None.

    dest: a function of the image shape returning (image, invvar, mask) arrays of that shape to fill
    (views into the field's cubes, so that no second copy is made), or None for new arrays. `filters`: each
    file's filter keyword checked against `band` (fits_headers.check_filter), in the HDU's header and, for a file
    not in `shared` (the files that hold other bands too), in the primary header. `saturation`: the configured
    saturation level (image units), else the header's where no mask is given (_saturated)."""
    path, hdu = img
    idx = files.select(path, hdu)
    where = "" if hdu is None else f" in HDU {hdu!r}"
    header, raw = files.read(path, idx, f"image of band {band}")
    headers = [header] + ([files.hdul(path)[0].header] if idx else [])

    def filter_checked(h: fits.Header, i, file, what: str) -> None:
        """The file's filter keyword checked against the band: the HDU's header, and the primary header only of a
        file that holds no other band (a MEF's names its first band, or none)."""
        if filters:
            check_filter([h] + ([files.hdul(file)[0].header] if i and Path(file) not in shared else []), band,
                         file, what)

    filter_checked(header, idx, path, "image")
    slots = dest(raw.shape) if dest is not None else None
    if slots is None:
        slots = (np.empty(raw.shape, np.float32), np.empty(raw.shape, np.float32), np.empty(raw.shape, np.uint16))
    image = slots[0]
    np.copyto(image, raw, casting="unsafe")  # native byte order, one pass; exact for float32 input
    if raw.dtype.kind == "f" and raw.dtype.itemsize > 4:
        notes.append(f"band {band}: {raw.dtype} image converted to float32")
    shape = image.shape
    wcs = celestial_wcs(path, header, where)
    if zp is None:
        zp = zeropoint(headers, path, where, band, notes)
    fwhm_px = None  # a header's FWHM in pixels of a band without a WCS, made arcsec in load_field
    if fwhm is None:
        fwhm = header_value(headers, FWHM_KEYS, path, "PSF FWHM")
        if fwhm is not None and fwhm <= 0:
            notes.append(f"band {band}: ignored non-positive PSF FWHM {fwhm}")
            fwhm = None
        elif fwhm is not None and fwhm_in_pixels(headers):
            if wcs is None:  # assumed on the reference grid: its pixels (load_field)
                fwhm, fwhm_px = None, fwhm
            else:
                fwhm = _fwhm_from_pixels(band, fwhm, float(np.mean(proj_plane_pixel_scales(wcs))) * 3600.0, notes)

    def aux(src: tuple, what: str) -> tuple[fits.Header, np.ndarray]:
        i = files.select(*src)
        h, d = files.read(src[0], i, f"{what} of band {band}")
        filter_checked(h, i, src[0], what)
        if d.shape != shape:
            raise InputError(src[0], f"{what} shape {d.shape} differs from the image shape {shape} of band {band}")
        return h, d

    mask = slots[2]
    if msk is not None:
        mh, mraw = aux(msk, "mask")
        if mraw.dtype.kind not in "iu":
            raise InputError(msk[0], f"mask of band {band} is not an integer image (dtype {mraw.dtype})")
        mask_bits(mraw, mh, msk[0], band, notes, out=mask, ignore=mask_ignore)
    else:
        mask[:] = 0
    nodata = None  # pixels without a measurement, where there are any
    # every |pixel| < HUGE (no NaN, inf or huge: the common case) by two reductions without a temporary; NaN
    # propagates into the minimum and maximum and fails the comparisons
    with np.errstate(invalid="ignore"):
        lo, hi = image.min(), image.max()
    if not (-HUGE < lo and hi < HUGE):
        nodata = ~np.isfinite(image)
        if nodata.any():
            image[nodata] = 0
            mask[nodata] |= maskbits.NO_DATA
            notes.append(f"band {band}: {int(nodata.sum())} NaN/inf pixels masked NO_DATA")
        with np.errstate(invalid="ignore"):
            huge = np.abs(image) >= HUGE
        if huge.any():  # sentinels or garbage, no measurement: they would overflow every sum they entered
            image[huge] = 0
            mask[huge] |= maskbits.NO_DATA
            nodata |= huge
            notes.append(f"band {band}: {int(huge.sum())} pixels with |value| >= {HUGE:g} masked NO_DATA")
    _saturated(image, mask, headers, path, band, saturation, msk is None, notes)
    invvar = slots[1]
    good = None  # positive and finite inverse variance
    if inv is not None:
        np.copyto(invvar, aux(inv, "invvar")[1], casting="unsafe")
        with np.errstate(invalid="ignore"):
            lo, hi = invvar.min(), invvar.max()
        if not (lo > 0 and hi < np.inf):  # some pixel is not positive and finite (NaN fails both)
            with np.errstate(invalid="ignore"):
                good = (invvar > 0) & (invvar < np.inf)
            if not good.any():
                raise InputError(inv[0], f"no pixel of band {band} has a positive, finite inverse variance")
        else:
            good = True  # every pixel
    elif var is not None:
        v = np.asarray(aux(var, "variance")[1], dtype=np.float64)
        good = np.isfinite(v) & (v > 0)
        if not good.any():
            raise InputError(var[0], f"no pixel of band {band} has a positive, finite variance")
        invvar[:] = 0
        invvar[good] = (1.0 / v[good]).astype(np.float32)
        notes.append(f"band {band}: invvar = 1 / variance")
    else:
        # the noise on the scale of apertures (tasks/fits_noise.block_noise: differences of 4 x 4-pixel sums two
        # blocks apart, sources left out), which a smooth sky, an amplifier's offset and the sources do not
        # inflate, and which a resampled coadd's correlated noise does not shrink: the image's own 1.4826 MAD,
        # used before (2026-12-06), read 1.06-1.62 times the simulator's noise (an amplifier offset in one band),
        # and photo-z outliers went from 9.6 to 16.3 % on those fields. The MAD where the image is too small
        usable = mask == 0
        sigma = block_noise(image, usable)
        how = "noise of 4x4-pixel sums (sources left out)"
        if sigma is None or not (math.isfinite(sigma) and sigma > 0):
            sky = image[usable]
            if sky.size > 2_000_000:
                sky = sky[:: sky.size // 1_000_000]
            sigma = 1.4826 * float(np.median(np.abs(sky - np.median(sky)))) if sky.size else 0.0
            how = "robust sky noise 1.4826*MAD"
        if not (math.isfinite(sigma) and sigma > 0):
            raise InputError(path, f"no invvar or variance given and the sky noise of band {band} cannot be "
                                   f"estimated (robust sigma {sigma}); all pixels masked or constant")
        invvar[:] = np.float32(1.0 / sigma ** 2)
        notes.append(f"band {band}: no invvar/variance file, constant invvar from the {how} = {sigma:.6g}")
    if good is None:
        with np.errstate(invalid="ignore"):
            good = (invvar > 0) & (invvar < np.inf)  # NaN compares False: not good
    nzero = 0 if good is True else good.size - np.count_nonzero(good)
    if nzero:  # usually a few pixels: their indices, found once, serve the mask and the invvar
        zero = np.unravel_index(np.flatnonzero(np.logical_not(good, out=good)), good.shape)
        mask[zero] |= maskbits.ZERO_WEIGHT
        invvar[zero] = 0
        notes.append(f"band {band}: {nzero} pixels with non-positive or non-finite invvar masked ZERO_WEIGHT")
    if nodata is not None:
        invvar[nodata] = 0
    noise = inv[0] if inv is not None else (var[0] if var is not None else None)
    return _Band(band, path, image, invvar, mask, wcs, float(zp), fwhm, fwhm_px=fwhm_px, noise_path=noise,
                 mask_path=msk[0] if msk is not None else None)


SAT_KEYS = ("SATURATE", "SATLEVEL")  # the saturation level's keywords (SExtractor's SATUR_KEY default first)
SAT_SHARE = 0.02  # a header level that more of the pixels reach than this is no saturation level: not used
SAT_RTOL = 1e-5  # pixels within this fraction below the level count as saturated (a level rounded in the header)
SAT_OVER = 4.0  # a header level that pixels exceed this many times over is not theirs (a saturated pixel reads
# about the level: the full well, or a linearity limit a little below it)


def _saturated(image: np.ndarray, mask: np.ndarray, headers, path, band: str, level: float | None,
               unmasked: bool, notes: list[str]) -> None:
    """Mask SAT the pixels at or above the band's saturation level: the configured `level`, else, where the band
    has no mask file (`unmasked`), its header's SATURATE or SATLEVEL. A mask marks saturation itself, and a coadd's
    header may carry one exposure's level, which its pixels exceed unsaturated. Without a mask a saturated star's
    flat top was measured as a star (its flux short by up to the light above the level), neither flagged nor
    seeding a detection, and its clipped core in one band only made colours of its neighbours; a bleed trail,
    at the level too, is masked with it. A header level reached by more than SAT_SHARE of the pixels, or exceeded
    SAT_OVER times over (an image rescaled after its header's level was written: a stale level would mask every
    bright star's core), is not the pixels' saturation level (a note says so, and `saturation:` sets one)."""
    configured = level is not None
    if not configured:
        if not unmasked:
            return
        level = header_value(headers, SAT_KEYS, path, "saturation level")
        if level is None:
            return
    if not level > 0:
        if configured:
            raise InputError(path, f"saturation level of band {band} is {level!r}: it must be positive")
        notes.append(f"band {band}: header saturation level {level!r} is not positive; not used")
        return
    sat = image >= np.float32(level * (1 - SAT_RTOL))
    n = int(np.count_nonzero(sat))
    if not n:
        return
    if not configured and n > SAT_SHARE * image.size:
        notes.append(f"band {band}: {100 * n / image.size:.1f} % of the pixels reach the header's saturation level "
                     f"{level:g}: not a saturation level, not used (set saturation: for this band to mask them)")
        return
    top = float(image[sat].max())
    if not configured and top > SAT_OVER * level:
        notes.append(f"band {band}: pixels reach {top / level:.1f} times the header's saturation level {level:g}, "
                     f"which does not describe them (an image rescaled after the level was written?): not used "
                     f"(set saturation: for this band in its units to mask saturated pixels)")
        return
    mask[sat] |= maskbits.SAT
    notes.append(f"band {band}: {n} pixels at or above the saturation level {level:g} "
                 f"({'configured' if configured else 'header'}) masked SAT")



def _any_usable(mask: np.ndarray, invvar: np.ndarray, rows: int = 64) -> bool:
    """Whether any pixel is unmasked with positive invvar; scans blocks of rows and stops at the first."""
    for y in range(0, mask.shape[0], rows):
        if np.any((mask[y:y + rows] == 0) & (invvar[y:y + rows] > 0)):
            return True
    return False


def load_field(spec: FieldSpec, checksums: dict[str, str] | None = None) -> FieldImages:
    """Read, validate and align one field's bands; raises InputError naming the offending file.

    checksums: digests of input files already computed by the caller (path -> hex digest), reused; the files
    read that it lacks get their xxh3_128 (tasks.fits_files.file_digest)."""
    files, notes = FitsFiles(), []
    try:
        srcs = physical_names(spec, band_sources(spec, files, notes), notes)
        names = [s[0] for s in srcs]
        ref = reference_band(spec, names, srcs[0][1][0])
        nb = len(srcs)
        rpath, rhdu = srcs[names.index(ref)][1]
        rh = files.hdul(rpath)[files.select(rpath, rhdu)].header
        shape0 = (int(rh.get("NAXIS2", 0)), int(rh.get("NAXIS1", 0)))
        # the field's cubes, filled band by band in place; a band on another grid gets its own arrays
        # and is copied in after resampling
        image = np.empty((nb,) + shape0, np.float32)
        invvar = np.empty((nb,) + shape0, np.float32)
        mask = np.empty((nb,) + shape0, np.uint16)

        def slot(k):
            return lambda shp: (image[k], invvar[k], mask[k]) if tuple(shp) == shape0 else None
        # the files that hold several bands (a MEF; one mask file for all), whose primary header names none of them
        uses = Counter(p for s in srcs for p in {Path(f[0]) for f in s[1:5] if f is not None})
        shared = frozenset(p for p, n in uses.items() if n > 1)
        bands = [_load_band(files, *s[:7], notes, dest=slot(k), mask_ignore=tuple(spec.mask_ignore),
                            filters=spec.check_filter is not False, shared=shared, saturation=s[7])
                 for k, s in enumerate(srcs)]
        paths = list(files.open)
    finally:
        files.close()
    rb = bands[names.index(ref)]
    if rb.wcs is None:
        raise InputError(rb.path, f"no celestial WCS (CTYPE/CRVAL) in the image of reference band {ref}")
    shape = rb.image.shape
    resampled = []
    for b in bands:
        if b is rb:
            continue
        if b.wcs is None:
            if b.image.shape != shape:
                raise InputError(b.path, f"shape {b.image.shape} of band {b.name} differs from {shape} of reference "
                                         f"band {ref} and the image has no celestial WCS to align it")
            notes.append(f"band {b.name} has no WCS: assumed on the {ref} grid (same shape)")
        elif not same_grid(b.wcs, b.image.shape, rb.wcs, shape):
            if _any_usable(b.mask, b.invvar):  # its noise checked on its own pixels, which the resampling correlates
                check_pixels(b, notes)
            register_band(b, rb, notes)  # its WCS shifted onto the reference band's sources where it is off
            resample_band(b, rb.wcs, shape, ref, notes)
            resampled.append(b.name)
    for b in bands:
        if not _any_usable(b.mask, b.invvar):
            blame = b.mask_path if b.mask_path is not None and bool(np.all(b.mask != 0)) else b.path
            raise InputError(blame, f"all pixels masked in band {b.name}"
                                    + (f" (after resampling onto the {ref} grid)" if b.name in resampled else ""))
        if b.name not in resampled:
            check_pixels(b, notes)
    for k, b in enumerate(bands):
        if not np.shares_memory(b.image, image[k]):  # resampled or on another grid: copy in
            image[k], invvar[k], mask[k] = b.image, b.invvar, b.mask
    scales = proj_plane_pixel_scales(rb.wcs) * 3600.0
    for b in bands:
        if b.fwhm_px is not None:  # a band without a WCS, assumed on the reference grid
            b.psf_fwhm = _fwhm_from_pixels(b.name, b.fwhm_px, float(np.mean(scales)), notes)
    missing = [b for b in bands if b.psf_fwhm is None]  # neither header nor configuration: from the stars
    measured = measure_fwhms([b.image for b in missing], [b.invvar for b in missing], [b.mask for b in missing]) \
        if missing else []
    beta: dict[str, float] = {}
    for b, (px, n, how, index) in zip(missing, measured):
        if px is not None:
            b.psf_fwhm = px * float(np.mean(scales))
            if index is not None:
                beta[b.name] = float(index)
            notes.append(f"band {b.name}: no PSF FWHM in the header or configuration; measured from {n} stars ({how}): "
                         f"{b.psf_fwhm:.3f}\" ({px:.2f} px)")
        else:
            notes.append(f"band {b.name}: no PSF FWHM in the header or configuration and too few isolated stars "
                         f"to measure it; the stages assume 3 px (set psf_fwhm for this band)")
    return FieldImages(
        name=spec.name, bands=names, image=image, invvar=invvar, mask=mask,
        wcs_header=rb.wcs.to_header(relax=True), zeropoints=[b.zeropoint for b in bands],
        psf_fwhm=[b.psf_fwhm for b in bands], pixel_scale=float(np.mean(scales)),
        checksums={str(p): (checksums or {}).get(str(p)) or file_digest(p) for p in paths},
        resampled=resampled, notes=notes, psf_beta=[beta.get(b) for b in names] if beta else [])
