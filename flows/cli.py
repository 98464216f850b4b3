"""The `deepfield` command line. Every command has --help; the README's command reference mirrors it."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from deepfield.tasks.ingest_config import StoreSpec

from .cli_common import (VerboseGroup, console, errors, fail, rel, run_log, show_info,
                         verbosity)
from . import cli_anomaly  # noqa: F401  (registers train anomaly and eval anomaly)
from . import cli_detect  # noqa: F401  (registers train library, train detect and eval detect)
from . import cli_inspect
from . import cli_lens  # noqa: F401  (registers train lens, train merger, eval lens and eval merger)
from . import cli_photoz  # noqa: F401  (registers train photoz and eval photoz)
from .cli_models import eval_app, train_app
from .cli_report import output_lines, print_ingest_notes, print_run
from .cli_run import run_survey, start_api_early, undo_early_api

app = typer.Typer(cls=VerboseGroup, add_completion=False, no_args_is_help=True,
                  help="deepfield: survey-scale processing of astronomical imaging. Every command takes -v "
                  "(deepfield's INFO logs; -vv: DEBUG logs of everything) and -q (errors and the final result "
                  "lines only).")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
log = logging.getLogger(__name__)


def _print_version(value: bool) -> None:
    if value:
        from deepfield import __version__
        typer.echo(f"deepfield {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print deepfield's version and exit")) -> None:
    """deepfield: survey-scale processing of astronomical imaging."""


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False, disable=console.quiet)


@app.command()
def simulate(
    out: Path = typer.Option(..., "--out", "-o", help="output directory (created)"),
    seed: Optional[int] = typer.Option(None, help="random seed (default: 0)"),
    size: Optional[int] = typer.Option(None, help="field width and height in pixels (default: 2048)"),
    fields: Optional[int] = typer.Option(None, help="number of fields on a grid (default: 1)"),
    bands: Optional[str] = typer.Option(None, help="comma-separated bands from u,g,r,i,z,y (default: g,r,i,z)"),
    overlap: Optional[float] = typer.Option(None, help="sky overlap of neighbouring fields, arcsec (default: 20)"),
    pixel_scale: Optional[float] = typer.Option(None, help="arcsec per pixel (default: 0.2)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML simulator configuration; "
                                          "options given on the command line override it"),
    workers: Optional[int] = typer.Option(None, help="worker processes (default: number of cores)"),
    overwrite: bool = typer.Option(False, help="replace a simulation made with another configuration"),
) -> None:
    """Simulate a multi-band survey with known truth: FITS images, inverse variance, masks, truth
    catalogs (Parquet) and a manifest."""
    from deepfield.tasks.sim.config import SimConfig
    from deepfield.tasks.sim.survey import SimulationError, simulate_survey

    overrides = dict(seed=seed, size=size, fields=fields, overlap=overlap, pixel_scale=pixel_scale,
                     bands=[b.strip() for b in bands.split(",") if b.strip()] if bands else None)
    try:
        if config is not None:
            cfg = SimConfig.from_yaml(config, **overrides)
        else:
            cfg = SimConfig.model_validate({k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        fail(f"{config or 'command line'}: invalid simulator configuration:\n{exc}")
    except ValueError as exc:
        fail(str(exc))
    t0 = time.perf_counter()
    console.print(f"simulating {cfg.fields} field(s) of {cfg.size}x{cfg.size} px in {','.join(cfg.bands)} "
                  f"(seed {cfg.seed}) into {out}")
    with _progress() as prog:
        task = prog.add_task("rendering", total=None)

        def report(done: int, total: int, msg: str) -> None:
            prog.update(task, completed=done, total=total, description=f"rendering {msg}")

        try:
            manifest = simulate_survey(cfg, out, workers=workers, progress=report, overwrite=overwrite)
        except SimulationError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"{out}: {exc}")
    dt = time.perf_counter() - t0
    if prog.tasks[0].total is None:  # nothing was rendered
        console.print(f"{out} already holds this simulation; nothing to do")
        typer.echo(str(manifest))
        return
    mpix = cfg.fields * len(cfg.bands) * cfg.size**2 / 1e6
    console.print(f"done in {dt:.1f} s ({mpix / dt:.2f} Mpix/s); manifest: {manifest}")
    typer.echo(str(manifest))


@app.command()
def preview(
    field: Path = typer.Argument(..., help="a simulated field's directory (OUT/fields/field000) or a deepfield "
                                 "Zarr store (RUN_DIR/store.zarr) with --field"),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write"),
    bands: Optional[str] = typer.Option(None, help="three bands as red,green,blue (default: i,r,g, or the "
                                        "three reddest bands when the field lacks one of them; with two bands "
                                        "green is their mean, with one the picture is grey)"),
    stretch: Optional[float] = typer.Option(None, help="asinh stretch in ADU (default: 5 sky sigma)"),
    q: float = typer.Option(8.0, help="Lupton asinh softening Q"),
    binning: int = typer.Option(1, "--bin", min=1, help="average NxN pixel blocks"),
    colors: Optional[int] = typer.Option(None, min=2, max=256,
                                         help="quantise to a palette of N colours (smaller PNG)"),
    field_name: Optional[str] = typer.Option(None, "--field", help="the store's field to draw (default: its only "
                                             "field)"),
) -> None:
    """Write a Lupton RGB picture of a field: of simulator output, or of any field of a deepfield store."""
    from deepfield.tasks.preview import PreviewError, write_preview

    try:
        path = write_preview(field, out, tuple(b.strip() for b in bands.split(",")) if bands else None,
                             stretch=stretch, q=q, binning=binning, colors=colors, field=field_name)
    except PreviewError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{field}: {exc}")
    typer.echo(str(path))


@app.command()
def ingest(
    config: Path = typer.Argument(..., help="ingest configuration (YAML) or a `deepfield simulate` manifest.yaml"),
    store: Path = typer.Option(..., "--store", "-s", help="Zarr store directory (created if missing)"),
    tile: Optional[int] = typer.Option(None, help="tile core size in pixels, one shard per core (default: "
                                       f"{StoreSpec.model_fields['tile'].default})"),
    chunk: Optional[int] = typer.Option(None, help="chunk size in pixels, dividing the tile size (default: "
                                        f"{StoreSpec.model_fields['chunk'].default})"),
) -> None:
    """Validate survey FITS images and write them, tiled, into a Zarr store."""
    from deepfield.flows import prefect_env
    from deepfield.tasks.ingest_config import ConfigError, load_ingest_config

    try:
        cfg = load_ingest_config(config)
        if tile is not None or chunk is not None:
            spec = cfg.store.model_dump()
            spec.update({k: v for k, v in (("tile", tile), ("chunk", chunk)) if v is not None})
            cfg = cfg.model_copy(update={"store": StoreSpec.model_validate(spec)})
    except ConfigError as exc:
        fail(str(exc))
    except ValidationError as exc:
        fail(f"invalid store options:\n{exc}")
    if store.exists() and not store.is_dir():
        fail(f"{store}: not a directory (a Zarr store is one)")
    prefect_env.configure(store.resolve().parent / ".deepfield-prefect")
    from deepfield.flows.ingest import ingest_flow
    prefect_env.quiet_run_logs(console=verbosity() >= 2)

    t0 = time.perf_counter()
    console.print(f"ingesting {len(cfg.fields)} field(s) from {config} into {store} "
                  f"(tiles {cfg.store.tile} px, chunks {cfg.store.chunk} px, blosc-{cfg.store.codec.cname})")
    with prefect_env.flow_settings():
        results = ingest_flow(cfg, str(store))
    failed = [r for r in results if r["status"] == "failed"]
    print_ingest_notes(results, str(store))
    raw = sum(r.get("raw_bytes", 0) for r in results)
    stored = sum(sum(r.get("stored_bytes", {}).values()) for r in results)
    n = {s: sum(r["status"] == s for r in results) for s in ("ingested", "skipped", "failed")}
    console.print(f"{n['ingested']} ingested, {n['skipped']} skipped (unchanged), {n['failed']} failed "
                  f"in {time.perf_counter() - t0:.1f} s" + (f"; stored {stored / max(raw, 1):.2f} of raw size" if raw else ""))
    for r in failed:
        errors.print(f"[bold red]failed:[/] {r['error']}")
    typer.echo(str(store))
    if failed:
        raise typer.Exit(1)


def _version() -> str:
    from deepfield import __version__
    return __version__


@app.command()
def run(
    config: Path = typer.Argument(..., help="run configuration (YAML); see the README, 'Run configuration'"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="override run_dir of the configuration"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to process on "
                                              "(overrides ray.address), e.g. 10.0.0.1:6379"),
    dask_address: Optional[str] = typer.Option(None, "--dask-address", help="Dask scheduler for the merge "
                                               "(overrides dask.address), e.g. tcp://10.0.0.1:8786"),
) -> None:
    """Run a survey end to end: ingest -> process tiles on Ray -> merge catalogs with Dask.

    SIGUSR1 (a Slurm job's walltime warning) stops dispatching tiles: the tiles in flight finish (a
    second SIGUSR1 releases them), the merge is skipped and the exit status is 3; run again to resume."""
    import signal
    early = start_api_early(config, run_dir)  # Prefect's API server starts beside the imports and checks below
    accepted = False
    try:
        from deepfield.flows.run_config import RunConfigError, load_run_config
        from deepfield.tasks.actor_pool import request_stop
        from deepfield.tasks.ingest_config import ConfigError, load_ingest_config
        try:
            cfg = load_run_config(config, run_dir=str(run_dir.resolve()) if run_dir else None)
            # the inputs' configuration, before anything starts
            load_ingest_config(cfg.inputs, store=cfg.store_layout)
            if cfg.store_path.exists() and not cfg.store_path.is_dir():
                raise ConfigError(f"{cfg.store_path}: not a directory (a Zarr store is one)")
            cfg = cfg.with_addresses(ray_address, dask_address)
        except (RunConfigError, ConfigError) as exc:
            fail(str(exc))
        accepted = True
    finally:
        if not accepted:  # refused (or interrupted): the early server stopped, what it made removed
            undo_early_api(early)
    signal.signal(signal.SIGUSR1, lambda *_: request_stop())
    # SIGTERM (kill, scancel, a scheduler's stop) unwinds like an error: locks released, and the local Ray
    # and Prefect server this process started are stopped by their exit handlers instead of left running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with run_log(cfg.run_dir) as log_file:
        log.info("deepfield %s: run of %s in %s", _version(), config, cfg.run_dir)
        summary = run_survey(cfg, early)
        print_run(summary, cfg, log_file=log_file)
    typer.echo(str(cfg.run_dir))
    if summary["failed_fields"] or summary["failed_tiles"]:
        raise typer.Exit(1)
    if summary["stopped"]:
        raise typer.Exit(3)


@app.command()
def serve(
    config: Path = typer.Argument(..., help="run configuration (YAML) to reprocess on the schedule"),
    cron: str = typer.Option("0 2 * * *", "--cron", help="cron schedule of the runs (default: nightly at 02:00)"),
    timezone: str = typer.Option("UTC", "--timezone", help="time zone of the cron schedule (IANA name)"),
    name: Optional[str] = typer.Option(None, "--name", help="deployment name (default: the configuration's "
                                       "file name without .yaml)"),
    limit: int = typer.Option(1, "--limit", min=1, help="flow runs at a time"),
) -> None:
    """Serve scheduled reprocessing of CONFIG: register the Prefect deployment
    deepfield-reprocess/NAME on a cron schedule and run its flow runs until interrupted (no work pool).
    Each run redoes only what changed since the last one."""
    from deepfield.flows import prefect_env
    from deepfield.flows.run_config import RunConfigError, load_run_config

    try:
        cfg = load_run_config(config)
    except RunConfigError as exc:
        fail(str(exc))
    prefect_env.configure(cfg.run_dir / ".deepfield-prefect", quiet=False)  # before prefect is imported
    from prefect.client.schemas.schedules import CronSchedule
    if verbosity() >= 0:
        show_info("prefect")  # the runner's flow runs as they come
    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        fail(f"--cron {cron!r} --timezone {timezone!r}: invalid schedule: "
             + "; ".join(e["msg"] for e in exc.errors()))
    from deepfield.flows.schedule import DEPLOYMENT_FLOW, serve_reprocessing

    name = name or config.stem
    console.print(f"serving {DEPLOYMENT_FLOW}/{name}: {config} on {cron!r} ({timezone}); Ctrl-C stops")
    serve_reprocessing(config, cron, name, timezone=timezone, limit=limit)


cli_inspect.register(app)  # status, schema (flows/cli_inspect.py), listed here in the help


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="demo directory"),
    size: int = typer.Option(1024, help="field size in pixels"),
    fields: int = typer.Option(2, help="number of overlapping fields"),
    seed: int = typer.Option(1, help="random seed"),
) -> None:
    """Simulate a small two-field survey, run it end to end, and print what was found and where."""
    import yaml

    from deepfield.flows.evaluate.demo import demo_completeness, demo_photoz
    from deepfield.flows.run_config import RunConfig
    from deepfield.tasks.preview import write_preview
    from deepfield.tasks.sim.config import SimConfig
    from deepfield.tasks.sim.survey import simulate_survey

    try:
        sim_cfg = SimConfig(seed=seed, size=size, fields=fields)
    except ValidationError as exc:
        fail(f"invalid demo options:\n{exc}")
    out = out.resolve()
    with run_log(out / "run") as log_file:
        log.info("deepfield %s: demo of %d field(s) of %d px (seed %d) in %s", _version(), fields, size, seed, out)
        t0 = time.perf_counter()
        with _progress() as prog:
            task = prog.add_task("simulating", total=None)
            # the demo directory is the demo's own: a demo with other options replaces it
            manifest = simulate_survey(sim_cfg, out / "sim", overwrite=True, progress=lambda d, t, m: prog.update(
                task, completed=d, total=t, description=f"simulating {m}"))
        t_sim = time.perf_counter() - t0
        run_yaml = out / "survey.yaml"
        run_yaml.write_text(yaml.safe_dump({"inputs": "sim/manifest.yaml", "run_dir": "run"}))
        cfg = RunConfig(inputs=manifest, run_dir=out / "run")
        summary = run_survey(cfg)
        png = write_preview(out / "sim" / "fields" / "field000", out / "field000.png", binning=2)
        print_run(summary, cfg, log_file=log_file, paths=False)  # the paths are the demo's result lines below
    comp = demo_completeness(out / "sim" / "truth" / "objects.parquet", summary["merge"])
    typer.echo(f"simulated {fields} field(s) of {size}x{size} px in {t_sim:.1f} s; "
               f"ran them in {summary['seconds']['total']:.1f} s; total {time.perf_counter() - t0:.1f} s")
    typer.echo(f"  completeness at i < 24 (primary truth galaxies and stars matched within 1\"): "
               f"{comp['matched']}/{comp['n']} = {comp['fraction']:.1%}")
    pz = demo_photoz(out / "sim" / "truth" / "objects.parquet", summary["merge"])
    if pz and pz["n"]:
        typer.echo(f"  photo-z at i < 24 ({pz['n']} truth galaxies matched within 0.5\"): sigma_NMAD "
                   f"{pz['sigma_nmad']:.3f}, outliers {pz['outliers']:.1%}, bias {pz['bias']:+.3f}")
    items = [("run configuration", rel(run_yaml)),
             *((k, rel(v)) for k, v in summary["merge"].get("paths", {}).items()),
             ("ledger", f"{rel(cfg.run_dir / 'ledger')}  (deepfield status {rel(cfg.run_dir)})"),
             ("truth tables", rel(out / "sim" / "truth")), ("preview", rel(png)), ("log", rel(log_file))]
    for line in output_lines(items):
        typer.echo(line)
    if summary["failed_fields"] or summary["failed_tiles"]:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console script entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
