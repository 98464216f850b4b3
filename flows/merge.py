"""The run flow's merge task: the tile tables of the run into the survey catalogs with Dask
(catalogs/merge.py), with the merge steps of the run's stages, on the scheduler at `dask.address` or a local
threads-only cluster.

The tables merged are exactly those of the run: the tiles of the run's fields, under the current geometry,
whose ledger record says done under the run's keys (configuration hash, stage and model versions, input
fingerprint). A failed tile's old table, a field dropped from the inputs or whose new inputs failed, tables
of another tile grid: never merged. The summary lists the run's tiles that are missing from the catalog
(`missing_tiles`) and the tables found under `tiles/` that were left out (`ignored_tables`). Last, the run's
review report, `RUN/report/index.html` (catalogs/report.py), its path in the summary's `paths`."""
from __future__ import annotations

import logging

from prefect import task

from deepfield.tasks.ledger import Ledger
from deepfield.tasks.provenance import run_keys
from deepfield.tasks.tile_runner import source_tables
from deepfield.tasks.zarr_store import all_tiles, open_store, sky_fields

from .run_config import RunConfig


def run_provenance(cfg: RunConfig, keys) -> dict:
    """What made the run's catalogs (catalogs/merge.py adds the time and deepfield's version): the configuration
    hash, the stages in order, their and their models' versions, and each field's input fingerprint."""
    return {"config_hash": keys.config_hash, "stages": [name for name, _ in cfg.stage_list()],
            "stage_versions": dict(keys.stage_versions), "model_versions": dict(keys.model_versions),
            "inputs": dict(keys.inputs)}


@task(name="merge-catalogs")
def merge_task(cfg: RunConfig, fields: list[str]) -> dict:
    # imported here, not with the run's flow: dask.dataframe, hats and the report's plotting cost 1.5 s of every
    # run's start-up, merge or not
    from deepfield.catalogs.merge import merge_catalog
    from deepfield.catalogs.report import write_report
    for name in ("distributed", "hats_import", "hats", "lsdb"):  # their INFO lines drown the progress
        logging.getLogger(name).setLevel(logging.WARNING)
    root = open_store(cfg.store_path)
    keys = run_keys(cfg.stage_list(), cfg.processing_hash(), root, fields)
    tables, missing = Ledger(cfg.run_dir).done_tables(all_tiles(root, cfg.halo, fields), keys)
    merged = set(tables)
    ignored = [str(p.relative_to(cfg.run_dir)) for p in source_tables(cfg.run_dir) if p not in merged]
    client = None
    if cfg.dask.address:
        from dask.distributed import Client
        client = Client(cfg.dask.address, timeout=60)
    try:
        summary = merge_catalog(cfg.run_dir, [f for f in sky_fields(root) if f.name in fields],
                                cfg.run_dir / "catalogs", tables=tables, steps=cfg.merge_steps(),
                                store_path=cfg.store_path, write_fits=cfg.merge.fits_export, client=client,
                                plugins=cfg.plugins, missing_tiles=missing, provenance=run_provenance(cfg, keys))
        # what the run found, to look at (catalogs/report.py), once the catalogs are published
        report = write_report(cfg.run_dir, summary, fields, store_path=cfg.store_path, inputs=cfg.inputs,
                              tables=tables, stages=[n for n, _ in cfg.stage_list()], top=cfg.merge.report_top)
        summary["paths"]["report"] = str(report)
        return dict(summary, ignored_tables=ignored)
    finally:
        if client is not None:
            client.close()
