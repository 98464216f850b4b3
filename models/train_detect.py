"""Training loop of the learned detector (models/detect_net.py): AdamW on the CenterNet focal and offset
losses, one-cycle learning rate, batches from a function of the step number (so a resumed run sees the same
batches as an uninterrupted one), checkpoints that survive a killed session.

`train(make_batch, val, ...)` returns (record, state_dict); the record holds the configuration, the loss
history and the validation figures: completeness (centres to find that have a peak within `match_radius` px)
and purity (peaks within `match_radius` of a centre to find or of a faint source that may be found) at the
chosen heat-map threshold, and the threshold that maximises their harmonic mean.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .detect_net import DetectNet, find_peaks, focal_loss, heat_and_offsets
from .progress import say

MODEL = "detect_net"
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)


def _match_counts(peaks: np.ndarray, centres: np.ndarray, ignore: np.ndarray, radius: float) -> tuple[int, int, int]:
    """(centres found, peaks that are a centre or an ignorable source, peaks) for one scene; one peak per centre,
    nearest pairs first."""
    if len(peaks) == 0:
        return 0, 0, 0
    found, used = 0, np.zeros(len(peaks), bool)
    if len(centres):
        d = np.hypot(centres[:, None, 0] - peaks[None, :, 0], centres[:, None, 1] - peaks[None, :, 1])
        taken = np.zeros(len(centres), bool)
        for flat in np.argsort(d, axis=None):
            c, k = np.unravel_index(flat, d.shape)
            if d[c, k] > radius:
                break
            if taken[c] or used[k]:
                continue
            taken[c], used[k] = True, True
            found += 1
    good = used.copy()
    if len(ignore):
        d = np.hypot(ignore[:, None, 0] - peaks[None, :, 0], ignore[:, None, 1] - peaks[None, :, 1])
        good |= (d <= radius).any(axis=0)
    return found, int(good.sum()), len(peaks)


def validate(model: DetectNet, val: dict, radius: float = 1.5, margin: int = 4) -> dict:
    """Completeness and purity per threshold on the validation scenes (peaks and centres within `margin` px of
    the scene's edge left out)."""
    model.eval()
    counts = {t: np.zeros(4) for t in THRESHOLDS}
    for x, cen, ign in zip(val["x"], val["centres"], val["ignore"]):
        heat, off = heat_and_offsets(model, x)
        s = x.shape[-1]

        def inner(p: np.ndarray) -> np.ndarray:
            return (p[:, 0] >= margin) & (p[:, 0] < s - margin) & (p[:, 1] >= margin) & (p[:, 1] < s - margin)
        c = cen[inner(cen)] if len(cen) else cen
        for t in THRESHOLDS:
            pk = find_peaks(heat, off, t)
            pk = pk[inner(pk)] if len(pk) else pk
            f, g, n = _match_counts(pk, c, ign, radius)
            counts[t] += (f, len(c), g, n)
    out = {}
    for t, (f, nc, g, n) in counts.items():
        comp, pur = f / max(nc, 1), g / max(n, 1)
        out[f"{t:.1f}"] = dict(completeness=round(comp, 4), purity=round(pur, 4),
                               f1=round(2 * comp * pur / max(comp + pur, 1e-9), 4))
    best = max(out, key=lambda k: out[k]["f1"])
    return dict(per_threshold=out, best_threshold=float(best))


def train(make_batch: Callable[[int], dict], val: dict, steps: int = 6000, lr: float = 3e-3, seed: int = 0,
          bands: tuple[str, ...] = ("g", "r", "i", "z"), widths: tuple[int, int, int] = (16, 32, 48),
          device: str = "cpu", threads: int = 2,
          checkpoint: Path | None = None, checkpoint_every: int = 200, validate_every: int = 1000,
          stop_after: int | None = None, record: dict | None = None) -> tuple[dict, dict] | None:
    """Train a DetectNet on `steps` batches `make_batch(step)` (dict of x, heat, weight, off, omask arrays).

    With `checkpoint`, the model, optimiser, schedule, step and history are saved there every
    `checkpoint_every` steps, and a run that finds a checkpoint of the same configuration resumes from it.
    `stop_after`: stop (checkpoint saved, None returned) once that many steps of the schedule are done, to go
    on in a later run."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    record = dict(record or {})
    arch = dict(bands=list(bands), widths=list(widths))
    config = dict(steps=steps, lr=lr, seed=seed, arch=arch)
    model = DetectNet(bands, tuple(widths)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    history: list[dict] = []
    start, seconds = 0, 0.0
    ck = load_checkpoint(checkpoint, config, model, opt, sched, device)
    if ck is not None:
        start, history, seconds = ck["step"], ck["history"], ck.get("seconds", 0.0)
    t0 = time.perf_counter() - seconds

    def save(done: int) -> None:
        save_checkpoint(checkpoint, config, model, opt, sched, step=done, history=history,
                        seconds=time.perf_counter() - t0)

    run_loss = np.zeros(2)
    window = np.zeros(3)  # loss sums and steps since the last validation: the history's mean losses
    pool = ThreadPoolExecutor(1)  # the next batch is composed while this one trains
    nxt = pool.submit(make_batch, start) if start < steps else None
    for step in range(start, steps):
        b = nxt.result()
        nxt = pool.submit(make_batch, step + 1) if step + 1 < steps else None
        model.train()
        t = {k: torch.as_tensor(v).to(device) for k, v in b.items()}
        out = model(t["x"])
        lh, lo = focal_loss(out, t["heat"], t["weight"], t["off"], t["omask"])
        loss = lh + lo
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run_loss = 0.98 * run_loss + 0.02 * np.array([lh.item(), lo.item()]) if step > start else \
            np.array([lh.item(), lo.item()])
        window += (lh.item(), lo.item(), 1)
        done = step + 1
        if done % 50 == 0 or done == steps:
            say(f"step {done}/{steps}  heat loss {run_loss[0]:.4f}  offset loss {run_loss[1]:.4f}  "
                f"{time.perf_counter() - t0:.0f} s")
        if done % validate_every == 0 or done == steps:
            v = validate(model, val)
            best = v["per_threshold"][f"{v['best_threshold']:.1f}"]
            history.append(dict(step=done, heat_loss=float(window[0] / window[2]),
                                offset_loss=float(window[1] / window[2]),
                                seconds=round(time.perf_counter() - t0, 1), **v))
            window[:] = 0
            say(f"  validation: best threshold {v['best_threshold']}: completeness {best['completeness']:.4f} "
                f"purity {best['purity']:.4f}")
        if checkpoint is not None and (done % checkpoint_every == 0 or done == steps):
            save(done)
        if stop_after is not None and done >= stop_after and done < steps:
            if checkpoint is not None and done % checkpoint_every:
                save(done)
            nxt.cancel()
            pool.shutdown()
            say(f"stopped after step {done}/{steps}; run again to resume from {checkpoint}")
            return None
    pool.shutdown()
    model.eval()
    final = history[-1] if history else {}
    rec = dict(record, model=MODEL, arch=arch, training=config, history=history,
               threshold=final.get("best_threshold", 0.4), seconds=round(time.perf_counter() - t0, 1),
               val=final.get("per_threshold"))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return rec, state
