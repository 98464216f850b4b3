"""Colour pictures of fields: Lupton et al. (2004) asinh RGB composites via astropy.

The bands (red, green, blue) default to `default_rgb`: i, r, g when a field has them, else its three reddest
known bands (two bands: green is their mean; one band: grey). Images are scaled to a common AB flux unit with
their zero points before the stretch, so the colours are true colours. A field of a store is read in strips of
rows and binned as it is read, so a picture of a large field costs the memory of the picture.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.visualization import make_lupton_rgb

from . import maskbits
from .atomic import atomic_path

__all__ = ["PreviewError", "default_rgb", "write_preview", "store_picture", "rgb_image", "lupton_rgb", "bin_image",
           "sky_sigma"]

STRIP = 512  # rows of a store's field read at a time


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


def sky_sigma(image: np.ndarray) -> float:
    """The sky noise of a sky-subtracted image: 1.4826 times the median absolute deviation of its finite pixels."""
    sky = image[np.isfinite(image)]
    return 1.4826 * float(np.median(np.abs(sky - np.median(sky)))) if sky.size else 0.0


def lupton_rgb(images: tuple[np.ndarray, np.ndarray, np.ndarray], zeropoints: tuple[float, float, float],
               stretch: float, q: float, binning: int = 1) -> np.ndarray:
    """uint8 (ny, nx, 3) RGB of three sky-subtracted images (red, green, blue order).

    Images are scaled to a common AB flux unit with their zero points before the asinh stretch,
    so colours are true colours; `stretch` is in units of the red image's ADU at its zero point.
    """
    ref = zeropoints[0]
    scaled = [bin_image(np.nan_to_num(im.astype(np.float32)), binning) * 10 ** (-0.4 * (zp - ref))
              for im, zp in zip(images, zeropoints)]
    with np.errstate(invalid="ignore", divide="ignore"):  # astropy divides 0 by 0 where every band is 0
        return make_lupton_rgb(*scaled, stretch=stretch, Q=q)


# bands from blue to red, for the default choice of three (the reddest three, as red, green, blue)
RGB_ORDER = ("FUV", "NUV", "u", "g", "r", "i", "z", "y", "Y", "VIS", "J", "H", "K")


def default_rgb(have: list[str]) -> tuple[str, str, str]:
    """(red, green, blue) bands for a picture of a field with the bands `have`: i, r, g when it has them,
    else its three reddest known bands; with two bands the green is their mean ("" below), with one a grey
    picture."""
    if {"i", "r", "g"} <= set(have):
        return ("i", "r", "g")
    known = sorted([b for b in have if b in RGB_ORDER], key=RGB_ORDER.index, reverse=True)
    order = known + [b for b in have if b not in known]
    if len(order) >= 3:
        return tuple(order[:3])
    if len(order) == 2:
        return (order[0], "", order[1])
    return (order[0], order[0], order[0])


def _choose(have: list[str], bands, label: str) -> tuple[str, str, str]:
    bands = tuple(bands) if bands else default_rgb(have)
    if len(bands) != 3:
        raise PreviewError(f"{label}: a colour preview needs three bands, got {list(bands)} (field has {have})")
    missing = [b for b in bands if b and b not in have]
    if missing:
        raise PreviewError(f"{label}: bands {missing} not in field (has {have})")
    return bands


def _three(bands: tuple[str, str, str], loaded: dict[str, tuple[np.ndarray, float]]
           ) -> tuple[list[np.ndarray], list[float]]:
    """The red, green and blue images and zero points of `bands` from `loaded` (band -> (image, zero point));
    green "" is the mean of red and blue, on the red band's zero point."""
    ims, zps = [], []
    for b in bands:
        if b:
            ims.append(loaded[b][0])
            zps.append(loaded[b][1])
        else:
            (r, zr), (bl, zb) = loaded[bands[0]], loaded[bands[2]]
            ims.append(0.5 * (r + bl * 10 ** (-0.4 * (zb - zr))))
            zps.append(zr)
    return ims, zps


def _picture(ims: list[np.ndarray], zps: list[float], stretch: float | None, q: float) -> np.ndarray:
    if stretch is None:  # 5 sky sigma of the red image; an empty picture (no sky) gets 1
        stretch = 5.0 * sky_sigma(ims[0]) or 1.0
    return lupton_rgb(tuple(ims), tuple(zps), stretch=stretch, q=q)


def rgb_image(planes: dict[str, np.ndarray], zeropoints: dict[str, float], bands=None, stretch: float | None = None,
              q: float = 8.0) -> np.ndarray:
    """uint8 (ny, nx, 3) Lupton RGB of sky-subtracted images `planes` (band -> image, NaN where there is none)
    with their AB `zeropoints`, rows as the arrays'; bands (red, green, blue) default to `default_rgb`."""
    bands = _choose(list(planes), bands, "cutout")
    ims, zps = _three(bands, {b: (planes[b], float(zeropoints[b])) for b in dict.fromkeys(b for b in bands if b)})
    return _picture(ims, zps, stretch, q)


def _store_field(path: Path, field: str | None) -> tuple[dict, str]:
    """The store's field group (its name checked, or the only one) and its name."""
    from .zarr_store import COMPLETE, field_group, open_store
    try:
        root = open_store(path)
    except Exception as exc:
        raise PreviewError(f"{path}: not a deepfield store ({exc})") from None
    g = field_group(root, field) if field is not None else None
    if g is None:  # the store's fields listed only for the choice or the message (a zarr lookup each)
        names = sorted(root["fields"].group_keys()) if "fields" in root else []
        if field is None:
            if len(names) != 1:
                raise PreviewError(f"{path}: the store has fields {', '.join(names) or 'none'}; name one with --field")
            field = names[0]
        if field not in names:
            raise PreviewError(f"{path}: no field {field!r} (the store has {', '.join(names) or 'none'})")
        g = root["fields"][field]
    if COMPLETE not in g.attrs:
        raise PreviewError(f"{path}: field {field!r} is not completely ingested; ingest it again")
    return g, field


def _store_plane(g, k: int, crop, binning: int) -> np.ndarray:
    """Band k of a store's field group, defects and pixels without data set to 0, cropped to `crop`
    ((x0, y0, x1, y1) or None) and binned, read STRIP rows (a multiple of `binning`) at a time."""
    _, ny, nx = g["image"].shape
    x0, y0, x1, y1 = crop or (0, 0, nx, ny)
    y1 = y0 + (y1 - y0) // binning * binning
    step = max(binning, STRIP // binning * binning)
    parts = []
    for s in range(y0, y1, step):
        rows = slice(s, min(s + step, y1))
        data = np.asarray(g["image"][k, rows, x0:x1], np.float32)
        data[(np.asarray(g["mask"][k, rows, x0:x1]) & (maskbits.BAD | maskbits.NO_DATA)) != 0] = 0.0
        parts.append(bin_image(np.nan_to_num(data), binning))
    return np.concatenate(parts) if parts else np.zeros((0, (x1 - x0) // binning), np.float32)


def _planes(source: Path, field: str | None, bands, crop, binning: int = 1, group=None
            ) -> tuple[list[np.ndarray], list[float], str]:
    """The images and zero points of `bands` ("" for the mean of the first and last) of a simulated field's
    directory or of a field of a deepfield store, defects set to 0, cropped, binned; and a label for
    messages."""
    if group is None and ((source / "field.json").exists() or not (source / "zarr.json").exists()):
        files = field_band_files(source)
        have = list(files)

        def load(b):
            with fits.open(files[b]["image"]) as hdul:
                data = hdul[0].data.astype(np.float32)
                zp = float(hdul[0].header.get("MAGZERO", 27.0))
            with fits.open(files[b]["mask"]) as hdul:  # blank out defects: they are not sky
                data[(hdul[0].data & maskbits.BAD) != 0] = 0.0
            if crop:
                x0, y0, x1, y1 = crop
                data = data[y0:y1, x0:x1]
            return bin_image(np.nan_to_num(data), binning), zp
        label = str(source)
    else:
        g, name = (group, field) if group is not None else _store_field(source, field)
        have = list(g.attrs["bands"])
        zps = list(g.attrs["zeropoints"])

        def load(b):
            k = have.index(b)
            return _store_plane(g, k, crop, binning), float(zps[k])
        label = f"{source} field {name}"
    bands = _choose(have, bands, label)
    ims, zps = _three(bands, {b: load(b) for b in dict.fromkeys(b for b in bands if b)})
    return ims, zps, label


def store_picture(store: str | Path, field: str, binning: int = 1, bands=None, stretch: float | None = None,
                  q: float = 8.0, group=None) -> np.ndarray:
    """uint8 (ny // binning, nx // binning, 3) Lupton RGB of field `field` of a deepfield store, row 0 the
    field's first row (flip it for a picture with north up); bands and stretch as `write_preview`'s. `group`:
    the field's group, already opened (the store is not opened again: each open parses the root's
    consolidated metadata, 0.4 s at 1,000 fields)."""
    ims, zps, _ = _planes(Path(store), field, bands, None, max(int(binning), 1), group)
    return _picture(ims, zps, stretch, q)


def save_png(rgb: np.ndarray, out_png: str | Path, colors: int | None = None) -> Path:
    """Write a uint8 (ny, nx, 3) picture, row 0 at the top, as a PNG atomically (colors: quantised to a
    palette of that many colours)."""
    from PIL import Image
    picture = Image.fromarray(np.ascontiguousarray(rgb))
    if colors:
        picture = picture.quantize(colors=int(colors), method=Image.Quantize.MEDIANCUT)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        picture.save(tmp, format="PNG", optimize=True)
    return out_png


def write_preview(field_dir: str | Path, out_png: str | Path, bands: tuple[str, str, str] | None = None,
                  stretch: float | None = None, q: float = 8.0, binning: int = 1,
                  crop: tuple[int, int, int, int] | None = None, colors: int | None = None,
                  field: str | None = None) -> Path:
    """Write a Lupton RGB PNG of a field; bands in (red, green, blue) order (default: `default_rgb`).

    field_dir: a simulated field's directory (OUT/fields/<field>), or a deepfield Zarr store with `field`
    naming one of its fields (the only one by default), so any ingested image can be looked at.
    stretch defaults to 5x the sky sigma of the red band after binning; crop is (x0, y0, x1, y1) in pixels
    before binning; colors, if given, quantises the picture to a palette of that many colours (a much smaller
    PNG, for documentation).
    """
    ims, zps, _ = _planes(Path(field_dir), field, bands, crop, max(int(binning), 1))
    rgb = _picture(ims, zps, stretch, q)
    return save_png(rgb[::-1], out_png, colors)  # row 0 of the FITS image is the south edge
