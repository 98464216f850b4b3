"""The run ledger: one record per tile, kept per field in an append-only log, `RUN/ledger/<field>/records.jsonl`
(one JSON record per line), written by the driver alone.

A record holds the tile's status (done or failed), attempts, per-stage timings (s), counts,
configuration hash, stage versions, model versions, the output file and the error text. A tile is
done for a run when its record says "done" under the run's keys (tasks.provenance.RunKeys: the same
configuration hash, versions and input fingerprint) and its output is there; a re-run skips it, and
the merge takes exactly the outputs of the run's done tiles (`done_tables`).

Crash safety: a record is appended whole, line and newline in one write; a tile's last line is its record.
A line a crash cut short (no newline at the end of the log) is not a record, so its tile is done again, and
the driver's first write to the field cuts it off. Whole-log rewrites (migration, compaction once superseded
lines outnumber the records, `prune`) write a new log beside the old one and rename it over it
(tasks/atomic.py), so a kill leaves the old log or the new one.

Scale: a run of 10^6 tiles of 64 per field has 15,625 logs instead of 10^6 files, and the bulk questions
(`pending`, `done_tables`, `prune`, `records`) read each log once and list each field's tile directory once
instead of a stat per tile (tests/benchmarks/bench_survey_scale.py).

Ledgers written before the logs, one JSON file per tile (`RUN/ledger/<field>/<ty>_<tx>.json`), are read as
they are; while such a file is there it is the tile's record. The driver's first write to a field moves the
field's files into its log (the log rewritten with them, then the files removed), so existing run
directories keep their done tiles.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .atomic import atomic_path
from .tiling import TileId

LOG = "records.jsonl"
_LEGACY = re.compile(r"^(\d+)_(\d+)\.json$")
_TILE = re.compile(r"^.+/\d+_\d+$")  # what TileId.parse reads


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


try:  # 3-4 times faster than json on a record (installed with Prefect); the same JSON either way
    import orjson

    def _loads(raw: bytes):
        return orjson.loads(raw)

    def _line(rec: TileRecord) -> bytes:
        d = asdict(rec)
        try:
            return orjson.dumps(d, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
        except TypeError:  # what json writes and orjson does not (numpy floats)
            return (json.dumps(d, sort_keys=True, separators=(",", ":")) + "\n").encode()
except ImportError:  # pragma: no cover
    def _loads(raw: bytes):
        return json.loads(raw.decode())

    def _line(rec: TileRecord) -> bytes:
        return (json.dumps(asdict(rec), sort_keys=True, separators=(",", ":")) + "\n").encode()


@dataclass
class _Field:
    """What one field's ledger holds: its records by tile name (None: a legacy file that is not a sound record
    of its tile, which hides the log's), the lines of its log and the problems found."""

    records: dict[str, TileRecord | None]
    lines: int = 0
    torn: bool = False
    legacy: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class Ledger:
    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir) / "ledger"
        self._ready: set[str] = set()  # fields whose log this object has made ready to append to
        self._memo: tuple[str, bytes, _Field] | None = None  # the last field read by `get`

    def log_path(self, field_name: str) -> Path:
        return self.root / field_name / LOG

    def legacy_path(self, tile: TileId) -> Path:
        """Where a ledger from before the per-field logs kept the tile's record."""
        return self.root / tile.field / f"{tile.ty}_{tile.tx}.json"

    # reading

    def _read(self, name: str, data: bytes | None = None) -> _Field:
        log = self.log_path(name)
        if data is None:
            try:
                data = log.read_bytes()
            except FileNotFoundError:
                data = b""
        out = _Field({})
        lines = data.split(b"\n")
        if lines[-1]:  # no newline at the end: a write cut short
            out.torn = True
            out.problems.append(f"{log}: line {len(lines)}: an incomplete last record (a write cut short), "
                                "not a record")
        for n, raw in enumerate(lines[:-1], 1):
            out.lines += 1
            try:
                rec = TileRecord(**_loads(raw))
                if not isinstance(rec.tile, str) or not _TILE.match(rec.tile):
                    raise ValueError(f"not a tile id (expected 'field/ty_tx'): {rec.tile!r}")
            except (ValueError, TypeError) as exc:
                out.problems.append(f"{log}: line {n}: not a readable ledger record ({type(exc).__name__}: {exc})")
                continue
            if rec.tile[:len(name) + 1] != name + "/" or "/" in rec.tile[len(name) + 1:]:
                out.problems.append(f"{log}: line {n}: holds the record of tile {rec.tile}, of another field")
                continue
            out.records[rec.tile] = rec
        try:
            entries = [e for e in os.scandir(self.root / name) if _LEGACY.match(e.name)]
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        for e in sorted(entries, key=lambda e: e.name):
            path, tile = Path(e.path), f"{name}/{e.name[:-5]}"
            out.legacy.append(path)
            rec, problem = _read_legacy(path, tile)
            out.records[tile] = rec
            if problem:
                out.problems.append(problem)
        return out

    def fields(self) -> list[str]:
        """The fields that have a ledger directory, sorted."""
        try:
            return sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        except FileNotFoundError:
            return []

    def get(self, tile: TileId) -> TileRecord | None:
        """The tile's record, or None. The field's log read last is kept, so that asking for the tiles of one
        field after another reads each log once (it is read again when its bytes changed)."""
        legacy = self.legacy_path(tile)
        if legacy.exists():
            return _read_legacy(legacy, str(tile))[0]
        log = self.log_path(tile.field)
        try:
            data = log.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if self._memo is None or self._memo[:2] != (tile.field, data):
            self._memo = (tile.field, data, self._read(tile.field, data))
        return self._memo[2].records.get(str(tile))

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

    def _done(self, tiles: Iterable[TileId], keys, paths: bool = True) -> Iterator[tuple[TileId, Path | bool | None]]:
        """(tile, its source table when done under `keys` (True for paths=False), else None) for each of
        `tiles`, reading each field's log and listing its tile directory once."""
        name, recs, listing, prefix = None, {}, set(), ""
        run = self.root.parent
        for t in tiles:
            if t.field != name:
                name, prefix = t.field, f"tiles/{t.field}/"
                recs = self._read(name).records
                listing = _files(run / "tiles" / name)
            rec = recs.get(str(t))
            if rec is None or rec.status != "done" or not rec.output or not keys.matches(rec):
                yield t, None
            elif rec.output.startswith(prefix) and "/" not in rec.output[len(prefix):]:  # where the runner writes
                there = rec.output[len(prefix):] in listing
                yield t, ((run / rec.output if paths else True) if there else None)
            else:
                yield t, self.output(rec)

    def pending(self, tiles: Iterable[TileId], keys) -> list[TileId]:
        """The `tiles` not done under `keys` (to do), in their order."""
        return [t for t, out in self._done(tiles, keys, paths=False) if out is None]

    def done_tables(self, tiles: list[TileId], keys) -> tuple[list[Path], list[str]]:
        """(the source tables of the `tiles` done under `keys`, in tile order; the tiles that are not)."""
        tables, missing = [], []
        for t, out in self._done(tiles, keys):
            if out is None:
                missing.append(str(t))
            else:
                tables.append(out)
        return tables, missing

    def iter_records(self) -> Iterator[TileRecord]:
        """Every readable record, field by field (sorted), in tile order within a field."""
        for name in self.fields():
            recs = self._read(name).records
            for tile in sorted(recs, key=_tile_order):
                if recs[tile] is not None:
                    yield recs[tile]

    def records(self) -> list[TileRecord]:
        return list(self.iter_records())

    # writing (the driver alone)

    def _rewrite(self, name: str, records: Iterable[TileRecord], legacy: list[Path]) -> None:
        """The field's log written anew with `records` (atomically), then its legacy files removed."""
        with atomic_path(self.log_path(name)) as tmp:
            with open(tmp, "wb") as f:
                for rec in records:
                    f.write(_line(rec))
        for p in legacy:
            p.unlink(missing_ok=True)

    def _prepare(self, name: str) -> None:
        """Make the field's log ready for appending, once per Ledger object: legacy files moved into it, a torn
        last line cut off, superseded lines dropped when they outnumber the records."""
        if name in self._ready:
            return
        f = self._read(name)
        live = [r for r in f.records.values() if r is not None]
        if f.legacy or f.lines > 2 * len(live) + 64:
            self._rewrite(name, sorted(live, key=lambda r: _tile_order(r.tile)), f.legacy)
        elif f.torn:
            self._cut_torn(name)
        self._ready.add(name)

    def _cut_torn(self, name: str) -> None:
        """Cut off the last line of the field's log when a write cut it short (it ends without a newline)."""
        log = self.log_path(name)
        data = log.read_bytes()
        if data and not data.endswith(b"\n"):
            os.truncate(log, data.rfind(b"\n") + 1)

    def put(self, rec: TileRecord) -> None:
        rec.finished_at = rec.finished_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        name = TileId.parse(rec.tile).field
        self._prepare(name)
        log = self.log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            line = _line(rec)
            if os.write(fd, line) != len(line):  # one write: the line is in the log whole, or cut short
                raise OSError(f"{log}: short write (is the disk full?)")
        finally:
            os.close(fd)

    def prune(self, tiles: list[TileId], keys) -> list[str]:
        """Remove the records and tile tables (source and side tables) of tiles that are not among `tiles`
        and were made under another configuration hash than `keys` (a changed tile size or stage list): they
        can never belong to this run; and cut off the last lines that a killed driver's writes cut short.
        Returns the tiles removed."""
        current = {str(t) for t in tiles}
        removed = []
        for name in self.fields():
            f = self._read(name)
            gone = [r.tile for r in f.records.values()
                    if r is not None and r.tile not in current and r.config_hash != keys.config_hash]
            if not gone:
                if f.torn:
                    self._cut_torn(name)
                continue
            for tile in gone:
                tid = TileId.parse(tile)
                for table in (self.root.parent / "tiles" / tid.field).glob(f"{tid.ty}_{tid.tx}.*parquet"):
                    table.unlink(missing_ok=True)  # <ty>_<tx>.parquet and <ty>_<tx>.<side table>.parquet
            drop = set(gone)
            keep = [r for t, r in sorted(f.records.items(), key=lambda kv: _tile_order(kv[0]))
                    if r is not None and t not in drop]
            self._rewrite(name, keep, f.legacy)
            self._ready.discard(name)
            removed += gone
        return removed


def _tile_order(tile: str) -> tuple[int, int]:
    ty, _, tx = tile.rpartition("/")[2].partition("_")
    return int(ty), int(tx)


def _files(directory: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(directory) if e.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _read_legacy(path: Path, tile: str) -> tuple[TileRecord | None, str | None]:
    """(the record in the legacy file `path` of `tile`, or None; the problem, or None)."""
    try:
        rec = TileRecord(**json.loads(path.read_text()))
        TileId.parse(rec.tile)
    except (OSError, ValueError, TypeError) as exc:
        return None, f"{path}: not a readable ledger record ({type(exc).__name__}: {exc})"
    if rec.tile != tile:
        return None, f"{path}: holds the record of tile {rec.tile}"
    return rec, None


def _check(run_dir: str | Path) -> Iterator[tuple[TileRecord | None, str | None]]:
    """(a sound record, None) or (None, a problem) for everything in a run's ledger (see `check`)."""
    import pyarrow.parquet as pq
    ledger = Ledger(run_dir)
    for name in ledger.fields():
        f = ledger._read(name)
        for problem in f.problems:
            yield None, problem
        for tile in sorted(f.records, key=_tile_order):
            rec = f.records[tile]
            if rec is None:
                continue
            where = ledger.legacy_path(TileId.parse(tile))
            where = where if where in f.legacy else ledger.log_path(name)
            if rec.status == "done":
                out = ledger.root.parent / (rec.output or "")
                if not rec.output or not out.is_file():
                    yield None, f"{where}: tile {rec.tile} is done but its table {rec.output} is missing"
                    continue
                try:
                    pq.read_metadata(out)
                except Exception as exc:
                    yield None, (f"{out}: the table of tile {rec.tile} cannot be read "
                                 f"({type(exc).__name__}: {exc})")
                    continue
            yield rec, None


def check(run_dir: str | Path) -> tuple[list[TileRecord], list[str]]:
    """(the readable ledger records of a run, one line per problem): a line of a log or a legacy record file
    that cannot be read or is not a record, a record filed under another tile's name or field, a done record
    whose source table is missing or is not a readable Parquet file (its footer is read)."""
    good, problems = [], []
    for rec, problem in _check(run_dir):
        (good.append(rec) if rec is not None else problems.append(problem))
    return good, problems


def summarise(run_dir: str | Path) -> dict:
    """Counts by status, per-stage total time, sources, the stages' other counts (`counts`: {name: {total, tiles}},
    e.g. the background's `sky_steps`), attempts and the failed tiles' errors, over the records
    that `check` finds sound; its problems under `problems`. The records are counted as they are read, not kept."""
    status, timing, hashes, other, other_tiles = Counter(), Counter(), set(), Counter(), Counter()
    retried = sources = primary = 0
    failed, problems = [], []
    for r, problem in _check(run_dir):
        if r is None:
            problems.append(problem)
            continue
        status[r.status] += 1
        timing.update(r.timings)
        retried += r.attempts > 1
        sources += r.counts.get("sources", 0)
        primary += r.counts.get("primary", 0)
        for k, v in r.counts.items():
            if k not in ("sources", "primary") and v:
                other[k] += v
                other_tiles[k] += 1
        hashes.add(r.config_hash)
        if r.status == "failed":
            failed.append((r.tile, r.error))
    return dict(tiles=sum(status.values()), status=dict(status), retried=retried, sources=sources, primary=primary,
                counts={k: dict(total=other[k], tiles=other_tiles[k]) for k in sorted(other)},
                stage_seconds={k: round(v, 3) for k, v in timing.items()}, failed=failed,
                config_hashes=sorted(hashes), problems=problems)
