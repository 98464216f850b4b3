"""The run's actor pool started ahead of its flow, and the stages as the store's fields can run them (without
Prefect: `deepfield run` calls this while Prefect's API server is still starting).

`prestart_pool` starts the actors (tasks.actor_pool.prestart_actors) as soon as Ray is up, when the store already
holds every field of the inputs (a rerun, a reprocessing): their start-up (worker processes, imports, networks)
then overlaps the wait for Prefect's API and the ingest's checks instead of following them.
"""
from __future__ import annotations

from deepfield.tasks.actor_pool import prestart_actors
from deepfield.tasks.stages.registry import BandError, resolve_bands
from deepfield.tasks.zarr_store import StoreError, fields_attrs, is_complete, open_store

from .run_config import RunConfig

__all__ = ["run_stages", "prestart_pool"]


def run_stages(cfg: RunConfig, attrs: dict[str, dict]) -> tuple[list[tuple[str, dict]], list[str]]:
    """(stages, lines of stages left out): the configuration's stages as the fields of `attrs` (name -> group
    attributes, tasks.zarr_store.fields_attrs: one small file read per field) can run them, each model stage
    with the weights for their bands (tasks.stages.registry.resolve_bands; BandError when a stage cannot run
    and `missing_bands` is error)."""
    return resolve_bands(cfg.stage_list(), {f: list(a["bands"]) for f, a in attrs.items()}, cfg.missing_bands)


def prestart_pool(cfg: RunConfig) -> int:
    """Start the run's actor pool ahead of the flow (tasks.actor_pool.prestart_actors), when the store already
    holds every field of the inputs: the stages are then resolved for the bands it holds, as the flow will
    resolve them after an ingest that finds the fields unchanged. Returns the actors started (0: none, the
    store lacks a field or a stage cannot run; the flow then starts its pool itself, and reports any problem).
    When the ingest changes a field's bands, or fails a field, the flow's stages differ and run_tiles stops
    these actors and starts its own: the pool is only ever an earlier start of the same actors."""
    from deepfield.tasks.ingest_config import ConfigError, load_ingest_config
    try:
        fields = [f.name for f in load_ingest_config(cfg.inputs, store=cfg.store_layout).fields]
        attrs = fields_attrs(open_store(cfg.store_path), fields)
        if not fields or not all(is_complete(a) for a in attrs.values()):
            return 0
        stages, _ = run_stages(cfg, attrs)
    except (StoreError, ConfigError, BandError, KeyError, OSError):
        return 0
    return prestart_actors(str(cfg.store_path), str(cfg.run_dir), cfg.with_stages(stages).stage_list(), cfg.halo,
                           address=cfg.ray.address, num_actors=cfg.ray.num_actors, use_gpus=cfg.ray.use_gpus,
                           plugins=cfg.plugins)
