"""Galaxy-galaxy strong lenses: an SIE + external shear deflector lensing a compact blue source.

Coordinates of a lens system are arcsec relative to the deflector centre on the image axes of
sources.py: +x is west (image x), +y is north (image y). Position angles are degrees east of north;
lenstronomy measures angles from +x counter-clockwise, so phi = radians(90 + pa) (east = -x).
The source offset (beta_x, beta_y) is in the same frame. Ray tracing uses lenstronomy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import galsim
import numpy as np
from astropy.cosmology import Planck18

from .. import astro
from .sources import array_profile, mag_to_flux, pa_to_beta

C_KMS = 299792.458
_BATCH = 256
_MAX_BATCHES = 40
_OVERSAMPLE = 4  # sub-samples per grid pixel and axis when integrating the surface brightness


@dataclass
class LensParams:
    """Physical and observed parameters of one strong lens (angles in arcsec, pa in deg E of N)."""

    lens_id: int
    ra: float  # deflector centre, deg
    dec: float  # deg
    z_d: float
    z_s: float
    sigma_v: float  # km/s
    theta_e: float  # Einstein radius, arcsec
    q: float  # SIE mass axis ratio
    pa: float  # SIE position angle, deg east of north
    gamma_ext: float  # external shear strength
    phi_ext: float  # external shear angle, deg east of north
    beta_x: float  # source offset from the deflector, arcsec (+x west)
    beta_y: float  # arcsec (+y north)
    src_hlr: float  # source half-light radius, arcsec
    src_n: float  # source Sersic index
    src_q: float
    src_pa: float  # deg east of north
    src_sed: str  # source template
    src_mag: dict[str, float]  # unlensed source AB magnitudes per band
    defl_mag: dict[str, float]  # deflector AB magnitudes per band
    defl_hlr: float  # deflector half-light radius, arcsec
    defl_q: float  # deflector light axis ratio


def _angle(pa_deg: float) -> float:
    """lenstronomy angle (radian from +x, counter-clockwise) of a position angle east of north."""
    return float(np.radians(90.0 + pa_deg))


def _dist_ratio(z_d, z_s) -> np.ndarray:
    """D_ds / D_s (Planck18 angular diameter distances)."""
    try:
        d_ds = Planck18.angular_diameter_distance(z_d, z_s)
    except TypeError:  # astropy < 7: no two-redshift form
        d_ds = Planck18.angular_diameter_distance_z1z2(z_d, z_s)
    return np.asarray((d_ds / Planck18.angular_diameter_distance(z_s)).decompose().value)


def einstein_radius(sigma_v, z_d, z_s) -> np.ndarray:
    """SIS Einstein radius theta_E = 4 pi (sigma/c)^2 D_ds/D_s, arcsec (sigma_v in km/s)."""
    theta = 4.0 * np.pi * (np.asarray(sigma_v, dtype=float) / C_KMS) ** 2 * _dist_ratio(z_d, z_s)
    return np.degrees(theta) * 3600.0


def sample_lens(rng: np.random.Generator, lens_id: int, ra: float, dec: float,
                theta_e_range: tuple[float, float], bandpasses: dict[str, str],
                ref_band: str) -> LensParams:
    """Draw a plausible lens with Einstein radius (arcsec) inside theta_e_range.

    bandpasses: band name -> GalSim bandpass file (BandSpec.bandpass); ref_band must be one of them
    (the Faber-Jackson magnitude is rest-frame in it). Redshifts, sigma_v ~ U(200, 380) km/s are
    redrawn in batches of candidates until theta_e falls in range; ValueError if it never does.
    """
    lo, hi = (float(v) for v in theta_e_range)
    if not (0 < lo < hi):
        raise ValueError(f"theta_e_range must satisfy 0 < lo < hi, got {theta_e_range}")
    if ref_band not in bandpasses:
        raise ValueError(f"ref_band {ref_band!r} not in bandpasses {sorted(bandpasses)}")
    for _ in range(_MAX_BATCHES):
        z_d = rng.uniform(0.2, 0.8, _BATCH)
        z_s = rng.uniform(np.maximum(1.0, z_d + 0.3), 3.0)
        sigma = rng.uniform(200.0, 380.0, _BATCH)
        theta = einstein_radius(sigma, z_d, z_s)
        ok = np.flatnonzero((theta >= lo) & (theta <= hi))
        if ok.size:
            k = ok[0]
            z_d, z_s = float(z_d[k]), float(z_s[k])
            sigma, theta_e = float(sigma[k]), float(theta[k])
            break
    else:
        raise ValueError(f"no lens with theta_e in {theta_e_range} arcsec after "
                         f"{_MAX_BATCHES * _BATCH} draws (sigma_v 200-380 km/s, z_d 0.2-0.8, "
                         f"z_s 1-3 give roughly 0.4-3.9 arcsec)")
    ref_bp = bandpasses[ref_band]
    # Deflector: red elliptical on a Faber-Jackson relation with passive evolution.
    abs_mag = -21.8 - 1.2 * z_d - 10.0 * np.log10(sigma / 230.0) + rng.normal(0.0, 0.3)
    ref_mag = float(astro.apparent_mag(abs_mag, "E", z_d, ref_bp))
    defl_mag = astro.band_mags(ref_mag, "E", z_d, bandpasses, ref_bp)
    # Size-luminosity relation R_e = 3 kpc (L/L(M=-21.5))^0.5 on the evolution-corrected
    # luminosity, 0.1 dex scatter, clipped to 0.5-2 arcsec.
    r_kpc = 3.0 * 10.0 ** (-0.2 * (abs_mag + 1.2 * z_d + 21.5) + rng.normal(0.0, 0.1))
    kpc_per_arcsec = Planck18.kpc_proper_per_arcmin(z_d).value / 60.0
    defl_hlr = float(np.clip(r_kpc / kpc_per_arcsec, 0.5, 2.0))
    q = float(rng.uniform(0.5, 1.0))
    pa = float(rng.uniform(0.0, 180.0))
    defl_q = float(np.clip(q + rng.normal(0.0, 0.05), 0.4, 1.0))
    gamma_ext = float(rng.uniform(0.0, 0.08))
    phi_ext = float(rng.uniform(0.0, 180.0))
    # Source: compact star-forming galaxy, uniform in area within 0.5 theta_e of the axis.
    src_sed = str(rng.choice(["Im", "Scd"]))
    src_ref = float(rng.uniform(23.0, 25.5))
    src_mag = astro.band_mags(src_ref, src_sed, z_s, bandpasses, ref_bp)
    r = 0.5 * theta_e * np.sqrt(rng.uniform())
    ang = rng.uniform(0.0, 2 * np.pi)
    return LensParams(
        lens_id=int(lens_id), ra=float(ra), dec=float(dec), z_d=z_d, z_s=z_s, sigma_v=sigma,
        theta_e=theta_e, q=q, pa=pa, gamma_ext=gamma_ext, phi_ext=phi_ext,
        beta_x=float(r * np.cos(ang)), beta_y=float(r * np.sin(ang)),
        src_hlr=float(rng.uniform(0.1, 0.35)), src_n=float(rng.uniform(0.7, 1.5)),
        src_q=float(rng.uniform(0.4, 1.0)), src_pa=float(rng.uniform(0.0, 180.0)), src_sed=src_sed,
        src_mag=src_mag, defl_mag=defl_mag, defl_hlr=defl_hlr, defl_q=defl_q)


def lenstronomy_models(p: LensParams):
    """lenstronomy (LensModel, kwargs_lens, LightModel, kwargs_source) of a lens."""
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util.param_util import phi_q2_ellipticity, shear_polar2cartesian

    if p.theta_e <= 0 or p.src_hlr <= 0 or not (0 < p.q <= 1) or not (0 < p.src_q <= 1):
        raise ValueError(f"lens {p.lens_id}: theta_e, src_hlr must be > 0 and q, src_q in (0, 1]")
    e1, e2 = phi_q2_ellipticity(_angle(p.pa), p.q)
    g1, g2 = shear_polar2cartesian(_angle(p.phi_ext), p.gamma_ext)
    kw_lens = [dict(theta_E=p.theta_e, e1=e1, e2=e2, center_x=0.0, center_y=0.0),
               dict(gamma1=g1, gamma2=g2, ra_0=0.0, dec_0=0.0)]
    s1, s2 = phi_q2_ellipticity(_angle(p.src_pa), p.src_q)
    kw_src = [dict(amp=1.0, R_sersic=p.src_hlr, n_sersic=p.src_n, e1=s1, e2=s2,
                   center_x=p.beta_x, center_y=p.beta_y)]
    return LensModel(["SIE", "SHEAR"]), kw_lens, LightModel(["SERSIC_ELLIPSE"]), kw_src


def _grid(n: int, scale: float, oversample: int, x0: float = 0.0, y0: float = 0.0):
    """Sub-sample coordinates (arcsec) of an n x n grid of `scale` centred on (x0, y0)."""
    m = n * oversample
    c = (np.arange(m) - (m - 1) / 2.0) * (scale / oversample)
    x, y = np.meshgrid(c + x0, c + y0)  # row index = y (row 0 south), column = x
    return x.ravel(), y.ravel()


def _bin(values: np.ndarray, n: int, oversample: int) -> np.ndarray:
    return values.reshape(n, oversample, n, oversample).mean(axis=(1, 3))


def unlensed_source_sum(p: LensParams, scale: float) -> float:
    """Sum of the unlensed source over pixels of `scale` arcsec (same units as the lensed surface
    before normalisation), on a grid reaching 15 half-light radii, finer than hlr/8."""
    _, _, light, kw_src = lenstronomy_models(p)
    sub = max(min(scale / _OVERSAMPLE, p.src_hlr / 8.0), p.src_hlr / 20.0)
    n = int(np.ceil(2 * 15 * p.src_hlr / sub)) + 1
    x, y = _grid(n, sub, 1, p.beta_x, p.beta_y)
    return float(light.surface_brightness(x, y, kw_src).sum()) * (sub / scale) ** 2


def grid_size(p: LensParams, scale: float) -> int:
    """Width (pixels of `scale` arcsec) of a grid that holds all images: half-width
    max(theta_e + 2, 1.3 (theta_e + |beta|) + 6 src_hlr) arcsec."""
    half = max(p.theta_e + 2.0, 1.3 * (p.theta_e + np.hypot(p.beta_x, p.beta_y)) + 6.0 * p.src_hlr)
    return 2 * int(np.ceil(half / scale)) + 1


def lensed_source_surface(p: LensParams, scale: float, size: int) -> tuple[np.ndarray, float]:
    """Ray-traced image of the source on a size x size grid of `scale` arcsec centred on the
    deflector (row 0 south, column 0 east).

    Each pixel is the mean of 4 x 4 sub-samples traced to the source plane. Returns
    (surface, magnification) with surface.sum() == magnification = lensed / unlensed flux; the
    unlensed flux comes from a fine grid around the source (unlensed_source_sum). Choose
    scale <= pixel/3 and <= src_hlr/2, and size >= grid_size(p, scale) to hold every image.
    """
    if scale <= 0 or int(size) < 3:
        raise ValueError(f"lensed_source_surface: need scale > 0 and size >= 3, "
                         f"got {scale}, {size}")
    size = int(size)
    lens, kw_lens, light, kw_src = lenstronomy_models(p)
    x, y = _grid(size, scale, _OVERSAMPLE)
    bx, by = lens.ray_shooting(x, y, kw_lens)
    surface = _bin(light.surface_brightness(bx, by, kw_src), size, _OVERSAMPLE)
    mu = float(surface.sum()) / unlensed_source_sum(p, scale)
    if not np.isfinite(mu) or mu <= 0:
        raise ValueError(f"lens {p.lens_id}: lensed source has no flux on the grid")
    return surface * (mu / surface.sum()), mu


def image_positions(p: LensParams) -> tuple[np.ndarray, np.ndarray]:
    """Image positions (arcsec, deflector frame) of the source centre, lenstronomy's solver.

    The solver also returns the singular centre of the SIE (|mu| ~ 0); it is dropped.
    """
    from lenstronomy.LensModel.Solver.lens_equation_solver import LensEquationSolver

    lens, kw_lens, _, _ = lenstronomy_models(p)
    window = 2.0 * (1.5 * p.theta_e + np.hypot(p.beta_x, p.beta_y)) + 1.0
    x, y = LensEquationSolver(lens).image_position_from_source(
        p.beta_x, p.beta_y, kw_lens, min_distance=p.theta_e / 25.0, search_window=window)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.abs(lens.magnification(x, y, kw_lens)) > 1e-3
    return x[keep], y[keep]


@dataclass
class LensSystem:
    """A strong lens as a sky source (kind "lens"): deflector light plus lensed arcs.

    pixel_scale (arcsec) of the images sets the ray-tracing grid, scale = min(pixel/3, src_hlr/2);
    the traced surface is computed once and shared by all bands (the source has one colour).
    """

    id: int
    params: LensParams
    pixel_scale: float = 0.2
    kind: str = "lens"
    _traced: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def ra(self) -> float:
        return self.params.ra

    @property
    def dec(self) -> float:
        return self.params.dec

    @property
    def scale(self) -> float:
        return min(self.pixel_scale / 3.0, self.params.src_hlr / 2.0)

    def traced(self) -> tuple[np.ndarray, float]:
        """(surface, magnification) of lensed_source_surface, cached."""
        if self._traced is None:
            self._traced = lensed_source_surface(self.params, self.scale,
                                                 grid_size(self.params, self.scale))
        return self._traced

    @property
    def magnification(self) -> float:
        return self.traced()[1]

    def arc_mags(self) -> dict[str, float]:
        """AB magnitudes of the lensed images together: unlensed mag - 2.5 log10(mu)."""
        dm = 2.5 * np.log10(self.magnification)
        return {b: float(m - dm) for b, m in self.params.src_mag.items()}

    @property
    def mag(self) -> dict[str, float]:
        """Total AB magnitude (deflector + arcs) per band."""
        arcs = self.arc_mags()
        return {b: float(-2.5 * np.log10(10 ** (-0.4 * m) + 10 ** (-0.4 * arcs[b])))
                for b, m in self.params.defl_mag.items() if b in arcs}

    def deflector_profile(self, band: str, zeropoint: float) -> galsim.GSObject:
        """De Vaucouleurs deflector light in ADU, centred at (0, 0)."""
        p = self.params
        if band not in p.defl_mag:
            raise ValueError(f"lens {p.lens_id}: no deflector magnitude in band {band!r}")
        g = galsim.DeVaucouleurs(half_light_radius=p.defl_hlr,
                                 flux=mag_to_flux(p.defl_mag[band], zeropoint))
        return g.shear(q=p.defl_q, beta=pa_to_beta(p.pa))

    def arc_profile(self, band: str, zeropoint: float) -> galsim.GSObject:
        """Lensed source in ADU (flux = unlensed flux x magnification), deflector-centred."""
        p = self.params
        if band not in p.src_mag:
            raise ValueError(f"lens {p.lens_id}: no source magnitude in band {band!r}")
        surface, mu = self.traced()
        return array_profile(surface, self.scale, flux=mag_to_flux(p.src_mag[band], zeropoint) * mu)

    def profile(self, band: str, zeropoint: float) -> galsim.GSObject:
        return self.deflector_profile(band, zeropoint) + self.arc_profile(band, zeropoint)

    @property
    def size(self) -> float:
        """arcsec: max(deflector hlr, theta_e + source hlr)."""
        p = self.params
        return max(p.defl_hlr, p.theta_e + p.src_hlr)

    def truth(self) -> dict:
        p = self.params
        return dict(id=self.id, kind=self.kind, ra=p.ra, dec=p.dec, z=p.z_d, sed="E",
                    hlr=p.defl_hlr, hlr_disk=0.0, hlr_bulge=p.defl_hlr, q=p.defl_q, pa=p.pa,
                    n_bulge=4.0,
                    cluster_id=-1, lens_id=p.lens_id, pair_id=-1, anomaly_id=-1)

    def lens_truth(self) -> dict:
        """Every LensParams field flat (mag_src_<b>, mag_arc_<b>, mag_defl_<b>), magnification,
        n_images (solver multiplicity of the source centre)."""
        d = asdict(self.params)
        src, defl = d.pop("src_mag"), d.pop("defl_mag")
        d.update({f"mag_src_{b}": m for b, m in src.items()})
        d.update({f"mag_arc_{b}": m for b, m in self.arc_mags().items()})
        d.update({f"mag_defl_{b}": m for b, m in defl.items()})
        d["magnification"] = self.magnification
        d["n_images"] = int(len(image_positions(self.params)[0]))
        return d


def render_lens_stamp(p: LensParams, band: str, zeropoint: float, psf: galsim.GSObject,
                      size_pix: int, pixel_scale: float, include_deflector: bool = True,
                      include_source: bool = True) -> np.ndarray:
    """Noiseless (size_pix, size_pix) stamp in ADU of the lens convolved with `psf`, centred on the
    deflector (row 0 south); pixel_scale in arcsec."""
    if not (include_deflector or include_source):
        raise ValueError("render_lens_stamp: include the deflector, the source, or both")
    if int(size_pix) < 1 or pixel_scale <= 0:
        raise ValueError("render_lens_stamp: size_pix must be >= 1 and pixel_scale > 0")
    system = LensSystem(id=p.lens_id, params=p, pixel_scale=pixel_scale)
    parts = []
    if include_deflector:
        parts.append(system.deflector_profile(band, zeropoint))
    if include_source:
        parts.append(system.arc_profile(band, zeropoint))
    obj = galsim.Convolve(galsim.Add(parts) if len(parts) > 1 else parts[0], psf)
    img = obj.drawImage(nx=int(size_pix), ny=int(size_pix), scale=pixel_scale)
    return img.array.copy()
