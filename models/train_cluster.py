"""Training of the cluster finder (`deepfield train cluster`) on skies at a realistic cluster density.

Data: crops composed on the fly from a library rendered once at numpy speed (tasks/trainsets/cluster_sky.py:
simulator backgrounds without clusters, and simulator clusters and groups drawn alone, both straight into
the binned pixels by tasks/trainsets/binned_render.py). A seeded tenth of the backgrounds and of the
clusters is kept back for validation.

Each step draws `batch` crops of `crop` x `crop` binned pixels (205" at 128): the sky's own groups and
clusters at their real density, and in 60 % of the crops one extra cluster of richness >= 15; a random
quarter turn and flip. Loss: CenterNet's focal loss on the redshift-sliced centre heat map plus L1 on z and
ln richness (models/cluster_net.py). Adam, warmed up over the first 5 % of the steps, then a cosine decay.
A checkpoint (model, optimiser, schedule, step, log) is written every `log_every * 5` steps; the same command
resumes from it.

The loop takes its skies from a source (tasks.trainsets.cluster_sky.SkySource: `sample(n, size, rng)`,
`validation(seed)`, `bands`, `bin`, `describe()`, `split_sizes()`), so that this module needs nothing of the
simulator. Validation (`validate`): 160 skies of 256 x 256 binned pixels (6.8', a 2048^2 field) from the
held-out backgrounds and clusters, each with one cluster of richness >= 15 besides the sky's own, and 40
without (realistic density only). Completeness for clusters of richness >= 30 at
z <= 0.8, purity of the detections (a detection within 0.5 Mpc, at the true z, of a true cluster of any
richness is true; both counted `VAL_BORDER` binned pixels inside the sky), sigma_z/(1+z), and the
estimated-to-true richness ratio. After training, `calibrate_richness` sets ln lambda = a + b ln
lambda_net (b = 1, a the median offset over the validation skies' matches of richness >= 20) and stores
(a, b) in the weights.

Same command, same seed, same software: same weights on a CPU.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .augment import dihedral
from .checkpoint import load_checkpoint, save_checkpoint
from .cluster_net import STRIDE, ClusterNet, detect, loss_terms, targets
from .progress import say

MODEL = "cluster_net"
THRESHOLD = 0.3  # the stage's default
VAL_BORDER = 16


def sample_batch(source, n: int, size: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """[x (n, C, S, S), heat, z, ln richness, weight (n, slices, S/4, S/4)] of n crops from `source`."""
    xs, tg = [], []
    for planes, truth in source.sample(n, size, rng):
        xs.append(planes)
        centres = truth[["x", "y"]].to_numpy(float).reshape(-1, 2)
        tg.append(targets((size // STRIDE, size // STRIDE), centres, truth.z.to_numpy(), truth.richness.to_numpy()))
    return [torch.as_tensor(np.stack(xs)), *(torch.as_tensor(np.stack([t[k] for t in tg])) for k in range(4))]


def greedy_match(score: np.ndarray, distance, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Detections in descending `score` each find the nearest true cluster not yet found within its `radius`
    (one per true cluster); distance(i): detection i's distances to every true cluster, in the units of
    `radius`. Returns (the true row each detection found or -1, the detection that found each true cluster or
    -1). The validation here and `deepfield eval cluster` (on the sky) match with it."""
    radius = np.asarray(radius, float)
    det_to, true_to = np.full(len(score), -1), np.full(len(radius), -1)
    for i in np.argsort(-np.asarray(score, float), kind="stable"):
        d = np.array(distance(i), float)
        d[(true_to >= 0) | (d > radius)] = np.inf
        if len(d) and np.isfinite(d.min()):
            j = int(np.argmin(d))
            det_to[i], true_to[j] = j, i
    return det_to, true_to


def match_sky(found: pd.DataFrame, truth: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """`greedy_match` of a validation sky's detections within each true cluster's `match_radius` (binned
    pixels of 0.5 Mpc at its z, given by the source)."""
    tx, ty = truth["x"].to_numpy(float), truth["y"].to_numpy(float)
    return greedy_match(found["score"].to_numpy(), lambda i: np.hypot(tx - found["x"].iat[i], ty - found["y"].iat[i]),
                        truth["match_radius"].to_numpy(float))


@torch.no_grad()
def validation_matches(model: ClusterNet, val, device, threshold: float = THRESHOLD
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every validation sky's true clusters (with the detection that found each) and detections (with the
    truth each found), both inside the border."""
    trues, dets = [], []
    for k, (planes, truth) in enumerate(val):
        f = pd.DataFrame(detect(model, planes, threshold, device=str(device)))
        det_to, true_to = match_sky(f, truth)
        lo, hi = VAL_BORDER, planes.shape[-1] - VAL_BORDER
        t_in = (truth.x.between(lo, hi) & truth.y.between(lo, hi)).to_numpy()
        d_in = (f.x.between(lo, hi) & f.y.between(lo, hi)).to_numpy()
        t = truth.assign(sky=k, found=true_to >= 0,
                         z_est=np.array([f.z.iat[i] if i >= 0 else np.nan for i in true_to], float),
                         richness_est=np.array([f.richness.iat[i] if i >= 0 else np.nan for i in true_to], float))
        d = f.assign(sky=k, true=det_to >= 0,
                     z_true=np.array([truth.z.iat[j] if j >= 0 else np.nan for j in det_to], float),
                     richness_true=np.array([truth.richness.iat[j] if j >= 0 else np.nan for j in det_to], float))
        trues.append(t[t_in])
        dets.append(d[d_in])
    trues, dets = pd.concat(trues, ignore_index=True), pd.concat(dets, ignore_index=True)
    for df in (trues, dets):
        for c in df.columns:
            if df[c].dtype == object:  # an empty sky's columns
                df[c] = df[c].astype(bool if c in ("found", "true") else float)
    return trues, dets


def summarise(trues: pd.DataFrame, dets: pd.DataFrame) -> dict:
    """Completeness (richness >= 30, z <= 0.8), purity (all detections; estimated richness >= 30 and z <= 0.8),
    sigma_z/(1+z) (NMAD) and the richness ratio (median, scatter in dex) over the found targets."""
    target = (trues.richness >= 30) & (trues.z <= 0.8)
    found = trues[target & trues.found]
    dz = (found.z_est - found.z) / (1 + found.z)
    lr = np.log10(found.richness_est / found.richness)
    rich_det = dets[(dets.richness >= 30) & (dets.z <= 0.8)]
    nmad = (lambda v: float(1.4826 * np.median(np.abs(v - np.median(v)))) if len(v) else float("nan"))
    return dict(n_target=int(target.sum()), completeness=float(trues.found[target].mean()) if target.any() else float("nan"),
                n_detections=len(dets), purity=float(dets.true.mean()) if len(dets) else float("nan"),
                n_rich_detections=len(rich_det), purity_rich=float(rich_det.true.mean()) if len(rich_det) else float("nan"),
                sigma_z=nmad(dz.to_numpy()), bias_z=float(np.median(dz)) if len(dz) else float("nan"),
                richness_ratio=float(10 ** np.median(lr)) if len(lr) else float("nan"),
                richness_scatter_dex=nmad(lr.to_numpy()))


@torch.no_grad()
def validate(model: ClusterNet, val, device) -> dict:
    """Loss and detection figures on the validation skies (module docstring)."""
    model.eval()
    losses = []
    for planes, truth in val[::4]:
        h, w = planes.shape[-2:]
        tg = targets((-(-h // STRIDE), -(-w // STRIDE)), truth[["x", "y"]].to_numpy(float).reshape(-1, 2),
                     truth.z.to_numpy(), truth.richness.to_numpy())
        x = torch.as_tensor(planes[None]).to(device)
        losses.append(loss_terms(model, x, *(torch.as_tensor(a)[None].to(device) for a in tg))["total"].item())
    out = dict(loss=float(np.mean(losses)), **summarise(*validation_matches(model, val, device)))
    model.train()
    return out


def calibrate_richness(model: ClusterNet, val, device) -> tuple[float, float]:
    """(a, b) of ln lambda = a + b ln lambda_net: b = 1 and a the median of ln(lambda / lambda_net) over the
    validation skies' clusters of richness >= 20 found at the stage's threshold (the calibration reset first).
    A median offset, not a least-squares line: regressing the true richness on the estimate flattens the slope
    towards the sample's mean and biases the rich clusters low."""
    model.richness_cal.copy_(torch.tensor([0.0, 1.0]))
    trues, _ = validation_matches(model, val, device)
    m = trues[trues.found & (trues.richness >= 20)]
    if len(m) < 10:
        return 0.0, 1.0
    return float(np.median(np.log(m.richness.to_numpy() / m.richness_est.to_numpy()))), 1.0


def train(source, iters: int = 6000, batch: int = 16, crop_size: int = 128, lr: float = 2e-3, seed: int = 0,
          device: str = "cpu", threads: int = 2, log_every: int = 100, command: str = "", data: dict | None = None,
          arch: dict | None = None, checkpoint: Path | None = None, stop_after: float | None = None
          ) -> tuple[dict, dict] | None:
    """Train on skies from `source` (module docstring; tasks.trainsets.cluster_sky.sky_source(library, seed));
    returns the training record and the weights (state dict), or None when `stop_after` seconds ran out first
    (the checkpoint holds the progress; the same call resumes)."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    arch = dict(dict(bands=source.bands, bin=source.bin, binned_arcsec=source.binned_arcsec), **(arch or {}))
    model = ClusterNet(**arch).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    warm = max(1, iters // 20)  # linear warm-up over 5% of the steps, then a cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(i, iters) / iters)))
    config = dict(model=MODEL, arch=arch, seed=seed, steps=iters, batch=batch, crop=crop_size, lr=lr, data=data or {})
    rng = np.random.default_rng([seed, 7_400_000])
    g = torch.Generator().manual_seed(seed)
    log, start, spent = [], 0, 0.0
    state = load_checkpoint(checkpoint, config, model, opt, sched, device)
    if state:
        start, log, spent = state["step"], state["log"], state.get("seconds", 0.0)
        rng.bit_generator.state = state["rng"]
        g.set_state(state["torch_rng"])
    val = source.validation(seed)
    say(f"training on {source.describe()}; {len(val)} validation skies; {iters} steps of {batch} crops of "
        f"{crop_size}^2 binned px ...")
    acc, t0 = [], time.perf_counter()
    model.train()
    for it in range(start + 1, iters + 1):
        xb, heat, zmap, rmap, wt = dihedral(sample_batch(source, batch, crop_size, rng), g)
        terms = loss_terms(model, xb.to(device), heat.to(device), zmap.to(device), rmap.to(device), wt.to(device))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        sched.step()
        acc.append({k: v.item() for k, v in terms.items()})
        if it % log_every == 0 or it == iters:
            rec = {k: float(np.mean([a[k] for a in acc])) for k in acc[0]}
            acc = []
            rec.update(iter=it, seconds=round(spent + time.perf_counter() - t0, 1))
            if it % (log_every * 5) == 0 or it == iters:
                rec["val"] = validate(model, val, device)
            log.append(rec)
            v = rec.get("val")
            say(f"step {it}/{iters}: loss {rec['total']:.3f} (focal {rec['focal']:.3f}, z {rec['z']:.3f}, "
                f"ln richness {rec['richness']:.3f})" + (
                    f"; validation loss {v['loss']:.3f}, completeness {v['completeness']:.2f} of {v['n_target']}, "
                    f"purity {v['purity']:.2f} of {v['n_detections']}, sigma_z/(1+z) {v['sigma_z']:.3f}" if v else "")
                + f" ({rec['seconds']:.0f} s)")
            if checkpoint is not None and (it % (log_every * 5) == 0 or it == iters):
                save_checkpoint(checkpoint, config, model, opt, sched, step=it, log=log, rng=rng.bit_generator.state,
                                torch_rng=g.get_state(), seconds=rec["seconds"])
            if stop_after is not None and time.perf_counter() - t0 > stop_after and it < iters:
                if checkpoint is not None:
                    save_checkpoint(checkpoint, config, model, opt, sched, step=it, log=log,
                                    rng=rng.bit_generator.state, torch_rng=g.get_state(), seconds=rec["seconds"])
                say(f"stopping after {stop_after:.0f} s at step {it}; the same command resumes from {checkpoint}")
                return None
    model.eval()
    a, b = calibrate_richness(model, val, device)
    model.richness_cal.copy_(torch.tensor([a, b]))
    final = validate(model, val, device)
    say(f"richness calibration: ln lambda = {a:.3f} + {b:.3f} ln lambda_net; validation after it: "
        f"richness ratio {final['richness_ratio']:.2f}, scatter {final['richness_scatter_dex']:.3f} dex")
    record = dict(model=MODEL, arch=arch, seed=seed, iters=iters, batch=batch, crop=crop_size, lr=lr, log=log,
                  final_val=final, richness_cal=[a, b], seconds=round(spent + time.perf_counter() - t0, 1),
                  command=command, data=data or {}, torch=torch.__version__, device=device, threads=threads,
                  split=source.split_sizes())
    return record, model.state_dict()
