"""tasks.zarr_store.open_store for writing: a store is opened once per process (zarr parses the root's zarr.json,
consolidated metadata included, on every open: O(fields) per field ingested), and a directory replaced in its place
is opened afresh, so that a Zarr group that is not a deepfield store is still refused."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from astropy.io import fits

from deepfield.tasks import zarr_store
from deepfield.tasks.fits_input import FieldImages
from deepfield.tasks.ingest_config import StoreSpec
from deepfield.tasks.zarr_store import StoreError, consolidate_fields, field_record, metadata_lock, open_store
from deepfield.tasks.zarr_write import write_field


@pytest.fixture
def opens(monkeypatch):
    """Counts zarr.open_group calls made by open_store (of a path)."""
    calls = []
    real = zarr.open_group

    def counted(*args, **kwargs):
        store = args[0] if args else kwargs.get("store")
        if not isinstance(store, zarr.abc.store.Store):  # write_field opens `fields` as a LocalStore of its own
            calls.append(store)
        return real(*args, **kwargs)

    monkeypatch.setattr(zarr_store.zarr, "open_group", counted)
    zarr_store.forget_stores()
    yield calls
    zarr_store.forget_stores()


def _field(name: str) -> FieldImages:
    rng = np.random.default_rng(0)
    return FieldImages(name=name, bands=["g", "r"], image=rng.normal(size=(2, 64, 64)).astype(np.float32),
                       invvar=np.ones((2, 64, 64), np.float32), mask=np.zeros((2, 64, 64), np.uint16),
                       wcs_header=fits.Header(), zeropoints=[27.0, 27.0], psf_fwhm=[0.8, 0.8], pixel_scale=0.2,
                       checksums={}, resampled=[], notes=[])


def test_a_store_is_opened_once_and_its_fields_written_through_it(tmp_path, opens):
    path = tmp_path / "s.zarr"
    root = open_store(path, mode="a")
    assert len(opens) == 1 and root.attrs["deepfield_store"] == 1
    spec = StoreSpec(tile=64, chunk=64)
    for name in ("a", "b"):  # each write rewrites the root's zarr.json (its consolidated metadata)
        write_field(open_store(path, mode="a"), _field(name), spec, {"checksums": {}})
    with metadata_lock(root):
        consolidate_fields(root, ["a"])
    assert open_store(path, mode="a") is root and len(opens) == 1
    assert field_record(open_store(path), "b")["checksums"] == {}  # reading opens afresh, and sees the writes
    assert len(opens) == 2


def test_a_directory_replaced_in_its_place_is_opened_afresh(tmp_path, opens):
    path = tmp_path / "s.zarr"
    open_store(path, mode="a")
    shutil.rmtree(path)  # the same path, perhaps the same inode: another Zarr group, not a deepfield store
    other = zarr.create_group(str(path))
    other.create_group("something")
    with pytest.raises(StoreError, match="not a deepfield store; refusing to write into it"):
        open_store(path, mode="a")
    shutil.rmtree(path)  # and an empty directory becomes a new store
    path.mkdir()
    root = open_store(path, mode="a")
    assert root.attrs["deepfield_store"] == 1 and "fields" in root
    assert len(opens) == 3


def test_a_field_is_created_without_reading_the_root_metadata(tmp_path, monkeypatch):
    """write_field makes a field's group and arrays without zarr reading the store root's zarr.json, which holds
    every field's consolidated metadata (zarr checks each parent of a node it makes up to its store's root: through
    the root that file was parsed five times a field, O(fields) per field). The field reads back whole."""
    path = tmp_path / "s.zarr"
    root = open_store(path, mode="a")
    spec = StoreSpec(tile=64, chunk=64)
    write_field(root, _field("a"), spec, {"checksums": {}})  # the root now holds consolidated metadata
    assert "consolidated_metadata" in (path / "zarr.json").read_text()
    reads = []
    real = zarr.storage.LocalStore.get

    async def get(self, key, *args, **kwargs):
        reads.append((str(self.root), key))
        return await real(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)
    write_field(root, _field("b"), spec, {"checksums": {}})
    assert reads and (str(path), "zarr.json") not in reads, reads
    monkeypatch.undo()
    zarr_store.forget_stores()
    again = open_store(path)
    assert field_record(again, "b")["checksums"] == {} and sorted(again["fields"].group_keys()) == ["a", "b"]
    np.testing.assert_array_equal(again["fields/b/image"][:], _field("b").image)
