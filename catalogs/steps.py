"""Per-stage merge steps: the part of the merge that belongs to one stage (docs/design.md, "Stage").

A stage names its step in `merge_step` ("module:Class" or the class). The merge (catalogs/merge.py) builds
the steps of the run's stages, in the run's stage order, with the configuration each has under the run
configuration's `merge.<stage name>`, and calls them at three points:

1. `prepare(ctx)`, once, before the rows are merged: what the step needs from the whole run (statistics over
   every tile table, the stage's side tables);
2. `partition(df)`, on every Dask partition of the rows the catalog keeps (tile- and field-primary, with
   `source_id`): columns it adds to the catalog. It must not depend on other partitions, and it is pickled
   when the merge runs on a distributed Dask cluster;
3. `write(ctx, flat_dir, staging)`, once, after the catalog's rows are written (`flat_dir`, Parquet): the
   extra outputs it writes into `staging` (published beside the catalog atomically by the merge), and what
   goes into the merge summary.

`report(summary)` gives the lines `deepfield run` prints about the step's outputs.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from deepfield.tasks.stages.base import config_error
from deepfield.tasks.stages.registry import stage_class
from deepfield.tasks.tile_runner import side_table

__all__ = ["MERGE_VERSION", "MergeStep", "MergeStepConfig", "MergeContext", "StepResult", "merge_step_class", "build_steps",
           "report_lines"]


# bumped when the merge's own code (catalogs/merge.py, dedup.py, calibrate.py, exports.py) changes what the
# catalogs hold: part of the merge key (flows/merge.py), with the merge steps' versions and the schema's text, so
# that a re-run with the new code merges again. Kept here, not in catalogs/merge.py, whose imports (Dask, hats)
# cost a second that a run with up-to-date catalogs does not pay
MERGE_VERSION = "1"


class MergeStepConfig(BaseModel):
    """Base of a merge step's configuration (`merge.<stage>` in the run configuration); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class MergeContext:
    """What a merge step may look at: the run directory, the source tables of the tiles being merged, their
    columns, and the store (None when the merge has none)."""

    run_dir: Path
    tile_tables: list[Path]
    columns: list[str]
    store_path: Path | None = None

    def side_tables(self, name: str) -> list[Path]:
        """The existing side tables `name` beside the merged tile tables (tasks.tile_runner.side_table)."""
        return [p for p in (side_table(f, name) for f in self.tile_tables) if p.exists()]


@dataclass
class StepResult:
    """What a step's `write` made: summary entries (merged into the merge summary) and its files, by key, as
    names inside the staging directory (published under the same names beside the catalog)."""

    summary: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


class MergeStep:
    """A stage's step of the merge (module docstring). Subclasses set `stage` and `Config`."""

    stage: ClassVar[str] = ""
    Config: ClassVar[type[MergeStepConfig]] = MergeStepConfig
    # bumped when the step's code changes what it writes: it is part of the run's provenance and of the merge key
    # (flows/merge.py), so that a re-run with the new code merges again instead of keeping the catalogs it finds
    version: ClassVar[str] = "1"

    def __init__(self, config: MergeStepConfig | None = None, stage_config: BaseModel | None = None, **params):
        self.config = config if config is not None else self.configure(params)
        self.stage_config = stage_config

    @classmethod
    def configure(cls, params: dict | None = None) -> MergeStepConfig:
        """The validated configuration; StageConfigError (one line per problem) naming `merge.<stage>`."""
        try:
            return cls.Config.model_validate(dict(params or {}))
        except ValidationError as exc:
            raise config_error(f"merge.{cls.stage}", cls.Config, exc) from None

    def prepare(self, ctx: MergeContext) -> None:
        """Once, before the partitions."""

    def partition(self, df: pd.DataFrame) -> pd.DataFrame:
        """One partition of the catalog's rows, with this step's columns added."""
        return df

    def write(self, ctx: MergeContext, flat_dir: Path, staging: Path) -> StepResult:
        """Once, after the catalog's rows are in `flat_dir`: extra outputs into `staging`."""
        return StepResult()

    def report(self, summary: dict, paths: dict[str, str]) -> list[str]:
        """Lines for the user about this step's outputs (the merge summary and the published paths)."""
        return []


def merge_step_class(stage: str) -> type[MergeStep] | None:
    """The merge step class the stage registered as `stage` declares, or None."""
    ref = stage_class(stage).merge_step
    if ref is None or isinstance(ref, type):
        cls = ref
    else:
        module, _, attr = str(ref).partition(":")
        cls = getattr(importlib.import_module(module), attr)
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, MergeStep)):
        raise ValueError(f"stage {stage!r}: its merge_step {ref!r} is not a deepfield.catalogs.steps.MergeStep")
    return cls


def build_steps(stages: list[tuple[str, Any]], configs: dict[str, dict] | None = None) -> list[MergeStep]:
    """The merge steps of `stages` ([(name, stage configuration or params)], run order) with their
    configurations `configs` (stage name -> params; ValueError for a name that is not a stage of the run with
    a merge step)."""
    configs = dict(configs or {})
    steps = []
    for name, stage_cfg in stages:
        cls = merge_step_class(name)
        if cls is None:
            continue
        steps.append(cls(cls.configure(configs.pop(name, {})), stage_class(name).configure(stage_cfg)))
    if configs:
        with_steps = [n for n, _ in stages if merge_step_class(n) is not None]
        raise ValueError(f"merge: {', '.join(sorted(configs))}: not a stage of this run with a merge step "
                         f"(those are: {', '.join(with_steps) or 'none'})")
    return steps


def report_lines(steps, summary: dict) -> list[str]:
    """The lines the `steps` give about their outputs, in step order, for a merge `summary` with its `paths`."""
    return [line for step in steps for line in step.report(summary, summary["paths"])]
