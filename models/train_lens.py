"""Training and evaluation of the strong-lens classifier (`deepfield train lens`, `deepfield eval lens`).

Data: tasks.sim.lens_stamps, made fresh from a seed (training, validation and each evaluation set use
different seeds). Training: binary cross-entropy on a class-balanced set (half lenses), AdamW with a
one-cycle learning-rate schedule, random flips and quarter turns of every batch. Everything random
draws from the seed, so the same command on the same software gives the same weights on a CPU.

Evaluation follows the strong-lens finding challenge (Metcalf et al. 2019, A&A 625, A119):
- AUROC, the area under the ROC curve (scikit-learn);
- TPR0, the fraction of lenses scored above every non-lens (the highest TPR with zero false positives);
- TPR10, the fraction of lenses scored above the tenth-highest non-lens (fewer than ten false positives);
plus completeness at the stage's threshold against Einstein radius and arc S/N, and the throughput.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from deepfield.tasks.sim.lens_stamps import StampConfig, simulate_stamps

from .augment import dihedral
from .lens_cnn import LensResNet, preprocess, score
from .records import save_weights, say
from .registry import create_model, entry

MODEL = "lens_resnet"
THRESHOLD = 0.5  # the lens stage's default: candidates scoring above it enter the lens-candidate table
TRAIN_SEED_OFFSET, VAL_SEED_OFFSET = 1, 2
EVAL_SEED = 20261123  # held-out evaluation sets: a seed no training run uses by default



def _progress(what: str) -> Callable[[int, int], None]:
    last = [0.0]

    def cb(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] > 10:
            last[0] = now
            say(f"  {what}: {done}/{total} stamps")
    return cb


def tpr_at_fp(scores: np.ndarray, labels: np.ndarray, n_fp: int) -> float:
    """Fraction of positives scored strictly above the (n_fp + 1)-th highest negative: the true-positive
    rate with at most n_fp false positives (Metcalf et al. 2019: TPR0 is n_fp = 0, TPR10 is n_fp = 9,
    "fewer than ten")."""
    neg = np.sort(scores[labels == 0])[::-1]
    pos = scores[labels == 1]
    if pos.size == 0:
        raise ValueError("no positives")
    t = neg[n_fp] if neg.size > n_fp else -np.inf
    return float(np.mean(pos > t))


def metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score
    return dict(auroc=float(roc_auc_score(labels, scores)), tpr0=tpr_at_fp(scores, labels, 0),
                tpr10=tpr_at_fp(scores, labels, 9), n=int(labels.size), n_lens=int(labels.sum()),
                lens_fraction=float(labels.mean()))


def train(out: Path, n_train: int = 16000, n_val: int = 2000, epochs: int = 10, batch: int = 128,
          lr: float = 2e-3, seed: int = 0, workers: int = 2, device: str = "cpu",
          cfg: StampConfig | None = None, command: str = "") -> dict:
    """Train the lens classifier and save weights + training record to `out`; returns the record."""
    cfg = cfg or StampConfig()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.perf_counter()
    say(f"simulating {n_train} training and {n_val} validation stamps (half lenses) ...")
    tr = simulate_stamps(n_train, 0.5, seed * 1000 + TRAIN_SEED_OFFSET, cfg, workers, _progress("training"))
    va = simulate_stamps(n_val, 0.5, seed * 1000 + VAL_SEED_OFFSET, cfg, workers, _progress("validation"))
    t_data = time.perf_counter() - t0
    x_tr, y_tr = preprocess(tr["images"], tr["sigma"]), torch.as_tensor(tr["label"], dtype=torch.float32)
    y_va = va["label"]  # validation stamps are preprocessed by score()
    arch = dict(in_bands=len(cfg.bands))
    model = LensResNet(**arch).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((n_train + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    lossf = nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(seed)
    history = []
    t1 = time.perf_counter()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=g)
        total = 0.0
        for k in range(0, n_train, batch):
            idx = perm[k:k + batch]
            xb = dihedral([x_tr[idx]], g)[0].to(device)
            loss = lossf(model(xb), y_tr[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        s = score(model, va["images"], va["sigma"], device=device)
        with torch.no_grad():
            vl = float(lossf(torch.logit(torch.as_tensor(s).clamp(1e-6, 1 - 1e-6)), torch.as_tensor(y_va, dtype=torch.float32)))
        m = metrics(s, y_va)
        history.append(dict(epoch=ep + 1, train_loss=total / n_train, val_loss=vl, val_auroc=m["auroc"]))
        say(f"epoch {ep + 1}/{epochs}: train loss {total / n_train:.4f}  val loss {vl:.4f}  "
             f"val AUROC {m['auroc']:.4f}  ({time.perf_counter() - t1:.0f} s)")
    record = dict(model=MODEL, arch=arch, stamp_config=cfg.model_dump(mode="json"), seed=seed, n_train=n_train,
                  n_val=n_val, epochs=epochs, batch=batch, lr=lr, history=history, command=command,
                  data_seconds=round(t_data, 1), train_seconds=round(time.perf_counter() - t1, 1),
                  torch=torch.__version__, device=device)
    save_weights(out, record, model.state_dict())  # atomic: a killed run leaves the old weights or the new
    return record


def _binned(values: np.ndarray, found: np.ndarray, edges) -> list[dict]:
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (values >= lo) & (values < hi)
        out.append(dict(lo=float(lo), hi=float(hi), n=int(sel.sum()),
                        completeness=float(found[sel].mean()) if sel.any() else None))
    return out


def evaluate(weights: Path | None = None, n: int = 10000, lens_fraction: float = 0.02, seed: int = EVAL_SEED,
             shifted: bool = False, workers: int = 2, device: str = "cpu", batch: int = 256) -> dict:
    """Score a held-out set and return the challenge metrics, completeness and throughput."""
    model = create_model(MODEL, device=device, weights=weights)
    info = getattr(model, "training_info", {})
    cfg = StampConfig.model_validate(info.get("stamp_config", {}))
    if shifted:
        cfg = cfg.shifted()
    say(f"simulating {n} {'shifted-configuration ' if shifted else ''}evaluation stamps "
         f"({lens_fraction:.0%} lenses, seed {seed}) ...")
    d = simulate_stamps(n, lens_fraction, seed + (1 if shifted else 0), cfg, workers, _progress("evaluation"))
    score(model, d["images"][:batch], d["sigma"][:batch], batch=batch, device=device)  # warm-up
    t = time.perf_counter()
    s = score(model, d["images"], d["sigma"], batch=batch, device=device)
    dt = time.perf_counter() - t
    res = metrics(s, d["label"])
    meta = d["meta"].assign(score=s)
    lenses = meta[meta.label == 1]
    found = (lenses.score > THRESHOLD).to_numpy()
    res.update(
        config="shifted" if shifted else "same", psf_scale=cfg.psf_scale, depth_offset=cfg.depth_offset, seed=seed,
        threshold=THRESHOLD, completeness=float(found.mean()),
        false_positive_rate=float((meta[meta.label == 0].score > THRESHOLD).mean()),
        completeness_vs_theta_e=_binned(lenses.theta_e.to_numpy(), found, [0.8, 1.2, 1.6, 2.0, 2.5, 3.01]),
        completeness_vs_arc_snr=_binned(lenses.arc_snr.to_numpy(), found, [0, 10, 20, 40, 80, 160, np.inf]),
        false_positives_by_kind={k: float((g.score > THRESHOLD).mean())
                                 for k, g in meta[meta.label == 0].groupby("kind")},
        throughput_stamps_per_s=float(n / dt), batch=batch, device=device, torch_threads=torch.get_num_threads(),
        weights=str(weights or entry(MODEL).weights))
    return res


def format_report(r: dict) -> str:
    lines = [f"lens finder on {r['n']} {r['config']}-configuration stamps, {r['n_lens']} lenses "
             f"({r['lens_fraction']:.1%}); PSF x{r['psf_scale']:.2f}, depth {r['depth_offset']:+.1f} mag",
             f"  AUROC {r['auroc']:.4f}   TPR0 {r['tpr0']:.3f}   TPR10 {r['tpr10']:.3f}",
             f"  at score > {r['threshold']}: completeness {r['completeness']:.3f}, "
             f"false-positive rate {r['false_positive_rate']:.4f}",
             "  completeness vs Einstein radius (arcsec): " + ", ".join(
                 f"{b['lo']:.1f}-{b['hi']:.1f}: {b['completeness']:.2f} ({b['n']})" for b in r["completeness_vs_theta_e"]
                 if b["n"]),
             "  completeness vs arc S/N: " + ", ".join(
                 f"{b['lo']:.0f}-{b['hi']:.0f}: {b['completeness']:.2f} ({b['n']})" for b in r["completeness_vs_arc_snr"]
                 if b["n"]),
             "  false-positive rate by kind: " + ", ".join(f"{k} {v:.4f}" for k, v in r["false_positives_by_kind"].items()),
             f"  throughput {r['throughput_stamps_per_s']:.0f} stamps/s ({r['device']}, batch {r['batch']}, "
             f"{r['torch_threads']} threads)"]
    return "\n".join(lines)

