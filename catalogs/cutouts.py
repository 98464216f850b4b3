"""Candidate cutouts from the run's Zarr store as FITS with WCS: the lens, cluster and anomaly merge steps' files
(`lens_cutouts.fits`, `cluster_cutouts.fits`, `anomaly_stamps.fits`), written beside their tables.

Layout of a file:
- primary HDU, no data: what the file holds (KIND, NCUT, CUTSIZE);
- one image HDU per candidate, in the table's order, EXTNAME `<KIND>_<id>` (LENS_3: lens_rank 3, CLUSTER_2:
  cluster_id 2, ANOMALY_1: anomaly_rank 1): a cube (band, y, x) of `size` x `size` px centred on the nearest
  pixel to the candidate's position in its field (catalog x, y), each band in its image units with the
  cutout's median subtracted as a local sky; pixels beyond the field's edges are NaN. Its header carries the
  field's celestial WCS sliced to the cutout (`WCS.slice`: cutout pixel (i, j) is field pixel (X0 + i, Y0 + j),
  also as IRAF's LTV1/LTV2, so ds9 shows field pixels) with a third, linear axis BAND whose value k is band
  BANDk (none when the field's WCS has SIP or lookup-table distortions, which astropy reads only in two
  dimensions: `WCS(header, naxis=2)` reads the celestial WCS of either), BAND1..BANDn the band names,
  MAGZP1..MAGZPn their AB zero points, and the candidate: FIELD, CANDID
  (its id), SRCID (the coinciding source's source_id, -1 for none), CAND_RA, CAND_DEC (deg);
- last, a binary table ROWS: the id, source_id, field, ra, dec and EXTNAME of every cutout, in HDU order, so a
  cutout is never separated from its row.

Each HDU holds its own field's bands, so fields with different bands share a file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS, Sip

from deepfield.tasks.atomic import atomic_path
from deepfield.tasks.zarr_sky import field_wcs
from deepfield.tasks.zarr_store import open_store

__all__ = ["cutout_origin", "cutout_wcs", "write_cutouts", "read_cutout", "Cutout"]


def cutout_origin(x: float, y: float, size: int) -> tuple[int, int]:
    """Field pixel (x0, y0) of pixel (0, 0) of the `size` x `size` cutout centred on the nearest pixel to
    (x, y): the position lands at cutout pixel (x - x0, y - y0), within half a pixel of the centre."""
    c = (size - 1) / 2.0
    return int(np.rint(x - c)), int(np.rint(y - c))


def cutout_wcs(wcs: WCS, x0: int, y0: int, size: int) -> WCS:
    """The celestial `wcs` of a field sliced to the cutout whose pixel (0, 0) is field pixel (x0, y0)
    (`WCS.slice`; a cutout that starts beyond the field's first row or column is shifted further by hand,
    as WCS.slice takes no negative start)."""
    cel = wcs.celestial
    out = cel.slice((slice(max(y0, 0), max(y0, 0) + size), slice(max(x0, 0), max(x0, 0) + size)))
    dx, dy = min(x0, 0), min(y0, 0)
    if dx or dy:
        out.wcs.crpix = out.wcs.crpix - np.array([dx, dy], float)
        if out.sip is not None:
            out.sip = Sip(out.sip.a, out.sip.b, out.sip.ap, out.sip.bp, out.wcs.crpix)
    return out


def _band_axis(cel: WCS) -> WCS:
    """`cel` with a third, linear axis BAND: pixel index k (0-based) has the value k + 1, band BAND<k+1>; `cel`
    itself when it has SIP or lookup-table distortions (astropy reads those only in two dimensions)."""
    if cel.sip is not None or cel.cpdis1 is not None or cel.cpdis2 is not None or cel.det2im1 is not None \
            or cel.det2im2 is not None:
        return cel
    w3 = cel.sub([1, 2, 0])
    w3.wcs.ctype = [cel.wcs.ctype[0], cel.wcs.ctype[1], "BAND"]
    w3.wcs.crpix = [*cel.wcs.crpix, 1.0]
    w3.wcs.crval = [*cel.wcs.crval, 1.0]
    if w3.wcs.has_cd():
        cd = w3.wcs.cd.copy()
        cd[2, 2] = 1.0
        w3.wcs.cd = cd
    else:
        w3.wcs.cdelt = [*w3.wcs.cdelt[:2], 1.0]
    w3.wcs.set()
    return w3


class _Fields:
    """The store's field groups and WCS, each opened once."""

    def __init__(self, store_path: Path):
        self.root = open_store(store_path)
        self.cache: dict[str, tuple] = {}

    def __getitem__(self, name: str) -> tuple:
        if name not in self.cache:
            g = self.root["fields"][name]
            self.cache[name] = (g, field_wcs(g.attrs), list(g.attrs["bands"]), list(g.attrs["zeropoints"]))
        return self.cache[name]


def _cut(g, x0: int, y0: int, size: int) -> np.ndarray:
    """(band, size, size) pixels of a field from (x0, y0), NaN beyond its edges, each band minus its median."""
    nb, ny, nx = g["image"].shape
    out = np.full((nb, size, size), np.nan, np.float32)
    ys, xs = slice(max(0, y0), min(ny, y0 + size)), slice(max(0, x0), min(nx, x0 + size))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[:, ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = g["image"][:, ys, xs]
    for k in range(nb):
        if np.isfinite(out[k]).any():
            out[k] -= np.nanmedian(out[k])
    return out


def write_cutouts(store_path: Path, rows: pd.DataFrame, path: Path, kind: str, id_column: str, size: int,
                  comment: str) -> int:
    """Write the cutout file (module docstring) of `rows` (field, x, y, ra, dec, `id_column`, and source_id
    when they have one) in their order, atomically; returns the number of cutouts."""
    fields = _Fields(Path(store_path))
    primary = fits.PrimaryHDU()
    primary.header["KIND"] = (kind.lower(), "candidates of this file")
    primary.header["NCUT"] = (len(rows), "cutouts, one image HDU (band, y, x) each")
    primary.header["CUTSIZE"] = (size, "side of a cutout, pixels")
    primary.header["COMMENT"] = comment
    hdus = [primary]
    ids = rows[id_column].to_numpy(np.int64)
    src = (rows["source_id"].astype("Int64").fillna(-1).to_numpy(np.int64) if "source_id" in rows.columns
           else np.full(len(rows), -1, np.int64))
    names = []
    for r, cid, sid in zip(rows.itertuples(index=False), ids, src):
        g, wcs, bands, zps = fields[r.field]
        x0, y0 = cutout_origin(float(r.x), float(r.y), size)
        hdr = _band_axis(cutout_wcs(wcs, x0, y0, size)).to_header(relax=True)
        for j, (b, zp) in enumerate(zip(bands, zps)):
            hdr[f"BAND{j + 1}"] = (b, f"band of plane {j + 1}")
            hdr[f"MAGZP{j + 1}"] = (float(zp), "AB zero point")
        hdr["FIELD"] = (str(r.field), "field of the cutout")
        hdr["CANDID"] = (int(cid), id_column)
        hdr["SRCID"] = (int(sid), "source_id of the coinciding source, -1 none")
        hdr["CAND_RA"] = (float(r.ra), "[deg] candidate RA (ICRS)")
        hdr["CAND_DEC"] = (float(r.dec), "[deg] candidate Dec (ICRS)")
        hdr["X0"] = (x0, "field column of cutout column 0")
        hdr["Y0"] = (y0, "field row of cutout row 0")
        hdr["LTV1"], hdr["LTV2"] = (-x0, "field pixel = cutout pixel - LTV"), -y0
        hdr["LTM1_1"], hdr["LTM2_2"] = 1.0, 1.0
        name = f"{kind.upper()}_{int(cid)}"
        names.append(name)
        hdus.append(fits.ImageHDU(_cut(g, x0, y0, size), header=hdr, name=name))
    hdus.append(fits.BinTableHDU.from_columns([
        fits.Column(name=id_column, format="K", array=ids),
        fits.Column(name="source_id", format="K", array=src),
        fits.Column(name="field", format=f"{max([len(str(f)) for f in rows['field']] + [1])}A",
                    array=np.array([str(f) for f in rows["field"]], dtype=str)),
        fits.Column(name="ra", format="D", unit="deg", array=rows["ra"].to_numpy(np.float64)),
        fits.Column(name="dec", format="D", unit="deg", array=rows["dec"].to_numpy(np.float64)),
        fits.Column(name="extname", format=f"{max([len(n) for n in names] + [1])}A", array=np.array(names, str))],
        name="ROWS"))
    with atomic_path(path) as tmp:
        fits.HDUList(hdus).writeto(tmp)
    return len(rows)


class Cutout:
    """One cutout HDU read back: `planes` (band -> 2-D image), `zeropoints` (band -> AB zero point), `wcs`
    (celestial), `header`."""

    def __init__(self, hdu: fits.ImageHDU):
        self.header = hdu.header
        n = hdu.data.shape[0]
        bands = [hdu.header[f"BAND{j + 1}"] for j in range(n)]
        self.planes = {b: np.asarray(hdu.data[j], np.float32) for j, b in enumerate(bands)}
        self.zeropoints = {b: float(hdu.header[f"MAGZP{j + 1}"]) for j, b in enumerate(bands)}
        self.wcs = WCS(hdu.header, naxis=2)


def read_cutout(path: Path, extname: str) -> Cutout:
    """The cutout `extname` (e.g. LENS_3) of a cutout file."""
    with fits.open(path) as hdul:
        return Cutout(hdul[extname])
