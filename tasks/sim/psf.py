"""Point-spread function of the simulated survey: a Moffat profile per field and band.

The FWHM is the band's median seeing times a per-field factor (log-normal scatter), so redder
bands are sharper, as on the sky; a small shear mimics optical and tracking ellipticity.
"""
from __future__ import annotations

from dataclasses import dataclass

import galsim
import numpy as np


@dataclass(frozen=True)
class PSFSpec:
    """PSF of one field in one band. fwhm in arcsec; g1, g2 reduced shear."""

    fwhm: float
    beta: float
    g1: float = 0.0
    g2: float = 0.0

    def profile(self) -> galsim.GSObject:
        psf = galsim.Moffat(beta=self.beta, fwhm=self.fwhm)
        if self.g1 or self.g2:
            psf = psf.shear(g1=self.g1, g2=self.g2)
        return psf

    def image(self, size: int, scale: float) -> np.ndarray:
        """The pixel-integrated PSF on a size x size grid of `scale` arcsec, unit sum."""
        arr = self.profile().drawImage(nx=size, ny=size, scale=scale).array
        return arr / arr.sum()


def sample_psf(median_fwhm: float, beta: float, scatter: float, max_g: float,
               rng: np.random.Generator) -> PSFSpec:
    """Draw one field's PSF: FWHM log-normal about the band median, shear up to max_g."""
    fwhm = median_fwhm * float(np.exp(rng.normal(0.0, scatter)))
    g = rng.uniform(0.0, max_g)
    ang = rng.uniform(0.0, np.pi)
    return PSFSpec(fwhm=fwhm, beta=beta, g1=float(g * np.cos(2 * ang)), g2=float(g * np.sin(2 * ang)))


def point_source_peak(flux: float, spec: PSFSpec, pixel_scale: float) -> float:
    """Peak pixel value (ADU) of a centred point source of `flux` ADU."""
    return flux * float(spec.image(33, pixel_scale).max())


def noise_equivalent_area(spec: PSFSpec, pixel_scale: float) -> float:
    """Effective number of pixels of optimal point-source photometry: 1 / sum(psf^2)."""
    img = spec.image(65, pixel_scale)
    return float(1.0 / np.sum(img**2))
