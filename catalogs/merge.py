"""Merge the per-tile source tables of a run into the survey source catalog (docs/design.md, "The way data flows").

Input: `RUN/tiles/<field>/<ty>_<tx>.parquet`, one table per tile (tasks' tile runner). Steps, on Dask:

1. read every tile table (`dask.dataframe.read_parquet`, files in sorted order) and keep the rows with
   `is_primary` (centroid in the tile core): tile-level de-duplication of the halos;
2. calibrate (catalogs/calibrate.py): fluxes in nJy with the row's `zeropoint_<band>`, shapes on the sky
   (a, b in arcsec, `pa` east of north from the field's WCS);
3. field-level de-duplication, once per object: the rows near where fields overlap are matched across the
   fields, and each object is kept by one field (`catalogs.dedup.overlap_decisions`: the field that owns
   the mean of its measured positions, `tasks.tiling.owner`, or the field that saw it when only one did);
   `is_primary_field` says so, and only those rows are kept unless `keep_field_duplicates=True` (then the
   overlap duplicates stay, flagged False, for QA);
4. `source_id` (int64, first column): BLAKE2b of (field, tile, tile_index) masked to 63 bits, stable
   across re-runs; uniqueness is checked over the whole catalog (ValueError naming the rows otherwise);
5. `_healpix_29` (the HATS spatial index, `hats.pixel_math.spatial_index.compute_spatial_index`);
6. the HATS collection is written by hats-import: the catalog (rows sorted by `_healpix_29` within each
   HEALPix partition, with its skymap) and its margin cache of MARGIN_ARCSEC (the collection's default, so
   that lsdb.open_catalog of `sources/` cross-matches across partition edges), title, description and
   provenance in hats.properties;
7. exports of the same rows: flat Parquet and a FITS binary table.

Every output describes itself from the declared schema (catalogs/schema.py: unit, UCD, description of every
column in the Parquet fields' metadata, FITS TUNIT/TUCD/TCOMM) and carries the run's provenance (deepfield
version, configuration hash, stage and model versions, input fingerprints, time: the Parquet schema
metadata, the FITS primary header, hats.properties, `provenance.json`). The summary written beside the
catalog names its files relative to the run directory.

Outputs in `out_dir` (default `RUN/catalogs`, a symbolic link to the current version of the catalogs,
`RUN/.catalogs-v-XXXX/`): `sources/` (HATS collection), `sources_flat/` (Parquet parts),
`sources.fits`, `sources.summary.json`, `provenance.json`, and what the stages' merge steps add
(catalogs/steps.py): the lens step's `lens_candidates.parquet` and `lens_cutouts.fits` (catalogs/lenses.py), the anomaly
step's `anomaly_sigma` column with `anomalies.parquet` and `anomaly_stamps.fits` (catalogs/anomalies.py), the
cluster step's `cluster_id` column with `clusters.parquet` and `cluster_cutouts.fits` (catalogs/clusters.py;
the cutouts with WCS: catalogs/cutouts.py); their Parquet tables
are rewritten with their declared schema. The steps run in the run's stage order: each
`prepare`s before the rows are merged, adds its columns to every partition after the ids and the spatial
index, and writes its outputs after the rows. Everything is built in a new version directory beside
`out_dir`, and `out_dir`, a symbolic link, is then pointed at it in one atomic rename (tasks.atomic.
publish_version): a crash or a reader sees the old catalogs or the new ones, never a mix, and old versions
and versions left by killed merges are removed afterwards. One merge at a time per `out_dir` (a lock,
tasks.locks; a second merge is refused with the holder's host and pid).

Dask: without a `client`, a threads-only `LocalCluster(processes=False)` is started for the merge (no
`__main__` guard needed, no pickling of the SkyFields; the work is mostly Arrow/NumPy, which releases
the GIL). Pass a `distributed.Client` to run on a real cluster.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from astropy.wcs import WCS
from distributed.diagnostics.plugin import WorkerPlugin

from deepfield.tasks.atomic import publish_version, version_dir, write_text
from deepfield.tasks.locks import exclusive
from deepfield.tasks.stages.registry import load_plugins
from deepfield.tasks.tile_runner import source_tables
from deepfield.tasks.tiling import SkyField

from . import schema
from .calibrate import calibrate
from .dedup import FieldOwnership, overlap_decisions, source_ids
from .exports import MARGIN_ARCSEC, annotate_file, export_fits, relative, write_hats
from .steps import MergeContext, MergeStep, report_lines

__all__ = ["merge_catalog", "open_catalog", "export_fits", "HEALPIX_COLUMN"]

HEALPIX_COLUMN = "_healpix_29"  # hats.pixel_math.spatial_index.SPATIAL_INDEX_COLUMN
CATALOG_NAME = "sources"
FILES_PER_PARTITION = 16  # tile tables per Dask partition (and per hats-import input file)


class FieldWCS(Mapping):
    """Field name -> astropy WCS for the merge's partitions, carried as each field's FITS header text and made into
    a WCS where a partition first asks for it (cached in this object).

    Dask tokenizes map_partitions' arguments (by pickling what it cannot hash otherwise) and pickles them into
    every partition's task, even on the threads-only cluster. A dict of astropy WCS objects cost 0.04 s per field
    to tokenize, and each partition rebuilt every field's WCS: fields times partitions, 10,600 s over the
    partitions of a 1,000-field survey (tests/benchmarks/bench_merge_fields.py). Header text hashes at memory
    speed, and a partition builds the WCS of the few fields whose rows it holds; it still unpickles every field's
    text (0.02 s per partition at 1,000 fields: 20 s over them)."""

    def __init__(self, headers: dict[str, str]):
        self._headers = dict(headers)
        self._made: dict[str, WCS] = {}

    @classmethod
    def of(cls, fields: list[SkyField]) -> "FieldWCS":
        out = cls({f.name: f.wcs.to_header_string(relax=True) for f in fields})
        out._made.update({f.name: f.wcs for f in fields})  # the caller's own, where it asks in this process
        return out

    def __getitem__(self, name: str) -> WCS:
        w = self._made.get(name)
        if w is None:
            w = self._made[name] = WCS(self._headers[name])
        return w

    def __iter__(self):
        return iter(self._headers)

    def __len__(self) -> int:
        return len(self._headers)

    def __reduce__(self):
        return FieldWCS, (self._headers,)

    def __dask_tokenize__(self):
        return "deepfield.FieldWCS", sorted(self._headers.items())


def _prepare(df: pd.DataFrame, dropped: pd.MultiIndex, keep_duplicates: bool,
             steps: tuple[MergeStep, ...] = (), wcs_by_field: dict | None = None) -> pd.DataFrame:
    """One partition: calibrated fluxes and sky shapes (catalogs/calibrate.py), field ownership (the rows of
    `dropped`, (field, tile, tile_index), are another field's measurements of an object:
    catalogs.dedup.overlap_decisions), ids, spatial index, then each merge step's columns (rows already
    tile-primary)."""
    from hats.pixel_math.spatial_index import compute_spatial_index

    df = calibrate(df, wcs_by_field or {})
    keys = pd.MultiIndex.from_arrays([df["field"].astype(str), df["tile"].astype(str),
                                      df["tile_index"].astype("int64")])
    df["is_primary_field"] = ~keys.isin(dropped) if len(dropped) else np.ones(len(df), bool)
    if not keep_duplicates:
        df = df[df["is_primary_field"].to_numpy(bool)]
    df.insert(0, "source_id", source_ids(df))
    ra, dec = df["ra"].to_numpy(np.float64), df["dec"].to_numpy(np.float64)
    df[HEALPIX_COLUMN] = compute_spatial_index(ra, dec) if len(df) else np.zeros(0, np.int64)
    for step in steps:
        df = step.partition(df)
    return df.reset_index(drop=True)


def _dropped(files: list[Path], ownership: FieldOwnership) -> pd.MultiIndex:
    """(field, tile, tile_index) of the tile-primary rows that another field keeps (overlap_decisions)."""
    rows = pads.dataset([str(f) for f in files], format="parquet").to_table(
        columns=["field", "tile", "tile_index", "ra", "dec"], filter=pads.field("is_primary")).to_pandas()
    d = overlap_decisions(rows, ownership)
    d = d[~d["keep"].astype(bool)]
    return pd.MultiIndex.from_arrays([d["field"].astype(str), d["tile"].astype(str), d["tile_index"].astype("int64")],
                                     names=["field", "tile", "tile_index"])


def _check_unique_ids(flat_dir: Path) -> None:
    ids = dd.read_parquet(str(flat_dir), columns=["source_id"])["source_id"]
    counts = ids.value_counts(split_out=max(1, ids.npartitions // 64))
    dup = counts[counts > 1].compute()
    if len(dup) == 0:
        return
    rows = pq.read_table(flat_dir, columns=["source_id", "field", "tile", "tile_index"],
                         filters=[("source_id", "in", [int(i) for i in dup.index[:20]])]).to_pandas()
    keys = rows.drop_duplicates(["field", "tile", "tile_index"])
    what = ("the same (field, tile, tile_index) appears twice in the tile tables"
            if len(keys) < len(rows) else "a 63-bit source_id hash collision")
    raise ValueError(f"source_id not unique ({len(dup)} ids repeated: {what}); rows:\n"
                     f"{rows.sort_values('source_id').to_string(index=False)}")


def _pixel_threshold(flat_dir: Path, n_rows: int, order: int) -> int:
    """Rows per HEALPix partition: about n_rows / 8 (a handful of partitions for small runs), between
    100 and 1e6, and never below the fullest pixel at `order` (hats-import cannot split those)."""
    hp = dd.read_parquet(str(flat_dir), columns=[HEALPIX_COLUMN])[HEALPIX_COLUMN]
    fullest = int((hp // 4 ** (29 - order)).value_counts(split_out=1).max().compute())
    return int(max(fullest, min(1_000_000, max(100, -(-n_rows // 8)))))


class LoadPlugins(WorkerPlugin):
    """A Dask worker plugin importing the run's plugin modules on every worker, present and future, so that
    the merge steps of plugin stages unpickle there (tasks.stages.registry.load_plugins)."""

    idempotent = True

    def __init__(self, plugins: list[str] | tuple[str, ...]):
        self.plugins = tuple(plugins)

    def setup(self, worker) -> None:
        load_plugins(self.plugins)


def _local_client(n_threads: int | None):
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(processes=False, n_workers=1, threads_per_worker=n_threads or os.cpu_count() or 1,
                           dashboard_address=None)
    return Client(cluster), cluster


def merge_catalog(run_dir: Path, fields: list[SkyField], out_dir: Path | None = None, *,
                  steps: list[MergeStep] | tuple[MergeStep, ...] = (), store_path: Path | None = None,
                  highest_healpix_order: int = 8, pixel_threshold: int | None = None,
                  keep_field_duplicates: bool = False, client=None, n_threads: int | None = None,
                  write_fits: bool = True, plugins: list[str] | tuple[str, ...] = (),
                  tables: list[Path] | None = None, missing_tiles: list[str] | None = None,
                  provenance: dict | None = None, key: str | None = None) -> dict:
    """Merge tile source tables into the source catalog under `out_dir` (default run_dir/catalogs).

    fields: the SkyFields of the run (every field named in the tile tables must be among them).
    tables: the source tables to merge (the run flow gives those of the run's done tiles, from the ledger);
        default: every `run_dir/tiles/*/<ty>_<tx>.parquet`.
    missing_tiles: the run's tiles that are not done, recorded in the summary (the catalog lacks them).
    provenance: what made the catalog (deepfield version, configuration hash, stage and model versions, input
        fingerprints: flows/merge.py's `run_provenance`); the time and the deepfield version are added. It goes
        into every output's metadata (Parquet schema, FITS primary header, hats.properties) and the summary.
    key: what the caller identifies this merge's inputs by (flows/merge.py's `merge_key`), kept in the summary as
        `merge_key` so that a later run can tell the catalogs are already those of its tables.
    steps: the merge steps of the run's stages, in stage order (catalogs.steps.build_steps).
    store_path: the run's Zarr store, for steps that cut stamps from it (none: no stamps).
    highest_healpix_order: finest HEALPix order of a partition (8: ~14 arcmin pixels). hats-import's
        partitioning is dense in 12 * 4**order pixels: on 2 cores order 8 costs ~1 s, 9 ~15 s, 10 ~60 s
        and 11 ~5 min / 8 GB whatever the row count, so raise it only for very dense catalogs.
    pixel_threshold: most rows per partition; default about n_rows / 8, between 100 and 1e6.
    keep_field_duplicates: keep rows of overlapping fields that do not own their position (flagged
        `is_primary_field` False) instead of dropping them.
    client: a dask.distributed Client to use; default: a local threads-only cluster for this call.
    plugins: the run's plugin modules, imported on every worker of `client` (the steps of plugin stages
        travel to the workers by reference to their module).
    Returns a summary dict (also written to out_dir/sources.summary.json, without `report`: the lines the
    steps give about their outputs, and with its paths relative to `run_dir`).
    """
    from deepfield.tasks.version import __version__

    t0 = time.perf_counter()
    provenance = {**(provenance or {}), "deepfield_version": __version__,
                  "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "catalogs"
    steps = tuple(steps)
    files = source_tables(run_dir) if tables is None else [Path(t) for t in tables]
    if not files:
        raise FileNotFoundError(f"no tile tables to merge under {run_dir / 'tiles'}")
    ownership = FieldOwnership(fields)
    with exclusive(out_dir.parent / f".{out_dir.name}.lock", f"the catalog directory {out_dir.name}"):
        version = version_dir(out_dir)  # the new catalogs, built whole, then shown at out_dir in one rename
        try:
            summary = _merge_into(version, out_dir, run_dir, files, ownership, steps, store_path,
                                  highest_healpix_order, pixel_threshold, keep_field_duplicates, client, n_threads,
                                  write_fits, plugins, missing_tiles, provenance, t0, key)
            publish_version(version, out_dir)
        finally:
            if version.exists() and not (out_dir.is_symlink() and out_dir.resolve() == version.resolve()):
                shutil.rmtree(version, ignore_errors=True)
    summary["report"] = report_lines(steps, summary)
    return summary


def _read_tile_tables(files: list[Path]) -> dd.DataFrame:
    """The tile tables as one Dask frame, FILES_PER_PARTITION tables a partition. Fields of one survey may have
    different bands (a band not taken over part of the footprint): when the first tables of the fields (one per
    field: a field's tiles share its bands) differ in their columns, every table is read in the union of them,
    the columns of bands a field lacks null (NaN), where a frame made from the first table had stopped the merge
    at the first field without its columns (KeyError: 'flux_aper_z', ...)."""
    firsts: dict[Path, Path] = {}
    for f in files:
        firsts.setdefault(Path(f).parent, Path(f))
    schemas = [pq.read_schema(f) for f in firsts.values()]
    if len({tuple(sc.names) for sc in schemas}) <= 1:
        tiles = dd.read_parquet([str(f) for f in files])
        return tiles.repartition(npartitions=max(1, -(-tiles.npartitions // FILES_PER_PARTITION)))
    unified = pa.unify_schemas([sc.remove_metadata() for sc in schemas])
    groups = [[str(f) for f in files[i:i + FILES_PER_PARTITION]] for i in range(0, len(files), FILES_PER_PARTITION)]
    return dd.from_map(_read_in_schema, groups, schema=unified, meta=unified.empty_table().to_pandas())


def _read_in_schema(paths: list[str], schema: pa.Schema) -> pd.DataFrame:
    """Parquet files read into one frame in `schema` (columns a file lacks null)."""
    return pads.dataset(paths, schema=schema, format="parquet").to_table().to_pandas()


def _merge_into(staging: Path, out_dir: Path, run_dir: Path, files: list[Path], ownership: FieldOwnership,
                steps: tuple[MergeStep, ...], store_path, highest_healpix_order: int, pixel_threshold,
                keep_field_duplicates: bool, client, n_threads, write_fits: bool, plugins, missing_tiles,
                provenance: dict, t0: float, key: str | None = None) -> dict:
    """Everything of merge_catalog inside `staging`, under the names it will have at `out_dir`."""
    own_client = client is None
    cluster = None
    if own_client:
        client, cluster = _local_client(n_threads)
    elif plugins:
        client.register_plugin(LoadPlugins(plugins), name="deepfield-plugins")
    try:
        tiles = _read_tile_tables(files)
        primary = tiles[tiles["is_primary"]]
        ctx = MergeContext(run_dir=run_dir, tile_tables=files, columns=list(primary.columns),
                           store_path=Path(store_path) if store_path is not None else None)
        for step in steps:
            step.prepare(ctx)
        dropped = _dropped(files, ownership)  # once per object, over the whole run
        wcs_by_field = FieldWCS.of(ownership.fields)
        meta = _prepare(primary._meta, dropped, keep_field_duplicates, steps, wcs_by_field)
        merged = primary.map_partitions(_prepare, dropped, keep_field_duplicates, steps, wcs_by_field, meta=meta)
        flat_dir = staging / f"{CATALOG_NAME}_flat"
        arrow = schema.annotate(pa.Schema.from_pandas(meta, preserve_index=False), CATALOG_NAME, provenance)
        write = merged.to_parquet(str(flat_dir), write_index=False, compute=False, schema=arrow,
                                  name_function=lambda i: f"part.{i:05d}.parquet")
        n_in, n_primary, _ = client.compute(
            [tiles.map_partitions(len).sum(), primary.map_partitions(len).sum(), write], sync=True)
        n_kept = pads.dataset(flat_dir, format="parquet").count_rows()
        n_owned = pads.dataset(flat_dir, format="parquet").count_rows(
            filter=pads.field("is_primary_field"))
        if n_kept == 0:
            raise ValueError(f"no primary rows to merge in the {len(files)} tile tables under {run_dir / 'tiles'}")
        _check_unique_ids(flat_dir)
        threshold = pixel_threshold or _pixel_threshold(flat_dir, n_kept, highest_healpix_order)
        hats_dir = write_hats(flat_dir, staging, client, highest_healpix_order, threshold, provenance)
        results = [step.write(ctx, flat_dir, staging) for step in steps]
        for r in results:
            for name in r.files.values():
                annotate_file(staging / name, provenance)
        if write_fits:
            export_fits(pq.read_table(flat_dir).to_pandas(), staging / f"{CATALOG_NAME}.fits", provenance)
        shutil.rmtree(staging / "hats_tmp", ignore_errors=True)
    finally:
        if own_client:
            client.close()
            cluster.close()

    import hats

    paths = {"hats": out_dir / CATALOG_NAME, "parquet": out_dir / f"{CATALOG_NAME}_flat"}
    if write_fits:
        paths["fits"] = out_dir / f"{CATALOG_NAME}.fits"
    for r in results:  # the steps' outputs
        paths.update({key: out_dir / name for key, name in r.files.items()})
    summary = {
        "n_tiles": len(files), "rows_in": int(n_in), "primary_rows": int(n_primary),
        "field_duplicates": int(n_primary - n_owned), "field_duplicates_dropped": int(n_primary - n_kept),
        "rows_out": int(n_kept), "missing_tiles": list(missing_tiles or []),
    }
    for r in results:
        summary.update(r.summary)
    summary.update({
        "n_partitions": len(hats.read_hats(hats_dir / CATALOG_NAME).get_healpix_pixels()),
        "highest_healpix_order": highest_healpix_order, "pixel_threshold": threshold,
        "margin_arcsec": MARGIN_ARCSEC, "paths": {k: str(v) for k, v in paths.items()},
        "seconds": round(time.perf_counter() - t0, 3), "provenance": provenance,
    })
    if key is not None:
        summary["merge_key"] = key
    written = dict(summary, paths={k: relative(v, run_dir) for k, v in paths.items()})
    write_text(staging / f"{CATALOG_NAME}.summary.json", json.dumps(written, indent=2) + "\n")
    write_text(staging / "provenance.json", json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return summary


def open_catalog(path: Path | str, **kwargs):
    """The lsdb Catalog at `path` (a merge's out_dir/sources); kwargs go to lsdb (columns, search_filter)."""
    import lsdb

    from .jit_cache import cache_hats_kernels
    cache_hats_kernels()  # lsdb's cross-matches align pixel trees with hats' numba functions
    reader = getattr(lsdb, "open_catalog", None) or lsdb.read_hats
    return reader(Path(path), **kwargs)
