"""What lens-finder stamps and deblender blends share: the survey they imitate (bands, pixels, zero point,
PSF and depth) and the draws that follow from it. tasks.trainsets.lens_stamps.StampConfig and
tasks.trainsets.blend_stamps.BlendConfig extend it with what each set holds."""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..sim.config import DEFAULT_BANDS
from ..sim.noise import noise_spec
from ..sim.psf import PSFSpec, noise_equivalent_area


class StampSurvey(BaseModel):
    """Survey properties of a set of simulated stamps (HSC-Wide depths and seeing per band by default)."""

    model_config = ConfigDict(extra="forbid")

    bands: list[str] = Field(default_factory=lambda: ["g", "r", "i", "z"], description="bands, in channel order")
    reference_band: str = Field("i", description="band of the magnitudes")
    size: int = Field(48, ge=16, le=256, description="stamp width and height, pixels")
    pixel_scale: float = Field(0.2, gt=0, description="arcsec per pixel")
    zeropoint: float = Field(27.0, description="AB magnitude of 1 image unit")
    psf_scale: float = Field(1.0, gt=0, description="multiplies every band's median PSF FWHM")
    seeing_scatter: float = Field(0.1, ge=0, description="log-normal scatter of the FWHM per stamp")
    psf_beta: float = Field(3.5, gt=1.5, description="Moffat beta")
    depth_offset: float = Field(0.0, description="added to every band's 5-sigma depth m5 (negative: shallower)")

    def check_bands(self) -> None:
        unknown = [b for b in [*self.bands, self.reference_band] if b not in DEFAULT_BANDS]
        if unknown:
            raise ValueError(f"bands {unknown} unknown; known: {sorted(DEFAULT_BANDS)}")

    def bandpasses(self) -> dict[str, str]:
        """Band -> GalSim bandpass file, for the bands and the reference band (whose magnitudes set the
        populations even when the stamps are drawn in other bands, e.g. a g, r, z survey)."""
        return {b: DEFAULT_BANDS[b].bandpass for b in dict.fromkeys([*self.bands, self.reference_band])}

    def draw_fwhm(self, rng: np.random.Generator) -> dict[str, float]:
        """One stamp's PSF FWHM per band (arcsec): the band's median x psf_scale x log-normal scatter."""
        return {b: DEFAULT_BANDS[b].psf_fwhm * self.psf_scale * float(np.exp(rng.normal(0, self.seeing_scatter)))
                for b in self.bands}

    def noise_sigma(self, band: str, fwhm: float) -> float:
        """Sky noise per pixel (image units) of `band` at its depth m5 + depth_offset for a PSF of `fwhm`."""
        spec = DEFAULT_BANDS[band]
        nea = noise_equivalent_area(PSFSpec(fwhm=fwhm, beta=self.psf_beta), self.pixel_scale)
        return noise_spec(spec.m5 + self.depth_offset, spec.sky_mag, self.zeropoint, self.pixel_scale, nea).sigma
