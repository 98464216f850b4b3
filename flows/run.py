"""`deepfield run`: one Prefect flow running ingest -> process -> merge over a survey."""
from __future__ import annotations

import json
import sys
import time

from prefect import flow

from deepfield.tasks.atomic import write_text
from deepfield.tasks.ingest_config import load_ingest_config
from deepfield.tasks.stages.registry import check_bands
from deepfield.tasks.zarr_store import complete_fields, open_store

from .ingest import ingest_flow
from .merge import merge_task
from .process import process_task
from .run_config import RunConfig


# its arguments are validated pydantic objects already; Prefect's re-validation fails in a flow run
# started by `deepfield serve` ("..._FlowModel is not fully defined")
@flow(name="deepfield-run", validate_parameters=False)
def run_flow(cfg: RunConfig) -> dict:
    """Ingest the inputs, process every tile, merge the catalogs; returns a summary of each step.

    A field without the bands a stage needs stops the run before processing with a BandError naming both.
    After a stop request (tasks.actor_pool.request_stop: the walltime warning of a Slurm job) the tiles
    finished so far are in the ledger, the merge is skipped and the summary has `stopped` set."""
    t0 = time.perf_counter()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    ingest_cfg = load_ingest_config(cfg.inputs, store=cfg.store_layout)
    t = time.perf_counter()
    ingest = ingest_flow(ingest_cfg, str(cfg.store_path))
    ingest_s = time.perf_counter() - t
    root = open_store(cfg.store_path)
    # before any tile: every field has the bands every stage needs (tasks.stages.registry.BandError otherwise)
    check_bands(cfg.stage_list(), {f: list(root["fields"][f].attrs["bands"]) for f in complete_fields(root)})
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
