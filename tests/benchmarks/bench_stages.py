"""CPU cost of every stage of the default run per megapixel, against SEP alone on the same pixels, and what the
detect stage's method costs the run: `python tests/benchmarks/bench_stages.py [--sim DIR] [--tiles N]
[--rounds R] [--profile K] [--param STAGE.KEY=VALUE ...]`.

Ingests the simulated fields (two 2048^2 g, r, i, z fields by default, or `--sim`; tiles of the default size)
and runs, in one process (no Ray, no Prefect: the stages' own cost), what a tile runner does with each tile:
read it with its halo, the default run configuration's stages, write its tables to Parquet. Twice: with the
detect stage's learned detector (the default) and with its SEP deblending, the rest of the configuration
unchanged; `--rounds R` alternates the two R times and prints the means and each round's ratio (the ratio
moves by a few hundredths between runs on a shared machine, mostly with the anomaly stage's time). In the
first pass each tile is also given to SEP alone (flows/evaluate/baseline_sep.py, as `deepfield eval detect` runs
it): read again, then in every band a SEP background subtracted, extraction and Kron (AUTO) photometry, with
the measure stage's Kron parameters.

Prints CPU seconds (time.process_time, torch on one thread as in a one-core actor) per Mpx of tile core: for
each step, beside its share of issue 22's budget (1.5 core-s per Mpx for the whole pipeline, at most 3x SEP
alone; the classical steps get about what SEP alone costs, the networks the rest), the totals, pipeline / SEP
alone, and learned / sep (issue 17: the learned detection must not make the run more than 20 % slower).
`--profile K`: a third pass under cProfile, the K functions with the most own time in each step.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path

from _survey import bench_survey  # tests/benchmarks/_survey.py (the script's directory is on the path)

TARGET = 1.5  # core-s per Mpx of tile core, the whole pipeline (issue 22)
TARGET_RATIO = 3.0  # pipeline / SEP alone
BUDGET = {"read": 0.05, "background": 0.10, "detect": 0.25, "measure": 0.20, "deblend": 0.20, "lens": 0.05,
          "merger": 0.05, "cluster": 0.10, "anomaly": 0.45, "write": 0.05}  # sums to TARGET


def write_tables(out: Path, tid, sources, tables: dict) -> None:
    """The tile runner's writes (tasks/tile_runner.py): side tables, then the source table, sorted, as Parquet."""
    if len(sources):
        sources = sources.sort_values(["y", "x"], kind="stable").reset_index(drop=True)
    sources.insert(0, "tile_index", range(len(sources)))
    sources.insert(0, "tile", str(tid))
    sources.insert(0, "field", tid.field)
    stem = out / f"{tid.field}-{tid.ty}_{tid.tx}"
    for name, table in tables.items():
        table.to_parquet(f"{stem}.{name}.parquet", index=False)
    sources.to_parquet(f"{stem}.parquet", index=False)


def sep_alone_tile(tile, kron: dict) -> dict[str, float]:
    """SEP alone on every band of `tile` (module docstring): CPU seconds of its background and of its extraction
    and photometry."""
    import sep

    from deepfield.flows.evaluate.baseline_sep import sep_alone
    from deepfield.tasks.stages._pixels import band_pixels
    cost = {"background": 0.0, "detection + AUTO": 0.0}
    for b in range(len(tile.bands)):
        t0 = time.process_time()
        data, err, bad = band_pixels(tile, b)
        data -= sep.Background(data, mask=bad).back()
        t1 = time.process_time()
        sep_alone(data, err, bad, float(tile.psf_fwhm[b]) / tile.pixel_scale, **kron)
        cost["background"] += t1 - t0
        cost["detection + AUTO"] += time.process_time() - t1
    return cost


def run(store: str, tiles, stages, halo: int, out: Path, sep_kron: dict | None = None,
        profile: bool = False) -> tuple[dict[str, float], dict[str, float], dict]:
    """CPU seconds of each step over `tiles`: reading each tile, each stage, writing its tables to `out`. The
    stages first run once on the first tile uncounted (lazy imports, the first inference), then are built
    afresh and run on every tile, all counted: a stage's per-field work (the cluster stage bins whole fields and
    runs its network once per field) falls on the field's first tile and is part of the cost. With `sep_kron`
    (Kron parameters) SEP alone's cost on the same tiles too (else {}); with `profile` a cProfile.Profile per
    step (else {})."""
    import pandas as pd

    from deepfield.tasks.stages.registry import make_stage
    from deepfield.tasks.zarr_store import open_store
    from deepfield.tasks.zarr_read import read_tile
    root = open_store(store)
    out.mkdir(parents=True, exist_ok=True)

    def build():
        built = [make_stage(name, **params) for name, params in stages]
        for s in built:
            s.setup("cpu")
        return built

    src, first = pd.DataFrame(), read_tile(root, tiles[0], halo)
    for s in build():  # the warm-up
        src = s.run(first, src)
    built = build()
    steps = ["read", *(s.name for s in built), "write"]
    cost = dict.fromkeys(steps, 0.0)
    sep_cost: dict[str, float] = {}
    prof = {k: cProfile.Profile() for k in steps} if profile else {}

    def timed(step, fn, *args):
        t0 = time.process_time()
        if prof:
            prof[step].enable()
        try:
            return fn(*args)
        finally:
            if prof:
                prof[step].disable()
            cost[step] += time.process_time() - t0

    for tid in tiles:
        tile = timed("read", read_tile, root, tid, halo)
        src = pd.DataFrame()
        for s in built:
            src = timed(s.name, s.run, tile, src)
        timed("write", write_tables, out, tid, src, tile.tables)
        if sep_kron is not None:
            t0 = time.process_time()
            again = read_tile(root, tid, halo)
            sep_cost["read"] = sep_cost.get("read", 0.0) + time.process_time() - t0
            for k, v in sep_alone_tile(again, sep_kron).items():
                sep_cost[k] = sep_cost.get(k, 0.0) + v
    return cost, sep_cost, prof


def top_functions(p: cProfile.Profile, k: int) -> list[tuple[float, str]]:
    """The `k` functions with the most own time in `p`: (fraction of the profile's own time, 'file:line(name)')."""
    stats = pstats.Stats(p).stats
    total = sum(v[2] for v in stats.values()) or 1.0
    rows = sorted(((v[2], key) for key, v in stats.items()), reverse=True)[:k]
    return [(tt / total, f"{Path(f).name}:{line}({fn})" if f != "~" else fn) for tt, (f, line, fn) in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim", type=Path, help="existing `deepfield simulate` output")
    ap.add_argument("--tiles", type=int, default=0, help="use only this many tiles (0: all)")
    ap.add_argument("--profile", type=int, default=0, metavar="K", help="also profile every step, K functions each")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the two detect methods' passes this many "
                    "times (a shared machine's load drifts; the figures are the rounds' means)")
    ap.add_argument("--param", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="a stage parameter over the default run configuration's (repeatable; the value as YAML), "
                    "e.g. --param deblend.templates=unet")
    args = ap.parse_args()
    import yaml
    over: dict[str, dict] = {}
    for item in args.param:
        key, sep_, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not sep_ or not dot or not stage or not name:
            ap.error(f"--param {item!r}: expected STAGE.KEY=VALUE")
        over.setdefault(stage, {})[name] = yaml.safe_load(value)
    import torch
    torch.set_num_threads(1)
    from deepfield.flows.run_config import RunConfig
    from deepfield.tasks.ingest import ingest_one
    from deepfield.tasks.ingest_config import StoreSpec, load_ingest_config
    from deepfield.tasks.stages.registry import stage_class
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
        base = [(st.name, {**st.params, **over.get(st.name, {})})
                for st in RunConfig.model_fields["stages"].default_factory()]
        unknown = set(over) - {n for n, _ in base}
        if unknown:
            ap.error(f"--param: no stage {', '.join(sorted(unknown))} in the default run configuration")
        m = stage_class("measure").configure(dict(base).get("measure", {}))
        kron = dict(kron_k=m.kron_k, kron_rmax=m.kron_rmax, min_radius=m.min_radius, kron_min=m.kron_min)
        costs: dict[str, dict[str, float]] = {}
        sep_cost: dict[str, float] = {}
        rounds: list[dict[str, float]] = []  # each round's pipeline total per method
        for r in range(args.rounds):
            rounds.append({})
            for method in ("learned", "sep"):
                stages = [(n, dict(p, method=method) if n == "detect" else p) for n, p in base]
                first = method == "learned" and r == 0
                print(f"round {r + 1}/{args.rounds}: the default stages with detect method {method} on "
                      f"{len(tiles)} tiles{' and SEP alone' if first else ''} ...", flush=True)
                c, sc, _ = run(store, tiles, stages, halo, work / f"out-{method}", kron if first else None)
                sep_cost = sep_cost or sc
                costs[method] = {k: costs.get(method, {}).get(k, 0.0) + v / args.rounds for k, v in c.items()}
                rounds[-1][method] = sum(c.values())
        names = list(costs["learned"])
        print(f"\nCPU seconds per Mpx of tile core ({mpx:.1f} Mpx: {len(tiles)} tiles of {cfg.store.tile}^2 px, "
              f"halo {halo} px, {len(cfg.fields[0].bands)} bands, torch on 1 thread)")
        print(f"  {'step':20s}{'detect: learned':>16s}{'budget':>8s}{'':6s}{'detect: sep':>12s}")
        # a stage's own target from its issue (the photoz stage's, issue 23: deepfield eval photoz's), printed in
        # the budget column though not one of issue 22's shares
        from deepfield.flows.evaluate.photoz import TARGETS as PHOTOZ_TARGETS
        stage_targets = {"photoz": PHOTOZ_TARGETS["cpu_seconds_per_mpx"]}
        for n in names:
            v = costs["learned"][n] / mpx
            b = BUDGET.get(n, stage_targets.get(n))
            flag = "" if b is None else ("  ok" if v <= b else "  over")
            print(f"  {n:20s}{v:16.3f}{b if b is not None else float('nan'):8.2f}{flag:6s}"
                  f"{costs['sep'][n] / mpx:12.3f}")
        own = [n for n in names if n in stage_targets and n not in BUDGET]
        if own:
            print(f"  ({', '.join(own)}: the stage's own target from its issue; issue 22's shares of the other steps "
                  f"sum to {TARGET:g} without it)")
        tot = {k: sum(c.values()) / mpx for k, c in costs.items()}
        print(f"  {'pipeline':20s}{tot['learned']:16.3f}{TARGET:8.2f}{'':6s}{tot['sep']:12.3f}"
              f"   (target <= {TARGET} core-s per Mpx)")
        sep_tot = sum(sep_cost.values()) / mpx
        print("SEP alone, same process, same pixels (read; per band: background, extraction, Kron photometry)")
        for k, v in sep_cost.items():
            print(f"  {k:20s}{v / mpx:16.3f}")
        print(f"  {'SEP alone':20s}{sep_tot:16.3f}")
        print(f"  {'pipeline / SEP alone':20s}{tot['learned'] / sep_tot:16.2f}{TARGET_RATIO:8.1f}{'':6s}"
              f"{tot['sep'] / sep_tot:12.2f}   (target <= {TARGET_RATIO:g}x)")
        each = ", ".join(f"{r['learned'] / r['sep']:.3f}" for r in rounds)
        print(f"  ratio learned / sep: {tot['learned'] / tot['sep']:.3f}   (issue 17: <= 1.20)"
              + (f"; by round: {each}" if len(rounds) > 1 else ""), flush=True)
        if args.profile:
            print(f"\nprofile (cProfile, detect method learned, {len(tiles)} tiles): the {args.profile} functions "
                  "with the most own time in each step, % of the step's")
            _, _, prof = run(store, tiles, base, halo, work / "out-profile", profile=True)
            for step, p in prof.items():
                print(f"  {step}: " + "; ".join(f"{name} {100 * f:.0f}%" for f, name in top_functions(p, args.profile)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
