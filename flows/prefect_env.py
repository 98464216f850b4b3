"""Prefect settings that make a first run work with no server: the ephemeral API with its state
under the run directory, a start-up timeout that suits small machines, and no telemetry.

Settings given in the environment win; call `configure` before importing prefect.
"""
from __future__ import annotations

import os
from pathlib import Path


def configure(state_dir: str | Path, quiet: bool = True) -> None:
    """Point Prefect's home (database, logs) at state_dir unless PREFECT_HOME or an API URL is set."""
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        home = Path(state_dir).resolve()
        home.mkdir(parents=True, exist_ok=True)  # the ephemeral server does not start without it
        os.environ["PREFECT_HOME"] = str(home)
    # the ephemeral server takes 10-25 s to start on a loaded 2-core machine; Prefect's default is 20 s
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def quiet_run_logs() -> None:
    """Keep Prefect's flow- and task-run loggers off the console (call after prefect is imported): the
    `deepfield` commands report every error themselves in one line (and an unexpected one's traceback in the
    run directory), so Prefect's tracebacks of the same errors would only bury it."""
    import logging
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
