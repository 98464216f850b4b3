"""Synthetic tiles drawn with GalSim for the tile-stage tests (tests/test_stages.py, tests/test_background.py):
known positions, fluxes, noise, zero points and a TAN WCS, over a halo box offset from the field origin so that
the field-frame offset matters."""
from __future__ import annotations

import galsim
import numpy as np
from astropy.wcs import WCS

from deepfield.tasks.tiling import Box, TileId
from deepfield.tasks.zarr_read import Tile

SCALE = 0.25  # arcsec / pixel
FWHM = 1.0  # arcsec, every band -> 4 px
BANDS = ["g", "r", "i"]
ZP = [30.0, 30.5, 29.5]
SIGMA = np.array([1.0, 1.5, 2.0])  # pixel noise per band, image units
BOX = Box(200, 360, 300, 460)  # halo box in the field, 160 x 160
CORE = Box(232, 328, 332, 428)  # 32 px halo on each side


def field_wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [512.0, 480.0]
    w.wcs.cdelt = [-SCALE / 3600.0, SCALE / 3600.0]
    w.wcs.radesys = "ICRS"
    return w


def psf() -> galsim.GSObject:
    return galsim.Moffat(beta=4.5, fwhm=FWHM)


def point(x, y, flux):
    """A point source at tile-frame (x, y) pixels with total flux per band (list)."""
    return dict(kind="star", x=x, y=y, flux=list(flux))


def galaxy(x, y, flux, hlr=0.5, e1=0.2, e2=-0.1):
    return dict(kind="gal", x=x, y=y, flux=list(flux), hlr=hlr, e1=e1, e2=e2)


def draw(truth, shape=BOX.shape, sky=None) -> np.ndarray:
    """(band, y, x) float32 noiseless image of the truth list (tile-frame positions)."""
    ny, nx = shape
    out = np.zeros((len(BANDS), ny, nx), dtype=np.float32)
    for b in range(len(BANDS)):
        im = galsim.ImageF(nx, ny, xmin=0, ymin=0, scale=SCALE)
        for s in truth:
            if s["kind"] == "star":
                prof = psf()
            else:
                prof = galsim.Convolve(galsim.Exponential(half_light_radius=s["hlr"]).shear(e1=s["e1"], e2=s["e2"]), psf())
            prof = prof.withFlux(s["flux"][b])
            prof.drawImage(image=im, center=galsim.PositionD(s["x"], s["y"]), add_to_image=True)
        out[b] = im.array
        if sky is not None:
            out[b] += sky[b]
    return out


def make_tile(truth, seed=0, shape=BOX.shape, box=BOX, core=CORE, sky=None, noiseless=None):
    """A Tile with Gaussian noise of SIGMA per band; returns (tile, noise-free image, noise)."""
    rng = np.random.default_rng(seed)
    clean = draw(truth, shape, sky) if noiseless is None else noiseless
    noise = (rng.standard_normal(clean.shape) * SIGMA[:, None, None]).astype(np.float32)
    invvar = np.broadcast_to((1.0 / SIGMA ** 2)[:, None, None], clean.shape).astype(np.float32).copy()
    tile = Tile(id=TileId("test", 1, 1), bands=list(BANDS), image=clean + noise, invvar=invvar,
                mask=np.zeros(clean.shape, dtype=np.uint16), box=box, core=core,
                wcs=field_wcs().slice(box.slices), zeropoints=list(ZP), psf_fwhm=[FWHM] * len(BANDS),
                pixel_scale=SCALE)
    return tile, clean, noise
