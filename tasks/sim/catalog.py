"""The sky of a simulated survey: every astrophysical source over the whole footprint, drawn once
so that fields which overlap on the sky see the same objects."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import anomalies, lensing
from .clusters import ClusterParams, sample_cluster
from .config import SimConfig
from .layout import field_centre_uv, sampling_box, survey_plane
from .population import add_close_pairs, sample_field_galaxies, sample_stars

# random-number streams: (seed, stream, ...) keeps each part reproducible on its own
STREAM_CATALOG = 1


@dataclass
class SurveyCatalog:
    sources: list = field(default_factory=list)  # every sky source (galaxies, stars, lenses, ...)
    clusters: list[ClusterParams] = field(default_factory=list)
    lenses: list = field(default_factory=list)  # lensing.LensSystem, also in sources
    sky_anomalies: list = field(default_factory=list)  # ring galaxies and mergers, also in sources

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([s.ra for s in self.sources]), np.array([s.dec for s in self.sources]))


def bandpasses_of(cfg: SimConfig) -> dict[str, str]:
    """Band name -> GalSim bandpass file, for the configured bands (reference band included)."""
    names = list(cfg.bands) + ([cfg.reference_band] if cfg.reference_band not in cfg.bands else [])
    return {b: cfg.band_specs[b].bandpass for b in names}


def build_survey_catalog(cfg: SimConfig) -> SurveyCatalog:
    """Draw all sky sources of the survey described by cfg (deterministic in cfg.seed)."""
    rng = np.random.default_rng([cfg.seed, STREAM_CATALOG])
    plane = survey_plane(cfg)
    u0, u1, v0, v1 = sampling_box(cfg)
    area = (u1 - u0) * (v1 - v0) / 3600.0
    bps = bandpasses_of(cfg)
    ref = cfg.reference_band
    p = cfg.population
    n_f = cfg.fields

    def positions(n: int) -> tuple[np.ndarray, np.ndarray]:
        """n uniform positions over the sampling box (fields plus a margin)."""
        sky = plane.pixel_to_world(rng.uniform(u0, u1, n), rng.uniform(v0, v1, n))
        return np.atleast_1d(sky.ra.deg), np.atleast_1d(sky.dec.deg)

    def inside(n: int) -> tuple[np.ndarray, np.ndarray]:
        """n positions inside a random field each (2 pixels from its edges), for the rare objects
        (clusters, lenses, ring galaxies, mergers) that tests and training sets count on."""
        k = rng.integers(0, n_f, n)
        uc, vc = field_centre_uv(cfg, k)
        half = cfg.field_width_arcsec / 2 - 2 * cfg.pixel_scale
        sky = plane.pixel_to_world(uc + rng.uniform(-half, half, n), vc + rng.uniform(-half, half, n))
        return np.atleast_1d(sky.ra.deg), np.atleast_1d(sky.dec.deg)

    cat = SurveyCatalog()
    next_id = 1
    galaxies = sample_field_galaxies(rng, cfg, area, positions, next_id, bps)
    next_id += len(galaxies)
    stars = sample_stars(rng, cfg, area, positions, next_id)
    next_id += len(stars)
    pairs = add_close_pairs(rng, cfg, galaxies, p.close_pairs_per_field * n_f, next_id, 1, bps)
    next_id += len(pairs)
    cat.sources += galaxies + pairs + stars

    mean_clusters = p.clusters_per_field * n_f
    n_clusters = int(mean_clusters) + int(rng.uniform() < mean_clusters - int(mean_clusters))
    for cid in range(1, n_clusters + 1):
        ra, dec = inside(1)
        z = rng.uniform(*p.cluster_z)
        lam = float(np.exp(rng.uniform(np.log(p.cluster_richness[0]), np.log(p.cluster_richness[1]))))
        params, members = sample_cluster(rng, cid, float(ra[0]), float(dec[0]), float(z), lam, next_id,
                                         bps, ref, p.galaxy_mag_faint)
        next_id += len(members)
        cat.clusters.append(params)
        cat.sources += members

    for lid in range(1, p.lenses_per_field * n_f + 1):
        ra, dec = inside(1)
        params = lensing.sample_lens(rng, lid, float(ra[0]), float(dec[0]), p.theta_e, bps, ref)
        system = lensing.LensSystem(id=next_id, params=params, pixel_scale=cfg.pixel_scale)
        next_id += 1
        cat.lenses.append(system)
        cat.sources.append(system)

    for k in range(p.ring_galaxies_per_field * n_f + p.mergers_per_field * n_f):
        ra, dec = inside(1)
        sampler = anomalies.sample_ring_galaxy if k < p.ring_galaxies_per_field * n_f else anomalies.sample_merger
        obj = sampler(rng, next_id, float(ra[0]), float(dec[0]), bps, ref)
        next_id += 1
        cat.sky_anomalies.append(obj)
        cat.sources.append(obj)
    return cat
