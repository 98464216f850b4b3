"""Simulated fields in a Zarr store: what the training sets of the anomaly scorer and the cluster finder, and
their evaluations, are cut from.

`simulate_fields` runs the survey simulator (`deepfield simulate`'s `simulate_survey`; a finished simulation
with the same configuration is reused) under `OUT/sim` and ingests every field into `OUT/store.zarr` with the
default store layout (fields already there from the same inputs are skipped), so that training and
evaluation read the pixels exactly as the stages do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..ingest import ingest_one
from ..ingest_config import StoreSpec, load_ingest_config
from ..sim.config import SimConfig
from ..sim.survey import simulate_survey

__all__ = ["simulate_fields"]


def simulate_fields(cfg: SimConfig, out: Path, workers: int = 2, progress: Callable[[str], None] | None = None
                    ) -> Path:
    """Simulate `cfg`'s fields under `out`/sim and ingest them into `out`/store.zarr; returns the store."""
    sim = out / "sim"
    simulate_survey(cfg, sim, workers=workers)
    store = out / "store.zarr"
    spec = StoreSpec()
    for f in load_ingest_config(sim / "manifest.yaml").fields:
        r = ingest_one(f, str(store), spec)
        if r["status"] == "failed":
            raise RuntimeError(f"ingest of simulated field {f.name} failed: {r['error']}")
        if progress:
            progress(f"ingested {f.name}")
    return store
