"""Evaluation of the cluster finder beside the red-sequence baseline (`deepfield eval cluster`).

Held-out fields: `deepfield simulate` with `clusters_per_field` (1) cluster per field on average (richness
15-120 log-uniform, z 0.1-1.0 uniform, the simulator's defaults; the network was trained on skies composed
from other seeds' backgrounds and clusters), at a seed no training uses, laid out as one contiguous survey
(neighbouring fields overlap by 20", so clusters straddle field edges). They go through the pipeline's own
code: ingest into a Zarr store; the tile runner with the background, detect and measure stages on every tile
and the merge (catalogs/merge.py) into the source catalog the baseline needs (kept in the work directory and
reused); and the tile runner with the cluster stage alone (it reads its own pixels; at a heat-map threshold of
`SCAN[0]`, so that higher thresholds can be applied afterwards; one run per weights version). The network's
candidates are then cut at `threshold` and suppressed on the sky and in redshift as the merge does
(catalogs/clusters.py); the baseline
(flows/evaluate/baseline_redsequence.py) runs on the merged source catalog (the rows each field owns).

Matching: detections in descending score (the baseline's: significance); a detection finds the nearest
not yet found true cluster within `MATCH_MPC` (0.5 Mpc, physical, at the true redshift). Completeness: the
fraction of true clusters found, by richness and by redshift; the target set is richness >= 30 and
z <= 0.8. Purity: the fraction of detections that found a true cluster (of any richness or redshift), for
all detections and for those with an estimated z <= 0.8 (and, for the network, estimated richness >= 30).
Completeness is also given for the isolated clusters of the target set (no other true cluster within
1 Mpc on the sky), and purity by estimated richness and redshift.
Centre offset and the redshift error (z_est - z) / (1 + z) (NMAD, bias and the largest) over the target
set's matches; for the network both its catalog redshift `z` (refined on the red sequence as the merge
does, catalogs/clusters.refine_redshifts) and its own `z_net`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from deepfield.catalogs.clusters import read_candidates, refine_redshifts, suppress
from deepfield.catalogs.merge import merge_catalog
from deepfield.models.progress import say
from deepfield.models.registry import model_version, weights_version
from deepfield.models.train_cluster import greedy_match
from deepfield.tasks.astro import arcsec_per_mpc, separation_arcsec
from deepfield.tasks.tile_runner import TileRunner, source_tables
from deepfield.tasks.sim.config import SimConfig
from deepfield.tasks.trainsets.fields import simulate_fields
from deepfield.tasks.zarr_sky import sky_fields
from deepfield.tasks.zarr_store import all_tiles, open_store

from .baseline_redsequence import find_clusters

EVAL_SEED = 20261126
MATCH_MPC = 0.5
SCAN = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
RICHNESS_BINS = (15, 20, 30, 50, 80, 121)
Z_BINS = (0.1, 0.3, 0.5, 0.65, 0.8, 1.0)
EVAL_STAGES = ("background", "detect", "measure")


def eval_fields(seed: int, n_fields: int, size: int = 2048, clusters_per_field: float = 1.0,
                pixel_scale: float | None = None) -> SimConfig:
    """The held-out survey: the simulator's defaults with `clusters_per_field` clusters per field; with
    `pixel_scale` (arcsec) the same sky, seeing and depth on that grid (the fields then cover more or less sky)."""
    extra = {} if pixel_scale is None else dict(pixel_scale=pixel_scale)
    return SimConfig(seed=seed, size=size, fields=n_fields, population=dict(clusters_per_field=clusters_per_field),
                     **extra)


def match_sky(det: pd.DataFrame, score: str, truth: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(truth row found by each detection or -1, detection row that found each true cluster or -1): the
    training's greedy matching (models/train_cluster.greedy_match) on the sky, within MATCH_MPC at the true z."""
    radius = np.array([MATCH_MPC * arcsec_per_mpc(float(z)) for z in truth.z])
    ra, dec = truth.ra.to_numpy(), truth.dec.to_numpy()
    return greedy_match(det[score].to_numpy(float),
                        lambda i: separation_arcsec(det.ra.iat[i], det.dec.iat[i], ra, dec), radius)


def isolated(truth: pd.DataFrame, mpc: float = 1.0) -> np.ndarray:
    """True for the clusters with no other true cluster within `mpc` (physical, at their redshift) on the
    sky, whatever its redshift: the others overlap in projection."""
    return np.array([(separation_arcsec(t.ra, t.dec, truth.ra.to_numpy(), truth.dec.to_numpy())
                      < mpc * arcsec_per_mpc(float(t.z))).sum() == 1 for t in truth.itertuples()], bool)


def _binned(flags: np.ndarray, values: np.ndarray, edges, among: np.ndarray, name: str) -> list[dict]:
    """The fraction of `flags` set, as `name`, in bins of `values`, over the rows `among` selects: completeness
    (true clusters found, by true richness or z) or purity (true detections, by estimated richness or z)."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (values >= lo) & (values < hi) & among
        out.append({"lo": lo, "hi": hi, "n": int(sel.sum()), name: float(flags[sel].mean()) if sel.any() else None})
    return out


def figures(det: pd.DataFrame, score: str, truth: pd.DataFrame, est_richness: bool) -> dict:
    """Completeness, purity, centre and redshift figures of one finder's detections against the truth."""
    det_to, true_to = match_sky(det, score, truth)
    found = true_to >= 0
    lam, zt = truth.richness.to_numpy(float), truth.z.to_numpy(float)
    target = (lam >= 30) & (zt <= 0.8)
    hit = target & found
    idx = true_to[hit]
    off = np.array([separation_arcsec(truth.ra.iat[j], truth.dec.iat[j], det.ra.iat[i], det.dec.iat[i])
                    for j, i in zip(np.nonzero(hit)[0], idx)]).ravel()
    kpc = off / np.array([arcsec_per_mpc(z) for z in zt[hit]]) * 1000 if hit.any() else np.zeros(0)
    dz = (det.z.to_numpy(float)[idx] - zt[hit]) / (1 + zt[hit])
    true_det = det_to >= 0
    low_z = det.z.to_numpy(float) <= 0.8
    iso = isolated(truth)
    r = dict(n_true=int(len(truth)), n_detections=int(len(det)), n_target=int(target.sum()),
             completeness_target=float(found[target].mean()) if target.any() else None,
             n_target_isolated=int((target & iso).sum()),
             completeness_target_isolated=float(found[target & iso].mean()) if (target & iso).any() else None,
             missed_target=[dict(richness=float(lam[j]), z=float(zt[j])) for j in np.nonzero(target & ~found)[0]],
             purity=float(true_det.mean()) if len(det) else None,
             purity_z08=float(true_det[low_z].mean()) if low_z.any() else None,
             false_detections=[dict(z=float(det.z.iat[i]), score=float(det[score].iat[i]))
                               for i in np.nonzero(~true_det)[0]],
             completeness_by_richness=_binned(found, lam, RICHNESS_BINS, zt <= 0.8, "completeness"),
             completeness_by_z=_binned(found, zt, Z_BINS, lam >= 30, "completeness"),
             offset_arcsec_median=float(np.median(off)) if off.size else None,
             offset_kpc_median=float(np.median(kpc)) if kpc.size else None,
             offset_kpc_p90=float(np.percentile(kpc, 90)) if kpc.size else None,
             sigma_z_nmad=float(1.4826 * np.median(np.abs(dz - np.median(dz)))) if dz.size else None,
             z_bias=float(np.median(dz)) if dz.size else None,
             dz_max=float(np.abs(dz).max()) if dz.size else None)
    if est_richness:
        rich = det.richness.to_numpy(float) >= 30
        sel = rich & low_z
        r["purity_rich_z08"] = float(true_det[sel].mean()) if sel.any() else None
        lnr = np.log(det.richness.to_numpy(float)[idx] / lam[hit])
        r["richness_scatter_ln"] = float(1.4826 * np.median(np.abs(lnr - np.median(lnr)))) if lnr.size else None
        r["richness_bias_ln"] = float(np.median(lnr)) if lnr.size else None
        r["richness_ratio_median"] = float(np.exp(np.median(lnr))) if lnr.size else None
        r["richness_scatter_dex"] = float(1.4826 * np.median(np.abs(lnr - np.median(lnr))) / np.log(10)) if lnr.size else None
        r["purity_by_richness"] = _binned(true_det, det.richness.to_numpy(float), (0,) + RICHNESS_BINS[1:] + (1e9,), low_z, "purity")
        r["purity_by_z"] = _binned(true_det, det.z.to_numpy(float), (0.0,) + Z_BINS[1:] + (9.9,), rich, "purity")
    return r


def _run_tiles(store: Path, run_dir: Path, stages: list[tuple[str, dict]], halo: int, device: str, label: str,
               every: int) -> float:
    """The tile runner with `stages` over every tile of the store, with a progress line every `every` tiles;
    returns the mean seconds per tile."""
    runner = TileRunner(str(store), str(run_dir), stages, halo=halo, device=device)
    tiles = all_tiles(open_store(store), halo)
    t0 = time.perf_counter()
    for n, tile in enumerate(tiles, 1):
        runner.process(str(tile))
        if n % every == 0 or n == len(tiles):
            say(f"{label}: {n}/{len(tiles)} tiles")
    return (time.perf_counter() - t0) / len(tiles)


def _classical(store: Path, run_dir: Path, device: str) -> None:
    """The tile runner with EVAL_STAGES over every tile, then the merge: the baseline's source catalog."""
    _run_tiles(store, run_dir, [(s, {}) for s in EVAL_STAGES], 64, device, ", ".join(EVAL_STAGES), 16)
    merge_catalog(run_dir, sky_fields(open_store(store)), run_dir / "catalogs", write_fits=False)


def _clusters(store: Path, run_dir: Path, weights: Path | None, device: str) -> float:
    """The cluster stage alone (it reads its own pixels) over every tile at threshold SCAN[0]; returns the
    mean seconds per tile."""
    stage = dict(threshold=SCAN[0], weights=str(weights) if weights else None)
    return _run_tiles(store, run_dir, [("cluster", stage)], 0, device, "cluster", 64)


def evaluate(weights: Path | None = None, n_fields: int = 32, size: int = 2048, clusters_per_field: float = 1.0,
             seed: int = EVAL_SEED, threshold: float = 0.3, workers: int = 2, work: Path | None = None,
             device: str = "cpu", pixel_scale: float | None = None) -> dict:
    import shutil
    import tempfile


    version = weights_version(weights) if weights else model_version("cluster_net")
    cfg = eval_fields(seed, n_fields, size, clusters_per_field, pixel_scale)
    tmp = work is None
    work = Path(tempfile.mkdtemp(prefix="deepfield-eval-cluster-")) if tmp else Path(work)
    try:
        say(f"simulating {n_fields} held-out fields of {size}^2 px (seed {seed}) into {work} ...")
        store = simulate_fields(cfg, work, workers, say)
        sources_dir = work / "sources"  # the classical stages' run, reused while it is complete
        if not (sources_dir / "catalogs" / "sources_flat").exists():
            shutil.rmtree(sources_dir, ignore_errors=True)
            _classical(store, sources_dir, device)
        run_dir = work / f"clusters-{version}"  # the cluster stage's run, one per weights version
        stamp = run_dir / "eval.json"
        if stamp.exists():
            seconds = json.loads(stamp.read_text())["seconds_per_tile"]
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            seconds = _clusters(store, run_dir, weights, device)
            stamp.write_text(json.dumps(dict(seconds_per_tile=seconds)))
        truth = pd.read_parquet(work / "sim" / "truth" / "clusters.parquet")
        tiles = source_tables(run_dir)
        cand = read_candidates(tiles)
        sources = pd.read_parquet(sources_dir / "catalogs" / "sources_flat")
        sources = sources[sources.is_primary_field.to_numpy(bool)]
        t0 = time.perf_counter()
        base = find_clusters(sources)
        t_base = time.perf_counter() - t0
    finally:
        if tmp:
            shutil.rmtree(work, ignore_errors=True)
    net = {}
    bands = ["g", "r", "i", "z"]
    for th in sorted(set(SCAN) | {threshold}):
        det = refine_redshifts(suppress(cand[cand.score >= th], 0.5, 0.1), sources, bands)
        net[f"{th:.2f}"] = f = figures(det, "score", truth, est_richness=True)
        zf = figures(det.assign(z=det.z_net), "score", truth, est_richness=False)  # the network's own z
        f.update({f"{k}_net": zf[k] for k in ("sigma_z_nmad", "z_bias", "dz_max")})
    return dict(weights_version=version, n_fields=n_fields, size=size, pixel_scale=cfg.pixel_scale, seed=seed,
                threshold=threshold,
                match_mpc=MATCH_MPC, n_clusters=int(len(truth)), cluster_seconds_per_tile=round(seconds, 3),
                n_tiles=len(tiles), baseline_seconds=round(t_base, 1),
                network=net[f"{threshold:.2f}"], network_scan=net,
                baseline=figures(base.assign(score=base.significance), "score", truth, est_richness=False))


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def format_report(r: dict) -> str:
    scale = f" at {r['pixel_scale']:g}\"/px" if r.get("pixel_scale") is not None else ""
    lines = [f"{r['n_fields']} held-out fields of {r['size']}^2 px{scale} (seed {r['seed']}), {r['n_clusters']} clusters "
             f"({r['network']['n_target']} with richness >= 30 at z <= 0.8, {r['network']['n_target_isolated']} of them isolated); "
             f"weights {r['weights_version']}; matched within {r['match_mpc']} Mpc", ""]
    lines.append(f"{'':34s}{'network':>12s}{'red sequence':>14s}")
    n, b = r["network"], r["baseline"]
    rows = [("detections", "n_detections", "d"), ("completeness, richness>=30 z<=0.8", "completeness_target", ".3f"),
            ("  of them isolated (1 Mpc)", "completeness_target_isolated", ".3f"),
            ("purity, all detections", "purity", ".3f"), ("purity, est. z<=0.8", "purity_z08", ".3f"),
            ("centre offset, median kpc", "offset_kpc_median", ".0f"), ("centre offset, 90% kpc", "offset_kpc_p90", ".0f"),
            ("sigma_z/(1+z) NMAD", "sigma_z_nmad", ".3f"), ("z bias", "z_bias", "+.3f"), ("|dz|/(1+z) max", "dz_max", ".3f")]
    for label, key, spec in rows:
        lines.append(f"{label:34s}{_fmt(n[key], spec):>12s}{_fmt(b[key], spec):>14s}")
    for label, key, spec in rows[-3:]:
        lines.append(f"{label + ', z_net':34s}{_fmt(n[key + '_net'], spec):>12s}")
    lines.append(f"{'purity, est. richness>=30 z<=0.8':34s}{_fmt(n.get('purity_rich_z08'), '.3f'):>12s}")
    lines.append(f"{'richness ratio est/true, median':34s}{_fmt(n.get('richness_ratio_median'), '.3f'):>12s}")
    lines.append(f"{'richness scatter (NMAD), dex':34s}{_fmt(n.get('richness_scatter_dex'), '.3f'):>12s}")
    lines.append(f"{'time':34s}{r['cluster_seconds_per_tile']:>10.2f} s/tile{r['baseline_seconds']:>8.1f} s all")
    lines += ["", f"completeness by richness (z <= 0.8):{'':4s}network  red sequence"]
    for a, c in zip(n["completeness_by_richness"], b["completeness_by_richness"]):
        lines.append(f"  {a['lo']:>4}-{a['hi']:<4} ({a['n']:3d}){'':22s}{_fmt(a['completeness']):>6s}{_fmt(c['completeness']):>10s}")
    lines += ["completeness by redshift (richness >= 30):"]
    for a, c in zip(n["completeness_by_z"], b["completeness_by_z"]):
        lines.append(f"  {a['lo']:.2f}-{a['hi']:<4.2f} ({a['n']:3d}){'':20s}{_fmt(a['completeness']):>6s}{_fmt(c['completeness']):>10s}")
    lines += ["purity of the network's detections by estimated richness (est. z <= 0.8):"]
    for a in n["purity_by_richness"]:
        lines.append(f"  {a['lo']:>4}-{a['hi']:<4g} ({a['n']:3d}){'':22s}{_fmt(a['purity']):>6s}")
    lines += ["purity by estimated redshift (est. richness >= 30):"]
    for a in n["purity_by_z"]:
        lines.append(f"  {a['lo']:.2f}-{a['hi']:<4.2f} ({a['n']:3d}){'':20s}{_fmt(a['purity']):>6s}")
    lines += ["", "network by heat-map threshold: threshold, detections, completeness (target), purity"]
    for th, f in r["network_scan"].items():
        lines.append(f"  {th}  {f['n_detections']:4d}  {_fmt(f['completeness_target'], '.3f')}  {_fmt(f['purity'], '.3f')}")
    return "\n".join(lines)
