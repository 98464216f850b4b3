"""Blends composed from the rendered library (tasks.trainsets.library) for the learned deblender
(`deepfield train deblend --composed`): every training step sees blends never seen before, where the GalSim blends
of tasks.trainsets.blend_stamps are a fixed set of a few thousand.

The blends have the form of `blend_stamps.simulate_blends` (so its `examples` makes the network inputs and
targets): 2-4 member galaxies, the stamp centred on their mean position as the deblend stage cuts it, and
unrelated faint field galaxies that no member owns (see BlendComposeConfig). Reproducible: batch `step` depends
only on (seed, step), the validation blends only on the seed.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from ..sim.population import expected_count, sample_power_law_mags
from .blend_stamps import examples
from .compose import ComposeConfig, _add, _entries, _noise, transform_offset
from .library import Library

__all__ = ["BlendComposeConfig", "compose_blends", "training_batch", "validation_set"]


class BlendComposeConfig(BaseModel):
    """Blends composed from the library for the deblender (`compose_blends`): `members` galaxies, the first from
    dN/dm ~ 10^(0.3 m) in `mag_range` (in a share `bright_share` of blends uniform in `bright_range` instead),
    companions from the counts, within `offset` arcsec of it; the stamp centred on the members' mean position
    or, in a share `member_centred`, on one member (the deblend stage's two kinds of stamp, to half a pixel);
    field galaxies fainter than `field_faint_from` at the simulator's counts over the stamp as unrelated light
    that no member owns; noise as in `compose_scene`."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(48, ge=16, description="stamp side, pixels (the deblender's)")
    members: tuple[int, int] = Field((2, 6), description="fewest and most galaxies per blend (the deblend stage "
                                     "shares a stamp among at most 6)")
    mag_range: tuple[float, float] = Field((19.0, 25.0), description="reference-band magnitudes of members")
    bright_share: float = Field(0.3, ge=0, le=1, description="share of blends whose first member is drawn "
                                "uniformly in bright_range (bright galaxies with fainter companions, rare in "
                                "the counts and where fractions went most wrong on whole fields)")
    bright_range: tuple[float, float] = Field((18.0, 23.0), description="reference-band magnitudes of those")
    offset: tuple[float, float] = Field((0.3, 3.0), description="distance of companions from the first member, "
                                        "arcsec, uniform in area")
    member_centred: float = Field(0.4, ge=0, le=1, description="share of stamps centred on one member, as the "
                                  "deblend stage cuts them for groups too large or spread out for one stamp; "
                                  "members whose centre then falls outside the stamp are unrelated light")
    field_faint_from: float = Field(24.5, description="unrelated field galaxies are those fainter than this (i)")
    scene: ComposeConfig = Field(default_factory=ComposeConfig, description="counts, rescaling and noise")


def _blend_mag(rng: np.random.Generator, lo: float, hi: float) -> float:
    a = 0.3 * np.log(10.0)
    return float(np.log(np.exp(a * lo) + rng.uniform() * (np.exp(a * hi) - np.exp(a * lo))) / a)


def compose_blends(lib: Library, cfg: BlendComposeConfig, n: int, rng: np.random.Generator) -> dict:
    """`n` composed blends in the form of tasks.trainsets.blend_stamps.simulate_blends (images, sigma, fwhm,
    truth: each member's noiseless image alone, members: blend, member, x, y, mag_<b>, flux_<b>), so that its
    `examples` makes the deblender's inputs and targets from them. psf is not given (None)."""
    lc, bands, s = lib.cfg, lib.bands, cfg.size
    images, sigmas, fwhms, truths, rows = [], [], [], [], []
    for k in range(n):
        level = int(rng.integers(lib.levels))
        ent = _entries(lib, level)
        m = int(rng.integers(cfg.members[0], cfg.members[1] + 1))
        bright = rng.uniform() < cfg.bright_share
        first = np.zeros(2)
        pos = [first]
        for _ in range(m - 1):
            r = np.sqrt(rng.uniform(cfg.offset[0] ** 2, cfg.offset[1] ** 2)) / lc.pixel_scale
            a = rng.uniform(0, 2 * np.pi)
            pos.append(first + r * np.array([np.cos(a), np.sin(a)]))
        pos = np.array(pos)
        anchor = pos[int(rng.integers(m))] if rng.uniform() < cfg.member_centred else np.mean(pos, axis=0)
        pos = pos - anchor + (s - 1) / 2 + rng.uniform(-0.5, 0.5, 2)
        alone = np.zeros((m, len(bands), s, s), np.float32)  # each galaxy's image
        kept = []
        for j in range(m):
            mag = _blend_mag(rng, *(cfg.bright_range if j == 0 and bright else cfg.mag_range))
            e = ent.pick(rng, mag)
            sz, i = int(ent.size[e]), int(ent.idx[e])
            info = lib.gal_info[sz][i]
            dm = float(np.clip(mag - info["mag"], -cfg.scene.max_rescale, cfg.scene.max_rescale))
            rot, flip = int(rng.integers(4)), bool(rng.integers(2))
            stamp = np.rot90(lib.gal[sz][i].astype(np.float32), rot, axes=(1, 2))
            stamp = (stamp[:, :, ::-1] if flip else stamp) * np.float32(10 ** (-0.4 * dm))
            dx, dy = transform_offset(float(info["dx"]), float(info["dy"]), rot, flip)
            ix, iy = int(np.floor(pos[j, 0] + 0.5)), int(np.floor(pos[j, 1] + 0.5))
            _add(alone[j], stamp, ix, iy)
            if not (0 <= ix < s and 0 <= iy < s):  # outside the stamp: not a member the stage would give
                continue
            kept.append(j)
            flux = stamp.sum(axis=(1, 2))
            rows.append(dict(blend=k, member=len(kept) - 1, x=ix + dx, y=iy + dy, hlr=float(info["hlr"]),
                             **{f"mag_{b}": float(lc.zeropoint - 2.5 * np.log10(max(flux[q], 1e-30)))
                                for q, b in enumerate(bands)},
                             **{f"flux_{b}": float(flux[q]) for q, b in enumerate(bands)}))
        truth = alone[kept]
        # unrelated faint field galaxies over the stamp and a margin
        area = ((s + 2 * cfg.scene.margin) * lc.pixel_scale / 60.0) ** 2
        lo = max(cfg.field_faint_from, cfg.scene.mag_range[0])
        nf = rng.poisson(expected_count(cfg.scene.galaxy_density_i25, 25.0, cfg.scene.count_slope, lo,
                                        cfg.scene.mag_range[1], area)) if lo < cfg.scene.mag_range[1] else 0
        model = alone.sum(axis=0)
        for fm in sample_power_law_mags(rng, nf, cfg.scene.count_slope, lo, cfg.scene.mag_range[1]):
            e = ent.pick(rng, float(fm))
            sz, i = int(ent.size[e]), int(ent.idx[e])
            dm = float(np.clip(fm - lib.gal_info[sz][i]["mag"], -cfg.scene.max_rescale, cfg.scene.max_rescale))
            stamp = np.rot90(lib.gal[sz][i].astype(np.float32), int(rng.integers(4)), axes=(1, 2))
            mg = cfg.scene.margin
            _add(model, stamp * np.float32(10 ** (-0.4 * dm)), int(rng.integers(-mg, s + mg)),
                 int(rng.integers(-mg, s + mg)))
        sig = np.empty(len(bands))
        gain = np.empty(len(bands))
        for j, ns in enumerate(_noise(lib, level)):
            f = float(np.exp(rng.normal(0, cfg.scene.depth_scatter)))
            sig[j], gain[j] = ns.sigma * f, ns.gain / f ** 2
        noise = rng.normal(size=model.shape).astype(np.float32)
        images.append(model + noise * np.sqrt(sig[:, None, None] ** 2 + np.clip(model, 0, None) / gain[:, None, None]
                                              ).astype(np.float32))
        sigmas.append(sig.astype(np.float32))
        fwhms.append(lib.fwhm[level])
        truths.append(truth)
    return dict(images=np.stack(images), sigma=np.stack(sigmas), fwhm=np.stack(fwhms).astype(np.float32),
                truth=truths, psf=None, members=pd.DataFrame(rows))



def training_batch(lib: Library, cfg: BlendComposeConfig, seed: int, step: int, blends: int) -> dict:
    """The deblender's examples (every member of `blends` fresh blends) for training step `step`."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, step, 31]))
    return examples(compose_blends(lib, cfg, blends, rng), rng)


def validation_set(lib: Library, cfg: BlendComposeConfig, seed: int, blends: int) -> dict:
    """The deblender's validation examples: every member of `blends` blends drawn from the seed alone."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 37]))
    return examples(compose_blends(lib, cfg, blends, rng), rng)
