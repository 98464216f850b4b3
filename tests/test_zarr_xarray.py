"""The Zarr store as readers outside deepfield see it: `xarray.open_zarr(store, group="fields/<field>")` opens a
field written by the ingest as a Dataset over (band, y, x) with the bands labelled, units and mask-bit meanings,
through consolidated metadata that follows every ingest, failed write and invalidation (and is never what
deepfield itself reads); a store written before these existed is described in place by the next ingest."""
from __future__ import annotations

import json
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import xarray as xr
import zarr
from astropy.io import fits
from astropy.wcs import WCS

from deepfield.tasks import maskbits
from deepfield.tasks.fits_input import FieldImages
from deepfield.tasks.ingest import ingest_one
from deepfield.tasks.ingest_config import StoreSpec, load_ingest_config
from deepfield.tasks.tiling import TileId
from deepfield.tasks.zarr_store import (
    COMPLETE,
    complete_fields,
    consolidate,
    consolidate_fields,
    field_record,
    invalidate_field,
    metadata_lock,
    open_store,
    verify_shards,
)
from deepfield.tasks.zarr_read import read_tile
from deepfield.tasks.zarr_write import write_field

SPEC = StoreSpec(tile=256, chunk=128)


@pytest.fixture(scope="module")
def ingested(survey, tmp_path_factory):
    """The session's survey ingested field by field (as the ingest flow's tasks do); (store, config)."""
    cfg = load_ingest_config(survey / "manifest.yaml", store=SPEC)
    store = tmp_path_factory.mktemp("xr") / "survey.zarr"
    for f in cfg.fields:
        assert ingest_one(f, str(store), SPEC)["status"] == "ingested"
    return store, cfg


def _without_mtimes(rec: dict) -> dict:
    """A completion record without its inputs' mtimes: an ingest that skips a field records the mtime of an input
    hashed within the clock's resolution of being written (tasks/ingest.py), the digests stay."""
    return dict(rec, checksums={k: {kk: vv for kk, vv in v.items() if kk != "mtime_ns"}
                                for k, v in rec["checksums"].items()})


def open_field(store, field: str) -> xr.Dataset:
    """The field as xarray opens it, any warning (the consolidated-metadata RuntimeWarning included) an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(store, group=f"fields/{field}")


def consolidated_marker(store, field: str):
    """The completion marker of `field` as a reader of the consolidated metadata sees it (None: absent)."""
    return open_field(store, field).attrs.get(COMPLETE)


def test_xarray_opens_a_field_with_its_bands_labelled(ingested, manifest, survey):
    store, _ = ingested
    f = manifest["fields"][1]
    bands = list(f["bands"])
    ds = open_field(store, f["name"])
    for name in ("image", "invvar", "mask"):
        assert ds[name].dims == ("band", "y", "x")
    assert ds.sizes == {"band": len(bands), "y": 1024, "x": 1024}
    assert [str(b) for b in ds.band.values] == bands and all(isinstance(b, str) for b in ds.band.values.tolist())
    assert ds.image.dtype == np.float32 and ds.invvar.dtype == np.float32 and ds.mask.dtype == np.uint16
    # band r as deepfield reads it (a tile with its halo) and as the FITS inputs hold it
    r = ds.sel(band="r").load()
    tile = read_tile(open_store(store), TileId(f["name"], 1, 2), halo=40)
    k = tile.bands.index("r")
    box = dict(y=slice(tile.box.y0, tile.box.y1), x=slice(tile.box.x0, tile.box.x1))
    assert np.array_equal(r.image.isel(**box).values, tile.image[k])
    assert np.array_equal(r.invvar.isel(**box).values, tile.invvar[k])
    assert np.array_equal(r.mask.isel(**box).values, tile.mask[k])  # no fill value turned into NaN
    for name in ("image", "invvar", "mask"):
        want = fits.getdata(survey / f["bands"]["r"][name]).astype(r[name].dtype)
        assert np.array_equal(r[name].values, want, equal_nan=True)
    assert (r.mask.values & maskbits.SAT).any()  # a mask with flags set, read back intact


def test_units_and_mask_bits_are_described(ingested, manifest):
    store, _ = ingested
    name = manifest["fields"][0]["name"]
    ds = open_field(store, name)
    g = open_store(store)["fields"][name]
    zps = list(g.attrs["zeropoints"])
    assert zps == [27.0] * 4  # the simulated survey's zero point: its images are not in a calibrated unit
    assert ds.image.attrs["units"] == "image unit" and ds.invvar.attrs["units"] == "image unit^-2"
    assert ds.image.attrs["zeropoint"] == zps and ds.image.attrs["bands"] == list(g.attrs["bands"])
    # one unit at zero point 27 is 10^(0.4 (31.4 - 27)) nJy: magnitude 27 is 10^(0.4 * 4.4) nJy
    assert ds.image.attrs["nJy_per_unit"] == pytest.approx([10 ** (0.4 * 4.4)] * 4, rel=1e-12)
    m = ds.mask.attrs
    assert m["flag_masks"] == [maskbits.BAD, maskbits.SAT, maskbits.BLEED, maskbits.NO_DATA, maskbits.ZERO_WEIGHT]
    assert m["flag_meanings"].split() == ["BAD", "SAT", "BLEED", "NODATA", "ZEROWT"]
    assert m["flag_descriptions"]["SAT"] == {"bit": 1, "value": maskbits.SAT, "meaning": "saturated"}
    assert all(d["value"] == 1 << d["bit"] and d["meaning"] for d in m["flag_descriptions"].values())
    assert ds.attrs[COMPLETE] == field_record(open_store(store), name)  # the group's attributes, marker included


def _field(name: str, zeropoints: list[float], n: int = 128) -> FieldImages:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    nb = len(zeropoints)
    image = np.random.default_rng(len(name)).normal(0.0, 1.0, (nb, n, n)).astype(np.float32)
    return FieldImages(name=name, bands=list("griz")[:nb], image=image, invvar=np.ones_like(image),
                       mask=np.zeros(image.shape, np.uint16), wcs_header=w.to_header(), zeropoints=zeropoints,
                       psf_fwhm=[1.0] * nb, pixel_scale=0.2)


def test_a_calibrated_field_says_its_unit(tmp_path):
    store = tmp_path / "s.zarr"
    root = open_store(store, mode="a")
    write_field(root, _field("njy", [31.4, 31.4]), StoreSpec(tile=64, chunk=32), {"inputs": "njy"})
    write_field(root, _field("mixed", [31.4, 27.0]), StoreSpec(tile=64, chunk=32), {"inputs": "mixed"})
    ds = open_field(store, "njy")
    assert ds.image.attrs["units"] == "nJy" and ds.invvar.attrs["units"] == "nJy^-2"
    assert ds.image.attrs["nJy_per_unit"] == [1.0, 1.0]
    assert open_field(store, "mixed").image.attrs["units"] == "image unit"


def test_fields_written_at_once_are_all_in_the_consolidated_metadata(tmp_path):
    """Fields written by threads (as the ingest flow's tasks are): each consolidation holds the store's metadata
    lock, so the last one sees every field complete."""
    store = tmp_path / "s.zarr"
    root = open_store(store, mode="a")
    names = [f"f{k}" for k in range(6)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda n: write_field(root, _field(n, [27.0] * 3), StoreSpec(tile=64, chunk=32),
                                            {"inputs": n}), names))
    for n in names:
        assert consolidated_marker(store, n) == field_record(open_store(store), n) is not None


def test_a_writer_of_many_fields_can_consolidate_once(tmp_path):
    store = tmp_path / "s.zarr"
    root = open_store(store, mode="a")
    write_field(root, _field("a", [27.0] * 2), StoreSpec(tile=64, chunk=32), {"inputs": "a"})
    write_field(root, _field("b", [27.0] * 2), StoreSpec(tile=64, chunk=32), {"inputs": "b"}, consolidated=False)
    assert sorted(zarr.open_group(str(store), mode="r")["fields"].group_keys()) == ["a"]  # the consolidated view
    assert complete_fields(open_store(store)) == ["a", "b"]
    with metadata_lock(root):
        consolidate(root)
    assert consolidated_marker(store, "b") == field_record(open_store(store), "b") is not None


def _whole(store) -> dict:
    """The root's metadata document as zarr's consolidation of the whole store makes it (the store is left so)."""
    with metadata_lock(open_store(store, mode="a")), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(store))
    return json.loads((store / "zarr.json").read_text())


def test_one_fields_consolidation_is_what_zarr_makes_of_the_whole_store(tmp_path):
    """consolidate_fields rewrites the entries of the fields it is given and no others: after writes, a change of
    attributes, a field removed and a field whose entries were lost, the root's document is the one zarr's
    whole-store consolidation gives."""
    store = tmp_path / "s.zarr"
    root = open_store(store, mode="a")
    spec = StoreSpec(tile=64, chunk=32)
    for n in ("b", "a", "a-1", "a.2"):  # names that sort around each other's paths
        write_field(root, _field(n, [27.0] * 2), spec, {"inputs": n})  # each rewrites only its own entries
    doc = json.loads((store / "zarr.json").read_text())
    assert doc == _whole(store)
    assert {k for k in doc["consolidated_metadata"]["metadata"] if k.startswith("fields/a.2")} == \
        {"fields/a.2", *(f"fields/a.2/{a}" for a in ("band", "image", "invvar", "mask"))}
    with metadata_lock(root):
        assert not consolidate_fields(root, ["a", "b"])  # nothing changed: nothing written
        root["fields"]["a"]["image"].update_attributes({"units": "nJy"})
        shutil.rmtree(store / "fields" / "b")
        assert consolidate_fields(root, ["a", "b", "a-1"])
    assert json.loads((store / "zarr.json").read_text()) == _whole(store)
    assert open_field(store, "a").image.attrs["units"] == "nJy"
    # entries lost (a kill between a write and its consolidation), and a store with no consolidated metadata
    doc = json.loads((store / "zarr.json").read_text())
    del doc["consolidated_metadata"]["metadata"]["fields/a-1/mask"]
    (store / "zarr.json").write_text(json.dumps(doc))
    with metadata_lock(root):
        assert consolidate_fields(root, ["a-1"])
    assert json.loads((store / "zarr.json").read_text()) == _whole(store)
    (store / "zarr.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "consolidated_metadata"}))
    with metadata_lock(root):
        assert consolidate_fields(root, ["a"])  # the whole store consolidated, every field in it
    assert json.loads((store / "zarr.json").read_text()) == _whole(store)
    assert consolidated_marker(store, "a-1") == field_record(open_store(store), "a-1") is not None


def test_a_store_can_keep_no_consolidated_metadata(tmp_path):
    """store.consolidated false: the ingest leaves the root no consolidated metadata (none that goes stale), an
    invalidation makes none, xarray reads the field's own metadata, and true makes it whole again."""
    from deepfield.tasks.ingest_config import FieldSpec
    store = tmp_path / "s.zarr"
    root = open_store(store, mode="a")
    write_field(root, _field("a", [27.0] * 2), StoreSpec(tile=64, chunk=32), {"inputs": "a"})
    assert "consolidated_metadata" in json.loads((store / "zarr.json").read_text())
    off = StoreSpec(tile=64, chunk=32, consolidated=False)
    assert off.layout() == StoreSpec(tile=64, chunk=32).layout()  # not layout: nothing is ingested again for it
    spec = FieldSpec(name="missing", bands={"g": {"image": tmp_path / "none.fits"}})
    assert ingest_one(spec, str(store), off)["status"] == "failed"  # a failed field: the copy goes all the same
    assert "consolidated_metadata" not in json.loads((store / "zarr.json").read_text())
    assert invalidate_field(store, "a")
    assert "consolidated_metadata" not in json.loads((store / "zarr.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert COMPLETE not in xr.open_zarr(store, group="fields/a", consolidated=False).attrs
    write_field(root, _field("a", [27.0] * 2), StoreSpec(tile=64, chunk=32), {"inputs": "a"})
    assert consolidated_marker(store, "a") == field_record(open_store(store), "a") is not None


def test_consolidated_metadata_follows_invalidation_reingest_and_failure(ingested, tmp_path, monkeypatch):
    store, cfg = ingested
    copy = tmp_path / "s.zarr"
    shutil.copytree(store, copy)
    spec = cfg.fields[0]
    assert consolidated_marker(copy, spec.name) is not None
    assert invalidate_field(copy, spec.name)
    assert consolidated_marker(copy, spec.name) is None
    assert zarr.open_group(str(copy), mode="r")["fields"][spec.name].attrs.get(COMPLETE) is None  # zarr's view too
    assert ingest_one(spec, str(copy), SPEC)["status"] == "ingested"
    rec = field_record(open_store(copy), spec.name)
    assert consolidated_marker(copy, spec.name) == rec is not None

    # deepfield reads the nodes' own metadata, never the consolidated copy: a marker removed behind the copy's
    # back is seen at once
    raw = zarr.open_group(str(copy), mode="a", use_consolidated=False)["fields"][spec.name]
    del raw.attrs[COMPLETE]
    assert field_record(open_store(copy), spec.name) is None and consolidated_marker(copy, spec.name) == rec
    # a kill between the marker and its consolidation (the copy without the marker, the group with it): the
    # next ingest skips the field and consolidates again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(copy))
    raw.attrs[COMPLETE] = rec
    assert consolidated_marker(copy, spec.name) is None and field_record(open_store(copy), spec.name) == rec
    assert ingest_one(spec, str(copy), SPEC)["status"] == "skipped"
    assert _without_mtimes(consolidated_marker(copy, spec.name)) == _without_mtimes(rec)

    # a re-ingest that fails half way leaves the field incomplete for outside readers too
    import deepfield.tasks.zarr_write as zw

    def dying_write(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(zw, "_write_pixels", dying_write)
    other = tmp_path / "other.zarr"
    shutil.copytree(copy, other)
    fimg = _field(spec.name, [27.0] * 4)
    with pytest.raises(OSError, match="disk full"):
        write_field(open_store(other, mode="a"), fimg, SPEC, {"inputs": "again"})
    assert field_record(open_store(other), spec.name) is None and consolidated_marker(other, spec.name) is None


def test_a_store_written_before_is_described_in_place_by_the_next_ingest(ingested, tmp_path):
    """A store as deepfield wrote it before the band array, the array attributes and the consolidated metadata:
    xarray warns and has no band labels; the next ingest skips its fields (their pixels and records untouched)
    and adds what is missing."""
    store, cfg = ingested
    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    raw = zarr.open_group(str(old), mode="a", use_consolidated=False)
    for f in cfg.fields:
        g = raw["fields"][f.name]
        shutil.rmtree(old / "fields" / f.name / "band")
        for name in ("image", "invvar", "mask"):
            meta = json.loads((old / "fields" / f.name / name / "zarr.json").read_text())
            meta["attributes"] = {}
            (old / "fields" / f.name / name / "zarr.json").write_text(json.dumps(meta))
        assert "band" not in g
    meta = json.loads((old / "zarr.json").read_text())
    del meta["consolidated_metadata"]
    (old / "zarr.json").write_text(json.dumps(meta))
    with pytest.warns(RuntimeWarning, match="consolidated"):
        ds = xr.open_zarr(old, group=f"fields/{cfg.fields[0].name}")
    assert "band" not in ds.coords and ds.image.attrs == {}
    shards = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in old.glob("fields/*/*/c/0/*/*")}
    records = {f.name: field_record(open_store(old), f.name) for f in cfg.fields}
    assert len(shards) == 2 * 3 * 16

    assert [ingest_one(f, str(old), SPEC)["status"] for f in cfg.fields] == ["skipped", "skipped"]
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in old.glob("fields/*/*/c/0/*/*")} == shards
    root = open_store(old)
    for f in cfg.fields:
        assert _without_mtimes(field_record(root, f.name)) == _without_mtimes(records[f.name])
        verify_shards(root["fields"][f.name], f.name)  # the band array is no shard of the record
        ds = open_field(old, f.name)
        new = open_field(store, f.name)
        assert [str(b) for b in ds.band.values] == list(root["fields"][f.name].attrs["bands"])
        for name in ("image", "invvar", "mask"):
            assert ds[name].attrs == new[name].attrs
        assert np.array_equal(ds.image.sel(band="i").values, new.image.sel(band="i").values, equal_nan=True)
