"""Colour pictures of fields: Lupton et al. (2004) asinh RGB composites via astropy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.visualization import make_lupton_rgb

from . import maskbits
from .atomic import atomic_path


class PreviewError(ValueError):
    pass


def field_band_files(field_dir: str | Path) -> dict[str, dict[str, Path]]:
    """Band -> {image, invvar, mask} FITS of a simulated field directory (from its field.json)."""
    field_dir = Path(field_dir)
    rec_path = field_dir / "field.json"
    if not rec_path.exists():
        raise PreviewError(f"{field_dir}: not a field directory (no field.json); pass OUT/fields/<field>")
    rec = json.loads(rec_path.read_text())
    return {b: {k: field_dir / v for k, v in names.items()} for b, names in rec["files"].items()}


def bin_image(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks (edges cropped)."""
    if factor <= 1:
        return a
    ny, nx = (a.shape[0] // factor) * factor, (a.shape[1] // factor) * factor
    return a[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor).mean(axis=(1, 3))


def lupton_rgb(images: tuple[np.ndarray, np.ndarray, np.ndarray], zeropoints: tuple[float, float, float],
               stretch: float, q: float, binning: int = 1) -> np.ndarray:
    """uint8 (ny, nx, 3) RGB of three sky-subtracted images (red, green, blue order).

    Images are scaled to a common AB flux unit with their zero points before the asinh stretch,
    so colours are true colours; `stretch` is in units of the red image's ADU at its zero point.
    """
    ref = zeropoints[0]
    scaled = [bin_image(np.nan_to_num(im.astype(np.float32)), binning) * 10 ** (-0.4 * (zp - ref))
              for im, zp in zip(images, zeropoints)]
    return make_lupton_rgb(*scaled, stretch=stretch, Q=q)


def write_preview(field_dir: str | Path, out_png: str | Path, bands: tuple[str, str, str] | None = None,
                  stretch: float | None = None, q: float = 8.0, binning: int = 1,
                  crop: tuple[int, int, int, int] | None = None, colors: int | None = None) -> Path:
    """Write a Lupton RGB PNG of a field; bands in (red, green, blue) order, i, r, g by default.

    stretch defaults to 5x the median absolute deviation of the red band's sky; crop is
    (x0, y0, x1, y1) in pixels before binning; colors, if given, quantises the picture to a palette
    of that many colours (a much smaller PNG, for documentation).
    """
    files = field_band_files(field_dir)
    if not bands:
        reddest = [b for b in "yzirgu" if b in files]
        bands = ("i", "r", "g") if {"i", "r", "g"} <= set(files) else tuple(reddest[:3])
    if len(bands) != 3:
        raise PreviewError(f"{field_dir}: a colour preview needs three bands, got {list(bands)} "
                           f"(field has {sorted(files)})")
    rgb_bands = list(bands)
    missing = [b for b in rgb_bands if b not in files]
    if missing:
        raise PreviewError(f"{field_dir}: bands {missing} not in field (has {sorted(files)})")
    ims, zps = [], []
    for b in rgb_bands:
        with fits.open(files[b]["image"]) as hdul:
            data = hdul[0].data.astype(np.float32)
            zps.append(float(hdul[0].header.get("MAGZERO", 27.0)))
        with fits.open(files[b]["mask"]) as hdul:  # blank out defects: they are not sky
            data[(hdul[0].data & maskbits.BAD) != 0] = 0.0
        if crop:
            x0, y0, x1, y1 = crop
            data = data[y0:y1, x0:x1]
        ims.append(data)
    if stretch is None:
        sky = ims[0][np.isfinite(ims[0])]
        stretch = 5.0 * 1.4826 * float(np.median(np.abs(sky - np.median(sky)))) * max(binning, 1) ** -1
    rgb = lupton_rgb(tuple(ims), tuple(zps), stretch=stretch, q=q, binning=binning)
    out_png = Path(out_png)
    from PIL import Image
    picture = Image.fromarray(np.ascontiguousarray(rgb[::-1]))  # row 0 of the FITS image is the south edge
    if colors:
        picture = picture.quantize(colors=int(colors), method=Image.Quantize.MEDIANCUT)
    with atomic_path(out_png) as tmp:
        picture.save(tmp, format="PNG", optimize=True)
    return out_png
