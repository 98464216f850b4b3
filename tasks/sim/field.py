"""One simulated field: what it holds (the plan, drawn in the parent process) and how one band
of it is rendered and written (run in a worker process)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from .. import maskbits
from ..version import __version__
from . import artefacts
from .config import SimConfig
from .layout import FieldLayout
from .noise import NoiseSpec, add_noise, detector_defects, exposure_map, finalize, noise_spec, saturate, smooth_field
from .psf import PSFSpec, noise_equivalent_area, point_source_peak, sample_psf
from .render import Placed, blendedness, render_sources, snr
from .sources import mag_to_flux

STREAM_PSF, STREAM_ARTEFACTS, STREAM_NOISE, STREAM_EXPMAP = 4, 2, 3, 5
RENDER_MARGIN_PIX = 520  # no stamp reaches further than this (render.STAMP_MAX // 2 + a few)


def band_key(band: str) -> int:
    """A stable integer for a band name (for random streams independent of band order)."""
    return zlib.crc32(band.encode())


def file_names(field_name: str, band: str) -> dict[str, str]:
    return {kind: f"{field_name}-{band}-{kind}.fits" for kind in ("image", "invvar", "mask")}


@dataclass
class FieldPlan:
    """Everything needed to render one field, band by band, in any process."""

    cfg: SimConfig
    layout: FieldLayout
    placed: list[Placed]
    psf: dict[str, PSFSpec]
    noise: dict[str, NoiseSpec]
    saturation: dict[str, float]
    artefacts: list[dict] = field(default_factory=list)


def plan_field(cfg: SimConfig, layout: FieldLayout, sources: list, ra: np.ndarray, dec: np.ndarray
               ) -> FieldPlan:
    """Select the sources that can touch the field and draw its PSFs, noise levels and artefacts."""
    x, y = layout.wcs().all_world2pix(ra, dec, 0)
    near = layout.contains(x, y, margin=RENDER_MARGIN_PIX)
    placed = [Placed(sources[k], float(x[k]), float(y[k])) for k in np.nonzero(near)[0]]
    psf, noise, sat = {}, {}, {}
    for b in cfg.bands:
        spec = cfg.band_specs[b]
        rng = np.random.default_rng([cfg.seed, STREAM_PSF, layout.index, band_key(b)])
        psf[b] = sample_psf(spec.psf_fwhm, cfg.psf_beta, cfg.seeing_scatter, cfg.psf_ellipticity, rng)
        nea = noise_equivalent_area(psf[b], cfg.pixel_scale)
        noise[b] = noise_spec(spec.m5, spec.sky_mag, cfg.zeropoint, cfg.pixel_scale, nea)
        sat[b] = point_source_peak(mag_to_flux(cfg.saturation_mag, cfg.zeropoint), psf[b], cfg.pixel_scale)
    ref = cfg.reference_band if cfg.reference_band in cfg.bands else cfg.bands[0]
    bright = []  # saturated stars: the peak scales with flux, so brighter than saturation_mag in ref
    for p in placed:
        if p.source.kind == "star" and layout.contains(np.array(p.x), np.array(p.y)):
            if p.source.mag[ref] <= cfg.saturation_mag:
                bright.append((p.x, p.y, {b: mag_to_flux(p.source.mag[b], cfg.zeropoint) for b in cfg.bands}))
    rng = np.random.default_rng([cfg.seed, STREAM_ARTEFACTS, layout.index])
    arte = artefacts.sample_field_artefacts(
        rng, cfg.artefacts, (cfg.size, cfg.size), list(cfg.bands), {b: noise[b].sigma for b in cfg.bands},
        {b: psf[b].fwhm / cfg.pixel_scale / 2.3548 for b in cfg.bands}, bright, layout.index)
    return FieldPlan(cfg, layout, placed, psf, noise, sat, arte)


def image_header(plan: FieldPlan, band: str, kind: str) -> fits.Header:
    cfg, lay = plan.cfg, plan.layout
    h = lay.wcs_header()
    h["EXTNAME"] = kind.upper()
    h["FIELD"] = (lay.name, "field name")
    h["BAND"] = (band, "filter band")
    h["FILTER"] = (band, "filter band")
    h["MAGZERO"] = (cfg.zeropoint, "AB magnitude of 1 ADU")
    h["GAIN"] = (round(plan.noise[band].gain, 4), "effective gain at mean exposure, e-/ADU")
    h["PSF_FWHM"] = (round(plan.psf[band].fwhm, 5), "PSF FWHM, arcsec (Moffat)")
    h["PSFBETA"] = (cfg.psf_beta, "Moffat beta of the PSF")
    h["SEEING"] = (round(plan.psf[band].fwhm, 5), "same as PSF_FWHM, arcsec")
    h["PIXSCALE"] = (cfg.pixel_scale, "arcsec / pixel")
    h["SATURATE"] = (round(plan.saturation[band], 4), "saturation level, ADU")
    h["SKYLEVEL"] = (round(plan.noise[band].sky, 5), "subtracted sky level, ADU")
    h["SKYSIG"] = (round(plan.noise[band].sigma, 6), "sky noise at mean exposure, ADU")
    h["BUNIT"] = {"image": "adu", "invvar": "adu-2", "mask": ""}[kind]
    h["SIMSEED"] = (cfg.seed, "deepfield simulate seed")
    h["DEEPFVER"] = (__version__, "deepfield version")
    if kind == "mask":
        for key, bit, comment in maskbits.header_cards():
            h[key] = (bit, comment)
    return h


def render_band(plan: FieldPlan, band: str, out_dir: str) -> dict:
    """Render, noise and write one band of a field into out_dir; returns per-source measurements
    (blendedness and S/N in this band) and pixel statistics."""
    cfg, lay = plan.cfg, plan.layout
    shape = (cfg.size, cfg.size)
    psf = plan.psf[band].profile()
    nspec = plan.noise[band]
    model, stamps = render_sources(plan.placed, band, cfg.zeropoint, shape, psf, plan.psf[band].fwhm,
                                   cfg.psf_beta, cfg.pixel_scale, nspec.sigma, keep_stamps=True)
    blend = {sid: blendedness(st, model) for sid, st in stamps.items()}  # sources only
    sat, bleed = saturate(model, plan.saturation[band])
    rng = np.random.default_rng([cfg.seed, STREAM_NOISE, lay.index, band_key(band)])
    artefacts.apply_artefacts(model, band, plan.artefacts, rng)
    model += cfg.background_residual * nspec.sigma * smooth_field(shape, rng)
    exp_rng = np.random.default_rng([cfg.seed, STREAM_EXPMAP, lay.index])  # shared by all bands
    expmap = exposure_map(shape, exp_rng, cfg.depth_variation)
    image, invvar = add_noise(model, nspec, expmap, rng)
    bad = detector_defects(shape, rng, cfg.artefacts.bad_columns, cfg.artefacts.bad_pixel_fraction)
    mask = finalize(image, invvar, sat, bleed, bad, plan.saturation[band], nspec, rng)

    names = file_names(lay.name, band)
    out = Path(out_dir)
    for kind, data in (("image", image), ("invvar", invvar), ("mask", mask)):
        fits.PrimaryHDU(data=data, header=image_header(plan, band, kind)).writeto(out / names[kind])
    per_source = {sid: (blend[sid], snr(st, invvar)) for sid, st in stamps.items()}
    return dict(band=band, files=names, per_source=per_source, n_sat=int(sat.sum()),
                n_bleed=int(bleed.sum()), n_bad=int(bad.sum()))
