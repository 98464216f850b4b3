"""The store's metadata for readers outside deepfield (xarray, zarr), beside the pixels of tasks/zarr_store.py:
each field's `band` coordinate array and its arrays' attributes (units, zero points, mask bits), and the store's
consolidated metadata, rewritten under the store's metadata lock (tasks/zarr_store.py's docstring says when).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import uuid
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.errors import ZarrUserWarning

from . import maskbits

__all__ = ["BAND", "AB_UNITS", "metadata_lock", "consolidate", "consolidate_fields", "drop_consolidated", "image_unit",
           "array_attributes", "node_attributes", "refresh_metadata"]

BAND = "band"  # the 1-D array of band names, the `band` coordinate of xarray
# AB zero point -> the unit whose zero point it is (m_AB = ZP - 2.5 log10 value): a calibrated store's unit
AB_UNITS = {31.4: "nJy", 23.9: "uJy", 22.5: "nanomaggy", 16.4: "mJy", 8.9: "Jy"}
PIXEL_ARRAYS = ("image", "invvar", "mask")  # tasks.zarr_store.ARRAYS
_METADATA_LOCKS: dict[str, threading.Lock] = {}  # store directory -> its metadata lock in this process
_LOCKS_LOCK = threading.Lock()


def _group_dir(group: zarr.Group) -> Path:
    return Path(str(group.store_path.store.root)) / group.path


@contextlib.contextmanager
def metadata_lock(root: zarr.Group) -> Iterator[None]:
    """Hold the store's metadata lock for the block (not re-entrant): a lock per store for the threads of this
    process, and an exclusive flock on the store's directory for other processes where the file system
    supports one on a directory (local ones do; NFS refuses it, and processes writing one store at once are
    not a supported use). No file is made: zarr warns about any non-Zarr file in a group."""
    where = _group_dir(root).resolve()
    with _LOCKS_LOCK:
        lock = _METADATA_LOCKS.setdefault(str(where), threading.Lock())
    with lock:
        fd = os.open(where, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                if exc.errno not in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            yield
        finally:
            os.close(fd)  # releases the flock


def consolidate(root: zarr.Group) -> None:
    """Rewrite the store's consolidated metadata from every node's metadata as it is now (the caller holds
    `metadata_lock`). zarr writes the root zarr.json to a temporary name and renames it: a kill leaves the
    old or the new copy."""
    with warnings.catch_warnings():  # "not part of the Zarr format 3 specification": xarray and zarr read it
        warnings.filterwarnings("ignore", "Consolidated metadata", ZarrUserWarning)
        zarr.consolidate_metadata(str(_group_dir(root)))


def consolidate_fields(root: zarr.Group, names, create: bool = True) -> bool:
    """Bring the root's consolidated metadata up to date for the fields `names` alone (the caller holds
    `metadata_lock`): the entries of each field's group and arrays are replaced by those nodes' own metadata as it
    is now, and removed where the field's group is gone; nothing is written where they already agree. True when
    the root's metadata was rewritten.

    consolidate() reads the metadata of every node of the store, 8.7 ms per field here (8.7 s at 1,000 fields): a
    consolidation after each field made an ingest of N fields cost N^2 / 2 of those, 1.2 hours at 1,000 fields. This
    reads the few files of the fields named and parses and writes the root's one file, 0.7 ms per field of the store
    (tests/benchmarks/bench_ingest_scale.py --consolidation). zarr has no call that consolidates part of a tree, so the
    root's `zarr.json` is rewritten here, in the layout zarr.consolidate_metadata gives it (each node's own document
    under its path; a group's with an empty consolidated_metadata of its own), with zarr's temporary name and
    rename. Where the root has no consolidated metadata with the `fields` group in it (a store older than it, one
    made by another writer, or one whose ingest keeps none: `store.consolidated: false`), consolidate() makes it
    whole if `create`, else nothing is written."""
    top = _group_dir(root)
    meta = top / "zarr.json"
    doc = json.loads(meta.read_bytes())
    cm = doc.get("consolidated_metadata")
    flat = cm.get("metadata") if isinstance(cm, dict) and cm.get("kind") == "inline" else None
    if not isinstance(flat, dict) or "fields" not in flat:
        if create:
            consolidate(root)
        return create
    changed = False
    for name in dict.fromkeys(names):
        key = f"fields/{name}"
        old = {k: v for k, v in flat.items() if k == key or k.startswith(key + "/")}
        new = _node_entries(top, key)
        if old != new:
            for k in old:
                del flat[k]
            flat.update(new)
            changed = True
    if changed:
        # sorted: a parent's children lie together, as zarr's reader (ConsolidatedMetadata._flat_to_nested)
        # groups them by their parent among the keys of one depth
        cm["metadata"] = {k: flat[k] for k in sorted(flat)}
        _write_root(meta, doc)
    return changed


def drop_consolidated(root: zarr.Group) -> bool:
    """Remove the root's consolidated metadata (the caller holds `metadata_lock`; `store.consolidated: false`), so
    that no outside reader is shown a copy nobody keeps up to date. True when there was one."""
    meta = _group_dir(root) / "zarr.json"
    doc = json.loads(meta.read_bytes())
    if doc.pop("consolidated_metadata", None) is None:
        return False
    _write_root(meta, doc)
    return True


def _write_root(meta: Path, doc: dict) -> None:
    """The root's zarr.json replaced by `doc`, written to zarr's LocalStore's own temporary name and renamed."""
    tmp = meta.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        # no indent: the C encoder (the whole rewrite 3.6x faster at 300 fields)
        tmp.write_bytes(json.dumps(doc, allow_nan=True).encode())
        tmp.replace(meta)
    finally:
        tmp.unlink(missing_ok=True)


def _node_entries(top: Path, key: str) -> dict:
    """The consolidated metadata's entries for the node at path `key` under the store directory `top` and every
    node under it: {path: the node's own zarr.json document}, a group's with an empty consolidated_metadata where
    it has none, as zarr.consolidate_metadata writes them; {} where there is no node."""
    try:
        node = json.loads((top / key / "zarr.json").read_bytes())
    except FileNotFoundError:
        return {}
    out = {key: node}
    if node.get("node_type") == "group":
        if node.get("consolidated_metadata") is None:
            node["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {}}
        for child in sorted(p.name for p in (top / key).iterdir() if p.is_dir()):
            out.update(_node_entries(top, f"{key}/{child}"))
    return out


def image_unit(zeropoints: list[float]) -> str:
    """The unit of a field's image values: the calibrated unit (AB_UNITS) whose AB zero point every band has,
    else "image unit" (one unit is then nJy_per_unit[band] nJy)."""
    units = {AB_UNITS.get(round(float(z), 4)) for z in zeropoints}
    return units.pop() if len(units) == 1 and None not in units else "image unit"


def array_attributes(bands: list[str], zeropoints: list[float]) -> dict[str, dict]:
    """The attributes of a field's arrays (name -> attributes) for readers outside deepfield: units, the AB
    zero point and nJy of one image unit per band, the mask bit planes."""
    unit = image_unit(zeropoints)
    zps = [float(z) for z in zeropoints]
    per_band = {"bands": list(bands), "zeropoint": zps, "nJy_per_unit": [10 ** (-0.4 * (z - 31.4)) for z in zps]}
    return {
        "image": {"long_name": "sky-subtracted image", "units": unit, **per_band,
                  "comment": "AB magnitude = zeropoint[band] - 2.5 log10(image); nJy = image * nJy_per_unit[band]"},
        "invvar": {"long_name": "inverse variance of image", "units": f"{unit}^-2", **per_band,
                   "comment": "0 where there is no measurement"},
        "mask": maskbits.zarr_attributes(),
        BAND: {"long_name": "band"},
    }


def _create_band_array(g: zarr.Group, bands: list[str], attrs: dict) -> None:
    arr = g.create_array(BAND, shape=(len(bands),), dtype=str, chunks=(len(bands),), compressors=(Crc32cCodec(),),
                         dimension_names=(BAND,), attributes=attrs, overwrite=True)
    arr[:] = np.array(bands, dtype=str)


def node_attributes(node: Path, node_type: str | None = None) -> dict | None:
    """The attributes in the zarr.json of the node directory `node` ({} where it has none); None where that
    file cannot be read or, with `node_type` ("group", "array"), the node is not of that type.

    Written here rather than through zarr: a node's attributes are its zarr.json (zarr v3, a local store), and
    reading that file takes about 0.05 ms where opening the node through zarr takes 1-1.5 ms (a call into zarr's
    event loop); the re-ingest's check of an unchanged field and the start-up's listing of a survey's fields
    read them for every field (issue 22)."""
    try:
        doc = json.loads((node / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or (node_type is not None and doc.get("node_type") != node_type):
        return None
    attrs = doc.get("attributes")
    return dict(attrs) if isinstance(attrs, dict) else {}


def _describe(g: zarr.Group) -> bool:
    """Give the complete field group `g` its band array and array attributes where they are missing or differ
    (a field written before they existed); True when anything was written. Pixels are not touched.

    The arrays' attributes are compared in their zarr.json files, read here: each zarr node access costs a call
    into zarr's event loop (about 1 ms), and this runs for every unchanged field of every re-ingest."""
    bands = list(g.attrs["bands"])
    want = array_attributes(bands, list(g.attrs["zeropoints"]))
    where = _group_dir(g)
    changed = False
    try:
        ok = node_attributes(where / BAND) == want[BAND] and [str(b) for b in g[BAND][:]] == bands
    except (KeyError, ValueError, OSError):
        ok = False
    if not ok:
        _create_band_array(g, bands, want[BAND])
        changed = True
    for name in PIXEL_ARRAYS:
        have = node_attributes(where / name) or {}
        if {k: have.get(k) for k in want[name]} != want[name]:
            g[name].update_attributes(want[name])
            changed = True
    return changed


def refresh_metadata(root: zarr.Group, name: str, consolidated: bool = True, group: zarr.Group | None = None) -> bool:
    """Bring the outside readers' metadata of the complete field `name` up to date: its band array and array
    attributes (`_describe`) and its entries in the consolidated metadata (`consolidate_fields`), stale after a
    kill between a write and its consolidation (consolidated=False: the caller consolidates). True when anything
    was written. `group`: the field's group, when the caller has it."""
    with metadata_lock(root):
        changed = _describe(group if group is not None else root["fields"][name])
        if consolidated:
            changed = consolidate_fields(root, [name]) or changed
    return changed
