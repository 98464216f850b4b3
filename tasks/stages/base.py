"""The stage contract (docs/design.md, "Stage").

A stage is a named unit of work on one tile. Its class declares, before anything runs:
- `Config`: its typed configuration (a pydantic model; unknown or mistyped keys are errors), validated when
  the run configuration is loaded, before Ray starts;
- `reads`: the source-table columns it needs from the stages before it, and `adds`: the columns it adds
  ("{band}" stands for every band it works on); the registry checks a stage list's order with them;
- `side_tables`: the per-tile tables other than the source table it writes (`tile.tables[name]`, written by
  the tile runner to `<ty>_<tx>.<name>.parquet`);
- `models`: the registry names of the networks it runs (their versions go into the ledger);
- `merge_step`: optionally, its own step of the merge (ranking, de-duplication, extra outputs), as
  "module:Class" or the class, a `deepfield.catalogs.steps.MergeStep` with its own configuration;
and an instance says which bands it needs (`required_bands`; None: it works on whatever bands a field has).

`setup(device)` is called once per actor (load models there); `run(tile, sources)` once per tile with the
tile's pixels (a `tasks.zarr_read.Tile`, with halo) and the source table built so far by the earlier
stages; it returns the table with its new columns or rows. Adding a science stage means one new module and
one registry entry (`tasks.stages.registry`), not a change to the runner or the merge. Inside a run, the tile
runner gives every stage `shared_dir`, a directory all the run's actors share, for results that many tiles
use and that one actor should compute for all (as the cluster stage's field-level detections).
"""
from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Optional

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["Stage", "StageConfig", "ModelStage", "ModelStageConfig", "StageConfigError", "config_error",
           "expand_columns"]


class StageConfigError(ValueError):
    """A stage's configuration is invalid; the message is one line naming the stage and the key."""


class StageConfig(BaseModel):
    """Base of every stage's configuration: keys are the stage's parameters; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def config_error(what: str, config_cls: type[BaseModel], exc: ValidationError) -> StageConfigError:
    """One line per problem of a `config_cls` validation, each naming `what` (e.g. "stage 'detect'") and the
    key; an unknown key gets the closest known one suggested and the list of known keys."""
    known = list(config_cls.model_fields)
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(configuration)"
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][0]), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"{what}: unknown parameter {key!r}{hint} (parameters: {', '.join(known) or 'none'})")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{what}: parameter {key!r}: {msg} (got {err.get('input')!r})")
    return StageConfigError("\n".join(lines))


def expand_columns(templates, bands) -> list[str]:
    """Column names of `templates` with "{band}" replaced by each of `bands` (others as they are)."""
    out = []
    for t in templates:
        out += [t.format(band=b) for b in bands] if "{band}" in t else [t]
    return out


class Stage(ABC):
    """Base of every stage: a typed configuration and the declarations of the module docstring."""

    name: ClassVar[str]
    version: ClassVar[str]  # bump when the stage's output changes; recorded in the ledger
    Config: ClassVar[type[StageConfig]] = StageConfig
    reads: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()
    side_tables: ClassVar[tuple[str, ...]] = ()
    models: ClassVar[tuple[str, ...]] = ()
    merge_step: ClassVar[Any] = None  # "module:Class", a MergeStep class, or None
    # a directory that every actor of a run shares (<run directory>/cache/<stage name>, set by the tile runner),
    # where a stage may keep a result that many tiles use (the cluster stage's field-level detections); None
    # outside a run
    shared_dir: Path | None = None

    def __init__(self, config: StageConfig | None = None, **params: Any):
        if config is not None and params:
            raise TypeError(f"stage {self.name!r}: give a configuration or parameters, not both")
        self.config = config if config is not None else self.configure(params)
        vars(self).update(dict(self.config))  # the parameters as attributes: self.thresh, ...

    @classmethod
    def configure(cls, params: dict | None = None) -> StageConfig:
        """The validated configuration for `params`; StageConfigError (one line per problem) when invalid."""
        if isinstance(params, cls.Config):
            return params
        try:
            return cls.Config.model_validate(dict(params or {}))
        except ValidationError as exc:
            raise config_error(f"stage {cls.name!r}", cls.Config, exc) from None

    @classmethod
    def sky_reach_arcsec(cls, config: StageConfig) -> float:
        """How far beyond its own field (arcsec) the stage reads other fields' pixels: a tile's result then also
        depends on the fields within that reach, and a re-ingest of one of them redoes the tile (tasks/provenance.py).
        0 for stages that read only their own tile."""
        return 0.0

    @classmethod
    def used_models(cls, config: StageConfig) -> tuple[str, ...]:
        """The models a stage of this configuration runs, the one it builds first (`models` by default; a stage
        whose configuration chooses among its models narrows it). `weights` and `variant` apply to the first."""
        return cls.models

    @classmethod
    def weights_given(cls, config: StageConfig, model: str) -> str | None:
        """The weights file the configuration gives for `model` instead of the shipped weights (its `weights`,
        which applies to the first of used_models), None for the shipped ones or a band-set variant."""
        models = cls.used_models(config)
        return getattr(config, "weights", None) if models and model == models[0] else None

    @classmethod
    def upstream_problem(cls, config: StageConfig, before: dict[str, StageConfig]) -> str | None:
        """Why this stage's configuration cannot follow the stages before it in a run (`before`: name -> their
        validated configurations), beyond the columns that `reads` and `adds` check: for example weights made on
        photometry that the configured measure stage does not produce; None when it can."""
        return None

    def required_bands(self) -> list[str] | None:
        """The bands this stage needs in every field, or None when it works on whatever bands a field has."""
        return None

    def band_problem(self, have: list[str]) -> str | None:
        """Why a field with the bands `have` cannot go through this stage, beyond `required_bands` (a stage that
        needs some but not all of a set); None when it can."""
        return None

    def setup(self, device: str) -> None:
        """Load models or tables once per actor; `device` is "cpu" or "cuda:0"."""

    @abstractmethod
    def run(self, tile, sources: pd.DataFrame) -> pd.DataFrame:
        """Return `sources` with this stage's columns (or rows) added."""

    def require(self, sources: pd.DataFrame, bands) -> None:
        """ValueError naming what is missing when `sources` lacks a column this stage reads (over `bands`)."""
        missing = [c for c in expand_columns(self.reads, bands) if c not in sources.columns]
        if missing:
            raise ValueError(f"{self.name} stage needs the columns {missing} from the stages before it "
                             f"(it reads {', '.join(self.reads)})")


class ModelStageConfig(StageConfig):
    weights: Optional[str] = Field(None, description="weights file to run instead of the shipped weights")
    variant: Optional[str] = Field(None, description="band set of the shipped weights to run ('' the main "
                                   "weights, 'grz' models/weights/<model>.grz.pt, ...); none: chosen before the run, "
                                   "the variant with the most bands that every field has")

    def weights_file(self, model: str) -> str | None:
        """The weights file of `model` this configuration runs: `weights`, else the `variant`'s (None: the
        main weights)."""
        if self.weights is not None:
            return self.weights
        if self.variant:
            from deepfield.models.registry import variant_weights
            return str(variant_weights(model, self.variant))
        return None


class ModelStage(Stage):
    """Base of the stages that run a network of the model registry (the first name in `models`): the network
    is built once per actor in `setup`, on the actor's device, with the shipped weights or the `weights`
    file of the configuration."""

    Config: ClassVar[type[StageConfig]] = ModelStageConfig

    def __init__(self, config: StageConfig | None = None, **params: Any):
        super().__init__(config, **params)
        self.model = None
        self.device = "cpu"

    @property
    def model_name(self) -> str:
        """The registry name of the network this stage builds and runs."""
        return self.used_models(self.config)[0]

    def model_bands(self) -> list[str]:
        """The bands the stage's network takes, in channel order (from its weights' training record)."""
        from deepfield.models.registry import input_bands
        return input_bands(self.model_name, self.config.weights_file(self.model_name))

    def training_record(self) -> dict:
        """The training record of the weights the stage runs (no torch needed)."""
        from deepfield.models.registry import training_record
        return training_record(self.model_name, self.config.weights_file(self.model_name))

    def required_bands(self) -> list[str] | None:
        return self.model_bands()

    def setup(self, device: str) -> None:
        from deepfield.models.registry import create_model
        self.device = device
        self.model = create_model(self.model_name, device=device, weights=self.config.weights_file(self.model_name))

    def inference_batch(self) -> int:
        """Network inputs per batch: the configuration's `batch` on the CPU or where the user set it, else on a
        GPU the model's GPU batch size (models.registry.gpu_settings, chosen by tests/benchmarks/bench_models.py)."""
        batch = int(getattr(self.config, "batch", 1))
        if self.device == "cpu" or "batch" in self.config.model_fields_set:
            return batch
        from deepfield.models.registry import gpu_settings
        return int(gpu_settings(self.model_name).batch)

    def ensure_setup(self) -> None:
        """Set the model up on the stage's device when `setup` has not been called (a stage used directly)."""
        if self.model is None:
            self.setup(self.device)
