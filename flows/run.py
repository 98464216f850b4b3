"""`deepfield run`: one Prefect flow running ingest -> process -> merge over a survey."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from prefect import flow

from deepfield.tasks.atomic import clean_stale_temporaries, write_text
from deepfield.tasks.ingest_config import load_ingest_config
from deepfield.tasks.locks import exclusive, reap_orphans
from deepfield.tasks.stages.registry import resolve_bands
from deepfield.tasks.zarr_store import open_store

from .ingest import ingest_flow
from .merge import merge_task
from .process import process_task
from .run_config import RunConfig


RUN_LOCK = ".deepfield-run.lock"


# its arguments are validated pydantic objects already; Prefect's re-validation fails in a flow run
# started by `deepfield serve` ("..._FlowModel is not fully defined")
@flow(name="deepfield-run", validate_parameters=False)
def run_flow(cfg: RunConfig) -> dict:
    """Ingest the inputs, process every tile, merge the catalogs; returns a summary of each step.

    The run's fields are those of the inputs ingested or unchanged (a field whose inputs failed is left out,
    whatever the store holds from before). A field without the bands a stage needs stops the run before
    processing with a BandError naming both. The merge takes exactly the run's done tiles; with none, it is
    skipped (the summary's `merge` is empty).
    After a stop request (tasks.actor_pool.request_stop: the walltime warning of a Slurm job) the tiles
    finished so far are in the ledger, the merge is skipped and the summary has `stopped` set.
    One run at a time per run directory: a second is refused (tasks.locks.LockedError) before it starts."""
    t0 = time.perf_counter()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(cfg.run_dir / RUN_LOCK, "the run directory"):  # one run at a time (LockedError otherwise)
        home = os.environ.get("PREFECT_HOME")
        if home and Path(home).resolve() == (cfg.run_dir / ".deepfield-prefect").resolve():
            reap_orphans("PREFECT_HOME", home)  # what a killed run of this directory left running
        clean_stale_temporaries(cfg.run_dir)  # and the files it was writing there
        summary = _run(cfg, t0)
        write_text(cfg.run_dir / "run-summary.json", json.dumps(summary, indent=1, default=str))
    print(f"run finished in {summary['seconds']['total']:.1f} s", file=sys.stderr)
    return summary


def _run(cfg: RunConfig, t0: float) -> dict:
    ingest_cfg = load_ingest_config(cfg.inputs, store=cfg.store_layout)
    t = time.perf_counter()
    ingest = ingest_flow(ingest_cfg, str(cfg.store_path))
    ingest_s = time.perf_counter() - t
    # the run's fields: those of the inputs that are ingested or unchanged; a field whose new inputs failed
    # keeps its old pixels in the store, and they are not this run's
    fields = [r["field"] for r in ingest if r["status"] != "failed"]
    t = time.perf_counter()
    skipped: list[str] = []
    variants: dict[str, str] = {}
    if fields:
        root = open_store(cfg.store_path)
        # before any tile: each model stage's weights for the survey's bands, and the stages that cannot run
        # on them (tasks.stages.registry.BandError, or left out with missing_bands: skip)
        stages, skipped = resolve_bands(cfg.stage_list(), {f: list(root["fields"][f].attrs["bands"]) for f in fields},
                                        cfg.missing_bands)
        for line in skipped:
            print(line, file=sys.stderr)
        before = dict(cfg.stage_list())
        for name, params in stages:
            if params.get("variant") and not before[name].get("variant"):
                print(f"stage {name!r}: the {params['variant']} weights (the survey's fields lack bands of the "
                      f"main weights)", file=sys.stderr)
        cfg = cfg.with_stages(stages)
        variants = {n: p.get("variant") or "" for n, p in stages if "variant" in p}
        process = process_task(cfg, fields)
    else:  # every field failed its ingest
        process = dict(tiles=0, skipped=0, done=0, failed=0, retries=0, actors=0, seconds=0.0, stage_seconds={},
                       stopped=False, released=0, damaged_fields=[], pruned=[])
    process_s = time.perf_counter() - t
    t = time.perf_counter()
    any_done = process["skipped"] + process["done"] > 0  # already done, or done now
    # a field found damaged in the store is marked for ingest: none of its rows until it is written again
    merged_fields = [f for f in fields if f not in process["damaged_fields"]]
    merge = {} if process["stopped"] or not any_done or not merged_fields else merge_task(cfg, merged_fields)
    merge_s = time.perf_counter() - t
    summary = dict(ingest=ingest, process=process, merge=merge, stopped=process["stopped"],
                   skipped_stages=skipped, weights_variants=variants,
                   seconds=dict(ingest=ingest_s, process=process_s, merge=merge_s, total=time.perf_counter() - t0),
                   failed_fields=[r["field"] for r in ingest if r["status"] == "failed"],
                   failed_tiles=process["failed"])
    return summary
