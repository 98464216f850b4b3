"""Survey scenes composed at numpy speed from the rendered library (tasks.trainsets.library): the training
and validation data of the learned detector (and of the deblender's composed blends).

A scene is a `size` x `size` multi-band image at one seeing level of the library:
- galaxies at the simulator's surface density (reference-band counts N(<m) = density_i25 10^(slope (m - 25))
  per arcmin^2 between `mag_range`) and stars from the star counts, uniform over the scene and a margin
  (sources just outside send light in); each galaxy is a library entry of that seeing level near the drawn
  magnitude (its flux scaled to it, at most `max_rescale` mag), rotated by a multiple of 90 degrees and
  possibly mirrored, placed at whole pixels so that its sub-pixel centre is the entry's own;
- optionally more close companions than the counts give (`pair_rate`: per galaxy brighter than 24.5, the
  chance of a companion 0-3 mag fainter at `pair_sep` arcsec), more large bright galaxies (`big_galaxy_rate`,
  centres inside the scene), more bright stars (`bright_star_rate`), and
  artefacts: cosmic rays and hot pixels in one band, satellite trails (tasks.sim.artefacts); masked bad columns
  and pixels (tasks.sim.noise.detector_defects);
- stars brighter than the saturation level saturate and bleed along columns as in the simulator
  (tasks.sim.noise.saturate), their pixels masked (SAT, BLEED) with zero inverse variance;
- noise: Gaussian with the variance of the sky at the band's depth for this seeing (times a per-band
  log-normal depth factor, `depth_scatter`) plus the sources' own Poisson variance.

Each source's optimal S/N alone, sqrt(sum_b sum_pix model^2 / sigma_b^2), says whether a detector can see
it. Everything is drawn from the generator passed in, so a scene is reproducible by seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from .. import maskbits
from ..sim.artefacts import add_cosmic_rays, add_hot_pixels, add_satellite_trail
from ..sim.noise import detector_defects, noise_spec, saturate
from ..sim.population import expected_count, sample_power_law_mags, stellar_colours
from ..sim.psf import PSFSpec, noise_equivalent_area
from ..sim.config import DEFAULT_BANDS
from ..stages._pixels import overlaps
from .library import Library

__all__ = ["ComposeConfig", "Scene", "compose_scene", "transform_offset", "rebin"]


class ComposeConfig(BaseModel):
    """What composed scenes hold (see the module docstring). Defaults: the simulator's populations, with no
    boosting (`pair_rate`, `bright_star_rate`, artefact rates 0 reproduce a plain simulated field)."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(96, ge=16, le=1024, description="scene side, pixels")
    margin: int = Field(24, ge=0, description="sources are placed this far outside the scene too, pixels")
    galaxy_density_i25: float = Field(45.0, ge=0, description="galaxies per arcmin^2 brighter than i = 25")
    count_slope: float = Field(0.31, gt=0, description="d log10 N / d m of the galaxy counts")
    mag_range: tuple[float, float] = Field((17.5, 27.0), description="reference-band magnitudes of galaxies")
    star_density_i24: float = Field(1.5, ge=0, description="stars per arcmin^2 brighter than i = 24")
    star_count_slope: float = Field(0.2, ge=0, description="d log10 N / d m of the star counts")
    star_mag_range: tuple[float, float] = Field((14.0, 27.0), description="reference-band magnitudes of stars")
    max_rescale: float = Field(0.5, ge=0, description="largest magnitude change applied to a library entry")
    pair_rate: float = Field(0.0, ge=0, le=1, description="chance of an extra close companion per galaxy i < 24.5")
    pair_sep: tuple[float, float] = Field((0.3, 2.5), description="separation of extra companions, arcsec")
    big_galaxy_rate: float = Field(0.0, ge=0, description="mean extra bright galaxies per scene, i uniform in 17-20.5")
    bright_star_rate: float = Field(0.0, ge=0, description="mean extra stars per scene, i uniform in 14-23")
    cosmic_rays: float = Field(0.0, ge=0, description="mean cosmic rays per scene and band")
    hot_pixels: float = Field(0.0, ge=0, description="mean hot-pixel clusters per scene and band")
    trail_rate: float = Field(0.0, ge=0, description="chance of a satellite trail (in one band) per scene")
    bad_columns: float = Field(0.0, ge=0, description="mean bad columns (whole or partial, masked) per scene and "
                               "band, as the simulator's detector defects")
    bad_pixel_fraction: float = Field(0.0, ge=0, le=0.1, description="fraction of isolated bad pixels (masked)")
    depth_scatter: float = Field(0.1, ge=0, description="log-normal scatter of each band's noise per scene")
    saturation_mag: float = Field(17.5, description="point-source magnitude whose peak reaches saturation")
    pixel_scales: Optional[tuple[float, float]] = Field(
        None, description="arcsec: a share (`pixel_scale_share`) of the scenes on pixels of a side drawn "
        "log-uniformly in this range, the library's sources composed on its grid and rebinned onto them before "
        "the noise (None: every scene on the library's pixels)")
    pixel_scale_share: float = Field(0.5, ge=0, le=1, description="with `pixel_scales`: the share of scenes on "
                                     "other pixels")


@dataclass
class Scene:
    """image, invvar: float32 (B, S, S); mask: uint16 (B, S, S); sigma: (B,) sky noise; level: seeing index;
    truth: one row per source with x, y (pixels, centres at integers), kind (galaxy, star), mag_<b>,
    flux_<b> (image units), hlr (arcsec), snr (optimal S/N alone), inside (centre within the scene)."""

    image: np.ndarray
    invvar: np.ndarray
    mask: np.ndarray
    sigma: np.ndarray
    level: int
    truth: pd.DataFrame


def transform_offset(dx: float, dy: float, k: int, flip: bool) -> tuple[float, float]:
    """The centre offset (dx, dy) from a stamp's centre pixel after np.rot90(stamp, k, axes=(-2, -1)) and then,
    if `flip`, a mirror of the x axis (stamp[..., ::-1])."""
    for _ in range(k % 4):  # rot90 moves (row r, col c) to (n-1-c, r): dy' = -dx, dx' = dy
        dx, dy = dy, -dx
    return (-dx if flip else dx), dy


def _add(canvas: np.ndarray, stamp: np.ndarray, ix: int, iy: int) -> None:
    """Add (B, s, s) `stamp` to (B, S, S) `canvas` with its centre pixel on (iy, ix), clipped at the edges."""
    s, n = stamp.shape[-1], canvas.shape[-1]
    h = s // 2
    y0, x0 = iy - h, ix - h
    cy0, cx0 = max(y0, 0), max(x0, 0)
    cy1, cx1 = min(y0 + s, n), min(x0 + s, n)
    if cy1 <= cy0 or cx1 <= cx0:
        return
    canvas[:, cy0:cy1, cx0:cx1] += stamp[:, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]


class _Entries:
    """A seeing level's galaxy entries sorted by magnitude."""

    def __init__(self, lib: Library, level: int):
        sizes, idx, mags = [], [], []
        for s, ix in lib.entries(level):
            sizes += [s] * len(ix)
            idx += list(ix)
            mags += list(lib.gal_info[s]["mag"][ix])
        order = np.argsort(mags)
        self.size = np.asarray(sizes)[order]
        self.idx = np.asarray(idx)[order]
        self.mag = np.asarray(mags, float)[order]

    def pick(self, rng: np.random.Generator, mag: float) -> int:
        """Index (into the sorted lists) of one of the 4 entries nearest in magnitude to `mag`."""
        j = int(np.searchsorted(self.mag, mag))
        lo, hi = max(j - 2, 0), min(j + 2, len(self.mag))
        return int(rng.integers(lo, max(hi, lo + 1)))


_ENTRY_CACHE: dict[tuple, object] = {}  # per library object: sorted entries, noise


def _entries(lib: Library, level: int) -> _Entries:
    key = (id(lib), level)
    if key not in _ENTRY_CACHE:
        _ENTRY_CACHE[key] = _Entries(lib, level)
    return _ENTRY_CACHE[key]


def _noise(lib: Library, level: int) -> list:
    """The sky noise (tasks.sim.noise.NoiseSpec) of every band at seeing `level`, at the library's depths."""
    key = (id(lib), level, "noise")
    if key not in _ENTRY_CACHE:
        lc = lib.cfg
        out = []
        for j, b in enumerate(lib.bands):
            spec = DEFAULT_BANDS[b]
            nea = noise_equivalent_area(PSFSpec(fwhm=float(lib.fwhm[level][j]), beta=lc.psf_beta), lc.pixel_scale)
            out.append(noise_spec(spec.m5 + lc.depth_offset, spec.sky_mag, lc.zeropoint, lc.pixel_scale, nea))
        _ENTRY_CACHE[key] = out
    return _ENTRY_CACHE[key]


def rebin(model: np.ndarray, ratio: float, n: int) -> np.ndarray:
    """A noiseless (B, N, N) image on n x n pixels `ratio` of its pixels on a side, the first pixel edges
    together: each output pixel the light of the area it covers (exact area-weighted rebinning with the stages'
    overlap weights, tasks.stages._pixels.overlaps; flux conserved where the output lies within the input)."""
    w = overlaps(0.0, ratio, n, 0, model.shape[-1]).astype(np.float32)
    return np.einsum("yi,bij,xj->byx", w, model, w, optimize=True).astype(np.float32)


def _scene_ratio(cfg: ComposeConfig, library_scale: float, rng: np.random.Generator) -> float:
    """The scene's pixel side in library pixels: 1 unless cfg.pixel_scales (then drawn from rng, which is not
    touched otherwise, so that scenes without it are those of before)."""
    if cfg.pixel_scales is None:
        return 1.0
    lo, hi = cfg.pixel_scales
    if rng.uniform() >= cfg.pixel_scale_share:
        return 1.0
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) / library_scale


def compose_scene(lib: Library, cfg: ComposeConfig, rng: np.random.Generator, level: int | None = None) -> Scene:
    """One scene (see the module docstring) at seeing `level` (random if None). With cfg.pixel_scales, a scene
    on other pixels (pixels `ratio` library pixels on a side) is composed on the library's grid over the same
    sky, rebinned onto its own pixels, and given the sky noise of pixels of that area (sigma x ratio) before
    the artefacts, saturation (the same stars saturate: the level x ratio^2) and masks; its truth in its
    pixels, its sources' S/N those of the library's grid (the same light and noise per unit area)."""
    lc = lib.cfg
    bands = lib.bands
    nb, n_out, m_out = len(bands), cfg.size, cfg.margin
    level = int(rng.integers(lib.levels)) if level is None else int(level)
    ratio = _scene_ratio(cfg, lc.pixel_scale, rng)
    n, m = (n_out, m_out) if ratio == 1.0 else (int(np.ceil(n_out * ratio)), int(np.ceil(m_out * ratio)))
    ent = _entries(lib, level)
    fwhm = lib.fwhm[level]
    area = ((n + 2 * m) * lc.pixel_scale / 60.0) ** 2

    # galaxies from the counts, and extra close companions
    ng = rng.poisson(expected_count(cfg.galaxy_density_i25, 25.0, cfg.count_slope, *cfg.mag_range, area))
    gmag = sample_power_law_mags(rng, ng, cfg.count_slope, *cfg.mag_range)
    gx, gy = rng.uniform(-m, n + m, ng), rng.uniform(-m, n + m, ng)
    big = rng.poisson(cfg.big_galaxy_rate)
    gmag, gx, gy = np.r_[gmag, rng.uniform(17.0, 20.5, big)], np.r_[gx, rng.uniform(0, n, big)], \
        np.r_[gy, rng.uniform(0, n, big)]
    hosts = np.flatnonzero((gmag < 24.5) & (rng.uniform(size=len(gmag)) < cfg.pair_rate))
    if len(hosts):
        r = rng.uniform(*cfg.pair_sep, len(hosts)) / lc.pixel_scale
        a = rng.uniform(0, 2 * np.pi, len(hosts))
        gmag = np.r_[gmag, gmag[hosts] + rng.uniform(0, 3, len(hosts))]
        gx, gy = np.r_[gx, gx[hosts] + r * np.cos(a)], np.r_[gy, gy[hosts] + r * np.sin(a)]
    model = np.zeros((nb, n, n), np.float32)
    rows = []
    sig = np.empty(nb)
    gain = np.empty(nb)
    for j, ns in enumerate(_noise(lib, level)):
        f = float(np.exp(rng.normal(0, cfg.depth_scatter)))
        sig[j], gain[j] = ns.sigma * f, ns.gain / f ** 2
    for k in range(len(gmag)):
        e = ent.pick(rng, float(gmag[k]))
        s, i = int(ent.size[e]), int(ent.idx[e])
        info = lib.gal_info[s][i]
        dm = float(np.clip(gmag[k] - info["mag"], -cfg.max_rescale, cfg.max_rescale))
        rot, flip = int(rng.integers(4)), bool(rng.integers(2))
        stamp = np.rot90(lib.gal[s][i].astype(np.float32), rot, axes=(1, 2))
        if flip:
            stamp = stamp[:, :, ::-1]
        stamp = stamp * np.float32(10 ** (-0.4 * dm))
        dx, dy = transform_offset(float(info["dx"]), float(info["dy"]), rot, flip)
        ix, iy = int(np.floor(gx[k] + 0.5)), int(np.floor(gy[k] + 0.5))
        _add(model, stamp, ix, iy)
        flux = stamp.sum(axis=(1, 2))
        rows.append(dict(x=ix + dx, y=iy + dy, kind="galaxy", hlr=float(info["hlr"]),
                         snr=float(np.sqrt(((stamp / sig[:, None, None].astype(np.float32)) ** 2).sum())),
                         **{f"flux_{b}": float(flux[j]) for j, b in enumerate(bands)}))

    # stars from the counts, and extra bright ones
    ns_ = rng.poisson(expected_count(cfg.star_density_i24, 24.0, cfg.star_count_slope, *cfg.star_mag_range, area))
    smag = sample_power_law_mags(rng, ns_, cfg.star_count_slope, *cfg.star_mag_range)
    extra = rng.poisson(cfg.bright_star_rate)
    smag = np.r_[smag, rng.uniform(14.0, 23.0, extra)]
    col = stellar_colours(rng, len(smag))
    for k in range(len(smag)):
        o = int(rng.integers(len(lib.star_dxy)))
        dx, dy = (float(v) for v in lib.star_dxy[o])
        ix, iy = int(rng.integers(-m, n + m)), int(rng.integers(-m, n + m))
        mags = np.array([smag[k] + col[b][k] - col[lc.reference_band][k] for b in bands])
        flux = 10 ** (-0.4 * (mags - lc.zeropoint))
        stamp = lib.star[level, o] * flux[:, None, None].astype(np.float32)
        _add(model, stamp, ix, iy)
        rows.append(dict(x=ix + dx, y=iy + dy, kind="star", hlr=0.0,
                         snr=float(np.sqrt(((stamp / sig[:, None, None].astype(np.float32)) ** 2).sum())),
                         **{f"flux_{b}": float(flux[j]) for j, b in enumerate(bands)}))

    if ratio != 1.0:  # onto the scene's own pixels: n_out of them, `ratio` library pixels on a side
        model = rebin(model, ratio, n_out)
        for r in rows:
            r["x"], r["y"] = (r["x"] + 0.5) / ratio - 0.5, (r["y"] + 0.5) / ratio - 0.5
        sig = sig * ratio
        n = n_out
    noise = rng.normal(size=model.shape).astype(np.float32)
    image = model + noise * np.sqrt(sig[:, None, None] ** 2 + np.clip(model, 0, None) / gain[:, None, None]
                                    ).astype(np.float32)
    invvar = np.broadcast_to((1.0 / sig ** 2)[:, None, None], model.shape).astype(np.float32).copy()
    mask = np.zeros(model.shape, np.uint16)
    for j in range(nb):
        if cfg.cosmic_rays:
            add_cosmic_rays(image[j], rng, int(rng.poisson(cfg.cosmic_rays)), float(sig[j]))
        if cfg.hot_pixels:
            add_hot_pixels(image[j], rng, int(rng.poisson(cfg.hot_pixels)), (30 * sig[j], 300 * sig[j]))
    if rng.uniform() < cfg.trail_rate:
        j = int(rng.integers(nb))
        t = rng.uniform(0, n, 4)
        trail = np.zeros((n, n), np.float32)
        add_satellite_trail(trail, t[0], -0.5, t[1], n - 0.5, float(fwhm[j] / (lc.pixel_scale * ratio) / 2.355),
                            float(np.exp(rng.uniform(np.log(2), np.log(50))) * sig[j]))
        image[j] += trail.T if rng.uniform() < 0.5 else trail  # as many horizontal trails as vertical ones
    if cfg.bad_columns or cfg.bad_pixel_fraction:
        for j in range(nb):  # dead or hot: the value does not matter, the pixels are masked
            bad = detector_defects((n, n), rng, int(rng.poisson(cfg.bad_columns)), cfg.bad_pixel_fraction)
            image[j][bad] = 0.0
            invvar[j][bad] = 0.0
            mask[j][bad] |= maskbits.BAD
    for j in range(nb):
        level_sat = 10 ** (-0.4 * (cfg.saturation_mag - lc.zeropoint)) * float(lib.star[level, 0, j].max()) * \
            ratio ** 2
        sat, bleed = saturate(model[j], level_sat)
        sat |= image[j] >= level_sat
        image[j][sat | bleed] = level_sat
        mask[j][sat | bleed] |= maskbits.SAT
        mask[j][bleed] |= maskbits.BLEED
        invvar[j][sat | bleed] = 0.0
        mask[j][invvar[j] <= 0] |= maskbits.ZERO_WEIGHT
    truth = pd.DataFrame(rows, columns=["x", "y", "kind", "hlr", "snr", *[f"flux_{b}" for b in bands]])
    for b in bands:
        truth[f"mag_{b}"] = lc.zeropoint - 2.5 * np.log10(np.maximum(truth[f"flux_{b}"].to_numpy(float), 1e-30))
    truth["inside"] = (truth.x >= -0.5) & (truth.x < n - 0.5) & (truth.y >= -0.5) & (truth.y < n - 0.5)
    return Scene(image=image, invvar=invvar, mask=mask, sigma=sig.astype(np.float32), level=level, truth=truth)
