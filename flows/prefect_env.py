"""Prefect settings that make a first run work with no server: the ephemeral API with its state
under the run directory, a start-up timeout that suits small machines, and no telemetry; and Prefect's
logging kept for the UI: its own loggers at WARNING on the console (no start-up chatter), the flow and task
runs' INFO records (and deepfield's, within a run) sent to the API, not to the console.

Settings given in the environment win; call `configure` before importing prefect.

Prefect's logging configuration (its logging.yml, read by this process and by the ephemeral API server it
starts) is used with two loggers added at CRITICAL: sqlalchemy's and aiosqlite's. The ephemeral server's
database pool logs an ERROR with a traceback when the server is stopped while a connection is being reset
(seen once in CI under load), which is the server's shutdown, not the run's business. For the same reason the
task-run recorder's flush cancelled by the server's shutdown is dropped (`ShutdownCancellation`).

Start-up (issue 22). The ephemeral API costs 9-12 s in a new run directory, of which 4-6 s are the database's
migrations and block registration, and 5-7 s the server's own start. So a new run directory's database is a copy
of an empty, migrated one (`template_database`: made once per Prefect version in the user's cache, from the
first run directory whose server started), and `start_ephemeral_api` starts the server in a thread so that
Ray can start beside it. `deepfield run` goes further (`reserve_local_api`): it binds the server's port and names
it in PREFECT_API_URL before prefect is imported, then starts Prefect's server process on that socket itself,
so that the run's own process never imports the server's module (3.5-4.5 s).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path


def configure(state_dir: str | Path, quiet: bool = True) -> None:
    """Point Prefect's home (database, logs) at state_dir unless PREFECT_HOME or an API URL is set; a new
    home's database starts as a copy of the migrated template when there is one."""
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        home = Path(state_dir).resolve()
        home.mkdir(parents=True, exist_ok=True)  # the ephemeral server does not start without it
        os.environ["PREFECT_HOME"] = str(home)
        if seed_database(home):
            _SEEDED.add(str(home))
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


# What a database copied from the template has had done already: its migrations, and the block types registered
# (the server's start-up registers every block type Prefect knows in a new database unless its memo says the
# registry is unchanged, and the memo's key holds the database's path, so every new run directory paid for it).
# `deepfield run`'s own server skips them on such a database (server_settings). Measured 2026-12-08 (Intel Xeon
# host, quiet, three alternating starts of the server on a copy of the template): its first answer after
# 3.8-4.2 s with both, 3.05-3.2 s without (3.2-3.4 s without the registration alone); the block types are there
# either way (54). deepfield's flows use no blocks. Given to the server's process only, never set in this
# process's environment: a process started from this one (a benchmark's `deepfield run`, an actor) would take
# them for the user's settings and skip the migrations of a database that needs them.
_DONE_IN_TEMPLATE = ("PREFECT_API_BLOCKS_REGISTER_ON_START", "PREFECT_API_DATABASE_MIGRATE_ON_START")
_SEEDED: set = set()  # the homes this process copied from the template


def server_settings() -> dict[str, str]:
    """The environment `deepfield run`'s API server gets beyond this process's: the settings Prefect's ephemeral
    server gets, and, when PREFECT_HOME is a home this process copied from the template, the start-up steps the
    template has done set off (_DONE_IN_TEMPLATE; a value the environment gives is kept)."""
    out = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    if os.environ.get("PREFECT_HOME") in _SEEDED:
        out.update({k: "false" for k in _DONE_IN_TEMPLATE if k not in os.environ})
    return out


def flow_settings():
    """The context to call this process's flows in: with an API of its own (Prefect's ephemeral one, or the
    local one of `reserve_local_api`, which live as long as the process), flow-run heartbeats are off. Prefect
    sends them (every 180 s) so that a server's automations can mark a run whose process died as crashed;
    an API that dies with the process has no use for them, and each flow run's end waits up to a second for
    the heartbeat thread, which sleeps in steps of one second (about 1 s per flow run, two per `deepfield run`:
    the run and its ingest). With a server named in PREFECT_API_URL other than the one `reserve_local_api`
    named (a user's server, `deepfield serve`'s, a worker's), Prefect's settings are left as they are."""
    from contextlib import nullcontext
    if "PREFECT_API_URL" in os.environ and not _LOCAL_API:
        return nullcontext()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


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
    config.setdefault("filters", {})["deepfield_shutdown"] = {"()": f"{__name__}.ShutdownCancellation"}
    config["loggers"][ShutdownCancellation.LOGGER] = {"filters": ["deepfield_shutdown"]}
    path = Path(state_dir).resolve() / "prefect-logging.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


class ShutdownCancellation(logging.Filter):
    """Drops the API server's task-run recorder's "Error flushing N events" records whose exception is a
    cancellation: the server stopped (with the run's process) while the recorder still held task-run events, which
    it flushes in batches every few seconds. Each is an ERROR with two tracebacks, after every flow of some
    hundreds of task runs (an ingest of 5,000 fields: two of them, 150 lines, once the run had finished well). What
    is lost is the last task runs' states in the server's own database (the UI's history), not anything the run
    wrote. Other errors of the recorder, such as events dropped after failed retries, are kept."""

    LOGGER = "prefect.server.services.task_run_recorder"

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, asyncio.CancelledError) and str(record.msg).startswith("Error flushing"))


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


def template_database() -> Path:
    """The empty, migrated Prefect database that new run directories start from: one per Prefect version, under
    $DEEPFIELD_CACHE_DIR, else $XDG_CACHE_HOME/deepfield, else ~/.cache/deepfield."""
    from importlib.metadata import version

    from deepfield.models.registry import user_cache_dir
    return user_cache_dir() / f"prefect-{version('prefect')}" / "prefect.db"


def _copy_database(source: Path, target: Path, immutable: bool = False) -> None:
    """A consistent copy of a SQLite database (sqlite's online backup, safe while a server uses the source)
    written under a temporary name and renamed into place, so a reader sees the whole copy or none.
    `immutable`: the source is never written (the template), so it is read without WAL side files."""
    import sqlite3
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro" + ("&immutable=1" if immutable else ""), uri=True)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def seed_database(home: Path) -> bool:
    """Start a home without a database from the template (True when copied). Best effort: without a template, or
    when it cannot be read, Prefect creates and migrates the database itself, as before. Only a database whose
    connection is Prefect's default (PREFECT_HOME/prefect.db) is seeded."""
    db = home / "prefect.db"
    if db.exists() or any(k in os.environ for k in ("PREFECT_SERVER_DATABASE_CONNECTION_URL",
                                                     "PREFECT_API_DATABASE_CONNECTION_URL")):
        return False
    try:
        template = template_database()
        if not template.is_file():
            return False
        _copy_database(template, db, immutable=True)
        return True
    except Exception:  # noqa: BLE001 - a cache that cannot be used only costs the migrations
        db.unlink(missing_ok=True)
        return False


def save_template() -> None:
    """Make the template from this process's home when there is none yet: call once the ephemeral server has
    started (the database is migrated) and before any flow run was made, so the copy is empty."""
    home = os.environ.get("PREFECT_HOME")
    if not home:
        return
    db, template = Path(home) / "prefect.db", template_database()
    if template.exists() or not db.is_file():
        return
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        _copy_database(db, template)
    except Exception:  # noqa: BLE001 - best effort, as above
        pass


_LOCAL_API: dict = {}  # the API server this process starts itself: {"socket": its bound listening socket}


def reserve_local_api() -> bool:
    """Name a local API server in PREFECT_API_URL before prefect is imported, unless a server is named already:
    a socket on a free port of 127.0.0.1 is bound and listening now (no other process can take the port), and
    `start_ephemeral_api` starts Prefect's server on it. True when reserved. This process then never imports
    Prefect's server module (3.5-4.5 s of a 2-core machine's time per run; issue 22): the server runs in its own
    process, as Prefect's ephemeral one does. Does nothing once prefect is imported (its settings are read)."""
    import socket
    import sys
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules or _LOCAL_API:
        return False
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    for key in ("NO_PROXY", "no_proxy"):  # Prefect's client (httpx) would send a local server's calls to an http_proxy
        have = os.environ.get(key, "")
        if "127.0.0.1" not in have.split(","):
            os.environ[key] = f"{have},127.0.0.1" if have else "127.0.0.1"
    _LOCAL_API["socket"] = sock
    return True


def stop_local_api() -> None:
    """Stop the API server this process started on its reserved socket (if any) and forget the reservation:
    PREFECT_API_URL is removed, and a later reserve_local_api may reserve again (`deepfield run` undoing the
    server it started before a run configuration that is then refused)."""
    stop = _LOCAL_API.get("stop")
    if stop is not None:
        stop()
    sock = _LOCAL_API.get("socket")
    if sock is not None:
        sock.close()
    _LOCAL_API.clear()
    os.environ.pop("PREFECT_API_URL", None)


def _start_local_api():
    """Start Prefect's API server (uvicorn, Prefect's app factory) on the socket `reserve_local_api` bound, with
    the settings Prefect's ephemeral server gets; stopped when this process exits. Returns the wait function of
    `start_ephemeral_api`."""
    import atexit
    import importlib.util
    import subprocess
    import sys
    import time
    import urllib.request
    sock = _LOCAL_API["socket"]
    url = os.environ["PREFECT_API_URL"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(server_settings())
    app_dir = Path(importlib.util.find_spec("prefect").origin).parent
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
                             "prefect.server.api.server:create_app", "--fd", str(sock.fileno()), "--log-level",
                             "error", "--lifespan", "on"], env=env, pass_fds=(sock.fileno(),))
    sock.close()  # the server holds the port now

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    atexit.register(stop)
    _LOCAL_API["stop"] = stop

    def wait() -> None:
        limit = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: no http_proxy
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Prefect's local API server exited with code {proc.returncode} before it "
                                   "answered (its errors are above)")
            try:
                with direct.open(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:  # not answering yet (URLError and timeouts are OSErrors)
                pass
            if time.monotonic() - t0 > limit:
                stop()
                raise RuntimeError(f"Prefect's local API server did not answer within {limit:.0f} s "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(0.1)
        save_template()
    return wait


def start_ephemeral_api():
    """Start Prefect's API server for this run; returns a function that waits for it to answer (raising its
    error) and saves the database template. Call the function before the first flow. The server is started
    on the socket of `reserve_local_api` when it was called; else, with a server named in PREFECT_API_URL (or
    the test harness's), nothing is started; else Prefect's own ephemeral server is started in a thread (its
    module imported here)."""
    import threading
    if _LOCAL_API:
        return _start_local_api()
    from prefect.settings import PREFECT_API_URL
    if PREFECT_API_URL.value():  # a server, or the test harness's
        return lambda: None
    from prefect.server.api.server import SubprocessASGIServer
    failure: list[BaseException] = []

    def start() -> None:
        try:
            SubprocessASGIServer().start()
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by wait()
            failure.append(exc)

    thread = threading.Thread(target=start, name="prefect-ephemeral-api", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failure:
            raise failure[0]
        save_template()
    return wait
