"""Symmetric, monotonic templates of the members of a blend, the classical deblender's priors (SDSS's `photo`
deblender, Lupton; the symmetry and monotonicity constraints of scarlet, Melchior et al. 2018), by which the
deblend stage shares each pixel's light among the members of a blend group.

A member's template in a band is the light of the blend, smoothed by a Gaussian of `smooth` px (0.5: a noise dip
near the centre would otherwise cut the whole profile behind it), that is
1. symmetric under a 180 degree turn about the member's centre: min(I(x), I(2c - x)), so a neighbour's light
   on one side of the member, which has no mirror image on the other, is left out;
2. monotonic: no brighter than the pixel one step towards the centre, so a neighbour's light further out (or
   its mirror image) is cut at the member's own profile.
Negative pixels count as 0. A faint member's template made from the blend alone holds its bright neighbour's
wing at the faint member's position (the wing is there on both sides of it, up to its centre), so the
templates are made again (`passes`, 2) from the blend less the other members' templates (smoothed as the blend),
each weighted by how much brighter that member is: 1/2 for one as bright, rising to 1 at FULL_RATIO (10) times
brighter, down to 0 at 10 times fainter (by the sums of the first templates). The weights change smoothly with
the ratio, so which of two members of about equal light takes it does not turn on a small difference.

Measured on the two pairs of held-out 2048^2 fields of `deepfield eval detect --size 2048` (seeds 20261127 and
20261201), the median |dF|/F in i of the galaxies with truth blendedness > 0.1 at i < 24 (273 and 344, the
undetected ones with the flux of the detection that swallowed them), against the U-Net's fractions (0.378 and
0.330): these templates from the raw blend, one pass, 0.269 (first pair); smoothed by 0.5 px, 0.279 and 0.301;
taken strictly brightest first, each from the blend less the templates before it, 0.229 and 0.289, but then
a close pair of two galaxies of about equal surface brightness (tests/test_learned_detection_stage.py) came
out -37 to -56 % and +47 to +78 %; with the weights above, after 1, 2 and 3 passes 0.259 and 0.279, 0.243 and
0.277, 0.236 and 0.273 (that pair: -14 to -23 % and +19 to +35 % after 2 or 3; the U-Net -14 to -27 % and +7 to
+12 %). Tried and not kept: a noise allowance in the monotonic step (faint members take their neighbours'
light: 0.81), re-centring each member on its own light between passes (0.26 and 0.29-0.31). Tried 2026-12-04
on the first pair (the members the stage deblends, 175 of the 273: 0.173 with these templates): one morphology
per member from the bands' S/N-weighted sum, its amount in each band fitted by least squares (scarlet's
factorisation) 0.195; the members' templates' amplitudes fitted to the stamp (`fit_fluxes`) instead of shares
0.211; three passes 0.168 (all 273: 0.227 as with two). Those members' errors are not noise: a median 5.5
times their flux errors (median error 3 % of the flux); the large ones (half-light radius > 1") come out 22 %
low, the small ones (< 0.4") 9 % high. In the close pair of tests/test_learned_detection_stage.py the members
come out within 15 % (0.95-0.97 and 1.04-1.09 of their truth) when given their true centres: the fainter
one's detected centre, 0.4-0.5 px towards its neighbour, is what puts them 14-35 % off. Re-centring the
templates on the half-pixel grid within 0.5 px, by the largest template of the member's own light or by the
least squared difference between the stamp and the templates' sum, left that pair as it was (the latter
prefers a centre beyond the true one).

Mirror images beyond the stamp (2026-12-05): a blend's stamp is centred on its members' mean position, so a
bright member off the centre has the mirror image of the stamp's far side beyond the stamp. Counted as 0 there,
its template stopped on that side, and its wing went to the faint members it held: an i = 23.7 galaxy 28 px
from an i = 18.8 disk came out at 2.1 times its flux. The deblend stage now cuts the stamp with a margin that
holds every pixel's mirror image about every member (`mirror_pad`, less than a stamp's side) and the templates
read the mirror images beyond the stamp from it (the blend there, the other detections' segments zeroed as on
the stamp; the other members' templates, which end at the stamp's edge, are not subtracted beyond it). On the
two pairs of held-out fields (seeds 20261201 and 20261127, the blended galaxies as above): 0.245 -> 0.231 and
0.224 -> 0.218; the deblended members alone 0.191 -> 0.186 and 0.168 -> 0.163, the small ones' (half-light
radius < 0.4") bias +16 -> +9 % on the first pair; on two further pairs (seeds 7 and 8) 0.193 -> 0.189 and
0.216 -> 0.205. Tried with it and not kept: smoothing by 1 px (0.228, but
0.253 on the second pair); the monotonic step on the blend smoothed by 1 or 2 px (faint members took more of
their neighbours' light: 0.262, 0.373); stamps centred on the box that holds the members' light (no change).
Mirror images about the exact centre (the member's image shifted by its centre's fractional part, bilinearly,
before the integer mirror; a 1.5 px Gaussian's template then keeps 96-97 % of its light against 85-90 % about the
nearest half-pixel): on the four pairs (seeds 20261201, 20261127, 7, 8) 0.231 / 0.218 / 0.189 / 0.205 -> 0.192 /
0.234 / 0.174 / 0.198, but the bias +2.9 / +7.0 / -0.6 / +2.2 % -> +8.2 / +12.0 / +4.5 / +6.4 %: the small members
(< 0.4") take more (+8 -> +13 % and +6 -> +15 % on the first two pairs where no undetected neighbour is near
them), so the snapping stays. The min of a pixel and its mirror image is biased low by the noise (0.56 sigma where
both hold the same light); taking the mean where they agree within sigma (min + min(|a - b| / 2, sigma)) gave
0.264 / 0.312 on the first two pairs (the small ones +35-39 %).

Tried 2026-12-05 and not kept (the deblend stage replayed on the cached tiles of seed 20261201's pair, the
members it deblends, 0.186 over all 32 tiles and 0.191 over every fourth):
- the truth's centres in place of the detected ones (2,443 of the 2,558 rows in blend groups, matched one to one
  within 2 px): 0.186 -> 0.177. The centres are not what limits these templates on real blends;
- a joint fit of PSF-convolved elliptical exponentials (analytic Fourier transforms times the Moffat PSF's,
  position, size and ellipticity of every member fitted by least squares in i, fluxes linear in every band),
  each pixel shared in proportion to the fitted models: the close pair of the tests within 1-9 % of its truth
  (against 14-35 % here), but on the fields 0.191 -> 0.316 (members with blendedness > 0.3 +116 to +237 %) at
  about 70 s per tile against 0.5; with the sizes held under 6 px (scale length) and the fluxes non-negative,
  0.316 and, on every fourth tile of seed 20261127's pair, 0.521 against 0.173 (faint members beside bright ones
  +190 to +740 %). The likely cause, not checked: what one exponential leaves of a bright bulge-and-disk galaxy
  goes to its faint neighbour's model, and so does that galaxy's light in those pixels.

Masked pixels (2026-12-06): the stage's stamp holds 0 where a band is masked (saturated cores, bad pixels and
columns: 0.02-0.2 % of a simulated tile's pixels per band, so most blend stamps hold some). As 0 they cut every
template whose centre or path they held: a saturated star's template was all but empty in the bands where it
saturates, and its wings went to its neighbours (on fields with a PSF of heavier wings, an i 21 galaxy 18 px from
an i 12.5 star came out at 16 times its flux, the star at 0 in r, i and z). They now constrain no template
(`unknown`, _smoothed_known): that star keeps its light, the galaxy 0.06 of its own (buried under the star's
wing). On three pairs of held-out fields (seeds 7, 20261127, 20261201) the blended galaxies' median |dF|/F went
0.1894 -> 0.1882, 0.2184 -> 0.2235 and 0.2304 -> 0.2287 (four galaxies changed by more than 2 % on the second,
three of them next to a saturated star that had lent them its light), those in blend groups 0.1024 -> 0.1018,
0.1085 -> 0.1068 and 0.1036 -> 0.1038; the stage costs 7-8 % more.

Written here rather than taken from scarlet/scarlet2: those fit the templates iteratively (about 0.3 s per blend
stamp on this project's 2-core CPU, `deepfield eval deblend`), where the deblend stage must stay within a
millisecond per member; these are projections of the data, no fit.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["symmetric_monotonic", "blend_templates", "template_fractions", "mirror_pad"]

PASSES = 2  # passes of templates made from the blend less the others' (|dF|/F after 1, 2, 3: docstring)
FULL_RATIO = 10.0  # a member this many times brighter (its template's sum) than another counts in full
_RING = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])  # a pixel's 8 neighbours


def geometry(size: int, centres: np.ndarray, pad: int = 0) -> tuple:
    """The pixel maps of the templates of members at `centres` ((K, 2) as (y, x)) on a (size, size) stamp, as
    flat indices: each pixel's mirror image under the 180 degree turn about the nearest half-pixel of the
    centre (which maps pixels onto pixels), into all the members' pixels (K * size^2,: member k's pixel p is
    k * size^2 + p), and, where it lies beyond the stamp, into the stamp grown by `pad` px on every side
    ((size + 2 pad)^2,), with whether it lies on the stamp and whether on the grown stamp; the pixel one step
    towards the centre (itself within a pixel of it), into all the members' pixels; and the number of
    pointer-doubling rounds that reach the centre from every pixel."""
    c = np.asarray(centres, np.float64).reshape(-1, 2)
    yy, xx = np.divmod(np.arange(size * size), size)
    my = np.rint(2 * c[:, :1]).astype(np.int64) - yy[None]
    mx = np.rint(2 * c[:, 1:]).astype(np.int64) - xx[None]
    on_stamp = (my >= 0) & (my < size) & (mx >= 0) & (mx < size)
    grown = size + 2 * pad
    inside = (my >= -pad) & (my < size + pad) & (mx >= -pad) & (mx < size + pad)
    base = np.arange(len(c), dtype=np.int64)[:, None] * size * size
    mirror = np.clip(my, 0, size - 1) * size + np.clip(mx, 0, size - 1) + base
    beyond = np.clip(my + pad, 0, grown - 1) * grown + np.clip(mx + pad, 0, grown - 1)
    dy, dx = c[:, :1] - yy[None], c[:, 1:] - xx[None]
    d = np.hypot(dy, dx)
    step = d > 1.0
    dd = np.maximum(d, 1e-9)
    ry = np.clip(np.where(step, np.rint(yy[None] + dy / dd), yy[None]), 0, size - 1).astype(np.int64)
    rx = np.clip(np.where(step, np.rint(xx[None] + dx / dd), xx[None]), 0, size - 1).astype(np.int64)
    # a step of one pixel along the direction to the centre, rounded to a pixel, ends at least 0.29 px nearer
    # (one of the unit vector's components is at least 0.71), so no path is longer than d / 0.29 steps
    rounds = max(1, int(np.ceil(np.log2(float(d.max()) / 0.29 + 2)))) if d.size else 1
    return (mirror.ravel(), beyond.ravel(), on_stamp.ravel(), inside.ravel(), (ry * size + rx + base).ravel(),
            rounds)


def mirror_pad(size: int, centres: np.ndarray) -> int:
    """The margin (px) by which a (size, size) stamp must grow on every side to hold the mirror image of each of
    its pixels about each of the members' `centres` ((K, 2) as (y, x), stamp pixels)."""
    m = np.rint(2 * np.asarray(centres, np.float64)).astype(np.int64).ravel()
    return int(max(0, -(m.min() - size + 1), m.max() - (size - 1))) if m.size else 0


def symmetric_monotonic(images: np.ndarray, geom: tuple, outer: np.ndarray | None = None) -> np.ndarray:
    """Templates (K, B, S, S) float32 >= 0 of K members, each from its own image (K, B, S, S), already
    smoothed: symmetric about the member's centre, then monotonic (module docstring); `geom` = geometry(S,
    centres, pad). Mirror images beyond the stamp are read from `outer` (B, S + 2 pad, S + 2 pad), the blend on
    the grown stamp (the stamp in its middle), the same for every member; light mirrored from beyond it (or
    with `outer` None, beyond the stamp) counts as 0."""
    k, b, s = images.shape[0], images.shape[1], images.shape[-1]
    mirror, beyond, on_stamp, inside, ref, rounds = geom
    # pixels as rows of B bands: a gather moves whole rows (np.take along axis 0, much faster than fancy
    # indexing of (K, B, N) arrays)
    flat = np.clip(np.asarray(images, np.float32), 0.0, None).transpose(0, 2, 3, 1).reshape(k * s * s, b)
    t = np.take(flat, mirror, axis=0)
    if outer is None:
        t *= on_stamp[:, None]
    else:
        off = np.flatnonzero(~on_stamp)
        rows = np.clip(np.asarray(outer, np.float32), 0.0, None).reshape(b, -1).T
        t[off] = np.take(rows, beyond[off], axis=0) * inside[off, None]
    np.minimum(t, flat, out=t)
    # monotonic: the minimum along the path to the centre, by pointer doubling (after round j each pixel holds
    # the minimum over the next 2^j pixels of its path)
    for _ in range(rounds):
        np.minimum(t, np.take(t, ref, axis=0), out=t)
        ref = ref[ref]
    return np.ascontiguousarray(t.reshape(k, s, s, b).transpose(0, 3, 1, 2))


def _smoothed_known(img: np.ndarray, unknown: np.ndarray | None, smooth: float) -> np.ndarray:
    """`img` (B, H, W) smoothed by a Gaussian of `smooth` px as if its `unknown` pixels (H, W or B, H, W; masked:
    saturated cores, bad pixels and columns) held the mean of their known 8 neighbours (so that an unknown
    pixel's 0 does not pull its neighbours down), then those pixels set, band by band, to the brightest known
    pixel's value: a pixel that was not measured then constrains no template (the minimum of a pixel and its
    mirror image, and along the path to a member's centre, is the known side's), where as 0 it cut every
    template whose centre or path it held: a saturated star's template was empty, and its wings went to its
    faint neighbours (one of i 21 came out 16 times too bright); a bad pixel cut a galaxy's template behind it."""
    img = np.asarray(img, np.float32)
    if unknown is None or not np.any(unknown):
        return gaussian_filter(img, (0, smooth, smooth), truncate=3.0) if smooth > 0 else img
    unknown = np.broadcast_to(unknown, img.shape)
    b, y, x = np.nonzero(unknown)
    if smooth > 0:
        # the holes filled from their known neighbours (a few pixels each: cheaper than a normalised convolution
        # of every band; the smoothing's weight beyond one pixel, exp(-8) at 0.5 px, is negligible)
        img = img.copy()
        h, w = img.shape[-2:]
        yy, xx = y[:, None] + _RING[:, 0], x[:, None] + _RING[:, 1]  # (holes, 8)
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        yy, xx = np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)
        ok = inside & ~unknown[b[:, None], yy, xx]
        count = ok.sum(axis=1)
        total = np.where(ok, img[b[:, None], yy, xx], 0.0).sum(axis=1)
        img[b, y, x] = np.where(count > 0, total / np.maximum(count, 1), 0.0)
        img = gaussian_filter(img, (0, smooth, smooth), truncate=3.0)
    else:
        img = img.copy()
    # the brightest pixel of each band (a filled hole is no brighter than its known neighbours)
    img[b, y, x] = img.max(axis=(-2, -1))[b]
    return img


def blend_templates(stamp: np.ndarray, centres: np.ndarray, smooth: float = 0.5, passes: int = PASSES,
                    grown: np.ndarray | None = None, unknown: np.ndarray | None = None,
                    band_scale: np.ndarray | None = None) -> np.ndarray:
    """Templates (K, B, S, S) float32 >= 0 of the K members at `centres` ((K, 2) as (y, x), stamp pixels) of one
    blend stamp (B, S, S) (module docstring): from the blend smoothed by `smooth` px, then `passes` times from
    the smoothed blend less the other members' templates, each weighted by how much brighter it is.

    `grown` (B, S + 2 pad, S + 2 pad), the same pixels with a margin of `pad` px on every side (mirror_pad), gives
    the mirror images that fall beyond the stamp: without it they count as 0, so that a member off the stamp's
    centre had no template on the far side of the stamp, and a bright galaxy's wing there went to the faint
    members it held. Beyond the stamp the other members' templates are not subtracted.

    `unknown` ((H, W) or (B, H, W) bool, on `grown` when it is given, else on the stamp): pixels without a
    measurement, which constrain no template (_smoothed_known); the templates are 0 there (the stamp has no light
    to share there) and the members' brightness weights count the known pixels only.

    `band_scale` (B,): each band's image unit in one flux unit (the deblend stage's, by the bands' zero points), in
    which the members' light is summed over the bands for their brightness weights; None: the bands share one
    unit. Summed in each band's own unit, a band stored in units 10 times smaller counted 10 times more, and the
    deblended fluxes of 170-250 of 2,454 sources moved by up to 28 of their errors with the bands' units."""
    c = np.asarray(centres, np.float64).reshape(-1, 2)
    size = np.shape(stamp)[-1]
    pad = 0 if grown is None else (np.shape(grown)[-1] - size) // 2
    holes = None  # (band, y, x) of the stamp's unknown pixels
    if unknown is not None and np.any(unknown):
        inner = np.asarray(unknown)[..., pad:pad + size, pad:pad + size]
        holes = np.nonzero(np.broadcast_to(inner, np.shape(stamp))) if inner.any() else None
    if pad > 0:
        big = _smoothed_known(grown, None if holes is None else unknown, smooth)
        img = np.ascontiguousarray(big[:, pad:pad + size, pad:pad + size])
    else:
        img = _smoothed_known(stamp, None if holes is None else unknown, smooth)
        big = None
    if len(c) == 0:
        return np.zeros((0,) + img.shape, np.float32)
    geom = geometry(size, c, pad)
    t = symmetric_monotonic(np.broadcast_to(img, (len(c),) + img.shape), geom, big)
    if holes is not None:
        t[(slice(None),) + holes] = 0.0
    if len(c) < 2:
        return t
    if band_scale is None:
        light = t.sum(axis=(1, 2, 3), dtype=np.float64) + 1e-30
    else:
        light = t.sum(axis=(2, 3), dtype=np.float64) @ np.asarray(band_scale, np.float64) + 1e-30
    # w[j, k]: the weight of member j's template in what member k's is made from
    w = np.clip(0.5 + np.log10(light[:, None] / light[None, :]) / np.log10(FULL_RATIO), 0.0, 1.0)
    np.fill_diagonal(w, 0.0)
    for _ in range(passes):
        blurred = gaussian_filter(t, (0, 0, smooth, smooth), truncate=3.0) if smooth > 0 else t
        rest = img[None] - np.tensordot(w.T.astype(np.float32), blurred, axes=1)
        if holes is not None:  # still no constraint where nothing was measured
            rest[(slice(None),) + holes] = img[holes]
        t = symmetric_monotonic(rest, geom, big)
        if holes is not None:
            t[(slice(None),) + holes] = 0.0
    return t


def template_fractions(stamp: np.ndarray, centres: np.ndarray, smooth: float = 0.5,
                       grown: np.ndarray | None = None, unknown: np.ndarray | None = None,
                       band_scale: np.ndarray | None = None) -> np.ndarray:
    """Each member's share (K, B, S, S) of each pixel's light: its template over the sum of the members'
    templates wherever they have light, 0 elsewhere (what the deblend stage multiplies the pixels by); `grown`
    the unknown pixels and `band_scale` as for blend_templates."""
    from deepfield.models.deblend_unet import share
    return share(blend_templates(stamp, centres, smooth, grown=grown, unknown=unknown, band_scale=band_scale),
                 floor=0.0)
