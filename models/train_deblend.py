"""Training of the learned deblender (`deepfield train deblend`).

Data: tasks.sim.blend_stamps (blends of 2-4 galaxies with each member's image alone). Every member of every
blend is a training example: the network gets the blend and the member's centre (the true centre moved by up
to half a pixel, as a detection would be) and the other members' centres, and learns the fraction of each
pixel's light that is the member's: f = T_m / (sum_k T_k + 0.1 sigma) per band, T the noiseless images.

Loss: the pixel term is the squared fraction error weighted by the blend's S/N per pixel (clipped at 20), and
the flux term is the mean over bands of |sum(f_pred T_total) - sum(T_m)| / sum(T_m), so that the fractions
give the member's flux. Adam with a one-cycle schedule, quarter turns and flips of every batch. Same command,
same seed, same software: same weights on a CPU.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from deepfield.tasks.sim.blend_stamps import BlendConfig, simulate_blends

from .augment import dihedral
from .deblend_unet import DeblendUNet, network_input
from .records import save_weights, say

MODEL = "deblend_unet"



def examples(d: dict, rng: np.random.Generator, jitter: float = 0.5) -> dict:
    """Network inputs, target fractions, pixel weights, noiseless blend totals and in-stamp member fluxes for
    every member of every blend in `d` (simulate_blends output)."""
    xs, fs, ws, tots, fl, fls = [], [], [], [], [], []
    mem = d["members"]
    for b, truth in enumerate(d["truth"]):
        rows = mem[mem.blend == b].sort_values("member")
        centres = rows[["y", "x"]].to_numpy(float) + rng.uniform(-jitter, jitter, (len(rows), 2))
        sigma = d["sigma"][b]
        total = truth.sum(axis=0)
        for m in range(len(rows)):
            others = np.delete(centres, m, axis=0)
            xs.append(network_input(d["images"][b], sigma, tuple(centres[m]), others))
            fs.append(truth[m] / (total + 0.1 * sigma[:, None, None]))
            ws.append(np.clip(total / sigma[:, None, None], 0, 20) + 0.01)
            tots.append(total)
            fl.append(truth[m].sum(axis=(1, 2)))
            fls.append(20.0 * sigma)
    return dict(x=np.stack(xs), f=np.stack(fs).astype(np.float32), w=np.stack(ws).astype(np.float32),
                total=np.stack(tots).astype(np.float32), flux=np.stack(fl).astype(np.float32),
                floor=np.stack(fls).astype(np.float32))


def loss_terms(pred: torch.Tensor, f: torch.Tensor, w: torch.Tensor, total: torch.Tensor, flux: torch.Tensor,
               floor: torch.Tensor):
    """Pixel and flux loss. floor: (N, B) flux added to the flux-error denominator (20 sky sigma), so that
    members near the noise, whose relative errors mean little, do not dominate."""
    pix = (w * (pred - f) ** 2).sum() / w.sum()
    est = (pred * total).sum(dim=(2, 3))
    fl = ((est - flux).abs() / (flux + floor)).mean()
    return pix, fl


def train(out: Path, n_train: int = 3000, n_val: int = 300, epochs: int = 12, batch: int = 64, lr: float = 3e-3,
          seed: int = 0, workers: int = 2, device: str = "cpu", cfg: BlendConfig | None = None,
          command: str = "", widths=(8, 16, 32, 64), threads: int = 1) -> dict:
    """Train the deblender on `n_train` simulated blends; save weights + record to `out`; return the record."""
    cfg = cfg or BlendConfig()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)  # 1 by default: OpenMP threads spin and crawl when another process shares the cores
    # (no torch.use_deterministic_algorithms: on the CPU its max-pool and transposed-convolution backward
    # fallbacks are 5x slower, and the CPU kernels used here give the same result run to run anyway)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    say(f"simulating {n_train} training and {n_val} validation blends ...")
    tr = examples(simulate_blends(n_train, seed * 1000 + 1, cfg, workers), rng)
    va = examples(simulate_blends(n_val, seed * 1000 + 2, cfg, workers), rng)
    t_data = time.perf_counter() - t0
    tr = {k: torch.as_tensor(v) for k, v in tr.items()}
    va = {k: torch.as_tensor(v) for k, v in va.items()}
    n = len(tr["x"])
    arch = dict(in_bands=len(cfg.bands), widths=list(widths))
    model = DeblendUNet(**arch).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((n + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    ri = cfg.bands.index(cfg.reference_band)
    history = []
    t1 = time.perf_counter()
    say(f"training on {n} members of {n_train} blends for {epochs} epochs ...")
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        tot_pix = tot_fl = 0.0
        for k in range(0, n, batch):
            idx = perm[k:k + batch]
            x, f, w, total = dihedral([tr["x"][idx], tr["f"][idx], tr["w"][idx], tr["total"][idx]], g)
            pix, fl = loss_terms(model(x.to(device)), f.to(device), w.to(device), total.to(device),
                                 tr["flux"][idx].to(device), tr["floor"][idx].to(device))
            loss = pix + fl
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot_pix += pix.item() * len(idx)
            tot_fl += fl.item() * len(idx)
        model.eval()
        with torch.no_grad():
            vp, vf, m = 0.0, 0.0, len(va["x"])
            errs = []
            for k in range(0, m, 256):
                sl = slice(k, k + 256)
                pred = model(va["x"][sl].to(device))
                p, f_ = loss_terms(pred, va["f"][sl].to(device), va["w"][sl].to(device), va["total"][sl].to(device),
                                   va["flux"][sl].to(device), va["floor"][sl].to(device))
                vp += p.item() * len(va["x"][sl])
                vf += f_.item() * len(va["x"][sl])
                est = (pred.cpu() * va["total"][sl]).sum(dim=(2, 3))
                bright = va["flux"][sl][:, ri] > 10 ** (-0.4 * (23.5 - cfg.zeropoint))  # brighter than 23.5
                errs.append(((est - va["flux"][sl]) / va["flux"][sl]).abs()[bright].flatten())
            med = float(torch.cat(errs).median())
        history.append(dict(epoch=ep + 1, train_pix=tot_pix / n, train_flux=tot_fl / n, val_pix=vp / m,
                            val_flux=vf / m, val_median_abs_flux_err_noiseless_i_lt_23p5=med))
        say(f"epoch {ep + 1}/{epochs}: train pixel {tot_pix / n:.4f} flux {tot_fl / n:.4f}  "
             f"val pixel {vp / m:.4f} flux {vf / m:.4f} (median |dF|/F {med:.4f})  ({time.perf_counter() - t1:.0f} s)")
    record = dict(model=MODEL, arch=arch, blend_config=cfg.model_dump(mode="json"), seed=seed, n_train=n_train,
                  n_val=n_val, n_examples=n, epochs=epochs, batch=batch, lr=lr, history=history, command=command,
                  data_seconds=round(t_data, 1), train_seconds=round(time.perf_counter() - t1, 1),
                  torch=torch.__version__, device=device, threads=threads)
    save_weights(out, record, model.state_dict())  # atomic: a killed run leaves the old weights or the new
    return record
