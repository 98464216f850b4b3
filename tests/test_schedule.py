"""Scheduled reprocessing against a real Prefect server on loopback: deploy/prefect.yaml registered with
`prefect deploy`, its cron schedule read back, two runs triggered and executed by a process worker
(the first processes every tile, the second, with nothing changed, none); and `deepfield serve`
registering its own cron deployment and running a triggered run without a work pool."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from _stages import CLASSICAL_STAGES

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    """This installation first on PATH, no Prefect settings of the test session, fast polling."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_RUNNER_POLL_FREQUENCY="1", **extra)
    return env


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}:\n{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (f":\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.5)


def start(args: list[str], log: Path, env: dict, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=cwd)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server on 127.0.0.1 with its own database; yields (api url, environment for clients)."""
    home = tmp_path_factory.mktemp("prefect-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], log,
                 clean_env(PREFECT_HOME=str(home)))
    try:
        def healthy():
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(healthy, 120, "the Prefect server", proc, log)
        yield url, clean_env(PREFECT_API_URL=url, PREFECT_HOME=str(home / "client"))
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def survey_config(survey, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("scheduled")
    shutil.copytree(survey, where / "sim")
    cfg = where / "survey.yaml"
    cfg.write_text(yaml.safe_dump(dict(inputs="sim/manifest.yaml", run_dir="run", halo=48,
                                       store_layout=dict(tile=512, chunk=128), stages=CLASSICAL_STAGES,
                                       merge=dict(fits_export=False), ray=dict(num_actors=2))))
    return cfg


def read_deployment(url: str, name: str) -> dict | None:
    r = httpx.get(f"{url}/deployments/name/{name}", timeout=10)
    return r.json() if r.status_code == 200 else None


def trigger_and_wait(url: str, deployment: dict, log: Path, timeout: float = 240) -> float:
    """Create a flow run of the deployment now and wait until it completes; returns the seconds taken."""
    t0 = time.monotonic()
    for _ in range(12):  # a Prefect server busy with the served process's start answers 503 for a while
        r = httpx.post(f"{url}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=30)
        if r.status_code != 503:
            break
        time.sleep(5)
    run = r.json()
    assert r.status_code in (200, 201) and "id" in run, (r.status_code, r.text[-2000:], log.read_text()[-3000:])

    def final():
        r = httpx.get(f"{url}/flow_runs/{run['id']}", timeout=10)
        state = r.json().get("state") if r.status_code == 200 else None
        return state if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None
    state = wait_for(final, timeout, "the triggered flow run", log=log)
    assert state["type"] == "COMPLETED", (state, log.read_text()[-3000:])
    return time.monotonic() - t0


def run_summary(cfg: Path) -> dict:
    return json.loads((cfg.parent / "run" / "run-summary.json").read_text())


def test_prefect_yaml_deployment_on_a_cron_schedule_reprocesses_only_what_changed(server, survey_config, tmp_path):
    url, env = server
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "deepfield", "--type", "process"],
                   env=env, check=True, capture_output=True, timeout=120)
    r = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file",
                        "deploy/prefect.yaml"], env=dict(env, DEEPFIELD_CONFIG=str(survey_config)),
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    dep = read_deployment(url, "deepfield-reprocess/nightly")
    assert dep is not None and dep["parameters"] == {"config": str(survey_config)}
    assert dep["entrypoint"] == "deepfield.flows.schedule:reprocess_flow" and dep["work_pool_name"] == "deepfield"
    assert not dep["pull_steps"]  # nothing tied to this checkout: the worker imports the installed package
    (sched,) = dep["schedules"]
    assert sched["active"] and sched["schedule"]["cron"] == "0 2 * * *" and sched["schedule"]["timezone"] == "UTC"

    log = tmp_path / "worker.log"
    worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "deepfield"], log, env, cwd=tmp_path)
    try:
        first = trigger_and_wait(url, dep, log)
        s1 = run_summary(survey_config)
        assert s1["process"]["done"] == 8 and s1["merge"]["rows_out"] > 500
        second = trigger_and_wait(url, dep, log)
        s2 = run_summary(survey_config)
    finally:
        stop(worker)
    print(f"\nscheduled runs by a process worker: first {first:.1f} s, second (nothing changed) {second:.1f} s")
    assert {r["status"] for r in s2["ingest"]} == {"skipped"}
    assert s2["process"]["done"] == 0 and s2["process"]["skipped"] == 8
    assert s2["merge"]["rows_out"] == s1["merge"]["rows_out"]  # the catalogs rebuilt from the tile outputs


def test_serve_registers_its_cron_deployment_and_runs_it(server, survey_config, tmp_path):
    url, env = server
    log = tmp_path / "serve.log"
    served = start([str(BIN / "deepfield"), "serve", str(survey_config), "--cron", "*/30 4-6 * * 1-5",
                    "--timezone", "Europe/Paris", "--name", "weekday-mornings"], log, env)
    try:
        dep = wait_for(lambda: read_deployment(url, "deepfield-reprocess/weekday-mornings"), 120,
                       "the served deployment", served, log)
        (sched,) = dep["schedules"]
        assert sched["schedule"]["cron"] == "*/30 4-6 * * 1-5" and sched["schedule"]["timezone"] == "Europe/Paris"
        assert dep["parameters"] == {"config": str(survey_config.resolve())} and dep["work_pool_name"] is None
        before = run_summary(survey_config) if (survey_config.parent / "run" / "run-summary.json").exists() else None
        trigger_and_wait(url, dep, log)
        after = run_summary(survey_config)
    finally:
        stop(served)
    assert after["seconds"] != (before or {}).get("seconds")  # a new run wrote its summary
    assert after["process"]["tiles"] == 8 and after["process"]["failed"] == 0
    assert after["process"]["done"] == (8 if before is None else 0)
