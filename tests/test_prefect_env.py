"""The Prefect database template that spares a new run directory the database's migrations
(flows/prefect_env.py): copied whole or not at all, never from a damaged file, and only for Prefect's default
database location."""
from __future__ import annotations

import sqlite3

import pytest

from deepfield.flows import prefect_env


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPFIELD_CACHE_DIR", str(tmp_path / "cache"))
    for key in ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path / "cache"


def make_db(path, rows=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode = WAL")  # as Prefect's server keeps it
    con.execute("CREATE TABLE alembic_version (version_num TEXT)")
    con.executemany("INSERT INTO alembic_version VALUES (?)", [(f"v{i}",) for i in range(rows)])
    con.commit()
    return con  # left open: the copy must see the committed rows still in the WAL


def rows(path):
    con = sqlite3.connect(path)
    try:
        return sorted(r[0] for r in con.execute("SELECT version_num FROM alembic_version"))
    finally:
        con.close()


def test_the_template_is_keyed_by_prefect_version_under_the_cache(cache):
    from importlib.metadata import version
    assert prefect_env.template_database() == cache / f"prefect-{version('prefect')}" / "prefect.db"


def test_a_new_home_is_seeded_from_the_template_and_a_used_one_is_left_alone(cache, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    assert not prefect_env.seed_database(home)  # no template yet: Prefect migrates its own database
    assert not (home / "prefect.db").exists()

    monkeypatch.setenv("PREFECT_HOME", str(home))
    live = make_db(home / "prefect.db", rows=3)  # the server's database, still open, rows in its WAL
    prefect_env.save_template()
    live.close()
    template = prefect_env.template_database()
    assert rows(template) == ["v0", "v1", "v2"]
    assert not list(template.parent.glob(".*.tmp"))

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert prefect_env.seed_database(fresh)
    assert rows(fresh / "prefect.db") == ["v0", "v1", "v2"]
    assert not list(template.parent.glob("prefect.db-*"))  # the template is read without WAL side files

    (fresh / "prefect.db").unlink()
    make_db(fresh / "prefect.db", rows=1).close()  # a home with its own database keeps it
    assert not prefect_env.seed_database(fresh)
    assert rows(fresh / "prefect.db") == ["v0"]

    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "postgresql+asyncpg://db/prefect")
    assert not prefect_env.seed_database(other)  # not Prefect's default location: nothing to seed
    assert not (other / "prefect.db").exists()


def test_a_damaged_template_costs_only_the_migrations(cache, tmp_path):
    template = prefect_env.template_database()
    template.parent.mkdir(parents=True)
    template.write_bytes(b"not a database" * 100)
    home = tmp_path / "home"
    home.mkdir()
    assert not prefect_env.seed_database(home)
    assert not (home / "prefect.db").exists()
    assert not list(home.iterdir())  # no half-written copy left


LOCAL_API_SCRIPT = """
import os, sys
from deepfield.flows import prefect_env
prefect_env.configure(sys.argv[1])
assert prefect_env.reserve_local_api()
assert "prefect" not in sys.modules
url = os.environ["PREFECT_API_URL"]
prefect_env.start_ephemeral_api()()  # the server answers, through no http_proxy
from prefect import flow

@flow
def twice(x):
    return 2 * x

assert twice(21) == 42  # the client reaches the server too
assert "prefect.server.api.server" not in sys.modules  # never imported by the run's own process
import json, urllib.request
req = urllib.request.Request(url + "/block_types/filter", data=b"{}", headers={"Content-Type": "application/json"})
types = json.load(urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req))
settings = prefect_env.server_settings()
assert "PREFECT_API_BLOCKS_REGISTER_ON_START" not in os.environ  # the server's alone
print(settings.get("PREFECT_API_BLOCKS_REGISTER_ON_START"), settings.get("PREFECT_API_DATABASE_MIGRATE_ON_START"),
      len(types))
print(url)
"""


@pytest.mark.slow
def test_the_local_api_serves_a_flow_run_through_a_proxy_and_stops_at_exit(tmp_path):
    """`deepfield run`'s own Prefect API server (reserve_local_api, then start_ephemeral_api): the port is named
    before prefect is imported, a flow runs against it with an unreachable http_proxy in the environment, the
    run's process never imports Prefect's server module, and nothing answers on the port after the process
    exits (its server was stopped). Twice: the first home is migrated by its server (no template yet) and made
    the template; the second is copied from it and its server skips the migrations and the block types'
    registration, the block types being there all the same."""
    import os
    import subprocess
    import sys
    import urllib.error
    import urllib.request
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and "proxy" not in k.lower()}
    env.update(http_proxy="http://192.0.2.1:9", HTTP_PROXY="http://192.0.2.1:9",  # TEST-NET-1: unreachable
               DEEPFIELD_CACHE_DIR=str(tmp_path / "cache"))
    for home, skipped in (("home", "None None"), ("second", "false false")):
        out = subprocess.run([sys.executable, "-c", LOCAL_API_SCRIPT, str(tmp_path / home)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        flags, url = out.stdout.strip().splitlines()[-2:]
        assert flags.rsplit(" ", 1)[0] == skipped and int(flags.rsplit(" ", 1)[1]) > 10, flags
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with pytest.raises(urllib.error.URLError):
            direct.open(f"{url}/health", timeout=5)


def test_a_home_copied_from_the_template_skips_what_the_template_has_done(cache, tmp_path, monkeypatch):
    """The API server of a new home copied from the template gets the migrations and the block registration off;
    of a home that is not copied (none could be, or its database was there), on (Prefect's defaults); a value the
    environment gives is kept; and this process's environment never holds them (a process it starts would take
    them for the user's)."""
    keys = ("PREFECT_API_BLOCKS_REGISTER_ON_START", "PREFECT_API_DATABASE_MIGRATE_ON_START")
    for key in ("PREFECT_HOME", "PREFECT_API_URL", *keys):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(prefect_env, "_SEEDED", set())
    template = prefect_env.template_database()
    make_db(template, rows=2).close()
    prefect_env.configure(tmp_path / "a")
    assert (tmp_path / "a" / "prefect.db").exists()
    assert all(prefect_env.server_settings()[k] == "false" for k in keys)
    assert not any(k in prefect_env.os.environ for k in keys)
    monkeypatch.delenv("PREFECT_HOME")
    template.unlink()  # the next home is not copied: its server migrates it and registers the block types
    prefect_env.configure(tmp_path / "b")
    assert not (tmp_path / "b" / "prefect.db").exists() and not any(k in prefect_env.server_settings() for k in keys)
    monkeypatch.delenv("PREFECT_HOME")
    make_db(template, rows=2).close()
    monkeypatch.setenv(keys[0], "true")  # the user's word
    prefect_env.configure(tmp_path / "c")
    assert keys[0] not in prefect_env.server_settings() and prefect_env.server_settings()[keys[1]] == "false"


def test_the_servers_flush_cancelled_at_its_shutdown_is_not_logged(tmp_path):
    """The logging configuration the API server gets drops the task-run recorder's "Error flushing" record whose
    exception is the cancellation of its shutdown (an ERROR with two tracebacks after a flow of some hundreds of
    task runs that went well), and keeps its other records."""
    import asyncio
    import importlib
    import logging
    import sys

    import yaml
    from prefect.logging.configuration import load_logging_config

    config = load_logging_config(prefect_env._logging_settings(tmp_path))
    name = prefect_env.ShutdownCancellation.LOGGER
    assert config["loggers"][name]["filters"] == ["deepfield_shutdown"]
    module, _, cls = config["filters"]["deepfield_shutdown"]["()"].rpartition(".")
    flt = getattr(importlib.import_module(module), cls)()
    written = yaml.safe_load((tmp_path / "prefect-logging.yml").read_text())
    assert written["loggers"]["sqlalchemy"]["level"] == "CRITICAL"

    def record(msg, exc):
        try:
            raise exc
        except BaseException:  # noqa: BLE001 - the record's exc_info, as logger.error(..., exc_info=True) makes it
            return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, sys.exc_info())

    assert not flt.filter(record("Error flushing 1 events (1 to retry, 0 dropped)", asyncio.CancelledError()))
    assert flt.filter(record("Error flushing 3 events (0 to retry, 3 dropped)", RuntimeError("database is locked")))
    assert flt.filter(record("Dropping event 1 after 4 failed attempts", asyncio.CancelledError()))
