"""`deepfield run survey.yaml`: the validated configuration of a whole run (ingest -> process ->
merge). Every key is documented in the README ("Run configuration")."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deepfield.tasks.ingest_config import StoreSpec
from deepfield.tasks.yaml_io import read_mapping
from deepfield.tasks.stages.registry import DEFAULT_STAGES, STAGES


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="stage name from the registry")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the stage")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in STAGES:
            raise ValueError(f"unknown stage {v!r}; known stages: {', '.join(sorted(STAGES))}")
        return v


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


class DaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: Optional[str] = Field(None, description="Dask scheduler address for the merge "
                                                     "('tcp://host:8786'); none: a local threads-only cluster")


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fits_export: bool = Field(True, description="also write the source catalog as a FITS table")
    lens_threshold: float = Field(0.5, ge=0, le=1, description="lens_score above which a source enters "
                                  "the lens-candidate table")
    anomaly_top: int = Field(100, ge=1, description="most anomalous sources (highest anomaly_sigma) kept in "
                             "anomalies.parquet with their stamps")
    anomaly_stamp: int = Field(64, ge=8, le=512, description="side of the anomaly stamps, pixels")
    cluster_nms_mpc: float = Field(0.5, gt=0, le=5, description="cluster candidates closer than this (physical "
                                   "Mpc at the stronger one's redshift) are one cluster")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Path = Field(description="ingest configuration or `deepfield simulate` manifest.yaml")
    run_dir: Path = Field(description="where the store, tile outputs, ledger and catalogs go")
    store: Optional[Path] = Field(None, description="Zarr store (default: RUN_DIR/store.zarr)")
    store_layout: StoreSpec = Field(default_factory=StoreSpec)
    halo: int = Field(64, ge=0, le=2048, description="pixels read around each tile core")
    stages: list[StageSpec] = Field(default_factory=lambda: [StageSpec(name=n) for n in DEFAULT_STAGES])
    ray: RaySpec = Field(default_factory=RaySpec)
    dask: DaskSpec = Field(default_factory=DaskSpec)
    merge: MergeSpec = Field(default_factory=MergeSpec)

    @property
    def store_path(self) -> Path:
        return self.store or (self.run_dir / "store.zarr")

    def stage_list(self) -> list[tuple[str, dict]]:
        return [(s.name, dict(s.params)) for s in self.stages]

    def with_addresses(self, ray_address: str | None = None, dask_address: str | None = None) -> "RunConfig":
        """A copy that reaches the given Ray cluster and Dask scheduler (None: keep the configured one)."""
        ray = self.ray.model_copy(update={"address": ray_address}) if ray_address else self.ray
        dask = self.dask.model_copy(update={"address": dask_address}) if dask_address else self.dask
        return self.model_copy(update={"ray": ray, "dask": dask})

    def processing_hash(self) -> str:
        """Hash of everything that changes a tile's output: stages and their parameters, halo, layout."""
        blob = json.dumps(dict(stages=self.stage_list(), halo=self.halo,
                               tile=self.store_layout.tile), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RunConfigError(ValueError):
    pass


def load_run_config(path: str | Path, **overrides) -> RunConfig:
    """Read a run configuration; relative paths are relative to the file."""
    path = Path(path)
    data = read_mapping(path, RunConfigError, "run configuration")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise RunConfigError(f"{path}: invalid run configuration:\n{exc}") from None
    base = path.resolve().parent
    fix = {k: (base / getattr(cfg, k)) for k in ("inputs", "run_dir", "store")
           if getattr(cfg, k) is not None and not getattr(cfg, k).is_absolute()}
    return cfg.model_copy(update=fix)
