"""Validated configuration of the survey simulator.

Every key is documented in the README ("Simulator configuration"); the defaults describe a
Rubin/HSC-like ground-based survey at roughly HSC-Wide depth, with the sources of each number
given beside it.
"""
from __future__ import annotations

from pathlib import Path

from ..astro import BANDPASSES
from ..yaml_io import read_mapping
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class BandSpec(BaseModel):
    """Photometric properties of one band of the simulated survey."""

    model_config = ConfigDict(extra="forbid")

    m5: float = Field(description="5-sigma point-source depth, AB mag")
    psf_fwhm: float = Field(gt=0, description="median PSF FWHM, arcsec")
    sky_mag: float = Field(description="dark-sky brightness, AB mag / arcsec^2")
    bandpass: str = Field(description="GalSim bandpass file used for galaxy colours")


# Depths: HSC-SSP Wide 5-sigma point-source limits (Aihara et al. 2018, PASJ 70, S4, table 1).
# Seeing: HSC-Wide median seeing per band (same paper). HSC has no u band: u depth and seeing are
# assumptions close to CFHTLS-Wide u (~25.2) and Rubin's u-band seeing.
# Sky: Rubin dark-sky brightness (Ivezic et al. 2019, ApJ 873, 111, table 2).
DEFAULT_BANDS: dict[str, BandSpec] = {
    "u": BandSpec(m5=25.3, psf_fwhm=0.92, sky_mag=22.99, bandpass=BANDPASSES["u"]),
    "g": BandSpec(m5=26.5, psf_fwhm=0.77, sky_mag=22.26, bandpass=BANDPASSES["g"]),
    "r": BandSpec(m5=26.1, psf_fwhm=0.76, sky_mag=21.20, bandpass=BANDPASSES["r"]),
    "i": BandSpec(m5=25.9, psf_fwhm=0.58, sky_mag=20.48, bandpass=BANDPASSES["i"]),
    "z": BandSpec(m5=25.1, psf_fwhm=0.68, sky_mag=19.60, bandpass=BANDPASSES["z"]),
    "y": BandSpec(m5=24.4, psf_fwhm=0.68, sky_mag=18.61, bandpass=BANDPASSES["y"]),
}


class PopulationConfig(BaseModel):
    """Numbers and properties of the astrophysical populations."""

    model_config = ConfigDict(extra="forbid")

    galaxy_density_i25: float = Field(
        45.0, ge=0, description="galaxies per arcmin^2 brighter than i=25 (deep counts, e.g. HSC Deep)")
    count_slope: float = Field(0.31, gt=0, lt=0.6, description="d log10 N / d m of the i-band counts")
    galaxy_mag_bright: float = Field(18.0, description="brightest field galaxy, i mag")
    galaxy_mag_faint: float = Field(26.5, description="faintest field galaxy drawn, i mag")
    star_density_i24: float = Field(
        1.5, ge=0, description="stars per arcmin^2 brighter than i=24 (high Galactic latitude)")
    star_count_slope: float = Field(0.2, ge=0, description="d log10 N / d m of the star counts")
    star_mag_bright: float = Field(14.0, description="brightest star, i mag")
    close_pairs_per_field: int = Field(20, ge=0, description="deliberately placed close galaxy pairs")
    close_pair_sep: tuple[float, float] = Field((0.6, 2.0), description="pair separation range, arcsec")
    clusters_per_field: float = Field(
        1.0, ge=0, description="galaxy clusters per field: the integer part always, the fraction by chance")
    cluster_z: tuple[float, float] = Field((0.1, 1.0), description="cluster redshift range")
    cluster_richness: tuple[float, float] = Field(
        (15.0, 120.0), description="richness range (members brighter than 0.2 L*), log-uniform")
    lenses_per_field: int = Field(3, ge=0, description="strong galaxy-galaxy lenses per field")
    theta_e: tuple[float, float] = Field((0.8, 3.0), description="Einstein radius range, arcsec")
    ring_galaxies_per_field: int = Field(2, ge=0, description="collisional ring galaxies")
    mergers_per_field: int = Field(2, ge=0, description="disturbed mergers with tidal tails")


class ArtefactConfig(BaseModel):
    """Instrumental artefacts and detector defects, per field."""

    model_config = ConfigDict(extra="forbid")

    satellite_trails: float = Field(0.5, ge=0, description="mean satellite trails per field (one band each)")
    cosmic_rays: int = Field(30, ge=0, description="unrejected cosmic rays per field and band")
    ghosts_per_bright_star: float = Field(1.0, ge=0, description="optical ghosts per saturated star")
    hot_pixel_clusters: int = Field(5, ge=0, description="hot-pixel clusters per field and band")
    amp_artefact_prob: float = Field(0.25, ge=0, le=1, description="chance a field/band has an amplifier offset")
    bad_columns: int = Field(3, ge=0, description="bad columns per field and band (masked)")
    bad_pixel_fraction: float = Field(2e-4, ge=0, le=0.1, description="fraction of isolated bad pixels (masked)")


class SimConfig(BaseModel):
    """Everything `deepfield simulate` needs; `deepfield simulate --config FILE` reads it from YAML."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, description="random seed: same seed, same files")
    size: int = Field(2048, ge=64, le=16384, description="field width and height, pixels")
    fields: int = Field(1, ge=1, le=10000, description="number of fields, laid out on a grid")
    bands: list[str] = Field(default_factory=lambda: ["g", "r", "i", "z"], description="bands to simulate")
    band_specs: dict[str, BandSpec] = Field(default_factory=lambda: dict(DEFAULT_BANDS),
                                            description="depth, seeing, sky and bandpass per band name")
    reference_band: str = Field("i", description="band of the count normalisation and size relation")
    pixel_scale: float = Field(0.2, gt=0, description="arcsec per pixel")
    overlap: float = Field(20.0, ge=0, description="sky overlap of neighbouring fields, arcsec")
    ra0: float = Field(150.0, ge=0, lt=360, description="RA of the first field centre, deg")
    dec0: float = Field(2.0, ge=-89, le=89, description="Dec of the first field centre, deg")
    zeropoint: float = Field(27.0, description="MAGZERO of every image (AB mag of 1 ADU)")
    psf_beta: float = Field(3.5, gt=1.5, description="Moffat beta of the PSF")
    seeing_scatter: float = Field(0.08, ge=0, lt=0.5, description="fractional field-to-field seeing scatter")
    psf_ellipticity: float = Field(0.03, ge=0, lt=0.3, description="max |g| of the PSF shear")
    saturation_mag: float = Field(17.5, description="point-source magnitude whose peak reaches saturation")
    depth_variation: float = Field(0.1, ge=0, lt=0.5, description="fractional exposure-map variation")
    background_residual: float = Field(0.15, ge=0, description="amplitude of the smooth residual sky, in sky sigma")
    population: PopulationConfig = Field(default_factory=PopulationConfig, description="astrophysical populations")
    artefacts: ArtefactConfig = Field(default_factory=ArtefactConfig, description="artefacts and defects")

    @field_validator("bands")
    @classmethod
    def _bands_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one band is required")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate band names in {v}")
        return v

    @model_validator(mode="after")
    def _bands_known(self) -> "SimConfig":
        unknown = [b for b in self.bands if b not in self.band_specs]
        if unknown:
            raise ValueError(f"bands {unknown} have no entry in band_specs (known: {sorted(self.band_specs)})")
        if self.reference_band not in self.band_specs:
            raise ValueError(f"reference_band {self.reference_band!r} has no entry in band_specs")
        if self.fields > 1 and self.overlap >= self.size * self.pixel_scale / 2:
            raise ValueError(f"overlap {self.overlap} arcsec must be under half the field width")
        return self

    @property
    def field_width_arcsec(self) -> float:
        return self.size * self.pixel_scale

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "SimConfig":
        """Read a YAML file, then apply non-None keyword overrides (the command-line options)."""
        data = read_mapping(path, ValueError, "simulator configuration")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
