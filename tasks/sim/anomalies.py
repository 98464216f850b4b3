"""Astrophysical anomalies the GAN anomaly scorer must find (cf. Storey-Fisher et al. 2021,
MNRAS 508, 2946): sky sources following the protocol of ``tasks.sim.sources`` (``profile(band,
zeropoint)`` in ADU before the PSF, centred on (0, 0) arcsec, +x west, +y north): collisional ring
galaxies (`RingGalaxy`) and mergers with tidal tails (`Merger`). Instrumental artefacts are in
``tasks.sim.artefacts``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import galsim
import numpy as np

from ..astro import band_mags
from deepfield.tasks.sim.sources import Galaxy, array_profile, mag_to_flux

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
    mb = band_mags(ref_mag - 2.5 * np.log10(fb), "E", z, bandpasses, ref_bp)
    md = band_mags(ref_mag - 2.5 * np.log10(1 - fb), template, z, bandpasses, ref_bp)
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
        ring_mag=band_mags(m - 2.5 * np.log10(f_ring), "Im", z, bandpasses, ref_bp),
        nucleus_mag=band_mags(m - 2.5 * np.log10(1 - f_ring), "E", z, bandpasses, ref_bp),
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
                  tail_mag=band_mags(m - 2.5 * np.log10(ft), "Scd", z, bandpasses, ref_bp),
                  tail_length=L, tail_curvature=float(L * rng.uniform(1.0, 2.0)),
                  tail_angle=float(np.degrees(a) + rng.uniform(-70, 70)),
                  tail_sense=int(rng.choice([-1, 1])), tail_width=float(rng.uniform(0.2, 0.5)),
                  n_tail_knots=int(rng.integers(1, 5)), tail_seed=int(rng.integers(2**31)), anomaly_id=id,
                  tail_start=float(np.clip(0.5 * (g1.hlr_disk + g2.hlr_disk), 0.3, 2.0)))
