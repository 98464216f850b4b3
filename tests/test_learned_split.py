"""The learned detection method's split of SEP footprints into sources (tasks/stages/_learned_split.py) on
hand-made images whose geometry is known: a saturated star's masked core, alone or ringed by a footprint that
also holds a galaxy (with and without a bleed trail), saturated regions seeding sources at their cores, a
one-peak footprint centred on its peak, footprints split at their ridges and peaks outside every footprint."""
from __future__ import annotations

import numpy as np
import pytest


def test_a_peak_in_a_saturated_core_is_not_a_second_source():
    """A star's masked core is a hole in its footprint; the detector's peak there lies outside every footprint
    but on unusable pixels, and must not become a source beside the star's footprint."""
    from deepfield.tasks.stages._pixels import gaussian_kernel
    from deepfield.tasks.stages._learned_split import OBJ_FIELDS, split_by_peaks
    n = 40
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(xx - 20, yy - 20)
    det = np.where(r < 10, 100 * np.exp(-r / 3), 0).astype(np.float64)
    bad = r < 2.5
    det[bad] = 0
    pseg = ((r < 10) & ~bad).astype(np.int32)
    parent = np.zeros(1, [(f, "f8") for f in OBJ_FIELDS])
    parent[0] = (20, 20, 4, 4, 0, pseg.sum(), 10, 30, 10, 30, det.sum(), det.max(), 0)
    heat = np.where(r < 2, 0.9, 0.0)
    peaks = np.array([[20.0, 20.0, 0.9]])
    for hole, expect in ((bad, 1), (None, 2)):  # without the mask the peak would be a second source
        objs = split_by_peaks(det, gaussian_kernel(3.0), parent, pseg, peaks, heat, 0.3, 100.0, 3.0, hole)[0]
        assert len(objs) == expect


def test_a_saturated_star_ringed_by_its_footprint_keeps_its_centre():
    """A bright star's masked core is a hole in its footprint, which also holds a galaxy 10 px away with its own
    peak. The detector's peak in the core makes the star a member of that footprint, at its centre, with its
    side of the watershed (the core flooded as the footprint's brightest); without the peak in the core the
    footprint had only the galaxy's peak, and the star was lost in it. With peak_reach, a footprint whose one
    peak is in its core is centred there."""
    from deepfield.tasks.stages._learned_split import OBJ_FIELDS, split_by_peaks
    from deepfield.tasks.stages._pixels import gaussian_kernel
    n = 48
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(xx - 20, yy - 20)
    g = np.hypot(xx - 30, yy - 21)
    det = 200 * np.exp(-r / 3) + 20 * np.exp(-g / 1.5)
    bad = r < 2.5
    det[bad] = 0
    pseg = ((det > 0.5) & ~bad).astype(np.int32)
    parent = np.zeros(1, [(f, "f8") for f in OBJ_FIELDS])
    w = det * pseg
    parent[0] = ((w * xx).sum() / w.sum(), (w * yy).sum() / w.sum(), 5, 4, 0, pseg.sum(), 5, 40, 5, 36, w.sum(),
                 det.max(), 0)
    kern = gaussian_kernel(3.0)
    both = np.array([[30.1, 21.0, 0.9], [20.2, 19.9, 0.6]])
    objs, blend, seg = split_by_peaks(det, kern, parent, pseg, both, np.zeros(det.shape), 0.3, np.inf, 3.0, bad)
    assert len(objs) == 2 and len(set(blend)) == 1
    star = int(np.argmin(np.hypot(objs["x"] - 20, objs["y"] - 20)))
    assert (objs["x"][star], objs["y"][star]) == (20.2, 19.9)
    assert objs["flux"][star] > 0.8 * det[r < 7].sum()  # the star's own light is its member's
    assert seg[20, 20] == star + 1  # the core belongs to the star's member
    galaxy_only = both[:1]
    none = np.zeros(det.shape)
    objs = split_by_peaks(det, kern, parent, pseg, galaxy_only, none, 0.3, np.inf, 3.0, bad)[0]
    assert len(objs) == 1  # one source, at the galaxy's peak or the barycentre: the star is not a source
    core_only = both[1:]
    objs = split_by_peaks(det, kern, parent, pseg, core_only, none, 0.3, np.inf, 3.0, bad, 6.0)[0]
    assert len(objs) == 1 and (objs["x"][0], objs["y"][0]) == (20.2, 19.9)
    # a bleed trail, masked in every band, runs from the core out of the footprint to the image's edge: the
    # core is still the footprint's (most of its border within CORE_NEAR is the footprint)
    trail = bad | ((np.abs(xx - 20) <= 1) & (yy <= 20))
    det2, pseg2 = np.where(trail, 0.0, det), np.where(trail, 0, pseg).astype(np.int32)
    objs, _, seg = split_by_peaks(det2, kern, parent, pseg2, both, none, 0.3, np.inf, 3.0, trail)
    star = int(np.argmin(np.hypot(objs["x"] - 20, objs["y"] - 20)))
    assert len(objs) == 2 and (objs["x"][star], objs["y"][star]) == (20.2, 19.9) and seg[20, 20] == star + 1


def test_a_star_whose_bleed_trail_cuts_its_halo_in_two_is_one_source():
    """A bright star's bleed trail, masked in every band, runs across its whole footprint and cuts its halo in
    two footprints, each holding about half of its masked core's border; a galaxy with its own peak sits in the
    right half. The halves are joined: the star is one source at its centre with the light of both (each half
    had been a source of its own, 9 px off, and the star, whose core no single footprint rang, was lost), and
    the galaxy stays a source. With a narrower left half, under half the border, the core (outside the right
    footprint's box) is still the star's and the left half is joined too: the star's member had been left with
    a few masked pixels and no light, the left half a second source 7 px away."""
    from deepfield.tasks.stages._learned_split import OBJ_FIELDS, split_by_peaks
    from deepfield.tasks.stages._pixels import gaussian_kernel
    n = 64
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(xx - 30, yy - 32)
    g = np.hypot(xx - 44, yy - 40)
    light = 400 * np.exp(-r / 4) + 25 * np.exp(-g / 1.5)
    kern = gaussian_kernel(3.0)
    for half in (4, (2, 5)):  # the trail's half-width; (left, right): the core off-centre in the trail
        lo, hi = (half, half) if isinstance(half, int) else half
        trail = (xx >= 30 - lo) & (xx <= 30 + hi)  # top to bottom: the core (r < 4) lies inside it
        det = np.where(trail, 0.0, light)
        foot = (light > 0.5) & ~trail
        pseg = np.where(foot & (xx < 30), 1, np.where(foot & (xx > 30), 2, 0)).astype(np.int32)
        parents = np.zeros(2, [(f, "f8") for f in OBJ_FIELDS])
        for k in (1, 2):
            m = pseg == k
            w = det * m
            parents[k - 1] = ((w * xx).sum() / w.sum(), (w * yy).sum() / w.sum(), 5, 4, 0, m.sum(), xx[m].min(),
                              xx[m].max(), yy[m].min(), yy[m].max(), w.sum(), det[m].max(), 0)
        peaks = np.array([[44.1, 40.0, 0.9], [30.0, 32.0, 0.1]])  # the galaxy's; the star's, a saturated seed
        objs, blend, seg = split_by_peaks(det, kern, parents, pseg, peaks, np.zeros(det.shape), 0.3, 50.0, 3.0,
                                          trail, 6.0)
        d = np.hypot(objs["x"] - 30, objs["y"] - 32)
        star = int(np.argmin(d))
        assert (objs["x"][star], objs["y"][star]) == (30.0, 32.0)
        assert objs["flux"][star] > 0.7 * det[(r < 12) & ~trail].sum(), (half, objs["flux"][star])
        assert np.all((d[np.arange(len(objs)) != star] > 12)), objs[["x", "y", "flux"]]  # no second source of it
        gal = int(np.argmin(np.hypot(objs["x"] - 44, objs["y"] - 40)))
        assert gal != star and abs(objs["x"][gal] - 44.1) < 0.01
        assert len(objs) == 2 and len(set(blend)) == 1 and seg[32, 30] == star + 1


def test_saturated_regions_seed_a_source_at_their_core():
    """saturated_seeds: a saturated core of radius 3 at (20, 30) with an unflagged bleed trail one pixel wide
    running 30 px up from it gets a peak at the core (its centroid would lie 5 px up the trail); a second region
    with a peak within reach gets none; no saturation leaves the peaks as they were."""
    from deepfield.tasks.stages._learned_split import saturated_seeds
    yy, xx = np.mgrid[0:80, 0:60]
    sat = np.hypot(xx - 20, yy - 30) <= 3
    sat |= (xx == 20) & (yy > 30) & (yy < 64)
    assert (yy[sat].mean() - 30) > 4
    sat |= np.hypot(xx - 45, yy - 10) <= 1.5
    peaks = np.array([[46.0, 11.0, 0.9]])
    heat = np.full(sat.shape, 0.2)
    out = saturated_seeds(peaks, heat, sat, 6.0)
    assert out.shape == (2, 3) and out[0].tolist() == [46.0, 11.0, 0.9]
    assert np.hypot(out[1, 0] - 20, out[1, 1] - 30) < 1.0 and out[1, 2] == pytest.approx(0.2)
    assert saturated_seeds(peaks, heat, np.zeros(sat.shape, bool), 6.0) is peaks


def test_a_one_peak_footprint_is_centred_on_its_peak():
    """A galaxy at (20, 20) whose footprint also holds a faint neighbour's light below the network's threshold at
    (32, 20): the footprint's barycentre lies between them, the source at the galaxy's peak; not when the
    footprint holds an unusable pixel (a saturated core), when the peak lies beyond `peak_reach` of the
    barycentre, or with `peak_reach` 0 (the barycentre, as before)."""
    from deepfield.tasks.stages._learned_split import OBJ_FIELDS, split_by_peaks
    from deepfield.tasks.stages._pixels import gaussian_kernel
    yy, xx = np.mgrid[0:40, 0:50]
    det = 60 * np.exp(-np.hypot(xx - 20, yy - 20) / 2.0) + 30 * np.exp(-np.hypot(xx - 32, yy - 20) / 3.0)
    pseg = (det > 1.0).astype(np.int32)
    w = det * pseg
    bx, by = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    assert bx - 20 > 3  # the barycentre, off the galaxy by more than the 0.6" (3 px) match
    parent = np.zeros(1, [(f, "f8") for f in OBJ_FIELDS])
    parent[0] = (bx, by, 6, 3, 0, pseg.sum(), 5, 45, 8, 32, w.sum(), 60, 0)
    peaks = np.array([[20.2, 19.9, 0.8]])
    heat = np.zeros(det.shape)
    kern = gaussian_kernel(3.0)

    def centre(reach, bad=None):
        objs = split_by_peaks(det, kern, parent, pseg, peaks, heat, 0.3, np.inf, 3.0, bad, reach)[0]
        assert len(objs) == 1
        return objs["x"][0], objs["y"][0]

    assert centre(6.0) == (20.2, 19.9)
    assert centre(0.0) == (bx, by)
    assert centre(bx - 20.2 - 0.1) == (bx, by)  # the peak beyond reach
    core = np.zeros(det.shape, bool)
    core[20, 20] = True
    assert centre(6.0, core) == (bx, by)  # a footprint with an unusable pixel
    far = np.zeros(det.shape, bool)
    far[0, 0] = True  # outside the footprint: no matter
    assert centre(6.0, far) == (20.2, 19.9)


def test_footprints_are_split_at_their_ridges_and_outside_peaks_share_by_distance():
    """Two footprints, each holding two equal blobs 6 px apart, and two peaks outside both, 3 px apart with
    discs of radius 3: each footprint's pixels go to its own two peaks, split at the ridge between them (x = 18
    and x = 43, equidistant, to either), each half of the light (the ridge's column to one); the two outside
    peaks' discs share pixels, each to the nearer peak (x <= 11 to the first, x >= 12 to the second); the
    segmentation map gives every row exactly its pixels."""
    from deepfield.tasks.stages._learned_split import OBJ_FIELDS, split_by_peaks
    from deepfield.tasks.stages._pixels import gaussian_kernel
    yy, xx = np.mgrid[0:60, 0:60]
    det = np.zeros((60, 60))
    for cx, cy in ((15, 15), (21, 15), (40, 40), (46, 40)):
        det += 50 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 1.5 ** 2))
    pseg = np.zeros((60, 60), np.int32)
    pseg[10:21, 8:29] = 1
    pseg[35:46, 33:54] = 2
    parents = np.zeros(2, [(f, "f8") for f in OBJ_FIELDS])
    for j, (x0, x1, y0, y1) in enumerate(((8, 28, 10, 20), (33, 53, 35, 45))):
        parents[j] = (x0 + 10, y0 + 5, 3, 2, 0, 231, x0, x1, y0, y1, det[pseg == j + 1].sum(), 50, 0)
    peaks = np.array([[15, 15, .9], [21, 15, .9], [40, 40, .9], [46, 40, .9], [10, 50, .8], [13, 50, .7]], float)
    heat = np.zeros((60, 60))
    objs, blend_id, seg = split_by_peaks(det, gaussian_kernel(3.0), parents, pseg, peaks, heat, 0.3, np.inf, 3.0)
    assert len(objs) == 6
    assert blend_id.tolist() == [0, 0, 1, 1, 6, 7]
    assert objs["x"].tolist() == [15, 21, 40, 46, 10, 13]
    for k in range(6):
        assert (seg == k + 1).sum() == objs["npix"][k]
    for k, (lo, hi) in enumerate(((8, 18), (18, 28), (33, 43), (43, 53))):
        mine = seg == k + 1
        assert np.all(pseg[mine] == 1 + k // 2)
        assert xx[mine].min() >= lo and xx[mine].max() <= hi
        assert objs["flux"][k] == pytest.approx(det[pseg == 1 + k // 2].sum() / 2, rel=0.05)  # the ridge: one
    assert ((seg == 1) | (seg == 2)).sum() == (pseg == 1).sum()  # every pixel of the footprint to a member
    dist = [np.hypot(xx - cx, yy - 50) for cx in (10, 13)]
    disc = [d <= 3 for d in dist]
    first = disc[0] & ~(disc[1] & (dist[1] < dist[0]))
    second = disc[1] & ~(disc[0] & (dist[0] <= dist[1]))
    assert disc[0].sum() == 29 and (disc[0] & disc[1]).sum() > 0 and not (first & second).any()
    assert objs["npix"][4] == first.sum() and np.all(seg[first] == 5)
    assert objs["npix"][5] == second.sum() and np.all(seg[second] == 6)
    assert np.all(xx[first & disc[1]] <= 11) and np.all(xx[second & disc[0]] >= 12)
