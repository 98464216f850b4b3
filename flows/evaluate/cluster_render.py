"""The cluster finder's fast renderer against GalSim (`deepfield eval cluster-render`).

The network is trained on skies drawn straight into binned pixels (tasks/trainsets/binned_render.py) and
runs on survey images binned by the stage. This compares the two on the same catalog: `deepfield simulate`
renders held-out fields with GalSim (full resolution, artefacts, saturation), the ingest writes them to a
store and the stage's own binning (`block_sums`, `planes_from_sums`) reads them; the fast renderer draws the
same fields' plans (same sources, PSFs, noise levels, artefacts, exposure maps; its own noise realisation).

Figures, per band and over all fields:
- pixel histograms of the network's input planes: percentiles 1, 16, 50, 84, 99, 99.9 and their largest
  difference, and the correlation of the two planes pixel by pixel (bounded by the independent noise);
- colours of each cluster's red-sequence light: the background-subtracted flux within 0.3 Mpc of the BCG in
  each band, as adjacent-band colours, fast minus GalSim;
- the network: its heat-map peak within 0.5 Mpc of each true cluster on both, and the detections above the
  stage's threshold elsewhere.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from deepfield.models.progress import say
from deepfield.tasks.sim.config import SimConfig

EVAL_SEED = 20261130
PERCENTILES = (1, 16, 50, 84, 99, 99.9)
CORE_MPC = 0.3


def _core_fluxes(sums: np.ndarray, xb: float, yb: float, radius: float) -> np.ndarray:
    """Per band, the flux (ADU per pixel, summed over blocks) within `radius` binned pixels of (xb, yb), minus
    the median block of an annulus 2-3 radii out."""
    total, n, _ = sums
    mean = total / np.maximum(n, 1)
    h, w = mean.shape[-2:]
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(xx - xb, yy - yb)
    core, ring = r <= radius, (r > 2 * radius) & (r <= 3 * radius)
    return np.array([m[core].sum() - np.median(m[ring]) * core.sum() for m in mean])


def compare(weights: Path | None = None, n_fields: int = 4, size: int = 2048, seed: int = EVAL_SEED,
            workers: int = 2, work: Path | None = None, device: str = "cpu") -> dict:
    """Simulate `n_fields` fields (one rich cluster each: richness 40-120, z 0.1-0.8) with GalSim into `work`
    (reused), render the same plans fast, and compare (module docstring)."""
    import shutil
    import tempfile

    from deepfield.models.cluster_net import detect
    from deepfield.models.registry import create_model, model_version, weights_version
    from deepfield.tasks.astro import arcsec_per_mpc
    from deepfield.tasks.sim.catalog import build_survey_catalog
    from deepfield.tasks.sim.field import plan_field
    from deepfield.tasks.sim.layout import survey_layout
    from deepfield.tasks.stages.cluster_planes import field_sums, planes_from_sums
    from deepfield.tasks.trainsets.binned_render import render_binned
    from deepfield.tasks.trainsets.fields import simulate_fields
    from deepfield.tasks.zarr_store import open_store
    from astropy.wcs import WCS
    from deepfield.tasks.zarr_store import attrs_to_header

    model = create_model("cluster_net", device=device, weights=weights).eval()
    bands, bin = list(model.bands), int(model.bin)
    cfg = SimConfig(seed=seed, size=size, fields=n_fields, bands=bands, population=dict(
        clusters_per_field=1.0, cluster_richness=(40.0, 120.0), cluster_z=(0.1, 0.8)))
    tmp = work is None
    work = Path(tempfile.mkdtemp(prefix="deepfield-cluster-render-")) if tmp else Path(work)
    try:
        say(f"simulating {n_fields} fields of {size}^2 px with GalSim (seed {seed}) into {work} ...")
        root = open_store(simulate_fields(cfg, work, workers, say))
        truth = pd.read_parquet(work / "sim" / "truth" / "clusters.parquet")
        cat = build_survey_catalog(cfg)
        ra, dec = cat.positions()
        planes, cores, t_fast = {"galsim": [], "fast": []}, [], 0.0
        for lay in survey_layout(cfg):
            g = root["fields"][lay.name]
            t0 = time.perf_counter()
            fast_sums = render_binned(plan_field(cfg, lay, cat.sources, ra, dec), bin, np.random.default_rng([seed, lay.index]), bands)
            t_fast += time.perf_counter() - t0
            sums = {"galsim": field_sums(g, bands, bin), "fast": fast_sums}
            pl = {k: planes_from_sums(v, bin) for k, v in sums.items()}
            for k in pl:
                planes[k].append(pl[k])
            found = {k: pd.DataFrame(detect(model, pl[k], 0.05, device=device)) for k in pl}
            wcs = WCS(attrs_to_header(g.attrs["wcs_header"]))
            x, y = wcs.all_world2pix(truth.ra.to_numpy(), truth.dec.to_numpy(), 0)
            for c, xi, yi in zip(truth.itertuples(), x, y):
                if not (0 <= xi < size and 0 <= yi < size):
                    continue
                xb, yb = (xi - (bin - 1) / 2) / bin, (yi - (bin - 1) / 2) / bin
                r = CORE_MPC * arcsec_per_mpc(float(c.z)) / (bin * cfg.pixel_scale)
                f = {k: _core_fluxes(v, xb, yb, r) for k, v in sums.items()}
                row = dict(field=lay.name, cluster_id=int(c.cluster_id), z=float(c.z), richness=float(c.richness))
                for k in f:
                    row.update({f"flux_{b}_{k}": float(v) for b, v in zip(bands, f[k])})
                    d = np.hypot(found[k].x - xb, found[k].y - yb)
                    near = d <= 0.5 * arcsec_per_mpc(float(c.z)) / (bin * cfg.pixel_scale)
                    row[f"heat_{k}"] = float(found[k].score[near].max()) if near.any() else 0.0
                    row[f"false_{k}"] = int((~near & (found[k].score >= 0.3)).sum())
                cores.append(row)
        version = weights_version(weights) if weights else model_version("cluster_net")
    finally:
        if tmp:
            shutil.rmtree(work, ignore_errors=True)
    stack = {k: np.stack(v) for k, v in planes.items()}
    per_band = {}
    for i, b in enumerate(bands):
        a, f = stack["galsim"][:, i].ravel(), stack["fast"][:, i].ravel()
        pa, pf = np.percentile(a, PERCENTILES), np.percentile(f, PERCENTILES)
        per_band[b] = dict(percentiles_galsim=pa.round(3).tolist(), percentiles_fast=pf.round(3).tolist(),
                           largest_percentile_difference=float(np.abs(pa - pf).max()),
                           correlation=float(np.corrcoef(a, f)[0, 1]))
    cores = pd.DataFrame(cores)
    colours = {}
    for b1, b2 in zip(bands[:-1], bands[1:]):
        ok = (cores[f"flux_{b1}_galsim"] > 0) & (cores[f"flux_{b2}_galsim"] > 0) & (cores[f"flux_{b1}_fast"] > 0) & (cores[f"flux_{b2}_fast"] > 0)
        col = {k: -2.5 * np.log10(cores[f"flux_{b1}_{k}"][ok] / cores[f"flux_{b2}_{k}"][ok]) for k in ("galsim", "fast")}
        d = (col["fast"] - col["galsim"]).to_numpy()
        colours[f"{b1}-{b2}"] = dict(n=int(ok.sum()), median_difference=float(np.median(d)) if len(d) else None,
                                     largest_difference=float(np.abs(d).max()) if len(d) else None)
    return dict(weights_version=version, n_fields=n_fields, size=size, seed=seed, percentiles=list(PERCENTILES),
                fast_seconds_per_field=round(t_fast / n_fields, 2), bands=per_band, colours=colours,
                clusters=cores[["field", "cluster_id", "z", "richness", "heat_galsim", "heat_fast", "false_galsim",
                                "false_fast"]].to_dict("records"))


def format_report(r: dict) -> str:
    lines = [f"{r['n_fields']} fields of {r['size']}^2 px (seed {r['seed']}): GalSim through the ingest and the stage's "
             f"binning, against the fast renderer on the same plans ({r['fast_seconds_per_field']:.1f} s per field); "
             f"weights {r['weights_version']}", "",
             f"network input planes, percentiles {', '.join(str(p) for p in r['percentiles'])}:"]
    for b, v in r["bands"].items():
        lines.append(f"  {b}: GalSim {v['percentiles_galsim']}")
        lines.append(f"     fast   {v['percentiles_fast']}  largest difference {v['largest_percentile_difference']:.3f}, "
                     f"pixel correlation {v['correlation']:.3f}")
    lines += ["", f"colours of the clusters' light within {CORE_MPC} Mpc, fast minus GalSim (mag):"]
    for c, v in r["colours"].items():
        lines.append(f"  {c}: median {v['median_difference']:+.3f}, largest {v['largest_difference']:.3f} ({v['n']} clusters)")
    lines += ["", "the network's heat-map peak at each cluster (GalSim / fast), false detections >= 0.3 elsewhere:"]
    for c in r["clusters"]:
        lines.append(f"  {c['field']} cluster {c['cluster_id']} (z {c['z']:.2f}, richness {c['richness']:.0f}): "
                     f"{c['heat_galsim']:.2f} / {c['heat_fast']:.2f}; {c['false_galsim']} / {c['false_fast']}")
    return "\n".join(lines)
