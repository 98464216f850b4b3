"""Training of the learned deblender (`deepfield train deblend`) on the examples it is given.

Data: tasks.trainsets.blend_stamps (blends of 2-4 galaxies with each member's image alone; `examples` makes
the network inputs and targets). Every member of every blend is a training example: the network gets the
blend and the member's centre (the true centre moved by up to half a pixel, as a detection would be) and the
other members' centres, and learns the fraction of each pixel's light that is the member's:
f = T_m / (sum_k T_k + 0.1 sigma) per band, T the noiseless images.

Loss: the pixel term is the squared fraction error weighted by the blend's S/N per pixel (clipped at 20), and
the flux term is the mean over bands of |sum(f_pred T_total) - sum(T_m)| / sum(T_m), so that the fractions
give the member's flux. With the image head (`output` "image") the network predicts asinh(T_m / sigma): the
pixel term is its squared error over every pixel (asinh is linear near zero, so the faint wings, where most of
an extended galaxy's light lies, count as much as the core), the flux term the same with sigma x sum(sinh).
Adam with a one-cycle schedule, quarter turns and flips of every batch. Same command, same seed, same software:
same weights on a CPU.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from .augment import dihedral
from .checkpoint import load_checkpoint, save_checkpoint
from .deblend_unet import IMAGE_MAX, DeblendUNet
from .progress import say

MODEL = "deblend_unet"



def flux_estimate(pred: torch.Tensor, total: torch.Tensor, floor: torch.Tensor, image: bool) -> torch.Tensor:
    """(N, B) member fluxes the prediction gives: fractions of the noiseless blend total, or the image head's
    template summed (sigma = floor / 20)."""
    if image:
        return torch.sinh(pred.clamp(max=IMAGE_MAX)).sum(dim=(2, 3)) * floor / 20.0
    return (pred * total).sum(dim=(2, 3))


def loss_terms(pred: torch.Tensor, f: torch.Tensor, w: torch.Tensor, total: torch.Tensor, flux: torch.Tensor,
               floor: torch.Tensor, image: bool = False):
    """Pixel and flux loss. floor: (N, B) flux added to the flux-error denominator (20 sky sigma), so that
    members near the noise, whose relative errors mean little, do not dominate. With `image` the prediction is
    the image head's asinh(T_m / sigma), its target the member alone, T_m / sigma = f (T / sigma + 0.1) from the
    fraction target f = T_m / (T + 0.1 sigma)."""
    if image:
        member = f * (total / (floor[:, :, None, None] / 20.0) + 0.1)
        pix = ((pred - torch.asinh(member)) ** 2).mean()
    else:
        pix = (w * (pred - f) ** 2).sum() / w.sum()
    fl = ((flux_estimate(pred, total, floor, image) - flux).abs() / (flux + floor)).mean()
    return pix, fl


@torch.no_grad()
def validate(model: DeblendUNet, va: dict, ri: int, zeropoint: float, device="cpu") -> tuple[float, float, float]:
    """(mean pixel loss, mean flux loss, median noiseless |dF|/F of members brighter than 23.5 in band `ri`) on
    the validation examples `va` (tensors)."""
    model.eval()
    vp, vf, m = 0.0, 0.0, len(va["x"])
    image = getattr(model, "output", "fraction") == "image"
    errs = []
    for k in range(0, m, 256):
        sl = slice(k, k + 256)
        pred = model(va["x"][sl].to(device))
        p, f_ = loss_terms(pred, va["f"][sl].to(device), va["w"][sl].to(device), va["total"][sl].to(device),
                           va["flux"][sl].to(device), va["floor"][sl].to(device), image)
        vp += p.item() * len(va["x"][sl])
        vf += f_.item() * len(va["x"][sl])
        est = flux_estimate(pred.cpu(), va["total"][sl], va["floor"][sl], image)
        bright = va["flux"][sl][:, ri] > 10 ** (-0.4 * (23.5 - zeropoint))  # brighter than 23.5
        errs.append(((est - va["flux"][sl]) / va["flux"][sl]).abs()[bright].flatten())
    return vp / m, vf / m, float(torch.cat(errs).median())


def train(tr: dict, va: dict, ref_index: int, zeropoint: float, epochs: int = 12, batch: int = 64,
          lr: float = 3e-3, seed: int = 0, device: str = "cpu", widths=(8, 16, 32, 64), threads: int = 1,
          record: dict | None = None) -> tuple[dict, dict]:
    """Train the deblender on the examples `tr`, validated on `va` (tasks.trainsets.blend_stamps.examples);
    ref_index: the reference band's channel, zeropoint: AB magnitude of one image unit (the validation's
    median flux error is for members brighter than 23.5 in that band). Returns the training record
    (`record`, the data's description, with the architecture, settings and history added) and the weights."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)  # 1 by default: OpenMP threads spin and crawl when another process shares the cores
    # (no torch.use_deterministic_algorithms: on the CPU its max-pool and transposed-convolution backward
    # fallbacks are 5x slower, and the CPU kernels used here give the same result run to run anyway)
    tr = {k: torch.as_tensor(v) for k, v in tr.items()}
    va = {k: torch.as_tensor(v) for k, v in va.items()}
    n = len(tr["x"])
    arch = dict(in_bands=int(tr["f"].shape[1]), widths=list(widths))
    model = DeblendUNet(**arch).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((n + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    ri = ref_index
    history = []
    t1 = time.perf_counter()
    say(f"training on {n} examples (blend members) for {epochs} epochs ...")
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
        vp, vf, med = validate(model, va, ri, zeropoint, device)
        history.append(dict(epoch=ep + 1, train_pix=tot_pix / n, train_flux=tot_fl / n, val_pix=vp,
                            val_flux=vf, val_median_abs_flux_err_noiseless_i_lt_23p5=med))
        say(f"epoch {ep + 1}/{epochs}: train pixel {tot_pix / n:.4f} flux {tot_fl / n:.4f}  "
             f"val pixel {vp:.4f} flux {vf:.4f} (median |dF|/F {med:.4f})  ({time.perf_counter() - t1:.0f} s)")
    record = dict(record or {}, model=MODEL, arch=arch, seed=seed, n_examples=n, epochs=epochs, batch=batch, lr=lr,
                  history=history, train_seconds=round(time.perf_counter() - t1, 1), torch=torch.__version__,
                  device=device, threads=threads)
    return record, model.state_dict()


def train_stream(make_batch: Callable[[int], dict], va: dict, ref_index: int, zeropoint: float, steps: int = 6000,
                 lr: float = 3e-3, seed: int = 0, device: str = "cpu", widths=(8, 16, 32, 64), threads: int = 1,
                 output: str = "fraction",
                 checkpoint: Path | None = None, checkpoint_every: int = 200, validate_every: int = 500,
                 stop_after: int | None = None, record: dict | None = None) -> tuple[dict, dict] | None:
    """Train the deblender on `steps` batches `make_batch(step)` (dicts as tasks.trainsets.blend_stamps.examples
    gives, of freshly composed blends: no example is seen twice), validated on `va` every `validate_every`
    steps; one-cycle schedule, quarter turns and flips. With `checkpoint`, model, optimiser, schedule and history
    are saved every `checkpoint_every` steps and a run of the same configuration resumes from it; `stop_after`
    stops there (None returned) to go on in a later run. Returns (record, weights)."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    va = {k: torch.as_tensor(v) for k, v in va.items()}
    arch = dict(in_bands=int(va["f"].shape[1]), widths=list(widths))
    if output != "fraction":  # the fraction head's weights files keep their arch as before
        arch["output"] = output
    config = dict(steps=steps, lr=lr, seed=seed, arch=arch)
    model = DeblendUNet(**arch).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    history: list[dict] = []
    start, seconds, seen = 0, 0.0, 0
    ck = load_checkpoint(checkpoint, config, model, opt, sched, device)
    if ck is not None:
        start, history, seconds, seen = ck["step"], ck["history"], ck["seconds"], ck["seen"]

    def save(done: int) -> None:
        save_checkpoint(checkpoint, config, model, opt, sched, step=done, history=history,
                        seconds=time.perf_counter() - t0, seen=seen)

    t0 = time.perf_counter() - seconds
    window = [0.0, 0.0, 0]
    pool = ThreadPoolExecutor(1)  # the next batch is composed while this one trains
    nxt = pool.submit(make_batch, start) if start < steps else None
    for step in range(start, steps):
        b = nxt.result()
        nxt = pool.submit(make_batch, step + 1) if step + 1 < steps else None
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        t = {k: torch.as_tensor(v) for k, v in b.items()}
        model.train()
        x, f, w, total = dihedral([t["x"], t["f"], t["w"], t["total"]], g)
        pix, fl = loss_terms(model(x.to(device)), f.to(device), w.to(device), total.to(device),
                             t["flux"].to(device), t["floor"].to(device), output == "image")
        opt.zero_grad()
        (pix + fl).backward()
        opt.step()
        sched.step()
        seen += len(x)
        window = [window[0] + pix.item(), window[1] + fl.item(), window[2] + 1]
        done = step + 1
        if done % validate_every == 0 or done == steps:
            vp, vf, med = validate(model, va, ref_index, zeropoint, device)
            history.append(dict(step=done, examples=seen, train_pix=window[0] / window[2],
                                train_flux=window[1] / window[2], val_pix=vp, val_flux=vf,
                                val_median_abs_flux_err_noiseless_i_lt_23p5=med))
            say(f"step {done}/{steps} ({seen} examples): train pixel {window[0] / window[2]:.4f} flux "
                f"{window[1] / window[2]:.4f}  val pixel {vp:.4f} flux {vf:.4f} (median |dF|/F {med:.4f})  "
                f"({time.perf_counter() - t0:.0f} s)")
            window = [0.0, 0.0, 0]
        if checkpoint is not None and (done % checkpoint_every == 0 or done == steps):
            save(done)
        if stop_after is not None and stop_after <= done < steps:
            if checkpoint is not None and done % checkpoint_every:
                save(done)
            nxt.cancel()
            pool.shutdown()
            say(f"stopped after step {done}/{steps}; run again to resume from {checkpoint}")
            return None
    pool.shutdown()
    record = dict(record or {}, model=MODEL, arch=arch, seed=seed, steps=steps, examples=seen, lr=lr,
                  history=history, train_seconds=round(time.perf_counter() - t0, 1), torch=torch.__version__,
                  device=device, threads=threads)
    return record, {k: v.detach().cpu() for k, v in model.state_dict().items()}
