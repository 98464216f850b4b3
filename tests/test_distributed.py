"""Distributed faults, for real: a Ray cluster of two nodes (a head and a second node, each its own raylet and
object store, as on two hosts) and a Dask scheduler with two worker processes, all started on this machine;
`deepfield run --ray-address --dask-address` over them, and mid-run the second Ray node and one Dask worker
are stopped. The run must finish with the catalog of a clean run, and the ledger must show tiles done on both
Ray nodes. Classical stages; every tile takes 2 s longer (DEEPFIELD_FAULT=delay:2) so that the nodes are
stopped while tiles are in flight."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from deepfield.tasks.ledger import Ledger
from _classical_run import config

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_a_run_survives_losing_a_ray_node_and_a_dask_worker(survey, clean, tmp_path):
    """The reference is the session's clean run, made once for the fault tests: this run's configuration is
    that run's (tests/_classical_run.py's `config`) with the addresses and the run directory changed."""
    _, reference = clean
    cfg = config(survey, tmp_path / "run").model_dump(mode="json", include={"inputs", "store_layout", "halo", "stages"})

    work = Path(tempfile.mkdtemp(prefix="dfd", dir="/tmp"))  # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), DEEPFIELD_FAULT="delay:2",
               COLUMNS="300")
    ray_port, dask_port = free_port(), free_port()
    procs: dict[str, subprocess.Popen] = {}

    def start(name, *cmd):
        log = open(work / f"{name}.log", "w")
        procs[name] = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)

    def stop(name, sig=signal.SIGTERM):
        try:
            os.killpg(procs[name].pid, sig)
        except ProcessLookupError:
            pass

    run_dir = tmp_path / "run"
    (tmp_path / "survey.yaml").write_text(yaml.safe_dump(dict(cfg, run_dir=str(run_dir),
                                                              ray=dict(actor_start_timeout=15))))
    try:
        start("head", "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={ray_port}",
              "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={work / 'ray'}", "--disable-usage-stats")
        wait_for(lambda: listening(ray_port), 120, "the Ray head")
        start("node2", "ray", "start", "--block", f"--address=127.0.0.1:{ray_port}", "--num-cpus=1",
              "--disable-usage-stats")
        start("scheduler", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(dask_port), "--no-dashboard")
        wait_for(lambda: listening(dask_port), 60, "the Dask scheduler")
        for k in (1, 2):
            start(f"worker{k}", "dask", "worker", f"tcp://127.0.0.1:{dask_port}", "--nworkers", "1", "--nthreads",
                  "1", "--no-dashboard", "--local-directory", str(work / f"dask{k}"), "--death-timeout", "60")

        def nodes_and_workers():
            probe = ("import ray, json; from dask.distributed import Client\n"
                     f"ray.init(address='127.0.0.1:{ray_port}', log_to_driver=False)\n"
                     f"c = Client('tcp://127.0.0.1:{dask_port}', timeout=10)\n"
                     "print(json.dumps([sum(n['Alive'] for n in ray.nodes()), len(c.scheduler_info()['workers'])]))")
            r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
            return r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1]) == [2, 2]
        wait_for(nodes_and_workers, 180, "two Ray nodes and two Dask workers")

        start("run", "deepfield", "run", str(tmp_path / "survey.yaml"), "--ray-address", f"127.0.0.1:{ray_port}",
              "--dask-address", f"tcp://127.0.0.1:{dask_port}")

        def nodes_with_done_tiles() -> set:
            return {r.worker.get("ray_node") for r in Ledger(run_dir).records() if r.status == "done"}
        wait_for(lambda: len(nodes_with_done_tiles()) == 2, 300, "tiles done on both Ray nodes")
        stop("node2")  # the second Ray node goes, with the tiles in flight on its actor
        stop("worker2", signal.SIGKILL)  # and one Dask worker, before the merge
        assert procs["run"].wait(timeout=600) == 0, (work / "run.log").read_text()[-3000:]
    finally:
        for name in reversed(list(procs)):
            stop(name)
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)

    summary = json.loads((run_dir / "run-summary.json").read_text())
    assert summary["process"]["failed"] == 0 and summary["process"]["retries"] >= 1
    records = Ledger(run_dir).records()
    assert len(records) == 8 and {r.status for r in records} == {"done"}
    assert len({r.worker["ray_node"] for r in records}) == 2  # tiles done on both nodes
    cat = pd.read_parquet(run_dir / "catalogs" / "sources_flat").sort_values("source_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(cat, reference)
