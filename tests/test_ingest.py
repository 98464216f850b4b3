"""The ingest flow end to end on the simulated survey: pixels survive exactly, re-runs skip,
changed inputs are re-ingested, bad fields are reported while the others proceed, and a writer
that dies leaves no complete-looking field."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
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


def test_store_attributes(ingested, manifest):
    store, _, _ = ingested
    g = open_store(store)["fields"][manifest["fields"][0]["name"]]
    assert g.attrs["bands"] == list(manifest["fields"][0]["bands"])
    assert g.attrs["zeropoints"] == [27.0] * 4
    assert g.attrs["pixel_scale"] == pytest.approx(0.2, rel=1e-6)
    assert all(f > 0.3 for f in g.attrs["psf_fwhm"])
    rec = field_record(open_store(store), manifest["fields"][0]["name"])
    assert len(rec["checksums"]) == 12 and all(len(v) == 64 for v in rec["checksums"].values())
    assert g["image"].shards == (4, 256, 256) and g["image"].chunks == (1, 64, 64)
    assert g.attrs["deepfield_version"]


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
