"""The run flow's processing task: every tile not yet done is processed on the Ray actor pool
(tasks/actor_pool.py).

Where it stands shows where operators look, updated as tiles finish (the driver learns of each finished tile
in tasks.actor_pool.run_tiles, which calls the task's progress callback):
- a progress bar on standard error (the command line's console: none with -q);
- deepfield INFO log lines (the run's log file, -v), every 10 % of the tiles or every LOG_SECONDS;
- Prefect artifacts on the flow run, for the UI: the run's progress over all its tiles (key
  `deepfield-run-progress`) and each field's with tiles to process (up to MAX_FIELD_ARTIFACTS), updated at most
  every UPDATE_SECONDS or every 1 % of the tiles, and when the last tile finishes; then a table of the fields' tiles
  (key `deepfield-run-fields`). A finished tile is done or failed; tiles done by an earlier run count as
  finished. An artifact the API refuses is a warning, never a reason to stop processing.
"""
from __future__ import annotations

import logging
import time
from collections import Counter

from prefect import task

from deepfield.tasks.actor_pool import run_tiles
from deepfield.tasks.atomic import clean_stale_temporaries
from deepfield.tasks.ledger import Ledger
from deepfield.tasks.provenance import run_keys
from deepfield.tasks.tiling import TileId
from deepfield.tasks.zarr_store import all_tiles, open_store

from .run_config import RunConfig

log = logging.getLogger(__name__)

PROGRESS_KEY = "deepfield-run-progress"
FIELDS_KEY = "deepfield-run-fields"
UPDATE_SECONDS = 2.0
LOG_SECONDS = 60.0
MAX_FIELD_ARTIFACTS = 50


def _progress_bar(label: str):
    """A progress bar on stderr (Prefect tasks run in this process; a live bar needs a terminal, elsewhere its
    last state is printed once)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .cli_common import console
    prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.description}"), console=console, transient=False, disable=console.quiet)
    task_id = prog.add_task("", total=None)

    def update(done: int, total: int, msg: str) -> None:
        if not prog.live.is_started:
            prog.start()
        prog.update(task_id, completed=done, total=total, description=msg)
        if total and done >= total:
            prog.stop()
    return update, prog


class _Tracker:
    """The progress callback of run_tiles: the bar, the log lines and the Prefect artifacts."""

    def __init__(self, fields: list[str], tiles: list[TileId], done_before: Counter, bar):
        self.bar = bar
        self.total = Counter(t.field for t in tiles)
        self.before, self.done, self.failed = done_before, Counter(), Counter()
        self.n_tiles, self.n_before = len(tiles), sum(done_before.values())
        self.todo = 0
        self.finished = 0
        self.t0 = time.monotonic()
        self.last_update = self.last_log = -1e9
        self.updated_at = self.logged_at = -1
        self.api = True  # until the API refuses an artifact
        self.overall = self._call(self._create, self._pct(self.n_before, self.n_tiles), key=PROGRESS_KEY,
                                  description=f"tiles finished: {self.n_before} of {self.n_tiles} done before")
        # the fields with tiles to process: each artifact is a call to Prefect's API (about 70 ms on a busy
        # 2-core machine), and a re-run with nothing to do spent 3.8 s making 50 that stood at 100 % already
        shown = [f for f in fields if self.total[f] > self.before[f]][:MAX_FIELD_ARTIFACTS]
        self.field_ids = {f: self._call(self._create, self._pct(self.before[f], self.total[f]),
                                        description=f"{f}: {self.total[f]} tile(s)") for f in shown}
        self.field_sent = {f: self.before[f] for f in shown}

    @staticmethod
    def _pct(n: int, of: int) -> float:
        return 100.0 * n / of if of else 100.0

    @staticmethod
    def _create(progress: float, key: str | None = None, description: str | None = None):
        from prefect.artifacts import create_progress_artifact
        return create_progress_artifact(progress, key=key, description=description)

    def _call(self, fn, *args, **kwargs):
        if not self.api:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # the UI's view, not the run: processing goes on without it
            log.warning("Prefect artifacts of the run's progress are not updated any more: %s: %s",
                        type(exc).__name__, exc)
            self.api = False
            return None

    def __call__(self, done: int, total: int, msg: str) -> None:
        self.bar(done, total, msg)
        if done == 0:  # the first call: the tiles to do
            self.todo = total
            log.info("processing %d tile(s) of %d (%d done before)", total, self.n_tiles, self.n_before)
        else:
            self.finished = done
            name, _, state = msg.partition(" ")  # "<tile>" or "<tile> FAILED" (tasks.actor_pool.run_tiles)
            try:
                field = TileId.parse(name).field
            except ValueError:  # not a tile's name: the run's counts alone
                field = None
            (self.failed if state == "FAILED" else self.done)[field] += 1
            if state == "FAILED":
                log.info("tile %s failed after its last attempt (its error is in the ledger)", name)
        now = time.monotonic()
        last = done >= total
        if last or now - self.last_update >= UPDATE_SECONDS or done - self.updated_at >= max(1, total / 100):
            self._update(done, total)
            self.last_update, self.updated_at = now, done
        if done and (last or now - self.last_log >= LOG_SECONDS or done - self.logged_at >= max(1, total / 10)):
            log.info("processed %d of %d tile(s) (%d failed) in %.0f s", done, total, sum(self.failed.values()),
                     now - self.t0)
            self.last_log, self.logged_at = now, done

    def _update(self, done: int, total: int) -> None:
        from prefect.artifacts import update_progress_artifact
        if self.overall is not None:
            n = self.n_before + done
            self._call(update_progress_artifact, self.overall, self._pct(n, self.n_tiles),
                       description=f"tiles finished: {n} of {self.n_tiles} ({self.n_before} done before, "
                       f"{sum(self.failed.values())} failed)")
        for f, artifact in self.field_ids.items():
            n = self.before[f] + self.done[f] + self.failed[f]
            if artifact is not None and n != self.field_sent[f]:
                self._call(update_progress_artifact, artifact, self._pct(n, self.total[f]),
                           description=f"{f}: {n} of {self.total[f]} tile(s) finished ({self.failed[f]} failed)")
                self.field_sent[f] = n

    def finish(self) -> None:
        """The last state (also after a stop request) and the table of the fields' tiles."""
        self._update(self.finished, self.todo)
        from prefect.artifacts import create_table_artifact
        rows = [dict(field=f, tiles=n, done_before=self.before[f], done=self.done[f], failed=self.failed[f],
                     left=n - self.before[f] - self.done[f] - self.failed[f]) for f, n in self.total.items()]
        self._call(create_table_artifact, rows, key=FIELDS_KEY, description="the run's tiles by field")


@task(name="process-tiles")
def process_task(cfg: RunConfig, fields: list[str]) -> dict:
    """Process the tiles of `fields` (the run's fields: ingested or unchanged, not failed) not yet done.
    First, temporaries a killed run left under tiles/ and ledger/ are removed, and so are the records and
    tables of tiles outside this run's tiles made under another configuration (another tile size or stage
    list) and ledger lines a killed driver's write cut short (tasks.ledger.Ledger.prune): the summary lists the
    tiles removed under `pruned`."""
    for d in [*(cfg.run_dir / "tiles").glob("*"), *(cfg.run_dir / "ledger").glob("*")]:
        clean_stale_temporaries(d)  # files a killed run's actors or driver were writing (run lock held)
    root = open_store(cfg.store_path)
    tiles = all_tiles(root, cfg.halo, fields)
    keys = run_keys(cfg.stage_list(), cfg.processing_hash(), root, fields)
    ledger = Ledger(cfg.run_dir)
    pruned = ledger.prune(tiles, keys)
    if pruned:
        log.info("removed %d tile(s) of another configuration", len(pruned))
    update, prog = _progress_bar("processing tiles")
    pending = ledger.pending(tiles, keys)  # each field's log read once, for the count and for run_tiles
    todo = Counter(t.field for t in pending)
    tracker = _Tracker(fields, tiles, Counter(t.field for t in tiles) - todo, update)
    try:
        summary = run_tiles(str(cfg.store_path), str(cfg.run_dir), cfg.stage_list(), cfg.halo,
                            cfg.processing_hash(), address=cfg.ray.address, num_actors=cfg.ray.num_actors,
                            use_gpus=cfg.ray.use_gpus, in_flight_per_actor=cfg.ray.in_flight_per_actor,
                            max_attempts=cfg.ray.max_attempts, progress=tracker, stop_grace=cfg.ray.stop_grace,
                            plugins=cfg.plugins, fields=fields, actor_start_timeout=cfg.ray.actor_start_timeout,
                            prepared=(tiles, keys, pending))
    finally:
        if prog.live.is_started:
            prog.stop()
    tracker.finish()
    log.info("processed %d tile(s), %d failed, %d retried, on %d actor(s) in %.1f s%s", summary["done"],
             summary["failed"], summary["retries"], summary["actors"], summary["seconds"],
             "; stopped on request" if summary["stopped"] else "")
    return dict(summary, pruned=pruned)
