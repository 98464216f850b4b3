"""Evaluation of the learned deblender against SEP and scarlet2 on the same blends and detections
(`deepfield eval deblend`).

For each simulated blend (tasks.trainsets.blend_stamps), the pipeline's own `detect` and `measure` stages run on
the blend as on a tile; detections are matched one-to-one to the true members (nearest first, within 2 px).
The same detected centres then go to each method:
- sep: the pipeline's SEP deblending; each child's flux is its Kron ellipse (3.5 Kron radii, as `measure`)
  summed with the pixels of the other deblended children masked (SEP's segmentation-map masking);
- unet: the learned deblender (models/deblend_unet.py), flux = sum of fraction x observed pixels;
- symmetric: the deblend stage's default, each pixel's light shared in proportion to the members' symmetric,
  monotonic templates (tasks/stages/_templates.py), flux = sum of that share x observed pixels;
- scarlet2: scarlet2 fitted with one source per detected centre (flows/evaluate/baseline_scarlet2.py).
A member that is not detected counts as not recovered for every method. F_true is the member's flux as if it
were alone in the same stamp: the sum of its noiseless isolated image over the stamp's pixels. (The
catalogue's total flux is up to 26% larger for bright members near the stamp's edge; that light is outside
what any method sees, so it would measure the stamp size rather than the deblending. The median of that
shortfall is reported as `stamp_shortfall`; and as scarlet2's model extends past the stamp, every method's
median |error| against the total flux is reported too, `median_abs_against_total`.) Figures, for detected
members brighter than `mag_limit` (23.5) in the reference band: median and 16-84% range of the fractional
flux error (F_measured - F_true) / F_true per band and of the g - i colour error (mag), the median |error|;
the fraction of close pairs (members closer than `close_pair` arcsec, 1.0) with both members detected and
measured within 20% in the reference band; and the CPU time per blend of each method (detection excluded).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import sep
from astropy.wcs import WCS

from deepfield.models.deblend_unet import fit_fluxes, fractions, member_images, member_inputs, share
from deepfield.models.progress import say
from deepfield.models.registry import create_model
from deepfield.tasks.stages._templates import template_fractions
from deepfield.tasks.stages.detect import DetectStage
from deepfield.tasks.stages.measure import MeasureStage
from deepfield.tasks.tiling import Box, TileId
from deepfield.tasks.trainsets.blend_stamps import BlendConfig, simulate_blends
from deepfield.tasks.zarr_read import Tile

EVAL_SEED = 20261124



def blend_tile(image: np.ndarray, sigma: np.ndarray, fwhm: np.ndarray, cfg: BlendConfig) -> Tile:
    """A blend stamp as a tile (no halo, the whole stamp its core) for the pipeline's stages."""
    nb, n, _ = image.shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [n / 2, n / 2]
    w.wcs.cdelt = [-cfg.pixel_scale / 3600, cfg.pixel_scale / 3600]
    invvar = np.broadcast_to((1.0 / sigma.astype(np.float64) ** 2)[:, None, None], image.shape).astype(np.float32)
    box = Box(0, n, 0, n)
    return Tile(id=TileId("blend", 0, 0), bands=list(cfg.bands), image=image.copy(), invvar=invvar,
                mask=np.zeros(image.shape, np.uint16), box=box, core=box, wcs=w,
                zeropoints=[cfg.zeropoint] * nb, psf_fwhm=[float(f) for f in fwhm], pixel_scale=cfg.pixel_scale,
                field_shape=(n, n))


def detect(tile: Tile) -> tuple[pd.DataFrame, np.ndarray]:
    """The pipeline's detection and measurement on a tile: (table, deblended segmentation map)."""
    det = DetectStage()
    table = MeasureStage().run(tile, det.run(tile, pd.DataFrame()))
    return table.reset_index(drop=True), det.segmap


def match(table: pd.DataFrame, members: pd.DataFrame, radius: float = 2.0) -> dict[int, int]:
    """member index -> detection row, one-to-one, nearest pairs first, within `radius` px."""
    if table.empty:
        return {}
    d = np.hypot(members.x.to_numpy()[:, None] - table.x_tile.to_numpy()[None],
                 members.y.to_numpy()[:, None] - table.y_tile.to_numpy()[None])
    out, used = {}, set()
    for flat in np.argsort(d, axis=None):
        m, k = np.unravel_index(flat, d.shape)
        if d[m, k] > radius:
            break
        if m in out or k in used:
            continue
        out[int(m)] = int(k)
        used.add(int(k))
    return out


def sep_fluxes(tile: Tile, table: pd.DataFrame, segmap: np.ndarray, kron_k: float = 3.5) -> np.ndarray:
    """(N, B) Kron fluxes of every detection with the other children's pixels masked."""
    x, y = table.x_tile.to_numpy(float), table.y_tile.to_numpy(float)
    a, b = np.clip(table.a.to_numpy(float), 1e-3, None), np.clip(table.b.to_numpy(float), 1e-3, None)
    th = np.clip(table.theta.to_numpy(float), -np.pi / 2, np.pi / 2)
    r = np.maximum(kron_k * table.kron_radius.to_numpy(float), 1.75 / np.sqrt(a * b))
    seg_id = table.seg_id.to_numpy(np.int32)
    out = np.zeros((len(table), len(tile.bands)))
    for j in range(len(tile.bands)):
        data = np.ascontiguousarray(tile.image[j], dtype=np.float64)
        f, _, _ = sep.sum_ellipse(data, x, y, a, b, th, r, subpix=5, segmap=np.ascontiguousarray(segmap, np.int32),
                                  seg_id=seg_id)
        out[:, j] = f
    return out


def unet_fluxes(model, image: np.ndarray, sigma: np.ndarray, centres: np.ndarray, normalise: bool = True) -> np.ndarray:
    """(N, B) learned-deblender fluxes of the members at `centres` ((N, 2) as (y, x) px) of one stamp;
    normalise: share each pixel's light among the members (deblend_unet.share). An image head's templates are
    fitted to the stamp together (deblend_unet.fit_fluxes, the sky noise `sigma` as the pixels' variance)."""
    inputs = member_inputs(image, sigma, centres)
    f = fractions(model, inputs)
    if getattr(model, "output", "fraction") == "image":
        var = np.broadcast_to(np.asarray(sigma, np.float64)[:, None, None] ** 2, image.shape)
        flux = fit_fluxes(member_images(f, sigma), image, var)[0]
        return np.where(np.isfinite(flux), flux, 0.0)
    if normalise and len(f) > 1:
        f = share(f)
    return (f * image[None]).sum(axis=(2, 3))


def evaluate(n: int = 300, seed: int = EVAL_SEED, weights: Path | None = None, scarlet: bool = True,
             mag_limit: float = 23.5, close_pair: float = 1.0) -> dict:
    import torch
    torch.set_num_threads(1)  # times per blend are single-core for every method (SEP and scarlet2's fits too)
    model = create_model("deblend_unet", weights=weights)
    cfg = BlendConfig.model_validate(model.training_info.get("blend_config", {}))
    say(f"simulating {n} held-out blends (seed {seed}) ...")
    d = simulate_blends(n, seed, cfg, workers=2)
    if scarlet:
        from .baseline_scarlet2 import scarlet2_fluxes
    # the reference band of the magnitude limit: the weights' (i), else r, else their reddest (a g, r, z variant)
    ref_band = next(b for b in (cfg.reference_band, "r", cfg.bands[-1]) if b in cfg.bands)
    ri = cfg.bands.index(ref_band)
    rows, pairs = [], []
    times = {"sep": 0.0, "unet": 0.0, "symmetric": 0.0, "scarlet2": 0.0}
    t_first = None
    for b in range(n):
        members = d["members"][d["members"].blend == b].sort_values("member").reset_index(drop=True)
        tile = blend_tile(d["images"][b], d["sigma"][b], d["fwhm"][b], cfg)
        table, segmap = detect(tile)
        m2d = match(table, members)
        est = {}
        if len(table):
            t = time.perf_counter()
            est["sep"] = sep_fluxes(tile, table, segmap)
            times["sep"] += time.perf_counter() - t
            centres = table[["y_tile", "x_tile"]].to_numpy(float)
            t = time.perf_counter()
            est["unet"] = unet_fluxes(model, d["images"][b], d["sigma"][b], centres)
            times["unet"] += time.perf_counter() - t
            t = time.perf_counter()
            est["symmetric"] = (template_fractions(d["images"][b], centres) * d["images"][b][None]).sum(axis=(2, 3))
            times["symmetric"] += time.perf_counter() - t
            if scarlet:
                t = time.perf_counter()
                try:
                    est["scarlet2"] = scarlet2_fluxes(d["images"][b], d["sigma"][b], d["psf"][b], centres)
                except Exception as exc:  # a failed fit counts as a miss, not as a crash of the evaluation
                    say(f"  scarlet2 failed on blend {b}: {type(exc).__name__}: {exc}")
                    est["scarlet2"] = np.full((len(table), len(cfg.bands)), np.nan)
                dt = time.perf_counter() - t
                if t_first is None:
                    t_first = dt  # includes jax compilation; left out of the mean
                else:
                    times["scarlet2"] += dt
        for m, mem in members.iterrows():
            in_stamp = d["truth"][b][m].sum(axis=(1, 2), dtype=np.float64)
            row = dict(blend=b, member=m, mag_ref=mem[f"mag_{ref_band}"], detected=m in m2d,
                       n_members=len(members), shortfall=1 - in_stamp[ri] / mem[f"flux_{ref_band}"])
            for meth, f in est.items():
                for j, band in enumerate(cfg.bands):
                    true, total = in_stamp[j], mem[f"flux_{band}"]
                    row[f"{meth}_{band}"] = (f[m2d[m], j] - true) / true if m in m2d else np.nan
                    row[f"{meth}_{band}_total"] = (f[m2d[m], j] - total) / total if m in m2d else np.nan
            rows.append(row)
        xy = members[["x", "y"]].to_numpy(float) * cfg.pixel_scale
        for i in range(len(members)):
            for k in range(i + 1, len(members)):
                if np.hypot(*(xy[i] - xy[k])) < close_pair:
                    pairs.append((b, i, k))
        if (b + 1) % 50 == 0 or b + 1 == n:
            say(f"  {b + 1}/{n} blends")
    res = pd.DataFrame(rows)
    methods = ["sep", "unet", "symmetric"] + (["scarlet2"] if scarlet else [])
    bright = res[(res.mag_ref < mag_limit) & res.detected]
    out = dict(n_blends=n, n_members=int(len(res)), n_bright=int((res.mag_ref < mag_limit).sum()),
               n_bright_detected=int(len(bright)), mag_limit=mag_limit, seed=seed, truth="in-stamp flux alone",
               stamp_shortfall=dict(median=float(bright.shortfall.median()), max=float(bright.shortfall.max())),
               methods={})
    ref = ref_band
    for meth in methods:
        fig = {}
        for band in cfg.bands:
            e = bright[f"{meth}_{band}"].dropna().to_numpy()
            fig[band] = dict(median_abs=float(np.median(np.abs(e))), median=float(np.median(e)),
                             p16=float(np.percentile(e, 16)), p84=float(np.percentile(e, 84)), n=int(e.size))
        g_i = -2.5 * np.log10(np.clip(1 + bright[f"{meth}_g"], 1e-3, None)) \
            + 2.5 * np.log10(np.clip(1 + bright[f"{meth}_i"], 1e-3, None)) if "g" in cfg.bands and "i" in cfg.bands else None
        ok = 0
        for b, i, k in pairs:
            sub = res[(res.blend == b) & res.member.isin([i, k])]
            ok += int(sub.detected.all() and (sub[f"{meth}_{ref}"].abs() < 0.2).all())
        fig_all = dict(bands=fig, median_abs_against_total={
                           band: float(np.nanmedian(np.abs(bright[f"{meth}_{band}_total"]))) for band in cfg.bands},
                       median_abs_all_bands=float(np.nanmedian(np.abs(bright[[f"{meth}_{b}" for b in cfg.bands]].to_numpy()))),
                       close_pairs=len(pairs), close_pairs_recovered=ok,
                       close_pair_recovery=float(ok / len(pairs)) if pairs else None,
                       seconds_per_blend=float(times[meth] / max(1, n - (1 if meth == "scarlet2" else 0))))
        if g_i is not None:
            c = g_i.dropna().to_numpy()
            fig_all["colour_g_i"] = dict(median_abs=float(np.median(np.abs(c))), p16=float(np.percentile(c, 16)),
                                         p84=float(np.percentile(c, 84)))
        if meth == "scarlet2":
            fig_all["first_call_seconds"] = t_first
        out["methods"][meth] = fig_all
    out["detected_fraction_bright"] = float(res[res.mag_ref < mag_limit].detected.mean())
    return out


def format_report(r: dict) -> str:
    lines = [f"deblending {r['n_blends']} held-out blends ({r['n_members']} members; {r['n_bright_detected']} of "
             f"{r['n_bright']} members brighter than {r['mag_limit']} detected), fractional flux error "
             f"(F - F_true) / F_true, F_true the member's in-stamp flux alone (the stamp misses a median "
             f"{r['stamp_shortfall']['median']:.1%}, at most {r['stamp_shortfall']['max']:.0%}, of the total):"]
    bands = list(next(iter(r["methods"].values()))["bands"])
    lines.append(f"  {'method':9s} " + " ".join(f"{'|dF|/F ' + b:>10s} {'68% ' + b:>17s}" for b in bands)
                 + f" {'|d(g-i)|':>9s} {'pairs':>7s} {'s/blend':>9s}")
    for meth, f in r["methods"].items():
        cells = " ".join(f"{f['bands'][b]['median_abs']:10.4f} [{f['bands'][b]['p16']:+.3f},{f['bands'][b]['p84']:+.3f}]"
                         for b in bands)
        col = f.get("colour_g_i", {}).get("median_abs", float("nan"))
        pr = f["close_pair_recovery"]
        lines.append(f"  {meth:9s} {cells} {col:9.4f} {(pr if pr is not None else float('nan')):7.3f} "
                     f"{f['seconds_per_blend']:9.4f}")
    lines.append("  median |dF|/F against the catalogue's total flux instead: " + "; ".join(
        f"{meth} " + " ".join(f"{b} {f['median_abs_against_total'][b]:.4f}" for b in bands)
        for meth, f in r["methods"].items()))
    return "\n".join(lines)
