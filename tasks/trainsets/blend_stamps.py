"""Blends of 2-4 simulated galaxies with the image of every member alone, for training and evaluating the
learned deblender (`deepfield train deblend`, `deepfield eval deblend`).

Each blend is a `size` x `size` stamp in every band (Gaussian sky noise of the configured depth, HSC-Wide
depths and seeing by default) holding `members` galaxies drawn with the field simulator's population model
(tasks.sim.population.make_galaxy: bulge + disk, red or blue types, colours from templates, size-magnitude
relation):
- the first member lies within half a pixel of the stamp centre; the others within `max_offset` arcsec of
  it, uniform in area but at least `min_offset` away (closer pairs are one object at this seeing);
- reference-band magnitudes follow galaxy number counts, dN/dm ~ 10^(0.3 m), between `mag_range`, so flux
  ratios are as in a survey: most companions are fainter;
- each member's noiseless PSF-convolved image is kept (`truth`, float32), with its total flux per band.

Reproducible: blend k depends only on (seed, k // CHUNK) and the configuration.
"""
from __future__ import annotations

from typing import Callable

import galsim
import numpy as np
import pandas as pd
from pydantic import Field

from ..sim.config import SimConfig
from ..sim.population import make_galaxy, sample_redshift, red_fraction
from ..sim.sources import mag_to_flux
from .chunks import map_chunks
from .stamp_survey import StampSurvey

CHUNK = 64


class BlendConfig(StampSurvey):
    """What a set of blends looks like (see the module docstring)."""

    members: tuple[int, int] = Field((2, 4), description="fewest and most galaxies per blend")
    mag_range: tuple[float, float] = Field((19.0, 25.0), description="reference-band magnitude range of members")
    min_offset: float = Field(0.5, ge=0, description="least distance of a companion from the first member, arcsec")
    max_offset: float = Field(3.0, gt=0, description="largest distance of a companion from the first member, arcsec")
    psf_size: int = Field(25, ge=5, description="side of the PSF images returned, pixels (odd)")


def _mag(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A magnitude from dN/dm ~ 10^(0.3 m) on [lo, hi] (inverse transform)."""
    a = 0.3 * np.log(10.0)
    u = rng.uniform()
    return float(np.log(np.exp(a * lo) + u * (np.exp(a * hi) - np.exp(a * lo))) / a)


def _one_blend(cfg: BlendConfig, sim: SimConfig, rng: np.random.Generator, bp: dict[str, str]) -> tuple:
    n, s = cfg.size, cfg.pixel_scale
    fwhm = cfg.draw_fwhm(rng)
    psf = {b: galsim.Moffat(beta=cfg.psf_beta, fwhm=fwhm[b]) for b in cfg.bands}
    k = int(rng.integers(cfg.members[0], cfg.members[1] + 1))
    first = rng.uniform(-0.5, 0.5, 2) * s
    pos = [first]
    for _ in range(k - 1):
        r = np.sqrt(rng.uniform(cfg.min_offset ** 2, cfg.max_offset ** 2))
        a = rng.uniform(0, 2 * np.pi)
        pos.append(first + r * np.array([np.cos(a), np.sin(a)]))
    truth = np.zeros((k, len(cfg.bands), n, n), np.float32)
    rows = []
    for m in range(k):
        mag = _mag(rng, *cfg.mag_range)
        z = float(sample_redshift(rng, np.array([mag]))[0])
        red = bool(rng.uniform() < red_fraction(np.array([mag]))[0])
        g = make_galaxy(rng, m, 0.0, 0.0, mag, z, red, sim, bp)
        x, y = float(pos[m][0]), float(pos[m][1])
        for j, b in enumerate(cfg.bands):
            img = galsim.Convolve(g.profile(b, cfg.zeropoint), psf[b]).drawImage(
                nx=n, ny=n, scale=s, offset=(x / s, y / s))
            truth[m, j] = img.array
        # pixel coordinates (row y, column x) of the centre: GalSim's true centre of an even stamp is
        # between pixels n/2 - 1 and n/2 (0-based)
        row = dict(member=m, x=(n - 1) / 2.0 + x / s, y=(n - 1) / 2.0 + y / s, red=red, z=z,
                   hlr=max(g.hlr_disk, g.hlr_bulge) if not red else g.hlr_bulge)
        for b in cfg.bands:
            row[f"mag_{b}"] = g.mag[b]
            row[f"flux_{b}"] = mag_to_flux(g.mag[b], cfg.zeropoint)
        rows.append(row)
    sigma = np.array([cfg.noise_sigma(b, fwhm[b]) for b in cfg.bands], np.float32)
    image = truth.sum(axis=0) + (rng.normal(size=(len(cfg.bands), n, n)) * sigma[:, None, None]).astype(np.float32)
    q = cfg.psf_size
    psf_img = np.stack([psf[b].drawImage(nx=q, ny=q, scale=s).array for b in cfg.bands]).astype(np.float32)
    psf_img /= psf_img.sum(axis=(1, 2), keepdims=True)
    return image.astype(np.float32), sigma, psf_img, truth, rows, [fwhm[b] for b in cfg.bands]


def _chunk(args) -> list[tuple]:
    seed, index, count, cfg_json = args
    cfg = BlendConfig.model_validate_json(cfg_json)
    sim = SimConfig(bands=cfg.bands, reference_band=cfg.reference_band)
    bp = cfg.bandpasses()
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 7]))
    return [_one_blend(cfg, sim, rng, bp) for _ in range(count)]


def simulate_blends(n: int, seed: int, cfg: BlendConfig | None = None, workers: int = 1,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """`n` blends. Returns dict(images float32 (n, B, S, S), sigma float32 (n, B), psf float32 (n, B, q, q),
    fwhm (n, B) arcsec, truth: list of float32 (members, B, S, S) noiseless images of each member alone,
    members DataFrame: blend, member, x, y (pixel centre in the stamp), red, z, hlr, mag_<b>, flux_<b>)."""
    if n < 1:
        raise ValueError(f"need n >= 1 blends, got {n}")
    cfg = cfg or BlendConfig()
    cfg.check_bands()
    jobs = [(seed, k, min(CHUNK, n - k * CHUNK), cfg.model_dump_json()) for k in range((n + CHUNK - 1) // CHUNK)]
    out = [r for part in map_chunks(_chunk, jobs, workers, progress, n) for r in part]
    rows = [dict(r, blend=i) for i, o in enumerate(out) for r in o[4]]
    return dict(images=np.stack([o[0] for o in out]), sigma=np.stack([o[1] for o in out]),
                psf=np.stack([o[2] for o in out]), truth=[o[3] for o in out],
                fwhm=np.array([o[5] for o in out], np.float32), members=pd.DataFrame(rows))


def examples(d: dict, rng: np.random.Generator, jitter: float = 0.5) -> dict:
    """Network inputs, target fractions, pixel weights, noiseless blend totals and in-stamp member fluxes for
    every member of every blend in `d` (simulate_blends output)."""
    from deepfield.models.deblend_unet import member_inputs  # torch: only where examples are made
    xs, fs, ws, tots, fl, fls = [], [], [], [], [], []
    mem = d["members"]
    for b, truth in enumerate(d["truth"]):
        rows = mem[mem.blend == b].sort_values("member")
        centres = rows[["y", "x"]].to_numpy(float) + rng.uniform(-jitter, jitter, (len(rows), 2))
        sigma = d["sigma"][b]
        total = truth.sum(axis=0)
        xs.extend(member_inputs(d["images"][b], sigma, centres))
        for m in range(len(rows)):
            fs.append(truth[m] / (total + 0.1 * sigma[:, None, None]))
            ws.append(np.clip(total / sigma[:, None, None], 0, 20) + 0.01)
            tots.append(total)
            fl.append(truth[m].sum(axis=(1, 2)))
            fls.append(20.0 * sigma)
    return dict(x=np.stack(xs), f=np.stack(fs).astype(np.float32), w=np.stack(ws).astype(np.float32),
                total=np.stack(tots).astype(np.float32), flux=np.stack(fl).astype(np.float32),
                floor=np.stack(fls).astype(np.float32))


def training_examples(n_train: int, n_val: int, seed: int, cfg: BlendConfig | None = None, workers: int = 2,
                      say: Callable[[str], None] = lambda msg: None) -> tuple[dict, dict, float]:
    """The deblender's training and validation examples (`examples` of blends made with seeds seed*1000 + 1
    and + 2; the centre jitter draws from one generator seeded with `seed`, training set first) and the
    seconds it took to make them."""
    import time
    cfg = cfg or BlendConfig()
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    say(f"simulating {n_train} training and {n_val} validation blends ...")
    tr = examples(simulate_blends(n_train, seed * 1000 + 1, cfg, workers), rng)
    va = examples(simulate_blends(n_val, seed * 1000 + 2, cfg, workers), rng)
    return tr, va, time.perf_counter() - t0
