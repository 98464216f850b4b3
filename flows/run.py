"""`deepfield run`: one Prefect flow running ingest -> process -> merge over a survey.

Each step logs INFO lines (logger `deepfield.flows.run`: the run's log file, -v on the console); the
processing shows its progress as tiles finish (flows/process.py), and the run's summary is a Markdown
artifact on the flow run (key `deepfield-run-summary`: the counts of each step, the time per step and the
outputs' paths relative to the run directory)."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from prefect import flow

from deepfield.tasks.atomic import clean_stale_temporaries, write_text
from deepfield.tasks.ingest_config import load_ingest_config
from deepfield.tasks.locks import exclusive, reap_orphans
from deepfield.tasks.zarr_store import fields_attrs, open_store

from .ingest import ingest_flow
from .merge import merge_task
from .prestart import run_stages
from .process import process_task
from .run_config import RunConfig


RUN_LOCK = ".deepfield-run.lock"
SUMMARY_KEY = "deepfield-run-summary"
log = logging.getLogger(__name__)


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
        log.info("run of %s in %s", cfg.inputs, cfg.run_dir)
        summary = _run(cfg, t0)
        write_text(cfg.run_dir / "run-summary.json", json.dumps(_relative_paths(summary, cfg.run_dir), indent=1,
                                                                default=str))
    log.info("run finished in %.1f s", summary["seconds"]["total"])
    _summary_artifact(cfg, summary)
    return summary


def _relative_paths(summary: dict, run_dir: Path) -> dict:
    """The summary as written to RUN/run-summary.json: the merge's paths relative to the run directory (a run
    directory moved or shared whole stays right; the returned summary keeps them absolute)."""
    from deepfield.catalogs.exports import relative
    merge = summary.get("merge") or {}
    if not merge.get("paths"):
        return summary
    return dict(summary, merge=dict(merge, paths={k: relative(v, run_dir) for k, v in merge["paths"].items()}))


def _summary_artifact(cfg: RunConfig, summary: dict) -> None:
    """The run's summary as a Markdown artifact of the flow run (a refusal of the API is a warning)."""
    from prefect.artifacts import create_markdown_artifact
    ing, proc, mer, sec = summary["ingest"], summary["process"], summary["merge"], summary["seconds"]
    n = {s: sum(r["status"] == s for r in ing) for s in ("ingested", "skipped", "failed")}
    rows = [("fields ingested", n["ingested"]), ("fields unchanged", n["skipped"]), ("fields failed", n["failed"]),
            ("tiles", proc["tiles"]), ("tiles done before", proc["skipped"]), ("tiles processed", proc["done"]),
            ("tiles failed", proc["failed"]), ("retries", proc["retries"]), ("actors", proc["actors"]),
            ("sources in the catalog", mer.get("rows_out", "-") if mer else "- (merge skipped)"),
            ("stopped", "yes: run again to resume" if summary["stopped"] else "no")]
    rows += [(f"seconds: {k}", f"{v:.1f}") for k, v in sec.items()]
    rows += [(f"seconds: stage {k}", f"{v:.1f}") for k, v in proc.get("stage_seconds", {}).items()]
    md = [f"# deepfield run: {cfg.run_dir.name}", "", f"Run directory `{cfg.run_dir}`, inputs `{cfg.inputs}`.", "",
          "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    if mer.get("paths"):
        md += ["", "| output | path (in the run directory) |", "|---|---|"]
        md += [f"| {k} | `{_relative(v, cfg.run_dir)}` |" for k, v in mer["paths"].items()]
    failed = [r["field"] for r in ing if r["status"] == "failed"]
    if failed or proc["failed"]:
        md += ["", f"**Failed**: {len(failed)} field(s) {', '.join(failed)}; {proc['failed']} tile(s) "
               f"(`deepfield status {cfg.run_dir}`)."]
    try:
        create_markdown_artifact("\n".join(md), key=SUMMARY_KEY, description=f"deepfield run {cfg.run_dir}")
    except Exception as exc:  # the UI's view of the run, not the run
        log.warning("the run summary artifact was not created: %s: %s", type(exc).__name__, exc)


def _relative(path, run_dir: Path) -> str:
    try:
        return str(Path(path).relative_to(run_dir))
    except ValueError:
        return str(path)


def _run(cfg: RunConfig, t0: float) -> dict:
    ingest_cfg = load_ingest_config(cfg.inputs, store=cfg.store_layout)
    t = time.perf_counter()
    log.info("ingest of %d field(s) into %s", len(ingest_cfg.fields), _relative(cfg.store_path, cfg.run_dir))
    ingest = ingest_flow(ingest_cfg, str(cfg.store_path))
    ingest_s = time.perf_counter() - t
    for r in ingest:
        log.info("ingest %s: %s", r["field"], r["status"] + (f": {r['error']}" if r["status"] == "failed" else ""))
    # the run's fields: those of the inputs that are ingested or unchanged; a field whose new inputs failed
    # keeps its old pixels in the store, and they are not this run's
    fields = [r["field"] for r in ingest if r["status"] != "failed"]
    t = time.perf_counter()
    skipped: list[str] = []
    variants: dict[str, str] = {}
    if fields:
        # before any tile: each model stage's weights for the survey's bands, and the stages that cannot run
        # on them (tasks.stages.registry.BandError, or left out with missing_bands: skip)
        stages, skipped = run_stages(cfg, fields_attrs(open_store(cfg.store_path), fields))
        for line in skipped:
            log.info(line)
        before = dict(cfg.stage_list())
        for name, params in stages:
            if params.get("variant") and not before[name].get("variant"):
                log.info("stage %r: the %s weights (of the shipped band sets, the one with the most of the "
                         "fields' bands)", name, params["variant"])
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
    if merge:
        log.info("merge: %s source(s) in the catalog in %.1f s%s", merge.get("rows_out", "?"), merge_s,
                 " (up to date: the catalogs of these tables were already published)" if merge.get("up_to_date") else "")
    else:
        log.info("merge skipped: %s", "stopped on request" if process["stopped"] else "no tile of this run is done")
    summary = dict(ingest=ingest, process=process, merge=merge, stopped=process["stopped"],
                   skipped_stages=skipped, weights_variants=variants,
                   seconds=dict(ingest=ingest_s, process=process_s, merge=merge_s, total=time.perf_counter() - t0),
                   failed_fields=[r["field"] for r in ingest if r["status"] == "failed"],
                   failed_tiles=process["failed"])
    return summary
