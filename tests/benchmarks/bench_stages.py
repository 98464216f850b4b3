"""CPU cost of every stage of the default run, per megapixel, and what the detect stage's method costs the run:
`python tests/benchmarks/bench_stages.py [--sim DIR] [--tiles N]`.

Ingests the simulated fields (two 2048^2 g, r, i, z fields by default, or `--sim`) and runs the default run
configuration's stages over the same tiles in one process (no Ray, no Prefect: the stages' own cost), twice: with
the detect stage's SEP deblending and with its learned detector, the rest of the configuration unchanged.
Prints CPU seconds (time.process_time, torch on one thread as in a one-core actor) per Mpx of tile core for each
stage, the totals and their ratio (issue 17: the learned detection must not make the run more than 20 % slower).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _survey import bench_survey  # tests/benchmarks/_survey.py (the script's directory is on the path)


def run(store: str, tiles, stages, halo: int) -> dict[str, float]:
    """CPU seconds of each stage over `tiles` (the source tables are not written). The stages first run once on
    the first tile uncounted (lazy imports, the first inference), then are built afresh and run on every tile,
    all counted: a stage's per-field work (the cluster stage bins whole fields and runs its network once per
    field) falls on the field's first tile and is part of the cost."""
    import pandas as pd

    from deepfield.tasks.stages.registry import make_stage
    from deepfield.tasks.zarr_store import open_store, read_tile
    root = open_store(store)

    def build():
        built = [make_stage(name, **params) for name, params in stages]
        for s in built:
            s.setup("cpu")
        return built

    src, first = pd.DataFrame(), read_tile(root, tiles[0], halo)
    for s in build():  # the warm-up
        src = s.run(first, src)
    built = build()
    cost = dict.fromkeys((s.name for s in built), 0.0)
    for tid in tiles:
        tile = read_tile(root, tid, halo)
        src = pd.DataFrame()
        for s in built:
            t0 = time.process_time()
            src = s.run(tile, src)
            cost[s.name] += time.process_time() - t0
    return cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim", type=Path, help="existing `deepfield simulate` output")
    ap.add_argument("--tiles", type=int, default=0, help="use only this many tiles (0: all)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from deepfield.flows.run_config import RunConfig
    from deepfield.tasks.ingest import ingest_one
    from deepfield.tasks.ingest_config import StoreSpec, load_ingest_config
    from deepfield.tasks.zarr_store import all_tiles, open_store

    work = Path(tempfile.mkdtemp(prefix="deepfield-bench-stages-"))
    try:
        sim = bench_survey(args.sim, work)
        cfg = load_ingest_config(sim / "manifest.yaml", store=StoreSpec())
        store = str(work / "store.zarr")
        for f in cfg.fields:
            ingest_one(f, store, cfg.store)
        halo = int(RunConfig.model_fields["halo"].default)
        tiles = all_tiles(open_store(store), halo)
        if args.tiles:
            tiles = tiles[:args.tiles]
        mpx = len(tiles) * cfg.store.tile ** 2 / 1e6
        base = [(st.name, dict(st.params)) for st in RunConfig.model_fields["stages"].default_factory()]
        costs = {}
        for method in ("sep", "learned"):
            stages = [(n, dict(p, method=method) if n == "detect" else p) for n, p in base]
            print(f"running the default stages with detect method {method} on {len(tiles)} tiles ...", flush=True)
            costs[method] = run(store, tiles, stages, halo)
        names = list(costs["sep"])
        print(f"\nCPU seconds per Mpx of tile core ({mpx:.1f} Mpx, {cfg.store.tile}^2 px tiles, halo {halo} px, "
              f"{len(cfg.fields[0].bands)} bands, torch on 1 thread)")
        print(f"  {'stage':12s}{'detect: sep':>14s}{'detect: learned':>18s}")
        for n in names:
            print(f"  {n:12s}{costs['sep'][n] / mpx:14.3f}{costs['learned'][n] / mpx:18.3f}")
        tot = {m: sum(c.values()) / mpx for m, c in costs.items()}
        print(f"  {'total':12s}{tot['sep']:14.3f}{tot['learned']:18.3f}")
        print(f"  ratio learned / sep: {tot['learned'] / tot['sep']:.3f}   (issue 17: <= 1.20)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
