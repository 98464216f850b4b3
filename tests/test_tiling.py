"""Properties of the tiling geometry (tasks/tiling.py): cores partition the field, halos are the
clipped growth of cores, primary flags pick exactly one tile / one field, and sky ownership agrees
with the simulator's nearest-centre truth."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from deepfield.tasks.sim.config import SimConfig
from deepfield.tasks.sim.layout import field_wcs, nearest_field, survey_layout, survey_plane
from deepfield.tasks.tiling import Box, SkyField, TileGrid, TileId, is_primary_field, owner, pixel_index

grids = st.builds(TileGrid, ny=st.integers(1, 60), nx=st.integers(1, 60), tile=st.integers(1, 25),
                  halo=st.integers(0, 12))
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- tile ids and boxes

@given(field=st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=20),
       ty=st.integers(0, 10**6), tx=st.integers(0, 10**6))
def test_tile_id_round_trip(field, ty, tx):
    tid = TileId(field, ty, tx)
    assert TileId.parse(str(tid)) == tid


def test_tile_id_format_and_errors():
    assert str(TileId("field000", 1, 2)) == "field000/1_2"
    assert TileId.parse("field000/1_2") == TileId("field000", 1, 2)
    assert TileId("a", 0, 5) < TileId("a", 1, 0) < TileId("b", 0, 0)
    for bad in ("field000", "field000/1", "field000/1_2_3", "field000/a_2", "/1_2", "f/-1_2"):
        with pytest.raises(ValueError):
            TileId.parse(bad)
    with pytest.raises(ValueError):
        TileId("f", -1, 0)


def test_grid_validation():
    for args in ((0, 5, 2, 0), (5, 0, 2, 0), (5, 5, 0, 0), (5, 5, 2, -1), (-3, 5, 2, 0)):
        with pytest.raises(ValueError):
            TileGrid(*args)
    with pytest.raises(ValueError):
        TileGrid(10, 10, 4, 1).core(3, 0)
    with pytest.raises(ValueError):
        Box(5, 4, 0, 1)


def test_pixel_index_edges():
    c = np.array([-0.5, -0.5000001, 0.49999999999999994, 0.5, 1.4999999999999998, 2.0, -0.7, 1e6 + 0.5])
    np.testing.assert_array_equal(pixel_index(c), [0, -1, 0, 1, 1, 2, -1, 1_000_001])
    g = TileGrid(10, 10, 4, 1)
    assert not any(g.is_primary(t.ty, t.tx, np.array([np.nan, 1.0]), np.array([1.0, np.inf])).any()
                   for t in g.tiles("f"))


def test_box_basics():
    b = Box(2, 7, 3, 5)
    assert b.shape == (5, 2) and b.size == 10
    assert b.intersect(Box(0, 4, 4, 10)) == Box(2, 4, 4, 5)
    assert b.intersect(Box(10, 12, 0, 1)).size == 0
    assert list(b.contains(np.array([2, 6, 7, 2]), np.array([3, 4, 4, 5]))) == [True, True, False, False]
    assert b.offset_of(Box(3, 5, 4, 5)) == (slice(1, 3), slice(1, 2))
    with pytest.raises(ValueError):
        b.offset_of(Box(0, 3, 3, 5))


# ---------------------------------------------------------------- cores and halos

@FAST
@given(grids)
def test_cores_partition_field_and_halos_are_clipped_growth(g):
    count = np.zeros((g.ny, g.nx), dtype=int)
    T, H = g.tile, g.halo
    assert g.n_ty == -(-g.ny // T) and g.n_tx == -(-g.nx // T)
    ids = g.tiles("f")
    assert ids == sorted(ids) and len(ids) == g.n_ty * g.n_tx
    assert [(t.ty, t.tx) for t in ids] == [(a, b) for a in range(g.n_ty) for b in range(g.n_tx)]
    for tid in ids:
        c, h = g.core(tid.ty, tid.tx), g.halo_box(tid.ty, tid.tx)
        assert c.size > 0
        assert (c.y0, c.x0) == (tid.ty * T, tid.tx * T)
        count[c.slices] += 1
        # halo contains the core and is clipped to the field
        assert h.intersect(c) == c
        assert 0 <= h.y0 and h.y1 <= g.ny and 0 <= h.x0 and h.x1 <= g.nx
        # halo width is exactly H on every side where not clipped
        assert c.y0 - h.y0 == min(H, c.y0)
        assert c.x0 - h.x0 == min(H, c.x0)
        assert h.y1 - c.y1 == min(H, g.ny - c.y1)
        assert h.x1 - c.x1 == min(H, g.nx - c.x1)
    assert np.all(count == 1)


@FAST
@given(g=grids, data=st.data())
def test_tile_of_agrees_with_core_membership(g, data):
    n = 50
    y = np.array(data.draw(st.lists(st.integers(0, g.ny - 1), min_size=n, max_size=n)))
    x = np.array(data.draw(st.lists(st.integers(0, g.nx - 1), min_size=n, max_size=n)))
    ty, tx = g.tile_of(y, x)
    for t in g.tiles("f"):
        inside = g.core(t.ty, t.tx).contains(y, x)
        np.testing.assert_array_equal(inside, (ty == t.ty) & (tx == t.tx))
    with pytest.raises(ValueError):
        g.tile_of(np.array([g.ny]), np.array([0]))


@FAST
@given(g=grids, data=st.data())
def test_is_primary_exactly_one_tile_inside_none_outside(g, data):
    n = 40
    fy = st.floats(-0.5, g.ny - 0.5, exclude_max=True)
    fx = st.floats(-0.5, g.nx - 0.5, exclude_max=True)
    y = np.array(data.draw(st.lists(fy, min_size=n, max_size=n)) + [-0.5, g.ny - 0.5 - 1e-9, 0.49999])
    x = np.array(data.draw(st.lists(fx, min_size=n, max_size=n)) + [-0.5, -0.5, g.nx - 0.5 - 1e-9])
    below = st.floats(-6, -0.5, exclude_max=True)
    above_y, above_x = st.floats(g.ny - 0.5, g.ny + 6), st.floats(g.nx - 0.5, g.nx + 6)
    k = n // 4
    out_y = np.array(data.draw(st.lists(below, min_size=k, max_size=k))
                     + data.draw(st.lists(above_y, min_size=k, max_size=k))
                     + data.draw(st.lists(fy, min_size=2 * k, max_size=2 * k)) + [-0.7, g.ny - 0.5, 0.0])
    out_x = np.array(data.draw(st.lists(fx, min_size=2 * k, max_size=2 * k))
                     + data.draw(st.lists(below, min_size=k, max_size=k))
                     + data.draw(st.lists(above_x, min_size=k, max_size=k)) + [0.0, 0.0, g.nx - 0.5])
    total_in = np.zeros(len(y), int)
    total_out = np.zeros(len(out_y), int)
    ty, tx = g.tile_of(pixel_index(y), pixel_index(x))
    for t in g.tiles("f"):
        p = g.is_primary(t.ty, t.tx, x, y)
        np.testing.assert_array_equal(p, (ty == t.ty) & (tx == t.tx))
        total_in += p
        total_out += g.is_primary(t.ty, t.tx, out_x, out_y)
    assert np.all(total_in == 1)
    assert np.all(total_out == 0)


@FAST
@given(g=grids, data=st.data())
def test_halo_read_equals_direct_slice(g, data):
    arr = data.draw(arrays(np.float32, (2, g.ny, g.nx), elements=st.floats(-1e3, 1e3, width=32)))
    ty = data.draw(st.integers(0, g.n_ty - 1))
    tx = data.draw(st.integers(0, g.n_tx - 1))
    T, H = g.tile, g.halo
    y0, y1 = max(ty * T - H, 0), min((ty + 1) * T + H, g.ny)
    x0, x1 = max(tx * T - H, 0), min((tx + 1) * T + H, g.nx)
    box = g.halo_box(ty, tx)
    read = arr[(Ellipsis, *box.slices)]
    np.testing.assert_array_equal(read, arr[:, y0:y1, x0:x1])
    core = g.core(ty, tx)
    cropped = read[(Ellipsis, *box.offset_of(core))]
    np.testing.assert_array_equal(cropped, arr[:, ty * T:min((ty + 1) * T, g.ny), tx * T:min((tx + 1) * T, g.nx)])


# ---------------------------------------------------------------- sky ownership

PIX = 0.2  # arcsec / pixel


def _grid_fields(ra0, dec0, size, overlap, rows, cols):
    """Fields on a regular grid on a tangent plane about (ra0, dec0), step = width - overlap."""
    plane = survey_plane(SimConfig(ra0=ra0, dec0=dec0))
    step = size * PIX - overlap
    out, centres_uv = [], []
    for r in range(rows):
        for c in range(cols):
            sky = plane.pixel_to_world(c * step, r * step)
            w = field_wcs(float(sky.ra.deg), float(sky.dec.deg), size, PIX)
            out.append(SkyField(f"field{len(out):03d}", w, size, size))
            centres_uv.append((c * step, r * step))
    return out, plane, step


def _sep_deg(ra1, dec1, ra2, dec2):
    """Haversine angular separation in degrees (independent of astropy)."""
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    a = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(a)))


layouts = st.tuples(st.integers(64, 400), st.floats(0.05, 0.45), st.sampled_from([(1, 2), (2, 1), (2, 2), (1, 3)]),
                    st.floats(0.0, 359.0), st.floats(-80.0, 80.0))


@SLOW
@given(layout=layouts, seed=st.integers(0, 2**32 - 1))
def test_each_point_in_union_has_exactly_one_owner(layout, seed):
    size, ofrac, (rows, cols), ra0, dec0 = layout
    width = size * PIX
    fields, plane, step = _grid_fields(ra0, dec0, size, ofrac * width, rows, cols)
    rng = np.random.default_rng(seed)
    n = 400
    u = rng.uniform(-width / 2 - 5, (cols - 1) * step + width / 2 + 5, n)
    v = rng.uniform(-width / 2 - 5, (rows - 1) * step + width / 2 + 5, n)
    sky = plane.pixel_to_world(u, v)
    ra, dec = sky.ra.deg, sky.dec.deg
    own = owner(ra, dec, fields)
    contains = np.stack([f.contains(ra, dec) for f in fields])
    prim = np.stack([is_primary_field(f.name, ra, dec, fields) for f in fields])
    inside = contains.any(axis=0)
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(own == -1, ~inside)
    np.testing.assert_array_equal(prim.sum(axis=0), inside.astype(int))
    idx = np.flatnonzero(inside)
    assert np.all(contains[own[idx], idx])
    assert np.all(prim[own[idx], idx])
    # the owner's centre is the nearest among the fields holding the point
    cra = np.array([f.centre.ra.deg for f in fields])
    cdec = np.array([f.centre.dec.deg for f in fields])
    sep = _sep_deg(ra[None, :], dec[None, :], cra[:, None], cdec[:, None])
    sep_in = np.where(contains, sep, np.inf)
    own_sep = sep[own[idx], idx]
    assert np.all(own_sep <= sep_in[:, idx].min(axis=0) + 1e-12)


@SLOW
@given(size=st.integers(64, 400), ofrac=st.floats(0.1, 0.45), seed=st.integers(0, 2**32 - 1),
       dec0=st.floats(-80.0, 80.0))
def test_overlap_owned_by_nearer_centre_and_outside_unowned(size, ofrac, seed, dec0):
    width = size * PIX
    overlap = ofrac * width
    fields, plane, step = _grid_fields(150.0, dec0, size, overlap, 1, 2)
    rng = np.random.default_rng(seed)
    n = 200
    # strictly inside the overlap strip u in [step - W/2, W/2], away from its edges and the midline
    margin = min(1.0, overlap / 10)
    u = rng.uniform(step - width / 2 + margin, width / 2 - margin, n)
    v = rng.uniform(-width / 2 + margin, width / 2 - margin, n)
    sky = plane.pixel_to_world(u, v)
    ra, dec = sky.ra.deg, sky.dec.deg
    assert fields[0].contains(ra, dec).all() and fields[1].contains(ra, dec).all()
    c0, c1 = fields[0].centre, fields[1].centre
    nearer1 = _sep_deg(ra, dec, c1.ra.deg, c1.dec.deg) < _sep_deg(ra, dec, c0.ra.deg, c0.dec.deg)
    np.testing.assert_array_equal(owner(ra, dec, fields), nearer1.astype(int))
    np.testing.assert_array_equal(is_primary_field("field001", ra, dec, fields), nearer1)
    # well outside every field: left of field 0, right of field 1, above, below, and far away
    uo = np.concatenate([rng.uniform(-width, -width / 2 - 0.5, 20), rng.uniform(step + width / 2 + 0.5, 3 * width, 20),
                         rng.uniform(0, step, 40)])
    vo = np.concatenate([rng.uniform(-width, width, 40), rng.choice([-1, 1], 40) * rng.uniform(width / 2 + 0.5, width, 40)])
    out = plane.pixel_to_world(uo, vo)
    ra_o = np.append(out.ra.deg, (150.0 + 180.0, 150.0))
    dec_o = np.append(out.dec.deg, (-dec0, dec0 + (5.0 if dec0 < 0 else -5.0)))
    assert np.all(owner(ra_o, dec_o, fields) == -1)
    assert not is_primary_field("field000", ra_o, dec_o, fields).any()


@SLOW
@given(fields=st.integers(2, 4), size=st.integers(64, 300), ofrac=st.floats(0.02, 0.45),
       seed=st.integers(0, 2**32 - 1))
def test_owner_matches_simulator_nearest_field(fields, size, ofrac, seed):
    cfg = SimConfig(size=size, fields=fields, overlap=ofrac * size * PIX, pixel_scale=PIX)
    layout = survey_layout(cfg)
    sky_fields = [SkyField(f.name, f.wcs(), f.size, f.size) for f in layout]
    plane = survey_plane(cfg)
    rng = np.random.default_rng(seed)
    width, step = cfg.field_width_arcsec, cfg.field_width_arcsec - cfg.overlap
    n = 500
    u = rng.uniform(-width / 2 - 3, 2 * step + width / 2 + 3, n)
    v = rng.uniform(-width / 2 - 3, 2 * step + width / 2 + 3, n)
    sky = plane.pixel_to_world(u, v)
    ra, dec = sky.ra.deg, sky.dec.deg
    own = owner(ra, dec, sky_fields)
    inside = own != -1
    assume(inside.sum() > 10)
    # the simulator's own notion of "inside", in each field's pixel frame
    sim_inside = np.zeros(n, bool)
    for f in layout:
        x, y = f.wcs().world_to_pixel_values(ra, dec)
        sim_inside |= f.contains(x, y)
    np.testing.assert_array_equal(inside, sim_inside)
    np.testing.assert_array_equal(own[inside], nearest_field(ra[inside], dec[inside], layout))


def test_neighbours_of_every_field_at_once_match_the_pairwise_test():
    """zarr_sky.neighbours_within (one search over all fields, as provenance.input_keys uses it) gives what
    fields_near gives field by field: on a hand-computed row of fields (600" radius, 128" margin: centres closer
    than 600 + 600 + 128 sqrt(2) + 60 = 1441" are neighbours: 1080" yes, 1476" no) and on 300 random fields across RA 0/360 at high
    declination, through the KD-tree's pairs and through every pair tested at once."""
    import numpy as np

    from deepfield.tasks.zarr_sky import fields_near, neighbours_within
    row = {"a": (0.0, 0.0, 600.0), "b": (0.3, 0.0, 600.0), "c": (1.0, 0.0, 600.0), "d": (0.0, 0.41, 600.0)}
    assert neighbours_within(row, 128.0) == {"a": ["b"], "b": ["a"], "c": [], "d": []}
    rng = np.random.default_rng(7)
    fp = {f"f{k:03d}": (float((rng.uniform(-5, 5)) % 360), float(rng.uniform(55, 65)), float(rng.uniform(300, 900)))
          for k in range(300)}
    got = neighbours_within(fp, 128.0, direct_below=0)  # the KD-tree's pairs
    assert sum(len(v) for v in got.values()) > 300  # a dense patch: most fields have neighbours
    for name in fp:
        assert got[name] == sorted(fields_near(fp, name, 128.0)), name
    assert neighbours_within(fp, 128.0, direct_below=1000) == got  # every pair tested at once
