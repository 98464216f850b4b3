"""The ingest flow: validate each field's FITS inputs and write them, tiled, into the Zarr store.

Fields are mapped Prefect tasks (run in threads; each field writes only its own shards). A field
whose inputs fail validation is reported and skipped; the others proceed. A complete field whose
input checksums and store layout match is skipped; a changed one is re-ingested.
"""
from __future__ import annotations

import sys

from prefect import flow, task, unmapped

from deepfield.tasks.ingest import ingest_one
from deepfield.tasks.ingest_config import FieldSpec, IngestConfig, StoreSpec

@task(name="ingest-field", task_run_name="ingest-{spec.name}")
def ingest_field_task(spec: FieldSpec, store: str, store_spec: StoreSpec) -> dict:
    result = ingest_one(spec, store, store_spec)
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
    """Ingest every field of `config` into `store` in parallel; returns one summary per field."""
    futures = ingest_field_task.map(config.fields, unmapped(str(store)), unmapped(config.store))
    results = []
    for spec, fut in zip(config.fields, futures):
        try:
            results.append(fut.result())
        except Exception as exc:  # an unexpected failure (disk full, a bug): report it, keep the others
            results.append(dict(field=spec.name, status="failed", error=f"{type(exc).__name__}: {exc}",
                                seconds=0.0, notes=[]))
    return results
