"""Where the simulated fields lie on the sky: a grid of square fields, each with its own TAN WCS,
neighbours overlapping by `overlap` arcsec.

The grid lives on a survey tangent plane centred on (ra0, dec0) (the first field's centre), with
u growing east and v north in arcsec; field (row, col) is centred at u = col * step,
v = row * step, step = field width - overlap. Each field's own WCS is a TAN projection about its
centre, north up and east left, pixel scale `pixel_scale`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from .config import SimConfig


def survey_plane(cfg: SimConfig) -> WCS:
    """TAN WCS whose 0-based 'pixel' coordinates are (u, v) arcsec on the survey tangent plane."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [cfg.ra0, cfg.dec0]
    w.wcs.crpix = [1.0, 1.0]
    w.wcs.cdelt = [1 / 3600.0, 1 / 3600.0]
    return w


def field_wcs(ra: float, dec: float, size: int, pixel_scale: float) -> WCS:
    """TAN WCS of a size x size field centred on (ra, dec), north up, east left."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(size + 1) / 2.0, (size + 1) / 2.0]
    w.wcs.cd = np.array([[-pixel_scale / 3600.0, 0.0], [0.0, pixel_scale / 3600.0]])
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    return w


@dataclass(frozen=True)
class FieldLayout:
    name: str
    index: int
    row: int
    col: int
    ra: float  # centre, deg
    dec: float
    size: int  # pixels, square
    pixel_scale: float  # arcsec / pixel

    def wcs(self) -> WCS:
        return field_wcs(self.ra, self.dec, self.size, self.pixel_scale)

    def wcs_header(self) -> fits.Header:
        return self.wcs().to_header()

    def contains(self, x: np.ndarray, y: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Pixel positions inside the field (pixel centres at 0..size-1, edges at -0.5, size-0.5)."""
        lo, hi = -0.5 - margin, self.size - 0.5 + margin
        return (x >= lo) & (x < hi) & (y >= lo) & (y < hi)


def grid_shape(n_fields: int) -> tuple[int, int]:
    """(rows, cols) of the most nearly square grid holding n_fields."""
    cols = math.ceil(math.sqrt(n_fields))
    return math.ceil(n_fields / cols), cols


def field_centre_uv(cfg: SimConfig, index: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) arcsec on the survey plane of the centre of field number `index`."""
    _, cols = grid_shape(cfg.fields)
    row, col = np.divmod(np.asarray(index), cols)
    step = cfg.field_width_arcsec - cfg.overlap
    return col * step, row * step


def survey_layout(cfg: SimConfig) -> list[FieldLayout]:
    plane = survey_plane(cfg)
    _, cols = grid_shape(cfg.fields)
    out = []
    for k in range(cfg.fields):
        row, col = divmod(k, cols)
        u, v = field_centre_uv(cfg, k)
        sky = plane.pixel_to_world(float(u), float(v))
        out.append(FieldLayout(name=f"field{k:03d}", index=k, row=row, col=col,
                               ra=float(sky.ra.deg), dec=float(sky.dec.deg), size=cfg.size,
                               pixel_scale=cfg.pixel_scale))
    return out


SAMPLING_MARGIN = 10.0  # arcsec around the fields where sources are drawn (they spill into the edges)


def sampling_box(cfg: SimConfig, margin_arcsec: float = SAMPLING_MARGIN) -> tuple[float, float, float, float]:
    """(u_min, u_max, v_min, v_max) arcsec on the survey plane covering every field plus a margin."""
    rows, cols = grid_shape(cfg.fields)
    step = cfg.field_width_arcsec - cfg.overlap
    half = cfg.field_width_arcsec / 2 + margin_arcsec
    return -half, (cols - 1) * step + half, -half, (rows - 1) * step + half


def nearest_field(ra: np.ndarray, dec: np.ndarray, fields: list[FieldLayout]) -> np.ndarray:
    """Index (into `fields`) of the field whose centre is nearest each position: the owner of a
    position where fields overlap (each field's inner region is its Voronoi cell)."""
    pos = SkyCoord(np.atleast_1d(ra), np.atleast_1d(dec), unit="deg")
    centres = SkyCoord([f.ra for f in fields], [f.dec for f in fields], unit="deg")
    sep = np.stack([pos.separation(c).deg for c in centres])
    return np.argmin(sep, axis=0)
