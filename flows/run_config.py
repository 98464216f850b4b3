"""`deepfield run survey.yaml`: the validated configuration of a whole run (ingest -> process -> merge).
Every key is documented in the README ("Run configuration").

Everything is checked when the file is loaded, before Ray or Prefect start: unknown keys anywhere, every
stage's parameters against its typed configuration, every merge step's against its own, and the stage
order against the columns the stages declare they read and add. Each problem is one line naming the file,
the stage (or merge step) and the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deepfield.catalogs.steps import build_steps
from deepfield.tasks.ingest_config import StoreSpec
from deepfield.tasks.provenance import processing_hash
from deepfield.tasks.stages.registry import DEFAULT_STAGES, check_order, check_upstream, load_plugins, stage_class
from deepfield.tasks.yaml_io import read_mapping, relative_to_file

# merge keys of deepfield 0.1 that moved under their stage's merge step
_MOVED_MERGE_KEYS = {"lens_threshold": "merge.lens.threshold", "anomaly_top": "merge.anomaly.top",
                     "anomaly_stamp": "merge.anomaly.stamp", "cluster_nms_mpc": "merge.cluster.nms_mpc"}


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="stage name from the registry")
    params: dict[str, Any] = Field(default_factory=dict, description="the stage's parameters (its typed "
                                   "configuration, tasks/stages/*.py and the README's stage table)")

    @model_validator(mode="after")
    def _valid(self) -> "StageSpec":
        # the full configuration with defaults, validated now: a mistyped key fails here, not on every tile
        self.params = stage_class(self.name).configure(self.params).model_dump(mode="json")
        return self


class RaySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: Optional[str] = Field(None, description="Ray cluster address ('auto', 'ray://host:10001'); "
                                                     "none: start a local Ray")
    num_actors: Optional[int] = Field(None, ge=1, description="CPU actors when there is no GPU (default: cores)")
    use_gpus: bool = Field(True, description="one actor per GPU when the cluster has GPUs")
    in_flight_per_actor: int = Field(2, ge=1, le=64, description="tiles queued per actor at most")
    max_attempts: int = Field(3, ge=1, le=10, description="attempts before a tile is marked failed")
    stop_grace: float = Field(600.0, ge=0, description="after a stop request (SIGUSR1), seconds to wait for "
                              "the tiles in flight before releasing them to the next run")
    actor_start_timeout: float = Field(120.0, gt=0, description="seconds a replacement actor may take to start "
                                       "before its slot is given up (its node lost) and the others take its tiles")


class DaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: Optional[str] = Field(None, description="Dask scheduler address for the merge "
                                                     "('tcp://host:8786'); none: a local threads-only cluster")


class MergeSpec(BaseModel):
    """`merge`: `fits_export`, `report_top`, and per stage with a merge step, `<stage name>: {its parameters}`."""

    model_config = ConfigDict(extra="forbid")

    fits_export: bool = Field(True, description="also write the source catalog as a FITS table")
    report_top: int = Field(50, ge=1, description="candidates shown per list (lenses, anomalies, clusters) in "
                            "the review report RUN/report/index.html")
    steps: dict[str, dict[str, Any]] = Field(default_factory=dict, description="stage name -> parameters of "
                                             "its merge step (written in YAML as merge.<stage name>)")

    @model_validator(mode="before")
    @classmethod
    def _gather_steps(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "steps" in data:
            return data
        moved = [k for k in data if k in _MOVED_MERGE_KEYS]
        if moved:
            raise ValueError("; ".join(f"merge.{k} is now {_MOVED_MERGE_KEYS[k]}" for k in moved))
        common = {k: v for k, v in data.items() if k in cls.model_fields}
        return dict(common, steps={k: v for k, v in data.items() if k not in cls.model_fields})

    @field_validator("steps")
    @classmethod
    def _mappings(cls, v: dict) -> dict:
        bad = [k for k, p in v.items() if not isinstance(p, dict)]
        if bad:
            raise ValueError(f"merge.{bad[0]} must be a mapping of the stage's merge-step parameters")
        return v


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Path = Field(description="ingest configuration or `deepfield simulate` manifest.yaml")
    run_dir: Path = Field(description="where the store, tile outputs, ledger and catalogs go")
    store: Optional[Path] = Field(None, description="Zarr store (default: RUN_DIR/store.zarr)")
    store_layout: StoreSpec = Field(default_factory=StoreSpec)
    halo: int = Field(64, ge=0, le=2048, description="pixels read around each tile core")
    plugins: list[str] = Field(default_factory=list, description="modules or .py files that register stages "
                               "from outside deepfield; imported by the driver and by every actor")
    stages: list[StageSpec] = Field(default_factory=lambda: [StageSpec(name=n) for n in DEFAULT_STAGES])
    missing_bands: Literal["error", "skip"] = Field("error", description="a stage that no shipped weights let run "
                                                    "on the survey's bands: error (exit 2 before any tile, naming "
                                                    "the stage and the bands) or skip (the run goes on without "
                                                    "it, with a line saying why)")
    ray: RaySpec = Field(default_factory=RaySpec)
    dask: DaskSpec = Field(default_factory=DaskSpec)
    merge: MergeSpec = Field(default_factory=MergeSpec)

    @model_validator(mode="before")
    @classmethod
    def _load_plugins(cls, data: Any) -> Any:
        # before the stages are validated: a plugin's stages must be in the registry by then
        if isinstance(data, dict) and data.get("plugins"):
            load_plugins([str(p) for p in data["plugins"]])
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stages: {', '.join(dup)} listed more than once")
        check_order(names)
        check_upstream(self.stage_list())  # e.g. photo-z weights made on another measure stage's photometry
        build_steps(self.stage_list(), self.merge.steps)  # each merge step's parameters, and only real ones
        return self

    @property
    def store_path(self) -> Path:
        return self.store or (self.run_dir / "store.zarr")

    def stage_list(self) -> list[tuple[str, dict]]:
        """[(stage name, its full configuration)] in run order."""
        return [(s.name, dict(s.params)) for s in self.stages]

    def merge_steps(self) -> list:
        """The merge steps of the run's stages, configured (catalogs.steps.build_steps)."""
        return build_steps(self.stage_list(), self.merge.steps)

    def with_stages(self, stages: list[tuple[str, dict]]) -> "RunConfig":
        """A copy that runs `stages` ([(name, params)], e.g. as resolved for the survey's bands), with the merge
        parameters of the stages left out dropped."""
        names = {n for n, _ in stages}
        merge = self.merge.model_copy(update={"steps": {k: v for k, v in self.merge.steps.items() if k in names}})
        return self.model_copy(update={"stages": [StageSpec(name=n, params=p) for n, p in stages], "merge": merge})

    def with_addresses(self, ray_address: str | None = None, dask_address: str | None = None) -> "RunConfig":
        """A copy that reaches the given Ray cluster and Dask scheduler (None: keep the configured one)."""
        ray = self.ray.model_copy(update={"address": ray_address}) if ray_address else self.ray
        dask = self.dask.model_copy(update={"address": dask_address}) if dask_address else self.dask
        return self.model_copy(update={"ray": ray, "dask": dask})

    def processing_hash(self) -> str:
        """Hash of everything that changes a tile's output: stages and their configurations, halo, tile size."""
        return processing_hash(self.stage_list(), self.halo, self.store_layout.tile)


class RunConfigError(ValueError):
    pass


def _problems(exc: ValidationError) -> list[str]:
    """One line per validation problem: where (the key path; a stage by its name) and what."""
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        where = ".".join(loc)
        for line in msg.splitlines():
            out.append(f"{where}: {line}" if where else line)
    return out


def load_run_config(path: str | Path, **overrides) -> RunConfig:
    """Read a run configuration; relative paths (inputs, run_dir, store, .py plugins) are relative to the file.
    RunConfigError with one line per problem, each naming the file."""
    path = Path(path)
    data = read_mapping(path, RunConfigError, "run configuration")
    data.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(data.get("plugins"), list):
        data["plugins"] = [str(relative_to_file(path, p)) if str(p).endswith(".py") else p for p in data["plugins"]]
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise RunConfigError("\n".join(f"{path}: {p}" for p in _problems(exc))) from None
    except ValueError as exc:  # a plugin that cannot be imported
        raise RunConfigError(f"{path}: {exc}") from None
    fix = {k: relative_to_file(path, getattr(cfg, k)) for k in ("inputs", "run_dir", "store")
           if getattr(cfg, k) is not None}
    return cfg.model_copy(update=fix)


__all__ = ["RunConfig", "RunConfigError", "StageSpec", "MergeSpec", "load_run_config"]
