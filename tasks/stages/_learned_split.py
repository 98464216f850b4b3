"""The learned detection method's pixel work (tasks/stages/detect.py, `method: learned`): one-pixel detector
defects interpolated before the network (`fill_thin_defects`), and the SEP footprints split into sources at the
network's peaks (`split_by_peaks`, a watershed of the PSF-filtered detection image), each source's record in
SEP's object fields (`OBJ_FIELDS`) with second-moment shapes."""
from __future__ import annotations

import numpy as np
import sep

__all__ = ["OBJ_FIELDS", "fill_thin_defects", "split_by_peaks"]

OBJ_FIELDS = ("x", "y", "a", "b", "theta", "npix", "xmin", "xmax", "ymin", "ymax", "flux", "peak", "flag")


def _moments(w: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> tuple[float, float, float]:
    """Semi-axes and angle (a, b, theta) of the second moments of weights `w` at pixels (xx, yy), with a
    pixel's own variance (1/12) added so that a one-pixel source has a finite size; SEP's conventions."""
    t = w.sum()
    if t <= 0:
        w, t = np.ones_like(w), float(len(w))
    x0, y0 = (w * xx).sum() / t, (w * yy).sum() / t
    x2 = (w * (xx - x0) ** 2).sum() / t + 1 / 12
    y2 = (w * (yy - y0) ** 2).sum() / t + 1 / 12
    xy = (w * (xx - x0) * (yy - y0)).sum() / t
    half, root = (x2 + y2) / 2, np.sqrt(((x2 - y2) / 2) ** 2 + xy ** 2)
    return float(np.sqrt(half + root)), float(np.sqrt(max(half - root, 1e-6))), float(0.5 * np.arctan2(2 * xy, x2 - y2))


def fill_thin_defects(image: np.ndarray, invvar: np.ndarray, unusable: np.ndarray, defect: np.ndarray) -> None:
    """In place, for one band: pixels of `defect` (detector defects, maskbits.BAD) whose left and right
    neighbours are usable get the mean of those two (image and inverse variance) and become usable. A bad
    column or pixel is one pixel wide; interpolating over it before detection is what survey pipelines do (the
    LSST instrument-signature removal interpolates over defects), and it leaves the detector an image like those
    it learned from: with the column left masked, the detector split an i 18.7 star crossed by one in two.
    Saturated cores and bleed trails (not BAD) stay masked, as in training."""
    nx = image.shape[1]
    if nx < 3 or not defect.any():
        return
    ok = ~unusable
    fill = np.zeros_like(defect)
    fill[:, 1:-1] = defect[:, 1:-1] & unusable[:, 1:-1] & ok[:, :-2] & ok[:, 2:]
    if not fill.any():
        return
    yy, xx = np.nonzero(fill)
    image[yy, xx] = 0.5 * (image[yy, xx - 1] + image[yy, xx + 1])
    invvar[yy, xx] = 0.5 * (invvar[yy, xx - 1] + invvar[yy, xx + 1])
    unusable[yy, xx] = False


def split_by_peaks(det: np.ndarray, kernel: np.ndarray, parents, pseg: np.ndarray, peaks: np.ndarray,
                   heat: np.ndarray, confirm: float, keep_npix: float = np.inf, outside_radius: float | None = None,
                   bad: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The learned method's sources (module docstring): (objs with OBJ_FIELDS, blend_id sorted, segmap).
    A footprint without a peak is kept when its heat map reaches `confirm` or it has `keep_npix` pixels.
    outside_radius: peaks outside every footprint become sources with the pixels within this radius (px) that
    no other source has; None: they are dropped. A peak on a `bad` pixel (no usable band) outside every
    footprint is dropped: it is the masked core of a saturated star, whose footprint rings it."""
    from scipy import ndimage
    from skimage.segmentation import watershed
    npar = len(parents)
    ny, nx = pseg.shape
    px = np.clip(np.floor(peaks[:, 0] + 0.5).astype(np.int64), 0, nx - 1)
    py = np.clip(np.floor(peaks[:, 1] + 0.5).astype(np.int64), 0, ny - 1)
    owner = pseg[py, px].astype(np.int64) - 1  # -1: outside every footprint
    npeak = np.bincount(owner[owner >= 0], minlength=npar)
    hmax = np.full(npar + 1, -np.inf)  # the heat map's maximum over each footprint (ndimage.maximum sorts)
    np.maximum.at(hmax, pseg.ravel(), heat.ravel().astype(float))
    hmax = hmax[1:]
    rows: list[tuple] = []
    bids: list[int] = []
    seg = np.zeros(pseg.shape, np.int32)
    whole = np.zeros(npar + 1, np.int32)  # the row of each footprint kept whole (segmap value), 0 for none
    h = kernel.shape[0] // 2
    for j in range(npar):
        p = parents[j]
        if npeak[j] == 0 and hmax[j] < confirm and p["npix"] < keep_npix:
            continue
        if npeak[j] <= 1:
            rows.append(tuple(p[f] for f in OBJ_FIELDS))
            bids.append(j)
            whole[j + 1] = len(rows)
            continue
        x0, x1, y0, y1 = int(p["xmin"]), int(p["xmax"]) + 1, int(p["ymin"]), int(p["ymax"]) + 1
        inside = pseg[y0:y1, x0:x1] == j + 1
        mine = np.flatnonzero(owner == j)
        markers = np.zeros(inside.shape, np.int32)
        markers[py[mine] - y0, px[mine] - x0] = np.arange(1, len(mine) + 1)
        # the PSF-filtered detection image over the footprint's box (with the kernel's margin)
        cy0, cx0 = max(y0 - h, 0), max(x0 - h, 0)
        smooth = ndimage.convolve(det[cy0:min(y1 + h, ny), cx0:min(x1 + h, nx)], kernel, mode="nearest")
        lab = watershed(-smooth[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0], markers, mask=inside)
        d = det[y0:y1, x0:x1]
        for k, m in enumerate(mine):
            yy, xx = np.nonzero(lab == k + 1)
            if len(yy) == 0:
                continue
            w = np.clip(d[yy, xx], 0, None)
            a, b, theta = _moments(w, xx + x0, yy + y0)
            rows.append((float(peaks[m, 0]), float(peaks[m, 1]), a, b, theta, len(yy), int(xx.min() + x0),
                         int(xx.max() + x0), int(yy.min() + y0), int(yy.max() + y0), float(d[yy, xx].sum()),
                         float(d[yy, xx].max()), int(sep.OBJ_MERGED)))
            bids.append(j)
            seg[yy + y0, xx + x0] = len(rows)
    seg = np.where(seg > 0, seg, whole[pseg])
    if outside_radius is not None:
        r = max(float(outside_radius), 1.5)
        h = int(np.ceil(r))
        for m in np.flatnonzero(owner < 0):
            cx, cy = int(px[m]), int(py[m])
            if bad is not None and bad[cy, cx]:
                continue
            y0, y1, x0, x1 = max(cy - h, 0), min(cy + h + 1, ny), max(cx - h, 0), min(cx + h + 1, nx)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            inside = (np.hypot(xx - peaks[m, 0], yy - peaks[m, 1]) <= r) & (seg[y0:y1, x0:x1] == 0)
            yy, xx = yy[inside], xx[inside]
            if len(yy) == 0:
                continue
            w = np.clip(det[yy, xx], 0, None)
            a, b, theta = _moments(w, xx, yy)
            rows.append((float(peaks[m, 0]), float(peaks[m, 1]), a, b, theta, len(yy), int(xx.min()), int(xx.max()),
                         int(yy.min()), int(yy.max()), float(det[yy, xx].sum()), float(det[yy, xx].max()), 0))
            bids.append(npar + int(m))
            seg[yy, xx] = len(rows)
    dtype = [(f, "f8") for f in OBJ_FIELDS]
    objs = np.array(rows, dtype=dtype) if rows else np.zeros(0, dtype)
    blend_id = np.asarray(bids, np.int64)
    order = np.argsort(blend_id, kind="stable")
    relabel = np.zeros(len(rows) + 1, np.int32)
    relabel[order + 1] = np.arange(1, len(rows) + 1, dtype=np.int32)
    return objs[order], blend_id[order], relabel[seg]
