"""Row-level pieces of the merge, as plain functions over pandas DataFrames (one Dask partition):
stable source ids and field-level de-duplication (docs/design.md, "Contracts": Tile and Catalog rows).

- `source_ids`: a deterministic 63-bit id from (field, tile, tile_index): the first 8 bytes of the
  BLAKE2b digest of "field\\x1ftile\\x1ftile_index", big-endian, masked to 63 bits so that it is a
  non-negative int64. The same tile outputs give the same ids on every re-run and every machine.
- `FieldOwnership`: where fields overlap on the sky, a source is measured in each of them; the field
  that owns its position (`tasks.tiling.owner`: among the fields containing it, the one whose centre
  is nearest) keeps it. `flag(df)` adds the bool column `is_primary_field` (True where the row's own
  field owns its position). A position no field contains (possible only through round-off at a field
  edge) stays primary in its own field, so a source primary in its tile is never lost.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from astropy.coordinates import SkyCoord

from deepfield.tasks.tiling import SkyField, owner

__all__ = ["source_id", "source_ids", "FieldOwnership", "ID_MASK"]

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

    def flag(self, df: pd.DataFrame) -> pd.DataFrame:
        """Copy of `df` with the bool column `is_primary_field`; ValueError for an unknown field."""
        field = df["field"].astype(str).to_numpy(dtype=object)
        unknown = sorted(set(field) - set(self.names))
        if unknown:
            tiles = sorted(set(df.loc[df["field"].astype(str).isin(unknown), "tile"].astype(str)))[:5]
            raise ValueError(f"rows of fields {unknown} (tiles {tiles}) but these fields are not among "
                             f"the SkyFields given to the merge ({list(self.names)})")
        own = self.owner_names(df["ra"].to_numpy(float), df["dec"].to_numpy(float))
        nobody = np.array([o is None for o in own], dtype=bool)
        out = df.copy()
        out["is_primary_field"] = nobody | (own == field)
        return out
