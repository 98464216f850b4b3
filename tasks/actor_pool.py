"""Processing: a Ray actor pool runs the tile runner over every tile of every complete field (the work of
the run flow's processing task, flows/process.py).

One actor per GPU when the Ray cluster has GPUs (num_gpus=1: Ray gives each actor its own
CUDA_VISIBLE_DEVICES), otherwise N CPU actors. Work in flight is bounded (a few tiles per actor). The
tiles to do come from one read of each field's ledger log, one tile of each field in turn (`fields_in_turn`:
the actors then start on different fields, and a field's shared work, done once for the run, is there when
its later tiles come); the driver hands tiles out as actors free up and
takes every result that is in at each pass (one `ray.wait` for all, waiting only when none is), so that
its cost per tile stays small (tests/benchmarks/bench_survey_scale.py).
An actor that dies is replaced and its tiles retried (a replacement that cannot start, its node lost
and no room elsewhere, is given up and the other actors take its tiles); a tile that fails `max_attempts` times is
marked failed in the ledger and the run goes on. A tile that finds its field damaged in the store
(tasks.zarr_store.StoreIntegrityError) fails at once, and after the run the field's completion marker is
removed, so that the next run ingests it again from its inputs (`damaged_fields` in the summary). The
driver writes the ledger; actors write the tile outputs.

The pool can be started ahead (`prestart_actors`, by `deepfield run` while Prefect's API comes up and the
ingest checks its fields): the actors' start-up (worker processes, imports, networks) then overlaps the
driver's. run_tiles takes such actors when they were made for exactly its arguments (store, run directory,
stages with their parameters, halo, plugins, actor options), makes each reopen the store first (a field the
ingest rewrote meanwhile is read as it is now), and stops any others.

A stop request (`request_stop`, e.g. from the SIGUSR1 a Slurm job receives before its walltime) makes
the driver dispatch nothing more and wait for the tiles in flight; a second request, or `stop_grace`
seconds, releases those too (they are not in the ledger, so the next run does them). The run then
returns with `stopped` set and the ledger holds every tile that finished.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Callable

from .atomic import clean_stale_temporaries
from .ledger import Ledger, TileRecord
from .provenance import run_keys
from .tile_runner import TileRunner
from .zarr_store import StoreIntegrityError, all_tiles, complete_fields, invalidate_field, open_store

__all__ = ["run_tiles", "start_ray", "actor_plan", "request_stop", "clear_stop", "stop_requested", "prestart_actors",
           "discard_prestarted", "fields_in_turn"]

Progress = Callable[[int, int, str], None]
log = logging.getLogger(__name__)

_stop = threading.Event()
_release = threading.Event()
_prestarted: dict[str, list] = {}  # pool key (_pool_key) -> actor handles made ahead by prestart_actors


def fields_in_turn(tiles: list) -> list:
    """`tiles` (TileIds) in the order they are handed out: one tile of each field in turn (the fields in the
    order of their first tile, each field's tiles in their own order). Given out field by field, every actor
    would reach each field at once and wait for, or repeat, its field-level work (the cluster stage's binning of
    the whole field, tasks/stages/cluster.py); in turn, the actors start on different fields and the later tiles
    of a field find that work done."""
    by_field: dict[str, deque] = {}
    for t in tiles:
        by_field.setdefault(t.field, deque()).append(t)
    out, queues = [], list(by_field.values())
    while queues:
        out += [q.popleft() for q in queues]
        queues = [q for q in queues if q]
    return out


def request_stop() -> None:
    """Stop dispatching tiles (safe to call from a signal handler); a second call releases the tiles
    in flight without waiting for them."""
    if _stop.is_set():
        _release.set()
    _stop.set()


def clear_stop() -> None:
    _stop.clear()
    _release.clear()


def stop_requested() -> bool:
    return _stop.is_set()


def start_ray(address: str | None, num_cpus: int | None):
    """Connect to a Ray cluster at `address`, or start (or reuse) a local one. The actors' output reaches this
    process's standard error only when deepfield logs at DEBUG (`-vv` on the command line); Ray's own logging
    is left to the process's configuration (configure_logging=False)."""
    import logging

    import ray
    if ray.is_initialized():
        return ray
    to_driver = logging.getLogger("deepfield").isEnabledFor(logging.DEBUG)
    if address:
        ray.init(address=address, log_to_driver=to_driver)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=to_driver,
                 configure_logging=False)
    return ray


def actor_plan(resources: dict, use_gpus: bool, num_actors: int | None) -> tuple[int, dict]:
    """(number of actors, Ray actor options) for a cluster's resources: one actor per GPU, each
    reserving exactly one (so no two share a GPU and Ray sets each one's CUDA_VISIBLE_DEVICES), or
    `num_actors` (default: every CPU) single-CPU actors when there is no GPU."""
    gpus = int(resources.get("GPU", 0)) if use_gpus else 0
    if gpus:
        return gpus, dict(num_gpus=1, num_cpus=1)
    return num_actors or int(resources.get("CPU", os.cpu_count() or 1)), dict(num_cpus=1)


def _pool_key(store: str, run_dir: str, stages: list[tuple[str, dict]], halo: int, plugins, opts: dict) -> str:
    """What makes two actor pools interchangeable: the TileRunner's arguments and the actors' Ray options."""
    return json.dumps([str(store), str(run_dir), [[n, p] for n, p in stages], int(halo), [str(p) for p in plugins],
                       opts], sort_keys=True, default=str)


def prestart_actors(store: str, run_dir: str, stages: list[tuple[str, dict]], halo: int, address: str | None = None,
                    num_actors: int | None = None, use_gpus: bool = True, plugins: list[str] | tuple[str, ...] = ()
                    ) -> int:
    """Create, now, the actors run_tiles would create for these arguments (without actor_env), and keep them for
    it (module docstring); returns how many. Their start-up runs in the background: this returns at once."""
    ray = start_ray(address, num_actors)
    n, opts = actor_plan(ray.cluster_resources(), use_gpus, num_actors)
    discard_prestarted()
    Actor = ray.remote(max_restarts=0, **opts)(TileRunner)
    _prestarted[_pool_key(store, run_dir, stages, halo, plugins, opts)] = [
        Actor.remote(store, run_dir, stages, halo, plugins=tuple(plugins)) for _ in range(n)]
    return n


def discard_prestarted() -> None:
    """Stop every actor prestart_actors made that run_tiles has not taken."""
    ray = sys.modules.get("ray")
    for actors in _prestarted.values():
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - Ray already shut down: the actor is gone with it
                pass
    _prestarted.clear()


def run_tiles(store: str, run_dir: str, stages: list[tuple[str, dict]], halo: int, config_hash: str,
              address: str | None = None, num_actors: int | None = None, use_gpus: bool = True,
              in_flight_per_actor: int = 2, max_attempts: int = 3, progress: Progress | None = None,
              actor_env: dict[str, str] | None = None, stop_grace: float = 600.0,
              plugins: list[str] | tuple[str, ...] = (), fields: list[str] | None = None,
              actor_start_timeout: float = 120.0, prepared: tuple | None = None) -> dict:
    """Process every tile of `fields` (default: every complete field of the store) not yet done under
    `config_hash`; returns a summary of the run.

    actor_env: environment variables for the actors (e.g. DEEPFIELD_FAULT in fault drills).
    stop_grace: after a stop request, seconds to wait for the tiles in flight before releasing them.
    plugins: modules or .py files each actor imports before building its stages (tasks.stages.load_plugins).
    actor_start_timeout: seconds a replacement actor may take to start; past that, while other actors
        remain, its slot is given up (the node it would run on is gone) and they take its tiles.
    prepared: (tiles, keys, todo) that the caller has just listed and scanned for these same arguments (the
        tiles of `fields`, their RunKeys, the tiles not done): the store is not listed and the ledger not read
        again (at 10^6 tiles each costs 10-15 s; flows/process.py does both before it calls)."""
    ledger = Ledger(run_dir)
    root = open_store(store)
    if prepared is not None:
        tiles, keys, todo = prepared
    else:
        fields = complete_fields(root) if fields is None else list(fields)
        tiles = all_tiles(root, halo, fields)
        keys = run_keys(stages, config_hash, root, fields)
        todo = ledger.pending(tiles, keys)  # each field's log read once (tasks/ledger.py)
    summary = dict(tiles=len(tiles), skipped=len(tiles) - len(todo), done=0, failed=0, retries=0,
                   actors=0, seconds=0.0, stage_seconds={}, stopped=False, released=0, damaged_fields=[],
                   actors_given_up=0)
    if progress:
        progress(0, len(todo), f"{summary['skipped']} of {len(tiles)} tiles already done")
    if not todo or stop_requested():
        discard_prestarted()
        summary["stopped"] = bool(todo)
        return summary
    t_start = time.perf_counter()
    ray = start_ray(address, num_actors)
    n_actors, opts = actor_plan(ray.cluster_resources(), use_gpus, num_actors)
    n_actors = max(1, min(n_actors, len(todo)))
    if actor_env:
        opts["runtime_env"] = {"env_vars": dict(actor_env)}
    Actor = ray.remote(max_restarts=0, **opts)(TileRunner)

    def new_actor():
        return Actor.remote(store, run_dir, stages, halo, plugins=tuple(plugins))

    ahead = _prestarted.pop(_pool_key(store, run_dir, stages, halo, plugins, opts), [])
    if ahead or _prestarted:
        log.debug("actors started ahead: %d taken, %d made for other arguments stopped", len(ahead),
                  sum(map(len, _prestarted.values())))
    discard_prestarted()  # made for other arguments
    for a in ahead[n_actors:]:
        ray.kill(a)
    for a in ahead[:n_actors]:
        a.reopen.remote()  # runs before its first tile (an actor runs its calls in order)
    # None: a slot given up (its node is gone)
    actors: list = ahead[:n_actors] + [new_actor() for _ in range(n_actors - len(ahead[:n_actors]))]
    starting: dict[int, tuple] = {}  # slot -> (readiness ref, since): replacements not yet up
    load = [0] * n_actors
    queue = deque((t, 1) for t in fields_in_turn(todo))
    inflight: dict = {}  # ObjectRef -> (actor index, actor handle, tile, attempt)
    done = 0
    stage_time: dict[str, float] = {}
    stop_at = None
    damaged: set[str] = set()
    while queue or inflight:
        if stop_requested():
            stop_at = stop_at or time.monotonic()
            queue.clear()  # dispatch nothing more; the next run does these
            if _release.is_set() or time.monotonic() - stop_at > stop_grace:
                summary["released"] = len(inflight)
                break
        for k, (ready_ref, since) in list(starting.items()):  # a replacement is up, or its node is gone
            if ray.wait([ready_ref], timeout=0)[0]:
                del starting[k]
            elif time.monotonic() - since > actor_start_timeout and any(
                    a is not None and j not in starting for j, a in enumerate(actors)):
                ray.kill(actors[k])  # no room for it (a node lost): the other actors take its tiles
                actors[k] = None
                del starting[k]
                summary["actors_given_up"] += 1
        given = True
        while queue and given:  # one tile to each actor with room in turn, so that the actors' next tiles are
            given = False       # the queue's next ones in order (of different fields: fields_in_turn)
            for k in range(n_actors):
                if not queue or actors[k] is None or k in starting or load[k] >= in_flight_per_actor:
                    continue
                tile, attempt = queue.popleft()
                ref = actors[k].process.remote(str(tile), attempt)
                inflight[ref] = (k, actors[k], tile, attempt)
                load[k] += 1
                given = True
        if not inflight:
            if not starting:
                break
            ray.wait([r for r, _ in starting.values()], num_returns=1, timeout=1.0)
            continue
        refs = list(inflight)  # every result that is in, handled in one pass; else wait for the first one
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if not ready:
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
        for ref in ready:
            k, handle, tile, attempt = inflight.pop(ref)
            if actors[k] is handle:
                load[k] -= 1
            try:
                res = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                if actors[k] is handle:  # replace the dead actor once; its other tiles fail the same way
                    actors[k] = new_actor()
                    starting[k] = (actors[k].info.remote(), time.monotonic())
                    load[k] = 0
                why = [line.strip() for line in str(exc).splitlines() if line.strip()]  # the cause Ray reports
                error = f"actor died: {type(exc).__name__}" + (f": {why[-1][:500]}" if why else "")
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                error = "".join(traceback.format_exception_only(type(cause), cause)).strip()
                if isinstance(cause, StoreIntegrityError):  # damage does not heal by retrying: the next ingest
                    damaged.add(tile.field)                  # rewrites the field
                    attempt = max_attempts
            else:
                ledger.put(TileRecord(tile=str(tile), status="done", attempts=attempt, config_hash=config_hash,
                                      stage_versions=keys.stage_versions, model_versions=keys.model_versions,
                                      timings=res["timings"], counts=res["counts"], output=res["output"],
                                      input_hash=keys.inputs[tile.field], worker=res.get("worker", {})))
                for name, sec in res["timings"].items():
                    stage_time[name] = stage_time.get(name, 0.0) + sec
                done += 1
                summary["done"] += 1
                if progress:
                    progress(done, len(todo), str(tile))
                continue
            if attempt < max_attempts:
                summary["retries"] += 1
                queue.append((tile, attempt + 1))
            else:
                ledger.put(TileRecord(tile=str(tile), status="failed", attempts=attempt, config_hash=config_hash,
                                      stage_versions=keys.stage_versions, model_versions=keys.model_versions,
                                      error=error, input_hash=keys.inputs[tile.field]))
                summary["failed"] += 1
                done += 1
                if progress:
                    progress(done, len(todo), f"{tile} FAILED")
    for a in actors:
        if a is not None:
            ray.kill(a)
    if not summary["released"]:  # no tile left in flight: nobody writes under tiles/ any more, and the
        for f in sorted({t.field for t in todo}):  # temporaries of actors killed mid-write go (their tiles
            clean_stale_temporaries(Path(run_dir) / "tiles" / f)  # were done again by others)
    for f in sorted(damaged):  # after every actor is gone: none reads the field while its marker goes
        invalidate_field(store, f)
    summary.update(actors=n_actors, seconds=time.perf_counter() - t_start, stage_seconds=stage_time,
                   stopped=stop_at is not None and summary["done"] + summary["failed"] < len(todo),
                   damaged_fields=sorted(damaged))
    return summary
