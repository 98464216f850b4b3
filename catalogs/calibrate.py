"""Calibrated photometry and sky-frame shapes of the merged catalog (docs/design.md, "The way data flows").

The tile tables keep what the stages measured on the pixels: fluxes in image units, shapes in pixels and
radians in the pixel frame. The merge turns every partition into survey units before anything else reads it:

- fluxes: every `flux_<kind>_<band>` and `fluxerr_<kind>_<band>` column in nJy, with the row's zero point
  `zeropoint_<band>` (the AB magnitude of one image unit of that field and band, written by the measure
  stage): f[nJy] = F[image] * 10**(-0.4 (zeropoint - 31.4)), 31.4 being the AB magnitude of 1 nJy. The
  magnitudes (`mag_*`, AB) are unchanged; the zero point stays in the row, so that a user can go back to image
  units (F = f / 10**(-0.4 (zeropoint - 31.4))) or recalibrate. The detection-image fluxes (`flux_det`,
  `peak_det`) are left in detection-image units: they rank detections, they are not photometry.
- shapes: each (a, b, theta) triple (`a, b, theta` of detect, `deblend_a, deblend_b, deblend_theta` of
  deblend) becomes semi-axes in arcsec and a position angle `pa` (`deblend_pa`) in degrees east of north,
  in [0, 180). The ellipse's second moments are carried through the local Jacobian of the field's WCS at the
  source's position (central differences of astropy's pixel_to_world, so a rotated, flipped or distorted
  WCS is handled) and diagonalised on the sky; `theta` (radians, counter-clockwise from +x) is dropped.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

__all__ = ["AB_NJY", "njy_per_unit", "calibrate_fluxes", "sky_shapes", "calibrate_shapes", "calibrate"]

AB_NJY = 31.4  # AB magnitude of 1 nJy: 2.5 log10(3631 Jy / 1 nJy)
_FLUX = re.compile(r"^(flux|fluxerr)_(?P<kind>.+)_(?P<band>[^_]+)$")
_NOT_PHOTOMETRY = {"flux_det", "peak_det"}
_SHAPES = (("a", "b", "theta", "pa"), ("deblend_a", "deblend_b", "deblend_theta", "deblend_pa"))


def njy_per_unit(zeropoint) -> np.ndarray:
    """nJy of one image unit at AB zero point `zeropoint`."""
    return 10.0 ** (-0.4 * (np.asarray(zeropoint, float) - AB_NJY))


def calibrate_fluxes(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with its flux and flux-error columns in nJy (module docstring); ValueError naming the columns
    whose band has no `zeropoint_<band>` column."""
    out = df.copy()
    missing = []
    for col in df.columns:
        m = _FLUX.match(col)
        if m is None or col in _NOT_PHOTOMETRY:
            continue
        zp = f"zeropoint_{m['band']}"
        if zp not in df.columns:
            missing.append(col)
            continue
        out[col] = df[col].to_numpy(float) * njy_per_unit(df[zp].to_numpy(float))
    if missing:
        raise ValueError(f"cannot calibrate {', '.join(missing)}: the tile tables have no zero point column "
                         f"for their band (zeropoint_<band>, written by the measure stage)")
    return out


def sky_shapes(wcs, x, y, a, b, theta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Semi-axes (arcsec) and position angle (degrees east of north, [0, 180)) on the sky of the ellipses
    with semi-axes a, b (pixels) and angle theta (radians counter-clockwise from +x) at field pixel (x, y)."""
    x, y, a, b, theta = (np.asarray(v, float) for v in (x, y, a, b, theta))
    if x.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    h = 0.5

    def east_north(dx, dy):
        ra1, dec1 = wcs.pixel_to_world_values(x + dx, y + dy)
        ra0, dec0 = wcs.pixel_to_world_values(x - dx, y - dy)
        dra = (np.asarray(ra1) - np.asarray(ra0) + 180.0) % 360.0 - 180.0
        dec_mid = np.radians(0.5 * (np.asarray(dec1) + np.asarray(dec0)))
        return dra * np.cos(dec_mid) * 3600.0 / (2 * h), (np.asarray(dec1) - np.asarray(dec0)) * 3600.0 / (2 * h)

    e_x, n_x = east_north(h, 0.0)  # arcsec per pixel along +x
    e_y, n_y = east_north(0.0, h)
    c, s = np.cos(theta), np.sin(theta)
    # pixel-frame second moments of the ellipse, then carried to (east, north): C' = J C J^T
    cxx = a * a * c * c + b * b * s * s
    cyy = a * a * s * s + b * b * c * c
    cxy = (a * a - b * b) * c * s
    p = e_x * e_x * cxx + 2 * e_x * e_y * cxy + e_y * e_y * cyy   # east-east
    r = n_x * n_x * cxx + 2 * n_x * n_y * cxy + n_y * n_y * cyy   # north-north
    q = e_x * n_x * cxx + (e_x * n_y + e_y * n_x) * cxy + e_y * n_y * cyy  # east-north
    half, root = 0.5 * (p + r), np.sqrt((0.5 * (p - r)) ** 2 + q * q)
    a_sky = np.sqrt(half + root)
    b_sky = np.sqrt(np.clip(half - root, 0.0, None))
    phi = 0.5 * np.degrees(np.arctan2(2 * q, p - r))  # major axis, from east toward north
    pa = (90.0 - phi) % 180.0
    return a_sky, b_sky, pa


def calibrate_shapes(df: pd.DataFrame, wcs_by_field: dict) -> pd.DataFrame:
    """`df` with each shape triple on the sky (module docstring); `wcs_by_field`: field name -> astropy WCS
    (ValueError for a field it lacks)."""
    out = df.copy()
    fields = df["field"].astype(str).to_numpy() if len(df) else np.zeros(0, str)
    unknown = sorted(set(fields) - set(wcs_by_field))
    if unknown:
        raise ValueError(f"no WCS for the fields {unknown} of the tile tables")
    for ca, cb, ct, cpa in _SHAPES:
        if not {ca, cb, ct} <= set(df.columns):
            continue
        a_sky, b_sky, pa = np.full(len(df), np.nan), np.full(len(df), np.nan), np.full(len(df), np.nan)
        for name in np.unique(fields):
            k = fields == name
            a_sky[k], b_sky[k], pa[k] = sky_shapes(wcs_by_field[name], df["x"].to_numpy(float)[k],
                                                   df["y"].to_numpy(float)[k], df[ca].to_numpy(float)[k],
                                                   df[cb].to_numpy(float)[k], df[ct].to_numpy(float)[k])
        out[ca], out[cb] = a_sky, b_sky
        out.insert(out.columns.get_loc(ct), cpa, pa)
        out = out.drop(columns=[ct])
    return out


def calibrate(df: pd.DataFrame, wcs_by_field: dict) -> pd.DataFrame:
    """Fluxes in nJy and shapes on the sky (module docstring)."""
    return calibrate_shapes(calibrate_fluxes(df), wcs_by_field)
