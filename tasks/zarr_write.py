"""Writing one field into a deepfield store (the ingest's last step): its arrays' metadata with zarr-python, its
pixels tile core by tile core with TensorStore, then its attributes, its completion record and the store's
consolidated metadata. The store's layout, its readers and its listing are tasks/zarr_store.py's."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tensorstore
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .ingest_config import CodecSpec, StoreSpec
from .tiling import TileGrid, TileId
from .version import __version__
from .zarr_metadata import BAND, _create_band_array, _group_dir, array_attributes, consolidate_fields, metadata_lock
from .zarr_store import ARRAYS, COMPLETE, FIELD_FORMAT, FILL, header_to_attrs, shard_key

__all__ = ["codec", "write_field"]


def codec(spec: CodecSpec) -> BloscCodec:
    return BloscCodec(cname=spec.cname, clevel=spec.clevel, shuffle=spec.shuffle)


def _array_path(arr: zarr.Array) -> str:
    """Filesystem directory of a zarr array in a local store."""
    return str(Path(str(arr.store_path.store.root)) / arr.path)


def _fields_root(root: zarr.Group) -> zarr.Group:
    """The store's `fields` group, opened as the root of a store of its own (a LocalStore at its directory), in
    which write_field creates a field's group and arrays.

    zarr checks every parent of a node it creates, up to its store's root, by reading and parsing the parent's
    zarr.json, and the store root's holds the consolidated metadata of every field (about 10 kB a field): through
    the store's root, creating a field's group and its four arrays parsed that file five times, O(N) a field and
    O(N^2) an ingest: the ingest flow over 200 small fields (256^2 px, four bands) spent 0.97 s of wall time a
    field in its last quarter against 0.24 s in its first, 63-73 s in all (2026-12-06; at 10^4 fields the file is
    about 100 MB). With `fields` as the root the parents are `fields` and the field's group, a few bytes each:
    0.18 s a field throughout, 25 s in all. The nodes' documents are the same: zarr writes a node's metadata
    relative to the node, whatever the store's root."""
    root.require_group("fields")
    return zarr.open_group(zarr.storage.LocalStore(_group_dir(root) / "fields"), mode="r+", use_consolidated=False)


def write_field(root: zarr.Group, fimg, spec: StoreSpec, record: dict,
                progress: Callable[[int, int], None] | None = None, consolidated: bool = True) -> dict:
    """Write one field (a tasks.fits_input.FieldImages) tile core by tile core, then its attributes,
    then the completion marker `record` (which should hold the inputs' checksums), then the field's entries in
    the store's consolidated metadata (consolidate_fields; also when the write fails, so that outside readers do
    not go on seeing the old field complete; consolidated=False: the caller consolidates). Returns byte and
    timing statistics."""
    fields = _fields_root(root)
    nb, ny, nx = fimg.image.shape
    grid = TileGrid(ny, nx, spec.tile, 0)
    tiles = grid.tiles(fimg.name)
    attrs = array_attributes(list(fimg.bands), list(fimg.zeropoints))
    data = {"image": fimg.image, "invvar": fimg.invvar, "mask": fimg.mask}
    try:
        with metadata_lock(root):
            if fimg.name in fields:
                del fields[fimg.name]  # the old marker goes first: a crash now leaves the field absent
            g = fields.create_group(fimg.name)
            arrays = {name: g.create_array(
                name, shape=(nb, ny, nx), dtype=dtype, chunks=(1, spec.chunk, spec.chunk),
                shards=(nb, spec.tile, spec.tile), compressors=(codec(spec.codec), Crc32cCodec()),
                fill_value=FILL[name], dimension_names=(BAND, "y", "x"), attributes=attrs[name])
                for name, dtype in ARRAYS.items()}
            _create_band_array(g, list(fimg.bands), attrs[BAND])
        t0 = time.perf_counter()
        _write_pixels(arrays, data, grid, tiles, spec, progress)
        where = _group_dir(g)
        shards = {shard_key(name, t.ty, t.tx): (where / shard_key(name, t.ty, t.tx)).stat().st_size
                  for name in arrays for t in tiles}
        with metadata_lock(root):
            # one write of the group's zarr.json: attrs.update() writes it once per key (14 writes, about 0.1 s per
            # field here, which a 256^2 field's pixels do not take)
            g.update_attributes({
                "bands": list(fimg.bands), "zeropoints": [float(z) for z in fimg.zeropoints],
                "psf_fwhm": [None if f is None else float(f) for f in fimg.psf_fwhm],
                "psf_beta": [None if f is None else float(f) for f in fimg.psf_beta] or None,
                "pixel_scale": float(fimg.pixel_scale), "wcs_header": header_to_attrs(fimg.wcs_header),
                "shape": [int(nb), int(ny), int(nx)], "tile": spec.tile, "chunk": spec.chunk,
                "codec": spec.codec.model_dump(), "resampled": list(fimg.resampled), "notes": list(fimg.notes),
                "deepfield_version": __version__,
            })
            g.attrs[COMPLETE] = dict(record, format=FIELD_FORMAT, shards=shards,
                                     completed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            if consolidated:
                consolidate_fields(root, [fimg.name])
    except BaseException:
        if consolidated:  # best effort: the error that got here is the one the caller must see
            with contextlib.suppress(Exception), metadata_lock(root):
                consolidate_fields(root, [fimg.name])
        raise
    raw = sum(a.nbytes for a in data.values())
    return dict(seconds=time.perf_counter() - t0, raw_bytes=int(raw),
                stored_bytes={n: int(a.nbytes_stored()) for n, a in arrays.items()},
                raw_by_array={n: int(a.nbytes) for n, a in data.items()})


def _write_pixels(arrays: dict[str, zarr.Array], data: dict[str, np.ndarray], grid: TileGrid, tiles: list[TileId],
                  spec: StoreSpec, progress: Callable[[int, int], None] | None) -> None:
    """Write `data` into the new `arrays` tile core by tile core."""
    # The arrays' metadata is zarr-python's (write_field); the pixels are written with TensorStore, whose
    # C++ sharded writer encodes and writes a 512^2 x 4-band field about 4x faster than zarr-python's
    # asyncio pipeline (tests/benchmarks/bench_ingest.py). zarr-python reads the result back.
    # file_io_sync: TensorStore's default fsyncs every shard it writes, half of the write's time (0.22-0.24 against
    # 0.12-0.13 s per 2048^2 field in four bands); StoreSpec.sync says why it is off by default
    ctx = tensorstore.Context({"data_copy_concurrency": {"limit": spec.write_threads},
                               "file_io_concurrency": {"limit": spec.write_threads}, "file_io_sync": spec.sync})
    # every chunk stored, even one equal to the fill value: a missing shard is then always damage
    handles = {name: tensorstore.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": _array_path(arr)},
                                       "store_data_equal_to_fill_value": True}, context=ctx, open=True).result()
               for name, arr in arrays.items()}
    pending = []
    try:
        for t in tiles:  # a tile core is whole shards: exactly one write touches each shard
            box = grid.core(t.ty, t.tx)
            sl = (slice(None),) + box.slices
            pending.append([handles[name][sl].write(data[name][sl]) for name in arrays])
        for k, futures in enumerate(pending):
            for f in futures:
                f.result()  # raises the writer's error, before any attribute or the marker is written
            if progress:
                progress(k + 1, len(tiles))
    except BaseException:
        for f in (f for futures in pending for f in futures):  # no write may outlive this call (a
            try:                                                 # re-run deletes and rewrites the group)
                f.result()
            except Exception:
                pass
        raise
