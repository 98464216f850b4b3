"""End-to-end processing throughput and orchestration overhead:
`python tests/benchmarks/bench_process.py [--sim DIR]`.

Ingests two simulated 2048 x 2048 g, r, i, z fields twice each (four fields, 16 tiles of 1024 x
1024) and runs the same stage code over the same tiles:
  1. in a plain in-process loop (one process, no Ray, no Prefect) -- the baseline;
  2. through a Prefect flow driving a Ray actor pool with ONE actor -- the same parallelism as the
     loop, so the ratio of the two times is the orchestration overhead (target <= 15%);
  3. the same with one actor per core, for the speed-up.
Prints Mpix/s (pixels x bands per second), each stage's share of the time, the overhead ratio, and the
one-time start-up costs of Ray and of Prefect's ephemeral API, which are reported separately.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from _survey import bench_survey  # tests/benchmarks/_survey.py (the script's directory is on the path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim", type=Path, help="existing `deepfield simulate` output (2048 px fields)")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--copies", type=int, default=2, help="times each simulated field is ingested")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deepfield-bench-process-"))
    from deepfield.flows import prefect_env
    prefect_env.configure(work / "prefect")
    try:
        from deepfield.tasks.actor_pool import run_tiles
        from deepfield.tasks.ingest import ingest_one
        from deepfield.tasks.ingest_config import StoreSpec, load_ingest_config
        from deepfield.tasks.tile_runner import TileRunner
        from deepfield.tasks.zarr_store import all_tiles

        sim = bench_survey(args.sim, work)
        manifest = yaml.safe_load((sim / "manifest.yaml").read_text())
        fields = [{"name": f"{f['name']}-{c}", "bands": {b: {k: str(sim / e[k]) for k in ("image", "invvar", "mask")}
                                                         for b, e in f["bands"].items()}}
                  for f in manifest["fields"] for c in range(args.copies)]
        (work / "ingest.yaml").write_text(yaml.safe_dump({"fields": fields}))
        cfg = load_ingest_config(work / "ingest.yaml", store=StoreSpec(tile=args.tile, chunk=256))
        store = str(work / "store.zarr")
        for f in cfg.fields:
            ingest_one(f, store, cfg.store)
        stages = [("background", {}), ("detect", {}), ("measure", {})]
        from deepfield.tasks.zarr_store import open_store
        tiles = all_tiles(open_store(store), args.halo)
        nbands = len(manifest["fields"][0]["bands"])
        mpix = sum(1 for _ in tiles) * args.tile**2 * nbands / 1e6

        # 1. plain in-process loop
        t0 = time.perf_counter()
        runner = TileRunner(store, str(work / "run-loop"), stages, args.halo)
        stage_time: dict[str, float] = {}
        for t in tiles:
            res = runner.process(str(t))
            for k, v in res["timings"].items():
                stage_time[k] = stage_time.get(k, 0.0) + v
        t_loop = time.perf_counter() - t0

        # start-up costs, once
        t0 = time.perf_counter()
        import ray
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        t_ray = time.perf_counter() - t0
        from prefect import flow, task

        @task
        def process(run_dir: str, n: int) -> dict:
            return run_tiles(store, run_dir, stages, args.halo, "bench", num_actors=n)

        @flow
        def bench_flow(run_dir: str, n: int) -> dict:
            return process(run_dir, n)

        @flow
        def warm() -> int:
            return 1

        t0 = time.perf_counter()
        warm()
        t_prefect = time.perf_counter() - t0

        t0 = time.perf_counter()
        one = bench_flow(str(work / "run-1"), 1)
        t_one = time.perf_counter() - t0
        n = os.cpu_count() or 1
        t0 = time.perf_counter()
        many = bench_flow(str(work / "run-n"), n)
        t_many = time.perf_counter() - t0
        assert one["done"] == len(tiles) and many["done"] == len(tiles), (one, many)

        tot = sum(stage_time.values())
        print(f"{len(tiles)} tiles of {args.tile}^2 px x {nbands} bands = {mpix:.0f} Mpix, halo {args.halo} px")
        print(f"  plain in-process loop, 1 process      {t_loop:7.1f} s  {mpix / t_loop:6.2f} Mpix/s")
        print(f"  Prefect + Ray, 1 actor                {t_one:7.1f} s  {mpix / t_one:6.2f} Mpix/s")
        print(f"  Prefect + Ray, {n} actors               {t_many:7.1f} s  {mpix / t_many:6.2f} Mpix/s"
              f"  (speed-up {t_loop / t_many:.2f}x over the loop)")
        print(f"  orchestration overhead (1 actor / loop - 1)  {t_one / t_loop - 1:+.1%}   (target <= 15%)")
        print(f"  one-time start-up: Ray {t_ray:.1f} s, Prefect ephemeral API {t_prefect:.1f} s")
        print("  stage shares (plain loop): " + ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in stage_time.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
