"""What a re-run of a run directory reuses and what it redoes, and the actor faults a run survives: a merge
with nothing changed keeps the catalogs, killed actors are replaced, a tile failing three times is marked failed,
a stop request and the resume, every branch of the ledger's skip logic, a changed stage parameter. Each is checked
against the clean run (the session fixture `clean`: the session's two-field survey with the classical stages,
tiles of 512 px)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from deepfield.flows.run_config import RunConfig
from _classical_run import catalog, config, copy_run, edit_record
from _stages import CLASSICAL_STAGES


def test_a_merge_with_nothing_changed_keeps_the_catalogs_unless_one_is_damaged_or_a_table_rewritten(
        survey, clean, tmp_path):
    """The merge task with the tables of the last merge keeps its published catalogs and report (their files
    untouched); a flat catalog part or a HATS partition cut short, or a tile table written again, makes it merge
    again, to the clean run's catalog."""
    import os

    from deepfield.flows.merge import merge_task
    clean_dir, reference = clean
    run_dir = copy_run(clean_dir, tmp_path)  # other paths than the clean run's: merged once more
    cfg = config(survey, run_dir)
    fields = ["field000", "field001"]
    first = merge_task.fn(cfg, fields)
    assert not first.get("up_to_date")
    flat = Path(first["paths"]["parquet"])
    parts = sorted(flat.glob("*.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in [*parts, Path(first["paths"]["report"])]}
    same = merge_task.fn(cfg, fields)
    assert same["up_to_date"] and same["rows_out"] == first["rows_out"] == len(reference)
    assert same["paths"] == first["paths"] and same["missing_tiles"] == [] and same["ignored_tables"] == []
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing written again
    with open(parts[0], "r+b") as f:  # a part cut short: its footer is gone
        f.truncate(parts[0].stat().st_size // 2)
    repaired = merge_task.fn(cfg, fields)
    assert not repaired.get("up_to_date")
    pd.testing.assert_frame_equal(catalog(dict(merge=repaired)), reference)
    partition = sorted(Path(repaired["paths"]["hats"]).glob("sources/dataset/Norder=*/Dir=*/Npix=*.parquet"))[0]
    partition.write_bytes(partition.read_bytes()[:100])  # a HATS partition cut short
    assert merge_task.fn(cfg, fields).get("up_to_date") is None
    assert merge_task.fn(cfg, fields)["up_to_date"]  # and whole again
    table = run_dir / "tiles" / "field001" / "1_0.parquet"  # as a redone tile's table would be
    os.utime(table, ns=(table.stat().st_atime_ns, table.stat().st_mtime_ns + 10**9))
    assert not merge_task.fn(cfg, fields).get("up_to_date")


def _tables_equal(a: Path, b: Path) -> None:
    for t in sorted((a / "tiles").glob("*/*.parquet")):
        pd.testing.assert_frame_equal(pd.read_parquet(t), pd.read_parquet(b / t.relative_to(a)))


def _run_tiles_with_fault(survey: Path, clean_dir: Path, tmp_path: Path, fault: str) -> tuple[Path, dict]:
    """The tiles of a copy of the clean run's store processed again with DEEPFIELD_FAULT=`fault` in the
    actors; (run directory, summary)."""
    from deepfield.tasks.actor_pool import run_tiles
    run_dir = tmp_path / "run"
    shutil.copytree(clean_dir / "store.zarr", run_dir / "store.zarr")
    cfg = config(survey, run_dir)
    return run_dir, run_tiles(str(cfg.store_path), str(run_dir), cfg.stage_list(), cfg.halo, cfg.processing_hash(),
                              actor_env={"DEEPFIELD_FAULT": fault})


def test_killed_actor_is_replaced_and_the_tables_are_unchanged(survey, clean, tmp_path, ray_session):
    """Actor processes that die mid-tile (one while it writes the tile's table) are replaced, the tiles retried,
    every tile table equals the clean run's, and no temporary file is left."""
    from deepfield.tasks.ledger import Ledger
    from deepfield.tasks.tiling import TileId
    clean_dir, _ = clean
    run_dir, s = _run_tiles_with_fault(survey, clean_dir, tmp_path, "kill:field000/0_1,killwrite:field001/1_0")
    assert s["done"] == 8 and s["failed"] == 0 and s["retries"] >= 2
    for tile in ("field000/0_1", "field001/1_0"):
        assert Ledger(run_dir).get(TileId.parse(tile)).attempts >= 2
    _tables_equal(clean_dir, run_dir)
    # the actor killed while writing field001/1_0's table left its temporary file; the run removed it
    assert not [p for p in (run_dir / "tiles").rglob("*") if p.name.endswith(".tmp")]


def test_tile_failing_three_times_is_marked_failed(survey, clean, tmp_path, ray_session):
    from deepfield.tasks.ledger import summarise
    clean_dir, _ = clean
    run_dir, s = _run_tiles_with_fault(survey, clean_dir, tmp_path, "raise:field001/1_0")
    assert s["failed"] == 1 and s["done"] == 7
    failed = summarise(run_dir)["failed"]
    assert failed[0][0] == "field001/1_0" and "injected failure" in failed[0][1]


def test_stop_and_resume_in_process(survey, clean, tmp_path, prefect_harness, ray_session):
    """A stop request (what SIGUSR1 gives) after the second tile: dispatching stops, the tiles in flight
    finish, the merge is skipped; the next run does the rest and gives the clean catalog."""
    from deepfield.flows.run import run_flow
    from deepfield.tasks import actor_pool
    clean_dir, reference = clean
    run_dir = tmp_path / "run"
    cfg = config(survey, run_dir).model_copy(update={"ray": config(survey, run_dir).ray.model_copy(
        update={"num_actors": 1, "in_flight_per_actor": 1})})
    real = actor_pool.run_tiles

    def stopping(*args, progress=None, **kwargs):
        def progress_and_stop(done, total, msg):
            if done >= 2:
                actor_pool.request_stop()
            if progress:
                progress(done, total, msg)
        return real(*args, progress=progress_and_stop, **kwargs)

    import deepfield.flows.process as process_mod
    process_mod.run_tiles = stopping
    try:
        first = run_flow(cfg)
    finally:
        process_mod.run_tiles = real
        actor_pool.clear_stop()
    assert first["stopped"] and first["merge"] == {} and 2 <= first["process"]["done"] < 8
    again = run_flow(cfg)
    assert not again["stopped"] and again["process"]["skipped"] == first["process"]["done"]
    assert again["process"]["done"] == 8 - first["process"]["done"]
    pd.testing.assert_frame_equal(catalog(again), reference)


def test_every_branch_of_the_skip_logic(clean, tmp_path):
    """A done tile is reused only under the same keys with its table present: a changed configuration hash,
    stage version, model version or input fingerprint, a missing table, a failed (also when a later line), corrupt
    or misfiled record each make it redone; a last line cut short is no record."""
    import dataclasses
    import json

    from deepfield.tasks.ledger import Ledger
    from deepfield.tasks.provenance import RunKeys
    from deepfield.tasks.tiling import TileId
    run_dir = copy_run(clean[0], tmp_path)  # the shared clean run stays as it is
    ledger = Ledger(run_dir)
    tile = TileId("field000", 0, 0)
    rec = ledger.get(tile)
    keys = RunKeys(rec.config_hash, dict(rec.stage_versions), dict(rec.model_versions),
                   {"field000": rec.input_hash, "field001": "x"})
    assert ledger.is_done(tile, keys)
    assert not ledger.is_done(tile, dataclasses.replace(keys, config_hash="other"))
    other = dict(keys.stage_versions, detect=keys.stage_versions["detect"] + "-changed")  # whatever the version is
    assert not ledger.is_done(tile, dataclasses.replace(keys, stage_versions=other))
    assert not ledger.is_done(tile, dataclasses.replace(keys, model_versions={"lens_resnet": "abc"}))
    assert not ledger.is_done(tile, dataclasses.replace(keys, inputs={"field000": "changed"}))
    assert not ledger.is_done(tile, dataclasses.replace(keys, inputs={"field001": "x"}))  # not a field of the run
    path, table = ledger.log_path("field000"), run_dir / rec.output
    saved_log, saved_table = path.read_bytes(), table.read_bytes()
    saved_rec = next(x for x in saved_log.decode().splitlines() if json.loads(x)["tile"] == str(tile))
    table.unlink()
    assert not ledger.is_done(tile, keys)
    table.write_bytes(saved_table)
    edit_record(run_dir, str(tile), json.dumps(dict(json.loads(saved_rec), status="failed")))
    assert not ledger.is_done(tile, keys)
    path.write_bytes(saved_log)
    with open(path, "a") as f:  # a later record that says failed: the last record counts
        f.write(json.dumps(dict(json.loads(saved_rec), status="failed")) + "\n")
    assert not ledger.is_done(tile, keys)
    path.write_bytes(saved_log)
    edit_record(run_dir, str(tile), saved_rec[: len(saved_rec) // 2])
    assert not ledger.is_done(tile, keys)
    path.write_bytes(saved_log)
    edit_record(run_dir, str(tile), json.dumps(dict(json.loads(saved_rec), tile="field001/0_0")))
    assert not ledger.is_done(tile, keys)  # a record of another field's tile is none of this field's
    path.write_bytes(saved_log + saved_rec.replace("done", "failed").encode()[:-3])
    assert ledger.is_done(tile, keys)  # a last line cut short (no newline) is not a record
    path.write_bytes(saved_log)
    assert ledger.is_done(tile, keys)


def test_a_changed_stage_parameter_redoes_every_tile(survey, clean, tmp_path, prefect_harness, ray_session):
    from deepfield.flows.run import run_flow
    clean_dir, reference = clean
    run_dir = copy_run(clean_dir, tmp_path)
    params = {"method": "sep", "thresh": 3.0}
    stages = [dict(s, params=params) if s["name"] == "detect" else s for s in CLASSICAL_STAGES]
    cfg = RunConfig.model_validate(dict(config(survey, run_dir).model_dump(), stages=stages))
    s = run_flow(cfg)
    assert s["process"]["done"] == 8 and s["process"]["skipped"] == 0
    assert 0 < s["merge"]["rows_out"] < 0.75 * len(reference)  # a higher threshold, fewer sources (689 of 1093)


def test_actors_started_ahead_take_the_run_only_with_its_own_arguments(survey, clean, tmp_path, prefect_harness,
                                                                       ray_session):
    """`deepfield run` starts the actor pool before its flow when the store already holds the inputs' fields
    (flows/prestart.py). A re-run's redone tiles are processed by those very actors (their ledger records name
    the actors' processes) and the catalog is the clean run's; actors started for other arguments (another halo)
    are stopped, the run's own actors do the tiles, and the catalog is again the clean run's."""
    import json

    import pytest
    import ray

    from deepfield.flows.prestart import prestart_pool
    from deepfield.flows.run import run_flow
    from deepfield.tasks import actor_pool
    clean_dir, reference = clean
    run_dir = copy_run(clean_dir, tmp_path)
    cfg = config(survey, run_dir)
    redo = ["field000/0_1", "field001/1_0"]
    for other in (False, True):
        for t in redo:
            edit_record(run_dir, t, None)
        assert prestart_pool(cfg.model_copy(update={"halo": 48}) if other else cfg) == 2
        ahead = [a for actors in actor_pool._prestarted.values() for a in actors]
        pids = {ray.get(a.info.remote())["pid"] for a in ahead}
        summary = run_flow(cfg)
        assert summary["process"]["done"] == 2 and not actor_pool._prestarted
        records = [json.loads(line) for f in ("field000", "field001")
                   for line in (run_dir / "ledger" / f / "records.jsonl").read_text().splitlines()]
        workers = {r["worker"]["pid"] for r in records if r["tile"] in redo}
        if other:
            assert not workers & pids
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(ahead[0].info.remote())
        else:
            assert workers <= pids and workers
        pd.testing.assert_frame_equal(catalog(summary), reference)


def test_a_runner_started_before_the_ingest_reads_the_field_as_the_ingest_left_it(survey, clean, tmp_path):
    """An actor started ahead (flows/prestart.py) opened the store before the run's ingest; run_tiles makes it
    reopen the store before its first tile. A runner made, then field000 rewritten with another field's inputs,
    then reopened, writes the same table as a runner made after the rewrite, and not the old field's."""
    from deepfield.tasks.ingest import ingest_one
    from deepfield.tasks.ingest_config import load_ingest_config
    from deepfield.tasks.tile_runner import TileRunner
    clean_dir, _ = clean
    run_dir = copy_run(clean_dir, tmp_path)
    cfg = config(survey, run_dir)
    store = str(cfg.store_path)
    early = TileRunner(store, str(tmp_path / "early"), cfg.stage_list(), cfg.halo)
    early.process("field000/0_0")
    table = "tiles/field000/0_0.parquet"
    old = pd.read_parquet(tmp_path / "early" / table)
    spec = load_ingest_config(cfg.inputs, store=cfg.store_layout).fields[1].model_copy(update={"name": "field000"})
    assert ingest_one(spec, store, cfg.store_layout)["status"] == "ingested"
    early.reopen()
    early.process("field000/0_0")
    late = TileRunner(store, str(tmp_path / "late"), cfg.stage_list(), cfg.halo)
    late.process("field000/0_0")
    a, b = pd.read_parquet(tmp_path / "early" / table), pd.read_parquet(tmp_path / "late" / table)
    pd.testing.assert_frame_equal(a, b)
    # field001's pixels and sky now: its own tile's sources, under field000's name
    other = pd.read_parquet(clean_dir / "tiles/field001/0_0.parquet")
    same = [c for c in other.columns if c not in ("field", "tile")]
    pd.testing.assert_frame_equal(a[same], other[same])
    assert len(a) != len(old) or not a[same].equals(old[same])


def test_tiles_are_handed_out_one_field_at_a_time_in_turn():
    """The driver's order (tasks.actor_pool.fields_in_turn): one tile of each field in turn, each field's tiles
    in their own order, a field with fewer tiles dropping out; every tile once."""
    from deepfield.tasks.actor_pool import fields_in_turn
    from deepfield.tasks.tiling import TileId
    tiles = [TileId("b", 0, k) for k in range(3)] + [TileId("a", 1, k) for k in range(5)] + [TileId("c", 0, 0)]
    got = [f"{t.field}{t.tx}" for t in fields_in_turn(tiles)]
    assert got == ["b0", "a0", "c0", "b1", "a1", "b2", "a2", "a3", "a4"]
    assert fields_in_turn([]) == []
