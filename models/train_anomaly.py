"""Training of the GAN anomaly scorer (`deepfield train anomaly`).

Data: stamps of the sources the `anomaly` stage selects in simulated fields of normal sources only
(tasks.trainsets.anomaly.training_stamps: galaxies, stars, clusters, masked detector defects; no anomalies
and no artefacts), cut and scaled as the stage does. 5% of them are kept back for validation.

1. WGAN-GP (Gulrajani et al. 2017), as Storey-Fisher et al. 2021: five critic steps per generator step,
   gradient-penalty weight 10, Adam (lr 1e-4, betas 0.0 and 0.9) for both; the real stamps are turned by
   a random quarter turn and flip. The critic's Wasserstein estimate W = E[D(real)] - E[D(G(z))] is logged.
2. Encoder (f-AnoGAN's izi_f, Schlegl et al. 2019): with G and D frozen, E is trained to minimise the
   anomaly score itself at z = E(x), (1 - lambda) mean|x - G(E(x))| + lambda mean|f(x) - f(G(E(x)))|, on
   the same real stamps.

Same command, same seed, same software: same weights on a CPU.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from .anomaly_gan import (LAMBDA, AnomalyGAN, anomaly_scores, frozen, gradient_penalty, local_terms, score_norm)
from .augment import dihedral
from .progress import say

MODEL = "anomaly_wgan"
GP_WEIGHT = 10.0
LOCAL_WEIGHT = 0.01  # of the local pixel term (noise units, about 3 on normal windows) in the encoder's loss
N_CRITIC = 5


def critic_step(model: AnomalyGAN, opt_d, real: torch.Tensor, g: torch.Generator) -> dict:
    """One critic update; returns the Wasserstein estimate W and the gradient penalty."""
    z = torch.randn(real.shape[0], model.z_dim, generator=g).to(real.device)
    with torch.no_grad():
        fake = model.generator(z)
    d_real, d_fake = model.critic(real).mean(), model.critic(fake).mean()
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=g).to(real.device)
    gp = gradient_penalty(model.critic, real, fake, eps)
    loss = d_fake - d_real + GP_WEIGHT * gp
    opt_d.zero_grad()
    loss.backward()
    opt_d.step()
    return dict(w=(d_real - d_fake).item(), gp=gp.item())


def generator_step(model: AnomalyGAN, opt_g, n: int, g: torch.Generator, device) -> float:
    z = torch.randn(n, model.z_dim, generator=g).to(device)
    with frozen(model.critic):
        loss = -model.critic(model.generator(z)).mean()
        opt_g.zero_grad()
        loss.backward()
    opt_g.step()
    return loss.item()


def train_gan(model: AnomalyGAN, x: torch.Tensor, iters: int, batch: int, seed: int, device, log_every: int = 100,
              lr: float = 1e-4, checkpoint: Path | None = None, checkpoint_every: int = 250,
              stop_after: int | None = None) -> list[dict] | None:
    """`iters` generator steps (each after N_CRITIC critic steps) on scaled stamps x; returns the log. With
    `checkpoint`, the networks, both optimisers, the batch generator's state and the log are saved every
    `checkpoint_every` steps (atomically) and a run of the same configuration resumes from them, to the same
    weights as an uninterrupted run; `stop_after` stops there (None returned) to go on in a later run."""
    g = torch.Generator().manual_seed(seed)
    opt_d = torch.optim.Adam(model.critic.parameters(), lr=lr, betas=(0.0, 0.9))
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=lr, betas=(0.0, 0.9))
    model.generator.train()
    model.critic.train()
    config = dict(iters=iters, batch=batch, seed=seed, lr=lr, n=int(len(x)))
    log, acc, start, spent = [], [], 0, 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        ck = torch.load(checkpoint, map_location=device, weights_only=False)
        if ck.get("config") == config:
            model.load_state_dict(ck["model"])
            opt_d.load_state_dict(ck["opt_d"])
            opt_g.load_state_dict(ck["opt_g"])
            g.set_state(ck["rng"])
            log, start, spent = ck["log"], ck["iter"], ck["seconds"]
            say(f"resuming the GAN from {checkpoint} at step {start}/{iters}")
        else:
            say(f"{checkpoint}: a checkpoint of another configuration; starting afresh")
    t0 = time.perf_counter() - spent

    def save(it: int) -> None:
        tmp = Path(checkpoint).with_name(f".{Path(checkpoint).name}.{os.getpid()}.tmp")
        torch.save(dict(config=config, model=model.state_dict(), opt_d=opt_d.state_dict(),
                        opt_g=opt_g.state_dict(), rng=g.get_state(), log=log, iter=it,
                        seconds=time.perf_counter() - t0), tmp)
        os.replace(tmp, checkpoint)

    for it in range(start + 1, iters + 1):
        for _ in range(N_CRITIC):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            acc.append(critic_step(model, opt_d, dihedral([x[idx]], g)[0].to(device), g))
        g_loss = generator_step(model, opt_g, batch, g, device)
        if it % log_every == 0 or it == iters:
            rec = dict(iter=it, w=float(np.mean([a["w"] for a in acc])), gp=float(np.mean([a["gp"] for a in acc])),
                       g_loss=g_loss, seconds=round(time.perf_counter() - t0, 1))
            log.append(rec)
            acc = []
            say(f"GAN step {it}/{iters}: Wasserstein estimate {rec['w']:.3f}, gradient penalty {rec['gp']:.3f} "
                f"({rec['seconds']:.0f} s)")
        if checkpoint is not None and (it % checkpoint_every == 0 or it == iters or it == stop_after):
            save(it)
        if stop_after is not None and stop_after <= it < iters:
            say(f"stopped after GAN step {it}/{iters}; run again to resume from {checkpoint}")
            return None
    return log


def train_encoder(model: AnomalyGAN, x: torch.Tensor, iters: int, batch: int, seed: int, device,
                  log_every: int = 200, lr: float = 1e-3, local_weight: float = LOCAL_WEIGHT) -> list[dict]:
    """Train the encoder with G and D frozen (module docstring, step 2); returns the log."""
    g = torch.Generator().manual_seed(seed + 1)
    model.generator.eval()
    model.critic.eval()
    model.encoder.train()
    opt = torch.optim.Adam(model.encoder.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    log, acc, t0 = [], [], time.perf_counter()
    npix = x[0].numel()
    with frozen(model.generator, model.critic):
        for it in range(1, iters + 1):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            xb = dihedral([x[idx]], g)[0].to(device)
            z = model.encoder(xb)
            rec = model.generator(z)
            fxm, fgm = model.critic.conv(xb), model.critic.conv(rec)
            pix = (xb - rec).abs().flatten(1).sum(1)
            feat = (fxm - fgm).abs().flatten(1).sum(1)
            loss = ((1 - LAMBDA) * pix / npix + LAMBDA * feat / model.critic.n_features).mean()
            if local_weight:  # the local score's pixel term too (each band's model at each pixel, reach 0): the
                # worst cells are bright sources' residuals
                loss = loss + local_weight * local_terms(xb, rec, fxm, fgm, torch.ones_like(xb), reach=0)[0].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            acc.append(loss.item())
            if it % log_every == 0 or it == iters:
                log.append(dict(iter=it, loss=float(np.mean(acc)), seconds=round(time.perf_counter() - t0, 1)))
                acc = []
                say(f"encoder step {it}/{iters}: loss {log[-1]['loss']:.4f} ({log[-1]['seconds']:.0f} s)")
    model.encoder.eval()
    return log


def train(stamps: np.ndarray, iters: int = 3000, enc_iters: int = 3000, batch: int = 64,
          seed: int = 0, device: str = "cpu", threads: int = 1, command: str = "", data: dict | None = None,
          arch: dict | None = None, checkpoint: Path | None = None, stop_after: int | None = None
          ) -> tuple[dict, dict] | None:
    """Train on scaled `stamps` (N, B, S, S) of normal sources; returns the training record and the weights
    (state dict). data: how the stamps were made (recorded; its `bands`, comma-separated, name the B bands,
    default g r i)."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    x_va, x_tr = _split(stamps, seed)
    n_val = len(x_va)
    bands = str((data or {}).get("bands") or "g,r,i").split(",")
    if len(bands) != stamps.shape[1]:
        raise ValueError(f"{stamps.shape[1]} bands in the stamps, but they are said to be {','.join(bands)}")
    arch = dict(dict(bands=bands, size=int(stamps.shape[-1])), **(arch or {}))
    model = AnomalyGAN(**arch).to(device)
    say(f"training the WGAN-GP on {len(x_tr)} stamps ({n_val} kept for validation) for {iters} generator steps ...")
    t0 = time.perf_counter()
    gan_log = train_gan(model, x_tr, iters, batch, seed, device, checkpoint=checkpoint, stop_after=stop_after)
    if gan_log is None:
        return None
    t_gan = time.perf_counter() - t0
    say(f"training the encoder for {enc_iters} steps ...")
    enc_log = train_encoder(model, x_tr, enc_iters, batch, seed, device)
    if stalled(enc_log):
        say(f"warning: the encoder's loss did not fall ({enc_log[0]['loss']:.4f} at step {enc_log[0]['iter']}, "
            f"{enc_log[-1]['loss']:.4f} at the end): train a new one for these weights with --encoder-from "
            "<these weights> --encoder-seed N (models/cards/anomaly_wgan.md)")
    t_enc = time.perf_counter() - t0 - t_gan
    record = dict(model=MODEL, arch=arch, seed=seed, n_stamps=int(len(stamps)), n_val=int(n_val), iters=iters,
                  enc_iters=enc_iters, batch=batch, n_critic=N_CRITIC, gp_weight=GP_WEIGHT, lam=LAMBDA,
                  gan_log=gan_log, encoder_log=enc_log, command=command, data=data or {},
                  gan_seconds=round(t_gan, 1), encoder_seconds=round(t_enc, 1), torch=torch.__version__,
                  device=device, threads=threads)
    return _validated(model, x_va, record, device), model.state_dict()


def _split(stamps: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, training) stamps: 5 % (at least one) kept back, drawn by `seed`."""
    order = np.random.default_rng(seed).permutation(len(stamps))
    n_val = max(1, len(stamps) // 20)
    return torch.as_tensor(stamps[order[:n_val]]), torch.as_tensor(stamps[order[n_val:]])


def stalled(enc_log: list[dict], fall: float = 0.9) -> bool:
    """Whether an encoder's training log shows no learning: its last loss above `fall` times its first logged
    one (a stalled start: 0.187 -> 0.188 for the g, r, z weights of 2026-12-01; encoders that learned end at
    0.55-0.65 times their first logged loss)."""
    return len(enc_log) >= 2 and enc_log[-1]["loss"] > fall * enc_log[0]["loss"]


def _validated(model: AnomalyGAN, x_va: torch.Tensor, record: dict, device) -> dict:
    """`record` with the validation stamps' scores in both modes and the local score's normalisation."""
    model.eval()
    val = {mode: anomaly_scores(model, x_va.numpy(), steps=steps, device=device)["score"]
           for mode, steps in (("fast", 0), ("full", 20))}
    norm = score_norm(model, x_va.numpy(), device=device)
    say(f"local score's normalisation on the validation stamps: {norm}")
    return dict(record, score_norm=norm,
                val_score=dict({m: dict(mean=float(v.mean()), std=float(v.std())) for m, v in val.items()}))


def retrain_encoder(stamps: np.ndarray, weights: dict, enc_iters: int = 3000, batch: int = 64, seed: int = 0,
                    encoder_seed: int = 1, device: str = "cpu", threads: int = 1, command: str = "",
                    data: dict | None = None, source: str = "", log_every: int = 200) -> tuple[dict, dict]:
    """A new encoder for trained weights (the contents of a weights file: their generator and critic kept):
    initialised afresh from torch seed `encoder_seed`, then trained as by `train` (step 2) on the same stamps
    and split (`seed`). An encoder can stall from its first steps (the g, r, z weights of 2026-12-01: loss 0.187
    at step 200 and at step 3,000, against 0.21 -> 0.12 for g, r, i, z), the fast mode then reconstructing
    every window alike; another start escapes it (models/cards/anomaly_wgan.md). Returns the record (the
    weights' own, with this encoder's log, seed, `encoder_from` = `source` and the command) and the state."""
    torch.set_num_threads(threads)
    arch = dict(weights["arch"])
    bands = list(arch.get("bands") or ["g", "r", "i"])
    have = str((data or {}).get("bands") or "g,r,i").split(",")
    if have != bands or stamps.shape[1] != len(bands) or stamps.shape[-1] != int(arch.get("size", 32)):
        raise ValueError(f"stamps of bands {','.join(have)} and size {stamps.shape[-1]} do not fit the weights "
                         f"{source} (bands {','.join(bands)}, size {arch.get('size', 32)})")
    model = AnomalyGAN(**arch).to(device)
    model.load_state_dict(weights["state_dict"])
    torch.manual_seed(encoder_seed)
    model.encoder.load_state_dict(AnomalyGAN(**arch).encoder.state_dict())  # a fresh start
    x_va, x_tr = _split(stamps, seed)  # the split of `train`
    say(f"training a new encoder (seed {encoder_seed}) for the generator and critic of {source} for {enc_iters} "
        f"steps on {len(x_tr)} stamps ...")
    t0 = time.perf_counter()
    enc_log = train_encoder(model, x_tr, enc_iters, batch, seed, device, log_every=log_every)
    keep = {k: v for k, v in weights.items() if k not in ("state_dict", "score_norm", "val_score")}
    record = dict(keep, enc_iters=enc_iters, encoder_log=enc_log, encoder_seed=encoder_seed, encoder_from=source,
                  encoder_from_command=weights.get("command", ""), command=command,
                  encoder_seconds=round(time.perf_counter() - t0, 1), torch=torch.__version__, device=device,
                  threads=threads)
    return _validated(model, x_va, record, device), model.state_dict()
