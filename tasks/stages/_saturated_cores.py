"""Saturated stars in the learned detection method (tasks/stages/detect.py, `method: learned`): a source seeded at
the core of every saturated region that no peak of the detector lies near (`saturated_seeds`), and a peak in a
masked core given to the footprint that rings it, the halo's pieces that a bleed trail cut joined
(`masked_cores`, for split_by_peaks in tasks/stages/_learned_split.py)."""
from __future__ import annotations

import numpy as np

__all__ = ["CORE_NEAR", "CORE_NEAR_MAX", "CUT_SHARE", "masked_cores", "saturated_seeds"]

CORE_NEAR = 12.0  # px: how far from a peak in a masked core its region is looked at (masked_cores)
CORE_NEAR_MAX = 96.0  # px: the furthest, for the widest cores
CUT_SHARE = 0.15  # of a masked core's border: a footprint holding this much is a piece of its star's halo


def saturated_seeds(peaks: np.ndarray, heat: np.ndarray, saturated: np.ndarray, reach: float) -> np.ndarray:
    """`peaks` ((n, 3) x, y, heat) with a peak added at the core of every connected region of `saturated`
    pixels (saturated in any band, bleed trails left out by the caller where they are flagged) that no peak lies
    within `reach` px of: what saturates is a source. The detector learned saturated cores masked in every band;
    a star saturated in some bands only (i and z, not g and r) leaves holes in some of its channels, and its heat
    stayed below the threshold (0.37 for an i = 17.4 star on a held-out field, whose footprint then went to
    three galaxies 25-35 px away). The core is where the region is thickest (the largest distance to its edge,
    the mean position of the pixels there), not its centroid: a bleed trail that is not flagged as one hangs
    from a star's core a pixel or two wide, and would pull a centroid along it."""
    from scipy import ndimage
    if not saturated.any():
        return peaks
    lab, n = ndimage.label(saturated, structure=np.ones((3, 3)))
    idx = np.arange(1, n + 1)
    depth = ndimage.distance_transform_edt(saturated)
    # each region's largest depth over its own pixels (ndimage.maximum sorts the whole tile: 58 ms a tile
    # against well under 1)
    deepest = np.full(n + 1, np.inf)
    deepest[1:] = 0.0
    np.maximum.at(deepest, lab[saturated], depth[saturated])
    core = saturated & (depth >= deepest[lab] - 1e-6)
    cy, cx = np.array(ndimage.center_of_mass(core, lab, idx)).reshape(-1, 2).T
    if len(peaks):
        d = np.hypot(peaks[:, 0][None] - cx[:, None], peaks[:, 1][None] - cy[:, None]).min(axis=1)
        cx, cy = cx[d > reach], cy[d > reach]
    if not len(cx):
        return peaks
    ny, nx = heat.shape
    h = heat[np.clip(np.rint(cy).astype(int), 0, ny - 1), np.clip(np.rint(cx).astype(int), 0, nx - 1)]
    return np.concatenate([peaks.reshape(-1, 3), np.c_[cx, cy, h]])


def masked_cores(det: np.ndarray, pseg: np.ndarray, bad: np.ndarray, px: np.ndarray, py: np.ndarray,
                  owner: np.ndarray, near: float = CORE_NEAR) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Peaks on `bad` pixels (no usable band) outside every footprint, in a masked region that one footprint
    rings: a saturated star's masked core. The region is the peak's connected `bad` pixels outside every
    footprint, within `near` px of the peak (a bleed trail, masked too, can run from the core out of the
    footprint), or as much further as the core is wide (doubled until the region has a border there); it is the
    footprint's that holds most of its border there, if that is more than half the border (the rest sky or other
    footprints). The detector marks the star's centre there; left out, the star was lost whenever the ring held
    other peaks (the footprint split among its neighbouring galaxies) or was reported at the barycentre of a
    footprint that a bleed trail cut: four stars at i 14.5-16.6 on one held-out pair of fields.

    A star bright enough for its bleed trail to run across its whole halo has the halo cut in footprints on either
    side: the footprints holding at least CUT_SHARE of the border each, together more than half of it, are joined
    into the one holding most (the star's light is one source; a galaxy among them stays a peak of its own): on a
    simulated field an i 9.7 star whose two halves held about half the border each was missing from the catalog,
    its light given to detections on either side of its trail, 36 and 46 px off, and an i 11.4 star's other half
    was a second source 7 px from it.

    Returns the segmentation with each such region given to its footprint, which peaks are in such regions, the
    image for the watershed with the regions at their footprint's brightest, and the footprints joined into
    another ((n, 2) segmap values: the footprint, the one that now holds its pixels)."""
    from scipy import ndimage
    ny, nx = pseg.shape
    masked, _ = ndimage.label(bad & (pseg == 0), structure=np.ones((3, 3)))
    pseg, ws_det = pseg.copy(), det
    cored = np.zeros(len(px), bool)
    joined: list[tuple[int, int]] = []
    for k in np.flatnonzero((owner < 0) & bad[py, px]):
        reach = float(near)
        while True:
            r = int(np.ceil(reach))
            y0, y1 = max(py[k] - r - 1, 0), min(py[k] + r + 2, ny)
            x0, x1 = max(px[k] - r - 1, 0), min(px[k] + r + 2, nx)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            close = np.hypot(yy - py[k], xx - px[k]) <= reach
            region = (masked[y0:y1, x0:x1] == masked[py[k], px[k]]) & close
            ring = ndimage.binary_dilation(region, structure=np.ones((3, 3))) & ~region & close
            if ring.any() or reach >= CORE_NEAR_MAX:
                break
            reach *= 2  # a core wider than `near`: look as far again
        around, count = np.unique(pseg[y0:y1, x0:x1][ring], return_counts=True)
        count = np.where(around > 0, count, 0)
        if not count.size or count.max() <= 0:
            continue
        f = int(around[np.argmax(count)])
        cut = (count >= CUT_SHARE * ring.sum()) & (around > 0)
        if count[cut].sum() <= 0.5 * ring.sum():
            continue
        for g in around[cut]:  # the halo's pieces, cut by the trail: one footprint
            if int(g) != f:
                pseg[pseg == g] = f
                joined.append((int(g), f))
        if ws_det is det:
            ws_det = det.copy()
        ws_det[y0:y1, x0:x1][region] = det[pseg == f].max()
        pseg[y0:y1, x0:x1][region] = f
        cored[k] = True
    return pseg, cored, ws_det, np.array(joined, np.int64).reshape(-1, 2)
