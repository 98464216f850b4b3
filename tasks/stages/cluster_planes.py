"""The cluster stage's binned planes (tasks/stages/cluster.py): a field's pixels summed in bin x bin blocks
(`block_sums`; of a whole field of the store a strip at a time, `field_sums`), scaled into the network's input
planes (`planes_from_sums`: background-subtracted, in units of the binned sky sigma, asinh), grown by a halo
filled from neighbouring fields (`extend_planes`), and the network run on them, in blocks when they are large
(`detect_planes`). The training skies (tasks/trainsets/cluster_sky.py) and the render evaluation use the same
scaling."""
from __future__ import annotations

import numpy as np

from ._pixels import UNUSABLE

__all__ = ["BACKGROUND_MESH", "BLOCK_HALO", "MAX_SIDE", "SOFTENING", "binned_planes", "block_sums", "detect_planes",
           "extend_planes", "field_planes", "field_sums", "planes_from_sums"]

SOFTENING = 3.0  # asinh softening, in units of the binned sky noise
BACKGROUND_MESH = 32  # binned pixels (51" at bin 8): the smooth sky left over after the ingest's
MAX_SIDE = 4096  # binned pixels: planes larger than this on a side run through the network in blocks
BLOCK_HALO = 80  # binned pixels (128" at bin 8) around each block's core


def _block_sum(a: np.ndarray, b: int) -> np.ndarray:
    """Sum over b x b blocks of the last two axes (their lengths are multiples of b)."""
    *lead, ny, nx = a.shape
    return a.reshape(*lead, ny // b, b, nx // b, b).sum(axis=(-1, -3))


def block_sums(image: np.ndarray, invvar: np.ndarray, mask: np.ndarray, bin: int) -> np.ndarray:
    """Per band and bin x bin block: the sum of the usable pixels' values, their number and the sum of their
    inverse variances, (3, band, ny // bin, nx // bin) float64. Usable: no mask bit in UNUSABLE, invvar > 0,
    finite. Rows and columns beyond a multiple of `bin` are dropped."""
    nb, ny, nx = image.shape
    ny, nx = ny // bin * bin, nx // bin * bin
    img, iv = np.asarray(image[:, :ny, :nx]), np.asarray(invvar[:, :ny, :nx])
    good = (np.asarray(mask[:, :ny, :nx]) & UNUSABLE) == 0
    good &= iv > 0
    good &= np.isfinite(img)
    good &= np.isfinite(iv)
    # one float64 buffer for the three sums (the values and their order of summation as in float64 copies of
    # the inputs, without the copies, which cost most of the time)
    buf = np.zeros(img.shape, np.float64)
    out = np.empty((3, nb, ny // bin, nx // bin))
    np.copyto(buf, img, where=good)
    out[0] = _block_sum(buf, bin)
    np.copyto(buf, good)
    out[1] = _block_sum(buf, bin)
    buf[...] = 0.0
    np.copyto(buf, iv, where=good)
    out[2] = _block_sum(buf, bin)
    return out


def planes_from_sums(sums: np.ndarray, bin: int) -> np.ndarray:
    """Network input planes, (bands + 1, H, W) float32, from `block_sums` (module docstring of the scaling).

    Per band: the mean of each block's usable pixels, minus a smooth background (SEP on `BACKGROUND_MESH`
    binned-pixel meshes), divided by the binned sky noise (sigma / bin, sigma = 1 / sqrt of the median over
    blocks of the mean inverse variance), then asinh(x / SOFTENING). The last plane is the coverage: the
    fraction of usable pixels in the block, the least over the bands (0 outside the field or where all is
    masked, where the band planes are 0 too)."""
    import sep
    total, n, ivsum = sums
    nb, h, w = n.shape
    out = np.zeros((nb + 1, h, w), np.float32)
    if h == 0 or w == 0:
        return out
    cover = np.ones((h, w))
    for b in range(nb):
        cover = np.minimum(cover, n[b] / bin**2)
        empty = n[b] == 0
        if empty.all():
            continue
        mean = total[b] / np.maximum(n[b], 1)
        sigma = 1.0 / np.sqrt(np.median(ivsum[b][~empty] / n[b][~empty])) / bin
        mesh = min(BACKGROUND_MESH, h, w)
        bkg = sep.Background(np.ascontiguousarray(mean), mask=np.ascontiguousarray(empty), bw=mesh, bh=mesh,
                             fw=3, fh=3).back()
        out[b] = np.where(empty, 0.0, np.arcsinh((mean - bkg) / sigma / SOFTENING))
    out[nb] = cover
    out[:nb] *= cover > 0
    return out


def binned_planes(image: np.ndarray, invvar: np.ndarray, mask: np.ndarray, bin: int) -> np.ndarray:
    """Network input planes of in-memory (band, y, x) pixels (see `planes_from_sums`)."""
    return planes_from_sums(block_sums(image, invvar, mask, bin), bin)


def field_sums(group, bands: list[str], bin: int, strip: int = 512) -> np.ndarray:
    """`block_sums` of `bands` of a whole field of the store (its Zarr group), read `strip` rows at a time so
    that a large field never sits in memory at full resolution; a damaged shard is an error naming the field."""
    from ..zarr_store import verify_shards
    from ..zarr_read import read_checked
    field = group.path.rsplit("/", 1)[-1]
    verify_shards(group, field)
    idx = [list(group.attrs["bands"]).index(b) for b in bands]
    _, ny, nx = group.attrs["shape"]
    ny, nx = ny // bin * bin, nx // bin * bin
    step = max(strip // bin, 1) * bin
    # the bands as one slice, picked after the read: zarr reads a list of bands (orthogonal indexing) about
    # 15x slower than a slice of the same pixels
    lo, hi = min(idx), max(idx) + 1
    pick = None if idx == list(range(lo, hi)) else [i - lo for i in idx]
    parts = []
    for y0 in range(0, ny, step):  # read by TensorStore (tasks/zarr_store.py: read_checked)
        sl = (slice(lo, hi), slice(y0, min(y0 + step, ny)), slice(0, nx))
        what = f"rows {y0}-{sl[1].stop}"
        arrays = [read_checked(group, field, a, sl, what) for a in ("image", "invvar", "mask")]
        parts.append(block_sums(*(a if pick is None else a[pick] for a in arrays), bin))
    return np.concatenate(parts, axis=2)


def field_planes(group, bands: list[str], bin: int, strip: int = 512) -> np.ndarray:
    """Network input planes of a whole field of the store (its Zarr group): `planes_from_sums` of `field_sums`."""
    return planes_from_sums(field_sums(group, bands, bin, strip), bin)


def _world_to_pixel(wcs, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel coordinates of (ra, dec) in `wcs`, NaN where a distortion's inversion does not converge
    (far off the field)."""
    from astropy.wcs import NoConvergence
    try:
        x, y = wcs.all_world2pix(ra, dec, 0)
        return np.asarray(x, float), np.asarray(y, float)
    except NoConvergence as exc:
        sol = np.array(exc.best_solution, float)
        for bad in (exc.divergent, exc.slow_conv):
            if bad is not None:
                sol[bad] = np.nan
        return sol[:, 0], sol[:, 1]


def extend_planes(planes: np.ndarray, wcs, bin: int, halo: int, neighbours) -> np.ndarray:
    """`planes` (C, H, W) of a field grown by `halo` binned pixels on each side, (C, H + 2 halo, W + 2 halo):
    the field's own planes in the middle; around them, where the field has no binned pixel, the planes of the
    first of `neighbours` ((wcs, planes) of other fields, each binned whole by `field_planes`) that covers the
    spot (coverage > 0 there); 0 (coverage 0) where none does. `wcs`: the field's WCS (full-resolution
    pixels, 0-based); binned pixel (i, j) of the field holds its pixels [i bin, (i + 1) bin) x [j bin, ...).

    Nearest binned pixel: the fields of a survey share the pixel scale, so the neighbour's binned pixel that
    fills a spot is centred within half a binned pixel (0.8") of it on each axis; the network's first level
    is 3.2", its output 6.4" and a cluster's core tens of arcsec, so the shift is far below what it
    resolves, while interpolating (or reproject's flux-conserving resampling) would average neighbouring
    binned pixels, lowering their noise below the unit noise of every other binned pixel the network sees
    and was trained on."""
    c, h, w = planes.shape
    out = np.zeros((c, h + 2 * halo, w + 2 * halo), np.float32)
    out[:, halo:halo + h, halo:halo + w] = planes
    if halo == 0 or not neighbours:
        return out
    ring = np.ones(out.shape[1:], bool)
    ring[halo:halo + h, halo:halo + w] = False
    iy, ix = np.nonzero(ring)
    ra, dec = wcs.all_pix2world((ix - halo) * bin + (bin - 1) / 2.0, (iy - halo) * bin + (bin - 1) / 2.0, 0)
    for nwcs, nplanes in neighbours:
        if not len(iy):
            break
        x, y = _world_to_pixel(nwcs, ra, dec)
        with np.errstate(invalid="ignore"):
            jx, jy = np.floor((x + 0.5) / bin), np.floor((y + 0.5) / bin)  # the binned pixel holding (x, y)
        nh, nw = nplanes.shape[1:]
        ok = np.isfinite(jx) & np.isfinite(jy) & (jx >= 0) & (jx < nw) & (jy >= 0) & (jy < nh)
        jx, jy = np.where(ok, jx, 0).astype(int), np.where(ok, jy, 0).astype(int)
        ok &= nplanes[-1, jy, jx] > 0
        out[:, iy[ok], ix[ok]] = nplanes[:, jy[ok], jx[ok]]
        iy, ix, ra, dec = iy[~ok], ix[~ok], ra[~ok], dec[~ok]  # the first neighbour that covers a spot fills it
    return out


def detect_planes(model, planes: np.ndarray, threshold: float, device: str = "cpu", max_side: int = 0,
                  halo: int = 0) -> dict[str, np.ndarray]:
    """models.cluster_net.detect on `planes` (C, H, W), run at once when both sides are at most `max_side`
    (default MAX_SIDE), else in blocks: cores of max_side - 2 halo (default BLOCK_HALO) binned pixels, each
    seen with `halo` around it (zero beyond the planes), each keeping the detections in its core. Detections
    in binned pixels of `planes`, highest score first."""
    from deepfield.models.cluster_net import detect, window
    max_side, halo = max_side or MAX_SIDE, halo or BLOCK_HALO
    _, h, w = planes.shape
    if h <= max_side and w <= max_side:
        return detect(model, planes, threshold, device=device)
    core = (max_side - 2 * halo) // 4 * 4  # every block's output grid (stride 4) on the whole planes' grid
    if core <= 0 or halo % 4:
        raise ValueError(f"cluster stage: blocks of {max_side} binned px with a halo of {halo}: the halo must be a "
                         "multiple of 4 and under half the block")
    parts = []
    for y0 in range(0, h, core):
        for x0 in range(0, w, core):
            bh, bw = min(core, h - y0), min(core, w - x0)
            f = detect(model, window(planes, y0 - halo, x0 - halo, bh + 2 * halo, bw + 2 * halo), threshold,
                       device=device)
            f["x"], f["y"] = f["x"] + (x0 - halo), f["y"] + (y0 - halo)
            keep = (f["x"] >= x0 - 0.5) & (f["x"] < x0 + bw - 0.5) & (f["y"] >= y0 - 0.5) & (f["y"] < y0 + bh - 0.5)
            parts.append({k: v[keep] for k, v in f.items()})
    found = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(-found["score"], kind="stable")
    return {k: v[order] for k, v in found.items()}
