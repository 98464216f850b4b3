"""The run flow's processing task: every tile not yet done is processed on the Ray actor pool
(tasks/actor_pool.py), with a progress bar on standard error."""
from __future__ import annotations

from prefect import task

from deepfield.tasks.actor_pool import run_tiles
from deepfield.tasks.atomic import clean_stale_temporaries
from deepfield.tasks.ledger import Ledger
from deepfield.tasks.provenance import run_keys
from deepfield.tasks.zarr_store import all_tiles, open_store

from .run_config import RunConfig


def _progress_printer(label: str):
    """A progress line on stderr (Prefect tasks run in this process; a bar needs a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.description}"), console=Console(stderr=True), transient=False)
    task_id = prog.add_task("", total=None)

    def update(done: int, total: int, msg: str) -> None:
        if not prog.live.is_started:
            prog.start()
        prog.update(task_id, completed=done, total=total, description=msg)
        if total and done >= total:
            prog.stop()
    return update, prog


@task(name="process-tiles")
def process_task(cfg: RunConfig, fields: list[str]) -> dict:
    """Process the tiles of `fields` (the run's fields: ingested or unchanged, not failed) not yet done.
    First, temporaries a killed run left under tiles/ and ledger/ are removed, and so are the records and
    tables of tiles outside this run's tiles made under another configuration (another tile size or stage
    list; tasks.ledger.Ledger.prune): the summary lists those under `pruned`."""
    for d in [*(cfg.run_dir / "tiles").glob("*"), *(cfg.run_dir / "ledger").glob("*")]:
        clean_stale_temporaries(d)  # files a killed run's actors or driver were writing (run lock held)
    root = open_store(cfg.store_path)
    pruned = Ledger(cfg.run_dir).prune(all_tiles(root, cfg.halo, fields),
                                       run_keys(cfg.stage_list(), cfg.processing_hash(), root, fields))
    update, prog = _progress_printer("processing tiles")
    try:
        summary = run_tiles(str(cfg.store_path), str(cfg.run_dir), cfg.stage_list(), cfg.halo,
                            cfg.processing_hash(), address=cfg.ray.address, num_actors=cfg.ray.num_actors,
                            use_gpus=cfg.ray.use_gpus, in_flight_per_actor=cfg.ray.in_flight_per_actor,
                            max_attempts=cfg.ray.max_attempts, progress=update, stop_grace=cfg.ray.stop_grace,
                            plugins=cfg.plugins, fields=fields, actor_start_timeout=cfg.ray.actor_start_timeout)
    finally:
        if prog.live.is_started:
            prog.stop()
    return dict(summary, pruned=pruned)
