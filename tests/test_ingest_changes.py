"""Changed inputs of a field already in the store (tasks/ingest.py): found by size and mtime, then the content
hash; a touched file is read again but changes nothing, a changed byte is re-ingested unless its size and mtime
are restored, a racy mtime is not trusted, an older deepfield's record is compared by sha256 and upgraded; and
`store.sync`, which is not part of the layout."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits

from deepfield.tasks.ingest_config import StoreSpec, load_ingest_config
from deepfield.tasks.tiling import TileId
from deepfield.tasks.zarr_store import field_record, open_store
from deepfield.tasks.zarr_read import read_tile

SPEC = StoreSpec(tile=256, chunk=64)

OLD = 1_600_000_000 * 10**9  # an mtime long past (ns): not "racy", so the record keeps it


@pytest.fixture
def one_field(survey, manifest, tmp_path):
    """A private copy of the first field's inputs, all with mtime OLD, its ingest configuration, and a store."""
    f = manifest["fields"][0]
    bands = {}
    for b, e in f["bands"].items():
        bands[b] = {k: e[k] for k in ("zeropoint", "psf_fwhm")}
        for k in ("image", "invvar", "mask"):
            dst = tmp_path / "in" / (survey / e[k]).name
            dst.parent.mkdir(exist_ok=True)
            shutil.copyfile(survey / e[k], dst)
            os.utime(dst, ns=(OLD, OLD))
            bands[b][k] = str(dst)
    (tmp_path / "ingest.yaml").write_text(yaml.safe_dump({"fields": [{"name": "f", "bands": bands}]}))
    spec = load_ingest_config(tmp_path / "ingest.yaml").fields[0]
    return spec, tmp_path / "run" / "s.zarr"


@pytest.fixture
def hashed(monkeypatch):
    """The files ingest reads to hash them, in order."""
    import deepfield.tasks.ingest as ingest
    seen, real = [], ingest.file_digest

    def digest(path, algorithm="xxh3_128"):
        seen.append(Path(path).name)
        return real(path, algorithm)
    monkeypatch.setattr(ingest, "file_digest", digest)
    return seen


def _flip_byte(path: Path, bit: int, keep_stat: bool) -> None:
    """Flip `bit` of the last pixel's low byte (big-endian float32) in place, same size; keep_stat: set the
    mtime back to what it was."""
    st = path.stat()
    with fits.open(path) as hdul:
        where = hdul.fileinfo(0)["datLoc"] + hdul[0].data.nbytes - 1
    with open(path, "r+b") as fh:
        fh.seek(where)
        b = fh.read(1)
        fh.seek(where)
        fh.write(bytes([b[0] ^ bit]))
    if keep_stat:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def _ingest(spec, store, **check):
    from deepfield.tasks.ingest import ingest_one
    r = ingest_one(spec, str(store), SPEC.model_copy(update=check))
    assert r["status"] != "failed", r
    return r["status"]


def test_touched_input_is_rehashed_and_skipped_unchanged_skips_unread(one_field, hashed):
    from deepfield.tasks.zarr_store import input_fingerprint
    spec, store = one_field
    assert _ingest(spec, store) == "ingested"
    assert len(hashed) == 12  # every input hashed once
    rec, fp = field_record(open_store(store), "f"), input_fingerprint(open_store(store), "f")
    assert all(e["mtime_ns"] == OLD for e in rec["checksums"].values())
    assert all(not os.path.isabs(p) for p in rec["checksums"])  # relative to the store's directory
    hashed.clear()
    assert _ingest(spec, store) == "skipped" and hashed == []  # size and mtime vouch: nothing read
    touched = spec.bands["r"].invvar
    os.utime(touched, ns=(OLD + 5 * 10**9, OLD + 5 * 10**9))
    assert _ingest(spec, store) == "skipped" and hashed == [touched.name]  # re-hashed: same digest
    rec2 = field_record(open_store(store), "f")
    key = next(k for k in rec["checksums"] if k.endswith(touched.name))
    assert rec2["checksums"][key] == dict(rec["checksums"][key], mtime_ns=OLD + 5 * 10**9)  # the new mtime kept
    assert input_fingerprint(open_store(store), "f") == fp  # the ledger sees nothing new
    assert {k: v for k, v in rec2.items() if k != "checksums"} == {k: v for k, v in rec.items() if k != "checksums"}
    hashed.clear()
    assert _ingest(spec, store) == "skipped" and hashed == []


def test_changed_byte_is_reingested_unless_size_and_mtime_are_restored(one_field, hashed):
    """A changed byte with a new mtime is seen; with its size and mtime set back it is not (rsync's quick check),
    unless checksum_always or the sha256 option reads every input."""
    from deepfield.tasks.zarr_store import input_fingerprint
    spec, store = one_field
    img = spec.bands["g"].image
    assert _ingest(spec, store) == "ingested"
    fp0 = input_fingerprint(open_store(store), "f")

    def pixel():
        return read_tile(open_store(store), TileId("f", 3, 3), halo=0).image[0, -1, -1]

    def truth():
        return np.float32(fits.getdata(img)[-1, -1])
    before = truth()
    _flip_byte(img, 1, keep_stat=False)  # the last pixel's low byte; a new mtime
    assert truth() != before
    hashed.clear()
    assert _ingest(spec, store) == "ingested" and pixel() == truth()
    assert hashed == [img.name]  # only the changed file was read to hash it (the others vouched for)
    fp1 = input_fingerprint(open_store(store), "f")
    assert fp1 != fp0
    os.utime(img, ns=(OLD, OLD))  # a settled mtime, recorded by the next ingest
    assert _ingest(spec, store) == "skipped"

    _flip_byte(img, 2, keep_stat=True)  # changed again, size and mtime as recorded
    changed = truth()
    hashed.clear()
    assert _ingest(spec, store) == "skipped" and hashed == []  # not seen, by design
    assert pixel() != changed and input_fingerprint(open_store(store), "f") == fp1
    assert _ingest(spec, store, checksum_always=True) == "ingested" and pixel() == changed
    assert len(hashed) == 12  # every input read
    fp2 = input_fingerprint(open_store(store), "f")
    assert fp2 not in (fp0, fp1)

    _flip_byte(img, 4, keep_stat=True)  # once more: the sha256 option reads too, and records sha256
    hashed.clear()
    assert _ingest(spec, store, checksum="sha256") == "ingested" and pixel() == truth()
    rec = field_record(open_store(store), "f")
    assert {e["algorithm"] for e in rec["checksums"].values()} == {"sha256"}
    key = next(k for k in rec["checksums"] if k.endswith(img.name))
    assert rec["checksums"][key]["digest"] == hashlib.sha256(img.read_bytes()).hexdigest()
    assert input_fingerprint(open_store(store), "f") not in (fp0, fp1, fp2)
    hashed.clear()  # a sha256 record under the default xxh3: size and mtime vouch, the record keeps its hash
    assert _ingest(spec, store) == "skipped" and hashed == []


def test_racy_mtime_is_not_trusted(one_field, hashed, monkeypatch):
    """A file hashed within RACY_NS of its mtime is recorded without one and hashed again next time."""
    import deepfield.tasks.ingest as ingest
    spec, store = one_field
    monkeypatch.setattr(ingest, "RACY_NS", 10**20)  # every mtime "just now"
    assert _ingest(spec, store) == "ingested"
    assert all(e["mtime_ns"] is None for e in field_record(open_store(store), "f")["checksums"].values())
    hashed.clear()
    monkeypatch.setattr(ingest, "RACY_NS", 0)
    assert _ingest(spec, store) == "skipped" and len(hashed) == 12
    assert all(e["mtime_ns"] == OLD for e in field_record(open_store(store), "f")["checksums"].values())


def test_record_of_an_older_deepfield_is_compared_by_sha256_and_upgraded(one_field, hashed):
    """A completion record whose checksums are bare sha256 digests (before sizes and mtimes): the next ingest
    re-hashes with sha256, skips the unchanged field, keeps its fingerprint and records sizes and mtimes."""
    import hashlib as hl
    import json

    import zarr

    from deepfield.tasks.zarr_store import COMPLETE, input_fingerprint
    spec, store = one_field
    assert _ingest(spec, store) == "ingested"
    g = zarr.open_group(str(store), mode="a", use_consolidated=False)["fields"]["f"]
    rec = dict(g.attrs[COMPLETE])
    rec["checksums"] = {k: hl.sha256((store.parent / k).read_bytes()).hexdigest() for k in rec["checksums"]}
    g.attrs[COMPLETE] = rec
    old_fp = hl.sha256(json.dumps({k: v for k, v in rec.items() if k != "completed_at"}, sort_keys=True,
                                  default=str).encode()).hexdigest()[:16]  # as an older deepfield computed it
    assert input_fingerprint(open_store(store), "f") == old_fp
    hashed.clear()
    assert _ingest(spec, store) == "skipped" and len(hashed) == 12
    new = field_record(open_store(store), "f")["checksums"]
    assert {k: e["digest"] for k, e in new.items()} == rec["checksums"]
    assert {e["algorithm"] for e in new.values()} == {"sha256"} and all(e["mtime_ns"] == OLD for e in new.values())
    assert input_fingerprint(open_store(store), "f") == old_fp
    hashed.clear()
    assert _ingest(spec, store) == "skipped" and hashed == []


def test_sync_flushes_the_shards_and_is_not_layout(one_field, monkeypatch):
    """`store.sync: true` fsyncs the shards TensorStore writes and stores the same bytes; it is not part of the
    store's layout, so switching it neither re-ingests a field nor changes its record."""
    import deepfield.tasks.zarr_write as zarr_write
    spec, store = one_field
    contexts = []
    real = zarr_write.tensorstore.Context

    def context(spec_dict, *a, **k):
        contexts.append(spec_dict)
        return real(spec_dict, *a, **k)
    monkeypatch.setattr(zarr_write.tensorstore, "Context", context)
    assert _ingest(spec, store) == "ingested" and contexts[-1]["file_io_sync"] is False  # the default
    rec = field_record(open_store(store), "f")
    assert "sync" not in rec["store"]
    group = store / "fields" / "f"

    def shards():
        return {p.relative_to(group): p.read_bytes() for a in ("image", "invvar", "mask")
                for p in sorted((group / a / "c").rglob("*")) if p.is_file()}
    written = shards()
    assert set(map(str, written)) == set(rec["shards"]) and len(written) == 3 * 16  # 256^2 cores of 1024^2
    assert _ingest(spec, store, sync=True) == "skipped"  # not layout: nothing to redo
    shutil.rmtree(store)
    assert _ingest(spec, store, sync=True) == "ingested" and contexts[-1]["file_io_sync"] is True
    assert shards() == written
    assert {k: v for k, v in field_record(open_store(store), "f").items() if k != "completed_at"} == \
        {k: v for k, v in rec.items() if k != "completed_at"}


def test_a_field_ingested_by_another_ingest_version_is_ingested_again(one_field, monkeypatch):
    """The completion record keeps INGEST_VERSION (what the ingest stores from given inputs): a field whose record
    has another (or none, as before 2026-12-06) is ingested again from the same inputs, and its input fingerprint
    changes, so the ledger redoes its tiles; with the same version it is skipped."""
    import deepfield.tasks.ingest as ingest
    from deepfield.tasks.zarr_store import input_fingerprint, update_record
    spec, store = one_field
    assert _ingest(spec, store) == "ingested"
    rec = field_record(open_store(store), "f")
    assert rec["ingest"] == ingest.INGEST_VERSION
    fp = input_fingerprint(open_store(store), "f")
    assert _ingest(spec, store) == "skipped"
    monkeypatch.setattr(ingest, "INGEST_VERSION", "99")
    assert _ingest(spec, store) == "ingested"
    assert field_record(open_store(store), "f")["ingest"] == "99" and input_fingerprint(open_store(store), "f") != fp
    assert _ingest(spec, store) == "skipped"
    monkeypatch.undo()
    update_record(open_store(store, mode="a"), "f", ingest=None)  # a record without one: version 1
    assert _ingest(spec, store) == "ingested"
