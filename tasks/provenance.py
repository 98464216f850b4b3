"""Provenance of tile outputs: everything a tile's result depends on, hashed or versioned, so that a re-run
redoes exactly the tiles whose result would change (the ledger, tasks/ledger.py, records these per tile).

- `processing_hash`: sha256 (16 hex digits) of the stages in order with their full validated
  configurations (defaults included, so a changed default counts), the halo and the tile size;
- `stage_versions`: each stage's `version` (bumped when its code changes what it writes);
- `model_versions`: the version of every network the stages run: the first 12 hex digits of the sha256 of
  the shipped weights ("@<tag>" added for a band-set variant's), or "file:" + that of the weights file a
  stage's configuration names;
- `input_keys`: per field, the fingerprint of its ingested inputs, and of the neighbouring fields' when a stage
  reads pixels beyond its field (`Stage.sky_reach_arcsec`: the cluster stage's halo).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from .stages.registry import stage_class

__all__ = ["stage_configs", "processing_hash", "stage_versions", "model_versions", "sky_reach", "input_keys",
           "RunKeys", "run_keys"]


def stage_configs(stages: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """[(name, full validated configuration as JSON-friendly dict)] of [(name, params)]."""
    return [(name, stage_class(name).configure(params).model_dump(mode="json")) for name, params in stages]


def processing_hash(stages: list[tuple[str, dict]], halo: int, tile: int) -> str:
    """Hash of everything that changes a tile's output besides code and model versions (module docstring)."""
    blob = json.dumps(dict(stages=stage_configs(stages), halo=int(halo), tile=int(tile)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_versions(stages: list[tuple[str, dict]]) -> dict[str, str]:
    return {name: str(stage_class(name).version) for name, _ in stages}


def model_versions(stages: list[tuple[str, dict]]) -> dict[str, str]:
    """Version of every model the configured stages use (module docstring)."""
    from deepfield.models.registry import model_version, weights_version
    out = {}
    for name, params in stages:
        cls = stage_class(name)
        cfg = cls.configure(params)
        variant = getattr(cfg, "variant", None)
        for k, m in enumerate(cls.used_models(cfg)):
            # a file the configuration names for the model (`weights` for the first; a stage's own key for
            # another, e.g. the photoz stage's cnn_weights): its content, so a file changed in place redoes the tiles
            given = cls.weights_given(cfg, m)
            if given:
                out[m] = "file:" + weights_version(given)
            elif variant and k == 0:
                out[m] = f"{model_version(m, variant)}@{variant}"
            else:
                out[m] = model_version(m)
    return out


@dataclass(frozen=True)
class RunKeys:
    """What the ledger record of a tile must match for the tile's outputs to belong to a run: the
    configuration hash, the stage and model versions, and the input fingerprint of the tile's field (only the
    fields of `inputs` belong to the run)."""

    config_hash: str
    stage_versions: dict[str, str] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # field -> input_keys (its inputs and, where read, its neighbours')

    def matches(self, rec) -> bool:
        """True when the ledger record `rec` (tasks.ledger.TileRecord) was made under these keys."""
        field_name = rec.tile.partition("/")[0]
        return (field_name in self.inputs and rec.input_hash == self.inputs[field_name]
                and rec.config_hash == self.config_hash and rec.stage_versions == self.stage_versions
                and rec.model_versions == self.model_versions)


def sky_reach(stages: list[tuple[str, dict]]) -> float:
    """The furthest any of `stages` reads beyond its own field, arcsec (Stage.sky_reach_arcsec)."""
    return max([stage_class(n).sky_reach_arcsec(stage_class(n).configure(p)) for n, p in stages] or [0.0])


def input_keys(root, fields, reach_arcsec: float = 0.0) -> dict[str, str]:
    """Per field of `fields`, the fingerprint of its ingested inputs (tasks.zarr_store.input_fingerprint); when
    a stage reads other fields' pixels within `reach_arcsec` of a field (the cluster stage's halo), the
    fingerprints of the store's complete fields within that reach are folded in, so that re-ingesting, adding
    or removing a neighbour redoes the field's tiles, not only re-ingesting the field."""
    from .zarr_sky import field_footprint, neighbours_within
    from .zarr_store import COMPLETE, fields_attrs, is_complete, record_fingerprint
    attrs = fields_attrs(root, None if reach_arcsec > 0 else list(fields))  # each field's metadata read once
    own = {f: record_fingerprint((attrs.get(f) or {}).get(COMPLETE)) for f in fields}
    if reach_arcsec <= 0:
        return own
    complete = sorted(n for n, a in attrs.items() if is_complete(a))
    footprints = {n: field_footprint(attrs[n]) for n in complete}
    prints = {n: own.get(n) or record_fingerprint(attrs[n][COMPLETE]) for n in complete}
    neighbours = neighbours_within(footprints, reach_arcsec)
    out = {}
    for f in fields:
        near = neighbours.get(f, [])
        blob = json.dumps([own[f], [(n, prints[n]) for n in near]])
        out[f] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return out


def run_keys(stages: list[tuple[str, dict]], config_hash: str, root, fields) -> RunKeys:
    """The RunKeys of a run of `stages` under `config_hash` over `fields` of the open store `root`."""
    return RunKeys(config_hash, stage_versions(stages), model_versions(stages),
                   input_keys(root, fields, sky_reach(stages)))
