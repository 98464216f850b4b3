"""The tiled Zarr store: one group per field with `image`, `invvar` (float32) and `mask` (uint16)
arrays of shape (band, y, x).

Layout (zarr v3):
  STORE.zarr/                          root attrs: {"deepfield_store": 1}; consolidated metadata
  STORE.zarr/fields/<field>/           attrs: WCS header, bands, zero points, pixel scale, PSF FWHM,
                                       deepfield version, tile, chunk, codec, and last of all the
                                       completion marker "deepfield_complete" (per input file its size,
                                       mtime and content hash: tasks/ingest.py)
  STORE.zarr/fields/<field>/{image,invvar,mask}   dimension_names (band, y, x), units, mask bit meanings
  STORE.zarr/fields/<field>/band       the band names (variable-length UTF-8 strings)

Chunks are (1, C, C) so that a halo read touches few bytes; shards are (nband, T, T), one per tile
core, so the writer that writes a tile core is the only writer of that shard (zarr loses data
when two writers share a shard). A field counts as complete only when its completion marker is
present, and the marker is written after every array; re-ingesting a field first deletes its
group, marker included.

Integrity: every chunk and every shard index carries a CRC-32C (zarr's crc32c codec), so a changed byte
is an error when read; every chunk is stored, even one equal to the fill value, and the completion
record lists the size of every shard file (`shards`), so a missing or truncated shard is found by a
stat before it is read (`verify_shards`): zarr would read a missing shard as fill values. The fill
values mean "no data" (image NaN, invvar 0, mask NO_DATA), so that no hole can pass for pixels. A
damaged field is a `StoreIntegrityError` naming the field, array and shard; `invalidate_field`
removes its completion marker, so that the next ingest writes it again from its inputs.

For xarray and other readers outside deepfield, `xarray.open_zarr(STORE, group="fields/<field>")` is a
Dataset of `image`, `invvar`, `mask` over (band, y, x) with the `band` coordinate; `image` says its unit
(`image_unit`: nJy, uJy, nanomaggy, mJy or Jy where the zero points of every band are those of that unit,
else "image unit") with the AB zero point and the nJy of one unit per band, `invvar` the inverse square of
that unit, `mask` its bit planes (CF `flag_masks`/`flag_meanings`, tasks/maskbits.py). Those readers open the
store through its consolidated metadata (a copy of every node's metadata in the root zarr.json), so a field's
entries there are rewritten (`consolidate_fields`) whenever it is complete, fails to be written or is
invalidated; writers hold the store's metadata lock while they change metadata and consolidate, so that the
last consolidation sees every completed write. Rewriting one field's entries reads that field's few metadata
files and rewrites the root's one file, instead of every node's metadata as `consolidate` (zarr's) does, 9 ms
per field of the store: the ingest flow, which writes many fields at once, passes consolidated=False to each
and brings the entries of the fields that finished up to date together, no more often than keeps that under a
tenth of its time (flows/ingest.py). deepfield itself always reads the nodes' own metadata
(use_consolidated=False), so that a consolidation lost to a kill can never hide a re-ingest or an invalidation
from it; the next ingest, which visits every field, rewrites the entries of each field that differ from
its nodes' (`refresh_metadata`, or the flow's consolidation).
That metadata (band array, attributes, consolidation, the metadata lock) is tasks/zarr_metadata.py's.
Stores written before the `band` array and the array attributes existed stay readable as they are (same
FIELD_FORMAT): the next ingest adds both to each complete field in place, its pixels and completion record
untouched. The `band` array is metadata for outside readers, outside the shard record.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

import zarr
from astropy.io import fits

from . import maskbits
from .zarr_metadata import (AB_UNITS, BAND, _create_band_array, _group_dir, array_attributes,  # noqa: F401
                            consolidate, consolidate_fields, drop_consolidated, image_unit,
                            metadata_lock, node_attributes, refresh_metadata)
from .tiling import TileGrid, TileId

STORE_FORMAT = 1
FIELD_FORMAT = 2  # 2: CRC-32C per chunk, every chunk stored, shard sizes in the completion record
_CREATE_LOCK = threading.Lock()  # field tasks run in threads and may all find the store missing
COMPLETE = "deepfield_complete"
ARRAYS = {"image": "float32", "invvar": "float32", "mask": "uint16"}
FILL = {"image": float("nan"), "invvar": 0.0, "mask": maskbits.NO_DATA}  # "no data", never pixels


class StoreError(RuntimeError):
    pass


class StoreIntegrityError(StoreError):
    """A shard of a complete field is missing, truncated or fails its checksum."""


def shard_key(array: str, sy: int, sx: int) -> str:
    """The path of a shard inside a field group: <array>/c/0/<sy>/<sx> (zarr v3's default chunk keys; one
    shard holds every band)."""
    return f"{array}/c/0/{sy}/{sx}"


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open (mode "r") or create/open for writing (mode "a") a deepfield store."""
    path = Path(path)
    if mode == "r":
        if not path.exists():
            raise StoreError(f"{path}: no such store")
        try:  # the nodes' own metadata: the consolidated copy is for outside readers (module docstring)
            root = zarr.open_group(str(path), mode="r", use_consolidated=False)
        except Exception as exc:  # zarr raises several types for a non-store directory
            raise StoreError(f"{path}: not a Zarr store ({exc})") from exc
        if root.attrs.get("deepfield_store") != STORE_FORMAT:
            raise StoreError(f"{path}: not a deepfield store (no deepfield_store attribute)")
        return root
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: not a directory (a Zarr store is one)")
    known = _WRITABLE.get(_identity(path))
    if known is not None and _marked(path):
        return known
    with _CREATE_LOCK:
        root = zarr.open_group(str(path), mode="a", use_consolidated=False)
        if root.attrs.get("deepfield_store") is None:
            if list(root.keys()):
                raise StoreError(f"{path}: a Zarr group that is not a deepfield store; refusing to write into it")
            root.attrs["deepfield_store"] = STORE_FORMAT
            root.require_group("fields")
            with metadata_lock(root):
                consolidate(root)
        root.require_group("fields")
        key = _identity(path)
        if key is not None:
            while len(_WRITABLE) >= _WRITABLE_MAX:
                _WRITABLE.pop(next(iter(_WRITABLE)))
            _WRITABLE[key] = root
    return root


# Stores opened for writing by this process: (directory, device, inode) -> the root group. The root's zarr.json
# holds the consolidated metadata, about 11 kB per field, which zarr reads and parses on every open (and then
# drops: use_consolidated=False): 0.33 s per open at 1,000 fields here, once per field ingested, which made an
# ingest or a no-op re-ingest of N fields cost N^2 / 2 of those (tests/benchmarks/bench_ingest_scale.py --consolidation).
# The group is the same for every later open in this process: deepfield reads every node's metadata from its own
# file and the root's attributes (the deepfield_store marker) never change. A later open takes it only while the
# directory is the same (device and inode) and its zarr.json begins with the marker (_marked); a directory made
# again in its place, which may get the same inode, is opened afresh unless it is a deepfield store too.
_WRITABLE: dict[tuple[str, int, int], zarr.Group] = {}
_WRITABLE_MAX = 64
_MARKED = re.compile(rb'\A\s*\{\s*"attributes"\s*:\s*\{\s*"deepfield_store"\s*:\s*' + str(STORE_FORMAT).encode()
                     + rb'\s*[,}]')


def _marked(path: Path) -> bool:
    """Whether the store's root zarr.json begins with the deepfield_store marker as the root's first attribute
    (as zarr and tasks.zarr_metadata write it; False, and so a full open, for any other layout)."""
    try:
        with open(path / "zarr.json", "rb") as f:
            return _MARKED.match(f.read(256)) is not None
    except OSError:
        return False


def _identity(path: Path) -> tuple[str, int, int] | None:
    """(resolved directory, device, inode) of a store directory with a root zarr.json; None otherwise."""
    try:
        st = path.stat()
        if not (path / "zarr.json").is_file():
            return None
        return str(path.resolve()), st.st_dev, st.st_ino
    except OSError:
        return None


def forget_stores() -> None:
    """Open every store afresh from now on (benchmarks and tests compare against a first open)."""
    _WRITABLE.clear()


def field_key(group: zarr.Group) -> tuple[str, str, str]:
    """A field's key for results computed once per field (its name, its store, its completion record): a
    re-ingest makes a new key, so nothing computed from the old pixels is taken for the new."""
    return group.path.rsplit("/", 1)[-1], str(group.store), repr(group.attrs.get(COMPLETE))


def field_record(root: zarr.Group, name: str) -> dict | None:
    """The completion record of a field, or None when the field is absent or incomplete."""
    return group_record(field_group(root, name))


def field_group(root: zarr.Group, name: str) -> zarr.Group | None:
    """The group of the field `name` (one lookup in zarr), or None when there is none."""
    try:
        g = root[f"fields/{name}"]
    except (KeyError, ValueError, OSError):
        return None
    return g if isinstance(g, zarr.Group) else None


def group_record(group: zarr.Group | None) -> dict | None:
    """The completion record of a field's group (field_group), or None when it is absent or incomplete."""
    try:
        return dict(group.attrs[COMPLETE]) if group is not None else None
    except (KeyError, TypeError, ValueError):
        return None


def verify_shards(group: zarr.Group, name: str, shards: list[tuple[int, int]] | None = None) -> None:
    """StoreIntegrityError naming the store, field, array and shard when a shard file of the complete field
    `name` (its group `group`) is missing or has another size than its completion record says (all shards,
    or those at (sy, sx) in `shards`). A field written before FIELD_FORMAT 2 counts as damaged (it has no
    record of its shards): the next ingest writes it again."""
    try:
        rec = dict(group.attrs[COMPLETE])
    except KeyError:
        raise StoreError(f"field {name!r} is not complete in the store") from None
    where = _group_dir(group)
    if rec.get("format") != FIELD_FORMAT or not isinstance(rec.get("shards"), dict):
        raise StoreIntegrityError(f"{where}: field {name!r} was written by an older deepfield (no shard record); "
                                  "the next run ingests it again")
    sizes = rec["shards"]
    keys = list(sizes) if shards is None else [shard_key(a, sy, sx) for a in ARRAYS for sy, sx in shards]
    for key in keys:
        path = where / key
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = None
        if size != sizes.get(key):
            what = "is missing" if size is None else f"has {size} bytes, its record {sizes.get(key)}"
            raise StoreIntegrityError(f"{path}: shard of field {name!r} {what}; the next run ingests the field "
                                      "again")


def invalidate_field(root_path: str | Path, name: str) -> bool:
    """Remove the completion marker of a damaged field (its pixels stay until the next ingest rewrites them),
    so that the next run ingests it again; False when it was not complete."""
    root = open_store(root_path, mode="a")
    try:
        g = root["fields"][name]
    except KeyError:
        return False
    with metadata_lock(root):
        if COMPLETE not in g.attrs:
            return False
        del g.attrs[COMPLETE]
        consolidate_fields(root, [name], create=False)  # its readers see the field incomplete too
    return True


def update_record(root: zarr.Group, name: str, **changes) -> None:
    """Change keys of the completion record of the complete field `name` in place (tasks/ingest.py: the inputs'
    size and mtime after a re-hash found their content unchanged), under the metadata lock; zarr writes the
    group's metadata to a temporary name and renames it. The caller brings the consolidated copy up to date
    (refresh_metadata)."""
    with metadata_lock(root):
        g = root["fields"][name]
        g.attrs[COMPLETE] = dict(g.attrs[COMPLETE], **changes)


def content_digest(entry) -> str:
    """What identifies an input's content in a record's `checksums` entry: the digest, prefixed by its algorithm
    unless sha256 (the bare sha256 hex digest is the whole entry in records written before sizes and mtimes)."""
    if isinstance(entry, str):
        return entry
    digest = str(entry.get("digest"))
    return digest if entry.get("algorithm") == "sha256" else f"{entry.get('algorithm')}:{digest}"


def input_fingerprint(root: zarr.Group, name: str) -> str:
    """A hash of what a complete field was ingested from (input contents, field spec, store layout); it changes
    when the field is re-ingested from changed inputs, and only then: the inputs' sizes and mtimes, which a
    touched file changes, and the completion time are left out (a sha256 record of an older deepfield gives the
    fingerprint it gave then)."""
    return record_fingerprint(field_record(root, name))


def record_fingerprint(record: dict | None) -> str:
    """input_fingerprint of a field's completion record (None: a field that is not complete)."""
    import hashlib
    import json
    rec = {k: v for k, v in (record or {}).items() if k != "completed_at"}
    if isinstance(rec.get("checksums"), dict):
        rec["checksums"] = {p: content_digest(e) for p, e in rec["checksums"].items()}
    return hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fields_attrs(root: zarr.Group, names: list[str] | None = None) -> dict[str, dict | None]:
    """The group attributes of the fields `names` (default: every field group of the store), each read once
    from its zarr.json (zarr_metadata.node_attributes: the start-up of a survey of 10^4-10^5 fields lists them
    all); None for a field without a group or whose metadata cannot be read (as field_record: not complete)."""
    base = _group_dir(root) / "fields"
    if names is None:
        try:
            names = sorted(p.name for p in base.iterdir() if (p / "zarr.json").is_file())
        except FileNotFoundError:
            return {}
    return {name: node_attributes(base / name, "group") for name in names}


def is_complete(attrs: dict | None) -> bool:
    """True when a field's group attributes (fields_attrs) hold its completion record."""
    return bool(attrs) and isinstance(attrs.get(COMPLETE), dict)


def complete_fields(root: zarr.Group) -> list[str]:
    return sorted(n for n, a in fields_attrs(root).items() if is_complete(a))


def all_tiles(root: zarr.Group, halo: int, fields: list[str] | None = None) -> list[TileId]:
    """Every tile of `fields` (default: every complete field) of an open store, field by field in row-major
    tile order; StoreError for a named field that is not complete. Each field's metadata is read once."""
    attrs = fields_attrs(root, None if fields is None else list(fields))
    names = sorted(n for n, a in attrs.items() if is_complete(a)) if fields is None else fields
    out = []
    for name in names:
        if not is_complete(attrs.get(name)):
            raise StoreError(f"field {name!r} is not complete in the store")
        out += _grid(attrs[name], halo).tiles(name)
    return out


def header_to_attrs(header: fits.Header) -> list[list]:
    """A FITS header as JSON-friendly [keyword, value, comment] cards."""
    return [[c.keyword, c.value, c.comment] for c in header.cards if c.keyword not in ("", "COMMENT", "HISTORY")]


def attrs_to_header(cards: list[list]) -> fits.Header:
    h = fits.Header()
    for key, value, comment in cards:
        h[key] = (value, comment)
    return h


def _grid(attrs, halo: int) -> TileGrid:
    """The tile grid of a field from its group attributes."""
    _, ny, nx = attrs["shape"]
    return TileGrid(ny, nx, int(attrs["tile"]), halo)
