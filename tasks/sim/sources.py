"""Sky sources of the simulator: the objects a scene is made of.

Every sky source has `id`, `kind`, `ra`, `dec` (deg, ICRS), `mag` (total AB magnitude per band)
and a method ``profile(band, zeropoint) -> galsim.GSObject`` giving its surface brightness before
the PSF, in ADU for that zero point, centred on (0, 0) in arcsec with north up and east left
(so +x on the sky plane is west, matching the images, whose RA grows to the left).
``truth()`` returns the columns the truth catalog records for it.

Position angles are east of north, in degrees, as astronomers quote them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import galsim
import numpy as np


def mag_to_flux(mag: float, zeropoint: float) -> float:
    """ADU of an AB magnitude for an image with MAGZERO = zeropoint."""
    return float(10.0 ** (-0.4 * (mag - zeropoint)))


def pa_to_beta(pa_deg: float) -> galsim.Angle:
    """GalSim shear angle (from +x, counter-clockwise) of a position angle east of north."""
    return (90.0 + pa_deg) * galsim.degrees


def array_profile(surface: np.ndarray, scale: float, flux: float) -> galsim.GSObject:
    """A GalSim profile from a sampled surface brightness map.

    surface: 2-d array (ny, nx) sampled on a grid of `scale` arcsec centred on the source, row 0 at
    the south; it is normalised to total `flux`. Used for sources GalSim has no analytic profile
    for (lensed arcs, rings, tidal tails). Sample it finer than the pixels (e.g. scale = pixel/3).
    """
    total = float(surface.sum())
    if not np.isfinite(total) or total <= 0:
        raise ValueError("array_profile: surface brightness map must have a positive finite sum")
    img = galsim.Image(np.ascontiguousarray(surface, dtype=np.float64), scale=scale)
    return galsim.InterpolatedImage(img, flux=flux, x_interpolant="lanczos5", normalization="flux")


@dataclass
class Galaxy:
    """A bulge + disk galaxy: Sersic bulge (index n_bulge) and exponential disk, sharing a centre
    and position angle, with per-band bulge fractions (so colour gradients follow from the
    bulge being redder than the disk)."""

    id: int
    ra: float
    dec: float
    mag: dict[str, float]
    bulge_frac: dict[str, float]
    hlr_disk: float  # arcsec
    hlr_bulge: float  # arcsec
    q_disk: float
    q_bulge: float
    pa: float  # deg east of north
    z: float
    sed: str  # template family of the disk: E, Sbc, Scd, Im
    n_bulge: float = 4.0
    kind: str = "galaxy"
    cluster_id: int = -1
    lens_id: int = -1
    pair_id: int = -1
    anomaly_id: int = -1

    def profile(self, band: str, zeropoint: float) -> galsim.GSObject:
        flux = mag_to_flux(self.mag[band], zeropoint)
        fb = float(np.clip(self.bulge_frac[band], 0.0, 1.0))
        beta = pa_to_beta(self.pa)
        parts = []
        if fb < 1.0:
            disk = galsim.Exponential(half_light_radius=self.hlr_disk, flux=flux * (1.0 - fb))
            parts.append(disk.shear(q=self.q_disk, beta=beta))
        if fb > 0.0:
            bulge = galsim.Sersic(n=self.n_bulge, half_light_radius=self.hlr_bulge, flux=flux * fb,
                                  trunc=0.0)
            parts.append(bulge.shear(q=self.q_bulge, beta=beta))
        return parts[0] if len(parts) == 1 else galsim.Add(parts)

    @property
    def size(self) -> float:
        """Approximate half-light radius, arcsec: the component radii weighted by the bulge fraction
        averaged over bands (used for stamp sizes and blend footprints)."""
        fb = float(np.mean(list(self.bulge_frac.values())))
        return fb * self.hlr_bulge + (1 - fb) * self.hlr_disk

    def truth(self) -> dict:
        return dict(id=self.id, kind=self.kind, ra=self.ra, dec=self.dec, z=self.z, sed=self.sed,
                    hlr=self.size, hlr_disk=self.hlr_disk, hlr_bulge=self.hlr_bulge, q=self.q_disk,
                    pa=self.pa, n_bulge=self.n_bulge, cluster_id=self.cluster_id,
                    lens_id=self.lens_id, pair_id=self.pair_id, anomaly_id=self.anomaly_id)


@dataclass
class Star:
    """A point source: the PSF scaled to its flux."""

    id: int
    ra: float
    dec: float
    mag: dict[str, float]
    kind: str = "star"
    anomaly_id: int = -1
    extra: dict = field(default_factory=dict)

    def profile(self, band: str, zeropoint: float) -> galsim.GSObject:
        return galsim.DeltaFunction(flux=mag_to_flux(self.mag[band], zeropoint))

    @property
    def size(self) -> float:
        return 0.0

    def truth(self) -> dict:
        return dict(id=self.id, kind=self.kind, ra=self.ra, dec=self.dec, z=0.0, sed="star", hlr=0.0,
                    hlr_disk=0.0, hlr_bulge=0.0, q=1.0, pa=0.0, n_bulge=0.0, cluster_id=-1,
                    lens_id=-1, pair_id=-1, anomaly_id=self.anomaly_id)
