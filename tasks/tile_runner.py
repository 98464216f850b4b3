"""The tile runner: what one Ray actor (or a plain loop) does with one tile.

It loads its stages once, then for each tile reads the tile with its halo straight from the Zarr
store (no pixels pass through the driver), runs the stages in order, writes the tile's source table
to `RUN/tiles/<field>/<ty>_<tx>.parquet` atomically and returns a small summary. A stage that finds
objects other than sources (the cluster finder's candidates) leaves them in `tile.tables[name]`, under a name
it declares in `side_tables` (a table it does not declare fails the tile); each is written to
`RUN/tiles/<field>/<ty>_<tx>.<name>.parquet`, atomically and before the source table. Stages from plugin
modules (the run configuration's `plugins`) are imported before the stages are built.

Fault injection for tests and drills: DEEPFIELD_FAULT="kill:<tile>" makes the process exit on the
first attempt at that tile (an actor killed mid-tile); "killwrite:<tile>" the same while it writes the tile's
source table (its temporary file is left behind); "raise:<tile>" makes every attempt fail;
"delay:<seconds>" makes every tile take that much longer (a slow survey, to cancel or stop a job
mid-run). Items are separated by commas.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pandas as pd

from .atomic import atomic_path
from .stages.registry import load_plugins, make_stage
from .tiling import TileId
from .zarr_store import open_store
from .zarr_read import read_tile


def device_for(visible: str | None, cuda_available: bool) -> str:
    """The torch device of a process whose CUDA_VISIBLE_DEVICES is `visible`: Ray sets it to the
    actor's own GPU, so the first visible device, cuda:0, is the one the actor owns."""
    if visible and visible != "-1" and cuda_available:
        return "cuda:0"
    return "cpu"


def pick_device() -> str:
    """"cuda:0" when this process was given a GPU, else "cpu"."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if not visible or visible == "-1":
        return "cpu"
    import torch  # only when a GPU is offered: importing torch costs seconds
    return device_for(visible, torch.cuda.is_available())


def tile_output(run_dir: str | Path, tile: TileId, table: str | None = None) -> Path:
    """The tile's source table, or its extra table `table` (e.g. "clusters")."""
    return side_table(Path(run_dir) / "tiles" / tile.field / f"{tile.ty}_{tile.tx}.parquet", table)


def side_table(source_table: Path, table: str | None) -> Path:
    """The extra table `table` written beside a tile's source table (the source table itself for None)."""
    return source_table.with_name(f"{source_table.stem}.{table}.parquet") if table else source_table


def source_tables(run_dir: str | Path) -> list[Path]:
    """The tile source tables of a run, sorted (not the extra tables beside them)."""
    return sorted(f for f in (Path(run_dir) / "tiles").glob("*/*.parquet") if "." not in f.stem)


def _fault(tile: str, attempt: int, writing: bool = False) -> None:
    spec = os.environ.get("DEEPFIELD_FAULT", "")
    for item in filter(None, spec.split(",")):
        kind, _, target = item.partition(":")
        if writing:
            if target == tile and kind == "killwrite" and attempt == 1:
                os._exit(17)
            continue
        if kind == "delay":
            time.sleep(float(target))
        if target == tile and kind == "kill" and attempt == 1:
            os._exit(17)  # like an OOM kill or a node loss: no exception, no cleanup
        if target in (tile, "*") and kind == "raise":
            raise RuntimeError(f"injected failure on tile {tile} (DEEPFIELD_FAULT)")


class TileRunner:
    """Runs the configured stages over tiles. stages: [(name, params)] in order; halo in pixels; plugins:
    modules or .py files to import first (they register stages from outside the package)."""

    def __init__(self, store: str, run_dir: str, stages: list[tuple[str, dict]], halo: int,
                 device: str | None = None, plugins: list[str] | tuple[str, ...] = ()):
        self.store, self.run_dir, self.halo = store, Path(run_dir), int(halo)
        self.root = open_store(store)
        load_plugins(plugins)
        self.stages = [make_stage(name, **params) for name, params in stages]
        self.device = device or pick_device()
        for s in self.stages:
            s.shared_dir = self.run_dir / "cache" / s.name
            s.setup(self.device)

    def reopen(self) -> None:
        """Open the store again: an actor made before the run's ingest (tasks/actor_pool.py: prestart_actors)
        then reads every field as the ingest left it."""
        self.root = open_store(self.store)

    def info(self) -> dict:
        node = None
        ray = sys.modules.get("ray")  # inside a Ray actor: the Ray node it runs on (several may share a host)
        if ray is not None and ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
        return dict(host=socket.gethostname(), pid=os.getpid(), device=self.device, ray_node=node,
                    cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))

    def process(self, tile: str, attempt: int = 1) -> dict:
        """Process one tile ("field/ty_tx"); returns {tile, timings, counts, output}."""
        _fault(tile, attempt)
        tid = TileId.parse(tile)
        timings = {}
        t0 = time.perf_counter()
        data = read_tile(self.root, tid, self.halo)
        timings["read"] = time.perf_counter() - t0
        sources = pd.DataFrame()
        for stage in self.stages:
            t = time.perf_counter()
            before = set(data.tables)
            sources = stage.run(data, sources)
            undeclared = set(data.tables) - before - set(stage.side_tables)
            if undeclared:
                raise RuntimeError(f"stage {stage.name!r} wrote side table(s) {sorted(undeclared)} that it does not "
                                   f"declare (side_tables = {stage.side_tables})")
            timings[stage.name] = time.perf_counter() - t
        t = time.perf_counter()
        if len(sources):
            sources = sources.sort_values(["y", "x"], kind="stable").reset_index(drop=True)
        sources.insert(0, "tile_index", range(len(sources)))
        sources.insert(0, "tile", str(tid))
        sources.insert(0, "field", tid.field)
        for name, table in data.tables.items():
            with atomic_path(tile_output(self.run_dir, tid, name)) as tmp:
                table.to_parquet(tmp, index=False)
        out = tile_output(self.run_dir, tid)
        with atomic_path(out) as tmp:
            sources.to_parquet(tmp, index=False)
            _fault(tile, attempt, writing=True)
        timings["write"] = time.perf_counter() - t
        primary = int(sources["is_primary"].sum()) if "is_primary" in sources else 0
        # what else the stages counted (tile.meta["counts"], e.g. the background's sky steps), for the ledger
        counts = {str(k): int(v) for k, v in getattr(data, "meta", {}).get("counts", {}).items()}
        counts.update(sources=len(sources), primary=primary)
        return dict(tile=str(tid), timings=timings, counts=counts,
                    output=str(out.relative_to(self.run_dir)), pid=os.getpid(), worker=self.info())
