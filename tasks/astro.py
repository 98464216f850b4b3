"""Shared astronomy helpers: angular separations, cosmology radii, band definitions, galaxy colours and the
red-sequence colour model. The merge, the stages, the simulator, the training-set builders and the
evaluations all use these, so that each formula exists once.

- Separations: `separation_arcsec` (astropy's `angular_separation`, Vincenty's formula, exact at every
  angle).
- Cosmology (Planck 2018, astropy): `arcsec_per_mpc` (physical Mpc at z), `r_lambda_mpc` (redMaPPer's
  cluster radius, R_lambda = 1.0 h^-1 Mpc (lambda/100)^0.2, Rykoff et al. 2014), `distance_modulus`.
- Bands: `BANDPASSES`, the GalSim bandpass file of every band name deepfield knows (the Rubin u g r i z y
  curves shipped with GalSim), and `WAVELENGTH_ORDER`.
- Galaxy colours: the Coleman, Wu & Weedman (1980) templates shipped with GalSim (extended by Bruzual &
  Charlot) seen through those bandpasses: observed-frame AB colours at redshift z (`colour`), the
  K-correction of Hogg et al. (2002, eq. 13) (`k_correction`), apparent magnitudes (`apparent_mag`,
  `band_mags`), and m*(z), the apparent magnitude of an L* red-sequence galaxy with passive evolution,
  M*_i = -21.8 - 1.2 z (`m_star`).
- The red-sequence model (`red_sequence_model`): per redshift, the adjacent-band colours of an early-type
  (E template) galaxy and m*(z), as redMaPPer calibrates on spectroscopic clusters; the merge's cluster
  membership and redshift refinement and the red-sequence baseline finder use it.

The templates, bandpasses and cosmology ship with GalSim and astropy: nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["separation_arcsec", "unit_vectors", "arcsec_per_mpc", "r_lambda_mpc", "distance_modulus", "BANDPASSES",
           "WAVELENGTH_ORDER", "bandpass", "TEMPLATES", "colour", "k_correction", "apparent_mag", "band_mags",
           "m_star", "RedSequenceModel", "red_sequence_model"]

# --- separations and cosmology ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _planck18():
    """astropy's Planck 2018 cosmology, imported on first use (astropy.cosmology costs 0.6 s of every command's
    start otherwise)."""
    from astropy.cosmology import Planck18
    return Planck18


def unit_vectors(ra, dec) -> np.ndarray:
    """(n, 3) unit vectors of positions (ra, dec) in degrees (for k-d trees of sky positions: a chord of
    2 sin(theta / 2) is an angle theta)."""
    r, d = np.radians(np.atleast_1d(np.asarray(ra, float))), np.radians(np.atleast_1d(np.asarray(dec, float)))
    return np.column_stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])


def separation_arcsec(ra0, dec0, ra, dec) -> np.ndarray:
    """Angular separation (arcsec) of positions (ra, dec) from (ra0, dec0), all in degrees; broadcasts."""
    from astropy.coordinates import angular_separation
    r0, d0, r, d = (np.radians(np.asarray(v, float)) for v in (ra0, dec0, ra, dec))
    return np.degrees(np.asarray(angular_separation(r0, d0, r, d), float)) * 3600.0


def arcsec_per_mpc(z: float) -> float:
    """Arcseconds subtended by one physical Mpc at redshift z (Planck 2018)."""
    return float(206264.806 / _planck18().angular_diameter_distance(z).value)


def r_lambda_mpc(richness: float) -> float:
    """redMaPPer's cluster radius R_lambda in physical Mpc for richness lambda."""
    return 1.0 / _planck18().h * (richness / 100.0) ** 0.2


def distance_modulus(z: float | np.ndarray) -> np.ndarray:
    """Planck 2018 distance modulus, mag."""
    return np.asarray(_planck18().distmod(np.maximum(np.asarray(z, dtype=float), 1e-4)).value)


# --- bands ---------------------------------------------------------------------------------------------

# band name -> GalSim bandpass file (the Rubin throughputs shipped with GalSim)
BANDPASSES: dict[str, str] = {b: f"LSST_{b}.dat" for b in "ugrizy"}
WAVELENGTH_ORDER = "ugrizy"


def bandpass(band: str) -> str:
    """The GalSim bandpass file of `band`; ValueError naming the known bands for another name."""
    try:
        return BANDPASSES[band]
    except KeyError:
        raise ValueError(f"band {band!r} has no bandpass; known bands: {', '.join(BANDPASSES)}") from None


# --- galaxy colours ------------------------------------------------------------------------------------

TEMPLATES = ("E", "Sbc", "Scd", "Im")
_SED_FILES = {t: f"CWW_{t}_ext.sed" for t in TEMPLATES}
_ZGRID = np.round(np.arange(0.0, 3.5001, 0.02), 4)
M_STAR_0 = -21.8  # rest-frame reference-band absolute magnitude of L* red galaxies at z = 0
EVOLUTION_Q = 1.2  # passive evolution: M* = M_STAR_0 - EVOLUTION_Q z


@lru_cache(maxsize=None)
def _sed(template: str):
    import galsim
    if template not in _SED_FILES:
        raise ValueError(f"unknown SED template {template!r}; known: {TEMPLATES}")
    return galsim.SED(_SED_FILES[template], wave_type="Ang", flux_type="flambda")


@lru_cache(maxsize=None)
def _bandpass(filename: str):
    import galsim
    return galsim.Bandpass(filename, wave_type="nm").withZeropoint("AB")


@lru_cache(maxsize=None)
def _mag_table(template: str, bandpass_file: str) -> np.ndarray:
    """Observed AB magnitude (arbitrary common offset) of the template on _ZGRID."""
    sed, bp = _sed(template), _bandpass(bandpass_file)
    out = np.empty(len(_ZGRID))
    for k, z in enumerate(_ZGRID):
        out[k] = sed.atRedshift(float(z)).calculateMagnitude(bp)
    return out


def _mag(template: str, bandpass_file: str, z: float | np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=float)
    # the simulator calls this once per galaxy and band with a scalar z: its range test by plain comparisons
    # (np.any on a 0-d array costs more than the interpolation: 70 % of the population sampling's time)
    if (z < 0 or z > _ZGRID[-1]) if z.ndim == 0 else (np.any(z < 0) or np.any(z > _ZGRID[-1])):
        raise ValueError(f"redshift outside the template grid [0, {_ZGRID[-1]}]")
    return np.interp(z, _ZGRID, _mag_table(template, bandpass_file))


def colour(template: str, z: float | np.ndarray, band_bp: str, ref_bp: str) -> np.ndarray:
    """Observed-frame colour m(band) - m(ref) of a template at redshift z (AB mag); bandpass files."""
    return _mag(template, band_bp, z) - _mag(template, ref_bp, z)


def k_correction(template: str, z: float | np.ndarray, ref_bp: str) -> np.ndarray:
    """K(z) in the reference band: m = M + DM(z) + K(z) (Hogg et al. 2002, same band in and out).

    GalSim's atRedshift stretches f_lambda without the (1+z) bandwidth dimming, which makes
    f_nu carry (1+z)^2 instead of (1+z); K = m_gs(z) - m_gs(0) + 2.5 log10(1+z).
    """
    z = np.asarray(z, dtype=float)
    return _mag(template, ref_bp, z) - _mag(template, ref_bp, 0.0) + 2.5 * np.log10(1.0 + z)


def apparent_mag(abs_mag: float | np.ndarray, template: str, z: float | np.ndarray,
                 ref_bp: str) -> np.ndarray:
    """Apparent reference-band magnitude of rest-frame absolute magnitude abs_mag at redshift z."""
    return np.asarray(abs_mag) + distance_modulus(z) + k_correction(template, z, ref_bp)


def band_mags(ref_mag: float, template: str, z: float, bandpasses: dict[str, str],
              ref_bp: str) -> dict[str, float]:
    """Per-band AB magnitudes of a template at z whose reference-band magnitude is ref_mag.

    bandpasses: band name -> GalSim bandpass file.
    """
    return {b: float(ref_mag + colour(template, z, bp, ref_bp)) for b, bp in bandpasses.items()}


def m_star(z: float, ref_bp: str) -> float:
    """Apparent reference-band magnitude of an L* red-sequence galaxy at redshift z (bandpass file)."""
    return float(apparent_mag(M_STAR_0 - EVOLUTION_Q * z, "E", z, ref_bp))


# --- the red-sequence model -------------------------------------------------------------------------------


@dataclass
class RedSequenceModel:
    z: np.ndarray  # (nz,)
    colours: np.ndarray  # (nz, nbands - 1): m_b[k] - m_b[k+1]
    m_star: np.ndarray  # (nz,) reference-band magnitude of L*
    bands: list[str]
    ref_band: str


def red_sequence_model(bands: list[str], ref_band: str = "i", z: np.ndarray | None = None) -> RedSequenceModel:
    """The red-sequence model of `bands` (in wavelength order) on a redshift grid (default 0.1-1.0, step
    0.02): adjacent-band colours of the E template and m*(z) in `ref_band`."""
    z = np.round(np.arange(0.1, 1.0001, 0.02), 3) if z is None else np.asarray(z, float)
    bp = {b: bandpass(b) for b in bands}
    ref_bp = bandpass(ref_band)
    cols, ms = [], []
    for zz in z:
        ms.append(m_star(float(zz), ref_bp))
        m = band_mags(20.0, "E", float(zz), bp, ref_bp)
        cols.append([m[a] - m[b] for a, b in zip(bands[:-1], bands[1:])])
    return RedSequenceModel(z, np.array(cols), np.array(ms), list(bands), ref_band)
