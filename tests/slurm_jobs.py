"""Submitting deploy/slurm/deepfield.sbatch to a real Slurm from the tests, and watching the jobs.

The tests that use it skip when Slurm is not running on this machine, unless DEEPFIELD_REQUIRE_SLURM=1
(set by .ci/run, which starts a single-node Slurm with deploy/slurm/ci/start-slurm.sh): then a missing
Slurm is a failure.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SBATCH_SCRIPT = REPO / "deploy" / "slurm" / "deepfield.sbatch"
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
               "BOOT_FAIL", "DEADLINE"}


def require_slurm() -> None:
    """Skip (or fail, under DEEPFIELD_REQUIRE_SLURM=1) unless a Slurm controller answers here."""
    required = os.environ.get("DEEPFIELD_REQUIRE_SLURM") == "1"
    missing = [b for b in ("sbatch", "squeue", "scontrol", "scancel", "sinfo") if shutil.which(b) is None]
    if missing:
        why = f"Slurm client programs not found: {', '.join(missing)}"
    else:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        states = r.stdout.split()
        if r.returncode == 0 and any(s.startswith(("idle", "mixed", "alloc")) for s in states):
            return
        why = f"no Slurm node takes jobs (sinfo: {(r.stdout + r.stderr).strip()[:300]!r})"
    if required:
        pytest.fail(f"DEEPFIELD_REQUIRE_SLURM=1 but {why}; start one with deploy/slurm/ci/start-slurm.sh")
    pytest.skip(f"{why} (deploy/slurm/ci/start-slurm.sh starts a single-node Slurm as root)")


def job_env(**extra: str) -> dict[str, str]:
    """The submitting environment: this interpreter's bin/ first on PATH (so `deepfield`, `ray`, `dask`
    are this installation's), without the test session's Prefect and Ray settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def submit(config: Path, out: Path, env: dict[str, str], *args: str) -> str:
    """sbatch the deploy script on `config` (from its directory); returns the job id."""
    r = subprocess.run(["sbatch", "--parsable", f"--output={out}", f"--chdir={config.parent}",
                        str(SBATCH_SCRIPT), str(config), *args],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_state(job: str) -> tuple[str, str]:
    """(JobState, ExitCode) of a job Slurm still remembers."""
    r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30)
    state = re.search(r"JobState=(\S+)", r.stdout)
    code = re.search(r"ExitCode=(\S+)", r.stdout)
    return (state.group(1) if state else "UNKNOWN"), (code.group(1) if code else "")


def wait_job(job: str, timeout: float = 300.0) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, code = job_state(job)
        if state in DONE_STATES:
            return state, code
        time.sleep(1.0)
    subprocess.run(["scancel", job], timeout=30)
    raise AssertionError(f"Slurm job {job} not finished in {timeout} s (cancelled)")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)
