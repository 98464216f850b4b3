"""The ingest flow end to end on the simulated survey: pixels survive exactly, re-runs skip, a changed input is
re-ingested (how changes are found: test_ingest_changes.py), bad fields are reported while the others proceed,
a writer that dies leaves no complete-looking field; and the flow at survey scale: consolidated metadata whole
at its end, fields at a time, batches of fields per task, a summary as the flow run's parameters."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import xxhash
import yaml
from astropy.io import fits
from astropy.wcs import WCS

from deepfield.tasks.ingest_config import StoreSpec, load_ingest_config
from deepfield.tasks.tiling import TileId
from deepfield.tasks.zarr_store import complete_fields, field_record, open_store
from deepfield.tasks.zarr_read import read_tile

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
