"""Evaluation of the anomaly stage's dense grid on held-out simulated fields with injected anomalies
(`deepfield eval anomaly`), counting every injected anomaly, detected or not.

The fields (`evaluation_fields`: the simulator's anomalies and artefacts, with more ring galaxies, mergers,
lenses and trails than by default) are background-subtracted by the pipeline's background stage; every tile's
grid windows (tasks/stages/_anomaly_grid.py, the anomaly stage's stride) are scored in the fast mode (encoder
only) and in the full mode (`steps` Adam steps on z), with the local score (the stage's `score`), the paper's
sum (`score_paper`) and the local score's sigma-score as the merge ranks the candidates by it (`sigma`: against
the windows as bright, catalogs/anomaly_candidates.window_sigma, over the evaluation's windows as over a run's,
with the stage's ring and line terms beside it, ranked_sigma and line_sigma (the line term where the stage takes
it: on the coarse windows and next to a line, line_next), and the merge's score terms, score_term and
with_lens_term: the lens and merger stages' candidates, for which the fields go through the pipeline's detect,
measure, lens and merger stages as in a run; `sigma_ring` without the score terms, `sigma_gan` without them and
the ring and line terms).

Truth: a window is *anomalous* (of a type) when an anomaly is its subject: a point-like one (cosmic ray, hot
pixels, ring galaxy, merger, lens) within 0.75 stride of its centre (so that every point of the field is the
subject of at least one window), a trail passing as close, a ghost's annulus as close;
*contaminated* when an anomaly lies elsewhere in it (left out of the figures); *normal* otherwise
(tasks.trainsets.anomaly.anomaly_geometry). Figures per mode and score:
- AUROC of the anomalous windows against the normal ones, overall and per type (each type against the normal
  windows);
- per injected anomaly, its best window (the highest score among the windows it is the subject of): the
  fraction of the anomalies, overall and per type, whose best window is in the top 1 % and top 0.1 % of all
  the windows' scores (normal and anomalous); and the fraction whose best window scores at least the 99th
  (99.9th) percentile of the normal windows alone, overall, per type and averaged over the types. These
  fields inject anomalies at 10-20 times a survey's rate (about 330 in two fields, 240 of them cosmic rays,
  and 1,300 anomalous windows against the 320 of a top 1 %): their own windows crowd the top 1 % of all
  windows, which no scorer could then hold 75 % of. In a survey, where anomalies are rare, the top 1 % of the
  ranking is the normal windows' 99th percentile; the mean over the types weighs each type alike, as a field
  with a few anomalies of each type does;
- the same without the ghosts under the noise of any window (S/N < VISIBLE_SNR, below) and their windows:
  the overall AUROC and the fractions above the normal windows' 99th percentile of the anomalies a window can
  show (`visible`; every other figure counts them all);
- the lens stage's deflector candidates (`lens_candidates`: position, score, whether a true lens lies within 4
  px), the merger stage's candidates at merger_score >= 0.5 (`merger_candidates`: whether a true merger's
  centre lies within 12 px, its nuclei being up to 3" apart) and the normal windows' sigma quantiles
  (`normal_sigma_quantiles`), the score terms' calibration (catalogs/score_terms.py), and the normal windows'
  line S/N quantiles (`normal_line_quantiles`), the line term's (catalogs/anomaly_candidates.py);
- throughput in windows per second (one torch thread) and the fast mode's speed-up over the full mode;
- a row of its own for the ghosts bright enough to be seen in a window, S/N >= VISIBLE_SNR (5) in a window
  their annulus covers (`ghost_window_snr`: amplitude over the sky noise in each of the scorer's bands, added
  in quadrature, times the square root of the window pixels the annulus can cover), and every ghost's S/N:
  the simulator draws most of them below 5, under the noise of any window whatever scores it; the `ghost` row
  and every other figure still count them all.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from deepfield.catalogs.anomaly_candidates import line_sigma, ranked_sigma, window_sigma
from deepfield.catalogs.score_terms import LENS_MIN_SCORE, MERGER_MIN_SCORE, SCORE_TERMS, score_term, with_lens_term
from deepfield.models.progress import say
from deepfield.tasks.sim.config import SimConfig
from deepfield.tasks.stages.anomaly import AnomalyStage
from deepfield.tasks.trainsets.anomaly import anomaly_geometry, label_sources

EVAL_SEED = 20261125
VISIBLE_SNR = 5.0  # a ghost's S/N in a window it covers (ghost_window_snr) from which it is counted as visible


def evaluation_fields(seed: int, n_fields: int, size: int = 1024, pixel_scale: float | None = None) -> SimConfig:
    """Held-out fields with the simulator's anomalies and artefacts at its default rates, except three times
    the ring galaxies, mergers and lenses (6 of each per field) and four times the satellite trails (2 per
    field), so that every type has enough members to measure; on the simulator's pixel grid, or sampled at
    `pixel_scale` (arcsec per pixel: the same sky, seeing and depth on another survey's grid)."""
    return SimConfig(seed=seed, size=size, fields=n_fields,
                     population=dict(lenses_per_field=6, ring_galaxies_per_field=6, mergers_per_field=6),
                     artefacts=dict(satellite_trails=2.0),
                     **({} if pixel_scale is None else {"pixel_scale": float(pixel_scale)}))


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


def _best_windows(windows, anomalies, lenses, stage, core: float) -> list[tuple[str, np.ndarray, object]]:
    """(type, window indices it is the subject of, the truth row's label) for every visible injected anomaly
    of every field."""
    out = []
    for name, w in windows.groupby("field"):
        a = anomalies[anomalies.field == name] if len(anomalies) else anomalies
        lz = lenses[lenses.field == name] if len(lenses) else lenses
        for key, kind, _, hit, _ in anomaly_geometry(w.x.to_numpy(float), w.y.to_numpy(float), a, lz, stage.size,
                                                    stage.bands, core):
            if hit.any():
                out.append((kind, w.index.to_numpy()[hit], key))
    return out


def ghost_window_snr(params: dict, sky_sigma: dict[str, float], size: int) -> float:
    """Signal-to-noise ratio of an optical ghost (truth parameters) in a grid window of `size` px that its
    annulus covers, seen by a scorer of the bands of `sky_sigma` (band -> the field's sky noise, the image's
    units): its flat amplitude over the sky noise, added in quadrature over the bands (a matched filter), times
    the square root of the window pixels the annulus can cover, size x min(width, size). A ghost far below
    VISIBLE_SNR is under the noise of every window whatever scores it."""
    amp = params.get("amplitude_by_band") or {}
    per_px = np.sqrt(sum((amp.get(b, params["amplitude"]) / s) ** 2 for b, s in sky_sigma.items()))
    return float(per_px * np.sqrt(size * min(params["width_pix"], size)))


def figures(scores: np.ndarray, label: np.ndarray, subjects: list[tuple[str, np.ndarray]],
            groups: dict[str, list[np.ndarray]] | None = None, unseen: np.ndarray | None = None,
            seen: list[bool] | None = None) -> dict:
    """The figures of one mode and score (module docstring); label per window: a type, "normal" or
    "contaminated". groups: name -> the window indices of each of its anomalies (a subset of `subjects`), given
    a row of its own among the types (its windows against the normal ones). With `unseen` (per window: the
    anomalous windows whose anomaly no window can show) and `seen` (per subject: whether it can be shown), also
    the overall AUROC without the unseen windows and the fractions above the normal windows' 99th percentile of
    the subjects that can be seen (`visible`)."""
    keep = label != "contaminated"
    s, lab = scores[keep], label[keep]
    y = lab != "normal"
    p99, p999 = np.percentile(s, 99), np.percentile(s, 99.9)
    n99, n999 = np.percentile(s[~y], 99), np.percentile(s[~y], 99.9)  # over the normal windows alone

    def frac(b: np.ndarray, t: float) -> float | None:
        return float((b >= t).mean()) if len(b) else None

    def row(m: np.ndarray, b: np.ndarray) -> dict:  # windows m (of the kept ones) against the normal ones
        sel = m | ~y
        return dict(windows=int(m.sum()), auroc=_auroc(s[sel], m[sel].astype(int)), injected=int(len(b)),
                    top1=frac(b, p99), top01=frac(b, p999), top1_normal=frac(b, n99), top01_normal=frac(b, n999))
    kinds = np.array([k for k, _ in subjects], dtype=object)
    top = np.array([scores[ix].max() for _, ix in subjects])  # each subject's best window
    best = {t: top[kinds == t] for t in sorted(set(kinds))}
    types = {t: row(lab == t, best.get(t, np.zeros(0))) for t in sorted(set(lab[y]) | set(best))}
    for name, members in (groups or {}).items():
        m = np.zeros(len(label), bool)
        for ix in members:
            m[ix] = True
        types[name] = row(m[keep], np.array([scores[ix].max() for ix in members]))
    allb = np.concatenate([v for v in best.values()]) if best else np.zeros(0)
    per_type = [types[t]["top1_normal"] for t in best if len(best[t])]
    out = dict(windows=int(len(s)), anomalous_windows=int(y.sum()), auroc=_auroc(s, y.astype(int)),
               injected=int(len(allb)), top1=frac(allb, p99), top01=frac(allb, p999),
               top1_normal=frac(allb, n99), top01_normal=frac(allb, n999),
               top1_normal_type_mean=float(np.mean(per_type)) if per_type else None, types=types)
    if unseen is not None and seen is not None:
        m = ~np.asarray(unseen, bool)[keep]
        vis = np.asarray(seen, bool)
        vtypes = list(dict.fromkeys(kinds[vis]))
        out["visible"] = dict(anomalous_windows=int((y & m).sum()), auroc=_auroc(s[m], y[m].astype(int)),
                              injected=int(vis.sum()), top1_normal=frac(top[vis], n99),
                              top1_normal_type_mean=float(np.mean([frac(top[vis & (kinds == t)], n99)
                                                                   for t in vtypes])) if vtypes else None)
    return out


def lens_candidates(found, lenses, match_px: float = 4.0, column: str = "lens_score") -> list[dict]:
    """The lens stage's candidates of the evaluation's fields (field, x, y, lens_score), each with whether a true
    lens lies within `match_px` px of it (the truth's deflector centre); with `column` merger_score and the
    truth's mergers for `lenses`, the merger stage's."""
    out = []
    for r in found[np.isfinite(found[column].to_numpy(float))].itertuples():
        t = lenses[lenses.field == r.field] if len(lenses) else lenses
        d = np.hypot(t.x.to_numpy(float) - r.x, t.y.to_numpy(float) - r.y) if len(t) else np.zeros(0)
        out.append(dict(field=str(r.field), x=round(float(r.x), 2), y=round(float(r.y), 2),
                        **{column: round(float(getattr(r, column)), 5)}, true=bool(len(d) and d.min() <= match_px)))
    return out


def with_terms(sigma: np.ndarray, windows, found, stride: float) -> np.ndarray:
    """The windows' sigma with every score term of the merge (the lens and merger stages' candidates `found`)."""
    for term in SCORE_TERMS:
        sigma = with_lens_term(sigma, score_term(windows, found, stride, term)[0])[0]
    return sigma


def line_next(windows, line: np.ndarray) -> np.ndarray:
    """Which of the dense grid's `windows` (tile, ky, kx, coarse) the stage gives the line term besides the coarse
    ones (tasks/stages/_anomaly_grid.line_neighbours), given the coarse windows' `line`."""
    from deepfield.tasks.stages._anomaly_grid import line_neighbours
    return _per_tile(windows, lambda w, ix: line_neighbours(w.ky.to_numpy(), w.kx.to_numpy(),
                                                            w.coarse.to_numpy(bool), line[ix]))


def _per_tile(windows, mask) -> np.ndarray:
    """A boolean per window of the dense grid's `windows`, mask(w, ix) of each tile's windows w (positions ix)."""
    out = np.zeros(len(windows), bool)
    for _, w in windows.groupby("tile", sort=False):
        ix = w.index.to_numpy()
        out[ix] = mask(w, ix)
    return out


def scored_windows(windows, score: np.ndarray, fraction: float, above: float) -> np.ndarray:
    """Which of the dense grid's `windows` (tile, ky, kx, coarse) the stage's coarse-to-fine pass scores with
    `refine` = fraction and `refine_above` = above, given every window's score (the stage computes only the
    coarse ones' first: the same values, windows are scored one by one)."""
    from deepfield.tasks.stages._anomaly_grid import refined
    return _per_tile(windows, lambda w, ix: refined(w.ky.to_numpy(), w.kx.to_numpy(), w.coarse.to_numpy(bool),
                                                    score[ix], fraction, above))


def evaluate(weights: Path | None = None, n_fields: int = 2, size: int = 2048, seed: int = EVAL_SEED,
             steps: int = 20, workers: int = 2, batch: int = 256, device: str = "cpu", halo: int = 64,
             refine: float | None = None, refine_above: float | None = None, full: bool = True,
             precision: str = "auto", pixel_scale: float | None = None) -> dict:
    import pandas as pd
    import torch

    from deepfield.models.anomaly_gan import grid_scores
    from deepfield.models.registry import choose_variant
    from deepfield.tasks.stages._anomaly_grid import extract, refine_scores, tile_inputs, tile_windows
    from deepfield.tasks.stages.background import BackgroundStage
    from deepfield.tasks.stages.registry import make_stage
    from deepfield.tasks.trainsets.fields import simulate_fields
    from deepfield.tasks.zarr_store import all_tiles, open_store
    from deepfield.tasks.zarr_read import read_tile

    torch.set_num_threads(1)
    cfg = evaluation_fields(seed, n_fields, size, pixel_scale)
    if weights:
        stage = AnomalyStage(steps=steps, weights=str(weights), precision=precision)
    else:  # the shipped weights the pipeline would run on these fields: the band-set variant with the most bands
        stage = AnomalyStage(steps=steps, variant=choose_variant("anomaly_wgan", cfg.bands) or None,
                             precision=precision)
    refine = stage.refine if refine is None else refine
    refine_above = stage.refine_above if refine_above is None else refine_above
    stage.setup(device)  # the stage's own model, stamp size and bands
    # the score terms' candidates: the pipeline's detect, measure, lens and merger stages, defaults, as a run has them
    finders = [make_stage("detect"), make_stage("measure"),
               make_stage("lens", variant=choose_variant("lens_resnet", cfg.bands) or None),
               make_stage("merger", variant=choose_variant("merger_resnet", cfg.bands) or None)]
    for f in finders:
        f.setup(device)
    work = Path(tempfile.mkdtemp(prefix="deepfield-eval-anomaly-"))
    try:
        say(f"simulating {n_fields} held-out {size}x{size} fields (seed {seed}) ...")
        root = open_store(simulate_fields(cfg, work, workers, say))
        truth = work / "sim" / "truth"
        anomalies, lenses = pd.read_parquet(truth / "anomalies.parquet"), pd.read_parquet(truth / "lenses.parquet")
        xs, noises, tables, rings, sky, found = [], [], [], [], {}, []
        for tid in all_tiles(root, halo):
            tile = read_tile(root, tid, halo)
            src = BackgroundStage().run(tile, pd.DataFrame())
            for f in finders:
                src = f.run(tile, src)
            cand = src.lens_candidate.to_numpy(bool) | src.merger_candidate.to_numpy(bool)
            found.append(src.loc[cand, ["x", "y", "lens_score", "merger_score"]].assign(field=tid.field))
            pixels = stage._pixels(tile, counted=True)  # image, invvar, usable, counted
            for b, iv, ok in zip(stage.bands, pixels[1], pixels[2]):  # each tile's sky noise per band
                if (ok & (iv > 0)).any():
                    sky.setdefault(tid.field, {}).setdefault(b, []).append(float(np.median(iv[ok & (iv > 0)]) ** -0.5))
            w = tile_windows(tile, stage.size, stage.stride)
            x, noise = extract(list(tile_inputs(*pixels)), w.y0.to_numpy() - tile.box.y0,
                               w.x0.to_numpy() - tile.box.x0, stage.size)
            xs.append(x)
            noises.append(noise)
            rings.append(stage.ring_terms(tile, w.y0.to_numpy() - tile.box.y0, w.x0.to_numpy() - tile.box.x0)[0])
            tables.append(pd.DataFrame({"field": tid.field, "tile": str(tid), "x": w.xc.to_numpy(float),
                                        "y": w.yc.to_numpy(float), "ky": w.ky.to_numpy(), "kx": w.kx.to_numpy(),
                                        "coarse": w.coarse.to_numpy(bool)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    x, noise, ring = np.concatenate(xs), np.concatenate(noises), np.concatenate(rings)
    windows = pd.concat(tables, ignore_index=True)
    found = pd.concat(found, ignore_index=True)
    core = 0.75 * stage.stride
    label = np.empty(len(windows), object)
    for name, w in windows.groupby("field"):
        label[w.index.to_numpy()] = label_sources(w, anomalies[anomalies.field == name],
                                                  lenses[lenses.field == name], stage.size, stage.bands, core)
    label = label.astype(str)
    keyed = _best_windows(windows, anomalies, lenses, stage, core)
    subjects = [(kind, ix) for kind, ix, _ in keyed]
    ghost_snr = {key: ghost_window_snr(json.loads(anomalies.loc[key, "params"]),
                                       {b: float(np.median(v)) for b, v in sky[anomalies.loc[key, "field"]].items()},
                                       stage.size)
                 for kind, _, key in keyed if kind == "ghost"}
    visible = f"ghost, S/N >= {VISIBLE_SNR:g}"
    groups = {visible: [ix for kind, ix, key in keyed if kind == "ghost" and ghost_snr[key] >= VISIBLE_SNR]}
    # the ghosts under the noise of any window: their windows and themselves left out of the `visible` figures
    seen = [kind != "ghost" or ghost_snr[key] >= VISIBLE_SNR for kind, _, key in keyed]
    shown = np.zeros(len(windows), bool)
    for ix in groups[visible]:
        shown[ix] = True
    unseen = (label == "ghost") & ~shown
    say(f"scoring {len(x)} windows ({int(np.isin(label, ['normal', 'contaminated'], invert=True).sum())} "
        f"anomalous, {len(subjects)} injected anomalies) in the fast and full modes ...")
    out = dict(n_fields=n_fields, field_size=size, pixel_scale=cfg.pixel_scale, seed=seed, steps=steps,
               stride=stage.stride, bands=stage.bands,
               precision=stage.arithmetic,
               refine=refine, refine_above=refine_above,
               labels=pd.Series(label).value_counts().to_dict(), modes={},
               ghost_window_snr=sorted(round(v, 2) for v in ghost_snr.values()),
               lens_candidates=lens_candidates(found, lenses),
               merger_candidates=lens_candidates(found[found.merger_score >= MERGER_MIN_SCORE],
                                                 anomalies[anomalies.type == "merger"], 12.0, "merger_score"))
    coarse = windows.coarse.to_numpy(bool)
    for mode, k in (("fast", 0), ("full", steps))[:2 if full else 1]:
        t = time.perf_counter()
        r = grid_scores(stage.model, x, noise, steps=k, batch=batch, device=device)
        dt = time.perf_counter() - t
        r["line"] = np.where(coarse | line_next(windows, r["line"]), r["line"], 0.0)  # as the stage takes it
        gan = window_sigma(r["score"], r["model_peak"])[0]
        ringed = line_sigma(ranked_sigma(gan, ring)[0], r["line"])[0]
        sigma = with_terms(ringed, windows, found, stage.stride)
        gan, ringed, sigma = (np.where(np.isfinite(v), v, np.nanmin(v) - 1.0) for v in (gan, ringed, sigma))
        normal = ringed[label == "normal"]  # the score terms' calibration (catalogs/score_terms.py)
        out["modes"][mode] = {"windows_per_second": float(len(x) / dt),
                              "score": figures(r["score"], label, subjects, groups, unseen, seen),
                              "paper": figures(r["paper"], label, subjects, groups, unseen, seen),
                              "sigma": figures(sigma, label, subjects, groups, unseen, seen),
                              "sigma_ring": figures(ringed, label, subjects, groups, unseen, seen),
                              "sigma_gan": figures(gan, label, subjects, groups, unseen, seen),
                              "normal_sigma_quantiles": {str(q): float(np.quantile(normal, q)) for q in
                                                         (0.99, 0.995, 0.998, 0.999, 0.9995, 0.9998, 0.9999,
                                                          0.99995, 0.99999)},
                              "normal_line_quantiles": {str(q): float(np.quantile(r["line"][label == "normal"], q))
                                                        for q in (0.5, 0.9, 0.99, 0.999, 0.9999, 1.0)}}
        # the grid as the stage scores it, coarse to fine: the windows it leaves out ranked last
        keep = scored_windows(windows, refine_scores(r["score"], r["line"]), refine, refine_above)
        low = float(np.min(r["score"])) - 1.0
        sig = ranked_sigma(window_sigma(np.where(keep, r["score"], np.nan), r["model_peak"], coarse)[0], ring)[0]
        sig = line_sigma(sig, np.where(keep, r["line"], np.nan))[0]
        kept = np.flatnonzero(keep)  # the score terms go to the nearest window the stage scored
        sig[kept] = with_terms(sig[kept], windows.iloc[kept].reset_index(drop=True), found, stage.stride)
        sig = np.where(np.isfinite(sig), sig, np.nanmin(sig) - 1.0)
        out["modes"][mode]["refined"] = {"fraction_scored": float(keep.mean()),
                                         "score": figures(np.where(keep, r["score"], low), label, subjects, groups,
                                                          unseen, seen),
                                         "sigma": figures(sig, label, subjects, groups, unseen, seen)}
        say(f"  {mode}: {len(x) / dt:.0f} windows/s; coarse to fine scores {keep.mean():.3f} of the windows")
    if full:
        out["fast_speedup"] = out["modes"]["fast"]["windows_per_second"] / out["modes"]["full"]["windows_per_second"]
    return out


def format_report(r: dict) -> str:
    lines = [f"anomaly scores of the dense grid (stride {r['stride']} px, bands {','.join(r.get('bands', []))}) "
             f"on {r['n_fields']} held-out {r['field_size']}^2 fields (seed {r['seed']}"
             + (f", {r['pixel_scale']:g}\" pixels" if r.get("pixel_scale", 0.2) != 0.2 else "") + f"): {r['labels']}"
             + (f"; networks in {r['precision']}" if "precision" in r else "")]
    for mode, m in r["modes"].items():
        rows = [(w, m[w]) for w in ("score", "paper", "sigma") if w in m]  # not all in an older record
        if "sigma_ring" in m:
            rows.append(("sigma without the lens and merger terms", m["sigma_ring"]))
        if "sigma_gan" in m:
            rows.append(("sigma without the ring, lens and merger terms" if "sigma_ring" in m else
                         "sigma without the ring term", m["sigma_gan"]))
        if "refined" in m:
            rows += [(f"{w}, coarse to fine", m["refined"][w]) for w in ("score", "sigma")]
        for which, f in rows:
            lines.append(f"  {mode:4s} {which:6s} AUROC {f['auroc']:.3f}  injected anomalies in the top 1% "
                         f"{f['top1']:.2f}, top 0.1% {f['top01']:.2f} (of {f['injected']})")
            if "top1_normal" in f:  # not in an older record
                lines.append(f"       above the normal windows' 99th / 99.9th percentile {f['top1_normal']:.2f} / "
                             f"{f['top01_normal']:.2f}; mean over the types {f['top1_normal_type_mean']:.2f}")
            if "visible" in f:
                v = f["visible"]
                lines.append(f"       the anomalies a window can show (ghosts at S/N >= {VISIBLE_SNR:g} only: "
                             f"{v['injected']} injected, {v['anomalous_windows']} windows): AUROC {v['auroc']:.3f}, "
                             f"above the normal 99th {v['top1_normal']:.2f}, mean over the types "
                             f"{v['top1_normal_type_mean']:.2f}")
            for t, v in f["types"].items():
                top1 = "-" if v["top1"] is None else f"{v['top1']:.2f}"
                top1n = "" if v.get("top1_normal") is None else f"  above the normal 99th {v['top1_normal']:.2f}"
                lines.append(f"       {t:16s} windows {v['windows']:5d}  AUROC {v['auroc']:.3f}  injected "
                             f"{v['injected']:3d}  in top 1% {top1}{top1n}")
        lines.append(f"  {mode:4s} {m['windows_per_second']:.0f} windows/s")
        if "normal_line_quantiles" in m:  # not in an older record
            q = m["normal_line_quantiles"]
            lines.append(f"  {mode:4s} the normal windows' line S/N: 99th, 99.9th, 99.99th percentile "
                         f"{q['0.99']:.2f}, {q['0.999']:.2f}, {q['0.9999']:.2f}, at most {q['1.0']:.2f}")
        if "refined" in m:
            lines.append(f"  {mode:4s} coarse to fine (refine {r['refine']:g}, refine_above {r['refine_above']:g}): "
                         f"{m['refined']['fraction_scored']:.3f} of the windows scored, the others ranked last")
    if "fast_speedup" in r:
        lines.append(f"  fast mode {r['fast_speedup']:.1f}x faster than the full mode")
    if "lens_candidates" in r:
        lc = r["lens_candidates"]
        hi = [c for c in lc if c["lens_score"] >= LENS_MIN_SCORE]
        lines.append(f"  the lens stage's deflector candidates {len(lc)}, {len(hi)} of them at lens_score >= "
                     f"{LENS_MIN_SCORE:g} (the lens term), {sum(c['true'] for c in hi)} of those on a true lens")
    if "merger_candidates" in r:
        mc = r["merger_candidates"]
        lines.append(f"  the merger stage's candidates at merger_score >= {MERGER_MIN_SCORE:g} (the merger term) "
                     f"{len(mc)}, {sum(c['true'] for c in mc)} of them on a true merger")
    if "ghost_window_snr" in r:
        lines.append(f"  ghosts' S/N in a window they cover (all bands): {r['ghost_window_snr']}; those at S/N >= "
                     f"{VISIBLE_SNR:g} have their own row")
    return "\n".join(lines)
