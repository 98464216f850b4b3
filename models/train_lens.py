"""Training of the strong-lens classifier (`deepfield train lens`), and of the merger classifier (`deepfield train
merger`, the same network and loop on the merger finder's stamps), on stamps it is given.

Data: the stamp sets of tasks.trainsets.lens_stamps (training and validation made from different seeds;
the command line makes them). Training: binary cross-entropy on a class-balanced set (half lenses), AdamW
with a one-cycle learning-rate schedule, random flips and quarter turns of every batch. Everything random
draws from the seed, so the same command on the same software gives the same weights on a CPU.

The figures of the strong-lens finding challenge (Metcalf et al. 2019, A&A 625, A119), used for validation
here and by the evaluation (flows/evaluate/lens.py):
- AUROC, the area under the ROC curve (scikit-learn);
- TPR0, the fraction of lenses scored above every non-lens (the highest TPR with zero false positives);
- TPR10, the fraction of lenses scored above the tenth-highest non-lens (fewer than ten false positives).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from .augment import dihedral
from .lens_cnn import LensResNet, preprocess, score
from .progress import say

MODEL = "lens_resnet"
MERGER_MODEL = "merger_resnet"  # the same network trained on mergers against close pairs and other look-alikes


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


def train(tr: dict, va: dict, epochs: int = 10, batch: int = 128, lr: float = 2e-3, seed: int = 0,
          device: str = "cpu", record: dict | None = None, model_name: str = MODEL) -> tuple[dict, dict]:
    """Train the lens classifier (or, with `model_name` MERGER_MODEL, the merger classifier: the same network
    on the merger finder's stamps) on the stamp sets `tr` and `va` (tasks.trainsets.lens_stamps.simulate_stamps:
    images, sigma, label); returns the training record (`record`, the data's description, with the
    architecture, settings and history added) and the weights (state dict)."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    n_train = len(tr["label"])
    x_tr, y_tr = preprocess(tr["images"], tr["sigma"]), torch.as_tensor(tr["label"], dtype=torch.float32)
    y_va = va["label"]  # validation stamps are preprocessed by score()
    arch = dict(in_bands=int(tr["images"].shape[1]))
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
    record = dict(record or {}, model=model_name, arch=arch, seed=seed, epochs=epochs, batch=batch, lr=lr,
                  history=history, train_seconds=round(time.perf_counter() - t1, 1), torch=torch.__version__,
                  device=device)
    return record, model.state_dict()
