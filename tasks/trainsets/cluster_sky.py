"""Training skies for the cluster finder at a realistic cluster density, composed on the fly from a library
rendered once at numpy speed (tasks/trainsets/binned_render.py).

The library (`build_library`, cached as one .npz under the work directory):
- **Backgrounds**: `n_backgrounds` simulator fields with every source but clusters (field galaxies, stars,
  close pairs, lenses, rings, mergers; `deepfield simulate`'s catalog at the default depth), drawn straight
  into 8 x 8 binned pixels, noiseless, with each field's PSF, noise level and exposure map.
- **Clusters**: `n_clusters` clusters from the simulator's own `sample_cluster` (BCG and red-sequence
  members on an NFW profile, to the survey's faint limit), target richness log-uniform in `RICHNESS` and z
  uniform in `Z_RANGE`, each drawn alone into a binned stamp (out to R_lambda, at most `MAX_RADIUS` binned
  pixels) with a PSF drawn as the simulator draws a field's, stored sparse (pixels above 0.2 % of the
  binned sky noise).

A training crop (`compose`): a random window of a random background (reaching up to `EDGE` binned pixels
beyond the field, where the coverage is 0 as at a survey's edge), plus
- the sky's own clusters and groups: a Poisson number with the density of `SKY_DENSITY` systems of richness
  >= 5 per square degree (about 1.4 per 6.8' field), richness distributed as dn/dlambda ~ lambda^-3
  (importance-weighted draws from the library), so that about one rich (lambda >= 30) cluster falls in
  every ~40 fields, as on the sky, with random lines of sight: projections happen at their real rate;
- with probability `POSITIVE_FRACTION`, one extra cluster of richness >= 15 at a random place (anywhere in
  the crop, so that clusters cut by the crop's edge are seen), so that the network sees rich clusters often
  enough to learn them; in `PROJECTED_FRACTION` of those, a second one within `PROJECTED_RADIUS` of it on the
  sky but at least `PROJECTED_DZ` away in redshift: chance alignments are too rare at the sky's density for
  the network to learn from them that two clusters on one line of sight are two clusters.
Then the noise of the background field (sky and the sources' Poisson noise, per binned pixel), a smooth sky
residual, the bad columns and pixels, and the stage's own scaling (`planes_from_sums`). The truth is every
placed cluster's BCG position (binned pixels of the crop), z and counted richness (redMaPPer's lambda as
the simulator counts it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..sim.config import SimConfig
from ..stages.cluster_planes import planes_from_sums
from .binned_render import binned_noise, coverage_defects, noiseless_binned, render_band_binned

RICHNESS = (5.0, 160.0)  # library: target richness, log-uniform
Z_RANGE = (0.05, 1.1)
MAX_RADIUS = 128  # binned pixels (205") of a cluster's stamp
SPARSE_FRACTION = 0.002  # of the binned sky noise: fainter stamp pixels are dropped
SKY_DENSITY = 110.0  # systems with richness >= 5 per square degree (lambda >= 20: ~7 deg^-2, lambda >= 30: ~3)
SKY_SLOPE = 3.0  # dn/dlambda ~ lambda^-SKY_SLOPE
POSITIVE_FRACTION = 0.6
POSITIVE_MIN = 15.0
PROJECTED_FRACTION = 0.15
PROJECTED_RADIUS = 20.0  # binned pixels (32")
PROJECTED_DZ = 0.2
EDGE = 16
VAL_SKIES, VAL_EMPTY, VAL_SIZE = 160, 40, 256  # validation skies with an extra cluster, without, their side
MATCH_MPC = 0.5  # a detection this close to a true cluster (physical, at its z) found it
LIBRARY_VERSION = 1  # of the stored library; the composition below may change freely


@dataclass
class SkyLibrary:
    bands: list[str]
    bin: int
    pixel_arcsec: float  # binned pixel
    backgrounds: np.ndarray  # (F, B, H, W) float32, noiseless mean ADU per full-resolution pixel
    expmap: np.ndarray  # (F, H, W) float32
    sigma: np.ndarray  # (F, B) sky noise per full-resolution pixel at exposure 1
    gain: np.ndarray  # (F, B)
    clusters: pd.DataFrame  # z, richness (counted), richness_target, r_lambda_arcsec, fx, fy, start, n
    pix_y: np.ndarray  # (P,) int16 stamp pixel offsets from the BCG's binned pixel
    pix_x: np.ndarray
    pix_v: np.ndarray  # (B, P) float32 values

    def subset(self, bands: list[str]) -> "SkyLibrary":
        """The library in `bands` only (a survey with fewer bands: the same skies and clusters, the other
        bands' pixels dropped); ValueError naming the bands it lacks."""
        missing = [b for b in bands if b not in self.bands]
        if missing:
            raise ValueError(f"the sky library has bands {', '.join(self.bands)}, not {', '.join(missing)}")
        idx = [self.bands.index(b) for b in bands]
        return SkyLibrary(bands=list(bands), bin=self.bin, pixel_arcsec=self.pixel_arcsec,
                          backgrounds=self.backgrounds[:, idx], expmap=self.expmap, sigma=self.sigma[:, idx],
                          gain=self.gain[:, idx], clusters=self.clusters, pix_y=self.pix_y, pix_x=self.pix_x,
                          pix_v=self.pix_v[idx])


def _cluster_stamp(rng, cfg: SimConfig, bands: list[str], bin: int, z: float, lam: float, cid: int):
    """One cluster drawn alone: (params, ys, xs, vals (B, n), fx, fy)."""
    from ..sim.catalog import bandpasses_of
    from ..sim.clusters import sample_cluster
    from ..sim.noise import noise_spec
    from ..sim.psf import noise_equivalent_area, sample_psf
    params, members = sample_cluster(rng, cid, 0.0, 0.0, z, lam, 1, bandpasses_of(cfg), cfg.reference_band,
                                     cfg.population.galaxy_mag_faint)
    scale = cfg.pixel_scale
    pix = bin * scale
    radius = int(min(np.ceil(params.r_lambda_arcsec / pix) + 4, MAX_RADIUS))
    size = 2 * radius + 1
    fx, fy = rng.uniform(-0.5, 0.5, 2)  # the BCG's place inside the stamp's centre binned pixel
    # full-resolution coordinates of the stamp: binned pixel j covers j*bin - 0.5 .. (j+1)*bin - 0.5
    cx, cy = (radius + fx) * bin + (bin - 1) / 2, (radius + fy) * bin + (bin - 1) / 2
    dx = np.array([-(m.ra - params.ra) * 3600.0 for m in members]) / scale  # east left
    dy = np.array([(m.dec - params.dec) * 3600.0 for m in members]) / scale
    xy = np.stack([cx + dx, cy + dy], axis=1)
    stamps, nominal = [], []
    for b in bands:
        spec = cfg.band_specs[b]
        psf = sample_psf(spec.psf_fwhm, cfg.psf_beta, cfg.seeing_scatter, 0.0, rng)
        sigma = noise_spec(spec.m5, spec.sky_mag, cfg.zeropoint, scale, noise_equivalent_area(psf, scale)).sigma
        nominal.append(sigma / bin)  # the binned sky noise
        stamps.append(render_band_binned(members, xy, b, cfg.zeropoint, psf.fwhm, cfg.psf_beta, scale, bin,
                                         (size, size), floor=0.02 * sigma))
    st = np.stack(stamps)
    keep = (np.abs(st) > SPARSE_FRACTION * np.array(nominal)[:, None, None]).any(axis=0)
    ys, xs = np.nonzero(keep)
    vals = st[:, ys, xs]
    return params, (ys - radius).astype(np.int16), (xs - radius).astype(np.int16), vals.astype(np.float32), fx, fy


def _background(bands: list[str], bin: int, plan) -> tuple[np.ndarray, ...]:
    """A background field of the library: (noiseless binned bands float32, exposure map, sky sigma and gain per
    band)."""
    img, expmap = noiseless_binned(plan, bin, bands)
    return (img.astype(np.float32), expmap, np.array([plan.noise[b].sigma for b in bands]),
            np.array([plan.noise[b].gain for b in bands]))


def _cluster_chunk(args) -> list[tuple]:
    """Clusters number c0 .. c1 - 1 of the library, each from its own random stream (the same library
    whatever the number of worker processes)."""
    cfg, bands, bin, seed, c0, c1 = args
    out = []
    for c in range(c0, c1):
        rng = np.random.default_rng([seed, 7_100_000, c])
        z = float(rng.uniform(*Z_RANGE))
        lam = float(np.exp(rng.uniform(*np.log(RICHNESS))))
        out.append(_cluster_stamp(rng, cfg, bands, bin, z, lam, c + 1))
    return out


def _background_job(args):
    return _background(*args)


def build_library(path: Path, seed: int = 0, n_backgrounds: int = 96, n_clusters: int = 3000,
                  bands: list[str] | None = None, bin: int = 8, field_size: int = 2048, workers: int = 2,
                  progress: Callable[[str], None] | None = None) -> SkyLibrary:
    """Render the library (module docstring) into `path` (.npz), or load it when one with the same
    parameters is there. workers: processes that render (the result does not depend on their number)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from ..sim.catalog import build_survey_catalog
    from ..sim.field import plan_field
    from ..sim.layout import survey_layout
    bands = list(bands or ["g", "r", "i", "z"])
    meta = dict(version=LIBRARY_VERSION, seed=seed, n_backgrounds=n_backgrounds, n_clusters=n_clusters,
                bands=bands, bin=bin, field_size=field_size)
    path = Path(path)
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            if str(f["meta"]) == repr(meta):
                return _from_npz(f, bands, bin)
    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    cfg = SimConfig(seed=7_000_000 + seed, size=field_size, fields=n_backgrounds, bands=bands,
                    population=dict(clusters_per_field=0.0))
    say(f"cluster sky library: catalog of {n_backgrounds} background fields (seed {cfg.seed}) ...")
    cat = build_survey_catalog(cfg)
    ra, dec = cat.positions()
    bgs, exps, sigs, gains = [], [], [], []
    chunk = 50
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=get_context("spawn")) as pool:
        jobs = ((bands, bin, plan_field(cfg, lay, cat.sources, ra, dec)) for lay in survey_layout(cfg))
        for k, (img, e, s, g) in enumerate(pool.map(_background_job, jobs)):
            bgs.append(img)
            exps.append(e.astype(np.float32))
            sigs.append(s)
            gains.append(g)
            if (k + 1) % 8 == 0 or k + 1 == n_backgrounds:
                say(f"background {k + 1}/{n_backgrounds} ({time.perf_counter() - t0:.0f} s)")
        del cat
        rows, ys, xs, vs, start = [], [], [], [], 0
        chunks = [(cfg, bands, bin, seed, c0, min(c0 + chunk, n_clusters)) for c0 in range(0, n_clusters, chunk)]
        for done in pool.map(_cluster_chunk, chunks):
            for p, y, x, v, fx, fy in done:
                rows.append(dict(z=p.z, richness=p.richness, richness_target=p.richness_target,
                                 r_lambda_arcsec=p.r_lambda_arcsec, n_members=p.n_members, fx=fx, fy=fy, start=start,
                                 n=len(y)))
                ys.append(y)
                xs.append(x)
                vs.append(v)
                start += len(y)
            say(f"cluster {len(rows)}/{n_clusters} ({time.perf_counter() - t0:.0f} s)")
    clusters = pd.DataFrame(rows)
    arrays = dict(meta=np.array(repr(meta)), backgrounds=np.stack(bgs), expmap=np.stack(exps),
                  sigma=np.stack(sigs), gain=np.stack(gains), pix_y=np.concatenate(ys), pix_x=np.concatenate(xs),
                  pix_v=np.concatenate(vs, axis=1),
                  **{f"c_{k}": clusters[k].to_numpy() for k in clusters.columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    say(f"cluster sky library written to {path} ({time.perf_counter() - t0:.0f} s)")
    with np.load(path, allow_pickle=False) as f:
        return _from_npz(f, bands, bin)


def _from_npz(f, bands: list[str], bin: int) -> SkyLibrary:
    cols = [k for k in f.files if k.startswith("c_")]
    clusters = pd.DataFrame({k[2:]: f[k] for k in cols})
    return SkyLibrary(bands=bands, bin=bin, pixel_arcsec=0.2 * bin, backgrounds=f["backgrounds"], expmap=f["expmap"],
                      sigma=f["sigma"], gain=f["gain"], clusters=clusters, pix_y=f["pix_y"], pix_x=f["pix_x"],
                      pix_v=f["pix_v"])


def sky_weights(richness_target: np.ndarray) -> np.ndarray:
    """Draw probabilities over the library (log-uniform in target richness) that give dn/dlambda ~
    lambda^-SKY_SLOPE: the importance weight lambda^(1 - SKY_SLOPE)."""
    w = richness_target ** (1.0 - SKY_SLOPE)
    return w / w.sum()


def split(lib: SkyLibrary, seed: int, val_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """Training and validation indices of the library's backgrounds and clusters (a seeded choice)."""
    rng = np.random.default_rng([seed, 7_200_000])
    out = {}
    for name, n in (("backgrounds", len(lib.backgrounds)), ("clusters", len(lib.clusters))):
        order = rng.permutation(n)
        k = max(1, int(round(val_fraction * n)))
        out[f"val_{name}"], out[f"train_{name}"] = np.sort(order[:k]), np.sort(order[k:])
    return out


def compose(lib: SkyLibrary, size: int, rng: np.random.Generator, backgrounds: np.ndarray, clusters: np.ndarray,
            positive: bool | None = None, edge: int = EDGE) -> tuple[np.ndarray, pd.DataFrame]:
    """One training crop: planes (B + 1, size, size) and its truth (x, y binned pixels, z, richness,
    library index), from the library's `backgrounds` and `clusters` (index arrays; module docstring).
    positive: force (True) or forbid (False) the extra cluster (default: with POSITIVE_FRACTION); edge:
    how far (binned pixels) the window may reach beyond the background field."""
    nb, h, w = lib.backgrounds.shape[1:]
    f = int(rng.choice(backgrounds))
    y0 = int(rng.integers(-edge, max(h - size + edge, -edge) + 1))
    x0 = int(rng.integers(-edge, max(w - size + edge, -edge) + 1))
    model = np.zeros((nb, size, size))
    expmap = np.ones((size, size))
    inside = np.zeros((size, size), bool)
    ys, ye, xs, xe = max(y0, 0), min(y0 + size, h), max(x0, 0), min(x0 + size, w)
    model[:, ys - y0:ye - y0, xs - x0:xe - x0] = lib.backgrounds[f, :, ys:ye, xs:xe]
    expmap[ys - y0:ye - y0, xs - x0:xe - x0] = lib.expmap[f, ys:ye, xs:xe]
    inside[ys - y0:ye - y0, xs - x0:xe - x0] = True
    # the sky's clusters and groups over the crop and a margin their members reach from
    margin = 60
    area = ((size + 2 * margin) * lib.pixel_arcsec / 3600.0) ** 2
    cat = lib.clusters
    n_sky = int(rng.poisson(SKY_DENSITY * area))
    pick = list(rng.choice(clusters, n_sky, p=sky_weights(cat.richness_target.to_numpy()[clusters]))) if n_sky else []
    pos = [rng.uniform(-margin, size + margin, 2) for _ in pick]
    if positive is None:
        positive = rng.uniform() < POSITIVE_FRACTION
    if positive:
        rich = clusters[cat.richness_target.to_numpy()[clusters] >= POSITIVE_MIN]
        pick.append(int(rng.choice(rich)))
        pos.append(rng.uniform(0, size, 2))
        if rng.uniform() < PROJECTED_FRACTION:
            far = rich[np.abs(cat.z.to_numpy()[rich] - cat.z.iat[pick[-1]]) >= PROJECTED_DZ]
            if len(far):
                pick.append(int(rng.choice(far)))
                pos.append(pos[-1] + rng.uniform(-PROJECTED_RADIUS, PROJECTED_RADIUS, 2))
    truth = []
    for k, (px, py) in zip(pick, pos):
        c = cat.iloc[k]
        ix, iy = int(np.floor(px)), int(np.floor(py))
        sl = slice(int(c.start), int(c.start + c.n))
        yy, xx = lib.pix_y[sl].astype(int) + iy, lib.pix_x[sl].astype(int) + ix
        ok = (yy >= 0) & (yy < size) & (xx >= 0) & (xx < size)
        for b in range(nb):
            np.add.at(model[b], (yy[ok], xx[ok]), lib.pix_v[b, sl][ok])
        truth.append(dict(x=ix + c.fx, y=iy + c.fy, z=c.z, richness=c.richness, library=int(k)))
    sums = np.zeros((3, nb, size, size))
    from ..sim.noise import smooth_field
    for b in range(nb):
        sig, gain = lib.sigma[f, b], lib.gain[f, b]
        m = model[b] + 0.15 * sig * smooth_field((size, size), rng, 3)
        mean = m + binned_noise(m, sig, gain, expmap, lib.bin, rng)
        n = coverage_defects((size, size), lib.bin, int(rng.poisson(3 * size / h)), 2e-4, rng) * inside
        sums[0, b], sums[1, b], sums[2, b] = mean * n, n, n * expmap / sig**2
    truth = pd.DataFrame(truth, columns=["x", "y", "z", "richness", "library"])
    return planes_from_sums(sums, lib.bin), truth


@dataclass
class SkySource:
    """What the cluster finder's training loop (models/train_cluster.py) draws from: training crops from the
    library's training part, and the validation skies from its held-out part (`split`)."""

    lib: SkyLibrary
    parts: dict[str, np.ndarray]

    @property
    def bands(self) -> list[str]:
        return list(self.lib.bands)

    @property
    def bin(self) -> int:
        return int(self.lib.bin)

    @property
    def binned_arcsec(self) -> float:
        return float(self.lib.pixel_arcsec)

    def sample(self, n: int, size: int, rng: np.random.Generator) -> list[tuple[np.ndarray, pd.DataFrame]]:
        """n training crops of size x size binned pixels (`compose`)."""
        return [compose(self.lib, size, rng, self.parts["train_backgrounds"], self.parts["train_clusters"])
                for _ in range(n)]

    def validation(self, seed: int) -> list[tuple[np.ndarray, pd.DataFrame]]:
        """The held-out skies, the same for a given seed: VAL_SKIES of VAL_SIZE^2 binned pixels (a 2048^2
        field) with one extra cluster each, then VAL_EMPTY at the sky's density alone, none reaching beyond
        its background; each truth with `match_radius`, 0.5 Mpc at the cluster's z in binned pixels."""
        from ..astro import arcsec_per_mpc
        rng = np.random.default_rng([seed, 7_300_000])
        out = [compose(self.lib, VAL_SIZE, rng, self.parts["val_backgrounds"], self.parts["val_clusters"],
                       positive=k < VAL_SKIES, edge=0) for k in range(VAL_SKIES + VAL_EMPTY)]
        for _, truth in out:  # what finds a true cluster: 0.5 Mpc at its redshift, in binned pixels
            truth["match_radius"] = [MATCH_MPC * arcsec_per_mpc(max(float(z), 0.05)) / self.lib.pixel_arcsec
                                     for z in truth.z]
        return out

    def describe(self) -> str:
        rich = int((self.lib.clusters.richness_target.to_numpy()[self.parts["train_clusters"]] >= POSITIVE_MIN).sum())
        return (f"{len(self.parts['train_backgrounds'])} backgrounds and {len(self.parts['train_clusters'])} library "
                f"clusters ({rich} of richness >= {POSITIVE_MIN:g})")

    def split_sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.parts.items()}


def sky_source(lib: SkyLibrary, seed: int) -> SkySource:
    """The training and validation skies of `lib` for a training seed."""
    return SkySource(lib, split(lib, seed))
