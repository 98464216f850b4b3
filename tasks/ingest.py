"""Ingest of one field, the unit of work of the ingest flow (flows/ingest.py) and of the training-set
builders: validate the field's FITS inputs and write them, tiled, into the Zarr store, or skip the field
when the store already holds it complete and intact (every shard there with its recorded size) from the
same inputs, layout and field specification. A skipped field's metadata for readers outside deepfield (band
array, array attributes, consolidated metadata; tasks/zarr_store.py) is brought up to date in place: a store
written before it existed, or whose consolidation a kill cut short, is then complete for xarray too, without
rewriting pixels.

Changed inputs. The field's completion record keeps, per input file, its size, mtime_ns, hash algorithm and
content digest (xxh3_128 by default, sha256 with `checksum: sha256`; StoreSpec). A re-ingest trusts the
recorded digest of a file whose size and mtime_ns are the recorded ones, without reading it, and hashes the
others again with the record's algorithm: a touched file (new mtime, same bytes) hashes to the same digest,
so the field is skipped and its record takes the new mtime; a changed byte is a new digest and the field is
ingested again. As with rsync's quick check, a change that keeps both the size and the mtime (a file
rewritten and its mtime set back, as `os.utime` or `touch -r` can) is NOT seen: `checksum_always: true` (the
default with sha256) reads and hashes every input on every ingest. A file modified within RACY_NS of its
hashing is recorded without an mtime (a second write in the same clock tick would keep it) and hashed again
next time. Records of an older deepfield (a bare sha256 per file) are compared by re-hashing with sha256.
The input fingerprint of the run ledger (tasks.zarr_store.input_fingerprint) is made of the digests, not of
sizes and mtimes, so a touched input changes nothing downstream.

What the ingest makes of its inputs. The record also keeps INGEST_VERSION, the version of what this code stores
from given inputs (bumped when that changes, as a stage's version is): a field ingested by another version is
ingested again, and, its input fingerprint changing, its tiles are processed again. A record without one is of
version 1.

The field's completion record names its input files relative to the directory holding the store (the run
directory, for `deepfield run`), so that a run directory moved or shared whole keeps its store valid and
holds no absolute path.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .fits_files import file_digest
from .fits_input import InputError, load_field
from .ingest_config import FieldSpec, StoreSpec
from .zarr_store import (StoreIntegrityError, drop_consolidated, field_group, group_record, metadata_lock,
                         open_store, refresh_metadata, update_record, verify_shards)
from .zarr_write import write_field

__all__ = ["input_files", "ingest_one"]

ALGORITHMS = {"xxh3": "xxh3_128", "sha256": "sha256"}  # StoreSpec.checksum -> the hash a record names
RACY_NS = 2_000_000_000  # an mtime this close to the hashing cannot vouch for the content (coarse file clocks)
# what this code stores from given inputs (module docstring): 2: without a noise map, the constant inverse variance
# from the noise of 4 x 4-pixel sums, not the image's MAD (tasks/fits_input.py); 3: masks' planes declared by
# MP_<NAME> keywords (Rubin's and HSC's afw masks) translated by their names, their informational planes
# (DETECTED, ...) masking nothing, where every plane without deepfield's MP<NAME> keyword had been BAD; 4: a resampled
# band's PSF FWHM widened by the bilinear interpolation's kernel, its noise per unit area kept (tasks/fits_align.py),
# its WCS shifted onto the reference band's sources where they disagree (tasks/fits_register.py); 5: a band without a
# mask file gets its pixels at or above the header's saturation level masked SAT (tasks/fits_input.py: _saturated)
INGEST_VERSION = "5"


def input_files(spec: FieldSpec) -> list[Path]:
    if spec.mef is not None:
        return [spec.mef]
    out = []
    for b in spec.bands.values():
        out += [p for p in (b.image, b.invvar, b.variance, b.mask) if p is not None]
    return out


def _intact(group, name: str) -> bool:
    """True when every shard of the complete field `name` (its group `group`) is there with the size its record
    says (a field written by an older deepfield, or damaged, is ingested again)."""
    try:
        verify_shards(group, name)
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


def _hash(path: Path, algorithm: str) -> dict:
    """The record entry of one input file: size and mtime_ns (stat first, so that a write during the read
    changes the mtime and the next ingest reads again; mtime_ns None when within RACY_NS of now), algorithm,
    digest."""
    st = os.stat(path)
    mtime = None if abs(time.time_ns() - st.st_mtime_ns) < RACY_NS else st.st_mtime_ns
    return dict(size=st.st_size, mtime_ns=mtime, algorithm=algorithm, digest=file_digest(path, algorithm))


def _old_entry(entry) -> dict | None:
    if isinstance(entry, str):  # an older deepfield's record: the bare sha256, no size or mtime
        return dict(size=None, mtime_ns=None, algorithm="sha256", digest=entry)
    return dict(entry) if isinstance(entry, dict) and entry.get("algorithm") in ALGORITHMS.values() else None


def _same(entry: dict, recorded) -> bool:
    """Whether `entry` has the content digest of the record's entry `recorded`."""
    prev = _old_entry(recorded)
    return prev is not None and (entry["algorithm"], entry["digest"]) == (prev["algorithm"], prev["digest"])


def _entries(paths: list[Path], rel: dict[str, str], old: dict, algorithm: str, read_always: bool) -> dict[str, dict]:
    """The record entry of each of `paths` (absolute path -> entry). A file whose size and mtime_ns are those of
    its entry in `old` (relative path -> entry) keeps that entry, unread, unless `read_always`; the others are
    hashed, with the old entry's algorithm (so that the digests compare) or `algorithm` where `old` has none."""
    out = {}
    for p in paths:
        prev = _old_entry(old.get(rel[str(p)]))
        if prev is not None and not read_always and prev.get("mtime_ns") is not None:
            st = os.stat(p)
            if (st.st_size, st.st_mtime_ns) == (prev.get("size"), prev["mtime_ns"]):
                out[str(p)] = prev
                continue
        out[str(p)] = _hash(p, prev["algorithm"] if prev is not None else algorithm)
    return out


def ingest_one(spec: FieldSpec, store: str, store_spec: StoreSpec, consolidated: bool = True) -> dict:
    """Ingest one field; returns a summary {field, status: ingested|skipped|failed, ...}. consolidated=False:
    the caller consolidates the store's metadata (tasks.zarr_store.consolidate_fields) after writing many fields;
    with store_spec.consolidated false the store keeps none (consolidated=True: this call removes it).

    Input errors are returned as status "failed" with a one-line error naming the file, so that
    the other fields go on.
    """
    t0 = time.perf_counter()
    drop = consolidated and not store_spec.consolidated
    consolidated = consolidated and store_spec.consolidated
    summary = dict(field=spec.name, status="failed", error=None, seconds=0.0, notes=[])
    try:
        paths = list(dict.fromkeys(input_files(spec)))  # a file may hold several HDUs of the field
        for p in paths:
            if not p.exists():
                raise InputError(p, "no such file")
            if not p.is_file():
                raise InputError(p, "not a regular file")
        algorithm = ALGORITHMS[store_spec.checksum]
        root = open_store(store, mode="a")
        layout = store_spec.layout()
        base = Path(store).absolute().parent
        rel = {str(p): _relative_paths(str(p), base) for p in paths}
        rel_spec = _relative_paths(spec.model_dump(mode="json"), base)
        group = field_group(root, spec.name)
        old = group_record(group)
        recorded = old.get("checksums") if old is not None else None
        recorded = recorded if isinstance(recorded, dict) else {}
        entries: dict[str, dict] = {}
        if old is not None and set(recorded) == set(rel.values()) and old.get("store") == layout \
                and old.get("spec") == rel_spec and old.get("ingest", "1") == INGEST_VERSION \
                and _intact(group, spec.name):
            entries = _entries(paths, rel, recorded, algorithm, store_spec.read_always)
            if all(_same(e, recorded[rel[p]]) for p, e in entries.items()):
                now = {rel[p]: e for p, e in entries.items()}
                if now != recorded:  # touched files (or an older deepfield's record): their new size and mtime
                    update_record(root, spec.name, checksums=now)
                refresh_metadata(root, spec.name, consolidated, group)
                summary.update(status="skipped", seconds=time.perf_counter() - t0)
                return summary
        # to be ingested: every input's entry by the configured hash; an entry found just now by it is kept, and
        # so (unless read_always) is a recorded one by it that the file's size and mtime vouch for
        entries = {p: e for p, e in entries.items() if e["algorithm"] == algorithm}
        vouched = {} if store_spec.read_always else \
            {r: e for r, e in recorded.items() if (_old_entry(e) or {}).get("algorithm") == algorithm}
        entries.update(_entries([p for p in paths if str(p) not in entries], rel, vouched, algorithm,
                                store_spec.read_always))
        fimg = load_field(spec, {p: e["digest"] for p, e in entries.items()})
        record = dict(checksums={rel[str(p)]: entries[str(p)] for p in paths}, store=layout, spec=rel_spec,
                      ingest=INGEST_VERSION)
        stats = write_field(root, fimg, store_spec, record, consolidated=consolidated)
        summary.update(status="ingested", notes=list(fimg.notes), bands=list(fimg.bands),
                       shape=list(fimg.image.shape), **stats)
    except InputError as exc:
        summary["error"] = str(exc)
    finally:
        if drop and Path(store, "zarr.json").exists():
            root = open_store(store, mode="a")
            with metadata_lock(root):
                drop_consolidated(root)
    summary["seconds"] = time.perf_counter() - t0
    return summary
