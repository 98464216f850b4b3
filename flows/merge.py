"""The run flow's merge task: the tile tables into the survey catalogs with Dask (catalogs/merge.py), with
the merge steps of the run's stages, on the scheduler at `dask.address` or a local threads-only cluster."""
from __future__ import annotations

import logging

from prefect import task

from deepfield.catalogs.merge import merge_catalog
from deepfield.tasks.zarr_store import open_store, sky_fields

from .run_config import RunConfig


@task(name="merge-catalogs")
def merge_task(cfg: RunConfig) -> dict:
    for name in ("distributed", "hats_import", "hats", "lsdb"):  # their INFO lines drown the progress
        logging.getLogger(name).setLevel(logging.WARNING)
    fields = sky_fields(open_store(cfg.store_path))
    client = None
    if cfg.dask.address:
        from dask.distributed import Client
        client = Client(cfg.dask.address, timeout=60)
    try:
        return merge_catalog(cfg.run_dir, fields, cfg.run_dir / "catalogs", steps=cfg.merge_steps(),
                             store_path=cfg.store_path, write_fits=cfg.merge.fits_export, client=client,
                             plugins=cfg.plugins)
    finally:
        if client is not None:
            client.close()
