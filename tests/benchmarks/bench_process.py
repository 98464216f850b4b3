"""End-to-end processing through Prefect and Ray: start-up, orchestration overhead, the whole pipeline's cost and
memory per actor, and how they scale with the number of fields:
`python tests/benchmarks/bench_process.py [--sim DIR] [--sections startup,overhead,pipeline,scaling]`.

- startup: from a command's start to its first tile processed, part by part: a fresh interpreter importing the
  CLI (`python -c "import deepfield.flows.cli"`), Prefect's ephemeral API (the first flow run of the process),
  Ray (`ray.init`), the driver's preparation in `run_tiles` (store, ledger, run keys: until its first progress
  call), and the actors' setup (one per core in parallel, default stages: worker start, imports, models; until
  every actor answers), with the setup of each stage timed in one fresh Ray worker; then `deepfield run` itself,
  whose parts overlap (Prefect's API server, Ray and the actors start side by side): from the command to the
  first tile's ledger record, less that tile's own processing (its record's timings), is the start-up.
  Target <= 8 s.
- overhead: the simulated fields ingested twice each in tiles of 1024^2 px (16 tiles) and the background,
  detect and measure stages run (1) in a plain in-process loop, (2) through a Prefect flow driving a Ray actor
  pool of ONE actor -- the same parallelism, so the ratio is the orchestration overhead (target <= 15 %) --
  and (3) with one actor per core, for the speed-up; each stage's share of the loop's time.
- pipeline: the default stages over the simulated fields (tiles of the default size) through Prefect and one
  Ray actor per core, as `deepfield run` processes them: wall time; the actors' CPU time (psutil), whole and in
  tiles (less the set-up CPU time of fresh actors, measured apart: the figure the machine's other load moves
  least); the actors' wall time in tiles (the tiles' own timings); each actor's peak memory (its RSS
  high-water mark, VmHWM, read on every tile's completion while it lives).
- scaling: 1, 4 and 16 fields (`--scale-fields`) of `--scale-size` px, copies of a cut of the first simulated
  field moved a degree apart on the sky (no field has a neighbour within the cluster stage's reach), in one
  store; each count processed as in `pipeline`, in its own run. Prints the CPU time in tiles per Mpx and the peak memory
  per actor against one field's (target: flat within 10 %).
Mpx are of tile core, the pixels of one band. The machine's other load moves wall times; the ratios are
measured in one process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _startup import command_startup, stage_setup_times  # tests/benchmarks/_startup.py
from _survey import bench_survey  # tests/benchmarks/_survey.py (the script's directory is on the path)

SECTIONS = ("startup", "overhead", "pipeline", "scaling")
ACTOR_TITLE = "ray::TileRunner"  # the process title Ray gives the tile runner actors


def actor_processes() -> list:
    """The live tile-runner actor processes of this process's Ray (psutil.Process)."""
    import psutil
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(ACTOR_TITLE):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def vm_hwm(pid: int) -> int:
    """The RSS high-water mark of process `pid`, bytes (Linux /proc/PID/status VmHWM); 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ActorWatch:
    """A run_tiles progress callback: the time of its first call (the driver's preparation done) and, on every
    tile's completion, each live actor's RSS high-water mark and CPU time (the last reading before the actors
    are killed holds their peaks)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.prepared: float | None = None
        self.hwm: dict[int, int] = {}
        self.cpu: dict[int, float] = {}

    def __call__(self, done: int, total: int, msg: str) -> None:
        if self.prepared is None:
            self.prepared = time.perf_counter() - self.t0
        if done == 0:
            return
        import psutil
        for p in actor_processes():
            try:
                t = p.cpu_times()
                self.cpu[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                continue
            self.hwm[p.pid] = max(self.hwm.get(p.pid, 0), vm_hwm(p.pid))


def cut_fields(sim: Path, n: int, size: int, out: Path) -> list[dict]:
    """Ingest-configuration field entries for `n` copies of the first simulated field's first `size`^2 px, each
    moved a degree further in right ascension (the same pixels: any change per Mpx with the number of fields is
    the processing's, not the sky's), with their images, inverse variances and masks written as FITS under
    `out`."""
    from astropy.io import fits
    f = yaml.safe_load((sim / "manifest.yaml").read_text())["fields"][0]
    y0 = x0 = 0
    fields = []
    for k in range(n):
        name = f"scale{k:03d}"
        bands = {}
        for b, e in f["bands"].items():
            bands[b] = {key: e[key] for key in ("zeropoint", "psf_fwhm") if key in e}
            for key in ("image", "invvar", "mask"):
                with fits.open(sim / e[key], memmap=False) as hdul:
                    hdu = next(h for h in hdul if h.data is not None)
                    head = hdu.header.copy()
                    for scaling in ("BZERO", "BSCALE"):  # astropy writes its own for unsigned integers
                        head.remove(scaling, ignore_missing=True)
                    head["CRPIX1"] -= x0
                    head["CRPIX2"] -= y0
                    head["CRVAL1"] += 1.0 * (k + 1)
                    path = out / name / f"{name}-{b}-{key}.fits"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fits.PrimaryHDU(hdu.data[y0:y0 + size, x0:x0 + size], head).writeto(path, overwrite=True)
                bands[b][key] = str(path)
        fields.append({"name": name, "bands": bands})
    return fields


def ingest(fields: list[dict], work: Path, name: str, tile: int | None = None) -> str:
    """Ingest `fields` (ingest-configuration entries) into the store `work/name.zarr`; its path."""
    from deepfield.tasks.ingest import ingest_one
    from deepfield.tasks.ingest_config import StoreSpec, load_ingest_config
    (work / f"{name}.yaml").write_text(yaml.safe_dump({"fields": fields}))
    spec = StoreSpec(tile=tile, chunk=256) if tile else StoreSpec()
    cfg = load_ingest_config(work / f"{name}.yaml", store=spec)
    store = str(work / f"{name}.zarr")
    for f in cfg.fields:
        res = ingest_one(f, store, cfg.store)
        assert res["status"] == "ingested", res
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim", type=Path, help="existing `deepfield simulate` output (2048 px fields)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--copies", type=int, default=2, help="overhead: times each simulated field is ingested")
    ap.add_argument("--scale-fields", default="1,4,16", help="scaling: numbers of fields")
    ap.add_argument("--scale-size", type=int, default=1024, help="scaling: field side, px")
    ap.add_argument("--actors", type=int, default=os.cpu_count() or 1, help="actors (default: one per core)")
    args = ap.parse_args()
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; sections: {', '.join(SECTIONS)}")
    t_cmd = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="deepfield-bench-process-"))
    from deepfield.flows import prefect_env
    prefect_env.configure(work / "prefect")
    n = args.actors
    try:
        if "startup" in sections:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import deepfield.flows.cli"], check=True)
            t_cli = time.perf_counter() - t0
        from prefect import flow, task

        from deepfield.flows.run_config import RunConfig
        from deepfield.tasks.actor_pool import run_tiles
        from deepfield.tasks.tile_runner import TileRunner
        from deepfield.tasks.zarr_store import all_tiles, open_store

        watching: list = [None]  # the progress callback of the next run (not a parameter: Prefect hashes those)

        @task
        def process(store: str, run_dir: str, stages: list, halo: int, actors: int, fields=None):
            return run_tiles(store, run_dir, stages, halo, "bench", num_actors=actors, fields=fields,
                             progress=watching[0])

        @flow
        def bench_flow(store: str, run_dir: str, stages: list, halo: int, actors: int, fields=None):
            return process(store, run_dir, stages, halo, actors, fields)

        @flow
        def warm() -> int:
            return 1

        t0 = time.perf_counter()
        warm()
        t_prefect = time.perf_counter() - t0
        t0 = time.perf_counter()
        import ray
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        t_ray = time.perf_counter() - t0
        default = RunConfig.model_fields["stages"].default_factory()
        stages = [(s.name, dict(s.params)) for s in default]
        halo = int(RunConfig.model_fields["halo"].default)
        sim = bench_survey(args.sim, work).resolve()
        manifest = yaml.safe_load((sim / "manifest.yaml").read_text())
        nbands = len(manifest["fields"][0]["bands"])
        sim_fields = [{"name": f["name"], "bands": {b: {k: str(sim / e[k]) for k in ("image", "invvar", "mask")}
                                                    for b, e in f["bands"].items()}} for f in manifest["fields"]]

        def pipeline(store: str, run_dir: str, fields=None) -> dict:
            """The default stages through Prefect and `n` actors; the run's figures."""
            root = open_store(store)
            tiles = all_tiles(root, halo, fields)
            shapes = [root["fields"][f].attrs["shape"] for f in {t.field for t in tiles}]
            mpx = sum(ny * nx for _, ny, nx in shapes) / 1e6  # the tile cores cover the fields
            watch = ActorWatch()
            t0 = time.perf_counter()
            watching[0] = watch
            s = bench_flow(store, str(work / run_dir), stages, halo, n, fields)
            wall = time.perf_counter() - t0
            assert s["done"] == len(tiles) and not s["failed"], s
            cpu = sum(watch.cpu.values())
            return dict(tiles=len(tiles), mpx=mpx, wall=wall, prepared=watch.prepared,
                        in_tiles=sum(s["stage_seconds"].values()), stage_seconds=s["stage_seconds"],
                        actor_cpu=cpu, cpu_in_tiles=cpu - len(watch.cpu) * setup_cpu, hwm=sorted(watch.hwm.values()),
                        actors=s["actors"])

        def actor_setup(store: str) -> tuple[float, float]:
            """(seconds until `n` fresh tile-runner actors of the default stages all answer, their mean CPU
            seconds by then): the set-up each run's actors pay before their first tile."""
            import psutil
            Actor = ray.remote(num_cpus=1, max_restarts=0)(TileRunner)
            t0 = time.perf_counter()
            actors = [Actor.remote(store, str(work / "run-setup"), stages, halo) for _ in range(n)]
            pids = [info["pid"] for info in ray.get([a.info.remote() for a in actors])]
            wall = time.perf_counter() - t0
            cpu = [sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids]
            for a in actors:
                ray.kill(a)
            return wall, sum(cpu) / len(cpu)

        if "startup" in sections:
            setup = ray.get(ray.remote(num_cpus=1, max_calls=1)(stage_setup_times).remote())
            store = ingest(sim_fields, work, "startup")
            t_actors, _ = actor_setup(store)
            watch = watching[0] = ActorWatch()  # the driver's preparation: until run_tiles' first progress call
            bench_flow(store, str(work / "run-prep"), [("background", {})], halo, 1)
            total = t_cli + t_prefect + t_ray + watch.prepared + t_actors
            print(f"start-up, from a command's start to its first tile processed ({n} actors, default stages):")
            for label, sec, note in (
                    ("interpreter and imports of the CLI", t_cli, ""),
                    ("Prefect ephemeral API (first flow run)", t_prefect, ""),
                    ("Ray (ray.init)", t_ray, ""),
                    ("flow start, driver's preparation", watch.prepared, "flow and task runs; run_tiles: store, "
                     "ledger, run keys"),
                    (f"actors' setup, {n} in parallel", t_actors, "worker start, imports, models"),
                    ("sum of the parts", total, "they overlap in `deepfield run`, below")):
                print(f"  {label:40s}{sec:6.1f} s" + (f"   ({note})" if note else ""))
            print("    in one fresh worker: " + ", ".join(f"{k} {v:.2f} s" for k, v in setup.items()), flush=True)
            # the command itself, whose parts overlap (Prefect's API and Ray start side by side)
            cache = work / "user-cache"
            print("  `deepfield run`, new run directory, fields ingested: command to the first tile's ledger record,"
                  "\n  that tile's own processing (its record's timings), and the difference, the start-up:")
            later = []
            for label, tag in (("first run on this machine (no Prefect database template)", "first"),
                               *((f"a later run ({k} of 3)", f"again{k}") for k in (1, 2, 3))):
                first, tile = command_startup(work, work / "startup.yaml", store, tag, cache)
                print(f"    {label:56s} {first:5.1f} s - {tile:4.1f} s = {first - tile:5.1f} s", flush=True)
                if tag != "first":
                    later.append(first - tile)
            print(f"    {'start-up of a later run, median of 3':56s} {sorted(later)[1]:27.1f} s   (target <= 8 s)",
                  flush=True)

        if "overhead" in sections:
            fields = [dict(f, name=f"{f['name']}-{c}") for f in sim_fields for c in range(args.copies)]
            store = ingest(fields, work, "overhead", tile=1024)
            ostages = [("background", {}), ("detect", {}), ("measure", {})]
            tiles = all_tiles(open_store(store), args.halo)
            mpix = len(tiles) * 1024 ** 2 * nbands / 1e6
            t0 = time.perf_counter()
            runner = TileRunner(store, str(work / "run-loop"), ostages, args.halo)
            stage_time: dict[str, float] = {}
            for t in tiles:
                for k, v in runner.process(str(t))["timings"].items():
                    stage_time[k] = stage_time.get(k, 0.0) + v
            t_loop = time.perf_counter() - t0
            t0 = time.perf_counter()
            watching[0] = None
            one = bench_flow(store, str(work / "run-1"), ostages, args.halo, 1)
            t_one = time.perf_counter() - t0
            t0 = time.perf_counter()
            many = bench_flow(store, str(work / "run-n"), ostages, args.halo, n)
            t_many = time.perf_counter() - t0
            assert one["done"] == len(tiles) and many["done"] == len(tiles), (one, many)
            tot = sum(stage_time.values())
            print(f"\norchestration overhead: {len(tiles)} tiles of 1024^2 px x {nbands} bands = {mpix:.0f} Mpix, "
                  f"halo {args.halo} px, background, detect, measure")
            print(f"  plain in-process loop, 1 process      {t_loop:7.1f} s  {mpix / t_loop:6.2f} Mpix/s")
            print(f"  Prefect + Ray, 1 actor                {t_one:7.1f} s  {mpix / t_one:6.2f} Mpix/s")
            print(f"  Prefect + Ray, {n} actors               {t_many:7.1f} s  {mpix / t_many:6.2f} Mpix/s"
                  f"  (speed-up {t_loop / t_many:.2f}x over the loop)")
            print(f"  orchestration overhead (1 actor / loop - 1)  {t_one / t_loop - 1:+.1%}   (target <= 15%)")
            shares = ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in stage_time.items())
            print(f"  stage shares (plain loop): {shares}", flush=True)

        setup_cpu = 0.0
        if "pipeline" in sections:
            store = ingest(sim_fields, work, "pipeline")
            _, setup_cpu = actor_setup(store)
            r = pipeline(store, "run-pipeline")
            mpx, gib = r["mpx"], 2.0 ** 30
            print(f"\nwhole pipeline through Prefect and Ray: default stages, {r['tiles']} tiles = {mpx:.1f} Mpx of "
                  f"tile core x {nbands} bands, {r['actors']} actors")
            for label, sec, core_s, note in (
                    ("wall time", r["wall"], n * r["wall"], f"{n} cores x wall, set-up included"),
                    ("actors' CPU time", r["actor_cpu"], r["actor_cpu"], "psutil, set-up included"),
                    ("actors' CPU time in tiles", r["cpu_in_tiles"], r["cpu_in_tiles"],
                     f"less {setup_cpu:.1f} s of set-up per actor; target <= 1.5"),
                    ("actor wall time in tiles", r["in_tiles"], r["in_tiles"], "the tiles' timings; other load "
                     "on the machine adds to it")):
                print(f"  {label:35s}{sec:7.1f} s  {core_s / mpx:6.2f} core-s per Mpx   ({note})")
            steps = ", ".join(f"{k} {v / mpx:.2f}" for k, v in r["stage_seconds"].items())
            print(f"  per step, core-s per Mpx: {steps}")
            print("  peak memory per actor (RSS high-water mark): "
                  + ", ".join(f"{h / gib:.2f}" for h in r["hwm"]) + " GiB", flush=True)

        if "scaling" in sections:
            counts = [int(c) for c in args.scale_fields.split(",")]
            fields = cut_fields(sim, max(counts), args.scale_size, work / "scale-fits")
            store = ingest(fields, work, "scale")
            if not setup_cpu:
                _, setup_cpu = actor_setup(store)
            rows = []
            for c in counts:
                print(f"scaling: {c} field(s) ...", flush=True)
                rows.append((c, pipeline(store, f"run-scale-{c}", [f["name"] for f in fields[:c]])))
            base = rows[0][1]
            print(f"\nscaling: fields of {args.scale_size}^2 px x {nbands} bands a degree apart, default stages, "
                  f"{n} actors (target: time per Mpx and peak memory per actor flat within 10 %)")
            print(f"  {'fields':>6s}{'Mpx':>7s}{'wall s':>8s}{'wall core-s/Mpx':>17s}"
                  f"{'CPU in tiles core-s/Mpx':>25s}{'vs 1 field':>11s}{'peak RSS/actor GiB':>20s}{'vs 1 field':>11s}")
            for c, r in rows:
                per = r["cpu_in_tiles"] / r["mpx"]
                peak = max(r["hwm"]) / 2.0 ** 30
                print(f"  {c:6d}{r['mpx']:7.1f}{r['wall']:8.1f}{r['wall'] * n / r['mpx']:17.2f}{per:25.3f}"
                      f"{per / (base['cpu_in_tiles'] / base['mpx']):11.2f}{peak:20.2f}"
                      f"{peak / (max(base['hwm']) / 2.0 ** 30):11.2f}")
            print(f"  (CPU in tiles: the actors' CPU time less {setup_cpu:.1f} s of set-up per actor)")
        print(f"\nbenchmark took {time.perf_counter() - t_cmd:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
