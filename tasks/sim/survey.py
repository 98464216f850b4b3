"""`deepfield simulate`: draw the sky once, render every field and band in parallel, write FITS
images, inverse-variance and mask files, the truth catalogs and a manifest.

Output layout (all paths in the manifest are relative to OUT):
  OUT/manifest.yaml                       written last: its presence means the simulation is complete
  OUT/fields/<field>/<field>-<band>-{image,invvar,mask}.fits
  OUT/fields/<field>/field.json           per-field completion record (config hash, files)
  OUT/fields/<field>/truth-*.parquet      the field's share of the truth tables
  OUT/truth/{objects,clusters,lenses,anomalies}.parquet

Every file is written under a temporary name and renamed; a field directory appears only once all
its bands are written. A re-run with the same configuration reuses complete fields.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import yaml

from ..atomic import atomic_path, clean_stale_temporaries, publish, write_text
from ..version import __version__
from .catalog import build_survey_catalog
from .config import SimConfig
from .field import FieldPlan, file_names, plan_field, render_band
from .layout import FieldLayout, nearest_field, survey_layout
from .truth import anomaly_row, object_rows

MANIFEST = "manifest.yaml"
TRUTH_TABLES = ("objects", "clusters", "lenses", "anomalies")

Progress = Callable[[int, int, str], None]


class SimulationError(RuntimeError):
    pass


def config_hash(cfg: SimConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]


def read_manifest(out: Path) -> dict | None:
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    return yaml.safe_load(path.read_text())


def _field_done(out: Path, lay: FieldLayout, chash: str) -> bool:
    rec = out / "fields" / lay.name / "field.json"
    try:
        return json.loads(rec.read_text()).get("config_hash") == chash
    except (OSError, ValueError):
        return False


def _field_truth(plan: FieldPlan, results: dict[str, dict], owner: dict[int, int], cat_lenses: list,
                 sky_anomalies: list) -> dict[str, pd.DataFrame]:
    cfg, lay = plan.cfg, plan.layout
    ref = cfg.reference_band if cfg.reference_band in cfg.bands else cfg.bands[0]
    inside = [p for p in plan.placed if lay.contains(np.array(p.x), np.array(p.y))]
    per_band = {b: results[b]["per_source"] for b in cfg.bands}
    objects = object_rows(lay.name, lay.index, inside, owner, list(cfg.bands), cfg.zeropoint, ref,
                          plan.psf[ref].fwhm, cfg.pixel_scale, per_band, cfg.band_specs[ref].m5 + 0.5)
    pos = {p.source.id: p for p in inside}
    lens_rows = []
    for system in cat_lenses:
        if system.id not in pos:
            continue
        p = pos[system.id]
        row = system.lens_truth()
        row.update(source_id=system.id, field=lay.name, x=p.x, y=p.y,
                   is_primary=owner[system.id] == lay.index)
        for b in cfg.bands:  # optimal S/N of the arcs alone against the sky noise of the field
            row[f"arc_snr_{b}"] = _arc_snr(system, b, plan)
        lens_rows.append(row)
    anom_rows = []
    wcs = lay.wcs()
    for obj in sky_anomalies:
        if obj.id not in pos:
            continue
        p = pos[obj.id]
        t = obj.anomaly_truth()
        anom_rows.append(anomaly_row(t.pop("anomaly_id", obj.id), t.pop("type", obj.kind), lay.name, "all",
                                     p.x, p.y, obj.ra, obj.dec, owner[obj.id] == lay.index,
                                     dict(t, source_id=obj.id)))
    for a in plan.artefacts:
        a = dict(a)
        sky = wcs.pixel_to_world(a["x"], a["y"])
        anom_rows.append(anomaly_row(a.pop("anomaly_id"), a.pop("type"), lay.name, a.pop("band"),
                                     a.pop("x"), a.pop("y"), float(sky.ra.deg), float(sky.dec.deg), True, a))
    return {"objects": objects, "lenses": pd.DataFrame(lens_rows), "anomalies": pd.DataFrame(anom_rows)}


def _arc_snr(system, band: str, plan: FieldPlan) -> float:
    """Matched-filter S/N of a lens's arcs alone (PSF-convolved) against the mean sky noise."""
    import galsim
    cfg = plan.cfg
    size = int(2 * (system.size + 2 * plan.psf[band].fwhm) / cfg.pixel_scale) + 16
    conv = galsim.Convolve(system.arc_profile(band, cfg.zeropoint), plan.psf[band].profile())
    arr = conv.drawImage(nx=size, ny=size, scale=cfg.pixel_scale).array.astype(np.float64)
    return float(np.sqrt(np.sum(arr**2)) / plan.noise[band].sigma)


def _write_table(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def simulate_survey(cfg: SimConfig, out: str | os.PathLike, workers: int | None = None,
                    progress: Progress | None = None, overwrite: bool = False) -> Path:
    """Simulate the survey described by cfg into `out`; returns the manifest path.

    A complete simulation with the same configuration is left as it is; a different one in the same
    directory is an error unless overwrite is set.
    """
    out = Path(out)
    chash = config_hash(cfg)
    old = read_manifest(out)
    if old is not None:
        if old.get("config_hash") == chash:
            return out / MANIFEST
        if not overwrite:
            raise SimulationError(f"{out / MANIFEST}: holds a simulation with another configuration "
                                  f"(config_hash {old.get('config_hash')} != {chash}); choose another --out "
                                  f"or pass --overwrite")
        (out / MANIFEST).unlink()
        shutil.rmtree(out / "fields", ignore_errors=True)
        shutil.rmtree(out / "truth", ignore_errors=True)
    (out / "fields").mkdir(parents=True, exist_ok=True)
    for d in (out, out / "fields", out / "truth"):
        clean_stale_temporaries(d)

    layout = survey_layout(cfg)
    cat = build_survey_catalog(cfg)
    ra, dec = cat.positions()
    owner_idx = nearest_field(ra, dec, layout)
    owner = {s.id: int(i) for s, i in zip(cat.sources, owner_idx)}
    todo = [lay for lay in layout if not _field_done(out, lay, chash)]
    plans = {lay.name: plan_field(cfg, lay, cat.sources, ra, dec) for lay in todo}
    tmp_dirs = {}
    for lay in todo:
        tmp = out / "fields" / f".{lay.name}.{chash}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        tmp_dirs[lay.name] = tmp

    jobs = [(name, b) for name in plans for b in cfg.bands]
    results: dict[str, dict[str, dict]] = {name: {} for name in plans}
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    done = 0
    if progress:
        progress(0, len(jobs), f"{len(layout) - len(todo)} of {len(layout)} fields already complete")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
        futures = {pool.submit(render_band, plans[name], b, str(tmp_dirs[name])): (name, b) for name, b in jobs}
        for fut in as_completed(futures):
            name, b = futures[fut]
            results[name][b] = fut.result()
            done += 1
            if progress:
                progress(done, len(jobs), f"{name} {b}")
            if len(results[name]) == len(cfg.bands):
                _finish_field(out, plans[name], results[name], owner, cat, tmp_dirs[name], chash)

    return _write_outputs(cfg, out, layout, cat, owner, chash)


def _finish_field(out: Path, plan: FieldPlan, results: dict[str, dict], owner: dict[int, int], cat,
                  tmp: Path, chash: str) -> None:
    tables = _field_truth(plan, results, owner, cat.lenses, cat.sky_anomalies)
    for name, df in tables.items():
        df.to_parquet(tmp / f"truth-{name}.parquet", index=False)
    lay = plan.layout
    record = dict(field=lay.name, config_hash=chash, deepfield_version=__version__,
                  psf_fwhm={b: plan.psf[b].fwhm for b in plan.cfg.bands},
                  sky_sigma={b: plan.noise[b].sigma for b in plan.cfg.bands},
                  saturation={b: plan.saturation[b] for b in plan.cfg.bands},
                  files={b: results[b]["files"] for b in plan.cfg.bands},
                  n_saturated={b: results[b]["n_sat"] for b in plan.cfg.bands})
    (tmp / "field.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    publish(tmp, out / "fields" / lay.name)


def _write_outputs(cfg: SimConfig, out: Path, layout: list[FieldLayout], cat, owner: dict[int, int],
                   chash: str) -> Path:
    tables = {}
    for name in ("objects", "lenses", "anomalies"):
        parts = [pd.read_parquet(out / "fields" / lay.name / f"truth-{name}.parquet") for lay in layout]
        parts = [p for p in parts if not p.empty]
        tables[name] = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    rows = []
    bcgs = {c.bcg_id: None for c in cat.clusters}
    bcgs.update({s.id: s for s in cat.sources if s.id in bcgs})
    for c in cat.clusters:
        row = c.truth()
        k = owner[c.bcg_id]
        lay = layout[k]
        x, y = lay.wcs().all_world2pix(c.ra, c.dec, 0)
        row.update(field=lay.name, x=float(x), y=float(y),
                   **{f"mag_bcg_{b}": bcgs[c.bcg_id].mag[b] for b in cfg.bands})
        rows.append(row)
    tables["clusters"] = pd.DataFrame(rows)
    truth_paths = {}
    for name in TRUTH_TABLES:
        path = out / "truth" / f"{name}.parquet"
        _write_table(tables[name], path)
        truth_paths[name] = str(path.relative_to(out))

    fields = []
    for lay in layout:
        rec = json.loads((out / "fields" / lay.name / "field.json").read_text())
        fields.append(dict(
            name=lay.name, ra=lay.ra, dec=lay.dec, shape=[cfg.size, cfg.size], pixel_scale=cfg.pixel_scale,
            bands={b: dict(zeropoint=cfg.zeropoint, psf_fwhm=round(rec["psf_fwhm"][b], 5),
                           **{k: f"fields/{lay.name}/{v}" for k, v in file_names(lay.name, b).items()})
                   for b in cfg.bands}))
    manifest = dict(kind="deepfield-simulation", deepfield_version=__version__, config_hash=chash,
                    config=json.loads(cfg.model_dump_json()), fields=fields, truth=truth_paths,
                    counts={name: int(len(df)) for name, df in tables.items()})
    write_text(out / MANIFEST, yaml.safe_dump(manifest, sort_keys=False))
    return out / MANIFEST
