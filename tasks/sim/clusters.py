"""Galaxy clusters: a brightest cluster galaxy (BCG) and red-sequence members on a projected NFW
profile, with colours set by the cluster redshift.

Assumptions (README, "Simulator assumptions"):
- richness lambda = number of red members brighter than 0.2 L* inside R_lambda, with
  R_lambda = 1.0 h^-1 Mpc (lambda/100)^0.2 (redMaPPer, Rykoff et al. 2014);
- red-sequence luminosity function: Schechter, alpha = -1.0, M*_i = -21.8 - 1.2 z (passive
  evolution, tasks.astro.m_star), members drawn down to the survey's faint limit;
- positions: 3-d NFW (concentration 4, truncated at R_lambda) projected on the sky;
- sizes: R_e = 4 kpc (L/L*)^0.56 (early types, Shen et al. 2003), BCG twice that;
- colours: the E template at the cluster redshift, 0.04 mag scatter.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..astro import arcsec_per_mpc, band_mags, m_star, r_lambda_mpc
from .sources import Galaxy

NFW_C = 4.0
ALPHA = -1.0


def sample_schechter(rng: np.random.Generator, n: int, x_min: float, x_max: float = 20.0) -> np.ndarray:
    """n luminosities L/L* from x^alpha exp(-x) on [x_min, x_max], alpha = -1 (rejection from a
    log-uniform proposal, which is exactly x^-1)."""
    out = np.empty(0)
    while out.size < n:
        x = np.exp(rng.uniform(np.log(x_min), np.log(x_max), size=2 * (n - out.size) + 16))
        out = np.concatenate([out, x[rng.uniform(size=x.size) < np.exp(-x)]])
    return out[:n]


def schechter_count_ratio(x_min: float, x_cut: float = 0.2) -> float:
    """N(x_min < L/L*) / N(L/L* > x_cut) for alpha = -1 (ratio of exponential integrals)."""
    from scipy.special import exp1
    return float(exp1(x_min) / exp1(x_cut))


def sample_nfw_projected(rng: np.random.Generator, n: int, r_max: float, c: float = NFW_C
                         ) -> tuple[np.ndarray, np.ndarray]:
    """n projected offsets (same units as r_max) of points in a 3-d NFW sphere truncated at r_max."""
    x = np.linspace(0, c, 4001)
    m = np.log1p(x) - x / (1 + x)
    r = np.interp(rng.uniform(0, m[-1], n), m, x) / c * r_max
    cos_t = rng.uniform(-1, 1, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    rp = r * np.sqrt(1 - cos_t**2)
    return rp * np.cos(phi), rp * np.sin(phi)


@dataclass
class ClusterParams:
    cluster_id: int
    ra: float  # BCG position, deg
    dec: float
    z: float
    richness: float  # members brighter than 0.2 L* within R_lambda (counted from the draw)
    richness_target: float
    n_members: int  # all drawn members, to the faint limit
    r_lambda_mpc: float
    r_lambda_arcsec: float
    m_star: float  # reference-band mag of L*
    bcg_id: int

    def truth(self) -> dict:
        return asdict(self)


def sample_cluster(rng: np.random.Generator, cluster_id: int, ra: float, dec: float, z: float,
                   richness: float, first_id: int, bandpasses: dict[str, str], ref_band: str,
                   mag_faint: float) -> tuple[ClusterParams, list[Galaxy]]:
    """A cluster at (ra, dec, z) with the given richness: the BCG (first) then the members.

    Member ids run from first_id; every member has cluster_id set and redshift z.
    """
    ref_bp = bandpasses[ref_band]
    mstar = m_star(z, ref_bp)
    r_mpc = r_lambda_mpc(richness)
    scale = arcsec_per_mpc(z)
    r_arcsec = r_mpc * scale
    x_faint = 10 ** (-0.4 * (mag_faint - mstar))
    n_bright = int(rng.poisson(richness))
    n_total = n_bright
    if x_faint < 0.2:
        n_total += int(rng.poisson(richness * (schechter_count_ratio(x_faint) - 1.0)))
    lum = np.concatenate([sample_schechter(rng, n_bright, 0.2),
                          sample_schechter(rng, n_total - n_bright, x_faint, 0.2)])
    dx, dy = sample_nfw_projected(rng, lum.size, r_arcsec)
    cosd = np.cos(np.radians(dec))
    members = []
    bcg_lum = rng.uniform(2.5, 5.0)
    for k, (x, dx_k, dy_k) in enumerate([(bcg_lum, 0.0, 0.0)] + list(zip(lum, dx, dy))):
        is_bcg = k == 0
        if is_bcg:  # small offset of the BCG from the potential centre, ~10 kpc
            dx_k, dy_k = rng.normal(0, 0.01 * scale, 2)
        mag_ref = mstar - 2.5 * np.log10(x)
        mags = band_mags(mag_ref, "E", z, bandpasses, ref_bp)
        mags = {b: (m if b == ref_band else m + rng.normal(0, 0.04)) for b, m in mags.items()}
        re_kpc = 4.0 * x**0.56 * (2.0 if is_bcg else 1.0) * 10 ** rng.normal(0, 0.15)
        hlr = float(np.clip(re_kpc / 1000.0 * scale, 0.08, 12.0))
        bf = rng.uniform(0.75, 0.95) if is_bcg else rng.uniform(0.55, 0.95)
        members.append(Galaxy(
            id=first_id + k, ra=float(ra - dx_k / 3600.0 / cosd), dec=float(dec + dy_k / 3600.0),
            mag=mags, bulge_frac={b: float(bf) for b in bandpasses}, hlr_disk=hlr * 1.5,
            hlr_bulge=hlr, q_disk=float(rng.uniform(0.5, 1.0)), q_bulge=float(rng.uniform(0.6, 1.0)),
            pa=float(rng.uniform(0, 180)), z=float(z), sed="E", n_bulge=4.0,
            kind="bcg" if is_bcg else "galaxy", cluster_id=cluster_id))
    # richness as redMaPPer counts it: members brighter than 0.2 L* within R_lambda (BCG included)
    sep = np.array([np.hypot((g.ra - ra) * cosd, g.dec - dec) * 3600.0 for g in members])
    bright = np.array([g.mag[ref_band] < mstar + 1.75 for g in members])
    lam = int(np.sum(bright & (sep <= r_arcsec)))
    params = ClusterParams(cluster_id=cluster_id, ra=members[0].ra, dec=members[0].dec, z=float(z),
                           richness=float(lam), richness_target=float(richness),
                           n_members=len(members), r_lambda_mpc=r_mpc, r_lambda_arcsec=r_arcsec,
                           m_star=mstar, bcg_id=members[0].id)
    return params, members
