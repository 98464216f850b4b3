"""What the ingest costs as the survey grows: `python tests/benchmarks/bench_ingest_scale.py [--sim DIR]
(--consolidation | --flow-fields N | --flow-overhead N)`. The ingest's throughput against a plain read and write
of the same bytes, its hashes and its codecs are bench_ingest.py's.

--sim names an existing `deepfield simulate` output (default: two 2048 x 2048 g, r, i, z fields simulated here);
--flow-overhead needs none.

With --consolidation it prints what keeping the store's consolidated metadata up to date costs as the
store grows: the first field of the survey ingested, then its metadata (group and arrays, no pixels) copied
under new names until the store holds each of --consolidation-fields; at each size the time of zarr's whole-store
consolidation (`consolidate`, what every field's write ran before 2026-12-05) and of rewriting one field's
entries (`consolidate_fields`), and what either would add to an ingest that consolidates after every field, by
the trapezoid rule over the sizes measured (both grow linearly with the store); and at each size what opening the
store for writing costs (zarr reads and parses the root's zarr.json, consolidated metadata included), and the
re-ingest of the real field with nothing to do (the flow's call, which leaves the consolidation to the flow) with the
store opened afresh by the call (each field's call did so before 2026-12-06) and already opened by this process.

With --flow-fields N it prints the ingest flow's peak memory and wall time over N fields (the --sim fields'
inputs under N names), each in a fresh process: all N fields at once (`store.fields_at_once` N, what the flow
did before 2026-12-05) and the default (the usable cores, at most 8).

With --flow-overhead N it prints what the ingest flow itself costs per field over N fields whose ingest
does nothing (flows.ingest.ingest_one replaced by a no-op in this process; Prefect's temporary API started
before the clock): one Prefect task per field, and the flow's batches (flows.ingest.batch_size).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from deepfield.tasks.ingest import ingest_one
from deepfield.tasks.ingest_config import load_ingest_config
from deepfield.tasks.sim.config import SimConfig
from deepfield.tasks.sim.survey import simulate_survey


def consolidation_table(cfg, work: Path, sizes: list[int]) -> None:
    """The consolidated metadata's cost as the store grows (--consolidation)."""
    import warnings

    from deepfield.tasks.zarr_store import consolidate, consolidate_fields, forget_stores, metadata_lock, open_store
    store = work / "meta.zarr"
    first = cfg.fields[0]
    assert ingest_one(first, str(store), cfg.store)["status"] == "ingested"
    src = store / "fields" / first.name
    root = open_store(store, mode="a")
    print(f"consolidated metadata of a store of n fields (each a copy of field {first.name}'s metadata, "
          f"{sum(f.stat().st_size for f in src.rglob('zarr.json')) / 1e3:.0f} kB, without its pixels):")
    print(f"  {'fields':>7s} {'root zarr.json MB':>18s} {'consolidate s':>14s} {'consolidate_fields s':>21s} "
          f"{'first open s':>13s} {'no-op re-ingest s: first open':>30s} {'opened before':>14s}")
    n, rows = 1, []
    for size in sorted(sizes):
        for k in range(n, size):
            for meta in src.rglob("zarr.json"):
                dest = store / "fields" / f"copy{k:07d}" / meta.relative_to(src)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(meta, dest)
        n = size
        with metadata_lock(root), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            consolidate(root)
            t_full = time.perf_counter() - t0
            t_one = float("inf")
            for _ in range(3):  # the field's entries removed and put back: a rewrite each time
                shutil.move(src, work / "aside")
                consolidate_fields(root, [first.name])
                shutil.move(work / "aside", src)
                t0 = time.perf_counter()
                assert consolidate_fields(root, [first.name])
                t_one = min(t_one, time.perf_counter() - t0)
        t_open, t_first, t_again = float("inf"), float("inf"), float("inf")
        for _ in range(3):  # the field re-ingested with nothing to do (the flow's call: it consolidates itself)
            forget_stores()
            t0 = time.perf_counter()
            open_store(store, mode="a")
            t_open = min(t_open, time.perf_counter() - t0)
            forget_stores()  # every store opened afresh by each call, as before 2026-12-06
            t0 = time.perf_counter()
            assert ingest_one(first, str(store), cfg.store, consolidated=False)["status"] == "skipped"
            t_first = min(t_first, time.perf_counter() - t0)
            t0 = time.perf_counter()  # the store already opened by this process (the flow's other fields)
            assert ingest_one(first, str(store), cfg.store, consolidated=False)["status"] == "skipped"
            t_again = min(t_again, time.perf_counter() - t0)
        rows.append((size, t_full, t_one, t_open, t_first, t_again))
        print(f"  {size:7d} {(store / 'zarr.json').stat().st_size / 1e6:18.1f} {t_full:14.3f} {t_one:21.4f} "
              f"{t_open:13.4f} {t_first:30.4f} {t_again:14.4f}")
    for label, col in (("consolidate after each field (before)", 1), ("consolidate_fields after each field", 2),
                       ("store opened by each field (before)", 3)):
        total = sum((b[0] - a[0]) * (a[col] + b[col]) / 2 for a, b in zip(rows, rows[1:]))
        print(f"  {label:40s} adds {total:10.1f} s to an ingest of {rows[-1][0] - rows[0][0]} fields")
    for label, col in (("no-op re-ingest, store opened by each field (before)", 4),
                       ("no-op re-ingest, store opened once", 5)):
        total = sum((b[0] - a[0]) * (a[col] + b[col]) / 2 for a, b in zip(rows, rows[1:]))
        print(f"  {label:52s} {total:10.1f} s for {rows[-1][0] - rows[0][0]} unchanged fields")


def flow_memory(sim: Path, work: Path, n: int) -> None:
    """Peak RSS and wall time of the ingest flow over n fields, all at once and by default (--flow-fields)."""
    import subprocess
    import sys

    import yaml
    m = yaml.safe_load((sim / "manifest.yaml").read_text())
    fields = []
    for k in range(n):
        f = dict(m["fields"][k % len(m["fields"])], name=f"copy{k:04d}")
        f["bands"] = {b: {key: str((sim / v).resolve()) if key in ("image", "invvar", "mask", "variance") else v
                          for key, v in e.items()} for b, e in f["bands"].items()}
        fields.append(f)
    (work / "many.yaml").write_text(yaml.safe_dump(dict(m, fields=fields)))
    code = (
        "import resource, sys, time\n"
        "from deepfield.flows import prefect_env\n"
        "prefect_env.configure(sys.argv[4])\n"
        "from deepfield.flows.ingest import fields_at_once, ingest_flow\n"
        "from deepfield.tasks.ingest_config import load_ingest_config\n"
        "cfg = load_ingest_config(sys.argv[1])\n"
        "if sys.argv[3] != 'default':\n"
        "    store = cfg.store.model_copy(update={'fields_at_once': int(sys.argv[3])})\n"
        "    cfg = cfg.model_copy(update={'store': store})\n"
        "t0 = time.perf_counter()\n"
        "with prefect_env.flow_settings():\n"
        "    res = ingest_flow(cfg, sys.argv[2])\n"
        "assert all(r['status'] == 'ingested' for r in res), res\n"
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(fields_at_once(cfg.store), time.perf_counter() - t0, rss)\n")
    print(f"ingest flow over {n} fields ({len(m['fields'])} simulated fields' inputs under {n} names), a fresh process "
          "each; wall time of the flow's call, the start of Prefect's temporary API (about 10 s) included:")
    for what in (str(n), "default"):
        shutil.rmtree(work / "many.zarr", ignore_errors=True)
        out = subprocess.run([sys.executable, "-c", code, str(work / "many.yaml"), str(work / "many.zarr"), what,
                              str(work / "prefect")],
                             capture_output=True, text=True, check=True).stdout.split()
        at_once, wall, rss_kb = int(out[-3]), float(out[-2]), int(out[-1])
        print(f"  fields at once {at_once:4d}{' (default)' if what == 'default' else ' (before 2026-12-05)':20s} "
              f"wall {wall:6.1f} s   peak RSS {rss_kb / 1e6:5.2f} GB")


def flow_overhead(n: int, work: Path) -> None:
    """The ingest flow's own cost per field, over n no-op fields (--flow-overhead)."""
    from deepfield.flows import prefect_env
    prefect_env.configure(work / "prefect")  # Prefect's home and settings as deepfield's commands have them
    from deepfield.flows.prefect_env import flow_settings
    import deepfield.flows.ingest as flow_mod  # noqa: I001 - after configure, which must precede prefect
    from deepfield.tasks.ingest_config import FieldSpec, IngestConfig

    def noop(spec, store, store_spec, consolidated=True):
        return dict(field=spec.name, status="skipped", error=None, seconds=0.0, notes=[])

    flow_mod.ingest_one = noop
    settings = flow_settings()
    settings.__enter__()  # as deepfield's commands call their flows
    fields = [FieldSpec(name=f"f{k:07d}", bands={"g": {"image": Path(f"/nowhere/f{k}.fits")}}) for k in range(n)]
    store = "/nonexistent/store.zarr"  # never made: no field writes
    flow_mod.ingest_flow(IngestConfig(fields=fields[:2]), store)  # Prefect's temporary API started
    print(f"ingest flow over {n} no-op fields (flows.ingest.ingest_one replaced; Prefect's API started before):")
    default = flow_mod.MAX_TASK_RUNS
    for label, max_runs in (("batch_size (default)", default), ("one task per field (before 2026-12-05)", n)):
        flow_mod.MAX_TASK_RUNS = max_runs
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            res = flow_mod.ingest_flow(IngestConfig(fields=fields), store)
        except Exception as exc:  # Prefect's temporary API gives up under too many task runs (503)
            print(f"  {label:40s} FAILED after {time.perf_counter() - t0:.1f} s: {type(exc).__name__}: "
                  f"{str(exc)[:100]}")
            continue
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert [r["field"] for r in res] == [f.name for f in fields]
        print(f"  {label:40s} {flow_mod.batch_size(n):5d} field(s) per task   {wall / n * 1e3:7.2f} ms per field "
              f"(this process's CPU {cpu / n * 1e3:.2f})")
    flow_mod.MAX_TASK_RUNS = default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim", type=Path, help="existing `deepfield simulate` output to ingest")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--fields", type=int, default=2)
    ap.add_argument("--consolidation", action="store_true", help="the consolidated metadata's cost, the store's "
                                                                 "opening and a no-op re-ingest as the store grows")
    ap.add_argument("--consolidation-fields", default="1,100,300,1000",
                    help="store sizes (fields) of --consolidation, comma-separated")
    ap.add_argument("--flow-fields", type=int, default=0, help="the ingest flow's memory over this many fields")
    ap.add_argument("--flow-overhead", type=int, default=0, help="the ingest flow's own cost per field over "
                                                                 "this many no-op fields")
    args = ap.parse_args()
    if not (args.consolidation or args.flow_fields or args.flow_overhead):
        ap.error("name one of --consolidation, --flow-fields N, --flow-overhead N")
    work = Path(tempfile.mkdtemp(prefix="deepfield-bench-ingest-scale-"))
    try:
        if args.flow_overhead:
            flow_overhead(args.flow_overhead, work)
            return
        sim = args.sim
        if sim is None:
            sim = work / "sim"
            print(f"simulating {args.fields} field(s) of {args.size}^2 px in g,r,i,z ...")
            simulate_survey(SimConfig(seed=0, size=args.size, fields=args.fields), sim)
        if args.flow_fields:
            flow_memory(sim, work, args.flow_fields)
            return
        consolidation_table(load_ingest_config(sim / "manifest.yaml"), work,
                            [int(v) for v in args.consolidation_fields.split(",")])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
