"""The cluster stage's field-level inference: the network runs once per field on the field's binned planes
grown by a halo filled from the neighbouring fields of the store; the tiles share its detections. Tiny
synthetic stores (fields of 256 or 512 px on one tangent plane, written as the ingest writes them) and a network
with random weights, so that nothing here depends on the shipped weights."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from astropy.wcs import WCS
from deepfield.models import cluster_net
from deepfield.tasks.fits_input import FieldImages
from deepfield.tasks.ingest_config import StoreSpec
from deepfield.tasks.stages import cluster as stage_mod
from deepfield.tasks.stages.cluster import ClusterStage
from deepfield.tasks.stages.cluster_planes import detect_planes, field_planes
from deepfield.tasks.tiling import TileId
from deepfield.tasks.zarr_read import field_grid, read_tile
from deepfield.tasks.zarr_store import StoreIntegrityError, open_store
from deepfield.tasks.zarr_write import write_field

BANDS = ["g", "r", "i", "z"]
N, SCALE, BIN = 256, 0.2, 8  # field side (px), arcsec per pixel, the network's binning
SHIFT = (203, 13)  # field B's pixel (x, y) is field A's (x - 203, y - 13): B adjoins A on A's right


def _wcs(dx: float = 0.0, dy: float = 0.0, scale: float = SCALE) -> WCS:
    """A TAN WCS of a field whose pixel (x, y) is pixel (x + dx, y + dy) of the field with dx = dy = 0 (one
    tangent plane, as the patches of one tract)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [N / 2 + 0.5 - dx, N / 2 + 0.5 - dy]  # FITS pixels are 1-based
    w.wcs.cdelt = [-scale / 3600, scale / 3600]
    return w


def _field(name: str, wcs: WCS, seed: int, bands=BANDS, bright=None, n: int = N, scale: float = SCALE
           ) -> FieldImages:
    """n x n px of unit-noise sky (invvar 1) in every band; `bright`: (y0, y1, x0, x1) pixels 30 sigma
    brighter."""
    rng = np.random.default_rng(seed)
    nb = len(bands)
    image = rng.normal(0.0, 1.0, (nb, n, n)).astype(np.float32)
    if bright is not None:
        y0, y1, x0, x1 = bright
        image[:, y0:y1, x0:x1] += 30.0
    return FieldImages(name=name, bands=list(bands), image=image, invvar=np.ones_like(image),
                       mask=np.zeros(image.shape, np.uint16), wcs_header=wcs.to_header(), zeropoints=[27.0] * nb,
                       psf_fwhm=[1.0] * nb, pixel_scale=scale)


def _store(path, *fields: FieldImages, tile: int = 64):
    root = open_store(path, mode="a")
    for f in fields:
        write_field(root, f, StoreSpec(tile=tile, chunk=32), {"inputs": f.name})
    return open_store(path)


def _tiles(root, field: str) -> list:
    return [read_tile(root, t, 0) for t in field_grid(root, field, 0).tiles(field)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights file of the network with random weights (whatever its architecture is now)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "cluster_net.pt"
    torch.save({"arch": {}, "state_dict": cluster_net.ClusterNet().state_dict()}, path)
    return str(path)


def _stage(weights, **params) -> ClusterStage:
    torch.set_num_threads(1)
    s = ClusterStage(weights=weights, **params)
    s.setup("cpu")
    return s


@pytest.fixture(scope="module")
def two_fields(tmp_path_factory):
    """Field A and field B beside it (B's pixel = A's pixel - SHIFT, 53 px of overlap), with a bright 8 x 8
    px block in B at B's binned pixel (row 5, column 10)."""
    path = tmp_path_factory.mktemp("two") / "store.zarr"
    return _store(path, _field("A", _wcs(), 1), _field("B", _wcs(*SHIFT), 2, bright=(40, 48, 80, 88)))


def test_field_level_detections_are_the_networks_on_the_field_and_tiles_partition_them(tmp_path, weights,
                                                                                         monkeypatch):
    n = 512
    root = _store(tmp_path / "store.zarr", _field("A", _wcs(), 3, n=n), tile=128)
    stage = _stage(weights, threshold=0.01, halo_arcsec=32.0)  # 0.01: every local maximum of the heat map
    calls = []
    detect = cluster_net.detect
    monkeypatch.setattr(cluster_net, "detect", lambda *a, **k: calls.append(a[1].shape) or detect(*a, **k))
    tiles = _tiles(root, "A")
    assert len(tiles) == 16
    tables = []
    for t in tiles:
        stage.run(t, pd.DataFrame())
        tables.append(t.tables["clusters"])
    halo = 20  # 32" at 1.6" per binned pixel
    assert calls == [(5, n // BIN + 2 * halo, n // BIN + 2 * halo)]  # once for the field, with its halo

    planes = stage.extended_planes(tiles[0])
    assert np.array_equal(planes[:, halo:-halo, halo:-halo], field_planes(root["fields"]["A"], BANDS, BIN))
    assert not planes[:, :halo].any() and not planes[:, -halo:].any()  # no other field: zero, coverage 0
    want = detect(stage.model, planes, 0.01)
    x = (want["x"] - halo) * BIN + (BIN - 1) / 2
    y = (want["y"] - halo) * BIN + (BIN - 1) / 2
    on = (x >= -0.5) & (x < n - 0.5) & (y >= -0.5) & (y < n - 0.5)
    assert 10 < on.sum() < len(x)  # many in the field, some in the halo (in no tile)
    got = pd.concat(tables, ignore_index=True).sort_values("score", ascending=False, kind="stable")
    assert len(got) == on.sum()  # each in exactly one tile
    np.testing.assert_array_equal(got.x, x[on])
    np.testing.assert_array_equal(got.y, y[on])
    for k in ("score", "z", "richness"):
        np.testing.assert_array_equal(got[k], want[k][on])
    for t, table in zip(tiles, tables):
        c = t.core
        assert ((table.x >= c.x0 - 0.5) & (table.x < c.x1 - 0.5) & (table.y >= c.y0 - 0.5)
                & (table.y < c.y1 - 0.5)).all()
        assert (table.field == "A").all() and (table.tile == str(t.id)).all()
        ra, dec = _wcs().all_pix2world(table.x, table.y, 0)  # the field's own WCS
        np.testing.assert_allclose(table.ra, ra, rtol=0, atol=1e-9)
        np.testing.assert_allclose(table.dec, dec, rtol=0, atol=1e-9)


def test_a_field_on_another_grid_is_binned_to_the_training_skies_angle(tmp_path, weights, monkeypatch):
    """The network learned clusters on 1.6" binned pixels (8 x 0.2"): a field of 0.262" per pixel (the Legacy
    Surveys') is binned 6 x 6 (1.57"), one of 0.168" (HSC) 10 x 10; the halo is counted in those binned pixels,
    the detections come back in the field's own pixels, and a neighbour on the other grid fills no halo."""
    assert [cluster_net.ClusterNet().field_bin(s) for s in (0.2, 0.168, 0.262, 1.6, 5.0)] == [8, 10, 6, 1, 1]
    n, scale, b = 384, 0.262, 6
    root = _store(tmp_path / "store.zarr", _field("L", _wcs(scale=scale), 4, n=n, scale=scale),
                  _field("R", _wcs(100, 0), 5, n=n), tile=128)
    stage = _stage(weights, threshold=0.01, halo_arcsec=32.0)
    calls = []
    detect = cluster_net.detect
    monkeypatch.setattr(cluster_net, "detect", lambda *a, **k: calls.append(a[1].shape) or detect(*a, **k))
    tiles = _tiles(root, "L")
    for t in tiles:
        stage.run(t, pd.DataFrame())
    halo = round(32.0 / (scale * b))  # 20 binned pixels
    assert calls == [(5, n // b + 2 * halo, n // b + 2 * halo)]
    planes = stage.extended_planes(tiles[0])
    assert np.array_equal(planes[:, halo:-halo, halo:-halo], field_planes(root["fields"]["L"], BANDS, b))
    assert stage.neighbours(root["fields"]["L"], 32.0) == ["R"]  # R covers L's halo...
    assert not planes[:, :halo].any() and not planes[:, -halo:].any()  # ...but binned by 8 (0.2"), fills none
    want = detect(stage.model, planes, 0.01)
    x, y = (want["x"] - halo) * b + (b - 1) / 2, (want["y"] - halo) * b + (b - 1) / 2
    on = (x >= -0.5) & (x < n - 0.5) & (y >= -0.5) & (y < n - 0.5)
    got = pd.concat([t.tables["clusters"] for t in tiles], ignore_index=True)
    assert len(got) == on.sum() > 0
    np.testing.assert_array_equal(np.sort(got.x.to_numpy()), np.sort(x[on]))
    np.testing.assert_array_equal(np.sort(got.y.to_numpy()), np.sort(y[on]))


def test_halo_is_filled_from_the_neighbouring_field(two_fields, weights):
    stage = _stage(weights, halo_arcsec=16.0)  # 10 binned pixels
    h, n = 10, N // BIN
    planes = stage.extended_planes(read_tile(two_fields, TileId("A", 0, 0), 0))
    a, b = (field_planes(two_fields["fields"][f], BANDS, BIN) for f in ("A", "B"))
    assert planes.shape == (5, n + 2 * h, n + 2 * h)
    assert np.array_equal(planes[:, h:h + n, h:h + n], a)  # the field's own planes are its own
    # A's binned pixel (i, j) is A's pixels 8i..8i+7 x 8j..8j+7, centre (8j + 3.5, 8i + 3.5): B's pixel
    # (8j - 199.5, 8i - 9.5), in B's binned pixel (i - 2, j - 25). B's bright block (B's pixels y 40-47,
    # x 80-87: B's binned (5, 10)) is then at A's binned (7, 35), right of A (A's binned columns end at 31)
    assert np.array_equal(planes[:, 7 + h, 35 + h], b[:, 5, 10])
    assert planes[0, 7 + h, 35 + h] > 4 and planes[0, 7 + h, 35 + h] == planes[0].max()
    for i in range(-h, n + h):
        for j in range(-h, n + h):
            if 0 <= i < n and 0 <= j < n:
                continue
            bi, bj = i - 2, j - 25
            if 0 <= bi < n and 0 <= bj < n:  # B covers: B's planes, coverage 1
                assert np.array_equal(planes[:, i + h, j + h], b[:, bi, bj]), (i, j)
            else:  # no field covers: 0, coverage 0
                assert not planes[:, i + h, j + h].any(), (i, j)


def test_a_cluster_on_the_edge_is_seen_across_it(two_fields, weights):
    """The tiles of B see A's pixels beyond B's left edge: the field-level planes of B hold A's."""
    stage = _stage(weights, halo_arcsec=16.0)
    h = 10
    planes = stage.extended_planes(read_tile(two_fields, TileId("B", 1, 0), 0))
    a = field_planes(two_fields["fields"]["A"], BANDS, BIN)
    # B's binned (i, j), centre (8j + 3.5, 8i + 3.5), is A's pixel (8j + 206.5, 8i + 16.5): A's binned (i + 2, j + 25)
    for i, j in [(0, -1), (5, -10), (29, -3)]:
        assert np.array_equal(planes[:, i + h, j + h], a[:, i + 2, j + 25])
    assert not planes[:, 30 + h:, :h].any()  # A ends 2 binned rows above B's bottom


def test_the_neighbours_planes_are_binned_once_per_actor(two_fields, weights, monkeypatch):
    stage = _stage(weights, halo_arcsec=16.0)
    binned = []
    fp = stage_mod.field_planes
    monkeypatch.setattr(stage_mod, "field_planes", lambda g, *a, **k: binned.append(g.path) or fp(g, *a, **k))
    for field in ("A", "B"):
        for t in _tiles(two_fields, field):
            stage.run(t, pd.DataFrame())
    assert sorted(binned) == ["fields/A", "fields/B"]


def test_a_neighbour_without_the_bands_covers_nothing(tmp_path, weights):
    root = _store(tmp_path / "store.zarr", _field("A", _wcs(), 1), _field("B", _wcs(*SHIFT), 2, bands=["g", "r"]))
    planes = _stage(weights, halo_arcsec=16.0).extended_planes(read_tile(root, TileId("A", 0, 0), 0))
    assert not planes[-1, :, 10 + 32:].any()


def test_a_damaged_neighbour_is_an_error_naming_it(tmp_path, weights):
    root = _store(tmp_path / "store.zarr", _field("A", _wcs(), 1), _field("B", _wcs(*SHIFT), 2))
    tile = read_tile(root, TileId("A", 0, 0), 0)
    shard = tmp_path / "store.zarr" / "fields" / "B" / "image" / "c" / "0" / "1" / "2"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same size: only the checksum finds it
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreIntegrityError, match="field 'B'"):
        _stage(weights).run(tile, pd.DataFrame())
    shard.write_bytes(bytes(data[:-10]))  # truncated: found by its size before it is read
    with pytest.raises(StoreIntegrityError, match="field 'B'"):
        _stage(weights).run(tile, pd.DataFrame())


def test_missing_bands_and_a_tile_not_from_a_store_are_errors(two_fields, weights):
    stage = _stage(weights)
    tile = read_tile(two_fields, TileId("A", 0, 0), 0)
    tile.bands = ["g", "r", "i"]
    with pytest.raises(ValueError, match="field A lacks \\['z'\\]"):
        stage.run(tile, pd.DataFrame())
    tile = read_tile(two_fields, TileId("A", 0, 0), 0)
    tile.group = None
    with pytest.raises(ValueError, match="was not read from a store"):
        stage.run(tile, pd.DataFrame())


def test_blocks_keep_the_detections_of_their_cores(monkeypatch):
    """A large field runs in blocks: with a detector that sees no context (every pixel of plane 0 above the
    threshold), the blocks' detections are the whole planes', each once."""
    def pixels(model, planes, threshold, device="cpu"):
        y, x = np.nonzero(planes[0] > threshold)
        return {"x": x.astype(float), "y": y.astype(float), "score": planes[0, y, x].astype(float),
                "z": x * 0.0 + 0.5, "richness": x * 0.0 + 20.0}

    monkeypatch.setattr(cluster_net, "detect", pixels)
    planes = np.random.default_rng(4).uniform(0, 1, (5, 150, 230)).astype(np.float32)
    whole = detect_planes(None, planes, 0.98, max_side=256)
    blocks = detect_planes(None, planes, 0.98, max_side=64, halo=8)  # cores of 48: 4 x 5 blocks
    assert len(whole["x"]) > 100
    a, b = np.lexsort((whole["x"], whole["y"])), np.lexsort((blocks["x"], blocks["y"]))
    for k in whole:
        np.testing.assert_array_equal(blocks[k][b], whole[k][a])
    assert (np.diff(blocks["score"]) <= 0).all()


def test_a_neighbours_reingest_redoes_the_tiles_that_read_it(tmp_path):
    """With the cluster stage in a run, a field's input key covers its neighbours within the halo: changing
    field B's ingested inputs changes A's key (A's tiles read B's pixels), a far field C changes nothing;
    without a stage that reads beyond its field, A's key is its own fingerprint alone."""
    from deepfield.tasks.provenance import input_keys, run_keys, sky_reach
    from deepfield.tasks.zarr_store import input_fingerprint
    far = (5000, 0)  # 1000" away: beyond any halo
    root = _store(tmp_path / "s.zarr", _field("A", _wcs(), 1), _field("B", _wcs(*SHIFT), 2),
                  _field("C", _wcs(*far), 3))
    stages = [("background", {}), ("cluster", {})]
    assert sky_reach(stages) == 128.0 and sky_reach([("background", {})]) == 0.0
    before = input_keys(root, ["A", "B", "C"], 128.0)
    assert input_keys(root, ["A"], 0.0) == {"A": input_fingerprint(root, "A")}
    root = open_store(tmp_path / "s.zarr", mode="a")
    write_field(root, _field("B", _wcs(*SHIFT), 9), StoreSpec(tile=64, chunk=32), {"inputs": "B, again"})
    root = open_store(tmp_path / "s.zarr")
    after = input_keys(root, ["A", "B", "C"], 128.0)
    assert after["A"] != before["A"] and after["B"] != before["B"] and after["C"] == before["C"]
    keys = run_keys(stages, "h", root, ["A", "C"])
    assert keys.inputs == {"A": after["A"], "C": after["C"]}


def test_the_actors_of_a_run_share_each_fields_planes_and_detections(tmp_path, weights, monkeypatch):
    """Inside a run (a shared directory, as the tile runner gives every stage), the first actor to need a
    field's binned planes or detections computes them and the others read them: the same tables, each field
    binned once and the network run once for all; another threshold computes the detections again (not the
    planes), a damaged file is computed again, a re-ingested neighbour makes the field's detections and the
    neighbour's planes new."""
    import multiprocessing
    import threading

    from deepfield.tasks.locks import waiting
    root = _store(tmp_path / "store.zarr", _field("A", _wcs(), 1),
                  _field("B", _wcs(*SHIFT), 2, bright=(40, 48, 80, 88)))
    shared = tmp_path / "run" / "cache" / "cluster"
    binned, ran = [], []
    fp, dp = stage_mod.field_planes, stage_mod.detect_planes
    monkeypatch.setattr(stage_mod, "field_planes", lambda g, *a, **k: binned.append(g.path) or fp(g, *a, **k))
    monkeypatch.setattr(stage_mod, "detect_planes", lambda *a, **k: ran.append(1) or dp(*a, **k))

    def actor(threshold=0.01):  # a new stage object: another actor's
        s = _stage(weights, halo_arcsec=16.0, threshold=threshold)
        s.shared_dir = shared
        return s

    def tables(stage, field="A"):
        out = []
        for t in _tiles(root, field):
            stage.run(t, pd.DataFrame())
            out.append(t.tables["clusters"])
        return pd.concat(out, ignore_index=True)

    def counts():
        out = (sorted(binned), len(ran))
        binned.clear()
        ran.clear()
        return out

    want = tables(_stage(weights, halo_arcsec=16.0, threshold=0.01))  # outside a run: computed by itself
    assert len(want) > 3 and counts() == (["fields/A", "fields/B"], 1)
    pd.testing.assert_frame_equal(tables(actor()), want)  # the first actor of a run
    assert counts() == (["fields/A", "fields/B"], 1)
    assert len(list((shared / "A").glob("detections.*.npz"))) == 1
    assert [len(list((shared / f).glob("planes.*.npy"))) for f in "AB"] == [1, 1]
    pd.testing.assert_frame_equal(tables(actor()), want)  # a second actor: read, nothing computed
    assert counts() == ([], 0)
    tables(actor(), "B")  # field B's tiles: its planes and A's (its neighbour) are there
    assert counts() == ([], 1)

    # the lock is waited for: held by another process, a reader gets the file only after it lets go
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()

    def hold():
        with waiting(shared / "A" / ".detections.lock"):
            held.set()
            release.wait(30)
    p = ctx.Process(target=hold)
    p.start()
    assert held.wait(30)
    got = {}
    reader = threading.Thread(target=lambda: got.update(t=tables(actor())))
    reader.start()
    reader.join(1.0)
    assert reader.is_alive() and not got  # waiting for the lock
    release.set()
    reader.join(60)
    p.join(30)
    pd.testing.assert_frame_equal(got["t"], want)
    assert counts() == ([], 0)

    # another configuration: its own detections (the older file goes), the same planes
    other = tables(actor(threshold=0.1))
    assert 0 < len(other) < len(want) and counts() == ([], 1)
    assert len(list((shared / "A").glob("detections.*.npz"))) == 1

    # damaged files: computed again and rewritten
    path = next((shared / "A").glob("detections.*.npz"))
    path.write_bytes(b"not an npz")
    next((shared / "B").glob("planes.*.npy")).write_bytes(b"not an npy")
    pd.testing.assert_frame_equal(tables(actor(threshold=0.1)), other)
    assert counts() == (["fields/B"], 1) and np.load(path)["x"].size > 0

    # the neighbour re-ingested (another completion record): A's detections and B's planes are new
    write_field(open_store(tmp_path / "store.zarr", mode="a"), _field("B", _wcs(*SHIFT), 3),
                StoreSpec(tile=64, chunk=32), {"inputs": "B again"})
    root = open_store(tmp_path / "store.zarr")
    tables(actor())
    assert counts() == (["fields/B"], 1)
    assert [len(list((shared / f).glob("planes.*.npy"))) for f in "AB"] == [1, 1]


def test_a_shared_directory_that_cannot_be_written_only_costs_the_sharing(tmp_path, weights, monkeypatch, caplog):
    """No lock possible (the shared directory's place is a file) or no room to write: a warning, and the stage's
    tables are those it gives outside a run."""
    import errno

    from deepfield.tasks import atomic
    root = _store(tmp_path / "store.zarr", _field("A", _wcs(), 1))
    tiles = _tiles(root, "A")

    def tables(shared):
        s = _stage(weights, threshold=0.01)
        s.shared_dir = shared
        out = []
        for t in tiles:
            s.run(t, pd.DataFrame())
            out.append(t.tables["clusters"])
        return pd.concat(out, ignore_index=True)
    want = tables(None)
    (tmp_path / "afile").write_text("")
    with caplog.at_level("WARNING", logger="deepfield.tasks.atomic"):
        pd.testing.assert_frame_equal(tables(tmp_path / "afile" / "cache"), want)
    assert "no lock in" in caplog.text

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(atomic, "atomic_path", full)
    caplog.clear()
    with caplog.at_level("WARNING", logger="deepfield.tasks.atomic"):
        pd.testing.assert_frame_equal(tables(tmp_path / "run" / "cache"), want)
    assert "cannot write" in caplog.text and not list((tmp_path / "run" / "cache").rglob("*.np*"))
