"""The run flow's merge task: the tile tables of the run into the survey catalogs with Dask
(catalogs/merge.py), with the merge steps of the run's stages, on the scheduler at `dask.address` or a local
threads-only cluster.

The tables merged are exactly those of the run: the tiles of the run's fields, under the current geometry,
whose ledger record says done under the run's keys (configuration hash, stage and model versions, input
fingerprint). A failed tile's old table, a field dropped from the inputs or whose new inputs failed, tables
of another tile grid: never merged. The summary lists the run's tiles that are missing from the catalog
(`missing_tiles`) and the tables found under `tiles/` that were left out (`ignored_tables`). Last, the run's
review report, `RUN/report/index.html` (catalogs/report.py), its path in the summary's `paths`.

A run that changed nothing merges nothing: the merge's `merge_key` (`merge_key`: the run's provenance with the
merge steps' versions, the merge's own code version (catalogs/steps.MERGE_VERSION) and a hash of the schema's
text, the merge configuration, the fields, and each merged table's path, size and modification time) is kept in
`RUN/catalogs/sources.summary.json` and beside the report. When the published catalogs and report carry the
key of this run's tables and every output they list is there (the flat catalog, the HATS partitions and the FITS
table with the row count the summary gives), the task returns their summary, marked `up_to_date`, in a fraction
of a second; otherwise (a tile redone, a table touched, a catalog file gone or cut short, another merge setting)
it merges again. At survey scale this is what keeps a nightly run with nothing new from rebuilding the catalogs."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from prefect import task

from deepfield.tasks.ledger import Ledger
from deepfield.tasks.provenance import run_keys
from deepfield.tasks.tile_runner import source_tables
from deepfield.tasks.zarr_sky import sky_fields
from deepfield.tasks.zarr_store import all_tiles, open_store

from .run_config import RunConfig


def run_provenance(cfg: RunConfig, keys) -> dict:
    """What made the run's catalogs (catalogs/merge.py adds the time and deepfield's version): the configuration
    hash, the stages in order, their, their merge steps' and their models' versions, and each field's input
    fingerprint."""
    return {"config_hash": keys.config_hash, "stages": [name for name, _ in cfg.stage_list()],
            "stage_versions": dict(keys.stage_versions), "model_versions": dict(keys.model_versions),
            "merge_versions": {type(s).stage: type(s).version for s in cfg.merge_steps()},
            "inputs": dict(keys.inputs)}


def merge_key(cfg: RunConfig, fields: list[str], tables: list[Path], missing: list[str], provenance: dict) -> str:
    """What the merge's outputs are made from, as one hash (the module docstring): a table rewritten by a redone
    tile has another size or modification time; `created` is left out of the provenance (it is the time)."""
    from deepfield.catalogs.schema import markdown
    from deepfield.catalogs.steps import MERGE_VERSION
    from deepfield.tasks.version import __version__
    prov = {k: v for k, v in provenance.items() if k != "created"}
    files = []
    for t in sorted(Path(p) for p in tables):
        try:
            st = t.stat()
        except OSError:  # gone since the ledger listed it: the merge says so, with its own error
            files.append([str(t), None, None])
            continue
        files.append([str(t), st.st_size, st.st_mtime_ns])
    # the merge's own code and the schema's units and descriptions, which every output file carries: a re-run with
    # either changed merges again (the merge steps' versions are in the provenance)
    code = {"merge": MERGE_VERSION, "schema": hashlib.sha256(markdown().encode()).hexdigest()[:16]}
    doc = {"version": __version__, "code": code, "provenance": prov, "merge": cfg.merge.model_dump(mode="json"),
           "plugins": list(cfg.plugins), "store": str(cfg.store_path), "fields": sorted(fields),
           "missing": sorted(missing), "tables": files}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def published_summary(cfg: RunConfig, key: str) -> dict | None:
    """The published merge summary of the run directory when its catalogs and report are those of `key` and
    every output it lists is there, with its paths made absolute; None otherwise (merge again)."""
    import pyarrow.dataset as pads

    from deepfield.catalogs.report import MERGE_KEY_FILE, REPORT_DIR
    catalogs = cfg.run_dir / "catalogs"
    report = cfg.run_dir / REPORT_DIR
    try:
        summary = json.loads((catalogs / "sources.summary.json").read_text())
        if summary.get("merge_key") != key or (report / MERGE_KEY_FILE).read_text().strip() != key:
            return None
        paths = {k: cfg.run_dir / v for k, v in summary["paths"].items()}
        if not all(p.exists() for p in paths.values()) or not (report / "index.html").is_file():
            return None
        # a damaged or cut-short catalog: its Parquet footers (the flat catalog's, the HATS partitions') or its
        # FITS header do not read, or give another row count
        n = summary["rows_out"]
        if pads.dataset(paths["parquet"], format="parquet").count_rows() != n:
            return None
        if pads.dataset(paths["hats"] / "sources" / "dataset", format="parquet").count_rows() != n:  # not _metadata
            return None
        if "fits" in paths:
            from astropy.io import fits
            if fits.getheader(paths["fits"], 1)["NAXIS2"] != n:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    paths["report"] = report / "index.html"
    return dict(summary, paths={k: str(v) for k, v in paths.items()}, up_to_date=True)


@task(name="merge-catalogs")
def merge_task(cfg: RunConfig, fields: list[str]) -> dict:
    from deepfield.catalogs.steps import report_lines
    for name in ("distributed", "hats_import", "hats", "lsdb"):  # their INFO lines drown the progress
        logging.getLogger(name).setLevel(logging.WARNING)
    root = open_store(cfg.store_path)
    keys = run_keys(cfg.stage_list(), cfg.processing_hash(), root, fields)
    tables, missing = Ledger(cfg.run_dir).done_tables(all_tiles(root, cfg.halo, fields), keys)
    merged = set(tables)
    ignored = [str(p.relative_to(cfg.run_dir)) for p in source_tables(cfg.run_dir) if p not in merged]
    provenance = run_provenance(cfg, keys)
    key = merge_key(cfg, fields, tables, missing, provenance)
    done = published_summary(cfg, key)
    if done is not None:
        done["report"] = report_lines(cfg.merge_steps(), done)
        return dict(done, ignored_tables=ignored)
    # imported here, not with the run's flow and not for catalogs that are up to date: dask.dataframe, hats and
    # the report's plotting cost 1.5 s
    from deepfield.catalogs.merge import merge_catalog
    from deepfield.catalogs.report import write_report
    client = None
    if cfg.dask.address:
        from dask.distributed import Client
        client = Client(cfg.dask.address, timeout=60)
    try:
        summary = merge_catalog(cfg.run_dir, [f for f in sky_fields(root) if f.name in fields],
                                cfg.run_dir / "catalogs", tables=tables, steps=cfg.merge_steps(),
                                store_path=cfg.store_path, write_fits=cfg.merge.fits_export, client=client,
                                plugins=cfg.plugins, missing_tiles=missing, provenance=provenance, key=key)
        # what the run found, to look at (catalogs/report.py), once the catalogs are published
        report = write_report(cfg.run_dir, summary, fields, store_path=cfg.store_path, inputs=cfg.inputs,
                              tables=tables, stages=[n for n, _ in cfg.stage_list()], top=cfg.merge.report_top,
                              key=key)
        summary["paths"]["report"] = str(report)
        return dict(summary, ignored_tables=ignored)
    finally:
        if client is not None:
            client.close()
