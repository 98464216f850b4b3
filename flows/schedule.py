"""Scheduled reprocessing: the run flow as a Prefect deployment with JSON parameters.

`reprocess_flow(config)` reads the run configuration and runs ingest -> process -> merge. What is
unchanged is skipped: ingest skips fields whose input checksums match, processing skips tiles the
ledger has done under the same configuration hash, stage versions, model versions and input
fingerprint, and the merge rebuilds the catalogs from the per-tile outputs. So a nightly run
reprocesses only new or changed inputs, a changed configuration, or the stages whose model changed.

It is deployed by `deploy/prefect.yaml` (a work pool and a worker run it) or by `deepfield serve`
(`serve_reprocessing`: a long-running process that is its own scheduler and runner, no work pool).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import flow

from deepfield.flows.run import run_flow
from deepfield.flows.run_config import load_run_config

DEPLOYMENT_FLOW = "deepfield-reprocess"


@flow(name=DEPLOYMENT_FLOW)
def reprocess_flow(config: str, run_dir: Optional[str] = None, ray_address: Optional[str] = None,
                   dask_address: Optional[str] = None) -> dict:
    """Run the survey of the run configuration `config` (a path on the machine that runs the flow),
    redoing only what changed. run_dir, ray_address, dask_address override the configuration's."""
    cfg = load_run_config(config, run_dir=str(Path(run_dir).resolve()) if run_dir else None)
    summary = run_flow(cfg.with_addresses(ray_address, dask_address))
    if summary["failed_fields"] or summary["failed_tiles"]:
        raise RuntimeError(f"{config}: {len(summary['failed_fields'])} field(s) and "
                           f"{len(summary['failed_tiles'])} tile(s) failed; see {cfg.run_dir / 'run-summary.json'}")
    return dict(run_dir=str(cfg.run_dir), tiles=summary["process"]["tiles"], processed=summary["process"]["done"],
                skipped=summary["process"]["skipped"], sources=summary["merge"].get("rows_out"))


def serve_reprocessing(config: Path, cron: str, name: str, timezone: str = "UTC", limit: int = 1) -> None:
    """Register the deployment `deepfield-reprocess/<name>` for `config` on a cron schedule and run its
    flow runs (scheduled or triggered) until interrupted; Prefect's Runner, no work pool."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    # the flow is imported from the installed package (as deploy/prefect.yaml's module entrypoint), not
    # from a file path of this checkout
    reprocess_flow.serve(name=name, schedules=[Cron(cron, timezone=timezone)],
                         parameters=dict(config=str(config.resolve())), limit=limit,
                         entrypoint_type=EntrypointType.MODULE_PATH,
                         description=f"reprocess {config.resolve()} on the schedule {cron!r} ({timezone})")
