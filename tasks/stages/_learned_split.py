"""The learned detection method's pixel work (tasks/stages/detect.py, `method: learned`): one-pixel detector
defects interpolated before the network (`fill_thin_defects`), and the SEP footprints split into sources at the
network's peaks (`split_by_peaks`, a watershed of the PSF-filtered detection image), each source's record in
SEP's object fields (`OBJ_FIELDS`) with second-moment shapes, and the part of a tile the network runs over
(`network_box`). Saturated stars' masked cores: tasks/stages/_saturated_cores.py."""
from __future__ import annotations

import numpy as np
import sep

from ._saturated_cores import masked_cores, saturated_seeds  # noqa: F401  (saturated_seeds re-exported)

__all__ = ["NET_REACH", "OBJ_FIELDS", "fill_thin_defects", "network_box", "peak_centres", "saturated_seeds",
           "split_by_peaks", "thin_defects"]

# px: how far the detector network's output reaches into its input (its receptive field's half-width, 19 px for
# DetectNet's three convolutions at each of its three scales, and some more): network_box's margin
NET_REACH = 24
OBJ_FIELDS = ("x", "y", "a", "b", "theta", "npix", "xmin", "xmax", "ymin", "ymax", "flux", "peak", "flag")


def thin_defects(unusable: np.ndarray, defect: np.ndarray) -> np.ndarray | None:
    """The pixels fill_thin_defects interpolates over in one band: unusable pixels of `defect` whose left and
    right neighbours are usable; None when there are none."""
    if unusable.shape[1] < 3 or not defect.any():
        return None
    ok = ~unusable
    fill = np.zeros_like(defect)
    fill[:, 1:-1] = defect[:, 1:-1] & unusable[:, 1:-1] & ok[:, :-2] & ok[:, 2:]
    return fill if fill.any() else None


def fill_thin_defects(image: np.ndarray, invvar: np.ndarray, unusable: np.ndarray, defect: np.ndarray) -> None:
    """In place, for one band: pixels of `defect` (detector defects, maskbits.BAD) whose left and right
    neighbours are usable get the mean of those two (image and inverse variance) and become usable. A bad
    column or pixel is one pixel wide; interpolating over it before detection is what survey pipelines do (the
    LSST instrument-signature removal interpolates over defects), and it leaves the detector an image like those
    it learned from: with the column left masked, the detector split an i 18.7 star crossed by one in two.
    Saturated cores and bleed trails (not BAD) stay masked, as in training."""
    fill = thin_defects(unusable, defect)
    if fill is None:
        return
    yy, xx = np.nonzero(fill)
    image[yy, xx] = 0.5 * (image[yy, xx - 1] + image[yy, xx + 1])
    invvar[yy, xx] = 0.5 * (invvar[yy, xx - 1] + invvar[yy, xx + 1])
    unusable[yy, xx] = False


def _smoothed(det: np.ndarray, kernel: np.ndarray, boxes) -> np.ndarray:
    """`det` convolved with `kernel` (edges: nearest pixel) over `boxes` ((x0, x1, y0, y1) each; 0 elsewhere),
    each box convolved with the kernel's margin; by two 1-d passes when the kernel is separable, as
    gaussian_kernel's is (the outer product of its normalised marginals)."""
    from scipy import ndimage
    g = kernel.sum(axis=0)
    g = g[::-1] if np.allclose(np.outer(g, g), kernel, rtol=1e-9, atol=1e-12) else None
    ny, nx = det.shape
    h = kernel.shape[0] // 2
    out = np.zeros_like(det)
    for x0, x1, y0, y1 in boxes:
        cy0, cx0 = max(y0 - h, 0), max(x0 - h, 0)
        part = det[cy0:min(y1 + h, ny), cx0:min(x1 + h, nx)]
        if g is None:
            part = ndimage.convolve(part, kernel, mode="nearest")
        else:
            part = ndimage.correlate1d(ndimage.correlate1d(part, g, axis=0, mode="nearest"), g, axis=1, mode="nearest")
        out[y0:y1, x0:x1] = part[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0]
    return out


def _member_labels(smooth: np.ndarray, pseg: np.ndarray, split: np.ndarray, box: tuple[int, int, int, int],
                   mx: np.ndarray, my: np.ndarray, mfoot: np.ndarray) -> np.ndarray:
    """(y, x) int32: k + 1 on the pixels of member k (a peak at pixel (mx[k], my[k]) in footprint mfoot[k],
    segmap value), 0 elsewhere: one watershed of the smoothed image from the members' peaks over the footprints
    flagged in `split` (indexed by segmap value; all within `box`, x0, x1, y0, y1), each footprint flooded from
    its own peaks only. Footprints are SEP's separate (8-connected) components, so a 4-connected flood never
    crosses from one to another; should two touch, they are flooded again one by one."""
    from skimage.segmentation import watershed
    x0, x1, y0, y1 = box
    ps = pseg[y0:y1, x0:x1]
    markers = np.zeros(ps.shape, np.int32)
    markers[my - y0, mx - x0] = np.arange(1, len(mx) + 1, dtype=np.int32)  # two peaks on one pixel: the later
    sm = -smooth[y0:y1, x0:x1]
    lab = watershed(sm, markers, mask=split[ps])
    foot = np.concatenate([[0], mfoot]).astype(pseg.dtype)
    for f in np.unique(ps[(lab > 0) & (foot[lab] != ps)]):
        inside = ps == f
        lab[inside] = 0
        lab[inside] = watershed(sm, np.where(inside, markers, 0), mask=inside)[inside]
    out = np.zeros(pseg.shape, np.int32)
    out[y0:y1, x0:x1] = lab
    return out


def _records(pix: np.ndarray, k: np.ndarray, det: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Each of `n` sources' pixel count, box, flux, peak and second-moment shape (a, b, theta with a pixel's
    own variance 1/12 added, SEP's conventions; weights: the detection image clipped at 0, or equal where it
    sums to 0) from its pixels: flat indices `pix` into `det` of source `k`."""
    nx = det.shape[1]
    order = np.argsort(k, kind="stable")
    pix, k = pix[order], k[order]
    yy, xx = np.divmod(pix, nx)
    d = det.ravel()[pix]
    npix = np.bincount(k, minlength=n)
    w = np.clip(d, 0, None)
    t = np.bincount(k, w, minlength=n)
    w = np.where(t[k] > 0, w, 1.0)
    t = np.bincount(k, w, minlength=n)
    safe = np.where(npix > 0, t, 1.0)
    x0, y0 = np.bincount(k, w * xx, n) / safe, np.bincount(k, w * yy, n) / safe
    dx, dy = xx - x0[k], yy - y0[k]
    x2 = np.bincount(k, w * dx * dx, n) / safe + 1 / 12
    y2 = np.bincount(k, w * dy * dy, n) / safe + 1 / 12
    xy = np.bincount(k, w * dx * dy, n) / safe
    half, root = (x2 + y2) / 2, np.sqrt(((x2 - y2) / 2) ** 2 + xy ** 2)
    out = {"npix": npix, "a": np.sqrt(half + root), "b": np.sqrt(np.maximum(half - root, 1e-6)),
           "theta": 0.5 * np.arctan2(2 * xy, x2 - y2), "flux": np.bincount(k, d, n)}
    starts = np.searchsorted(k, np.flatnonzero(npix))
    for name, fn, v in (("xmin", np.minimum, xx), ("xmax", np.maximum, xx), ("ymin", np.minimum, yy),
                        ("ymax", np.maximum, yy), ("peak", np.maximum, d)):
        out[name] = np.zeros(n, v.dtype)
        if len(starts):
            out[name][npix > 0] = fn.reduceat(v, starts)
    return out


def split_by_peaks(det: np.ndarray, kernel: np.ndarray, parents, pseg: np.ndarray, peaks: np.ndarray,
                   heat: np.ndarray, confirm: float, keep_npix: float = np.inf, outside_radius: float | None = None,
                   bad: np.ndarray | None = None, peak_reach: float = 0.0, unusable: np.ndarray | None = None,
                   known: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The learned method's sources (module docstring): (objs with OBJ_FIELDS, blend_id sorted, segmap).
    A footprint without a peak is kept when its heat map reaches `confirm` or it has `keep_npix` pixels.
    peak_reach: a footprint with one peak is centred on the peak (its sub-pixel position) rather than on the
    footprint's barycentre when the two lie at most this far apart (px) and the footprint holds no `unusable`
    pixel (unusable in any band; default: `bad`) (0: always the barycentre; see `peak_centres`).
    outside_radius: peaks outside every footprint become sources with the pixels within this radius (px) that
    no other source has; None: they are dropped. A peak on a `bad` pixel (no usable band) outside every
    footprint is a saturated star's masked core: the peak of the footprint that rings it (masked_cores), else
    dropped.
    known: where the heat map was computed (None: everywhere); a footprint with a pixel outside it and no peak
    is kept whole, whatever its heat map.
    Rows are in blend-group order: footprints in SEP's order (a split one's members in the peaks' order), then
    the peaks outside every footprint."""
    npar = len(parents)
    ny, nx = pseg.shape
    px = np.clip(np.floor(peaks[:, 0] + 0.5).astype(np.int64), 0, nx - 1)
    py = np.clip(np.floor(peaks[:, 1] + 0.5).astype(np.int64), 0, ny - 1)
    owner = pseg[py, px].astype(np.int64) - 1  # -1: outside every footprint
    cored = np.zeros(len(peaks), bool)  # peaks in a masked core that a footprint rings (saturated stars)
    ws_det = det  # the image the watershed floods: a masked core as high as its footprint's brightest pixel
    joined = np.zeros((0, 2), np.int64)  # (footprint, the one it was joined into) (masked_cores)
    if bad is not None and np.any((owner < 0) & bad[py, px]):
        pseg, cored, ws_det, joined = masked_cores(det, pseg, bad, px, py, owner)
        owner = pseg[py, px].astype(np.int64) - 1
    npeak = np.bincount(owner[owner >= 0], minlength=npar)
    hmax = np.full(npar + 1, -np.inf)  # the heat map's maximum over each footprint without a peak
    need = np.concatenate([[False], npeak == 0])[pseg]  # (ndimage.maximum would sort every pixel)
    np.maximum.at(hmax, pseg[need], heat[need].astype(float))
    kept = (npeak > 0) | (hmax[1:] >= confirm) | (parents["npix"] >= keep_npix)
    if known is not None:  # footprints the heat map does not cover: kept whole, as SEP found them
        kept |= np.bincount(pseg[~known], minlength=npar + 1)[1:] > 0
    grown = np.zeros(npar, bool)  # a footprint that others were joined into: its record made from its pixels
    if len(joined):
        kept[joined[:, 0] - 1] = False
        grown[joined[:, 1] - 1] = True
    if cored.any():
        # the box of a footprint given a masked core holds the core and the pieces joined into it: the watershed
        # smooths and floods within the boxes, and a core outside its footprint's box (a footprint on one side of
        # a bleed trail) was flooded last, at height 0, the star's member left with a few of its pixels (15 px and
        # no light for an i 11.4 star of a simulated field, its halo given to a galaxy 17 px away)
        parents = parents.copy()
        for f in np.unique(owner[cored]):
            ys, xs = np.nonzero(pseg == f + 1)
            parents["xmin"][f], parents["xmax"][f] = xs.min(), xs.max()
            parents["ymin"][f], parents["ymax"][f] = ys.min(), ys.max()
    whole = np.flatnonzero(kept & (npeak <= 1) & ~grown)
    split = np.zeros(npar + 1, bool)
    split[1:] = kept & ((npeak >= 2) | (grown & (npeak >= 1)))
    mem = np.flatnonzero((owner >= 0) & split[owner + 1])  # the split footprints' members, in peak order
    dtype = [(f, "f8") for f in OBJ_FIELDS]
    rows = np.zeros(len(whole) + len(mem), dtype)
    for f in OBJ_FIELDS:
        rows[f][:len(whole)] = parents[f][whole]
    if peak_reach > 0:
        peak_centres(rows[:len(whole)], whole, owner, npeak, peaks, pseg, bad if unusable is None else unusable,
                     peak_reach, cored)
    lab = np.zeros(pseg.shape, np.int32)
    if len(mem):
        p = parents[split[1:]]
        boxes = np.c_[p["xmin"], p["xmax"] + 1, p["ymin"], p["ymax"] + 1].astype(np.int64)
        union = (boxes[:, 0].min(), boxes[:, 1].max(), boxes[:, 2].min(), boxes[:, 3].max())
        lab = _member_labels(_smoothed(ws_det, kernel, boxes), pseg, split, union, px[mem], py[mem], owner[mem] + 1)
        pix = np.flatnonzero(lab)
        rec = _records(pix, lab.ravel()[pix] - 1, det, len(mem))
        m = rows[len(whole):]
        m["x"], m["y"] = peaks[mem, 0], peaks[mem, 1]
        for f in ("a", "b", "theta", "npix", "xmin", "xmax", "ymin", "ymax", "flux", "peak"):
            m[f] = rec[f]
        m["flag"] = sep.OBJ_MERGED
    group = np.concatenate([whole, owner[mem]])
    # a member without pixels (a later peak took its pixel's marker) is left out
    has = np.concatenate([np.ones(len(whole), bool), rows["npix"][len(whole):] > 0])
    order = np.lexsort((np.concatenate([np.full(len(whole), -1), mem]), group))
    order = order[has[order]]
    rank = np.zeros(len(rows), np.int32)  # segmap value of each row, 0 for none
    rank[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    lut_whole = np.zeros(npar + 1, np.int32)
    lut_whole[whole + 1] = rank[:len(whole)]
    seg = np.where(lab > 0, np.concatenate([[0], rank[len(whole):]]).astype(np.int32)[lab], lut_whole[pseg])
    objs, bids = [rows[order]], [group[order]]
    if outside_radius is not None:
        out_rows, out_ids = _outside_sources(det, seg, peaks, px, py, np.flatnonzero(owner < 0),
                                             max(float(outside_radius), 1.5), bad, len(order))
        objs.append(out_rows)
        bids.append(npar + out_ids)
    return np.concatenate(objs), np.concatenate(bids).astype(np.int64), seg


def peak_centres(rows: np.ndarray, whole: np.ndarray, owner: np.ndarray, npeak: np.ndarray, peaks: np.ndarray,
                 pseg: np.ndarray, bad: np.ndarray | None, reach: float, cored: np.ndarray | None = None) -> None:
    """In place: `rows` (the records of footprints `whole`, reported whole) of the footprints with one peak
    take the peak's position when it lies within `reach` px of the barycentre and the footprint holds no `bad`
    pixel (the stage passes the pixels unusable in any band, but for the one-pixel defects it interpolates for the
    network, which see the footprint as well as its other pixels: one more isolated galaxy found on each of two
    held-out pairs).

    A footprint's barycentre is its isophotal light's, and a faint neighbour below the network's threshold, or
    a noise excursion, merged into the footprint pulls it off the galaxy: on two held-out 2048^2 fields
    (`deepfield eval detect`, seed 20261201) five of the seven isolated galaxies at i 22-24 counted as missed
    had a detection 3-6 px (0.6-1.3") from their centre, beyond the 0.6" match, the footprint's barycentre, while
    the network's peak lay 0.01-0.6 px from it; the measure stage's windowed centroid, which starts from the
    detection's position and gives up past 1 px, could not bring it back. A saturated star's footprint rings
    its masked core, where the network sees a hole: its one peak can lie on the ring or a bleed trail, 12-24 px
    from the centre, which the barycentre finds, and a core saturated in one band alone moved a star's peak
    1.4 px; so footprints with pixels unusable in any band, and peaks further than `reach` (two PSF FWHM in the
    stage) from the barycentre, keep the barycentre."""
    one = np.flatnonzero(npeak[whole] == 1)
    if not len(one):
        return
    first = np.full(len(npeak), -1, np.int64)  # each footprint's peak (the one, where it has one)
    inside = np.flatnonzero(owner >= 0)
    first[owner[inside]] = inside
    pk = first[whole[one]]
    ok = np.hypot(peaks[pk, 0] - rows["x"][one], peaks[pk, 1] - rows["y"][one]) <= reach
    if bad is not None and bad.any():
        tainted = np.bincount(pseg[bad & (pseg > 0)], minlength=len(npeak) + 1)[1:] > 0
        ok &= ~tainted[whole[one]]
    if cored is not None:  # a saturated star's centre, marked in its masked core (masked_cores)
        ok |= cored[pk]
    rows["x"][one[ok]], rows["y"][one[ok]] = peaks[pk[ok], 0], peaks[pk[ok], 1]


def _outside_sources(det, seg, peaks, px, py, idx, r: float, bad, n0: int) -> tuple[np.ndarray, np.ndarray]:
    """Sources of the peaks `idx` outside every footprint: each takes the pixels within `r` of its centre that
    no source has, and of those that two such discs share, the nearer peak's (the earlier one's at equal
    distance); written into `seg` (values from n0 + 1, in the peaks' order); none on a `bad` pixel.
    Returns their records and peak indices.

    The nearer peak's, not the earlier's: two faint peaks closer than `r` (3.6 px apart, r 3.4) had the earlier
    one's disc take the later one's centre, whose Kron aperture (1.75 px, the other detections' segments
    masked) then held no pixel of its own, and its fluxes came out NaN (one source in 9,000 on two held-out
    2048^2 fields, three with a PSF of heavier wings)."""
    ny, nx = seg.shape
    if bad is not None:
        idx = idx[~bad[py[idx], px[idx]]]
    h = int(np.ceil(r))
    oy, ox = (o.ravel() for o in np.mgrid[-h:h + 1, -h:h + 1])
    yy, xx = py[idx, None] + oy, px[idx, None] + ox
    take = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    take &= np.hypot(xx - peaks[idx, 0, None], yy - peaks[idx, 1, None]) <= r
    q = np.broadcast_to(np.arange(len(idx))[:, None], take.shape)[take]
    pix = yy[take] * nx + xx[take]
    dist = np.hypot(xx - peaks[idx, 0, None], yy - peaks[idx, 1, None])[take]
    free = seg.ravel()[pix] == 0
    q, pix, dist = q[free], pix[free], dist[free]
    order = np.lexsort((q, dist, pix))  # per pixel: the nearest peak first, then the earliest
    q, pix = q[order], pix[order]
    mine = np.ones(len(pix), bool)
    mine[1:] = pix[1:] != pix[:-1]
    q, pix = q[mine], pix[mine]
    rec = _records(pix, q, det, len(idx))
    has = rec["npix"] > 0
    rows = np.zeros(int(has.sum()), [(f, "f8") for f in OBJ_FIELDS])
    rows["x"], rows["y"] = peaks[idx[has], 0], peaks[idx[has], 1]
    for f in ("a", "b", "theta", "npix", "xmin", "xmax", "ymin", "ymax", "flux", "peak"):
        rows[f] = rec[f][has]
    value = np.zeros(len(idx), np.int32)
    value[has] = n0 + np.arange(1, len(rows) + 1)
    np.put(seg, pix, value[q])  # flat (C-order) indices, whatever the layout of seg
    return rows, idx[has].astype(np.int64)


def network_box(tile, pseg: np.ndarray, reach: float) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) in the halo arrays: where the detector's heat map is needed, with the network's reach
    (NET_REACH) about it; None for the whole tile. Needed: the tile core and `reach` px about it (a peak
    outside every footprint is a source there), and every SEP footprint that holds a pixel of that (its peaks
    split it). The box starts at a multiple of 4 px, so that the network's two stride-2 steps sample the same
    pixels as over the whole tile and its heat map inside matches the whole tile's (the int8 network's
    exactly: tests/test_learned_detection_stage.py). The footprints of the halo alone, which hold only other
    tiles' primary sources, are then kept whole (split_by_peaks: `known`), their pixels still another
    detection's for the stages after."""
    from scipy import ndimage
    core = getattr(tile, "core", None)
    box = getattr(tile, "box", None)
    if core is None or box is None:
        return None
    ny, nx = pseg.shape
    cy, cx = box.offset_of(core)
    r = int(np.ceil(reach))
    y0, y1, x0, x1 = max(cy.start - r, 0), min(cy.stop + r, ny), max(cx.start - r, 0), min(cx.stop + r, nx)
    ids = np.unique(pseg[y0:y1, x0:x1])
    ids = ids[ids > 0]
    if len(ids):
        found = ndimage.find_objects(pseg, max_label=int(ids.max()))
        for i in ids:
            sy, sx = found[i - 1]
            y0, y1, x0, x1 = min(y0, sy.start), max(y1, sy.stop), min(x0, sx.start), max(x1, sx.stop)
    y0, x0 = max(y0 - NET_REACH, 0) // 4 * 4, max(x0 - NET_REACH, 0) // 4 * 4
    y1, x1 = min(y1 + NET_REACH, ny), min(x1 + NET_REACH, nx)
    if (y1 - y0) * (x1 - x0) >= 0.95 * ny * nx:
        return None
    return y0, y1, x0, x1
