"""Tiling geometry: tile ids, pixel boxes, the core/halo grid of a field, and sky ownership.

Conventions (docs/design.md, "Contracts", Tile):
- pixel centres are at integer coordinates; pixel i covers [i - 0.5, i + 0.5), so the pixel of a
  continuous coordinate c is floor(c + 0.5) and a field of n pixels spans [-0.5, n - 0.5);
- core (ty, tx) = [ty*T, (ty+1)*T) x [tx*T, (tx+1)*T) clipped to the field; the halo grows the
  core by H pixels on each side, clipped. Every field pixel lies in exactly one core;
- a source is primary in the tile whose core holds its centroid's pixel; where fields overlap on
  the sky, the field (among those containing the position) whose centre is nearest owns it, as
  Rubin's detect_isPrimary and legacypipe's brick_primary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS

from .astro import separation_arcsec

__all__ = ["TileId", "Box", "TileGrid", "SkyField", "owner", "is_primary_field", "pixel_index"]


@dataclass(frozen=True, order=True)
class TileId:
    field: str
    ty: int
    tx: int

    def __post_init__(self) -> None:
        if not isinstance(self.field, str) or not self.field:
            raise ValueError(f"TileId field must be a non-empty string, got {self.field!r}")
        for name in ("ty", "tx"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"TileId {name} must be a non-negative integer, got {v!r}")
            object.__setattr__(self, name, int(v))

    def __str__(self) -> str:
        return f"{self.field}/{self.ty}_{self.tx}"

    @classmethod
    def parse(cls, s: str) -> "TileId":
        """Inverse of str(): "field000/1_2" -> TileId("field000", 1, 2)."""
        field, sep, tail = s.rpartition("/")
        parts = tail.split("_")
        if not sep or len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"not a tile id (expected 'field/ty_tx'): {s!r}")
        return cls(field, int(parts[0]), int(parts[1]))


@dataclass(frozen=True)
class Box:
    """Half-open pixel box [y0, y1) x [x0, x1)."""

    y0: int
    y1: int
    x0: int
    x1: int

    def __post_init__(self) -> None:
        for name in ("y0", "y1", "x0", "x1"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.y1 < self.y0 or self.x1 < self.x0:
            raise ValueError(f"box with negative extent: {self}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def size(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)

    @property
    def slices(self) -> tuple[slice, slice]:
        """(slice_y, slice_x), for arr[..., sl_y, sl_x] or arr[box.slices] on a 2-d array."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def intersect(self, other: "Box") -> "Box":
        """Overlap of two boxes (an empty box, size 0, where they do not meet)."""
        y0, x0 = max(self.y0, other.y0), max(self.x0, other.x0)
        y1, x1 = max(y0, min(self.y1, other.y1)), max(x0, min(self.x1, other.x1))
        return Box(y0, y1, x0, x1)

    def contains(self, y, x) -> np.ndarray | bool:
        """Integer pixel indices (y, x) inside the box; vectorised over arrays."""
        y, x = np.asarray(y), np.asarray(x)
        out = (y >= self.y0) & (y < self.y1) & (x >= self.x0) & (x < self.x1)
        return bool(out) if out.ndim == 0 else out

    def contains_box(self, inner: "Box") -> bool:
        return (self.y0 <= inner.y0 and inner.y1 <= self.y1
                and self.x0 <= inner.x0 and inner.x1 <= self.x1)

    def offset_of(self, inner: "Box") -> tuple[slice, slice]:
        """Slices selecting `inner` from an array read over `self` (e.g. crop a halo read to its core)."""
        if not self.contains_box(inner):
            raise ValueError(f"{inner} is not inside {self}")
        return (slice(inner.y0 - self.y0, inner.y1 - self.y0),
                slice(inner.x0 - self.x0, inner.x1 - self.x0))


def pixel_index(coord) -> np.ndarray:
    """Index of the pixel holding a continuous coordinate: floor(coord + 0.5), computed exactly
    (coord + 0.5 can round up to the next integer, e.g. 0.49999999999999994 + 0.5 == 1.0)."""
    c = np.asarray(coord, dtype=float)
    i = np.floor(c + 0.5)
    i = np.where(c < i - 0.5, i - 1, i)
    if np.any(~np.isfinite(i)):
        raise ValueError("pixel_index: non-finite coordinate")
    return i.astype(np.int64)


@dataclass(frozen=True)
class TileGrid:
    """Tiles of side `tile` with `halo` extra pixels each side over an ny x nx field."""

    ny: int
    nx: int
    tile: int
    halo: int

    def __post_init__(self) -> None:
        for name in ("ny", "nx", "tile", "halo"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"TileGrid {name} must be an integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("ny", "nx", "tile"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TileGrid {name} must be positive, got {getattr(self, name)}")
        if self.halo < 0:
            raise ValueError(f"TileGrid halo must be >= 0, got {self.halo}")

    @property
    def n_ty(self) -> int:
        return -(-self.ny // self.tile)

    @property
    def n_tx(self) -> int:
        return -(-self.nx // self.tile)

    @property
    def field_box(self) -> Box:
        return Box(0, self.ny, 0, self.nx)

    def _check(self, ty: int, tx: int) -> None:
        if not (0 <= ty < self.n_ty and 0 <= tx < self.n_tx):
            raise ValueError(f"tile ({ty}, {tx}) outside the {self.n_ty} x {self.n_tx} grid")

    def core(self, ty: int, tx: int) -> Box:
        self._check(ty, tx)
        t = self.tile
        return Box(ty * t, min((ty + 1) * t, self.ny), tx * t, min((tx + 1) * t, self.nx))

    def halo_box(self, ty: int, tx: int) -> Box:
        c, h = self.core(ty, tx), self.halo
        return Box(max(c.y0 - h, 0), min(c.y1 + h, self.ny), max(c.x0 - h, 0), min(c.x1 + h, self.nx))

    def tiles(self, field: str) -> list[TileId]:
        """Every tile of the field, row-major (ty outer, tx inner)."""
        return [TileId(field, ty, tx) for ty in range(self.n_ty) for tx in range(self.n_tx)]

    def tile_of(self, y, x) -> tuple[np.ndarray, np.ndarray]:
        """(ty, tx) of the core holding integer pixel indices (y, x); ValueError outside the field."""
        y, x = np.asarray(y), np.asarray(x)
        if np.any(~self.field_box.contains(y, x)):
            raise ValueError("tile_of: pixel index outside the field")
        return y // self.tile, x // self.tile

    @staticmethod
    def _pixels(x, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        ok = np.isfinite(x) & np.isfinite(y)
        return pixel_index(np.where(ok, x, -1.0)), pixel_index(np.where(ok, y, -1.0)), ok

    def in_field(self, x, y) -> np.ndarray:
        """Continuous coordinates (x, y) whose pixel lies inside the field (NaN: False)."""
        ix, iy, ok = self._pixels(x, y)
        return ok & self.field_box.contains(iy, ix)

    def is_primary(self, ty: int, tx: int, x, y) -> np.ndarray:
        """True where the centroid (x, y) (continuous pixel coordinates) has its pixel in the core of
        tile (ty, tx); a centroid outside the field (or NaN) is primary nowhere."""
        # the core is clipped to the field, so core membership implies being inside the field
        ix, iy, ok = self._pixels(x, y)
        return ok & self.core(ty, tx).contains(iy, ix)


@dataclass(frozen=True)
class SkyField:
    """A field on the sky: its name, WCS (0-based pixel coordinates) and pixel dimensions."""

    name: str
    wcs: WCS
    ny: int
    nx: int

    def __post_init__(self) -> None:
        if self.ny <= 0 or self.nx <= 0:
            raise ValueError(f"SkyField {self.name}: dimensions must be positive, got {self.ny} x {self.nx}")

    @property
    def centre(self) -> SkyCoord:
        return self.wcs.pixel_to_world((self.nx - 1) / 2.0, (self.ny - 1) / 2.0)

    def contains(self, ra, dec, margin_px: float = 0.0) -> np.ndarray:
        """Positions (deg) whose pixel coordinates lie within [-0.5, n - 0.5) on both axes (the field grown
        by `margin_px` pixels on every side)."""
        ra, dec = np.atleast_1d(np.asarray(ra, float)), np.atleast_1d(np.asarray(dec, float))
        m = float(margin_px)
        with np.errstate(invalid="ignore"):
            x, y = self.wcs.world_to_pixel_values(ra, dec)
            x, y = np.asarray(x), np.asarray(y)
            inside = (x >= -0.5 - m) & (x < self.nx - 0.5 + m) & (y >= -0.5 - m) & (y < self.ny - 0.5 + m)
        # guard against the far hemisphere, where a projection is not one-to-one
        c = self.centre
        near = separation_arcsec(c.ra.deg, c.dec.deg, ra, dec) < 90.0 * 3600.0
        return inside & near


def owner(ra, dec, fields: list[SkyField]) -> np.ndarray:
    """Index into `fields` of the field owning each position: among the fields containing it, the one
    whose centre is nearest in angle (ties to the lower index); -1 where no field contains it."""
    ra, dec = np.atleast_1d(np.asarray(ra, float)), np.atleast_1d(np.asarray(dec, float))
    ra, dec = np.broadcast_arrays(ra, dec)
    best = np.full(ra.shape, -1, dtype=np.int64)
    best_sep = np.full(ra.shape, np.inf)
    for k, f in enumerate(fields):
        c = f.centre
        sep = separation_arcsec(c.ra.deg, c.dec.deg, ra, dec)
        better = f.contains(ra, dec) & (sep < best_sep)  # strict: ties keep the lower index
        best[better] = k
        best_sep[better] = sep[better]
    return best


def is_primary_field(name: str, ra, dec, fields: list[SkyField]) -> np.ndarray:
    """True where the field called `name` owns the position."""
    idx = [k for k, f in enumerate(fields) if f.name == name]
    if len(idx) != 1:
        raise ValueError(f"field {name!r} appears {len(idx)} times among the fields")
    return owner(ra, dec, fields) == idx[0]
