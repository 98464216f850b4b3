"""The ingest flow: validate each field's FITS inputs and write them, tiled, into the Zarr store.

Fields are Prefect tasks (run in threads; each field writes only its own shards; in batches of fields where
there are more than MAX_TASK_RUNS fields, since each task run costs the flow about 34 ms of Prefect's API,
serialised, 3.4 hours for a Rubin-sized survey's 3.6e5 fields), `store.fields_at_once` at a time: each field in
flight holds its pixels in memory (about 10 bytes per pixel and band, 0.17 GB for a 2048^2 field in four bands),
and before 2026-12-05 every field of the configuration ran at once (Prefect's thread pool has no limit), so that
the memory grew with the survey (24 such fields: 5.2 GB peak, against 0.95 GB two at a time;
tests/benchmarks/bench_ingest_scale.py --flow-fields). A field whose inputs fail validation is reported and skipped;
the others proceed. A complete field whose input checksums and store layout match is skipped; a changed one is
re-ingested.

The store's consolidated metadata (for readers outside deepfield, tasks/zarr_store.py) is brought up to date
by the flow, not by each field's task: as fields finish, their entries are rewritten together
(tasks.zarr_metadata.consolidate_fields), at most as often as keeps that work under a tenth of the time
(`CONSOLIDATION_SHARE`; in a store of a few dozen fields, after every field), and once more for the
fields left when the flow ends, fails or is interrupted. Its cost grows with the store (the root's one
metadata file holds every field's), so one rewrite per field made a survey's ingest quadratic. With
`store.consolidated: false` the flow removes the root's consolidated metadata instead.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

from prefect import flow, task
from prefect.futures import as_completed
from pydantic import BaseModel, PrivateAttr

from deepfield.tasks.ingest import ingest_one
from deepfield.tasks.ingest_config import FieldSpec, IngestConfig, StoreSpec
from deepfield.tasks.zarr_store import consolidate_fields, drop_consolidated, metadata_lock, open_store

CONSOLIDATION_SHARE = 0.1  # the most of the flow's time that rewriting the consolidated metadata may take
DEFAULT_MAX_AT_ONCE = 8  # fields at a time without store.fields_at_once: the usable cores, at most this
MAX_TASK_RUNS = 500  # Prefect tasks per ingest at most: a larger survey's fields go in batches (batch_size)


def _failed(spec: FieldSpec, exc: BaseException) -> dict:
    """The summary of a field whose ingest raised `exc`."""
    return dict(field=spec.name, status="failed", error=f"{type(exc).__name__}: {exc}", seconds=0.0, notes=[])


@task(name="ingest-fields", task_run_name="ingest-{label}")
def ingest_fields_task(specs: list[FieldSpec], store: str, store_spec: StoreSpec, label: str) -> list[dict]:
    """Ingest `specs` one after the other (a field, or a batch of them: batch_size); one summary per field. An
    unexpected error (disk full, a bug) fails its field, with its traceback on stderr, and the next goes on."""
    out = []
    for spec in specs:
        try:
            result = ingest_one(spec, store, store_spec, consolidated=False)  # the flow consolidates
        except Exception as exc:
            traceback.print_exc()
            result = _failed(spec, exc)
        line = {"ingested": f"ingested {spec.name} in {result['seconds']:.1f} s",
                "skipped": f"skipped  {spec.name}: complete, inputs unchanged",
                "failed": f"FAILED   {spec.name}: {result['error']}"}[result["status"]]
        print(line, file=sys.stderr, flush=True)  # progress, one line per field as it finishes (and a log line
        # of the flow run: the flow logs prints)
        out.append(result)
    return out


class IngestCall(BaseModel):
    """The ingest flow's parameters as Prefect's API records them: a summary of the configuration (its file, its
    number of fields, the first and last, the store's settings). The configuration itself goes with the call as a
    private attribute, which the API never sees: it refuses parameters over 512 kB when serialised (Prefect's
    server.api.max_parameter_size), and a field of four bands takes about 1.5 kB, so the whole configuration as a
    parameter refused every ingest of more than about 350 such fields (before 2026-12-05)."""

    source: Optional[str] = None
    fields: int
    first_field: str
    last_field: str
    store: StoreSpec
    _config: IngestConfig = PrivateAttr()

    @classmethod
    def of(cls, config: IngestConfig) -> "IngestCall":
        call = cls(source=None if config.source is None else str(config.source), fields=len(config.fields),
                   first_field=config.fields[0].name, last_field=config.fields[-1].name, store=config.store)
        call._config = config
        return call


def ingest_flow(config: IngestConfig, store: str) -> list[dict]:
    """Ingest every field of `config` into `store`, `store.fields_at_once` at a time (fields_at_once), in Prefect
    tasks of batch_size fields; returns one summary per field, in the configuration's order. A Prefect flow run
    (deepfield-ingest) whose parameters are an IngestCall."""
    return _ingest_flow(IngestCall.of(config), str(store))


# its arguments are validated pydantic objects already (and a re-validation would drop the call's configuration);
# Prefect's re-validation fails in a flow run started by `deepfield serve` ("..._FlowModel is not fully defined")
@flow(name="deepfield-ingest", validate_parameters=False, log_prints=True)
def _ingest_flow(call: IngestCall, store: str) -> list[dict]:
    config = call._config
    n = batch_size(len(config.fields))
    batches = iter([config.fields[k:k + n] for k in range(0, len(config.fields), n)])
    running: dict = {}  # future -> its batch of FieldSpecs

    def submit() -> None:
        specs = next(batches, None)
        if specs is not None:
            label = specs[0].name if len(specs) == 1 else f"{specs[0].name}..{specs[-1].name} ({len(specs)} fields)"
            running[ingest_fields_task.submit(specs, str(store), config.store, label)] = specs

    for _ in range(fields_at_once(config.store)):
        submit()
    results: dict[str, dict] = {}
    waiting: list[str] = []  # finished fields whose entries the consolidated metadata has not taken yet
    cost, since = 0.0, time.monotonic()
    try:
        while running:
            fut = next(as_completed(list(running)))
            specs = running.pop(fut)
            try:
                results.update((r["field"], r) for r in fut.result())
            except Exception as exc:  # the task itself failed (Prefect, memory): its fields failed, the others go on
                results.update((spec.name, _failed(spec, exc)) for spec in specs)
            submit()
            waiting += [spec.name for spec in specs]
            if time.monotonic() - since >= cost * (1 - CONSOLIDATION_SHARE) / CONSOLIDATION_SHARE:
                t0 = time.monotonic()
                _consolidate(store, waiting, config.store.consolidated)
                since = time.monotonic()
                cost, waiting = since - t0, []
    finally:
        _consolidate(store, waiting, config.store.consolidated)
    return [results[spec.name] for spec in config.fields]


def batch_size(n_fields: int) -> int:
    """Fields per Prefect task: one, unless that makes more than MAX_TASK_RUNS tasks (each costs the flow about
    34 ms of Prefect's API, serialised: tests/benchmarks/bench_ingest_scale.py --flow-overhead)."""
    return max(1, -(-n_fields // MAX_TASK_RUNS))


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
