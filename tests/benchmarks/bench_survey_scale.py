"""Survey scale in simulation: the real driver (tasks.actor_pool.run_tiles), ledger (tasks/ledger.py) and merge
planning (flows/merge.py's choice of tables) over 10^5 and 10^6 synthetic tiles, no pixels:
`python tests/benchmarks/bench_survey_scale.py [--ray-tiles 100000] [--scan-tiles 1000000]`.

- The store is synthetic metadata: one Zarr group per field of `--per-field` tiles of 512 px (4 bands, 4096 px
  square for 64), with the attributes and completion record the real code reads (shape, tile, bands, the
  record's input checksums and shard sizes), and no arrays.
- Ray part (`--ray-tiles`): run_tiles drives `--actors` real Ray actors whose tile runner reads no pixels (a
  1 x 1 px synthetic tile instead of tasks.zarr_read.read_tile) and runs one registered no-op stage, then
  writes the tile's (empty) source table as usual. Measured in the driver process: wall and CPU time per tile of
  the dispatch loop (dispatch, results, ledger writes, the progress callback of flows/process.py without its
  Prefect API calls), the time in the ledger writes alone, peak RSS; then the start-up scan of a second run
  that finds every tile done.
- Scan part (`--scan-tiles`, no Ray): a ledger of that many done records (written with Ledger.put, timed) and
  an empty table file per tile; then, each in a fresh process (for its peak RSS): the driver's start-up (the
  store listing, flows/process.py's prune and done count, run_tiles up to where it would start Ray, given the
  listing and the scan as flows/process.py gives them), and the
  merge planning (Ledger.done_tables over the run's tiles and the tables left out, as flows/merge.py).
- `--legacy-tiles`: the same scan part over a ledger written by the code on PYTHONPATH first (run it with the
  code from before the per-field logs on PYTHONPATH for the old figures), at a smaller size, since 10^6 files of
  4 kB blocks need 4 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the default stages but the cluster stage, whose reach into the neighbouring fields needs their WCS (the synthetic
# store has none): records of the default run's size, run keys as a run computes them
SCAN_STAGES = [(n, {}) for n in ("background", "detect", "measure", "deblend", "lens", "anomaly")]
TARGET_DRIVER_MS = 2.0
TARGET_SCAN_S = 30.0
TARGET_RSS_GB = 2.0
PLUGIN = '''
from deepfield.tasks.stages.base import Stage, StageConfig
from deepfield.tasks.stages.registry import register_stage


@register_stage
class NoopStage(Stage):
    """Does nothing: the driver's cost per tile, with nothing else."""
    name = "bench_noop"
    version = "1"

    class Config(StageConfig):
        pass

    def run(self, tile, sources):
        return sources
'''


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_store(path: Path, n_fields: int, per_field: int) -> list[str]:
    """A deepfield store of `n_fields` complete fields of `per_field` tiles (a square grid) as metadata alone."""
    side = int(round(per_field ** 0.5))
    assert side * side == per_field, "--per-field must be a square"
    ny = nx = side * 512
    (path / "fields").mkdir(parents=True, exist_ok=True)
    group = {"zarr_format": 3, "node_type": "group"}
    (path / "zarr.json").write_text(json.dumps(dict(group, attributes={"deepfield_store": 1})))
    (path / "fields" / "zarr.json").write_text(json.dumps(dict(group, attributes={})))
    names = [f"f{k:07d}" for k in range(n_fields)]
    for k, name in enumerate(names):
        shards = {f"{a}/c/0/{ty}/{tx}": 4_000_000 + ty * 1000 + tx
                  for a in ("image", "invvar", "mask") for ty in range(side) for tx in range(side)}
        record = {"checksums": {f"/survey/{name}/{name}-{b}-{a}.fits": f"{k:016x}{b}{a}" for b in "griz"
                                for a in ("image", "invvar", "mask")},
                  "format": 2, "shards": shards, "completed_at": "2026-11-30T00:00:00Z"}
        attrs = {"bands": list("griz"), "zeropoints": [31.4] * 4, "psf_fwhm": [0.7] * 4, "pixel_scale": 0.2,
                 "shape": [4, ny, nx], "tile": 512, "chunk": 256, "deepfield_version": "bench",
                 "deepfield_complete": record}
        (path / "fields" / name).mkdir(exist_ok=True)
        (path / "fields" / name / "zarr.json").write_text(json.dumps(dict(group, attributes=attrs)))
    return names


def synthetic_runner():
    """A TileRunner whose tiles are 1 x 1 px of nothing, made in the actor (read_tile is replaced there)."""
    from deepfield.tasks import tile_runner
    from deepfield.tasks.tile_runner import TileRunner

    class SyntheticRunner(TileRunner):
        def __init__(self, *args, **kwargs):
            import numpy as np

            from deepfield.tasks.tiling import Box
            from deepfield.tasks.zarr_read import Tile

            def read_tile(root, tid, halo):
                one = np.zeros((4, 1, 1), np.float32)
                return Tile(id=tid, bands=list("griz"), image=one, invvar=one + 1, mask=one.astype(np.uint16),
                            box=Box(0, 1, 0, 1), core=Box(0, 1, 0, 1), wcs=None, zeropoints=[31.4] * 4,
                            psf_fwhm=[0.7] * 4, pixel_scale=0.2)
            tile_runner.read_tile = read_tile  # in the actor's process
            super().__init__(*args, **kwargs)
    return SyntheticRunner


def tracker(fields, tiles):
    """flows/process.py's progress callback (bar, log lines, counts) without its Prefect API calls."""
    from collections import Counter

    from deepfield.flows.process import _progress_bar, _Tracker

    class Quiet(_Tracker):
        def _call(self, fn, *args, **kwargs):
            return None
    return Quiet(fields, tiles, Counter(), _progress_bar("bench")[0])


def ray_part(work: Path, n_tiles: int, per_field: int, actors: int, in_flight: int) -> dict:
    import ray

    from deepfield.tasks import actor_pool, ledger as ledger_mod
    from deepfield.tasks.stages.registry import load_plugins
    from deepfield.tasks.zarr_store import all_tiles, open_store
    plugin = work / "bench_noop_stage.py"
    plugin.write_text(PLUGIN)
    load_plugins([str(plugin)])
    store, run_dir = work / "ray-store.zarr", work / "ray-run"
    fields = make_store(store, n_tiles // per_field, per_field)
    tiles = all_tiles(open_store(store), 64, fields)
    n_tiles = len(tiles)
    ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False, configure_logging=False)
    actor_pool.TileRunner = synthetic_runner()
    put_time = [0.0]
    real_put = ledger_mod.Ledger.put

    def timed_put(self, rec):
        t = time.perf_counter()
        real_put(self, rec)
        put_time[0] += time.perf_counter() - t
    ledger_mod.Ledger.put = timed_put
    track = tracker(fields, tiles)
    marks = {}

    def progress(done, total, msg):
        if done == 0:
            marks["loop"] = (time.perf_counter(), cpu_s())
        track(done, total, msg)
    stages = [("bench_noop", {})]
    t0 = time.perf_counter()
    s = actor_pool.run_tiles(str(store), str(run_dir), stages, 64, "bench", num_actors=actors,
                             in_flight_per_actor=in_flight, plugins=[str(plugin)], progress=progress)
    t_end, c_end = time.perf_counter(), cpu_s()
    assert s["done"] == n_tiles and s["failed"] == 0, s
    t_loop, c_loop = marks["loop"]
    out = dict(tiles=n_tiles, actors=actors, in_flight=in_flight, first_scan_s=t_loop - t0,
               wall_ms=1e3 * (t_end - t_loop) / n_tiles, cpu_ms=1e3 * (c_end - c_loop) / n_tiles,
               put_ms=1e3 * put_time[0] / n_tiles, rss_gb=rss_gb())
    t0 = time.perf_counter()
    again = actor_pool.run_tiles(str(store), str(run_dir), stages, 64, "bench", num_actors=actors,
                                 plugins=[str(plugin)])
    out["rescan_s"] = time.perf_counter() - t0
    assert again["skipped"] == n_tiles, again
    ray.shutdown()
    return out


def record_for(tile, keys):
    """A done record as a run of SCAN_STAGES writes it (the default stages' timings: about 900 bytes)."""
    from deepfield.tasks.ledger import TileRecord
    timings = dict(anomaly=0.7159558940038551, background=0.203503135999199, cluster=0.49985286900482606,
                   deblend=0.376115431994549, detect=0.4350000340054976, lens=0.1757361089985352,
                   measure=0.1169847739947727, read=0.11590439500287175, write=0.052488866000203416)
    return TileRecord(tile=str(tile), status="done", attempts=1, config_hash=keys.config_hash,
                      stage_versions=keys.stage_versions, model_versions=keys.model_versions, timings=timings,
                      counts={"sources": 406, "primary": 321}, output=f"tiles/{tile.field}/{tile.ty}_{tile.tx}.parquet",
                      input_hash=keys.inputs[tile.field],
                      worker={"host": "node0001", "pid": 12345, "device": "cuda:0", "cuda_visible_devices": "3",
                              "ray_node": "a3f1c5e2d4b6978812ab34cd56ef7890a1b2c3d4e5f60718293a4b5c"})


def make_ledger(work: Path, n_tiles: int, per_field: int, tag: str) -> dict:
    """The store, a ledger of `n_tiles` done records and an empty table per tile; timings of the writes."""
    from deepfield.tasks.ledger import Ledger
    from deepfield.tasks.provenance import run_keys
    from deepfield.tasks.zarr_store import all_tiles, open_store
    store, run_dir = work / f"{tag}-store.zarr", work / f"{tag}-run"
    t0 = time.perf_counter()
    fields = make_store(store, n_tiles // per_field, per_field)
    t_store = time.perf_counter() - t0
    root = open_store(store)
    tiles = all_tiles(root, 64, fields)
    keys = run_keys(SCAN_STAGES, "bench", root, fields)
    ledger = Ledger(run_dir)
    t0 = time.perf_counter()
    for t in tiles:
        ledger.put(record_for(t, keys))
    t_put = time.perf_counter() - t0
    for f in fields:
        d = run_dir / "tiles" / f
        d.mkdir(parents=True)
        for t in tiles[:per_field]:
            (d / f"{t.ty}_{t.tx}.parquet").touch()
    size = sum(p.stat().st_size for p in (run_dir / "ledger").rglob("*") if p.is_file())
    files = sum(1 for p in (run_dir / "ledger").rglob("*") if p.is_file())
    return dict(store_make_s=t_store, put_ms=1e3 * t_put / n_tiles, ledger_bytes=size, ledger_files=files)


def scan_part(work: Path, tag: str) -> dict:
    """The driver's start-up over the run of `tag` (every tile done), in this fresh process."""
    from collections import Counter

    from deepfield.tasks.actor_pool import run_tiles
    from deepfield.tasks.ledger import Ledger
    from deepfield.tasks.provenance import run_keys
    from deepfield.tasks.zarr_store import all_tiles, complete_fields, open_store
    import deepfield.models.registry  # noqa: F401  (imported by run_keys: not a cost per tile)
    store, run_dir = work / f"{tag}-store.zarr", work / f"{tag}-run"
    stages = SCAN_STAGES
    t0 = time.perf_counter()
    root = open_store(store)
    fields = complete_fields(root)
    tiles = all_tiles(root, 64, fields)
    keys = run_keys(stages, "bench", root, fields)
    t_store = time.perf_counter() - t0
    ledger = Ledger(run_dir)  # flows/process.py: prune, then count the tiles done before
    t0 = time.perf_counter()
    pruned = ledger.prune(tiles, keys)
    t_prune = time.perf_counter() - t0
    t0 = time.perf_counter()
    if hasattr(ledger, "pending"):
        pending = ledger.pending(tiles, keys)
        before = Counter(t.field for t in tiles) - Counter(t.field for t in pending)
    else:  # the ledger of one file per tile
        pending = None
        before = Counter(t.field for t in tiles if ledger.is_done(t, keys))
    t_count = time.perf_counter() - t0
    assert not pruned and sum(before.values()) == len(tiles)
    t0 = time.perf_counter()
    # as flows/process.py calls it: with what it has just listed and scanned (code that takes them)
    import inspect
    given = {"prepared": (tiles, keys, pending)} if pending is not None and \
        "prepared" in inspect.signature(run_tiles).parameters else {}
    s = run_tiles(str(store), str(run_dir), stages, 64, "bench", **given)
    t_run = time.perf_counter() - t0
    assert s["skipped"] == len(tiles), s
    from collections import deque
    queue = deque((t, 1) for t in tiles)  # what run_tiles queues when every tile is to do
    return dict(tiles=len(tiles), store_s=t_store, prune_s=t_prune, count_s=t_count, run_tiles_s=t_run,
                rss_gb=rss_gb(), queued=len(queue))


def merge_part(work: Path, tag: str) -> dict:
    """flows/merge.py's choice of tables over the run of `tag`, in this fresh process."""
    from deepfield.tasks.ledger import Ledger
    from deepfield.tasks.provenance import run_keys
    from deepfield.tasks.tile_runner import source_tables
    from deepfield.tasks.zarr_store import all_tiles, complete_fields, open_store
    import deepfield.models.registry  # noqa: F401  (imported by run_keys: not a cost per tile)
    store, run_dir = work / f"{tag}-store.zarr", work / f"{tag}-run"
    t0 = time.perf_counter()
    root = open_store(store)
    fields = complete_fields(root)
    keys = run_keys(SCAN_STAGES, "bench", root, fields)
    tiles = all_tiles(root, 64, fields)
    t_store = time.perf_counter() - t0
    t0 = time.perf_counter()
    tables, missing = Ledger(run_dir).done_tables(tiles, keys)
    t_done = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = set(tables)
    ignored = [str(p.relative_to(run_dir)) for p in source_tables(run_dir) if p not in merged]
    t_ignored = time.perf_counter() - t0
    assert len(tables) == len(tiles) and not missing and not ignored
    return dict(tiles=len(tiles), store_s=t_store, done_tables_s=t_done, ignored_s=t_ignored, rss_gb=rss_gb())


def in_process(part: str, work: Path, tag: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--part", part, "--work", str(work), "--tag", tag],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{part} {tag} failed:\n{r.stdout}\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def ok(value: float, target: float) -> str:
    return "meets" if value <= target else "MISSES"


def report_scan(n: int, made: dict, scan: dict, merge: dict, scale: float = 1.0) -> None:
    note = f"  (measured at {n:,} tiles x {scale:g})" if scale != 1 else ""
    startup = scan["store_s"] + scan["prune_s"] + scan["count_s"] + scan["run_tiles_s"]
    ledger_scan = scan["prune_s"] + scan["count_s"] + max(scan["run_tiles_s"] - scan["store_s"], 0.0)
    print(f"  ledger write (Ledger.put) per tile          {made['put_ms']:8.3f} ms")
    print(f"  ledger on disk                              {made['ledger_files'] * scale:10,.0f} files, "
          f"{made['ledger_bytes'] * scale / 1e6:8.1f} MB{note}")
    print(f"  store listing (fields, tiles, run keys)     {scan['store_s'] * scale:8.1f} s{note}")
    print(f"  flows/process.py prune                      {scan['prune_s'] * scale:8.1f} s{note}")
    print(f"  flows/process.py count of done tiles        {scan['count_s'] * scale:8.1f} s{note}")
    print(f"  run_tiles to its decision                   {scan['run_tiles_s'] * scale:8.1f} s{note}")
    print(f"  ledger scan at start-up (prune, count, run_tiles' own, if any) {ledger_scan * scale:6.1f} s"
          f"   target <= {TARGET_SCAN_S:g} s at 10^6: {ok(ledger_scan * 1e6 / n, TARGET_SCAN_S)}{note}")
    print(f"  driver start-up in all                      {startup * scale:8.1f} s{note}")
    print(f"  driver peak RSS, start-up + a queue of all  {scan['rss_gb']:8.2f} GB   target <= {TARGET_RSS_GB:g} GB: "
          f"{ok(scan['rss_gb'], TARGET_RSS_GB)}{'  (at the measured size)' if scale != 1 else ''}")
    print(f"  merge planning: store listing               {merge['store_s'] * scale:8.1f} s{note}")
    print(f"  merge planning: Ledger.done_tables          {merge['done_tables_s'] * scale:8.1f} s{note}")
    print(f"  merge planning: tables left out (glob)      {merge['ignored_s'] * scale:8.1f} s{note}")
    print(f"  merge planning peak RSS                     {merge['rss_gb']:8.2f} GB"
          f"{'  (at the measured size)' if scale != 1 else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ray-tiles", type=int, default=100_000, help="tiles through the Ray actors (0: none)")
    ap.add_argument("--scan-tiles", type=int, default=1_000_000, help="tiles of the ledger scan part (0: none)")
    ap.add_argument("--legacy-tiles", type=int, default=0,
                    help="tiles of a second scan part, its figures scaled to 10^6 tiles (for a ledger of one file "
                         "per tile: run with the code from before the per-field logs on PYTHONPATH)")
    ap.add_argument("--per-field", type=int, default=64, help="tiles per field (a square number)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--in-flight", type=int, default=2, help="tiles in flight per actor")
    ap.add_argument("--work", type=Path, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        fn = dict(scan=scan_part, merge=merge_part)[args.part]
        print(json.dumps(fn(args.work, args.tag)))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="deepfield-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    import deepfield.tasks.ledger as ledger_mod
    print(f"code: {Path(ledger_mod.__file__).parent.parent}; {os.cpu_count()} CPU(s); "
          f"{args.per_field} tiles of 512 px per field; no pixels")
    try:
        if args.ray_tiles:
            r = ray_part(work, args.ray_tiles, args.per_field, args.actors, args.in_flight)
            print(f"\nRay actor path: {r['tiles']:,} tiles, {r['actors']} actors x {r['in_flight']} in flight, "
                  "no-op stage, synthetic 1 px tiles")
            print(f"  driver wall per tile (dispatch loop)        {r['wall_ms']:8.3f} ms   (bounded by the actors "
                  "here: they share the cores with the driver)")
            print(f"  driver CPU per tile (dispatch loop)         {r['cpu_ms']:8.3f} ms   target <= "
                  f"{TARGET_DRIVER_MS:g} ms: {ok(r['cpu_ms'], TARGET_DRIVER_MS)}")
            print(f"    of which ledger writes                    {r['put_ms']:8.3f} ms")
            print(f"  start-up scan, first run (nothing done)     {r['first_scan_s']:8.2f} s")
            print(f"  start-up of a second run (all done)         {r['rescan_s']:8.2f} s")
            print(f"  driver peak RSS                             {r['rss_gb']:8.2f} GB   target <= "
                  f"{TARGET_RSS_GB:g} GB: {ok(r['rss_gb'], TARGET_RSS_GB)}")
            print(f"  driver capacity: {1e3 / r['cpu_ms']:,.0f} tiles/s of driver CPU")
        if args.scan_tiles:
            made = make_ledger(work, args.scan_tiles, args.per_field, "scan")
            scan, merge = in_process("scan", work, "scan"), in_process("merge", work, "scan")
            print(f"\nLedger and merge planning, no Ray: {scan['tiles']:,} tiles done "
                  f"({args.scan_tiles // args.per_field:,} fields)")
            report_scan(args.scan_tiles, made, scan, merge)
            shutil.rmtree(work / "scan-run", ignore_errors=True)
            shutil.rmtree(work / "scan-store.zarr", ignore_errors=True)
        if args.legacy_tiles:
            made = make_ledger(work, args.legacy_tiles, args.per_field, "legacy")
            scan, merge = in_process("scan", work, "legacy"), in_process("merge", work, "legacy")
            scale = 1e6 / args.legacy_tiles
            print(f"\nThe same at {args.legacy_tiles:,} tiles ({made['ledger_files']:,} ledger files), times scaled "
                  f"by {scale:g} to 10^6 tiles (linear in the tiles)")
            report_scan(args.legacy_tiles, made, scan, merge, scale)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
