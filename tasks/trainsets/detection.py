"""Training and validation examples of the learned detector (models/detect_net.py), composed from the rendered library
(tasks.trainsets.compose), for `deepfield train detect`.

Every example is a composed scene with its targets: a centre at every source whose optimal S/N alone is at least
`snr_min` (and whose centre lies in the scene), no demand either way within 2 px of sources between `snr_ignore`
and `snr_min` (a detector may or may not see them), and nothing elsewhere. Training scenes boost what the detector
must learn to handle and a random field rarely shows: close companions, large bright (often clumpy) galaxies,
bright and saturated stars with bleed trails, cosmic rays, hot pixels and satellite trails (see DetectTrainConfig's
defaults). A band is dropped (its channel zeroed) with probability `band_dropout`, never all of them.

Reproducible: training batch `step` depends only on (seed, step); the validation scenes only on the seed.
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..maskbits import UNUSABLE
from .compose import ComposeConfig, Scene, compose_scene
from .library import Library

__all__ = ["DetectTrainConfig", "scene_example", "training_batch", "validation_set"]


def _train_compose() -> ComposeConfig:
    return ComposeConfig(pair_rate=0.3, big_galaxy_rate=0.3, bright_star_rate=0.15, cosmic_rays=0.4, hot_pixels=0.3,
                         trail_rate=0.05)


class DetectTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    compose: ComposeConfig = Field(default_factory=_train_compose, description="training scenes")
    snr_min: float = Field(6.0, gt=0, description="sources with optimal S/N at least this are centres to find")
    snr_ignore: float = Field(3.0, ge=0, description="sources between this and snr_min are neither demanded "
                              "nor forbidden")
    band_dropout: float = Field(0.1, ge=0, lt=1, description="chance of dropping each band of a training scene")
    heat_sigma: float = Field(1.0, gt=0, description="width of the heat-map Gaussians, pixels")
    offset_reach: int = Field(1, ge=0, le=2, description="offsets are taught at the pixels within this many "
                              "pixels (Chebyshev) of each centre pixel, the nearest centre's, so that a peak one "
                              "pixel off still points at the centre (0: the centre pixel only, CenterNet's)")


def scene_example(scene: Scene, cfg: DetectTrainConfig, rng: np.random.Generator | None = None) -> dict:
    """Network input, targets and truth of one scene; bands dropped at random when `rng` is given."""
    from deepfield.models.detect_net import detector_input, heat_targets
    image, invvar = scene.image, scene.invvar
    if rng is not None and cfg.band_dropout > 0:
        keep = rng.uniform(size=len(image)) >= cfg.band_dropout
        if not keep.any():
            keep[rng.integers(len(image))] = True
        image = np.where(keep[:, None, None], image, 0.0).astype(np.float32)
        invvar = np.where(keep[:, None, None], invvar, 0.0).astype(np.float32)
    x = detector_input(image, invvar, (scene.mask & UNUSABLE) != 0)
    t = scene.truth
    inside = t.inside.to_numpy()
    pos = t[inside & (t.snr >= cfg.snr_min)][["x", "y"]].to_numpy(float)
    ign = t[(t.snr >= cfg.snr_ignore) & ((t.snr < cfg.snr_min) | ~inside)][["x", "y"]].to_numpy(float)
    heat, weight, off, omask = heat_targets(image.shape[1:], pos, ign, cfg.heat_sigma, cfg.offset_reach)
    return dict(x=x, heat=heat, weight=weight, off=off, omask=omask, centres=pos, ignore=ign)


def training_batch(lib: Library, cfg: DetectTrainConfig, seed: int, step: int, n: int) -> dict:
    """Batch `step` of `n` training examples, stacked (x, heat, weight, off, omask)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, step, 23]))
    ex = [scene_example(compose_scene(lib, cfg.compose, rng), cfg, rng) for _ in range(n)]
    return {k: np.stack([e[k] for e in ex]) for k in ("x", "heat", "weight", "off", "omask")}


def validation_set(lib: Library, cfg: DetectTrainConfig, seed: int, n: int) -> dict:
    """`n` validation scenes composed like a plain simulated field (no boosting, all bands): inputs (n, C, S, S),
    and per scene the centres to find and the positions that may be found."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 29]))
    plain = ComposeConfig(size=cfg.compose.size, margin=cfg.compose.margin)
    ex = [scene_example(compose_scene(lib, plain, rng), cfg) for _ in range(n)]
    return dict(x=np.stack([e["x"] for e in ex]), centres=[e["centres"] for e in ex],
                ignore=[e["ignore"] for e in ex])
