"""The ingest flow end to end on the simulated survey: pixels survive exactly, re-runs skip,
changed inputs are re-ingested (found by size, mtime and content hash; a touched file is read again but
changes nothing), bad fields are reported while the others proceed, and a writer that dies leaves no
complete-looking field."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import xxhash
import yaml
from astropy.io import fits
from astropy.wcs import WCS

from deepfield.tasks.ingest_config import StoreSpec, load_ingest_config
from deepfield.tasks.tiling import TileId
from deepfield.tasks.zarr_store import complete_fields, field_record, open_store, read_tile

SPEC = StoreSpec(tile=256, chunk=64)


@pytest.fixture(scope="module")
def ingested(survey, tmp_path_factory, prefect_harness):
    from deepfield.flows.ingest import ingest_flow
    store = tmp_path_factory.mktemp("store") / "survey.zarr"
    cfg = load_ingest_config(survey / "manifest.yaml", store=SPEC)
    results = ingest_flow(cfg, str(store))
    return store, cfg, results


def test_fits_to_zarr_to_tile_reproduces_pixels(ingested, manifest, survey):
    store, cfg, results = ingested
    assert [r["status"] for r in results] == ["ingested"] * len(cfg.fields)
    root = open_store(store)
    assert complete_fields(root) == sorted(f["name"] for f in manifest["fields"])
    f = manifest["fields"][1]
    bands = list(f["bands"])
    full = {k: np.stack([fits.getdata(survey / f["bands"][b][k]) for b in bands]) for k in ("image", "invvar", "mask")}
    for ty, tx in [(0, 0), (1, 2), (3, 3)]:
        tile = read_tile(root, TileId(f["name"], ty, tx), halo=40)
        assert tile.bands == bands
        assert np.array_equal(tile.image, full["image"][(slice(None),) + tile.box.slices].astype(np.float32))
        assert np.array_equal(tile.invvar, full["invvar"][(slice(None),) + tile.box.slices].astype(np.float32))
        assert np.array_equal(tile.mask, full["mask"][(slice(None),) + tile.box.slices].astype(np.uint16))
        assert tile.image.dtype == np.float32 and tile.mask.dtype == np.uint16
        # the tile's WCS is the field's, shifted to the halo box origin
        hdr = fits.getheader(survey / f["bands"][bands[0]]["image"])
        sky = WCS(hdr).pixel_to_world(tile.box.x0 + 7.0, tile.box.y0 + 3.0)
        x, y = tile.wcs.world_to_pixel(sky)
        assert abs(x - 7.0) < 1e-6 and abs(y - 3.0) < 1e-6


def test_the_flow_leaves_the_consolidated_metadata_whole(ingested):
    """The flow's fields do not consolidate, the flow does (flows/ingest.py): at its end the root's document is the
    one zarr's consolidation of the whole store gives, every field complete in it."""
    import json
    import warnings

    import zarr
    store, cfg, _ = ingested
    doc = json.loads((store / "zarr.json").read_text())
    view = zarr.open_group(str(store), mode="r", use_consolidated=True)["fields"]
    assert {n: view[n].attrs.get("deepfield_complete") for n in view.group_keys()} == \
        {f.name: field_record(open_store(store), f.name) for f in cfg.fields}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(store))
    assert json.loads((store / "zarr.json").read_text()) == doc


def test_a_flow_keeping_no_consolidated_metadata_removes_it(ingested, tmp_path):
    import json

    from deepfield.flows.ingest import ingest_flow
    store, cfg, _ = ingested
    copy = tmp_path / "s.zarr"
    shutil.copytree(store, copy)
    off = cfg.model_copy(update={"store": cfg.store.model_copy(update={"consolidated": False})})
    assert [r["status"] for r in ingest_flow(off, str(copy))] == ["skipped"] * len(cfg.fields)
    assert "consolidated_metadata" not in json.loads((copy / "zarr.json").read_text())
    assert complete_fields(open_store(copy)) == sorted(f.name for f in cfg.fields)


def test_the_flow_ingests_fields_at_once_as_configured(prefect_harness, tmp_path, monkeypatch):
    """At most store.fields_at_once fields in flight (each holds its pixels in memory; Prefect's thread pool has
    no limit), the next one started as one finishes, the summaries in the configuration's order."""
    import threading
    import time

    import deepfield.flows.ingest as ingest_mod
    from deepfield.tasks.ingest_config import FieldSpec, IngestConfig
    lock, now, most, order = threading.Lock(), [0], [0], []

    def fake_ingest_one(spec, store, store_spec, consolidated=True):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
            order.append(spec.name)
        time.sleep(0.3 if spec.name == "f0" else 0.05)  # f0 the slowest: the others pass it
        with lock:
            now[0] -= 1
        return dict(field=spec.name, status="failed", error="not a real field", seconds=0.0, notes=[])

    monkeypatch.setattr(ingest_mod, "ingest_one", fake_ingest_one)
    fields = [FieldSpec(name=f"f{k}", bands={"g": {"image": tmp_path / f"f{k}.fits"}}) for k in range(7)]
    cfg = IngestConfig(fields=fields, store=StoreSpec(tile=256, chunk=64, fields_at_once=2))
    results = ingest_mod.ingest_flow(cfg, str(tmp_path / "s.zarr"))
    assert most[0] == 2 and sorted(order) == [f.name for f in fields]
    assert [r["field"] for r in results] == [f.name for f in fields]
    assert not (tmp_path / "s.zarr").exists()  # every field failed before writing: no store made
    assert ingest_mod.fields_at_once(StoreSpec()) == min(len(os.sched_getaffinity(0)), ingest_mod.DEFAULT_MAX_AT_ONCE)


def test_a_survey_of_many_fields_is_ingested_in_batches(prefect_harness, tmp_path, monkeypatch):
    """Beyond MAX_TASK_RUNS fields, Prefect tasks of several fields each (each task run costs the flow Prefect's
    API calls); a field that raises fails alone, the next of its batch goes on; summaries in order."""
    import deepfield.flows.ingest as ingest_mod
    from deepfield.tasks.ingest_config import FieldSpec, IngestConfig
    calls = []

    def fake_ingest_one(spec, store, store_spec, consolidated=True):
        calls.append(spec.name)
        if spec.name == "f4":
            raise OSError("disk full (simulated)")
        return dict(field=spec.name, status="failed", error="not a real field", seconds=0.0, notes=[])

    monkeypatch.setattr(ingest_mod, "ingest_one", fake_ingest_one)
    monkeypatch.setattr(ingest_mod, "MAX_TASK_RUNS", 3)
    submitted = []
    real_submit = ingest_mod.ingest_fields_task.submit
    monkeypatch.setattr(ingest_mod.ingest_fields_task, "submit",
                        lambda specs, *a: submitted.append([s.name for s in specs]) or real_submit(specs, *a))
    fields = [FieldSpec(name=f"f{k}", bands={"g": {"image": tmp_path / f"f{k}.fits"}}) for k in range(8)]
    results = ingest_mod.ingest_flow(IngestConfig(fields=fields, store=StoreSpec(fields_at_once=2)),
                                     str(tmp_path / "s.zarr"))
    assert submitted == [["f0", "f1", "f2"], ["f3", "f4", "f5"], ["f6", "f7"]]  # ceil(8 / 3) = 3 per task
    assert sorted(calls) == [f.name for f in fields] and [r["field"] for r in results] == [f.name for f in fields]
    assert results[4]["error"] == "OSError: disk full (simulated)" and results[5]["error"] == "not a real field"
    assert [ingest_mod.batch_size(n) for n in (1, 3, 4, 7, 9, 10)] == [1, 1, 2, 3, 3, 4]  # at most 3 tasks


def test_the_flow_run_records_a_summary_not_the_configuration(prefect_harness, tmp_path, monkeypatch):
    """Prefect's API refuses flow-run parameters over 512 kB (about 350 fields of four bands): the flow's
    parameters are a summary, and 600 fields of four bands, 0.9 MB of configuration, are ingested."""
    import json

    from fastapi.encoders import jsonable_encoder

    import deepfield.flows.ingest as ingest_mod
    from deepfield.tasks.ingest_config import FieldSpec, IngestConfig
    monkeypatch.setattr(ingest_mod, "ingest_one", lambda spec, store, store_spec, consolidated=True: dict(
        field=spec.name, status="failed", error="not a real field", seconds=0.0, notes=[]))
    files = {k: tmp_path / f"{k}.fits" for k in ("image", "invvar", "mask")}
    fields = [FieldSpec(name=f"field{k:04d}", bands={b: files for b in "griz"}) for k in range(600)]
    cfg = IngestConfig(fields=fields)
    assert len(json.dumps(jsonable_encoder(cfg))) > 524_288
    call = ingest_mod.IngestCall.of(cfg)
    assert jsonable_encoder(call) == {"source": None, "fields": 600, "first_field": "field0000",
                                      "last_field": "field0599", "store": jsonable_encoder(cfg.store)}
    results = ingest_mod.ingest_flow(cfg, str(tmp_path / "s.zarr"))
    assert [r["field"] for r in results] == [f.name for f in fields]


def test_store_attributes(ingested, manifest):
    store, _, _ = ingested
    g = open_store(store)["fields"][manifest["fields"][0]["name"]]
    assert g.attrs["bands"] == list(manifest["fields"][0]["bands"])
    assert g.attrs["zeropoints"] == [27.0] * 4
    assert g.attrs["pixel_scale"] == pytest.approx(0.2, rel=1e-6)
    assert all(f > 0.3 for f in g.attrs["psf_fwhm"])
    rec = field_record(open_store(store), manifest["fields"][0]["name"])
    assert len(rec["checksums"]) == 12
    for rel, e in rec["checksums"].items():  # relative to the store's directory; size, mtime, xxh3_128
        path = (store.parent / rel).resolve()
        assert e["algorithm"] == "xxh3_128" and e["digest"] == xxhash.xxh3_128(path.read_bytes()).hexdigest()
        assert e["size"] == path.stat().st_size and e["mtime_ns"] in (path.stat().st_mtime_ns, None)
    assert g["image"].shards == (4, 256, 256) and g["image"].chunks == (1, 64, 64)
    assert g.attrs["deepfield_version"]


def test_the_field_listing_reads_what_zarr_reads_and_a_damaged_group_is_not_complete(ingested, tmp_path):
    """fields_attrs reads each field group's zarr.json itself (issue 22: 30x faster than zarr per field): the same
    attributes as zarr gives, the same tiles; a field whose metadata is damaged counts as not complete."""
    from deepfield.tasks.provenance import input_keys
    from deepfield.tasks.zarr_store import StoreError, all_tiles, fields_attrs, input_fingerprint
    store, _, _ = ingested
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    root = open_store(copy)
    names = sorted(root["fields"].group_keys())
    assert fields_attrs(root) == {n: root["fields"][n].attrs.asdict() for n in names}
    keys = input_keys(root, names, 128.0)
    assert {n: input_keys(root, [n])[n] for n in names} == {n: input_fingerprint(root, n) for n in names}
    tiles = all_tiles(root, 32)
    assert len(tiles) == sum(((s[1] + 255) // 256) * ((s[2] + 255) // 256)
                             for s in (root["fields"][n].attrs["shape"] for n in names))
    (copy / "fields" / names[0] / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')  # cut short
    root = open_store(copy)
    assert fields_attrs(root)[names[0]] is None and complete_fields(root) == names[1:]
    assert [t.field for t in all_tiles(root, 32)] == [t.field for t in tiles if t.field != names[0]]
    with pytest.raises(StoreError, match="not complete"):
        all_tiles(root, 32, [names[0]])
    assert input_keys(root, names[1:], 128.0) != {n: keys[n] for n in names[1:]}  # a neighbour's change counts


def test_rerun_skips_and_changed_input_is_reingested(ingested, survey, tmp_path):
    from deepfield.flows.ingest import ingest_flow
    store, cfg, _ = ingested
    again = ingest_flow(cfg, str(store))
    assert [r["status"] for r in again] == ["skipped"] * len(cfg.fields)
    # change one band of one field, in a copy of the inputs so that the shared survey stays intact
    copy = tmp_path / "sim"
    shutil.copytree(survey, copy)
    cfg2 = load_ingest_config(copy / "manifest.yaml", store=SPEC)
    store2 = tmp_path / "s.zarr"
    assert {r["status"] for r in ingest_flow(cfg2, str(store2))} == {"ingested"}
    img_path = copy / "fields" / "field001" / "field001-r-image.fits"
    with fits.open(img_path, mode="update") as hdul:
        hdul[0].data[10, 10] += 1.0
    res = {r["field"]: r["status"] for r in ingest_flow(cfg2, str(store2))}
    assert res == {"field000": "skipped", "field001": "ingested"}
    tile = read_tile(open_store(store2), TileId("field001", 0, 0), halo=0)
    assert tile.image[1, 10, 10] == np.float32(fits.getdata(img_path)[10, 10])


def test_bad_field_is_reported_and_others_proceed(survey, tmp_path, prefect_harness):
    from deepfield.flows.ingest import ingest_flow
    m = yaml.safe_load((survey / "manifest.yaml").read_text())
    bad = tmp_path / "broken.fits"
    bad.write_text("this is not a FITS file\n")
    cfg_yaml = {"fields": [
        {"name": "good", "bands": {b: {k: str(survey / e[k]) for k in ("image", "invvar", "mask")}
                                   for b, e in m["fields"][0]["bands"].items()}},
        {"name": "bad", "bands": {"g": {"image": str(bad)}}},
        {"name": "gone", "bands": {"g": {"image": str(tmp_path / "missing.fits")}}},
    ]}
    (tmp_path / "ingest.yaml").write_text(yaml.safe_dump(cfg_yaml))
    cfg = load_ingest_config(tmp_path / "ingest.yaml", store=SPEC)
    res = {r["field"]: r for r in ingest_flow(cfg, str(tmp_path / "s.zarr"))}
    assert res["good"]["status"] == "ingested"
    assert res["bad"]["status"] == "failed" and "broken.fits" in res["bad"]["error"]
    assert res["gone"]["status"] == "failed" and "missing.fits" in res["gone"]["error"]
    assert complete_fields(open_store(tmp_path / "s.zarr")) == ["good"]


def test_writer_exception_leaves_no_complete_field(survey, tmp_path, monkeypatch):
    """A failure in the middle of writing a field's arrays leaves it incomplete, and a re-run finishes it."""
    import deepfield.tasks.zarr_store as zs
    from deepfield.tasks.ingest import ingest_one
    cfg = load_ingest_config(survey / "manifest.yaml", store=SPEC)
    spec = cfg.fields[0]
    store = tmp_path / "s.zarr"
    calls = {"n": 0}
    real = zs.TileGrid.core

    def dying_core(self, ty, tx):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        return real(self, ty, tx)

    monkeypatch.setattr(zs.TileGrid, "core", dying_core)
    with pytest.raises(OSError, match="disk full"):
        ingest_one(spec, str(store), SPEC)
    root = open_store(store)
    assert spec.name in root["fields"]  # partly written ...
    assert field_record(root, spec.name) is None  # ... but not complete
    assert complete_fields(root) == []
    monkeypatch.setattr(zs.TileGrid, "core", real)
    assert ingest_one(spec, str(store), SPEC)["status"] == "ingested"
    assert complete_fields(open_store(store)) == [spec.name]


def test_ingest_command_exit_code_and_messages(survey, tmp_path, prefect_harness):
    from typer.testing import CliRunner

    from deepfield.flows.cli import app
    cfg = {"fields": [{"name": "bad", "bands": {"g": {"image": str(tmp_path / "nope.fits")}}}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["ingest", str(tmp_path / "c.yaml"), "--store", str(tmp_path / "s.zarr")])
    assert r.exit_code == 1 and "nope.fits" in r.output
    r = CliRunner().invoke(app, ["ingest", str(tmp_path / "absent.yaml"), "--store", str(tmp_path / "s.zarr")])
    assert r.exit_code == 2 and "absent.yaml" in r.output


# --- changed inputs: size and mtime, then the content hash (tasks/ingest.py) ---

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
