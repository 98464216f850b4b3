"""Evaluation of the GAN anomaly scorer on held-out simulated fields with injected anomalies
(`deepfield eval anomaly`).

The fields (`evaluation_fields`: the simulator's anomalies and artefacts, with more ring
galaxies, mergers, lenses and trails than by default) go through the pipeline's background, detect and
measure stages; the anomaly stage's selection and stamps follow; each selected source is labelled against
the truth (tasks.trainsets.anomaly.label_sources) and scored in the full mode (`steps` Adam steps on z) and in
the fast mode (encoder only). Sources labelled "contaminated" (an anomaly in the stamp but off its centre)
are left out. Figures per mode:
- AUROC of anomalous against normal sources; precision (the anomalous fraction) among the top 1% and top
  0.1% of the scores, with the counts behind them;
- per anomaly type: the number selected, the AUROC of that type against the normal sources, and the
  fraction recovered above the 95th and 99th percentiles of the normal sources' scores (5% and 1% false
  positives);
- throughput in stamps per second on this machine (one torch thread, batches of 256), and the fast mode's
  speed-up over the full mode.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from deepfield.models.anomaly_gan import anomaly_scores
from deepfield.models.progress import say
from deepfield.tasks.sim.config import SimConfig
from deepfield.tasks.stages.anomaly import AnomalyStage
from deepfield.tasks.trainsets.anomaly import field_stamps

EVAL_SEED = 20261125


def evaluation_fields(seed: int, n_fields: int, size: int = 1024) -> SimConfig:
    """Held-out fields with the simulator's anomalies and artefacts at its default rates, except three times
    the ring galaxies, mergers and lenses (6 of each per field) and four times the satellite trails (2 per
    field), so that every type has enough members to measure."""
    return SimConfig(seed=seed, size=size, fields=n_fields,
                     population=dict(lenses_per_field=6, ring_galaxies_per_field=6, mergers_per_field=6),
                     artefacts=dict(satellite_trails=2.0))


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


def _precision_top(scores: np.ndarray, labels: np.ndarray, frac: float) -> dict:
    k = max(1, int(np.ceil(frac * len(scores))))
    top = np.argsort(-scores, kind="stable")[:k]
    return dict(k=k, anomalous=int(labels[top].sum()), precision=float(labels[top].mean()))


def figures(scores: np.ndarray, label: np.ndarray) -> dict:
    """The figures of one mode from scores and labels ("normal" or an anomaly type; no "contaminated")."""
    y = label != "normal"
    normal = scores[~y]
    p95, p99 = np.percentile(normal, 95), np.percentile(normal, 99)
    types = {}
    for t in sorted(set(label[y])):
        m = label == t
        sel = m | ~y
        types[t] = dict(n=int(m.sum()), auroc=_auroc(scores[sel], m[sel].astype(int)),
                        recovered_fp5=float((scores[m] > p95).mean()), recovered_fp1=float((scores[m] > p99).mean()))
    return dict(n=int(len(scores)), n_anomalous=int(y.sum()), auroc=_auroc(scores, y.astype(int)),
                top1=_precision_top(scores, y, 0.01), top01=_precision_top(scores, y, 0.001), types=types)


def evaluate(weights: Path | None = None, n_fields: int = 8, size: int = 1024, seed: int = EVAL_SEED,
             steps: int = 20, workers: int = 2, batch: int = 256, device: str = "cpu") -> dict:
    import torch

    torch.set_num_threads(1)
    stage = AnomalyStage(steps=steps, weights=str(weights) if weights else None)
    stage.setup(device)  # the stage's own model, stamp size and bands
    model = stage.model
    say(f"simulating and processing {n_fields} held-out {size}x{size} fields (seed {seed}) ...")
    x, table = field_stamps(evaluation_fields(seed, n_fields, size), stage, workers=workers, progress=say)
    keep = (table.label != "contaminated").to_numpy()
    x, table = x[keep], table[keep].reset_index(drop=True)
    label = table.label.to_numpy(str)
    say(f"scoring {len(x)} stamps ({int((label != 'normal').sum())} anomalous) in the full and fast modes ...")
    out = dict(n_fields=n_fields, field_size=size, seed=seed, steps=steps, n_contaminated_left_out=int((~keep).sum()),
               labels=table.label.value_counts().to_dict(), modes={})
    for mode, k in (("full", steps), ("fast", 0)):
        t = time.perf_counter()
        r = anomaly_scores(model, x, steps=k, batch=batch, device=device)
        dt = time.perf_counter() - t
        fig = figures(r["score"], label)
        fig["stamps_per_second"] = float(len(x) / dt)
        fig["pixel_term_auroc"] = _auroc(r["pixel"], (label != "normal").astype(int))
        fig["feature_term_auroc"] = _auroc(r["feature"], (label != "normal").astype(int))
        out["modes"][mode] = fig
        table[f"score_{mode}"] = r["score"]
    out["fast_speedup"] = out["modes"]["fast"]["stamps_per_second"] / out["modes"]["full"]["stamps_per_second"]
    out["auroc_difference_full_minus_fast"] = out["modes"]["full"]["auroc"] - out["modes"]["fast"]["auroc"]
    by_mag = []
    for lo, hi in ((14, 20), (20, 22), (22, 23), (23, 24), (24, 30)):
        m = (table.mag >= lo) & (table.mag < hi) & (table.label == "normal")
        if m.any():
            by_mag.append(dict(mag=[lo, hi], n=int(m.sum()), median_full=float(table.score_full[m].median())))
    out["normal_score_by_mag"] = by_mag
    return out


def format_report(r: dict) -> str:
    lines = [f"anomaly scores on {r['n_fields']} held-out {r['field_size']}^2 fields (seed {r['seed']}): "
             f"{r['modes']['full']['n']} selected sources, {r['modes']['full']['n_anomalous']} anomalous "
             f"({r['n_contaminated_left_out']} contaminated left out)"]
    for mode, f in r["modes"].items():
        lines.append(f"  {mode:4s} AUROC {f['auroc']:.4f}  top 1% precision {f['top1']['precision']:.3f} "
                     f"({f['top1']['anomalous']}/{f['top1']['k']})  top 0.1% {f['top01']['precision']:.3f} "
                     f"({f['top01']['anomalous']}/{f['top01']['k']})  {f['stamps_per_second']:.0f} stamps/s  "
                     f"[pixel term {f['pixel_term_auroc']:.3f}, feature term {f['feature_term_auroc']:.3f}]")
        for t, v in f["types"].items():
            lines.append(f"       {t:16s} n={v['n']:4d}  AUROC {v['auroc']:.3f}  recovered at 5% FP {v['recovered_fp5']:.2f}"
                         f"  at 1% FP {v['recovered_fp1']:.2f}")
    lines.append(f"  fast mode {r['fast_speedup']:.1f}x faster; AUROC full - fast = "
                 f"{r['auroc_difference_full_minus_fast']:+.4f}")
    return "\n".join(lines)
