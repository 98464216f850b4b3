"""catalogs.merge on a synthetic run: two overlapping fields, 256-px tiles with 32-px halos, ~500 sources."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table

from deepfield.catalogs.dedup import source_id
from deepfield.catalogs.merge import merge_catalog, open_catalog
from deepfield.tasks.sim.config import SimConfig
from deepfield.tasks.sim.layout import field_wcs, sampling_box, survey_layout, survey_plane
from deepfield.tasks.tiling import SkyField, TileGrid, pixel_index

N_TRUTH = 500
BANDS = ("g", "r")
HIGHEST_ORDER = 8  # ~14' pixels; with 1"/px fields the ~17' x 8.5' footprint spans a few


def _truth(cfg: SimConfig, rng: np.random.Generator) -> pd.DataFrame:
    u0, u1, v0, v1 = sampling_box(cfg, margin_arcsec=-1.0)  # just inside the fields
    uv = np.empty((0, 2))
    while len(uv) < N_TRUTH:  # keep sources > 1" apart so that a 0.1" match is unambiguous
        cand = rng.uniform([u0, v0], [u1, v1])
        if len(uv) == 0 or np.min(np.hypot(*(uv - cand).T)) > 1.0:
            uv = np.vstack([uv, cand])
    sky = survey_plane(cfg).pixel_to_world(uv[:, 0], uv[:, 1])
    return pd.DataFrame({"truth_id": np.arange(N_TRUTH), "ra": sky.ra.deg, "dec": sky.dec.deg,
                         "flux": rng.uniform(10.0, 1000.0, N_TRUTH)})


def _tile_table(field: str, tile: str, sel: pd.DataFrame, x, y, primary) -> pd.DataFrame:
    n = len(sel)
    df = pd.DataFrame({"field": field, "tile": tile, "x": x, "y": y, "ra": sel["ra"].to_numpy(),
                       "dec": sel["dec"].to_numpy(), "is_primary": primary,
                       "a": np.full(n, 2.0), "b": np.full(n, 1.5), "theta": np.zeros(n),
                       "blend_id": np.arange(n, dtype=np.int64), "n_blend": np.ones(n, np.int64),
                       "is_blended": np.zeros(n, bool)})
    for flag in ("flag_edge", "flag_masked", "flag_saturated", "flag_blended"):
        df[flag] = False
    if "truth_id" in sel:
        df["truth_id"] = sel["truth_id"].to_numpy()
    for b in BANDS:
        f = sel["flux"].to_numpy()
        df[f"flux_auto_{b}"], df[f"fluxerr_auto_{b}"] = f, np.sqrt(f)
        df[f"mag_auto_{b}"], df[f"magerr_auto_{b}"] = 27.0 - 2.5 * np.log10(f), 1.0857 / np.sqrt(f)
        df[f"flux_aper_{b}"], df[f"fluxerr_aper_{b}"] = 0.8 * f, np.sqrt(f)
        df[f"mag_aper_{b}"] = 27.0 - 2.5 * np.log10(0.8 * f)
        df[f"zeropoint_{b}"] = 27.0
    df = df.sort_values(["y", "x"], kind="stable").reset_index(drop=True)
    df.insert(2, "tile_index", np.arange(n, dtype=np.int64))
    return df


def _write_tiles(run: Path, field: SkyField, sel: pd.DataFrame, grid: TileGrid) -> int:
    """The tile tables of `field` holding the positions of `sel` (ra, dec, flux, ...); returns their rows."""
    x, y = field.wcs.world_to_pixel_values(sel["ra"].to_numpy(), sel["dec"].to_numpy())
    ix, iy = pixel_index(x), pixel_index(y)
    n = 0
    for t in grid.tiles(field.name):
        inside = grid.halo_box(t.ty, t.tx).contains(iy, ix)
        prim = grid.is_primary(t.ty, t.tx, x[inside], y[inside])
        df = _tile_table(field.name, str(t), sel[inside], x[inside], y[inside], prim)
        path = run / "tiles" / field.name / f"{t.ty}_{t.tx}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(path, index=False)
        n += len(df)
    return n


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    cfg = SimConfig(size=512, fields=2, overlap=20, pixel_scale=1.0)
    run = tmp_path_factory.mktemp("merge_run")
    truth = _truth(cfg, np.random.default_rng(42))
    grid = TileGrid(cfg.size, cfg.size, tile=256, halo=32)
    fields, n_rows = [], 0
    for lay in survey_layout(cfg):
        fields.append(SkyField(lay.name, field_wcs(lay.ra, lay.dec, lay.size, lay.pixel_scale), cfg.size, cfg.size))
        n_rows += _write_tiles(run, fields[-1], truth, grid)
    return run, fields, truth, n_rows


@pytest.fixture(scope="module")
def merged(synthetic_run):
    run, fields, _, _ = synthetic_run
    summary = merge_catalog(run, fields, highest_healpix_order=HIGHEST_ORDER)
    ids = pd.read_parquet(run / "catalogs" / "sources_flat")["source_id"]
    return summary, ids


def test_every_truth_source_once(synthetic_run, merged):
    _run, _fields, truth, n_rows = synthetic_run
    summary, _ = merged
    assert summary["rows_in"] == n_rows
    assert summary["rows_out"] == N_TRUTH
    assert summary["field_duplicates_dropped"] > 0  # the overlap strip holds sources of both fields
    assert 2 <= summary["n_partitions"] <= 20
    cat = pd.read_parquet(summary["paths"]["parquet"])
    assert len(cat) == N_TRUTH and cat["is_primary"].all() and cat["is_primary_field"].all()
    t = SkyCoord(truth["ra"], truth["dec"], unit="deg")
    c = SkyCoord(cat["ra"], cat["dec"], unit="deg")
    idx, sep, _ = t.match_to_catalog_sky(c)
    assert np.all(sep.arcsec < 1e-3)
    assert len(np.unique(idx)) == N_TRUTH
    assert cat["source_id"].is_unique and (cat["source_id"] >= 0).all()
    assert cat["_healpix_29"].dtype == np.int64


def test_source_id_recipe_is_fixed():
    # the id of a row must never change between releases: pin the recipe
    key = source_id("field000", "field000/0_1", 7)
    assert key == source_id("field000", "field000/0_1", 7)
    assert 0 <= key < 2**63
    assert key != source_id("field000", "field000/0_1", 8)
    assert key == 252174359490966253  # blake2b(b"field000\x1ffield000/0_1\x1f7", digest_size=8) & (2**63-1)


def test_lsdb_opens_and_crossmatches(synthetic_run, merged):
    import lsdb

    _run, _fields, truth, _ = synthetic_run
    summary, _ = merged
    cat = open_catalog(summary["paths"]["hats"])
    assert len(cat.get_healpix_pixels()) == summary["n_partitions"]
    truth_cat = lsdb.from_dataframe(truth, ra_column="ra", dec_column="dec", highest_order=HIGHEST_ORDER)
    xm = cat.crossmatch(truth_cat, radius_arcsec=0.1, n_neighbors=1, suffixes=("", "_truth"),
                         suffix_method="all_columns").compute()
    assert len(xm) == N_TRUTH
    assert xm["truth_id_truth"].nunique() == N_TRUTH
    assert xm["source_id"].is_unique
    assert (xm["_dist_arcsec"] < 0.1).all()


def test_fits_export(merged):
    summary, ids = merged
    t = Table.read(summary["paths"]["fits"], format="fits")
    assert len(t) == N_TRUTH == summary["rows_out"]
    assert t["ra"].unit == "deg" and t["dec"].unit == "deg"
    assert t["flux_auto_g"].unit == "nJy" and t["mag_auto_r"].unit == "mag" and t["a"].unit == "arcsec"
    assert sorted(t["source_id"]) == sorted(ids)
    # image units at zero point 27 -> nJy: 10**(-0.4 (27 - 31.4)) = 57.544 nJy per unit; the magnitude unchanged
    mag = np.asarray(t["mag_auto_g"], float)
    assert np.allclose(np.asarray(t["flux_auto_g"], float), 10 ** (-0.4 * (mag - 31.4)), rtol=1e-9)
    assert np.allclose(np.asarray(t["flux_auto_g"], float) / 10 ** (-0.4 * (27.0 - 31.4)),
                       10 ** (-0.4 * (mag - 27.0)), rtol=1e-9)
    # the pixel frame's theta = 0 (along +x, west on this north-up east-left WCS) is pa 90 on the sky;
    # (within the meridians' convergence across the field); 1"/px, so a and b in arcsec equal the pixels
    assert np.allclose(np.asarray(t["pa"], float), 90.0, atol=0.02) and "theta" not in t.colnames
    assert np.allclose(np.asarray(t["a"], float), 2.0, rtol=1e-3) and np.allclose(np.asarray(t["b"], float), 1.5, rtol=1e-3)
    with fits.open(summary["paths"]["fits"]) as hdul:
        head, prim = hdul[1].header, hdul[0].header
        n = t.colnames.index("flux_auto_g") + 1
        assert head[f"TUCD{n}"] == "phot.flux.density" and "band g" in head[f"TCOMM{n}"]
        assert prim["DFVERSN"] and prim["DATE"].endswith("Z")


def test_rerun_replaces_atomically_with_same_ids(synthetic_run, merged):
    run, fields, _, _ = synthetic_run
    summary, ids = merged
    marker = Path(summary["paths"]["hats"]) / "OLD_MARKER"
    marker.write_text("from the first merge")
    again = merge_catalog(run, fields, highest_healpix_order=HIGHEST_ORDER)
    assert not marker.exists()  # the old catalog directory was replaced, not written into
    ids2 = pd.read_parquet(run / "catalogs" / "sources_flat")["source_id"]
    assert ids2.is_unique and sorted(ids2) == sorted(ids)
    assert again["rows_out"] == summary["rows_out"] and again["n_partitions"] == summary["n_partitions"]
    versions = list(run.glob(".catalogs-v-*"))  # the catalogs are one version, shown at catalogs/
    assert len(versions) == 1 and (run / "catalogs").is_symlink() and (run / "catalogs").resolve() == versions[0]
    assert not list(run.glob(".catalogs.link-*"))  # no temporaries left behind
    xs = open_catalog(again["paths"]["hats"]).compute()
    assert sorted(xs["source_id"]) == sorted(ids)


def test_id_collision_is_an_error(synthetic_run, tmp_path, monkeypatch):
    import deepfield.catalogs.merge as merge_mod

    run, fields, _, _ = synthetic_run
    monkeypatch.setattr(merge_mod, "source_ids", lambda df: np.zeros(len(df), dtype=np.int64))
    with pytest.raises(ValueError, match="source_id not unique"):
        merge_catalog(run, fields, out_dir=tmp_path / "cat")
    assert not (tmp_path / "cat" / "sources").exists()


def test_an_object_seen_by_two_fields_is_kept_once_whatever_its_measured_positions(tmp_path):
    """Sources on and near the line between two overlapping fields' centres, each field measuring them 0.06"
    off the truth towards the other field (as noise or astrometric residuals would): ownership by each
    measurement would lose some and keep others twice; decided once per object, each is kept exactly once.
    Elsewhere in the overlap, and in each field alone, every source is kept once as well."""
    from deepfield.tasks.tiling import owner
    cfg = SimConfig(size=512, fields=2, overlap=20, pixel_scale=1.0)
    rng = np.random.default_rng(5)
    lays = survey_layout(cfg)
    fields = [SkyField(lay.name, field_wcs(lay.ra, lay.dec, lay.size, lay.pixel_scale), cfg.size, cfg.size)
              for lay in lays]
    c0, c1 = fields[0].centre, fields[1].centre
    # the dividing line: at each dec, the RA equidistant from both centres (bisection)
    dec_line = rng.uniform(c0.dec.deg - 0.06, c0.dec.deg + 0.06, 200)
    lo, hi = np.full(200, c0.ra.deg), np.full(200, c1.ra.deg)
    for _ in range(60):
        mid = (lo + hi) / 2
        closer0 = SkyCoord(mid, dec_line, unit="deg").separation(c0) < SkyCoord(mid, dec_line, unit="deg").separation(c1)
        lo, hi = np.where(closer0, mid, lo), np.where(closer0, hi, mid)
    cosd = np.cos(np.radians(dec_line))
    line = pd.DataFrame({"ra": lo + rng.uniform(-0.05, 0.05, 200) / 3600 / cosd, "dec": dec_line})
    truth = pd.concat([_truth(cfg, rng).drop(columns="truth_id"), line.assign(flux=500.0)], ignore_index=True)
    truth.insert(0, "truth_id", np.arange(len(truth)))
    assert c0.ra.deg < c1.ra.deg
    toward = {fields[0].name: +1.0, fields[1].name: -1.0}  # field000 lies west of field001
    grid = TileGrid(cfg.size, cfg.size, tile=256, halo=32)
    run = tmp_path / "run"
    measured = {}
    for f in fields:
        sel = truth.copy()
        sel["ra"] = sel["ra"] + toward[f.name] * 0.06 / 3600 / np.cos(np.radians(sel["dec"]))  # towards the other
        _write_tiles(run, f, sel, grid)
        measured[f.name] = sel
    # the rule of one owner per measurement fails on these: some line sources would be lost or doubled
    on_line = truth.index >= len(truth) - 200
    kept = sum((owner(m.ra.to_numpy(), m.dec.to_numpy(), fields) == k) & f.contains(m.ra.to_numpy(), m.dec.to_numpy())
               for k, (f, m) in enumerate(zip(fields, measured.values())))
    assert (kept[on_line] != 1).sum() > 20
    summary = merge_catalog(run, fields, highest_healpix_order=HIGHEST_ORDER, write_fits=False)
    cat = pd.read_parquet(summary["paths"]["parquet"])
    counts = cat.truth_id.value_counts()
    assert len(cat) == len(truth) and counts.max() == 1 and set(counts.index) == set(truth.truth_id)


def test_crossmatch_across_partition_edges_uses_the_margin_cache(merged):
    """The catalog is a HATS collection whose default margin cache holds the rows within MARGIN_ARCSEC of every
    partition's edge: a cross-match against the catalog finds a counterpart that lies across a partition edge
    from the other catalog's point, which the catalog without its margin misses."""
    import hats
    import lsdb

    from deepfield.catalogs.merge import MARGIN_ARCSEC

    summary, _ = merged
    coll = Path(summary["paths"]["hats"])
    props = (coll / "collection.properties").read_text()
    assert "default_margin=sources_10arcs" in props and "obs_title=deepfield source catalog" in props
    main = hats.read_hats(coll / "sources")
    assert main.catalog_info.skymap_order is not None and (coll / "sources" / "skymap.fits").exists()
    cat = open_catalog(coll)
    assert cat.margin is not None and cat.margin.hc_structure.catalog_info.margin_threshold == MARGIN_ARCSEC
    rows = cat.compute()
    assert len(rows) == summary["rows_out"] and summary["n_partitions"] >= 2
    # the catalog's positions moved 3" north: most counterparts stay in their partition, some cross an edge
    moved = pd.DataFrame({"ra": rows["ra"].to_numpy(), "dec": rows["dec"].to_numpy() + 3.0 / 3600,
                          "source_id_moved": rows["source_id"].to_numpy()})
    other = lsdb.from_dataframe(moved, ra_column="ra", dec_column="dec", highest_order=HIGHEST_ORDER)

    def found(right) -> set:  # the moved points whose own source is among their neighbours within 3.5"
        xm = other.crossmatch(right, radius_arcsec=3.5, n_neighbors=8, suffixes=("", "_cat"),
                              suffix_method="all_columns").compute()
        return set(xm["source_id_moved"][xm["source_id_moved"] == xm["source_id_cat"]])

    assert found(cat) == set(rows["source_id"])
    missed = set(rows["source_id"]) - found(lsdb.open_catalog(coll / "sources"))  # no margin
    assert len(missed) > 0  # the pairs across partition edges, found only with the margin


def test_hats_kernels_compile_once_per_machine_with_the_same_results(tmp_path):
    """catalogs/jit_cache.py: hats' pixel-tree alignment (a margin cache's plan, lsdb's cross-matches) gives the
    same mappings as hats' plain Python code (numba off), and a second process loads the compiled kernels from
    the cache the first one wrote instead of compiling them again."""
    import json
    import os
    import subprocess
    import sys

    script = Path(__file__).parent / "_hats_align.py"

    def align(**env):
        out = subprocess.run([sys.executable, str(script)], env={**os.environ, **env}, capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    plain = align(NUMBA_DISABLE_JIT="1")
    first = align(NUMBA_CACHE_DIR=str(tmp_path))
    second = align(NUMBA_CACHE_DIR=str(tmp_path))
    assert plain["swapped"] == 0 and first["swapped"] >= 4  # perform_align_trees and the functions it calls
    assert first["out"] == plain["out"] == second["out"] and len(plain["out"]["OUTER"]) > len(plain["out"]["INNER"])
    assert first["hits"] == 0 and second["hits"] >= 2


def test_the_fields_wcs_travel_as_header_text_with_the_same_sky():
    """The merge hands every partition each field's WCS as header text (catalogs.merge.FieldWCS): what a
    partition gets back after pickling gives the same sky positions as the fields' own WCS (a TAN-SIP one too),
    makes only the WCS it is asked for, and Dask's token follows the headers."""
    import pickle

    from astropy.wcs import Sip
    from dask.base import tokenize

    from deepfield.catalogs.merge import FieldWCS
    fields = [SkyField(f"field00{k}", field_wcs(150.0 + 0.05 * k, 2.0, 256, 1.0), 256, 256) for k in range(2)]
    sip = fields[1].wcs.deepcopy()
    a, b = np.zeros((3, 3)), np.zeros((3, 3))
    a[2, 0], b[0, 2] = 2e-5, -3e-5
    sip.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    sip.sip = Sip(a, b, None, None, sip.wcs.crpix)
    fields[1] = SkyField("field001", sip, 256, 256)
    got = pickle.loads(pickle.dumps(FieldWCS.of(fields)))
    assert list(got) == ["field000", "field001"] and got._made == {}
    x, y = np.array([0.0, 17.5, 255.0]), np.array([3.0, 128.0, 250.0])
    for f in fields:
        assert np.allclose(np.array(got[f.name].pixel_to_world_values(x, y)),
                           np.array(f.wcs.pixel_to_world_values(x, y)), rtol=0, atol=1e-10)
    assert set(got._made) == {"field000", "field001"}
    assert tokenize(got) == tokenize(FieldWCS.of(fields)) != tokenize(FieldWCS.of(fields[:1]))


def test_fields_with_different_bands_merge_into_one_catalog(tmp_path):
    """A survey whose second field lacks band r (a band not taken over part of the footprint): every truth source
    once, the r columns null exactly for the sources the second field owns and the others as measured; the merge
    had stopped at the first table without them (KeyError: 'flux_auto_r', ...)."""
    cfg = SimConfig(size=512, fields=2, overlap=20, pixel_scale=1.0)
    truth = _truth(cfg, np.random.default_rng(7))
    grid = TileGrid(cfg.size, cfg.size, tile=256, halo=32)
    fields = []
    for lay in survey_layout(cfg):
        fields.append(SkyField(lay.name, field_wcs(lay.ra, lay.dec, lay.size, lay.pixel_scale), cfg.size, cfg.size))
        _write_tiles(tmp_path, fields[-1], truth, grid)
    for path in (tmp_path / "tiles" / fields[1].name).glob("*.parquet"):
        df = pd.read_parquet(path)
        df.drop(columns=[c for c in df.columns if c.endswith("_r")]).to_parquet(path, index=False)
    summary = merge_catalog(tmp_path, fields, highest_healpix_order=HIGHEST_ORDER)
    cat = pd.read_parquet(summary["paths"]["parquet"])
    assert len(cat) == N_TRUTH and set(cat["truth_id"]) == set(truth["truth_id"])
    second = (cat["field"] == fields[1].name).to_numpy()
    assert 0 < second.sum() < len(cat)
    for col in ("flux_auto_r", "mag_aper_r", "zeropoint_r"):
        assert cat.loc[second, col].isna().all() and cat.loc[~second, col].notna().all(), col
    flux = truth.set_index("truth_id")["flux"] * 10 ** (-0.4 * (27.0 - 31.4))  # the catalog's nJy
    assert np.allclose(cat.loc[~second, "flux_auto_r"], flux[cat.loc[~second, "truth_id"]].to_numpy())
    assert np.allclose(cat["flux_auto_g"], flux[cat["truth_id"]].to_numpy())
