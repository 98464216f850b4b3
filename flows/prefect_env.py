"""Prefect settings that make a first run work with no server: the ephemeral API with its state
under the run directory, a start-up timeout that suits small machines, and no telemetry; and Prefect's
logging kept for the UI: its own loggers at WARNING on the console (no start-up chatter), the flow and task
runs' INFO records (and deepfield's, within a run) sent to the API, not to the console.

Settings given in the environment win; call `configure` before importing prefect.

Prefect's logging configuration (its logging.yml, read by this process and by the ephemeral API server it
starts) is used with two loggers added at CRITICAL: sqlalchemy's and aiosqlite's. The ephemeral server's
database pool logs an ERROR with a traceback when the server is stopped while a connection is being reset
(seen once in CI under load), which is the server's shutdown, not the run's business.
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
    # deepfield's records within a flow or task run go to the API too (the UI's run logs); outside a run, they
    # are the command line's alone, without a warning that no run is there to take them
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "deepfield")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    if "PREFECT_LOGGING_SETTINGS_PATH" not in os.environ:
        os.environ["PREFECT_LOGGING_SETTINGS_PATH"] = str(_logging_settings(Path(state_dir)))


def _logging_settings(state_dir: Path) -> Path:
    """Prefect's logging.yml with the database loggers at CRITICAL (module docstring), written into state_dir
    (without importing prefect)."""
    import importlib.util

    import yaml

    from deepfield.tasks.atomic import write_text
    source = Path(importlib.util.find_spec("prefect").origin).parent / "logging" / "logging.yml"
    config = yaml.safe_load(source.read_text())
    for name in ("sqlalchemy", "aiosqlite"):
        config.setdefault("loggers", {})[name] = {"level": "CRITICAL"}
    path = Path(state_dir).resolve() / "prefect-logging.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def quiet_run_logs(console: bool = False) -> None:
    """Send Prefect's flow- and task-run records from INFO to the API (the UI) and not to the console unless
    `console` (call after prefect is imported): the `deepfield` commands report every error themselves in one
    line (and an unexpected one's traceback in the run directory), so Prefect's tracebacks of the same errors
    would only bury it."""
    import logging
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.DEBUG if console else logging.INFO)
        lg.propagate = console
