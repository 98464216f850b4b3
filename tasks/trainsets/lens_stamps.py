"""Multi-band stamps of strong lenses, of mergers and of their look-alikes, for training and evaluating the
lens finder (`deepfield train lens`, `deepfield eval lens`) and the merger finder (`deepfield train merger`,
`deepfield eval merger`).

Every stamp is `size` x `size` pixels in each band, centred (to within half a pixel) on a galaxy that
the lens (or merger) stage would take for a candidate, with Gaussian sky noise of the configured depth.
Kinds (label 1 for the configuration's `positive` kind, "lens" by default and "merger" for the merger
finder's `merger_config()`, 0 for the rest):

- lens: an SIE + external shear deflector (the simulator's lens population, tasks.sim.lensing:
  Faber-Jackson red ellipticals, z_d 0.2-0.8) lensing a compact blue Sersic source; Einstein radius in
  `theta_e`, unlensed source magnitude in `src_mag` (reference band), source colours from the Im/Scd
  templates at z_s 1-3.
- lone_red: the same deflector population with no source (the hardest negative: everything but arcs).
- red_blue_companion: such a red galaxy with 1-3 compact blue galaxies 1-4" away (mimics multiple images).
- spiral: a red bulge in a disk with 2-3 blue logarithmic spiral arms (mimics arcs).
- ring: a ring galaxy (tasks.sim.anomalies.sample_ring_galaxy: blue knotted ring round a red nucleus).
- merger: two merging galaxies with tidal tails (tasks.sim.anomalies.sample_merger).
- pair: the same two galaxies drawn without their tails (the merger finder's hardest negative: a close
  pair seen in projection, or a merger whose tails are too faint to see).
- field: a field galaxy of either type (tasks.sim.population.make_galaxy), i 18-22.

Any stamp may also hold an unrelated field galaxy somewhere in it (`neighbour_rate`).

Rendering: analytic profiles are drawn by GalSim convolved with a Moffat PSF; the lensed source and
the spiral arms are pixel maps (lenstronomy ray tracing on a 6x sub-sampled grid, or a formula),
convolved with the same PSF by FFT. This is about 20x faster than drawing the traced source as a GalSim
InterpolatedImage, which the field simulator does, and agrees with it to within the sub-sampling.

The PSF FWHM of each stamp and band is the band's median (tasks.sim.config.DEFAULT_BANDS) times
`psf_scale` times a log-normal scatter; the noise sigma follows from the band's 5-sigma depth m5 +
`depth_offset` (tasks.sim.noise.noise_spec). A shifted configuration (other PSF and depth) is made by
changing `psf_scale` and `depth_offset`.

Reproducible: stamp k of a set depends only on (seed, k // CHUNK) and the configuration, whatever the
number of worker processes.
"""
from __future__ import annotations

import math
from typing import Callable

import galsim
import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from scipy.signal import fftconvolve

from .. import astro
from ..sim.anomalies import sample_merger, sample_ring_galaxy
from ..sim.config import SimConfig
from ..sim.lensing import LensParams, LensSystem, lenstronomy_models, sample_lens, unlensed_source_sum
from ..sim.population import make_galaxy
from ..sim.sources import mag_to_flux, pa_to_beta
from .chunks import map_chunks
from .stamp_survey import StampSurvey

CHUNK = 64  # stamps per random stream: the unit of reproducibility and of work per process
KINDS = ("lens", "lone_red", "red_blue_companion", "spiral", "ring", "merger", "pair", "field")
_OVERSAMPLE = 6


class StampConfig(StampSurvey):
    """What a set of lens-finder (or merger-finder) stamps looks like (see the module docstring)."""

    positive: str = Field("lens", description="the kind labelled 1: lens (the lens finder) or merger")

    theta_e: tuple[float, float] = Field((0.8, 3.0), description="Einstein radius range, arcsec")
    src_mag: tuple[float, float] = Field((22.0, 25.5), description="unlensed source magnitude range (reference band)")
    negatives: dict[str, float] = Field(
        default_factory=lambda: {"lone_red": 0.35, "red_blue_companion": 0.2, "spiral": 0.15, "ring": 0.1,
                                 "merger": 0.05, "field": 0.15},
        description="relative frequency of each non-lens kind")
    neighbour_rate: float = Field(0.3, ge=0, le=1, description="probability of an unrelated galaxy in a stamp")
    neighbours: int = Field(1, ge=0, le=10, description="unrelated galaxies tried per stamp, each present with "
                            "probability neighbour_rate")
    neighbour_min_r: float = Field(3.5, ge=0, description="unrelated galaxies lie at least this far from the "
                                   "centre, arcsec")
    field_mag: tuple[float, float] = Field((18.0, 22.0), description="reference-band magnitude range of the field "
                                           "galaxies (kind field)")
    nucleus_centred: float = Field(0.0, ge=0, le=1, description="probability that a merger or pair stamp is "
                                   "centred on one of its two nuclei (as when detection splits them) rather than on "
                                   "their flux-weighted barycentre")

    @model_validator(mode="after")
    def _kinds_known(self) -> "StampConfig":
        unknown = [k for k in [self.positive, *self.negatives] if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown stamp kind(s) {', '.join(map(repr, unknown))}; known: {', '.join(KINDS)}")
        if self.positive in self.negatives:
            raise ValueError(f"the positive kind {self.positive!r} is also among the negatives")
        if not self.negatives or min(self.negatives.values()) < 0 or sum(self.negatives.values()) <= 0:
            raise ValueError("negatives: give each non-positive kind a frequency >= 0, not all 0")
        return self

    def shifted(self) -> "StampConfig":
        """The evaluation's shifted configuration: 30% wider PSF and 0.7 mag shallower."""
        return self.model_copy(update={"psf_scale": self.psf_scale * 1.3, "depth_offset": self.depth_offset - 0.7})


def merger_config(**kw) -> StampConfig:
    """The merger finder's stamps: mergers are the positives; close pairs without tails (25 %), field
    galaxies of i 18-23 (35 %: the merger stage's candidates reach i 22.5), spirals, ring galaxies, red galaxies
    alone or with blue companions, and lenses the negatives; up to three unrelated neighbours per stamp, 2" or
    more from its centre (each with probability 0.4: a field's bright galaxy has about one within the stamp); half of the merger and pair
    stamps centred on a nucleus. A first training with the lens finder's negatives (field galaxies to i 22, one
    neighbour at most) scored 31 % of a simulated field's candidates above 0.5, mostly single galaxies of
    i 21.5-22.5 with a neighbour, fainter than any of its negatives."""
    negatives = {"pair": 0.25, "field": 0.35, "spiral": 0.1, "ring": 0.05, "lone_red": 0.1,
                 "red_blue_companion": 0.1, "lens": 0.05}
    return StampConfig(**dict(dict(positive="merger", negatives=negatives, nucleus_centred=0.5, neighbours=3,
                                   neighbour_rate=0.4, neighbour_min_r=2.0, field_mag=(18.0, 23.0)), **kw))


def arc_map(p: LensParams, n: int, scale: float, dx: float = 0.0, dy: float = 0.0) -> tuple[np.ndarray, float]:
    """Lensed source of unit unlensed flux on an n x n pixel grid of `scale` arcsec whose centre is at
    (-dx, -dy) arcsec from the deflector (so the deflector sits at (dx, dy) from the centre); each pixel
    is the mean of 6 x 6 ray-traced sub-samples. Returns (map, magnification inside the grid)."""
    lens, kw_lens, light, kw_src = lenstronomy_models(p)
    m = n * _OVERSAMPLE
    c = (np.arange(m) - (m - 1) / 2.0) * (scale / _OVERSAMPLE)
    x, y = np.meshgrid(c - dx, c - dy)
    bx, by = lens.ray_shooting(x.ravel(), y.ravel(), kw_lens)
    sb = light.surface_brightness(bx, by, kw_src).reshape(n, _OVERSAMPLE, n, _OVERSAMPLE).mean(axis=(1, 3))
    norm = unlensed_source_sum(p, scale)
    return sb / norm, float(sb.sum() / norm)


def spiral_arms_map(n: int, scale: float, hlr: float, q: float, pa: float, n_arms: int, pitch_deg: float,
                    phase: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Unit-flux map of logarithmic spiral arms on an exponential disk (n x n pixels of `scale` arcsec,
    galaxy centre at (dx, dy) arcsec from the grid centre): I = exp(-r/h) (1 + cos(m (phi - ln r / tan p)))^2,
    sampled 3x3 per pixel. A formula: GalSim has no spiral profile."""
    s = 3
    m = n * s
    c = (np.arange(m) - (m - 1) / 2.0) * (scale / s)
    x, y = np.meshgrid(c - dx, c - dy)
    t = math.radians(90.0 + pa)  # major axis angle from +x
    u = x * math.cos(t) + y * math.sin(t)
    v = (-x * math.sin(t) + y * math.cos(t)) / q
    r = np.hypot(u, v) + 1e-3
    phi = np.arctan2(v, u)
    h = hlr / 1.678
    arms = (1.0 + np.cos(n_arms * (phi - np.log(r / h) / math.tan(math.radians(pitch_deg))) + phase)) ** 2
    img = (np.exp(-r / h) * arms * (r > 0.3 * h)).reshape(n, s, n, s).mean(axis=(1, 3))
    return img / img.sum()


class _Renderer:
    """Draws the parts of one stamp in every band and adds them up (noiseless, image units)."""

    def __init__(self, cfg: StampConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        self.n = cfg.size
        self.fwhm = cfg.draw_fwhm(rng)
        self.psf = {b: galsim.Moffat(beta=cfg.psf_beta, fwhm=self.fwhm[b]) for b in cfg.bands}
        k = 2 * int(3 * max(self.fwhm.values()) / cfg.pixel_scale) + 1
        self.psf_img = {b: self.psf[b].drawImage(nx=k, ny=k, scale=cfg.pixel_scale, method="no_pixel").array
                        for b in cfg.bands}
        self.image = np.zeros((len(cfg.bands), self.n, self.n))

    def analytic(self, profile: Callable[[str], galsim.GSObject], x: float, y: float) -> None:
        """Add a GalSim profile (function of the band, centred at 0) at (x, y) arcsec from the centre."""
        s = self.cfg.pixel_scale
        for j, b in enumerate(self.cfg.bands):
            obj = galsim.Convolve(profile(b), self.psf[b])
            self.image[j] += obj.drawImage(nx=self.n, ny=self.n, scale=s, offset=(x / s, y / s)).array

    def pixel_map(self, unit_map: np.ndarray, flux: dict[str, float]) -> dict[str, np.ndarray]:
        """Add a unit-flux pixel map (before the PSF) with per-band flux; returns the PSF-convolved
        unit map of each band."""
        out = {}
        for j, b in enumerate(self.cfg.bands):
            out[b] = fftconvolve(unit_map, self.psf_img[b], mode="same")
            self.image[j] += out[b] * flux[b]
        return out

    def nopsf(self, profile: Callable[[str], galsim.GSObject], x: float, y: float) -> None:
        """Add a GalSim profile drawn without PSF and convolved by FFT (for interpolated-image profiles)."""
        s = self.cfg.pixel_scale
        for j, b in enumerate(self.cfg.bands):
            arr = profile(b).drawImage(nx=self.n, ny=self.n, scale=s, offset=(x / s, y / s), method="no_pixel").array
            self.image[j] += fftconvolve(arr, self.psf_img[b], mode="same")


def _deflector(rng, cfg, bp) -> LensParams:
    p = sample_lens(rng, 0, 0.0, 0.0, cfg.theta_e, bp, cfg.reference_band)
    src_ref = float(rng.uniform(*cfg.src_mag))
    p.src_mag = astro.band_mags(src_ref, p.src_sed, p.z_s, bp, bp[cfg.reference_band])
    return p


def _blue_galaxy(rng, cfg, bp, mag_range, hlr_range):
    sim = SimConfig(bands=cfg.bands, reference_band=cfg.reference_band)
    g = make_galaxy(rng, 0, 0.0, 0.0, float(rng.uniform(*mag_range)), float(rng.uniform(0.5, 2.0)), False, sim, bp)
    g.hlr_disk = float(rng.uniform(*hlr_range))
    g.hlr_bulge = 0.5 * g.hlr_disk
    return g


def _one_stamp(kind: str, cfg: StampConfig, rng: np.random.Generator, bp: dict[str, str]) -> tuple[np.ndarray, np.ndarray, dict]:
    r = _Renderer(cfg, rng)
    zp, s = cfg.zeropoint, cfg.pixel_scale
    dx, dy = (float(v) for v in rng.uniform(-0.5, 0.5, 2) * s)  # the candidate centre is the nearest pixel
    meta = dict(kind=kind, label=int(kind == cfg.positive), theta_e=np.nan, arc_snr=np.nan, src_mag=np.nan,
                magnification=np.nan, defl_mag=np.nan, mag=np.nan, separation=np.nan)
    if kind in ("lens", "lone_red", "red_blue_companion"):
        p = _deflector(rng, cfg, bp)
        system = LensSystem(id=0, params=p, pixel_scale=s)
        r.analytic(lambda b: system.deflector_profile(b, zp), dx, dy)
        meta["defl_mag"] = p.defl_mag[cfg.reference_band]
        if kind == "lens":
            amap, mu = arc_map(p, r.n, s, dx, dy)
            flux = {b: mag_to_flux(p.src_mag[b], zp) for b in cfg.bands}
            convolved = r.pixel_map(amap, flux)
            snr = max(float(np.sqrt(np.sum((convolved[b] * flux[b]) ** 2))) / cfg.noise_sigma(b, r.fwhm[b])
                      for b in cfg.bands)  # matched-filter S/N of the arcs alone, as the field truth's
            meta.update(theta_e=p.theta_e, arc_snr=snr, src_mag=p.src_mag[cfg.reference_band], magnification=mu)
        elif kind == "red_blue_companion":
            for _ in range(int(rng.integers(1, 4))):
                g = _blue_galaxy(rng, cfg, bp, (22.0, 25.0), (0.1, 0.4))
                rad, ang = rng.uniform(1.0, 4.0), rng.uniform(0, 2 * np.pi)
                r.analytic(lambda b, g=g: g.profile(b, zp), dx + rad * np.cos(ang), dy + rad * np.sin(ang))
    elif kind == "spiral":
        ref = float(rng.uniform(18.5, 21.5))
        z = float(rng.uniform(0.05, 0.4))
        hlr = float(rng.uniform(1.0, 2.5))
        q = float(rng.uniform(0.5, 1.0))
        pa = float(rng.uniform(0, 180))
        f_bulge = float(rng.uniform(0.2, 0.5))
        bulge = astro.band_mags(ref - 2.5 * np.log10(f_bulge), "E", z, bp, bp[cfg.reference_band])
        arms = astro.band_mags(ref - 2.5 * np.log10(1 - f_bulge), str(rng.choice(["Sbc", "Scd"])), z, bp,
                              bp[cfg.reference_band])
        bhlr = float(rng.uniform(0.2, 0.5))
        r.analytic(lambda b: galsim.DeVaucouleurs(half_light_radius=bhlr, flux=mag_to_flux(bulge[b], zp))
                   .shear(q=min(1.0, q + 0.2), beta=pa_to_beta(pa)), dx, dy)
        amap = spiral_arms_map(r.n, s, hlr, q, pa, int(rng.integers(2, 4)), float(rng.uniform(12, 30)),
                               float(rng.uniform(0, 2 * np.pi)), dx, dy)
        r.pixel_map(amap, {b: mag_to_flux(arms[b], zp) for b in cfg.bands})
    elif kind == "ring":
        g = sample_ring_galaxy(rng, 0, 0.0, 0.0, bp, cfg.reference_band)
        r.nopsf(lambda b: g.profile(b, zp), dx, dy)
    elif kind in ("merger", "pair"):
        g = sample_merger(rng, 0, 0.0, 0.0, bp, cfg.reference_band)
        if rng.uniform() < cfg.nucleus_centred:  # the stamp centred on one nucleus
            ox, oy = (g.dx1, g.dy1) if rng.uniform() < 0.5 else (g.dx2, g.dy2)
            dx, dy = dx - ox, dy - oy
        if kind == "merger":
            r.nopsf(lambda b: g.profile(b, zp), dx, dy)
            meta["mag"] = g.mag[cfg.reference_band]
        else:
            r.analytic(lambda b: galsim.Add([g.gal1.profile(b, zp).shift(g.dx1, g.dy1),
                                             g.gal2.profile(b, zp).shift(g.dx2, g.dy2)]), dx, dy)
            meta["mag"] = float(-2.5 * np.log10(10 ** (-0.4 * g.gal1.mag[cfg.reference_band])
                                                + 10 ** (-0.4 * g.gal2.mag[cfg.reference_band])))
        meta["separation"] = g.separation
    elif kind == "field":
        sim = SimConfig(bands=cfg.bands, reference_band=cfg.reference_band)
        red = bool(rng.uniform() < 0.5)
        g = make_galaxy(rng, 0, 0.0, 0.0, float(rng.uniform(*cfg.field_mag)), float(rng.uniform(0.1, 0.8)), red, sim,
                        bp)
        r.analytic(lambda b: g.profile(b, zp), dx, dy)
    else:
        raise ValueError(f"unknown stamp kind {kind!r}; known: {', '.join(KINDS)}")
    for _ in range(cfg.neighbours):
        if rng.uniform() >= cfg.neighbour_rate:
            continue
        sim = SimConfig(bands=cfg.bands, reference_band=cfg.reference_band)
        g = make_galaxy(rng, 0, 0.0, 0.0, float(rng.uniform(19.0, 24.5)), float(rng.uniform(0.1, 1.5)),
                        bool(rng.uniform() < 0.4), sim, bp)
        half = r.n * s / 2
        pos = rng.uniform(-half, half, 2)
        if np.hypot(*pos) > cfg.neighbour_min_r:  # the lens finder's: outside the region where arcs live
            r.analytic(lambda b: g.profile(b, zp), float(pos[0]), float(pos[1]))
    sigma = np.array([cfg.noise_sigma(b, r.fwhm[b]) for b in cfg.bands])
    noisy = r.image + rng.normal(size=r.image.shape) * sigma[:, None, None]
    return noisy.astype(np.float32), sigma.astype(np.float32), meta


def _kinds(n: int, positive_fraction: float, cfg: StampConfig, rng: np.random.Generator) -> list[str]:
    names = list(cfg.negatives)
    w = np.array([cfg.negatives[k] for k in names], float)
    out = []
    for _ in range(n):
        out.append(cfg.positive if rng.uniform() < positive_fraction else str(names[rng.choice(len(names), p=w / w.sum())]))
    return out


def _chunk(args) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    seed, index, count, positive_fraction, cfg_json = args
    cfg = StampConfig.model_validate_json(cfg_json)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    bp = cfg.bandpasses()
    imgs, sigs, metas = [], [], []
    for kind in _kinds(count, positive_fraction, cfg, rng):
        im, sg, meta = _one_stamp(kind, cfg, rng, bp)
        imgs.append(im)
        sigs.append(sg)
        metas.append(meta)
    return np.stack(imgs), np.stack(sigs), metas


def simulate_stamps(n: int, positive_fraction: float, seed: int, cfg: StampConfig | None = None,
                    workers: int = 1, progress: Callable[[int, int], None] | None = None) -> dict:
    """`n` stamps, each of the configuration's positive kind (a lens by default) with probability
    `positive_fraction`. Returns dict(images float32 (n, bands, size, size), sigma float32 (n, bands) sky noise
    per band, label int8 (n,), meta DataFrame with kind, theta_e, arc_snr (matched-filter S/N of the arcs alone
    in their best band), src_mag, magnification, defl_mag, and for mergers and pairs mag (reference-band total)
    and separation (of the nuclei, arcsec))."""
    if n < 1 or not 0 <= positive_fraction <= 1:
        raise ValueError(f"need n >= 1 and 0 <= positive_fraction <= 1, got {n}, {positive_fraction}")
    cfg = cfg or StampConfig()
    cfg.check_bands()
    jobs = [(seed, k, min(CHUNK, n - k * CHUNK), positive_fraction, cfg.model_dump_json())
            for k in range((n + CHUNK - 1) // CHUNK)]
    parts = map_chunks(_chunk, jobs, workers, progress, n, size=lambda p: len(p[2]))
    meta = pd.DataFrame([m for p in parts for m in p[2]])
    return dict(images=np.concatenate([p[0] for p in parts]), sigma=np.concatenate([p[1] for p in parts]),
                label=meta["label"].to_numpy(np.int8), meta=meta)


TRAIN_SEED_OFFSET, VAL_SEED_OFFSET = 1, 2  # stamps of `deepfield train lens|merger --seed S`: seeds S*1000 + these


def count_lines(what: str, say: Callable[[str], None], every: float = 10.0) -> Callable[[int, int], None]:
    """A `simulate_stamps` progress callback that says "what: done/total stamps" every `every` seconds and at
    the end."""
    import time
    last = [0.0]

    def cb(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] > every:
            last[0] = now
            say(f"  {what}: {done}/{total} stamps")
    return cb


def training_sets(n_train: int, n_val: int, seed: int, cfg: StampConfig | None = None, workers: int = 2,
                  say: Callable[[str], None] = lambda msg: None) -> tuple[dict, dict, float]:
    """The lens (or merger) finder's training and validation stamps (half of them the configuration's positive
    kind, seeds seed*1000 + 1 and + 2) and the seconds it took to make them."""
    import time
    cfg = cfg or StampConfig()
    t0 = time.perf_counter()
    kind = "lenses" if cfg.positive == "lens" else cfg.positive + "s"
    say(f"simulating {n_train} training and {n_val} validation stamps (half {kind}) ...")
    tr = simulate_stamps(n_train, 0.5, seed * 1000 + TRAIN_SEED_OFFSET, cfg, workers, count_lines("training", say))
    va = simulate_stamps(n_val, 0.5, seed * 1000 + VAL_SEED_OFFSET, cfg, workers, count_lines("validation", say))
    return tr, va, time.perf_counter() - t0
