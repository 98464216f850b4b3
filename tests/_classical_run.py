"""The fault and resume tests' run of the session's survey with the classical stages (tests/_stages.py): its
configuration, its catalog, a copy of its run directory, a ledger record edited by hand. The run itself is the
session fixture `clean` (tests/conftest.py), shared by the workers: tests copy its directory before changing it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from deepfield.flows.run_config import RunConfig
from deepfield.tasks.ingest_config import StoreSpec
from _stages import CLASSICAL_STAGES


def config(survey: Path, run_dir: Path, tile: int = 512, inputs: Path | None = None) -> RunConfig:
    return RunConfig.model_validate(dict(inputs=inputs or survey / "manifest.yaml", run_dir=run_dir,
                                         store_layout=StoreSpec(tile=tile, chunk=128), halo=32, stages=CLASSICAL_STAGES))


def flat_catalog(path: Path | str) -> pd.DataFrame:
    """The flat source catalog at `path` (RUN/catalogs/sources_flat), sorted by source_id."""
    return pd.read_parquet(path).sort_values("source_id").reset_index(drop=True)


def catalog(summary: dict) -> pd.DataFrame:
    """The run's flat source catalog, from its summary, sorted by source_id."""
    return flat_catalog(summary["merge"]["paths"]["parquet"])


def copy_run(clean_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(clean_dir, dst, symlinks=True)
    return dst


def edit_record(run_dir: Path, tile: str, line: str | None) -> Path:
    """The line of `tile`'s record in its field's ledger log (tasks/ledger.py) replaced by `line` (None: removed);
    the log's path."""
    log = run_dir / "ledger" / tile.partition("/")[0] / "records.jsonl"
    lines = log.read_text().splitlines()
    at = [i for i, x in enumerate(lines) if json.loads(x)["tile"] == tile]
    assert len(at) == 1, at
    lines[at[0]:at[0] + 1] = [] if line is None else [line]
    log.write_text("".join(x + "\n" for x in lines))
    return log
