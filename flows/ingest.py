"""The ingest flow: validate each field's FITS inputs and write them, tiled, into the Zarr store.

Fields are mapped Prefect tasks (run in threads; each field writes only its own shards). A field
whose inputs fail validation is reported and skipped; the others proceed. A complete field whose
input checksums and store layout match is skipped; a changed one is re-ingested.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from prefect import flow, task, unmapped

from deepfield.tasks.fits_input import InputError, load_field, sha256_file
from deepfield.tasks.ingest_config import FieldSpec, IngestConfig, StoreSpec
from deepfield.tasks.zarr_store import field_record, open_store, write_field

log = logging.getLogger("deepfield.ingest")


def input_files(spec: FieldSpec) -> list[Path]:
    if spec.mef is not None:
        return [spec.mef]
    out = []
    for b in spec.bands.values():
        out += [p for p in (b.image, b.invvar, b.variance, b.mask) if p is not None]
    return out


def ingest_one(spec: FieldSpec, store: str, store_spec: StoreSpec) -> dict:
    """Ingest one field; returns a summary {field, status: ingested|skipped|failed, ...}.

    Input errors are returned as status "failed" with a one-line error naming the file, so that
    the other fields go on.
    """
    t0 = time.perf_counter()
    summary = dict(field=spec.name, status="failed", error=None, seconds=0.0, notes=[])
    try:
        missing = [p for p in input_files(spec) if not p.exists()]
        if missing:
            raise InputError(missing[0], "no such file")
        checksums = {str(p): sha256_file(p) for p in input_files(spec)}
        root = open_store(store, mode="a")
        layout = store_spec.model_dump()
        old = field_record(root, spec.name)
        if old is not None and old.get("checksums") == checksums and old.get("store") == layout \
                and old.get("spec") == spec.model_dump(mode="json"):
            summary.update(status="skipped", seconds=time.perf_counter() - t0)
            return summary
        fimg = load_field(spec, checksums)
        record = dict(checksums=checksums, store=layout, spec=spec.model_dump(mode="json"))
        stats = write_field(root, fimg, store_spec, record)
        summary.update(status="ingested", notes=list(fimg.notes), bands=list(fimg.bands),
                       shape=list(fimg.image.shape), **stats)
    except InputError as exc:
        summary["error"] = str(exc)
    summary["seconds"] = time.perf_counter() - t0
    return summary


@task(name="ingest-field", task_run_name="ingest-{spec.name}")
def ingest_field_task(spec: FieldSpec, store: str, store_spec: StoreSpec) -> dict:
    result = ingest_one(spec, store, store_spec)
    if result["status"] == "failed":
        log.error("field %s skipped: %s", spec.name, result["error"])
    line = {"ingested": f"ingested {spec.name} in {result['seconds']:.1f} s",
            "skipped": f"skipped  {spec.name}: complete, inputs unchanged",
            "failed": f"FAILED   {spec.name}: {result['error']}"}[result["status"]]
    print(line, file=sys.stderr, flush=True)  # progress, one line per field as it finishes
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
