"""The start-up measurements of bench_process.py's `startup` section: each default stage's setup in a fresh
process, and `deepfield run` itself from the command to its first tile's ledger record."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def stage_setup_times() -> dict[str, float]:
    """In a fresh process: seconds to import the tile runner (with torch), then to build and set up each default
    stage (loading its network)."""
    t0 = time.perf_counter()
    import torch  # noqa: F401  (what an actor imports first: the stages' networks)

    from deepfield.flows.run_config import RunConfig
    from deepfield.tasks.stages.registry import make_stage
    from deepfield.tasks.tile_runner import TileRunner  # noqa: F401
    out = {"imports (torch, stages)": time.perf_counter() - t0}
    for st in RunConfig.model_fields["stages"].default_factory():
        t0 = time.perf_counter()
        make_stage(st.name, **st.params).setup("cpu")
        out[st.name] = time.perf_counter() - t0
    return out


def command_startup(work: Path, inputs: Path, store: str, tag: str, cache: Path) -> tuple[float, float]:
    """(seconds from starting `deepfield run` to the first tile's ledger record, seconds that tile's own
    processing took): a fresh interpreter, default stages, a new run directory on the already ingested `store`
    (the ingest finds every field unchanged); the run is then stopped (SIGUSR1 twice: no more tiles, the tiles
    in flight released). The tile's processing is the sum of its record's timings (read, every stage, write):
    the difference is the start-up, the time before any tile began. `cache` is the user cache the command sees
    (DEEPFIELD_CACHE_DIR: the Prefect database template)."""
    import json
    import signal
    run_dir = work / f"run-command-{tag}"
    cfg = work / f"command-{tag}.yaml"
    cfg.write_text(yaml.safe_dump({"inputs": str(inputs), "run_dir": str(run_dir), "store": store}))
    env = dict(os.environ, DEEPFIELD_CACHE_DIR=str(cache))
    for key in ("PREFECT_HOME", "PREFECT_API_URL"):  # as a user's shell: the command's own settings
        env.pop(key, None)
    cli = [sys.executable, "-c", "from deepfield.flows.cli import main; main()", "run", str(cfg), "-q"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first, written = None, None
    while proc.poll() is None:
        written = [p for p in run_dir.glob("ledger/*/records.jsonl") if p.stat().st_size]
        if written:
            first = time.perf_counter() - t0
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=600)
    if first is None:
        raise RuntimeError(f"deepfield run ended (exit {proc.returncode}) before any tile:\n{err[-2000:]}")
    record = json.loads(written[0].read_text().splitlines()[0])
    if record.get("status") != "done":
        raise RuntimeError(f"{written[0]}: the first tile's record is {record.get('status')!r}, not done: "
                           f"{record.get('error')}")
    return first, sum(record["timings"].values())
