"""Row-level pieces of the merge, as plain functions over pandas DataFrames (one Dask partition):
stable source ids and field-level de-duplication (docs/design.md, "Contracts": Tile and Catalog rows).

- `source_ids`: a deterministic 63-bit id from (field, tile, tile_index): the first 8 bytes of the
  BLAKE2b digest of "field\\x1ftile\\x1ftile_index", big-endian, masked to 63 bits so that it is a
  non-negative int64. The same tile outputs give the same ids on every re-run and every machine.
- `overlap_decisions`: where fields overlap on the sky, a source is measured in each of them. The
  measurements of the different fields are matched (within 1") and the object is kept once: by the field
  that owns the mean of its measured positions (`FieldOwnership`, i.e. `tasks.tiling.owner`: among the
  fields containing it, the one whose centre is nearest), or by the nearest field that detected it when
  the owner did not; a detection of one field alone is kept where that field owns its position. Ownership is decided per object, not per measurement, so noise in the measured positions near the
  line between two fields can neither lose an object nor keep it twice; `is_primary_field` records it.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from astropy import units as u
from astropy.coordinates import SkyCoord

from deepfield.tasks.astro import unit_vectors
from deepfield.tasks.tiling import SkyField, owner

__all__ = ["source_id", "source_ids", "FieldOwnership", "overlap_decisions", "ID_MASK"]

ID_MASK = (1 << 63) - 1


def source_id(field: str, tile: str, tile_index: int) -> int:
    """Stable 63-bit id (non-negative int64) of the row `tile_index` of tile `tile` in `field`."""
    key = f"{field}\x1f{tile}\x1f{int(tile_index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") & ID_MASK


def source_ids(df: pd.DataFrame) -> np.ndarray:
    """`source_id` of every row of `df` (columns field, tile, tile_index), as int64."""
    it = zip(df["field"].astype(str), df["tile"].astype(str), df["tile_index"].astype("int64"))
    return np.fromiter((source_id(f, t, i) for f, t, i in it), dtype=np.int64, count=len(df))


class FieldOwnership:
    """Vectorised `tasks.tiling.owner` over a partition, restricted to the fields that can matter.

    Only fields whose footprint (a cap of the centre-to-corner radius) can reach the partition's
    positions are tested, so the cost per partition does not grow with the size of the survey.
    Field order is preserved, so ties go to the lower index as in `owner`.
    """

    def __init__(self, fields: list[SkyField]):
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError(f"field names must be unique, got {names}")
        self.fields = list(fields)
        self.names = np.array(names, dtype=object)
        centres = [f.centre for f in fields]
        self._ra = np.array([c.ra.deg for c in centres])
        self._dec = np.array([c.dec.deg for c in centres])
        self._radius = np.array([self._cap_radius(f) for f in fields])

    @staticmethod
    def _cap_radius(f: SkyField) -> float:
        xs = np.array([-0.5, f.nx - 0.5, -0.5, f.nx - 0.5])
        ys = np.array([-0.5, -0.5, f.ny - 0.5, f.ny - 0.5])
        corners = f.wcs.pixel_to_world(xs, ys)
        return float(np.max(corners.separation(f.centre).deg))

    def candidates(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Indices of the fields whose footprint can hold any of the positions."""
        pos = SkyCoord(ra, dec, unit="deg")
        # a cap around the first position that holds every position of the partition
        c0 = pos[0]
        reach = float(np.max(pos.separation(c0).deg))
        sep = SkyCoord(self._ra, self._dec, unit="deg").separation(c0).deg
        return np.flatnonzero(sep <= reach + self._radius + 1e-6)

    def owner_names(self, ra, dec) -> np.ndarray:
        """Name of the owning field of each position (None where no field contains it)."""
        ra, dec = np.asarray(ra, float), np.asarray(dec, float)
        out = np.full(ra.shape, None, dtype=object)
        if ra.size == 0:
            return out
        cand = self.candidates(ra, dec)
        if cand.size:
            idx = owner(ra, dec, [self.fields[k] for k in cand])
            ok = idx >= 0
            out[ok] = self.names[cand[idx[ok]]]
        return out


MATCH_ARCSEC = 1.0  # two fields' measurements of one object lie closer than this (centroid errors <~0.3")
MARGIN_ARCSEC = 3.0  # rows this close to another field's footprint are matched across the fields


def _pixel_scale_arcsec(f: SkyField) -> float:
    from astropy.wcs.utils import proj_plane_pixel_scales
    return float(np.mean(proj_plane_pixel_scales(f.wcs.celestial)) * 3600.0)


def overlap_decisions(rows: pd.DataFrame, ownership: FieldOwnership, match_arcsec: float = MATCH_ARCSEC,
                      margin_arcsec: float = MARGIN_ARCSEC) -> pd.DataFrame:
    """Which rows of overlapping fields the catalog keeps, decided once per object.

    rows: the tile-primary rows of the run (field, tile, tile_index, ra, dec). The rows that lie in another
    field's footprint grown by `margin_arcsec` are matched across fields: measurements of different fields
    closer than `match_arcsec` are one object (connected components, so a chain of close pairs is one
    group). For each object the field that owns the mean position of its measurements (FieldOwnership: the
    nearest centre among the fields holding it) keeps its own measurements; if that field has none (it did
    not detect the object), the field nearest the mean position among those that did keeps them. A
    measurement that matches none of another field's is kept where its own field owns its position: the
    other field covers the spot and saw nothing (on a simulated survey such detections are mostly noise).
    So an object seen by two fields is kept exactly once whatever the noise of its measured positions.

    Returns (field, tile, tile_index, keep) for the rows near an overlap (rows elsewhere are all kept)."""
    from astropy.coordinates import SkyCoord
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    out_cols = ["field", "tile", "tile_index", "keep"]
    if len(rows) == 0 or len(ownership.fields) < 2:
        return pd.DataFrame(columns=out_cols)
    index = {n: k for k, n in enumerate(ownership.names)}
    field_idx = rows["field"].astype(str).map(index).to_numpy()
    if np.isnan(field_idx.astype(float)).any():
        unknown = sorted(set(rows["field"].astype(str)) - set(index))
        raise ValueError(f"rows of fields {unknown} but these fields are not among the SkyFields of the merge")
    ra, dec = rows["ra"].to_numpy(float), rows["dec"].to_numpy(float)
    near = np.zeros(len(rows), bool)
    # each field's WCS is asked only about the rows within its cap (centre-to-corner radius, grown by twice the
    # margin and 1' for distortion), found in a k-d tree of the rows' unit vectors: every other field's rows
    # through every field's WCS cost fields x rows (12 of a 1,000-field run's 86 s merge, 2026-12-06)
    from scipy.spatial import cKDTree
    tree = cKDTree(unit_vectors(ra, dec))
    for k, f in enumerate(ownership.fields):  # rows of other fields in f's grown footprint, and f's rows near them
        reach = np.radians(min(ownership._radius[k] + (2 * margin_arcsec + 60.0) / 3600.0, 180.0))
        cand = np.asarray(tree.query_ball_point(unit_vectors(ownership._ra[k], ownership._dec[k])[0],
                                                2 * np.sin(reach / 2)), dtype=np.int64)
        cand = np.sort(cand[field_idx[cand] != k])
        if not cand.size:
            continue
        hit = f.contains(ra[cand], dec[cand], margin_px=margin_arcsec / _pixel_scale_arcsec(f))
        near[cand[hit]] = True
    if not near.any():
        return pd.DataFrame(columns=out_cols)
    sel = np.flatnonzero(near)
    pos = SkyCoord(ra[sel], dec[sel], unit="deg")
    i, j, _, _ = pos.search_around_sky(pos, match_arcsec * u.arcsec)
    cross = field_idx[sel][i] != field_idx[sel][j]
    n = len(sel)
    graph = coo_matrix((np.ones(int(cross.sum())), (i[cross], j[cross])), shape=(n, n))
    n_groups, label = connected_components(graph, directed=False)
    xyz = np.asarray(pos.cartesian.xyz).T
    mean = np.zeros((n_groups, 3))
    np.add.at(mean, label, xyz)
    centre = SkyCoord(x=mean[:, 0], y=mean[:, 1], z=mean[:, 2], representation_type="cartesian").spherical
    g_ra, g_dec = np.asarray(centre.lon.deg) % 360.0, np.asarray(centre.lat.deg)
    owner_of_group = ownership.owner_names(g_ra, g_dec)
    fields_sel = rows["field"].astype(str).to_numpy()[sel]
    keep = np.zeros(n, bool)
    size = np.bincount(label, minlength=n_groups)
    alone = size[label] == 1  # seen by one field only: kept where that field owns the position (the
    own = ownership.owner_names(ra[sel][alone], dec[sel][alone])  # other saw nothing there: noise, mostly)
    keep[alone] = [o is None or o == f for o, f in zip(own, fields_sel[alone])]
    for g in np.flatnonzero(size > 1):
        members = np.flatnonzero(label == g)
        present = fields_sel[members]
        owner_name = owner_of_group[g]
        if owner_name is None or owner_name not in present:  # the owner did not detect it: nearest that did
            here = SkyCoord(g_ra[g], g_dec[g], unit="deg")
            owner_name = min(sorted(set(present)),
                             key=lambda name: float(here.separation(ownership.fields[index[name]].centre).deg))
        keep[members[present == owner_name]] = True
    out = rows.iloc[sel][["field", "tile", "tile_index"]].reset_index(drop=True)
    out["keep"] = keep
    return out
