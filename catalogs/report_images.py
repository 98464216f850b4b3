"""The pictures of the run's review report (catalogs/report.py): field previews with the detections and the
candidates marked, RGB cutouts of the candidates, and completeness against a simulation's truth.

- field preview: the field's Lupton RGB from the store (tasks/preview.py: its reddest, middle and bluest bands
  by `default_rgb`, grey for one band), binned to at most `max_px` pixels a side, north up; detections as small
  cyan circles (the catalog's rows of the field, and those of overlapping fields that fall on it), lens
  candidates yellow circles (L<rank>), anomaly candidates magenta squares (A<rank>), clusters a white cross
  and their R_lambda circle (C<id>).
- cutouts: the candidate's cube of the cutout file (catalogs/cutouts.py) as Lupton RGB, north up.
- completeness: per band of the truth (`mag_<band>` columns), the fraction of the truth's primary objects in the
  run's fields with a catalog source within `MATCH_ARCSEC` (1"), in bins of 0.25 mag (bins with at least 10
  objects), and the magnitudes where it falls below 90 % and 50 % for good. Plotted with matplotlib's object API (no
  pyplot: no global backend).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from deepfield.tasks.atomic import atomic_path
from deepfield.tasks.preview import default_rgb, rgb_image, save_png, store_picture
from deepfield.tasks.zarr_sky import field_footprint, field_wcs, fields_near

__all__ = ["field_preview", "preview_footprints", "cutout_pictures", "completeness", "completeness_plot",
           "MATCH_ARCSEC"]

MATCH_ARCSEC = 1.0
COLOURS = {"source": (0, 230, 255, 150), "lens": (255, 225, 0, 255), "anomaly": (255, 60, 255, 255),
           "cluster": (255, 255, 255, 255)}


def _draw(rgb: np.ndarray, marks: pd.DataFrame, binning: int):
    """The picture (row 0 the field's first row) flipped north up, with `marks` (kind, x, y in field pixels,
    label, radius in field pixels) drawn."""
    from PIL import Image, ImageDraw
    h = rgb.shape[0]
    base = Image.fromarray(np.ascontiguousarray(rgb[::-1])).convert("RGBA")
    over = Image.new("RGBA", base.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(over)
    u = (marks["x"].to_numpy(float) + 0.5) / binning - 0.5
    v = h - 1 - ((marks["y"].to_numpy(float) + 0.5) / binning - 0.5)
    for kind, uu, vv, label, rad in zip(marks["kind"], u, v, marks["label"], marks["radius"]):
        c = COLOURS[kind]
        r = max(float(rad) / binning, 2.0)
        if kind == "source":
            d.ellipse([uu - r, vv - r, uu + r, vv + r], outline=c)
        elif kind == "anomaly":
            d.rectangle([uu - r, vv - r, uu + r, vv + r], outline=c, width=2)
        elif kind == "lens":
            d.ellipse([uu - r, vv - r, uu + r, vv + r], outline=c, width=2)
        else:
            d.ellipse([uu - r, vv - r, uu + r, vv + r], outline=c, width=2)
            d.line([uu - 8, vv, uu + 8, vv], fill=c, width=2)
            d.line([uu, vv - 8, uu, vv + 8], fill=c, width=2)
        if label:
            d.text((uu + min(r, 12) + 2, vv - min(r, 12) - 10), str(label), fill=c)
    return Image.alpha_composite(base, over).convert("RGB")


def preview_footprints(root, fields) -> dict:
    """field -> tasks.zarr_sky.field_footprint of each of `fields` of the store `root`."""
    return {f: field_footprint(root["fields"][f].attrs.asdict()) for f in fields}


def field_preview(store_path: Path, field: str, detections: pd.DataFrame, candidates: pd.DataFrame, out: Path,
                  max_px: int = 600, footprints: dict | None = None, root=None) -> dict:
    """Write the preview PNG of `field` (module docstring) and return its width, height, binning and bands.
    detections: ra, dec, field, x, y of catalog rows (those of this field and of overlapping fields are
    drawn); candidates: kind, ra, dec, label, radius_arcsec; footprints: field -> tasks.zarr_sky.field_footprint
    of the fields in `detections` and of `field` (made here when not given: a WCS each, about 5 ms, so a report
    of many previews makes them once); root: the store, opened (else opened here: each open parses the root's
    consolidated metadata, 0.4 s at 1,000 fields)."""
    from deepfield.tasks.zarr_store import open_store
    root = open_store(store_path) if root is None else root
    g = root["fields"][field]
    attrs = g.attrs.asdict()
    _, ny, nx = attrs["shape"]
    binning = max(1, int(np.ceil(max(ny, nx) / max_px)))
    bands = default_rgb(list(attrs["bands"]))
    rgb = store_picture(store_path, field, binning, group=g)
    wcs = field_wcs(attrs)
    if footprints is None:
        footprints = preview_footprints(root, set(detections["field"]) | {field})
    near = set(fields_near(footprints, field, 0.0))
    own = detections[detections["field"] == field]
    other = detections[detections["field"].isin(near)]
    ox, oy = wcs.world_to_pixel_values(other["ra"].to_numpy(float), other["dec"].to_numpy(float))
    cx, cy = wcs.world_to_pixel_values(candidates["ra"].to_numpy(float), candidates["dec"].to_numpy(float))
    scale = float(attrs["pixel_scale"])
    marks = pd.concat([
        pd.DataFrame(dict(kind="source", x=np.concatenate([own["x"].to_numpy(float), ox]),
                          y=np.concatenate([own["y"].to_numpy(float), oy]), label="", radius=3.0 * binning)),
        pd.DataFrame(dict(kind=candidates["kind"].to_numpy(), x=cx, y=cy, label=candidates["label"].to_numpy(),
                          radius=candidates["radius_arcsec"].to_numpy(float) / scale))], ignore_index=True)
    inside = (marks.x > -0.5) & (marks.x < nx - 0.5) & (marks.y > -0.5) & (marks.y < ny - 0.5)
    picture = _draw(rgb, marks[inside], binning)
    with atomic_path(out) as tmp:
        picture.save(tmp, format="PNG")
    return dict(width=picture.width, height=picture.height, binning=binning, bands=[b or "mean" for b in bands])


def cutout_pictures(fits_path: Path, extnames: list[str], out_dir: Path, prefix: str) -> dict[str, str]:
    """PNGs (`<prefix>_<n>.png` in `out_dir`, north up) of the cutouts `extnames` of a cutout file; returns
    extname -> file name, for those the file holds."""
    from astropy.io import fits

    from .cutouts import Cutout
    out = {}
    with fits.open(fits_path) as hdul:
        have = {h.name for h in hdul}
        for k, name in enumerate(extnames):
            if name.upper() not in have:
                continue
            c = Cutout(hdul[name])
            rgb = rgb_image(c.planes, c.zeropoints)
            fname = f"{prefix}_{k + 1}.png"
            save_png(rgb[::-1], out_dir / fname)
            out[name] = fname
    return out


def completeness(truth: pd.DataFrame, catalog: pd.DataFrame, step: float = 0.25, min_count: int = 10) -> dict:
    """Per band of the truth: bin centres, counts and completeness (module docstring), and the 90 % and 50 %
    magnitudes (None where it never falls below)."""
    from astropy.coordinates import SkyCoord
    from astropy import units as u
    if len(truth) == 0:
        return {}
    if len(catalog):
        _, sep, _ = SkyCoord(truth.ra.to_numpy(), truth.dec.to_numpy(), unit="deg").match_to_catalog_sky(
            SkyCoord(catalog.ra.to_numpy(), catalog.dec.to_numpy(), unit="deg"))
        found = sep < MATCH_ARCSEC * u.arcsec
    else:
        found = np.zeros(len(truth), bool)
    out = {}
    for col in [c for c in truth.columns if c.startswith("mag_")]:
        m = truth[col].to_numpy(float)
        ok = np.isfinite(m)
        if ok.sum() < min_count:
            continue
        edges = np.arange(np.floor(m[ok].min() / step) * step, m[ok].max() + step, step)
        idx = np.digitize(m[ok], edges) - 1
        n = np.bincount(idx, minlength=len(edges) - 1)[:len(edges) - 1]
        k = np.bincount(idx, weights=found[ok], minlength=len(edges) - 1)[:len(edges) - 1]
        keep = n >= min_count
        centre, frac = (edges[:-1] + step / 2)[keep], (k[keep] / np.maximum(n[keep], 1))
        out[col[4:]] = dict(mag=centre.tolist(), n=n[keep].astype(int).tolist(), fraction=frac.tolist(),
                            m90=_limit(centre, frac, 0.9), m50=_limit(centre, frac, 0.5))
    return out


def _limit(mag: np.ndarray, frac: np.ndarray, level: float) -> float | None:
    """The magnitude where the completeness falls below `level` for good (interpolated between the last bin at or
    above it and the next; a dip of a few bright objects does not count); None when it never reaches it or never
    falls below."""
    reach = np.nonzero(frac >= level)[0]
    if not len(reach) or reach[-1] == len(frac) - 1:
        return None
    i = int(reach[-1])
    f0, f1 = frac[i], frac[i + 1]
    return float(mag[i] + (mag[i + 1] - mag[i]) * (f0 - level) / (f0 - f1))


def completeness_plot(stats: dict, out: Path) -> None:
    """A PNG of completeness against magnitude, one line per band (`completeness`'s result)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for band, s in stats.items():
        ax.plot(s["mag"], s["fraction"], marker="o", ms=3, label=band)
    ax.axhline(0.9, color="0.6", lw=0.8, ls="--")
    ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("true AB magnitude")
    ax.set_ylabel(f"fraction detected (within {MATCH_ARCSEC:g}\")")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(title="band", fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
