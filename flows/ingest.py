"""The ingest flow: validate each field's FITS inputs and write them, tiled, into the Zarr store.

Fields are Prefect tasks (run in threads; each field writes only its own shards), `store.fields_at_once` at
a time: each field in flight holds its pixels in memory (about 10 bytes per pixel and band, 0.17 GB for a
2048^2 field in four bands), and before 2026-12-05 every field of the configuration ran at once (Prefect's
thread pool has no limit), so that the memory grew with the survey (24 such fields: 5.2 GB peak, against
0.95 GB two at a time; tests/benchmarks/bench_ingest.py --flow-fields). A field
whose inputs fail validation is reported and skipped; the others proceed. A complete field whose
input checksums and store layout match is skipped; a changed one is re-ingested.

The store's consolidated metadata (for readers outside deepfield, tasks/zarr_store.py) is brought up to date
by the flow, not by each field's task: as fields finish, their entries are rewritten together
(tasks.zarr_metadata.consolidate_fields), at most as often as keeps that work under a tenth of the time
(`CONSOLIDATION_SHARE`; at a few hundred fields or fewer, after every field), and once more for the
fields left when the flow ends, fails or is interrupted. Its cost grows with the store (the root's one
metadata file holds every field's), so one rewrite per field made a survey's ingest quadratic. With
`store.consolidated: false` the flow removes the root's consolidated metadata instead.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from prefect import flow, task
from prefect.futures import as_completed

from deepfield.tasks.ingest import ingest_one
from deepfield.tasks.ingest_config import FieldSpec, IngestConfig, StoreSpec
from deepfield.tasks.zarr_store import consolidate_fields, drop_consolidated, metadata_lock, open_store

CONSOLIDATION_SHARE = 0.1  # the most of the flow's time that rewriting the consolidated metadata may take
DEFAULT_MAX_AT_ONCE = 8  # fields at a time without store.fields_at_once: the usable cores, at most this


@task(name="ingest-field", task_run_name="ingest-{spec.name}")
def ingest_field_task(spec: FieldSpec, store: str, store_spec: StoreSpec) -> dict:
    result = ingest_one(spec, store, store_spec, consolidated=False)  # the flow consolidates
    line = {"ingested": f"ingested {spec.name} in {result['seconds']:.1f} s",
            "skipped": f"skipped  {spec.name}: complete, inputs unchanged",
            "failed": f"FAILED   {spec.name}: {result['error']}"}[result["status"]]
    print(line, file=sys.stderr, flush=True)  # progress, one line per field as it finishes (and a log line
    # of the flow run: the flow logs prints)
    return result


# its arguments are validated pydantic objects already; Prefect's re-validation fails in a flow run
# started by `deepfield serve` ("..._FlowModel is not fully defined")
@flow(name="deepfield-ingest", validate_parameters=False, log_prints=True)
def ingest_flow(config: IngestConfig, store: str) -> list[dict]:
    """Ingest every field of `config` into `store`, `store.fields_at_once` at a time (fields_at_once); returns one
    summary per field, in the configuration's order."""
    queue = iter(config.fields)
    running: dict = {}  # future -> its field's FieldSpec

    def submit() -> None:
        spec = next(queue, None)
        if spec is not None:
            running[ingest_field_task.submit(spec, str(store), config.store)] = spec

    for _ in range(fields_at_once(config.store)):
        submit()
    results: dict[str, dict] = {}
    waiting: list[str] = []  # finished fields whose entries the consolidated metadata has not taken yet
    cost, since = 0.0, time.monotonic()
    try:
        while running:
            fut = next(as_completed(list(running)))
            spec = running.pop(fut)
            try:
                results[spec.name] = fut.result()
            except Exception as exc:  # an unexpected failure (disk full, a bug): report it, keep the others
                results[spec.name] = dict(field=spec.name, status="failed", error=f"{type(exc).__name__}: {exc}",
                                          seconds=0.0, notes=[])
            submit()
            waiting.append(spec.name)
            if time.monotonic() - since >= cost * (1 - CONSOLIDATION_SHARE) / CONSOLIDATION_SHARE:
                t0 = time.monotonic()
                _consolidate(store, waiting, config.store.consolidated)
                since = time.monotonic()
                cost, waiting = since - t0, []
    finally:
        _consolidate(store, waiting, config.store.consolidated)
    return [results[spec.name] for spec in config.fields]


def fields_at_once(spec: StoreSpec) -> int:
    """How many fields the flow ingests at a time: `store.fields_at_once`, else the cores this process may use, at
    most DEFAULT_MAX_AT_ONCE."""
    if spec.fields_at_once:
        return spec.fields_at_once
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, DEFAULT_MAX_AT_ONCE))


def _consolidate(store: str, names: list[str], keep: bool) -> None:
    """The consolidated metadata's entries of the fields `names` brought up to date, or (keep false) the root's
    consolidated metadata removed. No names: nothing to do; no store yet (every field failed before writing):
    none made."""
    if names and (Path(store) / "zarr.json").exists():
        root = open_store(store, mode="a")
        with metadata_lock(root):
            if keep:
                consolidate_fields(root, names)
            else:
                drop_consolidated(root)
