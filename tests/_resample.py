"""Test helpers: a field's FITS bands resampled onto a rotated grid as a coadd is made (reproject, bilinear),
and the stages run in this process over every tile of a store."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS


def rotated_wcs(wcs: WCS, degrees: float, shift: tuple[float, float] = (0.37, 0.21)) -> WCS:
    """`wcs` turned by `degrees` about its reference pixel, which moves by a fraction of a pixel."""
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    out = WCS(naxis=2)
    out.wcs.ctype = list(wcs.wcs.ctype)
    out.wcs.crval = wcs.wcs.crval
    out.wcs.crpix = wcs.wcs.crpix + np.array(shift)
    out.wcs.cd = rot @ wcs.pixel_scale_matrix
    return out


def resample_band(image: Path, invvar: Path, out_dir: Path, degrees: float = 17.0, mask: Path | None = None
                  ) -> tuple[Path, Path, float]:
    """Resample one band's image and inverse variance onto the rotated grid (reproject_interp, bilinear) and
    write them under `out_dir`, the inverse variance matching the resampled pixels' own scatter (the
    variance of a bilinear resampling propagated per pixel, as a coadd that ignores the covariance gives):
    the resampled invvar over the squared ratio of the pixel scatters after and before. Returns the two paths
    and that ratio."""
    from reproject import reproject_interp
    out_dir.mkdir(parents=True, exist_ok=True)
    with fits.open(image) as h:
        data, head = h[0].data.astype(np.float64), h[0].header.copy()
    iv = fits.getdata(invvar).astype(np.float64)
    wcs = WCS(head)
    new = rotated_wcs(wcs, degrees)
    shape = data.shape
    res, foot = reproject_interp((data, wcs), new, shape_out=shape, order="bilinear")
    riv, _ = reproject_interp((iv, wcs), new, shape_out=shape, order="bilinear")
    ok = (foot > 0.999) & np.isfinite(res)
    mad = lambda v: 1.4826 * np.median(np.abs(v - np.median(v)))  # noqa: E731
    ratio = float(mad(res[ok]) / mad(data[iv > 0]))
    res = np.where(ok, res, np.nan)
    riv = np.where(ok, riv / ratio ** 2, 0.0)
    if mask is not None:  # a masked pixel spoils the resampled pixels it enters
        m, _ = reproject_interp(((fits.getdata(mask) != 0).astype(np.float64), wcs), new, shape_out=shape,
                                order="bilinear")
        fits.PrimaryHDU((np.nan_to_num(m) > 0).astype(np.int16)).writeto(out_dir / mask.name, overwrite=True)
    for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2", "PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2"):
        head.remove(k, ignore_missing=True)
    head.update(new.to_header())
    pi, pv = out_dir / image.name, out_dir / invvar.name
    fits.PrimaryHDU(res.astype(np.float32), head).writeto(pi, overwrite=True)
    fits.PrimaryHDU(riv.astype(np.float32), new.to_header()).writeto(pv, overwrite=True)
    return pi, pv, ratio


def run_in_process(store: Path, stages: list[tuple[str, dict]], halo: int = 64) -> pd.DataFrame:
    """The stages over every tile of `store` in this process; the primary rows of every tile, with ra, dec."""
    from deepfield.tasks.stages.registry import make_stage
    from deepfield.tasks.zarr_sky import field_wcs
    from deepfield.tasks.zarr_store import all_tiles, open_store
    from deepfield.tasks.zarr_read import read_tile
    built = [make_stage(n, **p) for n, p in stages]
    for s in built:
        s.setup("cpu")
    root = open_store(store)
    out = []
    for tid in all_tiles(root, halo):
        tile = read_tile(root, tid, halo)
        src = pd.DataFrame()
        for s in built:
            src = s.run(tile, src)
        src = src[src.is_primary.to_numpy(bool)].copy()
        src["field"] = tid.field
        src["noise_scale"] = tile.meta.get("detect_noise_scale", np.nan)
        w = field_wcs(root["fields"][tid.field].attrs)
        ra, dec = w.all_pix2world(src.x.to_numpy(float), src.y.to_numpy(float), 0)
        src["ra"], src["dec"] = ra, dec
        out.append(src)
    return pd.concat(out, ignore_index=True)
