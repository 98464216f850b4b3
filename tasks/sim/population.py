"""Field populations: galaxies with realistic counts, redshifts, colours, sizes and shapes; stars
on the stellar locus; deliberately placed close pairs.

Assumptions (documented in the README, "Simulator assumptions"):
- i-band counts N(<m) = n25 * 10**(slope * (m - 25)) per arcmin^2, slope 0.31 (deep HSC/Subaru
  counts); n25 = 45 arcmin^-2.
- redshift given magnitude: p(z|m) ~ z^2 exp(-z/z0), z0 = 0.0417 m - 0.744 (LSST Science Book
  eq. 3.8, after Coil et al. 2004), floored at 0.04 for bright galaxies.
- red fraction falls from 0.55 at i < 20 to 0.1 at i > 24.5; red galaxies are bulge dominated.
- size-magnitude relation log10(hlr/") = log10(0.8) - 0.1 (i - 20), 0.2 dex scatter (HST/COSMOS
  trend); disks are thin oblate spheroids seen at random inclination (intrinsic q0 = 0.15).
- stars: N(<i) = n24 * 10**(0.2 (i - 24)), colours on linear fits to the SDSS stellar locus.
"""
from __future__ import annotations

import numpy as np

from .config import SimConfig
from ..astro import band_mags
from .sources import Galaxy, Star

RED_BULGE_FRAC = (0.55, 0.95)
BLUE_BULGE_FRAC = (0.0, 0.35)
BLUE_TEMPLATES = ("Sbc", "Scd", "Im")
BLUE_TEMPLATE_P = (0.4, 0.4, 0.2)


def sample_power_law_mags(rng: np.random.Generator, n: int, slope: float, bright: float,
                          faint: float) -> np.ndarray:
    """n magnitudes from dN/dm ~ 10**(slope m) between bright and faint (inverse CDF)."""
    lo, hi = 10.0 ** (slope * bright), 10.0 ** (slope * faint)
    return np.log10(lo + rng.uniform(size=n) * (hi - lo)) / slope


def expected_count(density_at: float, m_at: float, slope: float, bright: float, faint: float,
                   area_arcmin2: float) -> float:
    """Expected number between bright and faint for N(<m) = density_at * 10**(slope (m - m_at))."""
    return area_arcmin2 * density_at * (10 ** (slope * (faint - m_at)) - 10 ** (slope * (bright - m_at)))


def sample_redshift(rng: np.random.Generator, mag_i: np.ndarray) -> np.ndarray:
    """Redshifts from p(z|m) ~ z^2 exp(-z/z0): a gamma distribution of shape 3 and scale z0."""
    z0 = np.maximum(0.0417 * np.asarray(mag_i) - 0.744, 0.04)
    return np.clip(rng.gamma(3.0, z0), 0.01, 3.4)


def red_fraction(mag_i: np.ndarray) -> np.ndarray:
    return np.clip(0.55 - 0.1 * (np.asarray(mag_i) - 20.0), 0.1, 0.55)


def disk_axis_ratio(rng: np.random.Generator, n: int, q0: float = 0.15) -> np.ndarray:
    """Projected axis ratio of thin oblate disks (thickness q0) at random inclination."""
    cos_i = rng.uniform(size=n)
    return np.sqrt(cos_i**2 * (1 - q0**2) + q0**2)


def galaxy_mags(ref_mag: float, bulge_frac_ref: float, disk_template: str, z: float,
                bandpasses: dict[str, str], ref_band: str, scatter: np.ndarray
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Total magnitude and bulge fraction per band of a bulge (template E) + disk galaxy.

    bulge_frac_ref: bulge-to-total flux in the reference band; scatter: per-band colour offsets
    (mag) added to the disk, zero in the reference band. Returns (mag, bulge_frac) dicts.
    """
    ref_bp = bandpasses[ref_band]
    bulge = band_mags(ref_mag, "E", z, bandpasses, ref_bp)
    disk = band_mags(ref_mag, disk_template, z, bandpasses, ref_bp)
    mags, fracs = {}, {}
    for k, b in enumerate(bandpasses):
        fb = bulge_frac_ref * 10 ** (-0.4 * (bulge[b] - ref_mag))
        fd = (1 - bulge_frac_ref) * 10 ** (-0.4 * (disk[b] + scatter[k] - ref_mag))
        mags[b] = float(ref_mag - 2.5 * np.log10(fb + fd))
        fracs[b] = float(fb / (fb + fd))
    return mags, fracs


def make_galaxy(rng: np.random.Generator, gid: int, ra: float, dec: float, mag_ref: float, z: float,
                red: bool, cfg: SimConfig, bandpasses: dict[str, str], **ids) -> Galaxy:
    """One field galaxy of reference-band magnitude mag_ref at redshift z (red or blue type)."""
    template = "E" if red else str(rng.choice(BLUE_TEMPLATES, p=BLUE_TEMPLATE_P))
    bf = rng.uniform(*(RED_BULGE_FRAC if red else BLUE_BULGE_FRAC))
    scatter = np.where(np.array(list(bandpasses)) == cfg.reference_band, 0.0,
                       rng.normal(0, 0.05, len(bandpasses)))
    mags, fracs = galaxy_mags(mag_ref, bf, template, z, bandpasses, cfg.reference_band, scatter)
    hlr = 0.8 * 10 ** (-0.1 * (mag_ref - 20.0) + rng.normal(0, 0.2))
    hlr_disk = float(np.clip(hlr, 0.08, 8.0))
    hlr_bulge = float(np.clip(hlr_disk * rng.uniform(0.25, 0.6), 0.05, 5.0))
    if red:  # bulge-dominated: the bulge sets the size
        hlr_bulge, hlr_disk = float(np.clip(hlr, 0.05, 6.0)), float(np.clip(hlr * 1.5, 0.08, 8.0))
    return Galaxy(id=gid, ra=ra, dec=dec, mag=mags, bulge_frac=fracs, hlr_disk=hlr_disk,
                  hlr_bulge=hlr_bulge, q_disk=float(disk_axis_ratio(rng, 1)[0]),
                  q_bulge=float(rng.uniform(0.6, 1.0)), pa=float(rng.uniform(0, 180)), z=float(z),
                  sed=template, n_bulge=float(rng.choice([3.0, 4.0])), **ids)


def sample_field_galaxies(rng: np.random.Generator, cfg: SimConfig, area_arcmin2: float,
                          positions, first_id: int, bandpasses: dict[str, str]) -> list[Galaxy]:
    """Galaxies over an area: counts, magnitudes, redshifts, types, sizes, shapes.

    positions(n) -> (ra, dec) arrays of n uniform positions over the area (deg).
    """
    p = cfg.population
    mu = expected_count(p.galaxy_density_i25, 25.0, p.count_slope, p.galaxy_mag_bright,
                        p.galaxy_mag_faint, area_arcmin2)
    n = int(rng.poisson(mu))
    mags = sample_power_law_mags(rng, n, p.count_slope, p.galaxy_mag_bright, p.galaxy_mag_faint)
    zs = sample_redshift(rng, mags)
    red = rng.uniform(size=n) < red_fraction(mags)
    ra, dec = positions(n)
    return [make_galaxy(rng, first_id + k, float(ra[k]), float(dec[k]), float(mags[k]), float(zs[k]),
                        bool(red[k]), cfg, bandpasses) for k in range(n)]


def stellar_colours(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Colours along the stellar locus: halo F/G turn-off stars, K and M dwarfs.

    Linear fits to the SDSS stellar locus (Covey et al. 2007): r-i from g-r, i-z from r-i.
    Returned as offsets m(band) - m(i) for u, g, r, i, z, y.
    """
    kind = rng.choice(3, size=n, p=[0.55, 0.2, 0.25])
    gr = np.where(kind == 0, rng.normal(0.4, 0.1, n),
                  np.where(kind == 1, rng.uniform(0.6, 1.3, n), rng.normal(1.42, 0.05, n)))
    ri = np.where(kind == 2, rng.uniform(0.5, 1.8, n), 0.37 * gr - 0.03)
    iz = 0.53 * ri - 0.02
    zy = 0.4 * iz
    ug = 1.0 + 0.9 * np.clip(gr, 0.2, 1.4)
    return {"i": np.zeros(n), "r": ri, "g": gr + ri, "u": ug + gr + ri, "z": -iz, "y": -iz - zy}


def sample_stars(rng: np.random.Generator, cfg: SimConfig, area_arcmin2: float, positions,
                 first_id: int) -> list[Star]:
    """Stars over an area from the star counts; colours from the stellar locus."""
    p = cfg.population
    faint = p.galaxy_mag_faint
    mu = expected_count(p.star_density_i24, 24.0, p.star_count_slope, p.star_mag_bright, faint,
                        area_arcmin2)
    n = int(rng.poisson(mu))
    mag_i = sample_power_law_mags(rng, n, p.star_count_slope, p.star_mag_bright, faint)
    col = stellar_colours(rng, n)
    ra, dec = positions(n)
    ref_off = col[cfg.reference_band] if cfg.reference_band in col else np.zeros(n)
    stars = []
    for k in range(n):
        mags = {b: float(mag_i[k] - ref_off[k] + col.get(b, np.zeros(n))[k]) for b in cfg.bands}
        stars.append(Star(id=first_id + k, ra=float(ra[k]), dec=float(dec[k]), mag=mags))
    return stars


def add_close_pairs(rng: np.random.Generator, cfg: SimConfig, galaxies: list[Galaxy], n_pairs: int,
                    first_id: int, first_pair: int, bandpasses: dict[str, str]) -> list[Galaxy]:
    """Companions placed close to randomly chosen galaxies brighter than 24 in the reference band.

    Separation uniform in cfg.population.close_pair_sep (arcsec), companion 0-2.5 mag fainter,
    at its own redshift; both members get the same pair_id. Returns the new companions.
    """
    hosts = [g for g in galaxies if g.mag[cfg.reference_band] < 24.0 and g.pair_id < 0
             and g.cluster_id < 0]
    if not hosts or n_pairs == 0:
        return []
    chosen = rng.choice(len(hosts), size=min(n_pairs, len(hosts)), replace=False)
    out = []
    for k, h in enumerate(chosen):
        host = hosts[h]
        sep = rng.uniform(*cfg.population.close_pair_sep) / 3600.0
        ang = rng.uniform(0, 2 * np.pi)
        ra = host.ra + sep * np.sin(ang) / np.cos(np.radians(host.dec))
        dec = host.dec + sep * np.cos(ang)
        mag = host.mag[cfg.reference_band] + rng.uniform(0.0, 2.5)
        z = float(sample_redshift(rng, np.array([mag]))[0])
        red = bool(rng.uniform() < red_fraction(np.array([mag]))[0])
        comp = make_galaxy(rng, first_id + k, float(ra), float(dec), float(mag), z, red, cfg,
                           bandpasses, pair_id=first_pair + k)
        host.pair_id = first_pair + k
        out.append(comp)
    return out
