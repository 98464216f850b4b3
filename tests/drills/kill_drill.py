"""Fault drill: `deepfield run` killed at random moments, then run again, must give the clean run's catalog.

Each drill starts `deepfield run` on a small survey (classical stages; every tile 1 s longer, so that there is
a window to hit) and, at a random moment of a clean run's duration, kills with SIGKILL either the driver
(then runs the same command again) or a tile actor (the run goes on by itself). Afterwards:
- the run's catalog equals the clean run's, row for row and column for column (timestamps aside: the catalog
  holds none);
- every ledger record is done, and no temporary file, no stale catalog version and no TensorStore lock file
  is left in the run directory;
- no process of the killed run is left (the next run of the directory stops the helpers it left: its Prefect
  server, Ray's agents).

usage: python tests/drills/kill_drill.py [--runs 20] [--seed 0] [--work DIR] [--survey SIM_DIR]
                                        [--targets driver,actor]
Prints one line per drill and exits 1 if any failed. tests/test_drill.py runs a short form in CI.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, also when run as a script from here
from _stages import CLASSICAL_STAGES as STAGES  # noqa: E402


def make_survey(work: Path) -> Path:
    from deepfield.tasks.sim.config import SimConfig
    from deepfield.tasks.sim.survey import simulate_survey
    sim = work / "sim"
    simulate_survey(SimConfig(seed=11, size=512, fields=2, overlap=20.0), sim, workers=2)
    return sim


def write_config(path: Path, survey: Path, run_dir: Path) -> Path:
    path.write_text(yaml.safe_dump(dict(inputs=str(survey / "manifest.yaml"), run_dir=str(run_dir),
                                        store_layout=dict(tile=256, chunk=128), halo=32, stages=STAGES)))
    return path


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    return dict(out, DEEPFIELD_FAULT="delay:1", COLUMNS="300")


def run(cfg: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "deepfield"), "run", str(cfg)], env=env(), stdout=open(log, "a"),
                            stderr=subprocess.STDOUT)


def catalog(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "catalogs" / "sources_flat").sort_values("source_id").reset_index(drop=True)


def carries_home(pid: int | str, run_dir: Path) -> bool:
    """Whether the process runs with the run's Prefect home in its environment (the driver sets it, and Ray's
    agents and actors inherit it): the processes of this run, not of another run on the same machine."""
    home = f"PREFECT_HOME={run_dir / '.deepfield-prefect'}".encode()
    try:
        return home in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def actor_pids(run_dir: Path) -> list[int]:
    """The tile actors of this run only: another test session may run its own on this machine."""
    out = subprocess.run(["pgrep", "-f", "ray::TileRunner"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if carries_home(p, run_dir)]


def leftovers(run_dir: Path) -> list[str]:
    """What a finished run must not leave: temporaries, stale catalog versions, TensorStore locks, processes
    carrying the run's Prefect home."""
    bad = [str(p) for p in run_dir.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".__lock")
           or p.name.startswith(".catalogs.link-")]
    versions = list(run_dir.glob(".catalogs-v-*"))
    if len(versions) != 1:
        bad.append(f"{len(versions)} catalog versions")
    for proc in Path("/proc").glob("[0-9]*"):
        if carries_home(proc.name, run_dir):
            try:
                bad.append(f"process {proc.name}: {(proc / 'cmdline').read_bytes()[:80]!r}")
            except OSError:
                continue
    return bad


def drill(k: int, cfg_dir: Path, survey: Path, reference: pd.DataFrame, clean_seconds: float,
          rng: random.Random, target: str | None = None) -> tuple[bool, str]:
    run_dir = cfg_dir / f"run{k}"
    cfg = write_config(cfg_dir / f"drill{k}.yaml", survey, run_dir)
    log = cfg_dir / f"drill{k}.log"
    target = target or rng.choice(["driver", "driver", "actor"])
    t0 = time.perf_counter()
    p = run(cfg, log)
    if target == "actor":  # once the actors are up, a moment into their tiles
        while not actor_pids(run_dir) and p.poll() is None and time.perf_counter() - t0 < 2 * clean_seconds:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 3.0))
        pids = actor_pids(run_dir)
        what = f"actor at {time.perf_counter() - t0:.1f} s"
        if not pids or p.poll() is not None:  # a drill that kills nothing must not pass as one
            p.wait(timeout=900)
            return False, f"{what}: no actor of the run was found alive to kill (see {log})"
        os.kill(rng.choice(pids), signal.SIGKILL)
        code = p.wait(timeout=900)
    else:
        at = rng.uniform(0.15, 0.95) * clean_seconds
        time.sleep(at)
        what = f"driver at {at:.1f} s"
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        else:
            what += " (already finished)"
        p.wait(timeout=60)
        code = run(cfg, log).wait(timeout=900)
    if code != 0:
        return False, f"{what}: exit {code} (see {log})"
    try:
        pd.testing.assert_frame_equal(catalog(run_dir), reference)
    except AssertionError as exc:
        return False, f"{what}: catalog differs: {str(exc).splitlines()[:3]}"
    bad = leftovers(run_dir)
    if bad:
        return False, f"{what}: left behind {bad[:5]}"
    return True, what


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--survey", type=Path, default=None, help="a `deepfield simulate` directory to use")
    ap.add_argument("--targets", default=None, help="what to kill, cycled over the drills: a comma-separated "
                    "list of driver and actor (default: at random, the driver two times in three)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="deepfield-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        survey = args.survey or make_survey(work)
        t0 = time.perf_counter()
        clean = run(write_config(work / "clean.yaml", survey, work / "clean"), work / "clean.log").wait(timeout=900)
        clean_seconds = time.perf_counter() - t0
        if clean != 0:
            print(f"clean run failed (exit {clean}); see {work / 'clean.log'}")
            return 1
        reference = catalog(work / "clean")
        print(f"clean run: {len(reference)} sources in {clean_seconds:.1f} s")
        rng = random.Random(args.seed)
        failures = 0
        targets = args.targets.split(",") if args.targets else None
        for k in range(args.runs):
            ok, msg = drill(k, work, survey, reference, clean_seconds, rng,
                            targets[k % len(targets)] if targets else None)
            failures += not ok
            print(f"drill {k + 1}/{args.runs}: {'ok  ' if ok else 'FAIL'} {msg}", flush=True)
        print(f"{args.runs - failures} of {args.runs} drills gave the clean catalog and left nothing behind")
        return 1 if failures else 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
