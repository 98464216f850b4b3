"""The stage interface of the tile runner (DESIGN.md, "Stage").

A stage is a named unit with `setup(device)`, called once per actor (load models there), and
`run(tile, sources)`, called once per tile: it receives the tile's pixels (a
`tasks.zarr_store.Tile`, with halo) and the source table built so far by the earlier stages, and
returns the table with its new columns or rows. Adding a science stage means one new module and
one registry entry (`tasks.stages.registry`), not a change to the runner.
"""
from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import pandas as pd


@runtime_checkable
class Stage(Protocol):
    name: ClassVar[str]
    version: ClassVar[str]  # bump when the stage's output changes; recorded in the ledger

    def setup(self, device: str) -> None:
        """Load models or tables once per actor; `device` is "cpu" or "cuda:0"."""

    def run(self, tile: Any, sources: pd.DataFrame) -> pd.DataFrame:
        """Return `sources` with this stage's columns (or rows) added."""


def load_model(stage, device: str):
    """Build the stage's model (the first name of its `models`) on `device` with the shipped weights, or
    with the file its `weights` parameter names; sets `stage.device` and `stage.model` and returns it."""
    from pathlib import Path

    from deepfield.models.registry import create_model
    stage.device = device
    stage.model = create_model(stage.models[0], device=device, weights=Path(stage.weights) if stage.weights else None)
    return stage.model
