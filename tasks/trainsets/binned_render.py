"""Fast rendering of the simulator's catalogs straight into binned images (the cluster finder's 1.6" pixels).

The cluster network reads images binned 8 x 8 (tasks/stages/cluster_planes.py), where most galaxies are barely
resolved. Drawing a 2048^2 field with GalSim and binning it costs ~40 s; drawing the same catalog straight
into the binned pixels costs ~1 s, so the network can be trained on thousands of clusters at a realistic
sky density on two cores.

How (written here because GalSim draws at full resolution and no library draws mixtures of Gaussians onto
a coarse grid):
- Every profile is a mixture of Gaussians (MoG). The Sersic profiles the simulator uses (n = 1, 3, 4) and
  its Moffat PSF are fitted once, at import, with non-negative amplitudes on fixed, log-spaced widths (the
  idea of Hogg & Lang 2013; the fits are this module's own, `sersic_mog`, `moffat_mog`). A galaxy is its
  bulge's and disk's mixtures, sheared as GalSim shears them (area-preserving, axis ratio q, major axis at
  90 deg + position angle from +x), convolved with the band's PSF by adding covariances.
- Pixel integration: each profile is evaluated at the centres of sub-pixels (`SUB` x `SUB` per binned
  pixel, 0.8" at bin 8), each Gaussian widened by a sub-pixel's box variance (s^2 / 12), and the
  sub-pixels are summed into the binned pixel.
- Stars are the PSF's mixture; lensed systems, ring galaxies and mergers are drawn as an exponential disk
  of their size and total magnitude (their detail is far below 1.6").
- Noise, per binned pixel: the variance of the mean of bin^2 pixels of sky noise at the field's depth
  (the simulator's own `noise_spec`, PSF and exposure map), plus the sources' Poisson noise.
- Artefacts, drawn from the field plan's own list at the binned scale (`binned_artefacts`): satellite
  trails (the line's flux per unit length kept, its width that of the trail convolved with a binned
  pixel), amplifier offsets, optical ghosts, cosmic rays and hot pixels (their pixels' sum over bin^2).
  Bad columns and pixels reduce the coverage as they do in the stage's binning.
- The smooth sky residual and the exposure map are the simulator's own (the same random streams, evaluated
  on the binned grid); the noise is a new realisation from the caller's generator.
- Not drawn: saturation and bleed trails (their pixels are masked in the real data, slightly lowering the
  binned mean of a bright star's block), the PSF's 3 % ellipticity.

`render_binned(plan, bin)` renders a simulator field plan (tasks/sim/field.plan_field) to the same
`block_sums` the stage computes from a store, so `planes_from_sums` turns either into the network's input.
The comparison against GalSim-rendered fields is `compare_with_store` (model card of cluster_net).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

SUB = 2  # sub-pixels per binned pixel and axis
STAMP_SIZES = (5, 9, 17, 33, 65, 129, 257)  # stamp widths, sub-pixels
CHUNK_ELEMENTS = 4_000_000  # sources x components x stamp pixels evaluated at a time


def _fit_mog(radius: np.ndarray, profile: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Non-negative amplitudes a_k of unit-flux 2-d Gaussians of widths `sigmas` whose sum matches the
    circular `profile` (surface brightness of unit total flux at `radius`), weighted by the area 2 pi r dr."""
    from scipy.optimize import nnls
    g = np.exp(-radius[:, None] ** 2 / (2 * sigmas[None] ** 2)) / (2 * np.pi * sigmas[None] ** 2)
    w = np.sqrt(radius * np.gradient(radius))
    amp, _ = nnls(g * w[:, None], profile * w)
    return amp / amp.sum()


@lru_cache(maxsize=None)
def sersic_mog(n: float) -> tuple[np.ndarray, np.ndarray]:
    """(amplitudes, sigmas) of a unit-flux Sersic profile of index n and half-light radius 1 (untruncated,
    as the simulator's), fitted out to 10 half-light radii."""
    from scipy.special import gamma, gammaincinv
    b = gammaincinv(2 * n, 0.5)
    r = np.geomspace(1e-3, 10.0, 600)
    norm = 2 * np.pi * n * np.exp(b) * gamma(2 * n) / b ** (2 * n)  # total flux of exp(-b (r^(1/n) - 1))
    prof = np.exp(-b * (r ** (1 / n) - 1)) / norm
    k = 10 if n > 2 else 6
    sigmas = np.geomspace(0.005 if n > 2 else 0.05, 4.0 if n > 2 else 2.0, k)
    amp = _fit_mog(r, prof, sigmas)
    keep = amp > 1e-5
    return amp[keep] / amp[keep].sum(), sigmas[keep]


@lru_cache(maxsize=None)
def moffat_mog(beta: float) -> tuple[np.ndarray, np.ndarray]:
    """(amplitudes, sigmas) of a unit-flux Moffat profile of `beta` and FWHM 1, fitted out to 8 FWHM."""
    alpha = 1.0 / (2 * np.sqrt(2 ** (1 / beta) - 1))
    r = np.geomspace(1e-3, 8.0, 500)
    prof = (beta - 1) / (np.pi * alpha**2) * (1 + (r / alpha) ** 2) ** (-beta)
    sigmas = np.geomspace(0.2, 3.0, 6)
    amp = _fit_mog(r, prof, sigmas)
    keep = amp > 1e-5
    return amp[keep] / amp[keep].sum(), sigmas[keep]


def _shape_cov(sig: np.ndarray, q: np.ndarray, pa: np.ndarray) -> np.ndarray:
    """(N, K, 2, 2) covariances of Gaussians of widths sig (N, K) sheared to axis ratio q (N,) with the major
    axis at 90 deg + pa (deg east of north) from +x, area preserved (GalSim's shear(q, beta))."""
    t = np.radians(90.0 + pa)
    c, s = np.cos(t), np.sin(t)
    a2, b2 = 1.0 / q, q  # squared axis scales
    xx = c * c * a2 + s * s * b2
    yy = s * s * a2 + c * c * b2
    xy = c * s * (a2 - b2)
    m = np.stack([np.stack([xx, xy], -1), np.stack([xy, yy], -1)], -2)  # (N, 2, 2)
    return sig[..., None, None] ** 2 * m[:, None]


def source_components(sources: list, band: str, zeropoint: float) -> tuple[np.ndarray, ...]:
    """Every source's mixture before the PSF, in arcsec: (flux (N,), amplitudes (N, K), covariances
    (N, K, 2, 2), is_point (N,)). Components beyond a source's own count have amplitude 0."""
    from ..sim.sources import Galaxy, Star
    n = len(sources)
    flux = np.array([10.0 ** (-0.4 * (s.mag[band] - zeropoint)) for s in sources])
    point = np.array([isinstance(s, Star) for s in sources], bool)
    gal = np.array([isinstance(s, Galaxy) for s in sources], bool)
    other = ~point & ~gal  # lenses, rings, mergers: an exponential disk of their size, round
    get = (lambda attr, default: np.array([float(getattr(s, attr)) if g else default for s, g in zip(sources, gal)]))
    fb = np.array([float(np.clip(s.bulge_frac[band], 0.0, 1.0)) if g else 0.0 for s, g in zip(sources, gal)])
    hd = np.where(other, [max(float(getattr(s, "size", 0.1)), 0.1) for s in sources], get("hlr_disk", 0.1))
    hb, qd, qb = get("hlr_bulge", 0.1), np.where(gal, get("q_disk", 1.0), 1.0), get("q_bulge", 1.0)
    pa, nb = get("pa", 0.0), get("n_bulge", 4.0)
    ad, sd = sersic_mog(1.0)
    kb = max(len(sersic_mog(4.0)[0]), len(sersic_mog(3.0)[0]))
    amp = np.zeros((n, len(ad) + kb))
    cov = np.zeros((n, len(ad) + kb, 2, 2))
    disk = ~point
    amp[disk, :len(ad)] = (1 - fb[disk])[:, None] * ad[None]
    cov[disk, :len(ad)] = _shape_cov(sd[None] * hd[disk, None], qd[disk], pa[disk])
    for index in np.unique(nb[gal & (fb > 0)]):
        sel = gal & (fb > 0) & (nb == index)
        ab, sb = sersic_mog(float(index))
        amp[sel, len(ad):len(ad) + len(ab)] = fb[sel, None] * ab[None]
        cov[sel, len(ad):len(ad) + len(ab)] = _shape_cov(sb[None] * hb[sel, None], qb[sel], pa[sel])
    return flux, amp, cov, point


def _stamp_width(flux: np.ndarray, cov: np.ndarray, amp: np.ndarray, sub_arcsec: float, floor: np.ndarray
                 ) -> np.ndarray:
    """Stamp width (sub-pixels, from STAMP_SIZES) per source: out to where each of its components falls below
    `floor` (per source, flux per sub-pixel); a component whose peak is below the floor is not reached for."""
    var = np.where(amp > 0, np.maximum(cov[..., 0, 0], cov[..., 1, 1]), 0.0)  # (N, K) arcsec^2
    peak = flux[:, None] * amp * sub_arcsec**2 / (2 * np.pi * np.maximum(var, 1e-12))
    ratio = np.maximum(peak / np.maximum(floor[:, None], 1e-30), 1.0)
    reach = np.sqrt(2 * var * np.log(ratio)) * (amp > 0)
    half = reach.max(axis=1) / sub_arcsec
    sizes = np.array(STAMP_SIZES)
    idx = np.searchsorted(sizes, 2 * half + 1)
    return sizes[np.minimum(idx, len(sizes) - 1)]


def render_sub(x: np.ndarray, y: np.ndarray, flux: np.ndarray, amp: np.ndarray, cov: np.ndarray,
               shape: tuple[int, int], sub_arcsec: float, floor: float) -> np.ndarray:
    """Sum of the sources' mixtures (amplitudes per unit flux, covariances in arcsec^2, already convolved
    with the PSF) on a sub-pixel grid of `shape`, sub-pixel centres at integers; x, y: source centres in
    sub-pixel coordinates. Returns flux per sub-pixel."""
    ny, nx = shape
    out = np.zeros((ny, nx))
    cov = cov + np.eye(2) * sub_arcsec**2 / 12.0  # the sub-pixel's box
    cov = cov / sub_arcsec**2  # sub-pixel units
    det = cov[..., 0, 0] * cov[..., 1, 1] - cov[..., 0, 1] ** 2
    inv = np.stack([cov[..., 1, 1], -cov[..., 0, 1], cov[..., 0, 0]], -1) / det[..., None]  # a, b, c
    norm = amp / (2 * np.pi * np.sqrt(det))  # per unit flux and sub-pixel area 1
    width = _stamp_width(flux, cov * sub_arcsec**2, amp, sub_arcsec, np.full(len(flux), floor))
    for w in np.unique(width):
        sel = np.nonzero(width == w)[0]
        h = w // 2
        per = max(1, CHUNK_ELEMENTS // (amp.shape[1] * w * w))
        off = np.arange(-h, h + 1)
        for c0 in range(0, len(sel), per):
            s = sel[c0:c0 + per]
            ix, iy = np.rint(x[s]).astype(int), np.rint(y[s]).astype(int)
            dx = (ix[:, None] + off[None]) - x[s, None]  # (n, w)
            dy = (iy[:, None] + off[None]) - y[s, None]
            dx, dy = dx.astype(np.float32), dy.astype(np.float32)
            a, b, c = (inv[s, :, k].astype(np.float32) for k in range(3))  # (n, K)
            q = (a[:, :, None, None] * (-0.5 * dx * dx)[:, None, None, :]
                 + b[:, :, None, None] * (-dx[:, None, None, :] * dy[:, None, :, None])
                 + c[:, :, None, None] * (-0.5 * dy * dy)[:, None, :, None])
            st = np.einsum("nk,nkyx->nyx", (norm[s] * flux[s, None]).astype(np.float32), np.exp(q, out=q))
            xs = ix[:, None] + off[None]
            ys = iy[:, None] + off[None]
            okx, oky = (xs >= 0) & (xs < nx), (ys >= 0) & (ys < ny)
            for j in range(len(s)):
                if okx[j].any() and oky[j].any():
                    out[np.ix_(ys[j][oky[j]], xs[j][okx[j]])] += st[j][np.ix_(oky[j], okx[j])]
    return out


def render_band_binned(sources: list, xy: np.ndarray, band: str, zeropoint: float, psf_fwhm: float,
                       psf_beta: float, pixel_scale: float, bin: int, shape: tuple[int, int],
                       floor: float) -> np.ndarray:
    """Noiseless image binned `bin` x `bin`, (H, W) = shape, of `sources` at full-resolution pixel positions
    `xy` (N, 2), as the mean over each block of the full-resolution pixels' values (ADU per pixel).
    floor: a flux per full-resolution pixel below which a source's wings are not drawn."""
    h, w = shape
    if not len(sources):
        return np.zeros(shape)
    flux, amp, cov, point = source_components(sources, band, zeropoint)
    pa, ps = moffat_mog(psf_beta)
    psf_cov = (ps * psf_fwhm)[:, None, None] ** 2 * np.eye(2)  # (P, 2, 2)
    k = amp.shape[1]
    # convolution: every source component with every PSF component; a point source is the PSF itself
    amp = np.concatenate([amp, point[:, None].astype(float)], axis=1)  # a point: a delta of amplitude 1
    cov = np.concatenate([cov, np.zeros((len(flux), 1, 2, 2))], axis=1)
    amp = (amp[:, :, None] * pa[None, None, :]).reshape(len(flux), (k + 1) * len(pa))
    cov = (cov[:, :, None] + psf_cov[None, None]).reshape(len(flux), (k + 1) * len(pa), 2, 2)
    keep = amp.max(axis=0) > 0
    amp, cov = amp[:, keep], cov[:, keep]
    step = bin / SUB  # full-resolution pixels per sub-pixel
    sub_arcsec = step * pixel_scale
    u = (xy[:, 0] + 0.5) / step - 0.5
    v = (xy[:, 1] + 0.5) / step - 0.5
    img = render_sub(u, v, flux, amp, cov, (h * SUB, w * SUB), sub_arcsec, floor * step**2)
    return img.reshape(h, SUB, w, SUB).sum(axis=(1, 3)) / bin**2


def binned_noise(model: np.ndarray, sigma: float, gain: float, expmap: np.ndarray, bin: int,
                 rng: np.random.Generator) -> np.ndarray:
    """A noise realisation of the mean of bin^2 pixels: sky noise sigma / sqrt(expmap) per pixel plus the
    sources' Poisson noise (model / (gain expmap) per pixel)."""
    var = (sigma**2 + np.clip(model, 0, None) / gain) / expmap / bin**2
    return rng.normal(0.0, 1.0, model.shape) * np.sqrt(var)


def coverage_defects(shape: tuple[int, int], bin: int, n_columns: int, pixel_fraction: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Usable pixels per bin x bin block (H, W) after the simulator's bad columns (one pixel of a block's
    row each, whole or partial columns) and isolated bad pixels."""
    h, w = shape
    n = np.full(shape, float(bin * bin))
    for _ in range(n_columns):
        xb, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        kind = rng.integers(0, 3)
        rows = slice(None) if kind == 0 else (slice(y0, None) if kind == 1 else slice(0, y0 + 1))
        n[rows, xb] -= bin
    n -= rng.poisson(pixel_fraction * bin * bin, shape)
    return np.clip(n, 0, None)


def binned_artefacts(model: np.ndarray, band: str, artefacts: list[dict], bin: int) -> None:
    """Paint, in place, a field's artefacts of `band` (tasks/sim/artefacts.py entries, full-resolution pixel
    coordinates) onto its binned mean image `model` (H, W) (module docstring)."""
    from ..sim.artefacts import _cosmic_ray_pixels, _paint
    h, w = model.shape

    def to_b(v):  # full-resolution pixel coordinate -> binned pixel coordinate
        return (v + 0.5) / bin - 0.5

    for a in artefacts:
        if a.get("band") not in (band, "all"):
            continue
        t = a["type"]
        if t == "satellite_trail":
            sig = np.hypot(a["sigma_pix"] / bin, np.sqrt(1 / 12))
            sb = a["surface_brightness"] * (a["sigma_pix"] / bin) / sig  # same flux per unit length
            e = dict(a, x0=to_b(a["x0"]), y0=to_b(a["y0"]), x1=to_b(a["x1"]), y1=to_b(a["y1"]), sigma_pix=sig,
                     surface_brightness=sb)
            _paint(model, e, band)
        elif t == "amp_offset":
            x0, x1 = a["x_start"] / bin, a["x_stop"] / bin
            cols = np.arange(w)
            frac = np.clip(np.minimum(cols + 1, x1) - np.maximum(cols, x0), 0, 1)  # of each binned column
            rows = (np.arange(h) + 0.5) * bin - 0.5 - (h * bin - 1) / 2.0
            model += (a["offset"] + a.get("gradient", 0.0) * rows)[:, None] * frac[None, :]
        elif t == "ghost":
            e = dict(a, x=to_b(a["x"]), y=to_b(a["y"]), radius_pix=a["radius_pix"] / bin,
                     width_pix=a["width_pix"] / bin, edge_pix=np.hypot(a["edge_pix"] / bin, np.sqrt(1 / 12)))
            _paint(model, e, band)
        elif t in ("cosmic_ray", "hot_pixels"):
            if t == "cosmic_ray":
                ys, xs, vals = _cosmic_ray_pixels(a, (h * bin, w * bin))
            else:
                p = np.asarray(a["pixels"], int).reshape(-1, 2)
                xs, ys, vals = p[:, 0], p[:, 1], np.full(len(p), a["amplitude"])
            ok = (ys < h * bin) & (xs < w * bin)
            np.add.at(model, (ys[ok] // bin, xs[ok] // bin), vals[ok] / bin**2)


def noiseless_binned(plan, bin: int, bands: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A simulator field plan's (tasks/sim/field.plan_field) sources and artefacts drawn into bin x bin blocks,
    noiseless, (band, H, W) mean ADU per full-resolution pixel, H = W = size // bin, and the simulator's own
    exposure map of the field on that grid (H, W)."""
    from ..sim.field import STREAM_EXPMAP
    from ..sim.noise import exposure_map
    cfg, lay = plan.cfg, plan.layout
    h = w = cfg.size // bin
    sources = [p.source for p in plan.placed]
    xy = np.array([[p.x, p.y] for p in plan.placed]).reshape(-1, 2)
    model = np.stack([render_band_binned(sources, xy, band, cfg.zeropoint, plan.psf[band].fwhm, cfg.psf_beta,
                                         cfg.pixel_scale, bin, (h, w), floor=0.02 * plan.noise[band].sigma)
                      for band in bands])
    for b, band in enumerate(bands):
        binned_artefacts(model[b], band, plan.artefacts, bin)
    exp_rng = np.random.default_rng([cfg.seed, STREAM_EXPMAP, lay.index])  # the simulator's exposure map
    return model, exposure_map((h, w), exp_rng, cfg.depth_variation)


def render_binned(plan, bin: int, rng: np.random.Generator, bands: list[str] | None = None) -> np.ndarray:
    """`block_sums` (3, band, H, W) of a simulator field plan (tasks/sim/field.plan_field) rendered straight
    into bin x bin blocks (module docstring), H = W = size // bin: `noiseless_binned`, the simulator's smooth
    sky residual, noise from `rng` and the bad columns and pixels."""
    from ..sim.field import STREAM_NOISE, band_key
    from ..sim.noise import smooth_field
    cfg, lay = plan.cfg, plan.layout
    bands = list(bands or cfg.bands)
    models, expmap = noiseless_binned(plan, bin, bands)
    h, w = expmap.shape
    out = np.zeros((3, len(bands), h, w))
    for b, band in enumerate(bands):
        spec = plan.noise[band]
        # the simulator's own smooth sky residual: the first draws of its noise stream (its artefacts carry
        # their own seeds), the same low-order modes on the coarser grid
        residual_rng = np.random.default_rng([cfg.seed, STREAM_NOISE, lay.index, band_key(band)])
        model = models[b] + cfg.background_residual * spec.sigma * smooth_field((h, w), residual_rng)
        mean = model + binned_noise(model, spec.sigma, spec.gain, expmap, bin, rng)
        n = coverage_defects((h, w), bin, cfg.artefacts.bad_columns, cfg.artefacts.bad_pixel_fraction, rng)
        out[0, b] = mean * n
        out[1, b] = n
        out[2, b] = n * expmap / spec.sigma**2
    return out
