"""Putting a band on the reference band's pixel grid: grid comparison and resampling with the
`reproject` package (bilinear for image and inverse variance, bit by bit for the mask)."""
from __future__ import annotations

import numpy as np
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_area

from . import maskbits

MASK_THRESHOLD = 1e-3  # a resampled pixel gets a mask bit when its neighbours with it weigh more than this
GRID_TOLERANCE = 1e-3  # pixels: bands whose grids agree to this are not resampled
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def same_grid(w: WCS, shape, wref: WCS, shape_ref) -> bool:
    """Whether a band's grid (WCS, shape) is the reference grid to GRID_TOLERANCE pixels."""
    if tuple(shape) != tuple(shape_ref):
        return False
    ny, nx = shape
    y, x = (a.ravel() for a in np.meshgrid(np.linspace(0, ny - 1, 5), np.linspace(0, nx - 1, 5), indexing="ij"))
    try:
        ra, dec = w.all_pix2world(x, y, 0)
        x2, y2 = wref.all_world2pix(ra, dec, 0)
    except Exception:
        return False
    return bool(np.all(np.hypot(x2 - x, y2 - y) < GRID_TOLERANCE))


def resample_band(b, wref: WCS, shape_ref, ref: str, notes: list[str]) -> None:
    """Resample band b (a fits_input band: name, image, invvar, mask, wcs) onto the reference grid in
    place: bilinear image and invvar (the image's noise per unit area kept, below), the PSF FWHM widened by the
    interpolation; a mask bit is set
    where input pixels carrying it contribute; pixels without coverage become NO_DATA."""
    from reproject import reproject_interp

    bits = [k for k in range(16) if np.any(b.mask & (1 << k))]
    stack = np.empty((2 + len(bits),) + b.image.shape, np.float64)
    stack[0], stack[1] = b.image, b.invvar
    for j, k in enumerate(bits):
        stack[2 + j] = (b.mask >> k) & 1
    out, foot = reproject_interp((stack, b.wcs), wref, shape_out=tuple(shape_ref), order="bilinear",
                                 roundtrip_coords=False)
    cover = (foot[0] > 0) & np.isfinite(out[0]) & np.isfinite(out[1])
    mask = np.zeros(shape_ref, np.uint16)
    for j, k in enumerate(bits):
        mask[out[2 + j] > MASK_THRESHOLD] |= 1 << k
    mask[~cover] |= maskbits.NO_DATA
    area = proj_plane_pixel_area(wref) / proj_plane_pixel_area(b.wcs)  # flux per pixel scales with area
    if abs(area - 1) < 1e-6:
        area = 1.0
    b.image = np.where(cover, out[0] * area, 0).astype(np.float32)
    # the noise per unit area kept: a pixel's variance scales with area^2 where the output pixels are larger
    # (each samples its own input pixels) but only with area where they are smaller, as the output pixels
    # within one input pixel share its noise; taken per pixel, an aperture's sum of a band resampled from
    # 0.4" onto 0.2" pixels had an error of half its scatter (load_field checks the noise before this, on
    # the band's own pixels)
    b.invvar = np.where(cover, out[1] / max(area, area ** 2), 0).astype(np.float32)
    b.invvar[(mask & (maskbits.NO_DATA | maskbits.ZERO_WEIGHT)) != 0] = 0
    b.mask = mask
    notes.append(f"band {b.name} resampled onto the {ref} grid with reproject_interp (bilinear)"
                 + (f", flux scaled by pixel area ratio {area:.6g}" if area != 1 else "")
                 + f"; {int((~cover).sum())} pixels without coverage masked NO_DATA")
    if b.psf_fwhm is not None:
        # bilinear interpolation convolves the image with a triangle of the input pixel's width along each axis
        # (variance p^2 / 6, averaged over the sub-pixel offsets): the resampled stars are that much wider than
        # the FWHM the header (or configuration) gives for the input grid. Left as it was, the Gaussian apertures'
        # normalisation took a band resampled from 0.4" pixels for sharper than it is (the simulator's fields with
        # r binned 2 x 2: stars' r fluxes 2.6 sigma low, photo-z sigma_NMAD 0.036 -> 0.057)
        p_in = float(np.sqrt(proj_plane_pixel_area(b.wcs))) * 3600.0
        wide = float(np.sqrt(b.psf_fwhm ** 2 + FWHM_PER_SIGMA ** 2 * p_in ** 2 / 6.0))
        notes.append(f"band {b.name}: PSF FWHM {b.psf_fwhm:.3f}\" of its {p_in:.3f}\" pixels widened to {wide:.3f}\" "
                     f"by the bilinear resampling")
        b.psf_fwhm = wide
