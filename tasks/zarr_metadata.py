"""The store's metadata for readers outside deepfield (xarray, zarr), beside the pixels of tasks/zarr_store.py:
each field's `band` coordinate array and its arrays' attributes (units, zero points, mask bits), and the store's
consolidated metadata, rewritten under the store's metadata lock (tasks/zarr_store.py's docstring says when).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.errors import ZarrUserWarning

from . import maskbits

__all__ = ["BAND", "AB_UNITS", "metadata_lock", "consolidate", "image_unit", "array_attributes", "refresh_metadata"]

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


def _consolidated_stale(root: zarr.Group, name: str) -> bool:
    """True when the consolidated metadata of field `name` (its group's and arrays' attributes, the set of its
    arrays) differs from the nodes' own, or there is none."""
    try:
        view = zarr.open_group(str(_group_dir(root)), mode="r", use_consolidated=True)["fields"][name]
    except (KeyError, ValueError, OSError):
        return True
    real = zarr.open_group(str(_group_dir(root)), mode="r", use_consolidated=False)["fields"][name]

    def nodes(g):
        return {"": g.attrs.asdict(), **{k: v.attrs.asdict() for k, v in g.members()}}
    return nodes(view) != nodes(real)


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


def _describe(g: zarr.Group) -> bool:
    """Give the complete field group `g` its band array and array attributes where they are missing or differ
    (a field written before they existed); True when anything was written. Pixels are not touched."""
    bands = list(g.attrs["bands"])
    want = array_attributes(bands, list(g.attrs["zeropoints"]))
    changed = False
    try:
        ok = [str(b) for b in g[BAND][:]] == bands and g[BAND].attrs.asdict() == want[BAND]
    except (KeyError, ValueError, OSError):
        ok = False
    if not ok:
        _create_band_array(g, bands, want[BAND])
        changed = True
    for name in PIXEL_ARRAYS:
        arr = g[name]
        have = arr.attrs.asdict()
        if {k: have.get(k) for k in want[name]} != want[name]:
            arr.update_attributes(want[name])
            changed = True
    return changed


def refresh_metadata(root: zarr.Group, name: str, consolidated: bool = True) -> bool:
    """Bring the outside readers' metadata of the complete field `name` up to date: its band array and array
    attributes (`_describe`) and the consolidated metadata, stale after a kill between a write and its
    consolidation (consolidated=False: the caller consolidates). True when anything was written."""
    with metadata_lock(root):
        changed = _describe(root["fields"][name])
        if consolidated and (changed or _consolidated_stale(root, name)):
            consolidate(root)
            return True
    return False
