"""The ingest flow: validate each field's FITS inputs and write them, tiled, into the Zarr store.

Fields are mapped Prefect tasks (run in threads; each field writes only its own shards). A field
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

import sys
import time
from pathlib import Path

from prefect import flow, task, unmapped
from prefect.futures import as_completed

from deepfield.tasks.ingest import ingest_one
from deepfield.tasks.ingest_config import FieldSpec, IngestConfig, StoreSpec
from deepfield.tasks.zarr_store import consolidate_fields, drop_consolidated, metadata_lock, open_store

CONSOLIDATION_SHARE = 0.1  # the most of the flow's time that rewriting the consolidated metadata may take


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
    """Ingest every field of `config` into `store` in parallel; returns one summary per field, in the
    configuration's order."""
    futures = ingest_field_task.map(config.fields, unmapped(str(store)), unmapped(config.store))
    spec_of = {fut: spec for spec, fut in zip(config.fields, futures)}
    results: dict[str, dict] = {}
    waiting: list[str] = []  # finished fields whose entries the consolidated metadata has not taken yet
    cost, since = 0.0, time.monotonic()
    try:
        for fut in as_completed(futures):
            spec = spec_of[fut]
            try:
                results[spec.name] = fut.result()
            except Exception as exc:  # an unexpected failure (disk full, a bug): report it, keep the others
                results[spec.name] = dict(field=spec.name, status="failed", error=f"{type(exc).__name__}: {exc}",
                                          seconds=0.0, notes=[])
            waiting.append(spec.name)
            if time.monotonic() - since >= cost * (1 - CONSOLIDATION_SHARE) / CONSOLIDATION_SHARE:
                t0 = time.monotonic()
                _consolidate(store, waiting, config.store.consolidated)
                since = time.monotonic()
                cost, waiting = since - t0, []
    finally:
        _consolidate(store, waiting, config.store.consolidated)
    return [results[spec.name] for spec in config.fields]


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
