"""Where the store's fields lie on the sky: each field's WCS and footprint from its group attributes, which
fields may cover sky near which (tasks/provenance.py's run keys, the cluster stage's neighbours, the report),
and the fields as tasks.tiling.SkyField for sky ownership where they overlap (the merge)."""
from __future__ import annotations

from .zarr_store import attrs_to_header, complete_fields

__all__ = ["field_wcs", "field_footprint", "fields_near", "neighbours_within", "sky_fields"]


def field_wcs(attrs):
    """The astropy WCS of a field from its group attributes."""
    from astropy.wcs import WCS
    return WCS(attrs_to_header(attrs["wcs_header"]))


def field_footprint(attrs) -> tuple[float, float, float]:
    """(ra, dec) of a field's centre (deg) and the radius of the circle through its corners (arcsec), from its
    group attributes."""
    import numpy as np
    _, ny, nx = attrs["shape"]
    ra, dec = field_wcs(attrs).pixel_to_world_values((nx - 1) / 2.0, (ny - 1) / 2.0)
    return float(ra), float(dec), 0.5 * float(np.hypot(nx, ny)) * float(attrs["pixel_scale"])


def _grow(margin_arcsec: float) -> float:
    """What two fields' corner circles are grown by in fields_near's test (arcsec): the margin's diagonal and 1'
    for distortion."""
    return margin_arcsec * 2 ** 0.5 + 60.0


def fields_near(footprints: dict[str, tuple[float, float, float]], name: str, margin_arcsec: float) -> list[str]:
    """The fields of `footprints` (name -> field_footprint) other than `name` that may cover sky within
    `margin_arcsec` of field `name`: their corner circles, grown by the margin's diagonal and 1' for distortion,
    meet."""
    import numpy as np

    from .astro import separation_arcsec
    others = [n for n in footprints if n != name]
    if not others or name not in footprints:
        return []
    ra, dec, r = footprints[name]
    fp = np.array([footprints[n] for n in others])
    near = separation_arcsec(ra, dec, fp[:, 0], fp[:, 1]) < r + fp[:, 2] + _grow(margin_arcsec)
    return [n for n, k in zip(others, near) if k]


def neighbours_within(footprints: dict[str, tuple[float, float, float]], margin_arcsec: float,
                      direct_below: int = 256) -> dict[str, list[str]]:
    """For every field of `footprints`, the others that fields_near gives (the same test), sorted, found for all
    fields at once: astropy's search_around_sky (a KD-tree of unit vectors) pairs the centres within the largest
    distance the test can pass, and the test then runs on those pairs alone: O(n log n) in the number of fields
    rather than fields_near's comparison of every pair (10^11 pairs for a Rubin-sized survey, issue 22). Under
    `direct_below` fields every pair is tested at once instead (at most 65,000 pairs by default): the KD-tree's
    import alone (scipy.spatial, 0.3-0.5 s) is most of a small survey's run keys, on `deepfield run`'s start-up."""
    import numpy as np

    from .astro import separation_arcsec
    names = list(footprints)
    out: dict[str, list[str]] = {n: [] for n in names}
    if len(names) < 2:
        return out
    fp = np.array([footprints[n] for n in names], float)
    grow = _grow(margin_arcsec)
    if len(names) < direct_below:
        i, j = np.nonzero(~np.eye(len(names), dtype=bool))
    else:
        from astropy import units as u
        from astropy.coordinates import SkyCoord
        sky = SkyCoord(fp[:, 0] * u.deg, fp[:, 1] * u.deg)
        i, j, _, _ = sky.search_around_sky(sky, (2 * fp[:, 2].max() + grow) * u.arcsec)
    keep = i != j
    i, j = i[keep], j[keep]
    near = separation_arcsec(fp[i, 0], fp[i, 1], fp[j, 0], fp[j, 1]) < fp[i, 2] + fp[j, 2] + grow
    for a, b in zip(i[near], j[near]):
        out[names[a]].append(names[b])
    return {n: sorted(v) for n, v in out.items()}


def sky_fields(root) -> list:
    """tasks.tiling.SkyField of every complete field (for sky ownership where fields overlap)."""
    from .tiling import SkyField
    out = []
    for name in complete_fields(root):
        g = root["fields"][name]
        _, ny, nx = g.attrs["shape"]
        out.append(SkyField(name=name, wcs=field_wcs(g.attrs), ny=int(ny), nx=int(nx)))
    return out
