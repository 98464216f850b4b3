"""Anomalies the GAN anomaly scorer must find (cf. Storey-Fisher et al. 2021, MNRAS 508, 2946).

A. Astrophysical anomalies: sky sources following the protocol of ``tasks.sim.sources``
   (``profile(band, zeropoint)`` in ADU before the PSF, centred on (0, 0) arcsec, +x west, +y
   north): collisional ring galaxies (`RingGalaxy`) and mergers with tidal tails (`Merger`).
B. Instrumental artefacts: functions acting in place on one band's float image (ny, nx) in ADU,
   in pixel coordinates (x = column, y = row, pixel centres at integers). Each returns plain
   dicts (JSON-friendly) for the truth catalog. `sample_field_artefacts` decides a field's
   artefacts deterministically from an rng; `apply_artefacts` paints them band by band.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import galsim
import numpy as np
from scipy.special import ndtr

from tasks.sim import seds
from tasks.sim.sources import Galaxy, array_profile, mag_to_flux

SAMPLE_SCALE = 0.2 / 3.0  # arcsec; sampling of the array profiles (a third of a 0.2" pixel)


def _gauss_map(px, py, sig, w, scale: float, half: float) -> np.ndarray:
    """Sum of unit-normalised circular Gaussians (positions px, py, widths sig in arcsec, weights
    w) sampled on a square grid of `scale` arcsec spanning +-half; row 0 south. Sum = sum(w)."""
    n = 2 * int(math.ceil(half / scale)) + 1
    c = (np.arange(n) - (n - 1) / 2.0) * scale
    sig = np.broadcast_to(np.asarray(sig, float), np.shape(px))
    gx = np.exp(-0.5 * ((c[None, :] - np.asarray(px)[:, None]) / sig[:, None]) ** 2)
    gy = np.exp(-0.5 * ((c[None, :] - np.asarray(py)[:, None]) / sig[:, None]) ** 2)
    norm = np.asarray(w, float) * scale**2 / (2 * np.pi * sig**2)
    return (gy * norm[:, None]).T @ gx


def _sum_mags(*mags: dict[str, float]) -> dict[str, float]:
    """AB magnitude of the summed flux of several components, per band."""
    return {b: float(-2.5 * np.log10(sum(10 ** (-0.4 * m[b]) for m in mags))) for b in mags[0]}


def _params(src, **extra) -> dict:
    """anomaly_truth of a source: its public dataclass fields (JSON-friendly) plus `extra`."""
    out = dict(anomaly_id=src.anomaly_id, type=src.kind, source_id=src.id)
    for f in fields(src):
        v = getattr(src, f.name)
        if not f.name.startswith("_") and not isinstance(v, Galaxy) and f.name not in ("id", "kind"):
            out[f.name] = list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, dict) else v
    return {**out, **extra}


def _ref_bp(bandpasses: dict[str, str], ref_band: str) -> str:
    if ref_band not in bandpasses:
        raise ValueError(f"ref_band {ref_band!r} not in bandpasses {sorted(bandpasses)}")
    return bandpasses[ref_band]


@dataclass
class RingGalaxy:
    """A collisional ring galaxy (Cartwheel-like): an elliptical ring of radius `ring_radius`
    (arcsec, semi-major axis) and Gaussian width `ring_width` (sigma, arcsec), axis ratio q and
    position angle pa (deg east of north), with star-forming knots on it (angles in deg along the
    ring from the major axis, each carrying a fraction of the ring flux, sigma `knot_sigma`) and
    a small red exponential nucleus of half-light radius `nucleus_hlr` offset by
    (nucleus_dx, nucleus_dy) arcsec. ring_mag / nucleus_mag: AB mags per band; `mag` is the
    total (computed)."""

    id: int
    ra: float
    dec: float
    ring_mag: dict[str, float]
    nucleus_mag: dict[str, float]
    ring_radius: float
    ring_width: float
    q: float
    pa: float
    z: float
    knot_angles: tuple[float, ...] = ()
    knot_fracs: tuple[float, ...] = ()
    knot_sigma: float = 0.15
    nucleus_hlr: float = 0.2
    nucleus_dx: float = 0.0
    nucleus_dy: float = 0.0
    sed: str = "Im"
    kind: str = "ring_galaxy"
    cluster_id: int = -1
    anomaly_id: int = -1
    mag: dict = field(init=False, default_factory=dict)
    _cache: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not 0 < self.q <= 1 or self.ring_radius <= 0 or self.ring_width <= 0 or self.knot_sigma <= 0:
            raise ValueError("RingGalaxy: need 0 < q <= 1 and positive ring_radius, ring_width, knot_sigma")
        if len(self.knot_angles) != len(self.knot_fracs) or sum(self.knot_fracs) >= 1 or min(self.knot_fracs, default=0) < 0:
            raise ValueError("RingGalaxy: knot_angles and knot_fracs must match, fracs >= 0 summing < 1")
        if set(self.ring_mag) != set(self.nucleus_mag):
            raise ValueError("RingGalaxy: ring_mag and nucleus_mag must have the same bands")
        if self.anomaly_id < 0:
            self.anomaly_id = self.id
        self.mag = _sum_mags(self.ring_mag, self.nucleus_mag)

    def _ring_map(self) -> np.ndarray:
        """Unit-sum ring + knots map on the SAMPLE_SCALE grid (band independent)."""
        if "ring" not in self._cache:
            R, q, w = self.ring_radius, self.q, self.ring_width
            th = np.linspace(0, 2 * np.pi, max(64, int(2 * np.pi * R / (0.4 * w))), endpoint=False)
            ds = np.hypot(R * np.sin(th), q * R * np.cos(th))  # arc length element per dtheta
            ka = np.radians(np.asarray(self.knot_angles, float))
            u = np.concatenate([R * np.cos(th), R * np.cos(ka)])
            v = np.concatenate([q * R * np.sin(th), q * R * np.sin(ka)])
            wts = np.concatenate([ds / ds.sum() * (1 - sum(self.knot_fracs)), self.knot_fracs])
            sig = np.concatenate([np.full(th.size, w), np.full(ka.size, self.knot_sigma)])
            p = np.radians(self.pa)  # major axis along (-sin pa, cos pa): east of north
            x = -u * np.sin(p) + v * np.cos(p)
            y = u * np.cos(p) + v * np.sin(p)
            self._cache["ring"] = _gauss_map(x, y, sig, wts, SAMPLE_SCALE, R + 5 * max(w, self.knot_sigma))
        return self._cache["ring"]

    def profile(self, band: str, zeropoint: float) -> galsim.GSObject:
        ring = array_profile(self._ring_map(), SAMPLE_SCALE, mag_to_flux(self.ring_mag[band], zeropoint))
        nuc = galsim.Exponential(half_light_radius=self.nucleus_hlr,
                                 flux=mag_to_flux(self.nucleus_mag[band], zeropoint))
        return ring + nuc.shift(self.nucleus_dx, self.nucleus_dy)

    @property
    def size(self) -> float:
        """Approximate half-light radius, arcsec: the ring radius."""
        return float(self.ring_radius)

    @property
    def extent(self) -> float:
        """Radius (arcsec) outside which the profile is negligible (for stamp sizes)."""
        return float(self.ring_radius + 5 * max(self.ring_width, self.knot_sigma))

    def truth(self) -> dict:
        return dict(id=self.id, kind=self.kind, ra=self.ra, dec=self.dec, z=self.z, sed=self.sed,
                    hlr=self.size, hlr_disk=float(self.ring_radius), hlr_bulge=float(self.nucleus_hlr),
                    q=float(self.q), pa=float(self.pa), n_bulge=1.0, cluster_id=self.cluster_id,
                    lens_id=-1, pair_id=-1, anomaly_id=self.anomaly_id)

    def anomaly_truth(self) -> dict:
        """Type and parameters (lengths in arcsec, angles in deg, mags AB per band)."""
        return _params(self, n_knots=len(self.knot_angles), knot_frac=float(sum(self.knot_fracs)))


@dataclass
class Merger:
    """Two overlapping bulge+disk galaxies (`Galaxy` profiles shifted to (dx1, dy1) and
    (dx2, dy2) arcsec from the centre) with two point-symmetric tidal tails: circular arcs of
    length `tail_length` (arcsec) and curvature radius `tail_curvature` leaving each nucleus at
    angle `tail_angle` (deg from +x, counter-clockwise; the second tail at +180), bending with
    `tail_sense` (+1 counter-clockwise, -1 clockwise), of Gaussian width `tail_width` (growing
    1.5x to the tip), lit from arc length `tail_start` (arcsec, the disk's edge) to tail_start +
    tail_length, with `n_tail_knots` knots placed from `tail_seed`. tail_mag: AB mag per band
    of both tails together; `mag` is the total (computed)."""

    id: int
    ra: float
    dec: float
    gal1: Galaxy
    gal2: Galaxy
    dx1: float
    dy1: float
    dx2: float
    dy2: float
    tail_mag: dict[str, float]
    tail_length: float
    tail_curvature: float
    tail_angle: float
    z: float
    tail_sense: int = 1
    tail_width: float = 0.3
    tail_start: float = 0.3
    n_tail_knots: int = 3
    tail_seed: int = 0
    kind: str = "merger"
    cluster_id: int = -1
    anomaly_id: int = -1
    mag: dict = field(init=False, default_factory=dict)
    _cache: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if min(self.tail_length, self.tail_curvature, self.tail_width) <= 0 or self.tail_start < 0:
            raise ValueError("Merger: tail_length, tail_curvature, tail_width must be > 0, tail_start >= 0")
        if self.tail_sense not in (1, -1) or self.n_tail_knots < 0:
            raise ValueError("Merger: tail_sense must be +1 or -1 and n_tail_knots >= 0")
        if not set(self.gal1.mag) == set(self.gal2.mag) == set(self.tail_mag):
            raise ValueError("Merger: gal1, gal2 and tail_mag must have the same bands")
        if self.anomaly_id < 0:
            self.anomaly_id = self.id
        self.mag = _sum_mags(self.gal1.mag, self.gal2.mag, self.tail_mag)

    def tail_points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, sigma, weight) of the Gaussians making both tails, arcsec; weights sum to 1."""
        L, Rc, w = self.tail_length, self.tail_curvature, self.tail_width
        s0 = self.tail_start
        s = np.arange(s0, s0 + L, 0.4 * w)
        wt = 0.4 + 0.6 * np.exp(-(s - s0) / L)  # slowly fading along the tail
        sig = w * (1 + 0.5 * (s - s0) / L)
        krng = np.random.default_rng(self.tail_seed)
        out = []
        for k, (x0, y0) in enumerate([(self.dx1, self.dy1), (self.dx2, self.dy2)]):
            a = np.radians(self.tail_angle + 180.0 * k)
            d, n = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)]) * self.tail_sense
            sk = krng.uniform(s0 + 0.3 * L, s0 + L, self.n_tail_knots)
            ss = np.concatenate([s, sk])
            ww = np.concatenate([wt / wt.sum(), krng.uniform(0.03, 0.08, sk.size)])
            sg = np.concatenate([sig, np.full(sk.size, 0.6 * w)])
            pos = (np.array([x0, y0])[:, None] + Rc * np.sin(ss / Rc) * d[:, None]
                   + Rc * (1 - np.cos(ss / Rc)) * n[:, None])
            out.append((pos[0], pos[1], sg, ww))
        x, y, sg, ww = (np.concatenate(v) for v in zip(*out))
        return x, y, sg, ww / ww.sum()

    def _tail_map(self) -> np.ndarray:
        if "tail" not in self._cache:
            x, y, sg, ww = self.tail_points()
            half = float(max(np.abs(x).max(), np.abs(y).max()) + 4 * sg.max())
            self._cache["tail"] = _gauss_map(x, y, sg, ww, SAMPLE_SCALE, half)
        return self._cache["tail"]

    def profile(self, band: str, zeropoint: float) -> galsim.GSObject:
        tails = array_profile(self._tail_map(), SAMPLE_SCALE, mag_to_flux(self.tail_mag[band], zeropoint))
        return galsim.Add([self.gal1.profile(band, zeropoint).shift(self.dx1, self.dy1),
                           self.gal2.profile(band, zeropoint).shift(self.dx2, self.dy2), tails])

    @property
    def separation(self) -> float:
        return float(math.hypot(self.dx1 - self.dx2, self.dy1 - self.dy2))

    @property
    def size(self) -> float:
        """Approximate half-light radius, arcsec: half the separation plus the larger galaxy's."""
        return float(0.5 * self.separation + max(self.gal1.size, self.gal2.size))

    @property
    def extent(self) -> float:
        """Radius (arcsec) enclosing the tails (for stamp sizes)."""
        x, y, sg, _ = self.tail_points()
        return float(max(np.hypot(x, y).max() + 3 * sg.max(), self.size * 4))

    def truth(self) -> dict:
        g = self.gal1
        return dict(id=self.id, kind=self.kind, ra=self.ra, dec=self.dec, z=self.z, sed=g.sed,
                    hlr=self.size, hlr_disk=g.hlr_disk, hlr_bulge=g.hlr_bulge, q=g.q_disk, pa=g.pa,
                    n_bulge=g.n_bulge, cluster_id=self.cluster_id, lens_id=-1, pair_id=-1,
                    anomaly_id=self.anomaly_id)

    def anomaly_truth(self) -> dict:
        """Type and parameters (lengths in arcsec, angles in deg, mags AB per band); the two
        galaxies appear as sed1/2, mag1/2, hlr1/2."""
        g1, g2 = self.gal1, self.gal2
        return _params(self, separation=self.separation, sed1=g1.sed, sed2=g2.sed, mag1=dict(g1.mag),
                       mag2=dict(g2.mag), hlr1=g1.size, hlr2=g2.size)


def _bulge_disk(rng, id, ra, dec, ref_mag, z, template, bandpasses, ref_band, anomaly_id) -> Galaxy:
    """A Galaxy whose bulge has E colours and disk `template` colours at redshift z."""
    ref_bp = _ref_bp(bandpasses, ref_band)
    fb = 0.9 if template == "E" else float(rng.uniform(0.05, 0.45))
    mb = seds.band_mags(ref_mag - 2.5 * np.log10(fb), "E", z, bandpasses, ref_bp)
    md = seds.band_mags(ref_mag - 2.5 * np.log10(1 - fb), template, z, bandpasses, ref_bp)
    fbb = {b: float(1 / (1 + 10 ** (-0.4 * (md[b] - mb[b])))) for b in bandpasses}
    hlr = float(np.exp(rng.uniform(np.log(0.5), np.log(1.6))) * 10 ** (-0.1 * (ref_mag - 20)))
    return Galaxy(id=id, ra=ra, dec=dec, mag=_sum_mags(mb, md), bulge_frac=fbb, hlr_disk=hlr,
                  hlr_bulge=float(hlr * rng.uniform(0.2, 0.5)), q_disk=float(rng.uniform(0.3, 0.95)),
                  q_bulge=float(rng.uniform(0.6, 1.0)), pa=float(rng.uniform(0, 180)), z=z,
                  sed=template, anomaly_id=anomaly_id)


def sample_ring_galaxy(rng: np.random.Generator, id: int, ra: float, dec: float,
                       bandpasses: dict[str, str], ref_band: str) -> RingGalaxy:
    """Draw a ring galaxy: reference-band total mag 19-23, z 0.05-0.4, ring radius 1-3 arcsec,
    2-6 blue knots, a red (E template) nucleus 1.5-4 mag fainter than the ring.
    bandpasses: band -> GalSim bandpass file; ref_band: a key of bandpasses."""
    ref_bp = _ref_bp(bandpasses, ref_band)
    m, z = float(rng.uniform(19, 23)), float(rng.uniform(0.05, 0.4))
    dm = float(rng.uniform(1.5, 4.0))
    f_ring = 1.0 / (1.0 + 10 ** (-0.4 * dm))
    R = float(rng.uniform(1.0, 3.0))
    nk = int(rng.integers(2, 7))
    fr = rng.dirichlet(np.ones(nk)) * rng.uniform(0.15, 0.4)
    off = rng.uniform(0.05, 0.25) * R
    a = rng.uniform(0, 2 * np.pi)
    return RingGalaxy(
        id=id, ra=ra, dec=dec, z=z,
        ring_mag=seds.band_mags(m - 2.5 * np.log10(f_ring), "Im", z, bandpasses, ref_bp),
        nucleus_mag=seds.band_mags(m - 2.5 * np.log10(1 - f_ring), "E", z, bandpasses, ref_bp),
        ring_radius=R, ring_width=float(R * rng.uniform(0.06, 0.15)), q=float(rng.uniform(0.5, 1.0)),
        pa=float(rng.uniform(0, 180)), knot_angles=tuple(float(v) for v in rng.uniform(0, 360, nk)),
        knot_fracs=tuple(float(v) for v in fr), knot_sigma=float(rng.uniform(0.08, 0.2)),
        nucleus_hlr=float(rng.uniform(0.1, 0.3)), nucleus_dx=float(off * np.cos(a)),
        nucleus_dy=float(off * np.sin(a)), anomaly_id=id)


def sample_merger(rng: np.random.Generator, id: int, ra: float, dec: float,
                  bandpasses: dict[str, str], ref_band: str) -> Merger:
    """Draw a merger: reference-band total mag 19-23, z 0.05-0.4, nuclei 0.8-3 arcsec apart with
    flux ratio 0.3-1, tails (Scd colours) carrying 10-25% of the light, 3-8 arcsec long."""
    ref_bp = _ref_bp(bandpasses, ref_band)
    m, z = float(rng.uniform(19, 23)), float(rng.uniform(0.05, 0.4))
    ft, ratio = float(rng.uniform(0.10, 0.25)), float(rng.uniform(0.3, 1.0))
    f1 = (1 - ft) / (1 + ratio)
    g1 = _bulge_disk(rng, id, ra, dec, m - 2.5 * np.log10(f1), z, str(rng.choice(["Sbc", "Scd"])),
                     bandpasses, ref_band, id)
    g2 = _bulge_disk(rng, id, ra, dec, m - 2.5 * np.log10(f1 * ratio), z,
                     str(rng.choice(["E", "Sbc", "Scd"])), bandpasses, ref_band, id)
    sep, a = float(rng.uniform(0.8, 3.0)), float(rng.uniform(0, 2 * np.pi))
    w1 = ratio / (1 + ratio)  # centre at the flux-weighted barycentre of the nuclei
    dx, dy = sep * np.cos(a), sep * np.sin(a)
    L = float(rng.uniform(3.0, 8.0))
    return Merger(id=id, ra=ra, dec=dec, gal1=g1, gal2=g2, dx1=float(dx * w1), dy1=float(dy * w1),
                  dx2=float(-dx * (1 - w1)), dy2=float(-dy * (1 - w1)), z=z,
                  tail_mag=seds.band_mags(m - 2.5 * np.log10(ft), "Scd", z, bandpasses, ref_bp),
                  tail_length=L, tail_curvature=float(L * rng.uniform(1.0, 2.0)),
                  tail_angle=float(np.degrees(a) + rng.uniform(-70, 70)),
                  tail_sense=int(rng.choice([-1, 1])), tail_width=float(rng.uniform(0.2, 0.5)),
                  n_tail_knots=int(rng.integers(1, 5)), tail_seed=int(rng.integers(2**31)), anomaly_id=id,
                  tail_start=float(np.clip(0.5 * (g1.hlr_disk + g2.hlr_disk), 0.3, 2.0)))


# ----------------------------------------------------------------------------- artefacts


def _check_image(image) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 2 or not np.issubdtype(image.dtype, np.floating):
        raise ValueError("image must be a 2-d floating-point numpy array (ny, nx)")


def _trail(x0, y0, x1, y1, sigma_pix, surface_brightness) -> dict:
    if not sigma_pix > 0 or not np.isfinite(surface_brightness) or surface_brightness < 0:
        raise ValueError("satellite trail: need sigma_pix > 0 and finite surface_brightness >= 0")
    if x0 == x1 and y0 == y1:
        raise ValueError("satellite trail: the two end points coincide")
    L = math.hypot(x1 - x0, y1 - y0)
    return dict(type="satellite_trail", x=(x0 + x1) / 2, y=(y0 + y1) / 2, x0=x0, y0=y0, x1=x1, y1=y1,
                sigma_pix=sigma_pix, surface_brightness=surface_brightness, amplitude=surface_brightness,
                length=L, npix=int(round(6 * sigma_pix * L)))


def _paint_trail(image, e, nsig=5.0) -> None:
    steep = abs(e["y1"] - e["y0"]) > abs(e["x1"] - e["x0"])
    img, (a0, b0, a1, b1) = ((image.T, (e["y0"], e["x0"], e["y1"], e["x1"])) if steep
                             else (image, (e["x0"], e["y0"], e["x1"], e["y1"])))
    nb, na = img.shape  # a runs along the trail's major direction (columns of img)
    sig, reach = e["sigma_pix"], nsig * e["sigma_pix"]
    cols = np.arange(max(0, math.floor(min(a0, a1) - reach)), min(na, math.ceil(max(a0, a1) + reach) + 1))
    da, db = a1 - a0, b1 - b0
    h = int(math.ceil(reach * math.hypot(1, db / da))) + 1
    rows = np.rint(b0 + (cols - a0) * db / da).astype(int)[:, None] + np.arange(-h, h + 1)[None, :]
    cc = np.broadcast_to(cols[:, None], rows.shape)
    t = np.clip(((cc - a0) * da + (rows - b0) * db) / (da**2 + db**2), 0, 1)  # nearest segment point
    d2 = (cc - a0 - t * da) ** 2 + (rows - b0 - t * db) ** 2
    ok = (rows >= 0) & (rows < nb) & (d2 <= reach**2)
    img[rows[ok], cc[ok]] += (e["surface_brightness"] * np.exp(-0.5 * d2[ok] / sig**2)).astype(image.dtype)


def add_satellite_trail(image: np.ndarray, x0: float, y0: float, x1: float, y1: float,
                        sigma_pix: float, surface_brightness: float) -> dict:
    """Add, in place, a straight trail from (x0, y0) to (x1, y1) (pixels) with a Gaussian
    cross-section of sigma `sigma_pix` pixels and peak `surface_brightness` ADU/pixel on its axis:
    it carries surface_brightness * sqrt(2 pi) * sigma_pix ADU per pixel of length. Only pixels
    within 5 sigma of the segment are touched (a strip, so 4096^2 images stay cheap)."""
    _check_image(image)
    e = _trail(*(float(v) for v in (x0, y0, x1, y1, sigma_pix, surface_brightness)))
    _paint_trail(image, e)
    return e


def _draw_cosmic_ray(rng, shape, sky_sigma, amp_range=(20.0, 500.0), worm_frac=0.4, max_length=15.0) -> dict:
    """Parameters of one cosmic ray (pixels); its pixels follow from them via _cosmic_ray_pixels."""
    worm = rng.uniform() < worm_frac
    L = float(rng.uniform(2.0, max_length)) if worm else 0.0
    ang = float(rng.uniform(0, 180))
    x0, y0 = float(rng.uniform(0, shape[1] - 1)), float(rng.uniform(0, shape[0] - 1))
    amp = float(np.exp(rng.uniform(*np.log(amp_range))) * sky_sigma)
    e = dict(type="cosmic_ray", shape="worm" if worm else "hit", x0=x0, y0=y0, length_pix=L,
             angle_deg=ang, amplitude=amp, seed=int(rng.integers(2**31)))
    ys, xs, _ = _cosmic_ray_pixels(e, shape)
    return dict(e, x=float(xs.mean()) if len(xs) else x0, y=float(ys.mean()) if len(ys) else y0, npix=len(xs))


def _cosmic_ray_pixels(cr: dict, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ys, xs, values ADU) of a cosmic-ray entry; deterministic from its parameters and seed."""
    r = np.random.default_rng(cr["seed"])
    A, L = cr["amplitude"], cr["length_pix"]
    if L < 1:  # single hit, sometimes spilling a little into 1-2 neighbours
        ix, iy, nb = round(cr["x0"]), round(cr["y0"]), int(r.integers(0, 3))
        off = np.array([(0, 1), (1, 0), (0, -1), (-1, 0)])[r.permutation(4)[:nb]]
        xs, ys = np.r_[ix, ix + off[:, 0]], np.r_[iy, iy + off[:, 1]]
        vals = np.r_[A, A * r.uniform(0.05, 0.3, nb)]
    else:  # worm: the pixels a straight track crosses, with fluctuating deposits
        s, a = np.arange(0.0, L + 1e-9, 0.25), math.radians(cr["angle_deg"])
        pts = np.unique(np.rint(np.c_[cr["x0"] + s * math.cos(a), cr["y0"] + s * math.sin(a)]).astype(int), axis=0)
        xs, ys, vals = pts[:, 0], pts[:, 1], A * r.uniform(0.4, 1.0, len(pts))
    ok = (xs >= 0) & (xs < shape[1]) & (ys >= 0) & (ys < shape[0])
    return ys[ok], xs[ok], vals[ok]


def add_cosmic_rays(image: np.ndarray, rng: np.random.Generator, n: int, sky_sigma: float,
                    amp_range: tuple[float, float] = (20.0, 500.0), worm_frac: float = 0.4,
                    max_length: float = 15.0) -> list[dict]:
    """Add, in place, n unconvolved cosmic rays: single/few-pixel hits and straight worms
    2-max_length pixels long at random angles, peak log-uniform in amp_range x sky_sigma ADU.
    Entries store a seed: `apply_artefacts` reproduces the same pixels."""
    _check_image(image)
    if n < 0 or not sky_sigma > 0 or not 0 < amp_range[0] <= amp_range[1] or not 0 <= worm_frac <= 1:
        raise ValueError("add_cosmic_rays: need n >= 0, sky_sigma > 0, 0 < amp_range[0] <= amp_range[1]")
    out = [_draw_cosmic_ray(rng, image.shape, sky_sigma, amp_range, worm_frac, max_length) for _ in range(int(n))]
    for e in out:
        _paint(image, e, "")
    return out


def _ghost(x, y, radius_pix, width_pix, amplitude, edge_pix=2.0) -> dict:
    if not (radius_pix > 0 and 0 < width_pix < 2 * radius_pix and edge_pix > 0 and amplitude >= 0):
        raise ValueError("ghost: need radius_pix > 0, 0 < width_pix < 2 radius_pix, edge_pix > 0, amplitude >= 0")
    return dict(type="ghost", x=x, y=y, radius_pix=radius_pix, width_pix=width_pix, edge_pix=edge_pix,
                amplitude=amplitude, flux=amplitude * 2 * np.pi * radius_pix * width_pix,
                npix=int(2 * np.pi * radius_pix * width_pix))


def add_ghost(image: np.ndarray, x: float, y: float, radius_pix: float, width_pix: float,
              amplitude: float, edge_pix: float = 2.0) -> dict:
    """Add, in place, an out-of-focus pupil ghost centred at (x, y) pixels: a flat annulus of mean
    radius radius_pix and radial width width_pix (its hole is the central obscuration),
    `amplitude` ADU/pixel on the flat part, edges smoothed by error-function ramps of sigma
    edge_pix. Entry's flux (ADU) is amplitude x annulus area."""
    _check_image(image)
    e = _ghost(*(float(v) for v in (x, y, radius_pix, width_pix, amplitude, edge_pix)))
    _paint(image, e, "")
    return e


def _hot_cluster(rng, shape) -> list[list[int]]:
    """1-4 edge-adjacent pixels [x, y] at a random place."""
    ny, nx = shape
    pix = [[int(rng.integers(0, nx)), int(rng.integers(0, ny))]]
    for _ in range(int(rng.integers(0, 4))):
        bx, by = pix[int(rng.integers(len(pix)))]
        dx, dy = [(1, 0), (-1, 0), (0, 1), (0, -1)][int(rng.integers(4))]
        p = [min(max(bx + dx, 0), nx - 1), min(max(by + dy, 0), ny - 1)]
        if p not in pix:
            pix.append(p)
    return pix


def _hot(rng, shape, amplitude_range) -> dict:
    pix = _hot_cluster(rng, shape)
    amp = float(np.exp(rng.uniform(*np.log(amplitude_range))))
    return dict(type="hot_pixels", x=float(np.mean([p[0] for p in pix])), y=float(np.mean([p[1] for p in pix])),
                pixels=pix, amplitude=amp, npix=len(pix))


def add_hot_pixels(image: np.ndarray, rng: np.random.Generator, n_clusters: int,
                   amplitude_range: tuple[float, float]) -> list[dict]:
    """Add, in place, n_clusters clusters of 1-4 edge-adjacent pixels ("pixels": [[x, y], ...]),
    each at a constant excess log-uniform in amplitude_range (ADU)."""
    _check_image(image)
    if n_clusters < 0 or not 0 < amplitude_range[0] <= amplitude_range[1]:
        raise ValueError("add_hot_pixels: need n_clusters >= 0 and 0 < amplitude_range[0] <= amplitude_range[1]")
    out = [_hot(rng, image.shape, amplitude_range) for _ in range(int(n_clusters))]
    for e in out:
        _paint(image, e, "")
    return out


def _amp(nx, ny, x_start, x_stop, offset, gradient) -> dict:
    if not 0 <= x_start < x_stop <= nx:
        raise ValueError(f"amp offset: need 0 <= x_start < x_stop <= {nx}, got {x_start}, {x_stop}")
    return dict(type="amp_offset", x=(x_start + x_stop - 1) / 2, y=(ny - 1) / 2, x_start=int(x_start),
                x_stop=int(x_stop), offset=float(offset), gradient=float(gradient), amplitude=float(offset),
                npix=int(ny * (x_stop - x_start)))


def add_amp_offset(image: np.ndarray, x_start: int, x_stop: int, offset: float, gradient: float = 0.0) -> dict:
    """Add, in place, offset + gradient * (y - (ny-1)/2) ADU (gradient in ADU per row) to the
    columns [x_start, x_stop): an amplifier with a bias/gain jump."""
    _check_image(image)
    e = _amp(image.shape[1], image.shape[0], x_start, x_stop, offset, gradient)
    _paint(image, e, "")
    return e


def _paint(image: np.ndarray, a: dict, band: str, rng=None) -> None:
    t = a.get("type")
    if t == "satellite_trail":
        _paint_trail(image, a)
    elif t == "cosmic_ray":
        if "seed" not in a:
            if rng is None:
                raise ValueError("apply_artefacts: a cosmic ray without seed needs an rng")
            a = dict(a, seed=int(rng.integers(2**31)))
        ys, xs, vals = _cosmic_ray_pixels(a, image.shape)
        image[ys, xs] += vals.astype(image.dtype)
    elif t == "ghost":
        amp = a.get("amplitude_by_band", {}).get(band, a["amplitude"])
        r_in, r_out, edge = a["radius_pix"] - a["width_pix"] / 2, a["radius_pix"] + a["width_pix"] / 2, a["edge_pix"]
        R, (ny, nx), x, y = r_out + 5 * edge, image.shape, a["x"], a["y"]
        y0, y1, x0, x1 = max(0, int(y - R)), min(ny, int(y + R) + 2), max(0, int(x - R)), min(nx, int(x + R) + 2)
        if y0 < y1 and x0 < x1:
            yy, xx = np.mgrid[y0:y1, x0:x1]
            r = np.hypot(xx - x, yy - y)
            image[y0:y1, x0:x1] += (amp * ndtr((r_out - r) / edge) * ndtr((r - r_in) / edge)).astype(image.dtype)
    elif t == "hot_pixels":
        p = np.asarray(a["pixels"], int)
        image[p[:, 1], p[:, 0]] += a["amplitude"]
    elif t == "amp_offset":
        ny = image.shape[0]
        ramp = a["offset"] + a.get("gradient", 0.0) * (np.arange(ny) - (ny - 1) / 2.0)
        image[:, a["x_start"]:a["x_stop"]] += ramp[:, None].astype(image.dtype)
    else:
        raise ValueError(f"apply_artefacts: unknown artefact type {t!r}")


def sample_field_artefacts(rng: np.random.Generator, cfg, shape: tuple[int, int], bands: list[str],
                           sky_sigma: dict[str, float], psf_sigma_pix: dict[str, float],
                           bright_stars: list[tuple[float, float, float]], field_id: int) -> list[dict]:
    """Decide one field's artefacts. cfg: ArtefactConfig; shape (ny, nx); sky_sigma (ADU) and
    psf_sigma_pix (pixels) per band; bright_stars: (x, y, flux) of the saturated stars, flux in
    ADU in the reference band (or a dict band -> ADU, giving each band its own ghost amplitude). Returns plain JSON-friendly dicts with anomaly_id (field_id*100000 + k),
    field_id, type, band (a band, or "all" for ghosts), x, y (pixels; midpoint for trails),
    amplitude, npix and the parameters `apply_artefacts` needs. Deterministic given rng."""
    ny, nx = shape
    missing = [b for b in bands if b not in sky_sigma or b not in psf_sigma_pix]
    if missing or ny < 8 or nx < 8 or not bands:
        raise ValueError(f"sample_field_artefacts: bad shape {shape}, no bands, or no sky_sigma/psf_sigma_pix for {missing}")
    out: list[dict] = []

    def push(entry, band):
        out.append(dict(entry, anomaly_id=int(field_id) * 100000 + len(out), band=band, field_id=int(field_id)))

    def edge_point(edge):
        t = rng.uniform()
        return [(t * (nx - 1), -0.5), (t * (nx - 1), ny - 0.5), (-0.5, t * (ny - 1)), (nx - 0.5, t * (ny - 1))][edge]

    for _ in range(int(rng.poisson(cfg.satellite_trails))):  # each trail in one band
        b = bands[int(rng.integers(len(bands)))]
        e1, e2 = rng.choice(4, 2, replace=False)
        (x0, y0), (x1, y1) = edge_point(e1), edge_point(e2)
        sb = float(np.exp(rng.uniform(np.log(2), np.log(50))) * sky_sigma[b])
        push(_trail(float(x0), float(y0), float(x1), float(y1), float(psf_sigma_pix[b]), sb), b)
    cx, cy, p = (nx - 1) / 2, (ny - 1) / 2, cfg.ghosts_per_bright_star
    for sx, sy, flux in bright_stars:  # ghosts offset from the star, away from the optical axis
        for _ in range(int(p) + int(rng.uniform() < p - int(p))):
            rad = float(rng.uniform(30, 80))
            width, k = rad * float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.05, 0.3))
            dx, dy = (sx - cx) * k, (sy - cy) * k
            if math.hypot(dx, dy) < 10:
                a = rng.uniform(0, 2 * np.pi)
                dx, dy = 10 * math.cos(a), 10 * math.sin(a)
            frac = float(np.exp(rng.uniform(np.log(1e-4), np.log(1e-3)))) / (2 * np.pi * rad * width)
            per_band = {b: float(f) * frac for b, f in flux.items()} if isinstance(flux, dict) else {}
            amp = float(np.mean(list(per_band.values()))) if per_band else float(flux) * frac
            e = dict(_ghost(float(sx + dx), float(sy + dy), rad, width, amp), star_x=float(sx), star_y=float(sy))
            push(dict(e, amplitude_by_band=per_band) if per_band else e, "all")
    for b in bands:
        for _ in range(int(cfg.cosmic_rays)):
            push(_draw_cosmic_ray(rng, shape, sky_sigma[b]), b)
        for _ in range(int(cfg.hot_pixel_clusters)):
            push(_hot(rng, shape, (30 * sky_sigma[b], 300 * sky_sigma[b])), b)
        if rng.uniform() < cfg.amp_artefact_prob:  # one of 4 amplifiers across the width
            namp = 4 if nx >= 64 else 1
            k = int(rng.integers(namp))
            off = float(rng.choice([-1, 1]) * rng.uniform(0.5, 3.0) * sky_sigma[b])
            push(_amp(nx, ny, k * nx // namp, (k + 1) * nx // namp, off, float(rng.uniform(-0.5, 0.5) * off / ny)), b)
    return out


def apply_artefacts(image: np.ndarray, band: str, artefacts: list[dict],
                    rng: np.random.Generator | None = None) -> None:
    """Paint, in place, the entries of `artefacts` whose band is `band` or "all" onto `image`
    (ny, nx) in ADU. Everything follows from the entries (cosmic rays from their seed), so rng
    is only used for cosmic-ray entries that lack a seed. A ghost may carry amplitude_by_band."""
    _check_image(image)
    for a in artefacts:
        if a.get("band") in (band, "all"):
            _paint(image, a, band, rng)
