"""Evaluation of the strong-lens classifier (`deepfield eval lens`), and of the merger classifier (`deepfield eval
merger`, target "merger": completeness against total magnitude and the nuclei's separation instead of the lens
figures), on held-out simulated stamps.

The stamps come from tasks.trainsets.lens_stamps with the configuration the weights were trained on (their
record's `stamp_config`), at a seed no training run uses; with `shifted`, the same population seen with a
PSF 30% wider and 0.7 mag shallower (StampConfig.shifted). Figures follow the strong-lens finding challenge
(Metcalf et al. 2019, A&A 625, A119; models.train_lens.metrics): AUROC, TPR0 and TPR10, plus completeness
at the lens merge step's default threshold (0.5) against Einstein radius and arc S/N, the false-positive
rate by kind of non-lens, and the throughput. With `pixel_scale`, the stamps are simulated on that grid (as
large as the training stamps' sky needs) and cut as the stage cuts them from such a field (resampled onto the
training grid, LensStage.stamps).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from deepfield.models.lens_cnn import score
from deepfield.models.progress import say
from deepfield.models.registry import entry
from deepfield.models.train_lens import MERGER_MODEL, MODEL, metrics
from deepfield.tasks.trainsets.lens_stamps import StampConfig, count_lines, simulate_stamps

__all__ = ["evaluate", "format_report", "EVAL_SEED"]

THRESHOLD = 0.5  # the lens merge step's default: candidates scoring above it enter the lens-candidate table
EVAL_SEED = 20261123  # held-out evaluation sets: a seed no training run uses by default


def _binned(values: np.ndarray, found: np.ndarray, edges) -> list[dict]:
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (values >= lo) & (values < hi)
        out.append(dict(lo=float(lo), hi=float(hi), n=int(sel.sum()),
                        completeness=float(found[sel].mean()) if sel.any() else None))
    return out


def evaluate(weights: Path | None = None, n: int = 10000, lens_fraction: float = 0.02, seed: int = EVAL_SEED,
             shifted: bool = False, workers: int = 2, device: str = "cpu", batch: int = 256,
             precision: str = "auto", target: str = "lens", pixel_scale: float | None = None) -> dict:
    """Score a held-out set and return the challenge metrics, completeness and throughput, with the network
    as the lens (target "merger": the merger) stage runs it (its `precision`); with `pixel_scale` (arcsec per
    pixel), on stamps simulated on that grid and cut by the stage (module docstring)."""
    from deepfield.tasks.stages.lens import LensStage
    from deepfield.tasks.stages.merger import MergerStage
    if target not in ("lens", "merger"):
        raise ValueError(f"target {target!r}: lens or merger")
    cls = LensStage if target == "lens" else MergerStage
    stage = cls(weights=None if weights is None else str(weights), precision=precision)
    stage.setup(device)  # the network as the stage runs it (folded, its precision)
    model, arithmetic = stage.model, stage.arithmetic
    info = getattr(model, "training_info", {})
    cfg = StampConfig.model_validate(info.get("stamp_config", {}))
    if shifted:
        cfg = cfg.shifted()
    say(f"simulating {n} {'shifted-configuration ' if shifted else ''}evaluation stamps "
         f"({lens_fraction:.0%} {'lenses' if cfg.positive == 'lens' else cfg.positive + 's'}, seed {seed}) ...")
    size = cfg.size
    if pixel_scale is not None:  # the training stamps' sky and a margin, on the field's grid (room for 48 native px)
        big = max(size, int(math.ceil(size * cfg.pixel_scale / pixel_scale))) + 4
        cfg = cfg.model_copy(update={"pixel_scale": float(pixel_scale), "size": big + big % 2})
    d = simulate_stamps(n, lens_fraction, seed + (1 if shifted else 0), cfg, workers, count_lines("evaluation", say))
    if pixel_scale is not None:
        d["images"], d["sigma"] = stage_stamps(stage, d["images"], d["sigma"], float(pixel_scale))
    score(model, d["images"][:batch], d["sigma"][:batch], batch=batch, device=device)  # warm-up
    t = time.perf_counter()
    s = score(model, d["images"], d["sigma"], batch=batch, device=device)
    dt = time.perf_counter() - t
    res = metrics(s, d["label"])
    meta = d["meta"].assign(score=s)
    lenses = meta[meta.label == 1]
    found = (lenses.score > THRESHOLD).to_numpy()
    if target == "lens":
        res.update(
            completeness_vs_theta_e=_binned(lenses.theta_e.to_numpy(), found, [0.8, 1.2, 1.6, 2.0, 2.5, 3.01]),
            completeness_vs_arc_snr=_binned(lenses.arc_snr.to_numpy(), found, [0, 10, 20, 40, 80, 160, np.inf]))
    else:
        res.update(completeness_vs_mag=_binned(lenses.mag.to_numpy(), found, [19, 20, 21, 22, 23.01]),
                   completeness_vs_separation=_binned(lenses.separation.to_numpy(), found, [0.8, 1.5, 2.2, 3.01]))
    res.update(
        target=target, config="shifted" if shifted else "same", psf_scale=cfg.psf_scale,
        depth_offset=cfg.depth_offset, pixel_scale=cfg.pixel_scale, pixel_scale_given=pixel_scale is not None,
        seed=seed, threshold=THRESHOLD, completeness=float(found.mean()),
        false_positive_rate=float((meta[meta.label == 0].score > THRESHOLD).mean()),
        false_positives_by_kind={k: float((g.score > THRESHOLD).mean())
                                 for k, g in meta[meta.label == 0].groupby("kind")},
        throughput_stamps_per_s=float(n / dt), batch=batch, device=device, torch_threads=torch.get_num_threads(),
        precision=arithmetic,
        weights=str(weights or entry(MODEL if target == "lens" else MERGER_MODEL).weights))
    return res


def stage_stamps(stage, images: np.ndarray, sigma: np.ndarray, pixel_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The stage's own stamps (LensStage.stamps) of simulated stamps `images` (N, bands, S, S) with sky sigmas
    `sigma` (N, bands) on a grid of `pixel_scale`, each centred on the stamp's centre as a field's candidate."""
    c = np.array([(images.shape[-1] - 1) / 2.0])
    out, sig = [], []
    for img, s in zip(images, sigma):
        tile = SimpleNamespace(bands=list(stage.bands), pixel_scale=pixel_scale, image=img,
                               invvar=np.broadcast_to((1.0 / s.astype(np.float64) ** 2)[:, None, None], img.shape),
                               mask=np.zeros(img.shape, np.int32))
        st, sg = stage.stamps(tile, c, c)
        out.append(st[0])
        sig.append(sg[0])
    return np.stack(out), np.stack(sig)


def evaluate_fields(weights: Path | None = None, n_fields: int = 2, seed: int = 20261208, cache: Path | None = None,
                    workers: int = 2, device: str = "cpu", batch: int = 256, precision: str = "auto",
                    target: str = "merger") -> dict:
    """The lens or merger finder (`target`) on its stage's own candidates in `n_fields` held-out simulated 2048^2
    fields (12 lenses or mergers each; tasks.trainsets.candidate_fields): AUROC, TPR0, TPR10, the lenses' or
    mergers' completeness and the candidates' false-positive rate at 0.5, and how many candidates in all score
    above 0.5, 0.9, 0.99, 0.999 (what the stage's merge and the anomaly merge's term see)."""
    from deepfield.tasks.stages.lens import LensStage
    from deepfield.tasks.stages.merger import MergerStage
    from deepfield.tasks.trainsets.candidate_fields import field_stamps
    stage = (LensStage if target == "lens" else MergerStage)(weights=None if weights is None else str(weights),
                                                             precision=precision)
    stage.setup(device)
    d = field_stamps(n_fields, seed, stage.bands, cache or Path(".cache") / f"{target}_fields", workers=workers,
                     target=target, say=say)
    s = score(stage.model, d["images"], d["sigma"], batch=batch, device=device)
    res = metrics(s, d["label"])
    pos = d["label"] == 1
    res.update(target=target, config="fields", n_fields=n_fields, seed=seed, threshold=THRESHOLD,
               completeness=float((s[pos] > THRESHOLD).mean()),
               false_positive_rate=float((s[~pos] > THRESHOLD).mean()),
               above={str(t): [int((s >= t).sum()), int((s[pos] >= t).sum())] for t in (0.5, 0.9, 0.99, 0.999)},
               precision=stage.arithmetic,
               weights=str(weights or entry(MODEL if target == "lens" else MERGER_MODEL).weights))
    return res


def format_fields(r: dict) -> str:
    what, kind = ("lens", "lenses") if r.get("target") == "lens" else ("merger", "mergers")
    above = ", ".join(f">= {t}: {n} ({k} on {kind})" for t, (n, k) in r["above"].items())
    return "\n".join([
        f"{what} finder on the {what} stage's candidates of {r['n_fields']} held-out simulated fields (seed "
        f"{r['seed']}): {r['n']} candidates, {r['n_lens']} on a {what}",
        f"  AUROC {r['auroc']:.4f}   TPR0 {r['tpr0']:.3f}   TPR10 {r['tpr10']:.3f}",
        f"  at score > {r['threshold']}: completeness {r['completeness']:.3f}, false-positive rate "
        f"{r['false_positive_rate']:.4f}",
        f"  candidates scoring {above}"])


def _bins(label: str, bins: list[dict], fmt: str) -> str:
    return f"  completeness vs {label}: " + ", ".join(
        f"{b['lo']:{fmt}}-{b['hi']:{fmt}}: {b['completeness']:.2f} ({b['n']})" for b in bins if b["n"])


def format_report(r: dict) -> str:
    merger = r.get("target") == "merger"
    what, kind = ("merger finder", "mergers") if merger else ("lens finder", "lenses")
    lines = [f"{what} on {r['n']} {r['config']}-configuration stamps, {r['n_lens']} {kind} "
             f"({r['lens_fraction']:.1%}); PSF x{r['psf_scale']:.2f}, depth {r['depth_offset']:+.1f} mag"
             + (f", {r['pixel_scale']:g}\" pixels (cut as the stage cuts them)" if r.get("pixel_scale_given") else ""),
             f"  AUROC {r['auroc']:.4f}   TPR0 {r['tpr0']:.3f}   TPR10 {r['tpr10']:.3f}",
             f"  at score > {r['threshold']}: completeness {r['completeness']:.3f}, "
             f"false-positive rate {r['false_positive_rate']:.4f}"]
    if merger:
        lines += [_bins("total magnitude (reference band)", r["completeness_vs_mag"], ".0f"),
                  _bins("separation of the nuclei (arcsec)", r["completeness_vs_separation"], ".1f")]
    else:
        lines += [_bins("Einstein radius (arcsec)", r["completeness_vs_theta_e"], ".1f"),
                  _bins("arc S/N", r["completeness_vs_arc_snr"], ".0f")]
    lines += ["  false-positive rate by kind: " + ", ".join(f"{k} {v:.4f}" for k, v in r["false_positives_by_kind"].items()),
              f"  throughput {r['throughput_stamps_per_s']:.0f} stamps/s ({r['device']}, batch {r['batch']}, "
              f"{r['torch_threads']} threads" + (f", {r['precision']}" if "precision" in r else "") + ")"]
    return "\n".join(lines)
