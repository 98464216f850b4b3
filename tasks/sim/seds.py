"""Galaxy colours and K-corrections from the Coleman, Wu & Weedman (1980) templates shipped with
GalSim (extended by Bruzual & Charlot), seen through the Rubin bandpasses shipped with GalSim.

Colours at redshift z are the templates' observed-frame AB colours, so the red sequence reddens as
the 4000 A break moves through g, r and i. Apparent magnitudes of an object of rest-frame
absolute magnitude M in the reference band follow m = M + DM(z) + K(z) with the K-correction of
Hogg et al. (2002, eq. 13) and a Planck 2018 cosmology (astropy).
"""
from __future__ import annotations

from functools import lru_cache

import galsim
import numpy as np
from astropy.cosmology import Planck18

TEMPLATES = ("E", "Sbc", "Scd", "Im")
_SED_FILES = {t: f"CWW_{t}_ext.sed" for t in TEMPLATES}
_ZGRID = np.round(np.arange(0.0, 3.5001, 0.02), 4)


@lru_cache(maxsize=None)
def _sed(template: str) -> galsim.SED:
    if template not in _SED_FILES:
        raise ValueError(f"unknown SED template {template!r}; known: {TEMPLATES}")
    return galsim.SED(_SED_FILES[template], wave_type="Ang", flux_type="flambda")


@lru_cache(maxsize=None)
def _bandpass(filename: str) -> galsim.Bandpass:
    return galsim.Bandpass(filename, wave_type="nm").withZeropoint("AB")


@lru_cache(maxsize=None)
def _mag_table(template: str, bandpass: str) -> np.ndarray:
    """Observed AB magnitude (arbitrary common offset) of the template on _ZGRID."""
    sed, bp = _sed(template), _bandpass(bandpass)
    out = np.empty(len(_ZGRID))
    for k, z in enumerate(_ZGRID):
        out[k] = sed.atRedshift(float(z)).calculateMagnitude(bp)
    return out


def _mag(template: str, bandpass: str, z: float | np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=float)
    if np.any(z < 0) or np.any(z > _ZGRID[-1]):
        raise ValueError(f"redshift outside the template grid [0, {_ZGRID[-1]}]")
    return np.interp(z, _ZGRID, _mag_table(template, bandpass))


def colour(template: str, z: float | np.ndarray, band_bp: str, ref_bp: str) -> np.ndarray:
    """Observed-frame colour m(band) - m(ref) of a template at redshift z (AB mag)."""
    return _mag(template, band_bp, z) - _mag(template, ref_bp, z)


def k_correction(template: str, z: float | np.ndarray, ref_bp: str) -> np.ndarray:
    """K(z) in the reference band: m = M + DM(z) + K(z) (Hogg et al. 2002, same band in and out).

    GalSim's atRedshift stretches f_lambda without the (1+z) bandwidth dimming, which makes
    f_nu carry (1+z)^2 instead of (1+z); K = m_gs(z) - m_gs(0) + 2.5 log10(1+z).
    """
    z = np.asarray(z, dtype=float)
    return _mag(template, ref_bp, z) - _mag(template, ref_bp, 0.0) + 2.5 * np.log10(1.0 + z)


def distance_modulus(z: float | np.ndarray) -> np.ndarray:
    """Planck 2018 distance modulus, mag."""
    return np.asarray(Planck18.distmod(np.maximum(np.asarray(z, dtype=float), 1e-4)).value)


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
