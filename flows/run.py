"""`deepfield run`: one Prefect flow running ingest -> process -> merge over a survey."""
from __future__ import annotations

import json
import sys
import time

from prefect import flow, task

from deepfield.flows.ingest import ingest_flow
from deepfield.flows.process import run_tiles
from deepfield.flows.run_config import RunConfig
from deepfield.tasks.atomic import write_text
from deepfield.tasks.ingest_config import load_ingest_config
from deepfield.tasks.zarr_store import open_store, sky_fields


def _progress_printer(label: str):
    """A progress line on stderr (Prefect tasks run in this process; a bar needs a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.description}"), console=Console(stderr=True), transient=False)
    task_id = prog.add_task("", total=None)

    def update(done: int, total: int, msg: str) -> None:
        if not prog.live.is_started:
            prog.start()
        prog.update(task_id, completed=done, total=total, description=msg)
        if total and done >= total:
            prog.stop()
    return update, prog


@task(name="process-tiles")
def process_task(cfg: RunConfig) -> dict:
    update, prog = _progress_printer("processing tiles")
    try:
        return run_tiles(str(cfg.store_path), str(cfg.run_dir), cfg.stage_list(), cfg.halo, cfg.processing_hash(),
                         address=cfg.ray.address, num_actors=cfg.ray.num_actors, use_gpus=cfg.ray.use_gpus,
                         in_flight_per_actor=cfg.ray.in_flight_per_actor, max_attempts=cfg.ray.max_attempts,
                         progress=update, stop_grace=cfg.ray.stop_grace)
    finally:
        if prog.live.is_started:
            prog.stop()


@task(name="merge-catalogs")
def merge_task(cfg: RunConfig) -> dict:
    import logging

    from deepfield.catalogs.merge import merge_catalog
    for name in ("distributed", "hats_import", "hats", "lsdb"):  # their INFO lines drown the progress
        logging.getLogger(name).setLevel(logging.WARNING)
    fields = sky_fields(open_store(cfg.store_path))
    client = None
    if cfg.dask.address:
        from dask.distributed import Client
        client = Client(cfg.dask.address, timeout=60)
    try:
        return merge_catalog(cfg.run_dir, fields, cfg.run_dir / "catalogs", write_fits=cfg.merge.fits_export,
                             lens_threshold=cfg.merge.lens_threshold, store_path=cfg.store_path,
                             anomaly_top=cfg.merge.anomaly_top, anomaly_stamp=cfg.merge.anomaly_stamp,
                             cluster_nms_mpc=cfg.merge.cluster_nms_mpc, client=client)
    finally:
        if client is not None:
            client.close()


# its arguments are validated pydantic objects already; Prefect's re-validation fails in a flow run
# started by `deepfield serve` ("..._FlowModel is not fully defined")
@flow(name="deepfield-run", validate_parameters=False)
def run_flow(cfg: RunConfig) -> dict:
    """Ingest the inputs, process every tile, merge the catalogs; returns a summary of each step.

    After a stop request (flows.process.request_stop: the walltime warning of a Slurm job) the tiles
    finished so far are in the ledger, the merge is skipped and the summary has `stopped` set."""
    t0 = time.perf_counter()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    ingest_cfg = load_ingest_config(cfg.inputs, store=cfg.store_layout)
    t = time.perf_counter()
    ingest = ingest_flow(ingest_cfg, str(cfg.store_path))
    ingest_s = time.perf_counter() - t
    t = time.perf_counter()
    process = process_task(cfg)
    process_s = time.perf_counter() - t
    t = time.perf_counter()
    merge = {} if process["stopped"] else merge_task(cfg)
    merge_s = time.perf_counter() - t
    summary = dict(ingest=ingest, process=process, merge=merge, stopped=process["stopped"],
                   seconds=dict(ingest=ingest_s, process=process_s, merge=merge_s, total=time.perf_counter() - t0),
                   failed_fields=[r["field"] for r in ingest if r["status"] == "failed"],
                   failed_tiles=process["failed"])
    write_text(cfg.run_dir / "run-summary.json", json.dumps(summary, indent=1, default=str))
    print(f"run finished in {summary['seconds']['total']:.1f} s", file=sys.stderr)
    return summary
