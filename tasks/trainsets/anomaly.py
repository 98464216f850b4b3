"""Stamps of detected sources in simulated fields, labelled against the simulator's anomaly truth, for
training and evaluating the GAN anomaly scorer (`deepfield train anomaly`, `deepfield eval anomaly`):
`training_stamps` (normal sources only, the training set) and `field_stamps` (any simulated fields, with
labels; the evaluation's held-out fields are in flows/evaluate/anomaly.py).

The stamps come out of the pipeline itself, so that training, evaluation and the `anomaly` stage see the
same thing: `deepfield simulate`'s field simulator writes the fields, the ingest writes them to a Zarr
store, and per tile the `background`, `detect` and `measure` stages run before the anomaly stage's own
selection and stamp cutting (tasks/stages/anomaly.py).

Labels, by the distance d (px) from a source's centroid to each anomaly of its field in the truth tables
(`truth/anomalies.parquet`, `truth/lenses.parquet`):
- anomalous (`label` = the anomaly type) when the anomaly reaches the stamp's centre: ring galaxies,
  mergers, strong lenses, cosmic rays and hot-pixel clusters with d <= `core` (8 px, 1.6"); a satellite
  trail passing within `core` of the centroid; a ghost whose annulus covers the centroid;
- `contaminated` when an anomaly lies in the stamp but off its centre (point anomalies within the stamp's
  half-diagonal, trails within half a stamp, ghosts whose annulus reaches the stamp): these are neither
  normal nor anomalous and are left out of training and of the figures;
- `normal` otherwise. Amplifier offsets (a pedestal of 0.5-3 sky sigma over a quarter of a band's image)
  are not counted as anomalies: inside a stamp they are a near-invisible step.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..atomic import atomic_path
from ..sim.config import DEFAULT_BANDS, SimConfig
from ..stages.anomaly import AnomalyStage
from ..stages.background import BackgroundStage
from ..stages.detect import DetectStage
from ..stages.measure import MeasureStage
from ..tiling import TileId
from ..zarr_store import complete_fields, open_store
from ..zarr_read import field_grid, read_tile
from .fields import simulate_fields

POINT_TYPES = ("ring_galaxy", "merger", "lens", "cosmic_ray", "hot_pixels")
CORE = 8.0  # px (1.6"): an anomaly this close to the centroid is the stamp's subject


def _segment_distance(x: np.ndarray, y: np.ndarray, e: dict) -> np.ndarray:
    x0, y0, x1, y1 = e["x0"], e["y0"], e["x1"], e["y1"]
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(x - x0 - t * dx, y - y0 - t * dy)


def anomaly_geometry(x: np.ndarray, y: np.ndarray, anomalies: pd.DataFrame, lenses: pd.DataFrame, stamp: int,
                     bands: list[str], core: float = CORE):
    """For each anomaly of one field's truth that a scorer of `bands` can see (amplifier offsets and artefacts
    of other bands left out), yield (row label, type, d, hit, off): the distance d (px) of every position (x, y)
    to it, whether it is the subject of a stamp centred there (`hit`, see the module docstring) and whether it
    lies in such a stamp at all (`off`)."""
    if len(anomalies):
        anomalies = anomalies[anomalies["band"].isin([*bands, "all"])]
    reach = stamp / np.sqrt(2.0)
    rows = [(r.Index, r.type, r.x, r.y, json.loads(r.params) if isinstance(r.params, str) else {})
            for r in anomalies.itertuples()] + [(f"lens{r.Index}", "lens", r.x, r.y, {}) for r in lenses.itertuples()]
    for key, kind, ax, ay, p in rows:
        if kind == "amp_offset":
            continue
        if kind == "satellite_trail":
            d = _segment_distance(x, y, p)
            hit, off = d <= core, d <= stamp / 2
        elif kind == "ghost":
            r = np.hypot(x - ax, y - ay)
            half = p["width_pix"] / 2
            d = np.abs(r - p["radius_pix"])
            hit, off = d <= half + max(core - 8.0, 0.0), d <= half + reach
        else:
            d = np.hypot(x - ax, y - ay)
            hit, off = d <= core, d <= reach
        yield key, kind, d, hit, off


def label_sources(src: pd.DataFrame, anomalies: pd.DataFrame, lenses: pd.DataFrame, stamp: int,
                  bands: list[str], core: float = CORE) -> np.ndarray:
    """Label of every row of `src` (columns x, y: field pixels) from one field's anomaly and lens truth:
    an anomaly type, "contaminated" or "normal" (module docstring). Artefacts of a band not in `bands` (the
    scorer's) are invisible in its stamps and ignored."""
    x, y = src["x"].to_numpy(float), src["y"].to_numpy(float)
    label = np.full(len(src), "normal", dtype=object)
    best = np.full(len(src), np.inf)  # distance of the labelling anomaly: the nearest one wins
    near = np.zeros(len(src), bool)
    for _, kind, d, hit, off in anomaly_geometry(x, y, anomalies, lenses, stamp, bands, core):
        take = hit & (d < best)
        label[take] = kind
        best[take] = d[take]
        near |= off
    label[(label == "normal") & near] = "contaminated"
    return label


def _of_field(truth: pd.DataFrame, name: str) -> pd.DataFrame:
    """Rows of one field (a truth table without rows has no columns either)."""
    return truth[truth["field"] == name] if "field" in truth.columns else truth


def field_stamps(cfg: SimConfig, stage, workers: int = 2, halo: int = 64, keep: Path | None = None,
                 progress: Callable[[str], None] | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Scaled stamps (N, bands, S, S) of the sources `stage` (an AnomalyStage) selects in `cfg`'s simulated
    fields, and their table (field, x, y, mag, snr, label). keep: work directory to keep (default: a
    temporary one, removed)."""
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="deepfield-anomaly-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        store = simulate_fields(cfg, work, workers, progress)
        root = open_store(store)
        truth = work / "sim" / "truth"
        anomalies, lenses = pd.read_parquet(truth / "anomalies.parquet"), pd.read_parquet(truth / "lenses.parquet")
        pre = [BackgroundStage(), DetectStage(), MeasureStage()]
        stamps, tables = [], []
        for name in complete_fields(root):
            grid = field_grid(root, name, halo)
            for ty in range(grid.n_ty):
                for tx in range(grid.n_tx):
                    tile = read_tile(root, TileId(name, ty, tx), halo)
                    src = pd.DataFrame()
                    for s in pre:
                        src = s.run(tile, src)
                    sel = stage.select(tile, src)
                    if not sel.any():
                        continue
                    rows = src[sel].reset_index(drop=True)
                    stamps.append(stage.scaled_stamps(tile, rows)[0])
                    t = pd.DataFrame(dict(field=name, x=rows.x.to_numpy(float), y=rows.y.to_numpy(float),
                                          mag=rows[f"mag_auto_{stage.ref_band}"].to_numpy(float),
                                          snr=stage.snr(rows)))
                    t["label"] = label_sources(t, _of_field(anomalies, name), _of_field(lenses, name),
                                               stage.size, stage.bands)
                    tables.append(t)
            if progress:
                progress(f"stamps of {name}: {sum(len(t) for t in tables)} so far")
        if not tables:
            raise RuntimeError("no source passed the anomaly stage's selection in the simulated fields")
        return np.concatenate(stamps), pd.concat(tables, ignore_index=True)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def training_fields(seed: int, n_fields: int, size: int = 2048, bands: list[str] | None = None) -> SimConfig:
    """Fields of normal sources only: the simulator's galaxies, stars, clusters and detector defects (masked
    bad columns and pixels), without its anomalies (lenses, ring galaxies, mergers) and artefacts (trails,
    cosmic rays, ghosts, hot pixels, amplifier offsets). bands: besides the simulator's default g, r, i, z
    (which stay, so that the fields of g, r, i, z and of any subset are the same fields), these."""
    default = SimConfig().bands
    extra = {"bands": [b for b in DEFAULT_BANDS if b in {*default, *bands}]} if set(bands or ()) - set(default) else {}
    return SimConfig(seed=seed, size=size, fields=n_fields, **extra,
                     population=dict(lenses_per_field=0, ring_galaxies_per_field=0, mergers_per_field=0),
                     artefacts=dict(satellite_trails=0, cosmic_rays=0, ghosts_per_bright_star=0,
                                    hot_pixel_clusters=0, amp_artefact_prob=0))


def training_stamps(fields: int = 8, field_size: int = 2048, seed: int = 0, workers: int = 2,
                    cache: Path | None = None, progress: Callable[[str], None] | None = None
                    ) -> tuple[np.ndarray, dict]:
    """Scaled stamps of the anomaly stage's selection in `fields` simulated fields of normal sources (field
    seed seed * 1000 + 1), and a description of them. cache: an .npz file reused when it was made with the
    same fields, size and seed, written otherwise (atomically)."""
    say = progress or (lambda msg: None)
    data = dict(fields=fields, field_size=field_size, field_seed=seed * 1000 + 1, selection="AnomalyStage defaults")
    keys = ("fields", "field_size", "field_seed")
    if cache is not None and Path(cache).exists():
        z = np.load(cache, allow_pickle=False)
        if {k: z[k].item() for k in keys} == {k: data[k] for k in keys}:
            say(f"stamps from {cache}")
            return z["x"], dict(data, n=int(len(z["x"])))
        say(f"{cache} was made from other fields; simulating again")
    say(f"simulating {fields} fields of {field_size}^2 px of normal sources and cutting stamps ...")
    x, table = field_stamps(training_fields(data["field_seed"], fields, field_size), AnomalyStage(), workers=workers,
                            progress=progress)
    x = x[(table.label == "normal").to_numpy()]
    if cache is not None:
        with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, x=x, fields=fields, field_size=field_size, field_seed=data["field_seed"])
    return x, dict(data, n=int(len(x)))


def _bright_peaks(snr: np.ndarray, level: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of the local maxima (5 x 5 px) above `level` of a (ny, nx) S/N image."""
    from scipy import ndimage
    peak = (snr >= level) & (snr == ndimage.maximum_filter(snr, size=5))
    return np.nonzero(peak)


def training_windows(fields: int = 6, field_size: int = 2048, seed: int = 0, per_tile: int = 400, workers: int = 2,
                     cache: Path | None = None, progress: Callable[[str], None] | None = None,
                     halo: int = 64, bright_fraction: float = 0.0, bands: list[str] | None = None
                     ) -> tuple[np.ndarray, dict]:
    """Scaled windows (N, B, S, S) of `bands` (default the stage's, g r i) in `fields` simulated fields of normal
    sources (field seed seed * 1000 + 1; `training_fields`), cut from the background-subtracted tile as the anomaly stage cuts its grid windows
    (tasks.stages._anomaly_grid.window_stamps): `per_tile` windows whose centre lies in each tile core, a
    `bright_fraction` of them centred within 14 px of a random bright peak (a local maximum above 20 sky sigma
    in any band: stars, bright galaxies, saturated cores), the rest at uniformly random positions (the default,
    bright_fraction 0: half the windows on bright peaks gave a generator that reproduced bright sources worse,
    see models/cards/anomaly_wgan.md). So empty sky, faint and bright sources anywhere in the window, stars and
    masked defects are all what normal looks like.
    cache: as `training_stamps`."""
    from deepfield.models.anomaly_gan import scale_stamps

    from ..stages._anomaly_grid import window_stamps
    say = progress or (lambda msg: None)
    stage = AnomalyStage(**({"bands": tuple(bands)} if bands else {}))
    data = dict(fields=fields, field_size=field_size, field_seed=seed * 1000 + 1, per_tile=per_tile,
                bright_fraction=bright_fraction, bands=",".join(stage.bands),
                selection=f"random windows, {bright_fraction:.0%} of them within 14 px of a bright peak")
    keys = ("fields", "field_size", "field_seed", "per_tile", "bright_fraction", "bands")
    if cache is not None and Path(cache).exists():
        z = np.load(cache, allow_pickle=False)
        if all(k in z.files for k in keys) and {k: z[k].item() for k in keys} == {k: data[k] for k in keys}:
            say(f"windows from {cache}")
            return z["x"], dict(data, n=int(len(z["x"])))
        say(f"{cache} was made from other fields; simulating again")
    rng = np.random.default_rng(seed)
    work = Path(tempfile.mkdtemp(prefix="deepfield-anomaly-windows-"))
    try:
        say(f"simulating {fields} fields of {field_size}^2 px of normal sources and cutting windows ...")
        sim = training_fields(data["field_seed"], fields, field_size, stage.bands)
        root = open_store(simulate_fields(sim, work, workers, progress))
        out = []
        s = stage.size
        for name in complete_fields(root):
            grid = field_grid(root, name, halo)
            for ty in range(grid.n_ty):
                for tx in range(grid.n_tx):
                    tile = read_tile(root, TileId(name, ty, tx), halo)
                    BackgroundStage().run(tile, pd.DataFrame())
                    ny, nx = tile.field_shape
                    c = tile.core
                    ylo, yhi = max(c.y0, (s - 1) / 2), min(c.y1, ny - (s - 1) / 2 - 1)
                    xlo, xhi = max(c.x0, (s - 1) / 2), min(c.x1, nx - (s - 1) / 2 - 1)
                    image, invvar, usable = stage._pixels(tile)
                    snr = np.where(usable, image * np.sqrt(np.maximum(invvar, 0)), 0).max(axis=0)
                    py, px = _bright_peaks(snr)
                    py, px = py + tile.box.y0, px + tile.box.x0
                    inside = (py >= ylo) & (py < yhi) & (px >= xlo) & (px < xhi)
                    py, px = py[inside], px[inside]
                    nb = int(round(bright_fraction * per_tile)) if len(py) else 0
                    pick = rng.integers(len(py), size=nb) if nb else np.zeros(0, int)
                    yc = np.concatenate([rng.uniform(ylo, yhi, per_tile - nb),
                                         np.clip(py[pick] + rng.uniform(-14, 14, nb), ylo, yhi)])
                    xc = np.concatenate([rng.uniform(xlo, xhi, per_tile - nb),
                                         np.clip(px[pick] + rng.uniform(-14, 14, nb), xlo, xhi)])
                    y0 = np.rint(yc - (s - 1) / 2).astype(int) - tile.box.y0
                    x0 = np.rint(xc - (s - 1) / 2).astype(int) - tile.box.x0
                    stamps, sig, _ = window_stamps(image, invvar, usable, y0, x0, s)
                    out.append(scale_stamps(stamps, sig))
            say(f"windows of {name}: {sum(len(o) for o in out)} so far")
        x = np.concatenate(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if cache is not None:
        with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, x=x, **{k: data[k] for k in keys})
    return x, dict(data, n=int(len(x)))
