"""A library of noiseless, PSF-convolved galaxy and star images, rendered once with GalSim and cached on disk,
from which training scenes are composed at numpy speed (tasks.trainsets.compose).

Rendering a galaxy with GalSim costs milliseconds per band; composing a training scene from stored images
costs microseconds per source. So the library is drawn once (`deepfield train library`, or by the first
training run that needs it) and every training example after that is a composition: shifted by whole
pixels, rotated by multiples of 90 degrees, mirrored, its flux scaled by a few tenths of a magnitude, and
placed among neighbours with fresh noise.

What it holds (`LibraryConfig`):
- `galaxies` galaxies drawn with the field simulator's population model (tasks.sim.population.make_galaxy:
  bulge + disk, red and blue types, colours from templates, the size-magnitude relation), magnitudes in the
  reference band from the simulator's number counts between `mag_range`, mixed with a share
  `bright_share` drawn uniformly between the bright end and 24 (bright, large galaxies are rare in the
  counts but are the ones a detector can shred);
  stored as float16 (a relative precision of 1e-3, far below the noise of any composed scene);
- a share `knot_share` of the blue galaxies with star-forming knots (galsim.RandomKnots: 20-100 point-like
  knots distributed like the disk, carrying `knot_fraction` of the disk's light, more in blue bands), so that
  clumpy spirals, which classical deblenders shred, are in the training data;
- `giants` more: large (`giant_hlr`), bright (`giant_mag`) disk galaxies, every one with knots, so that the
  clumpy spirals a detector must keep whole are not a handful among thousands;
- each galaxy drawn at one of the `seeing` levels (multiples of every band's median PSF FWHM, a round
  Moffat of the survey's beta), at a random sub-pixel offset from its stamp's centre pixel, on an odd
  square stamp whose side grows with its size (`stamp_sizes`);
- for every seeing level, point-source images (unit flux per band) on a grid of `star_offsets` x
  `star_offsets` sub-pixel offsets, on the largest stamp, from which stars of any magnitude are made.

The files: `library.npz` (arrays) and `library.json` (the configuration, counts and time), written
atomically in the directory; `load_library` checks that the configuration matches.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import galsim
import numpy as np
from pydantic import Field

from ..atomic import atomic_path
from ..sim.config import SimConfig
from ..sim.sources import pa_to_beta
from ..sim.population import make_galaxy, red_fraction, sample_power_law_mags, sample_redshift
from .chunks import map_chunks
from .stamp_survey import StampSurvey

__all__ = ["LibraryConfig", "Library", "build_library", "load_library"]

CHUNK = 200
LIBRARY_VERSION = 3


class LibraryConfig(StampSurvey):
    """What the library holds (see the module docstring); the survey's bands, depth and PSF from StampSurvey."""

    galaxies: int = Field(16000, ge=10, description="galaxies rendered")
    mag_range: tuple[float, float] = Field((17.5, 27.0), description="reference-band magnitudes of the galaxies")
    count_slope: float = Field(0.31, gt=0, description="d log10 N / d m of the galaxy counts")
    bright_share: float = Field(0.25, ge=0, le=1, description="share of galaxies drawn uniformly in "
                                "magnitude between the bright end and 24 instead of from the counts")
    knot_share: float = Field(0.6, ge=0, le=1, description="share of blue galaxies with star-forming knots")
    knot_fraction: tuple[float, float] = Field((0.1, 0.45), description="share of a knotty galaxy's disk light "
                                               "in knots (in g; 0.85, 0.7, 0.6 of it in r, i, z and redder)")
    giants: int = Field(800, ge=0, description="extra large bright knotty disk galaxies (clumpy spirals), rendered "
                        "on the largest stamps")
    giant_hlr: tuple[float, float] = Field((1.5, 4.5), description="half-light radii of the giants, arcsec")
    giant_mag: tuple[float, float] = Field((16.5, 19.5), description="reference-band magnitudes of the giants")
    seeing: tuple[float, ...] = Field((0.85, 1.0, 1.15, 1.3), description="PSF FWHM levels, multiples of "
                                      "each band's median seeing")
    stamp_sizes: tuple[int, ...] = Field((25, 49, 97, 193), description="odd stamp sides, pixels, smallest first")
    star_offsets: int = Field(4, ge=1, le=8, description="sub-pixel offsets per axis of the star images")
    seed: int = Field(0, description="random seed of the whole library")


class Library:
    """The rendered images, in memory: galaxies by stamp size, and stars.

    gal[s]: float16 (n_s, B, s, s) noiseless images at the entry's magnitude; gal_info[s]: structured array
    with mag (reference band), hlr (arcsec), dx, dy (centre's offset from the stamp's centre pixel, px),
    level (seeing index), red; star[level]: float32 (k*k, B, S, S) unit-flux point sources with their offsets
    star_dxy (k*k, 2) as (dx, dy); fwhm: (levels, B) arcsec."""

    def __init__(self, cfg: LibraryConfig, arrays: dict[str, np.ndarray]):
        self.cfg = cfg
        self.bands = list(cfg.bands)
        self.sizes = [int(s) for s in cfg.stamp_sizes if f"gal_{s}" in arrays]
        self.gal = {s: arrays[f"gal_{s}"] for s in self.sizes}
        self.gal_info = {s: arrays[f"info_{s}"] for s in self.sizes}
        self.star = arrays["star"]
        self.star_dxy = arrays["star_dxy"]
        self.fwhm = arrays["fwhm"]

    def entries(self, level: int) -> list[tuple[int, np.ndarray]]:
        """(size, indices) of the galaxies drawn at seeing `level`."""
        return [(s, np.flatnonzero(self.gal_info[s]["level"] == level)) for s in self.sizes]

    @property
    def levels(self) -> int:
        return len(self.cfg.seeing)


INFO_DTYPE = np.dtype([("mag", "f4"), ("hlr", "f4"), ("dx", "f4"), ("dy", "f4"), ("level", "i2"), ("red", "?"),
                       ("knots", "f4")])
KNOT_BAND_FACTOR = {"u": 1.1, "g": 1.0, "r": 0.85, "i": 0.7}  # other (redder) bands: 0.6


def _stamp_size(hlr: float, fwhm: float, cfg: LibraryConfig) -> int:
    """The smallest configured stamp whose half side holds 6 half-light radii plus 2 FWHM (the largest if none)."""
    need = 2 * (6.0 * hlr + 2.0 * fwhm) / cfg.pixel_scale
    for s in cfg.stamp_sizes:
        if s >= need:
            return int(s)
    return int(cfg.stamp_sizes[-1])


def _render_chunk(args) -> list[tuple]:
    """Galaxies index*CHUNK ... of the library: (size, image (B, s, s), info tuple) each."""
    index, count, cfg_json = args
    cfg = LibraryConfig.model_validate_json(cfg_json)
    sim = SimConfig(bands=cfg.bands, reference_band=cfg.reference_band)
    bp = cfg.bandpasses()
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index, 11]))
    med = {b: sim.band_specs[b].psf_fwhm * cfg.psf_scale for b in cfg.bands}
    lo, hi = cfg.mag_range
    out = []
    giant = index >= (cfg.galaxies + CHUNK - 1) // CHUNK  # the giants' chunks come after the others'
    for k in range(count):
        if giant:
            mag = float(rng.uniform(*cfg.giant_mag))
        elif rng.uniform() < cfg.bright_share:
            mag = float(rng.uniform(lo, min(24.0, hi)))
        else:
            mag = float(sample_power_law_mags(rng, 1, cfg.count_slope, lo, hi)[0])
        z = float(sample_redshift(rng, np.array([mag]))[0])
        red = False if giant else bool(rng.uniform() < red_fraction(np.array([mag]))[0])
        g = make_galaxy(rng, index * CHUNK + k, 0.0, 0.0, mag, z, red, sim, bp)
        if giant:
            g.hlr_disk = float(rng.uniform(*cfg.giant_hlr))
            g.hlr_bulge = g.hlr_disk * float(rng.uniform(0.1, 0.3))
        level = int((index * CHUNK + k) % len(cfg.seeing))
        fwhm = {b: med[b] * cfg.seeing[level] for b in cfg.bands}
        size = _stamp_size(g.size, max(fwhm.values()), cfg)
        dx, dy = rng.uniform(-0.5, 0.5, 2)
        knots = float(rng.uniform(*cfg.knot_fraction)) if giant or (not red and rng.uniform() < cfg.knot_share) \
            else 0.0
        nknots, kseed = int(rng.integers(20, 101)), int(rng.integers(1, 2 ** 31))
        img = np.empty((len(cfg.bands), size, size), np.float32)
        for j, b in enumerate(cfg.bands):
            prof = g.profile(b, cfg.zeropoint)
            if knots > 0:  # the same knots in every band (one seed), a band-dependent share of the disk light
                fk = knots * KNOT_BAND_FACTOR.get(b, 0.6) * (1.0 - float(np.clip(g.bulge_frac[b], 0, 1)))
                kn = galsim.RandomKnots(nknots, half_light_radius=g.hlr_disk, flux=prof.flux * fk,
                                        rng=galsim.BaseDeviate(kseed))
                prof = galsim.Add([prof * (1.0 - fk), kn.shear(q=g.q_disk, beta=pa_to_beta(g.pa))])
            conv = galsim.Convolve(prof, galsim.Moffat(beta=cfg.psf_beta, fwhm=fwhm[b]))
            img[j] = conv.drawImage(nx=size, ny=size, scale=cfg.pixel_scale, offset=(dx, dy)).array
        out.append((size, img, (mag, g.size, dx, dy, level, red, knots)))
    return out


def _stars(cfg: LibraryConfig, med: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Unit-flux point sources per seeing level and sub-pixel offset: (levels, k*k, B, S, S), offsets (k*k, 2)."""
    k, s = cfg.star_offsets, int(cfg.stamp_sizes[-1])
    grid = (np.arange(k) + 0.5) / k - 0.5
    dxy = np.array([(dx, dy) for dy in grid for dx in grid], np.float32)
    out = np.empty((len(cfg.seeing), len(dxy), len(cfg.bands), s, s), np.float32)
    for lv, f in enumerate(cfg.seeing):
        for j, b in enumerate(cfg.bands):
            psf = galsim.Moffat(beta=cfg.psf_beta, fwhm=med[b] * f)
            for m, (dx, dy) in enumerate(dxy):
                out[lv, m, j] = psf.drawImage(nx=s, ny=s, scale=cfg.pixel_scale, offset=(dx, dy)).array
    return out, dxy


def build_library(cfg: LibraryConfig, out: Path, workers: int = 2,
                  progress: Callable[[int, int], None] | None = None) -> Library:
    """Render the library described by `cfg` into directory `out` (library.npz + library.json) and return it."""
    cfg.check_bands()
    sizes = sorted(cfg.stamp_sizes)
    if list(cfg.stamp_sizes) != sizes or any(s % 2 == 0 for s in sizes):
        raise ValueError(f"stamp_sizes must be odd and increasing, got {cfg.stamp_sizes}")
    t0 = time.perf_counter()
    n = cfg.galaxies + cfg.giants
    first_giant = (cfg.galaxies + CHUNK - 1) // CHUNK  # giants start a chunk of their own
    jobs = [(k, min(CHUNK, cfg.galaxies - k * CHUNK), cfg.model_dump_json()) for k in range(first_giant)]
    jobs += [(first_giant + k, min(CHUNK, cfg.giants - k * CHUNK), cfg.model_dump_json())
             for k in range((cfg.giants + CHUNK - 1) // CHUNK)]
    rendered = [r for part in map_chunks(_render_chunk, jobs, workers, progress, n) for r in part]
    sim = SimConfig(bands=cfg.bands, reference_band=cfg.reference_band)
    med = {b: sim.band_specs[b].psf_fwhm * cfg.psf_scale for b in cfg.bands}
    arrays: dict[str, np.ndarray] = {}
    for s in sizes:
        part = [r for r in rendered if r[0] == s]
        if part:
            arrays[f"gal_{s}"] = np.stack([r[1] for r in part]).astype(np.float16)  # noise-free; 1e-3 precision
            arrays[f"info_{s}"] = np.array([r[2] for r in part], INFO_DTYPE)
    arrays["star"], arrays["star_dxy"] = _stars(cfg, med)
    arrays["fwhm"] = np.array([[med[b] * f for b in cfg.bands] for f in cfg.seeing], np.float32)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "library.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    meta = dict(version=LIBRARY_VERSION, config=cfg.model_dump(mode="json"), seconds=time.perf_counter() - t0,
                counts={str(s): int(len(arrays[f"info_{s}"])) for s in sizes if f"info_{s}" in arrays})
    with atomic_path(out / "library.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1))
    return Library(cfg, arrays)


def load_library(path: Path, cfg: LibraryConfig | None = None) -> Library:
    """The library in directory `path`; with `cfg`, an error if it was rendered with another configuration."""
    meta_path, npz = path / "library.json", path / "library.npz"
    if not meta_path.is_file() or not npz.is_file():
        raise FileNotFoundError(f"{path}: no galaxy library (library.json and library.npz); "
                                "build one with `deepfield train library`")
    meta = json.loads(meta_path.read_text())
    stored = LibraryConfig.model_validate(meta["config"])
    if meta.get("version") != LIBRARY_VERSION:
        raise ValueError(f"{meta_path}: library version {meta.get('version')}, this code reads {LIBRARY_VERSION}; "
                         "rebuild it")
    if cfg is not None and stored != cfg:
        raise ValueError(f"{meta_path}: rendered with another configuration than asked; rebuild it or point "
                         "to the matching library")
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    return Library(stored, arrays)


def library_or_build(path: Path, cfg: LibraryConfig, workers: int = 2,
                     say: Callable[[str], None] = lambda msg: None) -> Library:
    """The library at `path` if it matches `cfg`, else render it there (minutes on 2 cores)."""
    try:
        return load_library(path, cfg)
    except (FileNotFoundError, ValueError) as exc:
        say(f"{exc}; rendering {cfg.galaxies} galaxies into {path} ...")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 20 or done == total:
            last[0] = time.perf_counter()
            say(f"  library: {done}/{total} galaxies")
    return build_library(cfg, path, workers, progress)
