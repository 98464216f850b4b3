"""The ledger's per-field logs (tasks/ledger.py): what counts as a record after a write cut short, which tiles a
run skips and merges, pruning, compaction, and ledgers of one JSON file per tile from before the logs, read as
they are and moved into the logs by the first write. No Ray, no Prefect: records and tables made here."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest

from deepfield.tasks.ledger import Ledger, TileRecord, check, summarise
from deepfield.tasks.provenance import RunKeys
from deepfield.tasks.tiling import TileId

KEYS = RunKeys("cfg1", {"detect": "3"}, {}, {"fa": "in-a", "fb": "in-b"})
TILES = [TileId(f, ty, tx) for f in ("fa", "fb") for ty in range(2) for tx in range(2)]


def record(tile: TileId, status: str = "done", keys: RunKeys = KEYS, **kw) -> TileRecord:
    return TileRecord(tile=str(tile), status=status, attempts=kw.pop("attempts", 1), config_hash=keys.config_hash,
                      stage_versions=dict(keys.stage_versions), model_versions=dict(keys.model_versions),
                      input_hash=keys.inputs.get(tile.field, ""), output=f"tiles/{tile.field}/{tile.ty}_{tile.tx}.parquet"
                      if status == "done" else None, counts=kw.pop("counts", dict(sources=2, primary=1)),
                      timings=dict(detect=0.5), **kw)


def table(run: Path, tile: TileId) -> Path:
    path = run / "tiles" / tile.field / f"{tile.ty}_{tile.tx}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(dict(x=[1.0, 2.0])).to_parquet(path)
    return path


def legacy(run: Path, rec: TileRecord) -> Path:
    """A record as the ledger wrote it before the per-field logs (one JSON file per tile)."""
    tid = TileId.parse(rec.tile)
    path = run / "ledger" / tid.field / f"{tid.ty}_{tid.tx}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(rec), indent=1, sort_keys=True))
    return path


@pytest.fixture
def run(tmp_path) -> Path:
    """Every tile done but fb/1_1, failed; every done tile's table there."""
    ledger = Ledger(tmp_path)
    for t in TILES:
        if str(t) == "fb/1_1":
            ledger.put(record(t, "failed", attempts=3, error="RuntimeError: boom"))
        else:
            table(tmp_path, t)
            ledger.put(record(t))
    return tmp_path


def test_records_are_read_back_and_the_run_skips_and_merges_its_done_tiles(run):
    ledger = Ledger(run)
    assert sorted(p.name for p in (run / "ledger").iterdir()) == ["fa", "fb"]
    assert [p.name for p in (run / "ledger" / "fa").iterdir()] == ["records.jsonl"]
    assert ledger.get(TileId("fa", 1, 0)) == replace(record(TileId("fa", 1, 0)), finished_at=ledger.get(
        TileId("fa", 1, 0)).finished_at)
    assert [str(t) for t in ledger.pending(TILES, KEYS)] == ["fb/1_1"]
    tables, missing = ledger.done_tables(TILES, KEYS)
    assert tables == [run / f"tiles/{t.field}/{t.ty}_{t.tx}.parquet" for t in TILES[:-1]] and missing == ["fb/1_1"]
    assert [t.tile for t in ledger.records()] == [str(t) for t in TILES]
    # under other keys nothing is done; a field that is not the run's is not either
    assert ledger.pending(TILES, replace(KEYS, config_hash="cfg2")) == TILES
    assert ledger.pending(TILES, replace(KEYS, inputs={"fa": "in-a"}))[0] == TileId("fb", 0, 0)
    (run / "tiles" / "fa" / "0_1.parquet").unlink()
    assert ledger.pending(TILES, KEYS) == [TileId("fa", 0, 1), TileId("fb", 1, 1)]
    assert not ledger.is_done(TileId("fa", 0, 1), KEYS) and ledger.is_done(TileId("fa", 0, 0), KEYS)


def test_the_last_record_of_a_tile_counts(run):
    ledger = Ledger(run)
    ledger.put(record(TileId("fb", 1, 1), attempts=2))
    table(run, TileId("fb", 1, 1))
    ledger.put(record(TileId("fa", 0, 0), "failed", error="x"))
    assert Ledger(run).pending(TILES, KEYS) == [TileId("fa", 0, 0)]
    assert Ledger(run).get(TileId("fb", 1, 1)).attempts == 2


def test_a_write_cut_short_is_no_record_and_is_cut_off(run):
    log = run / "ledger" / "fb" / "records.jsonl"
    whole = log.read_bytes()
    line = json.dumps(asdict(record(TileId("fb", 1, 1)))).encode()
    table(run, TileId("fb", 1, 1))
    log.write_bytes(whole + line[:-10])  # a kill or a node crash in the middle of an append
    assert Ledger(run).pending(TILES, KEYS) == [TileId("fb", 1, 1)]
    _, problems = check(run)
    assert len(problems) == 1 and "records.jsonl: line 5: an incomplete last record" in problems[0]
    assert Ledger(run).prune(TILES, KEYS) == [] and log.read_bytes() == whole  # the next run's start cuts it off
    log.write_bytes(whole + line[:-10])
    Ledger(run).put(record(TileId("fb", 1, 1)))  # and so does a write
    lines = log.read_bytes().split(b"\n")
    assert lines[:4] == whole.split(b"\n")[:4] and lines[-1] == b"" and len(lines) == 6
    assert Ledger(run).pending(TILES, KEYS) == [] and check(run)[1] == []


def test_unreadable_and_misfiled_lines_are_problems_and_not_records(run):
    log = run / "ledger" / "fa" / "records.jsonl"
    lines = log.read_text().splitlines()
    lines[0] = lines[0][:40]  # fa/0_0
    lines[1] = json.dumps(dict(json.loads(lines[1]), tile="fb/0_1"))  # fa/0_1's line holding another field's tile
    log.write_text("".join(x + "\n" for x in lines))
    ledger = Ledger(run)
    assert ledger.pending(TILES, KEYS) == [TileId("fa", 0, 0), TileId("fa", 0, 1), TileId("fb", 1, 1)]
    s = summarise(run)
    assert s["tiles"] == 6 and s["status"] == {"done": 5, "failed": 1}
    assert "records.jsonl: line 1: not a readable ledger record" in s["problems"][0]
    assert "records.jsonl: line 2: holds the record of tile fb/0_1, of another field" in s["problems"][1]
    assert len(s["problems"]) == 2


def test_summarise_keeps_its_shape(run):
    s = summarise(run)
    assert s == dict(tiles=8, status={"done": 7, "failed": 1}, retried=1, sources=16, primary=8, counts={},
                     stage_seconds={"detect": 4.0}, failed=[("fb/1_1", "RuntimeError: boom")],
                     config_hashes=["cfg1"], problems=[])
    # what the stages counted besides the sources (the background's sky steps): summed, with their tiles
    ledger = Ledger(run)
    for t, n in ((TileId("fa", 0, 0), 2), (TileId("fa", 0, 1), 1), (TileId("fa", 1, 0), 0)):
        ledger.put(record(t, counts=dict(sources=2, primary=1, sky_steps=n)))
    s = summarise(run)
    assert s["counts"] == {"sky_steps": {"total": 3, "tiles": 2}} and s["sources"] == 16
    (run / "tiles" / "fa" / "1_1.parquet").write_bytes(b"PAR1 cut")
    s = summarise(run)
    assert s["tiles"] == 7 and s["problems"] == [
        f"{run / 'tiles/fa/1_1.parquet'}: the table of tile fa/1_1 cannot be read "
        + s["problems"][0].split("cannot be read ", 1)[1]]


def test_prune_removes_other_configurations_outside_the_run(run):
    """A tile of another grid under another configuration goes (record and tables); one of the run, or under
    the run's configuration, stays."""
    ledger = Ledger(run)
    other = replace(KEYS, config_hash="old")
    for t in (TileId("fa", 5, 5), TileId("fb", 7, 7)):
        table(run, t)
        (run / "tiles" / t.field / f"{t.ty}_{t.tx}.clusters.parquet").write_bytes(b"x")
        ledger.put(record(t, keys=other))
    table(run, TileId("fa", 6, 6))
    ledger.put(record(TileId("fa", 6, 6)))  # the run's configuration, outside its tiles: kept
    assert sorted(Ledger(run).prune(TILES, KEYS)) == ["fa/5_5", "fb/7_7"]
    assert not list((run / "tiles").glob("*/5_5*")) and not list((run / "tiles").glob("*/7_7*"))
    assert [r.tile for r in Ledger(run).records() if r.tile.startswith("fa/")] == \
        ["fa/0_0", "fa/0_1", "fa/1_0", "fa/1_1", "fa/6_6"]
    assert Ledger(run).pending(TILES, KEYS) == [TileId("fb", 1, 1)] and check(run)[1] == []


def test_superseded_lines_are_compacted_by_the_next_run(run):
    ledger = Ledger(run)
    for attempt in range(100):
        ledger.put(record(TileId("fa", 0, 0), attempts=attempt + 1))
    log = run / "ledger" / "fa" / "records.jsonl"
    assert len(log.read_text().splitlines()) == 104
    Ledger(run).put(record(TileId("fa", 0, 1), attempts=7))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["tile"], x["attempts"]) for x in lines] == [
        ("fa/0_0", 100), ("fa/0_1", 1), ("fa/1_0", 1), ("fa/1_1", 1), ("fa/0_1", 7)]


def test_a_ledger_of_one_file_per_tile_is_read_and_moved_into_the_logs(tmp_path):
    """A run directory from before the logs keeps its done tiles: read as they are, then moved into the field's
    log by the first write to it (the other field's files stay until it is written)."""
    recs = {str(t): record(t, "failed", error="old failure") if str(t) == "fb/1_1" else record(t) for t in TILES}
    for t in TILES:
        legacy(tmp_path, replace(recs[str(t)], finished_at="2026-11-01T00:00:00Z"))
        if recs[str(t)].status == "done":
            table(tmp_path, t)
    bad = tmp_path / "ledger" / "fa" / "1_0.json"
    bad.write_text("")  # an unreadable record: the tile is not done
    ledger = Ledger(tmp_path)
    assert ledger.pending(TILES, KEYS) == [TileId("fa", 1, 0), TileId("fb", 1, 1)]
    assert ledger.get(TileId("fa", 0, 0)).finished_at == "2026-11-01T00:00:00Z"
    s = summarise(tmp_path)
    assert s["tiles"] == 7 and s["failed"] == [("fb/1_1", "old failure")]
    assert s["problems"] == [f"{bad}: not a readable ledger record (JSONDecodeError: Expecting value: line 1 "
                             "column 1 (char 0))"]
    ledger.put(record(TileId("fa", 1, 0)))  # the run redoes fa/1_0
    assert sorted(p.name for p in (tmp_path / "ledger" / "fa").iterdir()) == ["records.jsonl"]
    assert len(list((tmp_path / "ledger" / "fb").glob("*.json"))) == 4
    assert Ledger(tmp_path).pending(TILES, KEYS) == [TileId("fb", 1, 1)]
    assert Ledger(tmp_path).get(TileId("fa", 0, 0)).finished_at == "2026-11-01T00:00:00Z"
    assert summarise(tmp_path)["tiles"] == 8 and check(tmp_path)[1] == []


def test_a_file_per_tile_counts_over_the_log_while_it_is_there(run):
    """A kill between a migration's new log and the removal of the old files leaves both: the files count (they
    hold the same records); and a file of another tile's record, or an unreadable one, makes its tile not done."""
    ledger = Ledger(run)
    legacy(run, record(TileId("fa", 0, 0), "failed", error="older"))
    legacy(run, record(TileId("fa", 0, 1), "done", keys=KEYS)).write_text(
        json.dumps(asdict(record(TileId("fa", 1, 1)))))  # filed under 0_1
    assert ledger.pending(TILES, KEYS) == [TileId("fa", 0, 0), TileId("fa", 0, 1), TileId("fb", 1, 1)]
    assert ledger.get(TileId("fa", 0, 0)).error == "older" and ledger.get(TileId("fa", 0, 1)) is None
    assert any("0_1.json: holds the record of tile fa/1_1" in p for p in check(run)[1])
    ledger.put(record(TileId("fb", 1, 1)))  # another field: fa's files stay
    assert len(list((run / "ledger" / "fa").glob("*.json"))) == 2
    ledger.put(record(TileId("fa", 0, 0)))
    assert not list((run / "ledger" / "fa").glob("*.json"))
    assert ledger.pending(TILES, KEYS) == [TileId("fa", 0, 1), TileId("fb", 1, 1)]  # fb/1_1 has no table
