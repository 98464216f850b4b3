"""The run ledger: one JSON record per tile, `RUN/ledger/<field>/<ty>_<tx>.json`, written atomically
by the driver (the only writer), so a crash leaves every record whole.

A record holds the tile's status (done or failed), attempts, per-stage timings (s), counts,
configuration hash, stage versions, model versions, the output file and the error text. A tile is
done for a run when its record says "done" under the run's keys (tasks.provenance.RunKeys: the same
configuration hash, versions and input fingerprint) and its output is there; a re-run skips it, and
the merge takes exactly the outputs of the run's done tiles (`done_tables`).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import write_text
from .tiling import TileId


@dataclass
class TileRecord:
    tile: str
    status: str  # "done" or "failed"
    attempts: int
    config_hash: str
    stage_versions: dict[str, str]
    model_versions: dict[str, str] = field(default_factory=dict)
    input_hash: str = ""  # the field's input key (provenance.input_keys): a re-ingested field or read neighbour is redone
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    output: str | None = None
    error: str | None = None
    finished_at: str = ""
    worker: dict = field(default_factory=dict)  # where it ran: host, pid, device, CUDA_VISIBLE_DEVICES


class Ledger:
    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir) / "ledger"

    def path(self, tile: TileId) -> Path:
        return self.root / tile.field / f"{tile.ty}_{tile.tx}.json"

    def get(self, tile: TileId) -> TileRecord | None:
        try:
            return TileRecord(**json.loads(self.path(tile).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def put(self, rec: TileRecord) -> None:
        rec.finished_at = rec.finished_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_text(self.path(TileId.parse(rec.tile)), json.dumps(asdict(rec), indent=1, sort_keys=True))

    def output(self, rec: TileRecord) -> Path | None:
        """The source table a done record points to, when it exists."""
        if rec.status != "done" or not rec.output:
            return None
        path = self.root.parent / rec.output
        return path if path.is_file() else None

    def is_done(self, tile: TileId, keys) -> bool:
        """True when the tile's record says done under `keys` (tasks.provenance.RunKeys) and its source table
        is there."""
        rec = self.get(tile)
        return rec is not None and rec.tile == str(tile) and keys.matches(rec) and self.output(rec) is not None

    def done_tables(self, tiles: list[TileId], keys) -> tuple[list[Path], list[str]]:
        """(the source tables of the `tiles` done under `keys`, in tile order; the tiles that are not)."""
        tables, missing = [], []
        for t in tiles:
            rec = self.get(t)
            out = self.output(rec) if rec is not None and rec.tile == str(t) and keys.matches(rec) else None
            if out is None:
                missing.append(str(t))
            else:
                tables.append(out)
        return tables, missing

    def prune(self, tiles: list[TileId], keys) -> list[str]:
        """Remove the records and tile tables (source and side tables) of tiles that are not among `tiles`
        and were made under another configuration hash than `keys` (a changed tile size or stage list): they
        can never belong to this run. Returns the tiles removed."""
        current = {str(t) for t in tiles}
        removed = []
        for rec in self.records():
            if rec.tile in current or rec.config_hash == keys.config_hash:
                continue
            tid = TileId.parse(rec.tile)
            for table in (self.root.parent / "tiles" / tid.field).glob(f"{tid.ty}_{tid.tx}.*parquet"):
                table.unlink(missing_ok=True)  # <ty>_<tx>.parquet and <ty>_<tx>.<side table>.parquet
            self.path(tid).unlink(missing_ok=True)
            removed.append(rec.tile)
        return removed

    def records(self) -> list[TileRecord]:
        out = []
        for p in sorted(self.root.glob("*/*.json")):
            try:
                out.append(TileRecord(**json.loads(p.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return out


def check(run_dir: str | Path) -> tuple[list[TileRecord], list[str]]:
    """(the readable ledger records of a run, one line per problem): a record file that cannot be read or is
    not a record, a record filed under another tile's name, a done record whose source table is missing or
    is not a readable Parquet file (its footer is read)."""
    import pyarrow.parquet as pq
    ledger = Ledger(run_dir)
    good, problems = [], []
    for path in sorted(ledger.root.glob("*/*.json")):
        try:
            rec = TileRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            problems.append(f"{path}: not a readable ledger record ({type(exc).__name__}: {exc})")
            continue
        try:
            tid = TileId.parse(rec.tile)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
            continue
        if ledger.path(tid) != path:
            problems.append(f"{path}: holds the record of tile {rec.tile}")
            continue
        if rec.status == "done":
            out = ledger.root.parent / (rec.output or "")
            if not rec.output or not out.is_file():
                problems.append(f"{path}: tile {rec.tile} is done but its table {rec.output} is missing")
                continue
            try:
                pq.read_metadata(out)
            except Exception as exc:
                problems.append(f"{out}: the table of tile {rec.tile} cannot be read ({type(exc).__name__}: {exc})")
                continue
        good.append(rec)
    return good, problems


def summarise(run_dir: str | Path) -> dict:
    """Counts by status, per-stage total time, sources, attempts and the failed tiles' errors, over the records
    that `check` finds sound; its problems under `problems`."""
    recs, problems = check(run_dir)
    status = Counter(r.status for r in recs)
    timing = Counter()
    for r in recs:
        timing.update(r.timings)
    return dict(tiles=len(recs), status=dict(status), retried=sum(r.attempts > 1 for r in recs),
                sources=sum(r.counts.get("sources", 0) for r in recs),
                primary=sum(r.counts.get("primary", 0) for r in recs),
                stage_seconds={k: round(v, 3) for k, v in timing.items()},
                failed=[(r.tile, r.error) for r in recs if r.status == "failed"],
                config_hashes=sorted({r.config_hash for r in recs}), problems=problems)
