"""The measure stage's Kron (AUTO) aperture (tasks/stages/measure.py): the Kron radius measured once on the
detection image within `rmax` isophotal radii (`sep.kron_radius`), an ellipse of `k` Kron radii that every band
sums (`sep.sum_ellipse`), at least `min_scale` times a and b (Source Extractor's minimum, the second value of its
PHOT_AUTOPARAMS: it floors k times the Kron radius), or a circle of `min_radius` px where that ellipse's mean radius
is smaller (shapes of a pixel or less). The circle is a floor and never replaces a larger ellipse: before
2026-12-07 it replaced the ellipse wherever the Kron radius (not k times it) times sqrt(a b) was under
`min_radius`, as SEP's documentation's example does, and a faint galaxy whose ellipse would have reached 5-6 px was
summed within 1.75 px: 0.2-0.4 of its light, for 44 % of the isolated galaxies at i 24-25 on simulated fields. With
`neighbours` (the detect stage's segmentation map and each row's seg_id) the pixels of the other detections'
segments are left out of the radius and of the sums, which SEP scales up by the aperture's area over its
unmasked area (when it is given a mask, as the measure stage always does); where those segments cover the whole
ellipse (SEP's radius or sum is then NaN or wholly masked, with only APER_HASMASKED in a sum's flags), it is
measured without them. With `mirror` (the measure stage's `kron_mirror`, default) a pixel of another segment
counts in the sums as its mirror image about the source's centre where that one lies in no other segment and is
not masked (Source Extractor's MASK_TYPE CORRECT), and only the pixels without such an image are made up by the
area scaling: the scaling fills a neighbour's segment in the faint outskirts with the aperture's mean, too bright.
On the two pairs of held-out 2048^2 fields of `deepfield eval detect --size 2048` (seeds 20261127, 20261201):
isolated galaxies at i < 24, median |dF|/F 0.064 -> 0.062 and 0.071 -> 0.068 (bias -3.4 -> -4.2 and -3.4 -> -4.1
%: the scaling's excess had hidden part of the aperture's own deficit); the blended ones (the Kron flux of the
members alone in their footprint) 0.221 -> 0.210 and 0.227 -> 0.227; galaxies in blend groups 0.107 -> 0.103 and
0.104 -> 0.104. The ellipse's semi-major axis is at
most `max_footprint` footprint radii, sqrt(npix / pi): the Kron radius of a source near the noise is itself
mostly noise, and unbounded it summed a faint galaxy's neighbourhood into a flux 3-4 mag too bright."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sep

__all__ = ["KronAperture", "auto_scale", "kron_aperture"]


@dataclass
class KronAperture:
    """The Kron apertures of n sources: centres (x, y), shapes (a, b, theta), ellipse radii `r_kron` (in units
    of a and b), `circle` (the sources summed in a circle of `min_radius` px instead) and the segmentation
    masking `neighbours` (segmap, seg_id; empty: none)."""

    x: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    r_kron: np.ndarray
    circle: np.ndarray
    min_radius: float
    neighbours: dict = field(default_factory=dict)
    mirror: bool = False  # a pixel in another detection's segment counted as its mirror image about the centre
    _pixels: dict = field(default_factory=dict, repr=False, compare=False)  # _aperture_pixels' for every band

    def reach(self) -> np.ndarray:
        """How far each aperture reaches from its centre, px."""
        return np.where(self.circle, self.min_radius, self.r_kron * self.a)

    def sum(self, img, err=None, mask=None, masked: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flux, error, SEP flags) of every aperture on `img`; `masked`: the other detections' segments
        (`neighbours`) left out, and an aperture that they cover wholly (SEP's sum NaN) summed without them."""
        nb = self.neighbours if masked else {}
        f, e, fl = self._sums(img, err, mask, np.arange(len(self.x)), nb)
        lost = np.flatnonzero(np.isnan(f))
        if nb and len(lost):  # every pixel of the aperture in other detections' segments (SEP's sum is then
            # NaN with only APER_HASMASKED set): summed without the segments, as the Gaussian apertures are
            f[lost], e[lost], fl[lost] = self._sums(img, err, mask, lost, {})
        if nb and self.mirror:
            self._mirrored(f, img, mask, fl)
        if err is not None:  # SEP's error is that of the whole aperture unmasked (_pixels.masked_sum_error_scale)
            scale = self._masked_error_scale(mask, fl, nb, np.arange(len(self.x)))
            if nb and len(lost):
                scale[lost] = self._masked_error_scale(mask, fl[lost], {}, lost)
            e = e * scale
        return f, e, fl

    def _mirrored(self, f: np.ndarray, img, mask, flags: np.ndarray) -> None:
        """Source Extractor's MASK_TYPE CORRECT, in place on `f`: in each aperture that SEP flagged as masked
        and that holds pixels of another detection's segment, such a pixel counts as its mirror image about the
        source's centre, where that one lies in the image and in no other segment (and is not in `mask`); what
        is still missing, and the aperture's own pixels in `mask`, are made up in proportion to the area (as SEP
        does)."""
        shape = np.shape(img)
        plans = [(i, self._mirror_plan(int(i), shape)) for i in np.flatnonzero((flags & sep.APER_HASMASKED) != 0)]
        plans = [(i, p) for i, p in plans if p is not None]
        if not plans:
            return
        rows = np.array([i for i, _ in plans])
        own = np.concatenate([p[0] for _, p in plans])
        mir = np.concatenate([p[1] for _, p in plans])
        own_lab = np.repeat(np.arange(len(plans)), [len(p[0]) for _, p in plans])
        mir_lab = np.repeat(np.arange(len(plans)), [len(p[1]) for _, p in plans])
        total = np.array([p[2] for _, p in plans], np.float64)
        flat = np.asarray(img, np.float64).ravel()
        n = len(plans)
        if mask is None:
            wo, wm = np.ones(len(own)), np.ones(len(mir))
        else:
            bad = np.asarray(mask).ravel() != 0
            wo, wm = (~bad[own]).astype(np.float64), (~bad[mir]).astype(np.float64)
        light = np.bincount(own_lab, flat[own] * wo, n) + np.bincount(mir_lab, flat[mir] * wm, n)
        used = np.bincount(own_lab, wo, n) + np.bincount(mir_lab, wm, n)
        ok = (used > 0) & np.isfinite(f[rows])
        f[rows[ok]] = light[ok] * total[ok] / used[ok]

    def _mirror_plan(self, i: int, shape: tuple[int, int]) -> tuple | None:
        """For _mirrored, the same for every band (kept): aperture `i`'s own pixels, the mirror images standing in
        for its pixels of other segments (flat indices) and its number of pixels; None when it holds none of
        those."""
        key = ("mirror", i)
        if key not in self._pixels:
            nb = self.neighbours
            ny, nx = shape
            idx, out = self._aperture_pixels(i, nb, shape)
            plan = None
            if out.any():
                seg = nb["segmap"]
                yy, xx = np.divmod(idx[out], nx)
                my = np.rint(2 * self.y[i] - yy).astype(np.int64)
                mx = np.rint(2 * self.x[i] - xx).astype(np.int64)
                inside = (my >= 0) & (my < ny) & (mx >= 0) & (mx < nx)
                my, mx = my[inside], mx[inside]
                free = (seg[my, mx] == 0) | (seg[my, mx] == nb["seg_id"][i])
                plan = (idx[~out], my[free] * nx + mx[free], len(idx))
            self._pixels[key] = plan
        return self._pixels[key]

    def _masked_error_scale(self, mask, flags: np.ndarray, nb: dict, which: np.ndarray) -> np.ndarray:
        """sqrt(A / (A - A_masked)) of the apertures `which` (indices; `flags` theirs) that SEP flagged
        APER_HASMASKED (1 for the others): A_masked their pixels (SEP's sub-pixel sampling of 1 counts a pixel
        whose centre lies inside) in `mask` or, with `nb`, in another detection's segment. Counted here rather
        than by SEP's sums of indicator images, as those cannot leave out each row's own segment."""
        scale = np.ones(len(which))
        pick = np.flatnonzero((flags & sep.APER_HASMASKED) != 0)
        if len(pick) == 0:
            return scale
        shape = (mask if mask is not None else nb["segmap"]).shape
        parts = [self._aperture_pixels(int(i), nb, shape) for i in which[pick]]
        idx = np.concatenate([p[0] for p in parts])
        out = np.concatenate([p[1] for p in parts])
        label = np.repeat(np.arange(len(parts)), [len(p[0]) for p in parts])
        if mask is not None:
            out = out | (np.asarray(mask).ravel()[idx] != 0)
        area = np.bincount(label, minlength=len(parts))
        left = np.bincount(label, weights=~out, minlength=len(parts))
        ok = left > 0
        scale[pick[ok]] = np.sqrt(area[ok] / left[ok])
        return scale

    def _aperture_pixels(self, i: int, nb: dict, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(flat indices of the pixels of aperture `i` on an image of `shape`, whether each lies in another
        detection's segment of `nb`), the same for every band: kept for the next band's sums."""
        key = (i, bool(nb))
        if key in self._pixels:
            return self._pixels[key]
        ny, nx = shape
        circle = bool(self.circle[i])
        reach = self.min_radius if circle else self.r_kron[i] * self.a[i]
        x0, x1 = max(int(np.floor(self.x[i] - reach)), 0), min(int(np.ceil(self.x[i] + reach)) + 1, nx)
        y0, y1 = max(int(np.floor(self.y[i] - reach)), 0), min(int(np.ceil(self.y[i] + reach)) + 1, ny)
        dx = np.arange(x0, x1) - self.x[i]
        dy = (np.arange(y0, y1) - self.y[i])[:, None]
        if circle:
            inside = dx * dx + dy * dy <= self.min_radius ** 2
        else:
            cxx, cyy, cxy = sep.ellipse_coeffs(self.a[i], self.b[i], self.theta[i])
            inside = cxx * dx * dx + cyy * dy * dy + cxy * dx * dy <= self.r_kron[i] ** 2
        yy, xx = np.nonzero(inside)
        yy, xx = yy + y0, xx + x0
        out = np.zeros(len(yy), bool)
        if nb:
            seg = nb["segmap"][yy, xx]
            out = (seg != 0) & (seg != nb["seg_id"][i])
        self._pixels[key] = (yy * nx + xx, out)
        return self._pixels[key]

    def _sums(self, img, err, mask, rows: np.ndarray, nb: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """sum's figures of the apertures `rows` (indices), the segments of `nb` (segmap, seg_id; or none) out."""
        f, e = np.zeros(len(rows)), np.zeros(len(rows))
        fl = np.zeros(len(rows), dtype=np.int64)
        for part, circle in ((~self.circle[rows], False), (self.circle[rows], True)):
            if not part.any():
                continue
            r = rows[part]
            sub = dict(segmap=nb["segmap"], seg_id=nb["seg_id"][r]) if nb else {}
            if circle:
                f[part], e[part], fl[part] = sep.sum_circle(img, self.x[r], self.y[r], self.min_radius, err=err,
                                                            mask=mask, subpix=1, **sub)
            else:
                f[part], e[part], fl[part] = sep.sum_ellipse(img, self.x[r], self.y[r], self.a[r], self.b[r],
                                                             self.theta[r], self.r_kron[r], err=err, mask=mask,
                                                             subpix=1, **sub)
        return f, e, fl


def auto_scale(kron, a, b, k: float, min_scale: float, min_radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(the AUTO ellipse's scale in units of a and b: k Kron radii, at least `min_scale`; whether the source is
    summed in the circle of `min_radius` px instead, where that ellipse's mean radius is smaller)."""
    scale = np.maximum(k * np.asarray(kron, float), min_scale)
    return scale, scale * np.sqrt(a * b) < min_radius


def kron_aperture(det, det_bad, x, y, a, b, theta, npix, neighbours: dict, k: float, rmax: float,
                  max_footprint: float, min_radius: float,
                  min_scale: float = 0.0, mirror: bool = False) -> tuple[KronAperture, np.ndarray, np.ndarray]:
    """(the apertures, Kron radii (the ellipse's scale over k), SEP flags of the radii) of sources at (x, y) with
    shapes (a, b, theta) on the detection image `det` (its `det_bad` pixels left out), footprints of `npix` pixels
    (None: no bound), the neighbours' pixels in the sums as their mirror images with `mirror`; the module
    docstring."""
    n = len(x)
    kron = np.zeros(n)
    kflag = np.zeros(n, dtype=np.int64)
    if n:
        kron, kf = sep.kron_radius(det, x, y, a, b, theta, rmax, mask=det_bad, **neighbours)
        kron, kflag = np.asarray(kron, float), np.asarray(kf, np.int64)
        lost = ~np.isfinite(kron) | ((kflag & sep.APER_ALLMASKED) != 0)
        if neighbours and lost.any():  # other detections' segments over all of its ellipse: without them
            kr, kf = sep.kron_radius(det, x[lost], y[lost], a[lost], b[lost], theta[lost], rmax, mask=det_bad)
            kron[lost], kflag[lost] = kr, kf
    kron = np.where(np.isfinite(kron), kron, 0.0)
    if npix is not None:  # a noise-inflated Kron radius of a faint source must not sum half the sky
        rmax_fp = max_footprint * np.sqrt(np.asarray(npix, float) / np.pi)
        kron = np.minimum(kron, rmax_fp / (k * a))
    scale, circle = auto_scale(kron, a, b, k, min_scale, min_radius)
    return KronAperture(x, y, a, b, theta, scale, circle, min_radius, neighbours, mirror), scale / k, kflag
