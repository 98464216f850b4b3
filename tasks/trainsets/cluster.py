"""Training images for the cluster finder (`deepfield train cluster`): whole simulated fields, binned and
scaled exactly as the `cluster` stage does it (tasks.stages.cluster.field_planes), with the simulator's
clusters as truth.

`deepfield simulate` makes the fields (three clusters per field on average instead of one, so that a
training set has enough of them; richness 15-120 log-uniform and z 0.1-1.0 uniform as by default), the
ingest writes them to a Zarr store, and each field is read whole from the store and binned. A cluster's
position in a field is its BCG's (ra, dec) through the field's WCS, in binned pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..sim.config import SimConfig
from ..stages.cluster import field_planes
from ..zarr_store import attrs_to_header, complete_fields, open_store
from .fields import simulate_fields

FIELD_SEED = 8100  # training fields: seed FIELD_SEED + 1000 * seed; evaluation uses other seeds


def training_fields(seed: int, n_fields: int, size: int = 2048, clusters_per_field: float = 3.0) -> SimConfig:
    return SimConfig(seed=seed, size=size, fields=n_fields, population=dict(clusters_per_field=clusters_per_field))


def field_images(store: Path, clusters: pd.DataFrame, bin: int, bands: list[str],
                 progress: Callable[[str], None] | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Planes (F, len(bands) + 1, H, W) of every complete field of `store` (all the same size), and the
    truth clusters of each (field index `k`, binned-pixel `xb`, `yb`, z, richness; a cluster appears in
    every field whose area holds its centre)."""
    from astropy.wcs import WCS

    root = open_store(store)
    planes, rows = [], []
    for k, name in enumerate(complete_fields(root)):
        g = root["fields"][name]
        planes.append(field_planes(g, bands, bin))
        x, y = WCS(attrs_to_header(g.attrs["wcs_header"])).all_world2pix(clusters.ra.to_numpy(), clusters.dec.to_numpy(), 0)
        _, ny, nx = g.attrs["shape"]
        inside = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        for c, xi, yi in zip(clusters[inside].itertuples(), x[inside], y[inside]):
            rows.append(dict(k=k, field=name, cluster_id=int(c.cluster_id), xb=(xi - (bin - 1) / 2) / bin,
                             yb=(yi - (bin - 1) / 2) / bin, z=float(c.z), richness=float(c.richness)))
        if progress:
            progress(f"binned {name}: {int(inside.sum())} cluster(s)")
    return np.stack(planes), pd.DataFrame(rows, columns=["k", "field", "cluster_id", "xb", "yb", "z", "richness"])


def simulated_images(cfg: SimConfig, work: Path, bin: int, bands: list[str], workers: int = 2,
                     progress: Callable[[str], None] | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Simulate `cfg` under work/sim (a finished simulation with the same configuration is reused), ingest it
    into work/store.zarr (fields already there with the same inputs are skipped) and bin every field."""
    store = simulate_fields(cfg, Path(work), workers, progress)
    clusters = pd.read_parquet(Path(work) / "sim" / "truth" / "clusters.parquet")
    return field_images(store, clusters, bin, bands, progress)


def training_images(fields: int = 36, field_size: int = 2048, seed: int = 0, workers: int = 2,
                    work: Path | None = None, bands: list[str] | None = None, bin: int = 8,
                    progress: Callable[[str], None] | None = None) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """The cluster finder's training set: `fields` simulated fields (seed FIELD_SEED + 1000 * seed, three
    clusters per field) binned as the stage bins them, their truth clusters, and a description of the data.
    work: keep the fields and their store there and reuse them next time (default: a temporary directory,
    removed)."""
    import shutil
    import tempfile

    bands = bands or ["g", "r", "i", "z"]
    field_seed = FIELD_SEED + 1000 * seed
    cfg = training_fields(field_seed, fields, field_size)
    tmp = work is None
    work = Path(tempfile.mkdtemp(prefix="deepfield-cluster-")) if tmp else Path(work)
    try:
        if progress:
            progress(f"simulating {fields} fields of {field_size}^2 px (seed {field_seed}) into {work} and binning them ...")
        planes, truth = simulated_images(cfg, work, bin, bands, workers, progress)
    finally:
        if tmp:
            shutil.rmtree(work, ignore_errors=True)
    data = dict(fields=fields, field_size=field_size, field_seed=field_seed, clusters_per_field=3.0,
                n_clusters=int(len(truth)))
    return planes, truth, data
