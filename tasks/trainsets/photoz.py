"""Galaxies measured by the pipeline with their true redshifts: the photo-z reference set (`deepfield train
photoz`) and its evaluation (`deepfield eval photoz`).

Each simulated field (`simulate_fields`: the simulator's defaults at the given seed, ingested with the default
store layout) goes tile by tile, in this process, through the given stages (the callers pass the default run
configuration's measuring stages, background, detect, measure and deblend, and for the evaluation the photo-z
stage after them). The primary rows are matched one to one (mutual nearest, within `MATCH_ARCSEC`)
to the truth's galaxies (kind galaxy or bcg); each matched row keeps its photometry in nJy (of the kind the
photo-z stage reads, tasks/stages/photoz.py), the true redshift, the true i magnitude (or the reference
band's) and the truth's blendedness.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..sim.config import SimConfig
from ..stages.photoz import STAMP_SIZE, nJy, stamps_nJy
from .fields import simulate_fields

__all__ = ["MATCH_ARCSEC", "GALAXY_KINDS", "process_store", "nJy", "matched_galaxies",
           "measured_fields", "seed_tables", "seed_dir", "table_path", "stamps_path", "stage_versions"]

MATCH_ARCSEC = 0.6
GALAXY_KINDS = ("galaxy", "bcg")


def process_store(store: Path, stages: list[tuple[str, dict]], halo: int, device: str = "cpu",
                  progress: Callable[[str], None] | None = None, timings: dict | None = None,
                  stamps: tuple[list[str], int, list] | None = None) -> pd.DataFrame:
    """Every tile of `store` through `stages` in this process; the primary rows of all tiles, with `field`.
    `timings`, when given, collects each stage's CPU seconds (time.process_time) and the pixels of tile cores
    under "pixels" (and the cutting of `stamps` under "stamps"). `stamps` = (bands, size, out): the photo-z stamps (tasks.stages.photoz.stamps_nJy) of the
    primary rows, in the order of the returned rows, are appended to the list `out`, one array per tile."""
    import time

    from deepfield.tasks.stages.registry import make_stage
    from deepfield.tasks.zarr_store import all_tiles, open_store
    from deepfield.tasks.zarr_read import read_tile
    built = [make_stage(name, **params) for name, params in stages]
    for s in built:
        s.setup(device)
    root = open_store(store)
    tiles = all_tiles(root, halo)
    rows = []
    for n, tid in enumerate(tiles, 1):
        tile = read_tile(root, tid, halo)
        sources = pd.DataFrame()
        for s in built:
            t0 = time.process_time()
            sources = s.run(tile, sources)
            if timings is not None:
                timings[s.name] = timings.get(s.name, 0.0) + time.process_time() - t0
        if timings is not None:
            timings["pixels"] = timings.get("pixels", 0) + tile.core.size
        if len(sources):
            prim = sources[sources.is_primary.to_numpy(bool)].copy()
            prim.insert(0, "field", tid.field)
            rows.append(prim)
            if stamps is not None:
                t0 = time.process_time()
                stamps[2].append(stamps_nJy(tile, prim.x_tile.to_numpy(float), prim.y_tile.to_numpy(float),
                                            stamps[0], stamps[1]))
                if timings is not None:
                    timings["stamps"] = timings.get("stamps", 0.0) + time.process_time() - t0
        if progress:
            progress(f"  tile {tid} ({n}/{len(tiles)}): {len(rows[-1]) if rows and len(sources) else 0} primary rows")
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def matched_galaxies(sources: pd.DataFrame, truth: pd.DataFrame, pixel_scale: float, bands: list[str],
                     ref: str, kind: str = "aper") -> pd.DataFrame:
    """The rows of `sources` (primary rows with field, x, y in field pixels) matched one to one (mutual
    nearest within MATCH_ARCSEC) to a true galaxy of their field: field, row (the source's index), x, y (its
    field pixel position), flux_<b>, fluxerr_<b> (nJy, of the
    photometry `kind`: see nJy) for every band, true_flux_<b> (the truth's total flux in nJy, from its AB magnitude
    in b; NaN where the truth has none), z (true), mag_true (the truth's `ref` magnitude; the last band's for fields
    without it) and blendedness (the truth's)."""
    from scipy.spatial import cKDTree

    from deepfield.models.train_photoz import truth_fluxes
    out = []
    radius = MATCH_ARCSEC / pixel_scale
    for name, s in sources.groupby("field", sort=False):
        t = truth[(truth.field == name) & truth.kind.isin(GALAXY_KINDS)]
        if not len(t) or not len(s):
            continue
        sxy = np.c_[s.x.to_numpy(float), s.y.to_numpy(float)]
        txy = np.c_[t.x.to_numpy(float), t.y.to_numpy(float)]
        d1, j = cKDTree(txy).query(sxy, distance_upper_bound=radius)
        _, i = cKDTree(sxy).query(txy, distance_upper_bound=radius)
        ok = np.isfinite(d1)
        ok[ok] = i[j[ok]] == np.flatnonzero(ok)  # mutual nearest
        ms, mt = s[ok], t.iloc[j[ok]]
        cols = {"field": name, "row": ms.index.to_numpy(), "x": sxy[ok, 0], "y": sxy[ok, 1]}
        for b in bands:
            cols[f"flux_{b}"], cols[f"fluxerr_{b}"] = nJy(ms, b, kind)
            cols[f"true_flux_{b}"] = truth_fluxes(mt, [b])[:, 0] if f"mag_{b}" in mt else np.full(len(mt), np.nan)
        cols["z"] = mt.z.to_numpy(float)
        # fields without the reference band: the truth has magnitudes in the simulated bands only
        cols["mag_true"] = mt[f"mag_{ref}" if f"mag_{ref}" in mt else f"mag_{bands[-1]}"].to_numpy(float)
        cols["blendedness"] = mt.blendedness.to_numpy(float) if "blendedness" in mt else np.nan
        out.append(pd.DataFrame(cols))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def measured_fields(seeds: list[int], size: int, work: Path, stages: list[tuple[str, dict]], halo: int,
                    workers: int = 2, device: str = "cpu", progress: Callable[[str], None] | None = None,
                    timings: dict | None = None, kind: str = "aper", bands: list[str] | None = None,
                    stamp_out: list | None = None, stamp_size: int = STAMP_SIZE
                    ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """One simulated field of `size`^2 px per seed (the simulator's defaults, in `bands` when given; reused under
    seed_dir), through `stages` ([(name, params)]) with `halo`: (matched galaxies of every field with the
    photometry `kind`, every primary row, the bands). With `stamp_out` (a list), each seed's stamps of its matched
    galaxies (stamps_nJy, `stamp_size` px, in the field's bands), in the order of the matched rows, are appended."""
    matched, rows, field_bands = [], [], list(bands or [])
    for seed in seeds:
        cfg = SimConfig(seed=seed, size=size, fields=1, **({"bands": list(bands)} if bands else {}))
        out = seed_dir(work, seed, bands)
        if progress:
            progress(f"field of seed {seed}: simulating and ingesting {size}^2 px, bands {','.join(cfg.bands)} ...")
        store = simulate_fields(cfg, out, workers, progress)
        truth = pd.read_parquet(out / "sim" / "truth" / "objects.parquet")
        tiles_stamps: list = []
        sources = process_store(store, stages, halo, device, progress, timings,
                                (list(cfg.bands), stamp_size, tiles_stamps) if stamp_out is not None else None)
        if not len(sources):
            continue
        sources["field"] = sources.field.astype(str) + f"@{seed}"  # names repeat across seeds
        truth = truth.assign(field=truth.field.astype(str) + f"@{seed}")
        field_bands = list(cfg.bands)
        m = matched_galaxies(sources, truth, cfg.pixel_scale, field_bands, cfg.reference_band, kind)
        if stamp_out is not None:
            stamp_out.append(np.concatenate(tiles_stamps)[m.row.to_numpy()])
        m["row"] += sum(len(r) for r in rows)
        matched.append(m)
        rows.append(sources)
    return (pd.concat(matched, ignore_index=True) if matched else pd.DataFrame(),
            pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(), field_bands)


def seed_dir(work: Path, seed: int, bands: list[str] | None = None) -> Path:
    """Where a seed's field (simulation, store) and its tables are kept: `work`/seed<N> for the simulator's
    default bands (None), `work`/seed<N>_<bands> (e.g. seed1001_ugrizy) for other bands, so that fields
    simulated in other bands are kept apart."""
    return Path(work) / (f"seed{seed}" if bands is None else f"seed{seed}_{''.join(bands)}")


def seed_truth(work: Path, seed: int, bands: list[str] | None = None) -> pd.DataFrame:
    """The truth objects of the seed's simulated field (measured_fields simulates it under seed_dir)."""
    path = seed_dir(work, seed, bands) / "sim" / "truth" / "objects.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no truth of seed {seed}; remove {table_path(work, seed, 'gaap', bands).parent} "
                                "to simulate and measure the field again")
    return pd.read_parquet(path)


def table_path(work: Path, seed: int, kind: str, bands: list[str] | None = None) -> Path:
    """Where seed_tables keeps a seed's matched galaxies of photometry `kind` (fields in `bands`, None: the
    simulator's default bands)."""
    return seed_dir(work, seed, bands) / f"photoz_{kind}.parquet"


def stamps_path(work: Path, seed: int, kind: str, size: int = STAMP_SIZE, bands: list[str] | None = None) -> Path:
    """Where seed_tables keeps a seed's stamps of its matched galaxies (float32 nJy, (n, bands, size, size)), in the
    row order of that seed's table of photometry `kind` (one file per table: tables measured apart need not have
    the same rows)."""
    return seed_dir(work, seed, bands) / f"photoz_{kind}_stamps{size}.npy"


def _atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def stage_versions(stages: list[tuple[str, dict]]) -> str:
    """The stages' names and code versions, e.g. "background:3,detect:9,measure:7,deblend:5": what seed_tables
    records in each table (column `stages`) and checks when it reads one back."""
    from deepfield.tasks.stages.registry import stage_class
    return ",".join(f"{name}:{stage_class(name).version}" for name, _ in stages)


def seed_tables(seeds: list[int], size: int, work: Path, stages: list[tuple[str, dict]], halo: int,
                workers: int = 2, kind: str = "aper", bands: list[str] | None = None, device: str = "cpu",
                progress: Callable[[str], None] | None = None, stamps: bool = False) -> list[pd.DataFrame]:
    """The matched galaxies of each seed's field (measured_fields), each kept as `work`/seed<N>/photoz_<kind>.parquet
    (written atomically, with the `stages`' versions in a column of that name) and read back from there on a rerun:
    a killed run resumes from the seeds it finished; a table that other stage versions measured is measured again.
    With `stamps`, each seed's stamps of those galaxies are kept too (stamps_path, in the table's row order,
    written before the table) and a seed without them is measured again."""
    out = []
    made_by = stage_versions(stages)
    for seed in seeds:
        path = table_path(work, seed, kind, bands)
        if path.exists() and (not stamps or stamps_path(work, seed, kind, bands=bands).exists()):
            t = pd.read_parquet(path)
            was = str(t["stages"].iloc[0]) if "stages" in t.columns and len(t) else "unrecorded"
            if was != made_by:  # measured by other stage versions (e.g. an older measure stage): measure again
                if progress:
                    progress(f"seed {seed}: {path} was measured by stages {was}, these are {made_by}: measuring again")
                stamps_path(work, seed, kind, bands=bands).unlink(missing_ok=True)
            else:
                if progress:
                    progress(f"seed {seed}: {path} (measured before)")
                lack = [b for b in (bands or []) if f"flux_{b}" not in t.columns]
                if lack:
                    raise ValueError(f"{path}: has no flux in band(s) {', '.join(lack)}; remove it to measure again")
                out.append(t)
                continue
        got: list = []
        matched, _, _ = measured_fields([seed], size, Path(work), stages, halo, workers, device, progress, kind=kind,
                                        bands=bands, stamp_out=got if stamps else None)
        matched["seed"] = seed
        matched["stages"] = made_by
        if stamps:
            _atomic_save(stamps_path(work, seed, kind, bands=bands), lambda p: np.save(p, got[0] if got else np.zeros((0,), np.float32)))
        _atomic_save(path, matched.to_parquet)
        if progress:
            progress(f"seed {seed}: {len(matched)} galaxies matched to the truth")
        out.append(matched)
    return out
