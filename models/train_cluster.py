"""Training of the cluster finder (`deepfield train cluster`).

Data: simulated fields with three clusters each on average (tasks/trainsets/cluster.py), binned as the
stage bins them. A seeded choice of `val_fields` fields is kept back for validation.

Each step draws `batch` crops of `crop` x `crop` binned pixels (205" at 128): 60% centred near a random
cluster of a random training field (anywhere within the crop's inner part), the rest anywhere (up to 16
binned pixels beyond the field's edge, where the planes are zero, as the stage's windows at field edges
are). A random quarter turn and flip is applied to image and targets alike. Loss: CenterNet's focal loss
on the centre heat map plus L1 on z and ln richness (models/cluster_net.py). Adam, warmed up over the first 5% of the steps, then a cosine decay.

Validation, on the held-out fields whole: the loss, and with `detect` at the stage's threshold the
completeness for clusters of richness >= 30 at z <= 0.8 and the purity of the detections (a detection
within `MATCH_BINNED` binned pixels of a true centre of any richness is true).

Same command, same seed, same software: same weights on a CPU.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from .augment import dihedral
from .cluster_net import STRIDE, ClusterNet, detect, loss_terms, targets, window
from .progress import say

MODEL = "cluster_net"
POSITIVE_FRACTION = 0.6
EDGE = 16  # binned pixels a random crop may reach beyond the field
MATCH_BINNED = 25.0  # 40" at bin 8: a detection this close to a true centre found it (validation only)
THRESHOLD = 0.3  # the stage's default


def sample_batch(planes: np.ndarray, truth: pd.DataFrame, fields: np.ndarray, n: int, size: int,
                 rng: np.random.Generator) -> list[torch.Tensor]:
    """[x (n, C, S, S), heat, z, ln richness (n, 1, S/4, S/4)] of n random crops (module docstring)."""
    _, _, h, w = planes.shape
    xs, heats, zs, rs = [], [], [], []
    by_field = {k: truth[truth.k == k] for k in fields}
    for _ in range(n):
        k = int(rng.choice(fields))
        t = by_field[k]
        if len(t) and rng.uniform() < POSITIVE_FRACTION:
            c = t.iloc[int(rng.integers(len(t)))]
            x0 = int(np.floor(c.xb)) - int(rng.integers(size // 8, size - size // 8))
            y0 = int(np.floor(c.yb)) - int(rng.integers(size // 8, size - size // 8))
        else:
            x0, y0 = (int(rng.integers(-EDGE, max(w - size + EDGE, -EDGE + 1))),
                      int(rng.integers(-EDGE, max(h - size + EDGE, -EDGE + 1))))
        xs.append(window(planes[k], y0, x0, size, size))
        centres = np.stack([t.xb.to_numpy() - x0, t.yb.to_numpy() - y0], axis=1) if len(t) else np.zeros((0, 2))
        heat, zmap, rmap = targets((size // STRIDE, size // STRIDE), centres, t.z.to_numpy(), t.richness.to_numpy())
        heats.append(heat)
        zs.append(zmap)
        rs.append(rmap)
    return [torch.as_tensor(np.stack(xs)), *(torch.as_tensor(np.stack(a))[:, None] for a in (heats, zs, rs))]


def match(found: pd.DataFrame, truth: pd.DataFrame, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching by score: (index of the true cluster each detection found, or -1; for each true
    cluster, the index of the detection that found it, or -1). Positions in the same units as `radius`."""
    det_to, true_to = np.full(len(found), -1), np.full(len(truth), -1)
    tx, ty = truth["x"].to_numpy(float), truth["y"].to_numpy(float)
    for i in np.argsort(-found["score"].to_numpy(), kind="stable"):
        d = np.hypot(tx - found["x"].iat[i], ty - found["y"].iat[i])
        d[true_to >= 0] = np.inf
        j = int(np.argmin(d)) if len(d) else -1
        if j >= 0 and d[j] <= radius:
            det_to[i], true_to[j] = j, i
    return det_to, true_to


@torch.no_grad()
def validate(model: ClusterNet, planes: np.ndarray, truth: pd.DataFrame, fields: np.ndarray, device) -> dict:
    """Loss and detection figures on whole held-out fields (module docstring)."""
    model.eval()
    losses, n_rich, n_rich_found, n_det, n_det_true, dz = [], 0, 0, 0, 0, []
    for k in fields:
        t = truth[truth.k == k]
        h, w = planes.shape[-2:]
        centres = np.stack([t.xb.to_numpy(), t.yb.to_numpy()], axis=1) if len(t) else np.zeros((0, 2))
        tg = targets((-(-h // STRIDE), -(-w // STRIDE)), centres, t.z.to_numpy(), t.richness.to_numpy())
        x = torch.as_tensor(planes[k][None]).to(device)
        losses.append(loss_terms(model, x, *(torch.as_tensor(a)[None].to(device) for a in tg))["total"].item())
        f = pd.DataFrame(detect(model, planes[k], THRESHOLD, device=str(device)))
        det_to, true_to = match(f, t.rename(columns={"xb": "x", "yb": "y"}), MATCH_BINNED)
        rich = (t.richness.to_numpy() >= 30) & (t.z.to_numpy() <= 0.8)
        n_rich += int(rich.sum())
        n_rich_found += int((rich & (true_to >= 0)).sum())
        n_det += len(f)
        n_det_true += int((det_to >= 0).sum())
        ok = det_to >= 0
        dz += list((f.z.to_numpy()[ok] - t.z.to_numpy()[det_to[ok]]) / (1 + t.z.to_numpy()[det_to[ok]]))
    model.train()
    return dict(loss=float(np.mean(losses)), completeness_rich=n_rich_found / max(n_rich, 1), n_rich=n_rich,
                purity=n_det_true / max(n_det, 1), n_detections=n_det,
                sigma_z=float(1.4826 * np.median(np.abs(dz))) if dz else float("nan"))


def train(planes: np.ndarray, truth: pd.DataFrame, iters: int = 3000, batch: int = 16, crop_size: int = 128,
          lr: float = 2e-3, val_fields: int = 4, seed: int = 0, device: str = "cpu", threads: int = 2,
          log_every: int = 100, command: str = "", data: dict | None = None, arch: dict | None = None
          ) -> tuple[dict, dict]:
    """Train on binned field `planes` (F, C, H, W) and their `truth` (tasks.trainsets.cluster.field_images);
    returns the training record and the weights (state dict)."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(planes))
    va, tr = np.sort(order[:val_fields]), np.sort(order[val_fields:])
    arch = dict(dict(bands=["g", "r", "i", "z"], bin=8), **(arch or {}))
    model = ClusterNet(**arch).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    warm = max(1, iters // 20)  # linear warm-up over 5% of the steps, then a cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(i, iters) / iters)))
    g = torch.Generator().manual_seed(seed)
    say(f"training on {len(tr)} fields ({int(truth.k.isin(tr).sum())} clusters), {len(va)} kept for validation, "
        f"{iters} steps of {batch} crops of {crop_size}^2 binned px ...")
    log, acc, t0 = [], [], time.perf_counter()
    model.train()
    for it in range(1, iters + 1):
        xb, heat, zmap, rmap = dihedral(sample_batch(planes, truth, tr, batch, crop_size, rng), g)
        terms = loss_terms(model, xb.to(device), heat[:, 0].to(device), zmap[:, 0].to(device), rmap[:, 0].to(device))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        sched.step()
        acc.append({k: v.item() for k, v in terms.items()})
        if it % log_every == 0 or it == iters:
            rec = {k: float(np.mean([a[k] for a in acc])) for k in acc[0]}
            acc = []
            rec.update(iter=it, seconds=round(time.perf_counter() - t0, 1))
            if it % (log_every * 5) == 0 or it == iters:
                rec["val"] = validate(model, planes, truth, va, device)
            log.append(rec)
            v = rec.get("val")
            say(f"step {it}/{iters}: loss {rec['total']:.3f} (focal {rec['focal']:.3f}, z {rec['z']:.3f}, "
                f"ln richness {rec['richness']:.3f})" + (
                    f"; validation loss {v['loss']:.3f}, completeness {v['completeness_rich']:.2f} of {v['n_rich']}, "
                    f"purity {v['purity']:.2f} of {v['n_detections']}, sigma_z/(1+z) {v['sigma_z']:.3f}" if v else "")
                + f" ({rec['seconds']:.0f} s)")
    model.eval()
    record = dict(model=MODEL, arch=arch, seed=seed, iters=iters, batch=batch, crop=crop_size, lr=lr,
                  train_fields=[int(k) for k in tr], val_fields=[int(k) for k in va], log=log,
                  final_val=log[-1].get("val"), seconds=round(time.perf_counter() - t0, 1), command=command,
                  data=data or {}, torch=torch.__version__, device=device, threads=threads)
    return record, model.state_dict()
