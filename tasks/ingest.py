"""Ingest of one field, the unit of work of the ingest flow (flows/ingest.py) and of the training-set
builders: validate the field's FITS inputs and write them, tiled, into the Zarr store, or skip the field
when the store already holds it complete and intact (every shard there with its recorded size) from the
same inputs (sha256 of every file), layout and field specification. A skipped field's metadata for readers
outside deepfield (band array, array attributes, consolidated metadata; tasks/zarr_store.py) is brought up to
date in place: a store written before it existed, or whose consolidation a kill cut short, is then complete
for xarray too, without rewriting pixels.

The field's completion record names its input files relative to the directory holding the store (the run
directory, for `deepfield run`), so that a run directory moved or shared whole keeps its store valid and
holds no absolute path.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .fits_input import InputError, load_field, sha256_file
from .ingest_config import FieldSpec, StoreSpec
from .zarr_store import StoreIntegrityError, field_record, open_store, refresh_metadata, verify_shards, write_field

__all__ = ["input_files", "ingest_one"]


def input_files(spec: FieldSpec) -> list[Path]:
    if spec.mef is not None:
        return [spec.mef]
    out = []
    for b in spec.bands.values():
        out += [p for p in (b.image, b.invvar, b.variance, b.mask) if p is not None]
    return out


def _intact(root, name: str) -> bool:
    """True when every shard of the complete field `name` is there with the size its record says (a field
    written by an older deepfield, or damaged, is ingested again)."""
    try:
        verify_shards(root["fields"][name], name)
    except StoreIntegrityError:
        return False
    return True


def _relative_paths(obj, base: Path):
    """`obj` (JSON-like) with every absolute path string made relative to `base`."""
    if isinstance(obj, dict):
        return {_relative_paths(k, base): _relative_paths(v, base) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative_paths(v, base) for v in obj]
    if isinstance(obj, str) and os.path.isabs(obj):
        try:
            return os.path.relpath(obj, base)
        except ValueError:  # another drive
            return obj
    return obj


def ingest_one(spec: FieldSpec, store: str, store_spec: StoreSpec, consolidated: bool = True) -> dict:
    """Ingest one field; returns a summary {field, status: ingested|skipped|failed, ...}. consolidated=False:
    the caller consolidates the store's metadata (tasks.zarr_store.consolidate) after writing many fields.

    Input errors are returned as status "failed" with a one-line error naming the file, so that
    the other fields go on.
    """
    t0 = time.perf_counter()
    summary = dict(field=spec.name, status="failed", error=None, seconds=0.0, notes=[])
    try:
        for p in input_files(spec):
            if not p.exists():
                raise InputError(p, "no such file")
            if not p.is_file():
                raise InputError(p, "not a regular file")
        checksums = {str(p): sha256_file(p) for p in input_files(spec)}
        root = open_store(store, mode="a")
        layout = store_spec.model_dump()
        base = Path(store).absolute().parent
        rel_checksums = _relative_paths(checksums, base)
        rel_spec = _relative_paths(spec.model_dump(mode="json"), base)
        old = field_record(root, spec.name)
        if old is not None and old.get("checksums") == rel_checksums and old.get("store") == layout \
                and old.get("spec") == rel_spec and _intact(root, spec.name):
            refresh_metadata(root, spec.name, consolidated)
            summary.update(status="skipped", seconds=time.perf_counter() - t0)
            return summary
        fimg = load_field(spec, checksums)
        record = dict(checksums=rel_checksums, store=layout, spec=rel_spec)
        stats = write_field(root, fimg, store_spec, record, consolidated=consolidated)
        summary.update(status="ingested", notes=list(fimg.notes), bands=list(fimg.bands),
                       shape=list(fimg.image.shape), **stats)
    except InputError as exc:
        summary["error"] = str(exc)
    summary["seconds"] = time.perf_counter() - t0
    return summary
