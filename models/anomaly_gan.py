"""GAN anomaly scorer after Storey-Fisher et al. 2021 (MNRAS 508, 2946): a Wasserstein GAN with gradient
penalty (WGAN-GP, Gulrajani et al. 2017) learns what normal galaxy stamps look like; a stamp that the
generator cannot reproduce is anomalous.

- Generator G: z (64, standard normal) -> linear -> 64 x 4 x 4 -> three transposed convolutions (stride 2,
  kernel 4, batch norm and ReLU but the last) -> 3 x 32 x 32, tanh: a deconvolutional (DCGAN) generator.
- Critic D: three strided convolutions (kernel 4, stride 2, leaky ReLU 0.2, no batch norm, which the
  gradient penalty forbids) 3 x 32 x 32 -> 64 x 4 x 4 = the features f(x), then a linear layer to the
  Wasserstein score.
- Stamps are 32 x 32 px (6.4" at 0.2"/px; the paper's HSC stamps were 96 x 96 at 0.17"): the simulated
  ring galaxies (radius <= 3") and lenses (Einstein radius <= 3") fit, and a 48 px stamp made each WGAN-GP
  step 2.3 times dearer on the 2-core CPU this was trained on.
- Encoder E: the critic's layout with its own weights, ending in a linear layer to z: it starts the
  latent search (and alone makes the fast mode).

Input scaling (`scale_stamps`), an asinh stretch (Lupton et al. 1999) in units of each band's sky noise:
with s = I / sigma the background-subtracted pixels over the band's sky sigma,
    x = asinh(s / Q) / asinh(P / Q), clipped to [-1, 1],
softening Q = 3 (linear up to about 3 sigma) and P = 1000 (x = 1 at 1000 sigma): one sky sigma is 0.05, a
galaxy's core at S/N 100 is 0.64. Bands g, r, i, in that order, as in the paper. A black point (Lupton et
al. 2004's `minimum`) at 2 sigma, to keep the sky noise out of the score's sum over all 3072 pixels, was
tried and retrained: the AUROC on the evaluation fields fell from 0.60 to 0.50, as cosmic rays and faint
satellite trails went under it, so none is used.

Anomaly score of a stamp x (`anomaly_scores`), as in the paper with lambda = 0.3:
    L = (1 - lambda) sum|x - G(z)| + lambda sum|f(x) - f(G(z))|
summed over pixels and bands, and over the critic's features; z starts at E(x) and is refined by `steps`
Adam steps on L (the full mode); with steps = 0, z = E(x) (the fast mode). The two terms are returned
too (`pixel`, `feature`).

The local score (`grid_scores`, issue 18; what the anomaly stage ranks by) keeps that structure and changes what
is aggregated, because a sum over all 3,072 values is dominated by the sky noise and a cosmic ray adds a few
pixels: L = (1 - lambda) L_res + lambda L_feat, with
- L_res the larger of (a) the mean of the TOP_K (1) worst POOL x POOL (1 x 1) px cells of |x - G(z)| in units of
  each pixel's noise (from the inverse variance), inflated by sqrt(1 + m / 30 + (0.05 m)^2) where the model m is
  bright (photon noise, model error; m the model's largest over bands within 5 x 5 px), the largest over bands; (b) the worst quarter of the stamp's signed
  residual over the pixels the model calls sky, sum / sqrt(n) (an extended feature: a trail);
- L_feat the worst spatial cell (8 x 8 px) of |f(x) - f(G(z))| summed over the critic's channels;
each term divided by its median on normal training windows (`score_norm`, saved with the weights). On two held-out
2048^2 fields (deepfield eval anomaly) it gave AUROC 0.82 where the paper's sum gave 0.69, and put 52 % of the
injected anomalies in the top 1 % of windows against 6 % (models/cards/anomaly_wgan.md).
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from .anomaly_lines import line_terms
from .inference import asinh32


Z_DIM = 64
LAMBDA = 0.3  # weight of the feature residual in the score (Storey-Fisher et al. 2021)
SOFTENING = 3.0  # Q, in sky sigma
FULL_SCALE = 1000.0  # P, in sky sigma: scaled value 1


def scale_snr(snr: np.ndarray) -> np.ndarray:
    """Pixels in units of their sky sigma -> float32 network input in [-1, 1] (module docstring). asinh by
    models.inference.asinh32, in place on float32: a third of np.arcsinh's time on this CPU (the anomaly stage
    scales every pixel of a tile), within 3e-7 of it (a sky sigma is 0.05 here)."""
    u = np.array(snr, np.float32)  # a copy, modified in place below
    if u.ndim == 0:
        return scale_snr(u[None])[0]
    u /= np.float32(SOFTENING)
    np.clip(u, -1e6, 1e6, out=u)
    r = asinh32(u, out=u)
    r /= np.float32(np.arcsinh(FULL_SCALE / SOFTENING))
    return np.clip(r, -1.0, 1.0, out=r)


def scale_stamps(stamps: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """(N, B, S, S) background-subtracted stamps and (N, B) sky sigmas -> float32 network input in [0, 1]."""
    s = np.maximum(np.asarray(sigma, np.float32), 1e-12)[:, :, None, None]
    return scale_snr(np.asarray(stamps, np.float32) / s)


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1), nn.LeakyReLU(0.2))


class Critic(nn.Module):
    """Strided-convolution critic; `features(x)` is the last convolutional layer's output, flattened."""

    def __init__(self, bands: int = 3, widths=(16, 32, 64), size: int = 32, out: int = 1):
        super().__init__()
        chans = [bands, *widths]
        self.conv = nn.Sequential(*[_down(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.n_features = widths[-1] * (size // 2 ** len(widths)) ** 2
        self.head = nn.Linear(self.n_features, out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Generator(nn.Module):
    def __init__(self, bands: int = 3, widths=(64, 32, 16), size: int = 32, z_dim: int = Z_DIM):
        super().__init__()
        self.start = size // 2 ** len(widths)
        self.w0 = widths[0]
        self.fc = nn.Sequential(nn.Linear(z_dim, widths[0] * self.start ** 2), nn.BatchNorm1d(widths[0] * self.start ** 2),
                                nn.ReLU())
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], bands, 4, 2, 1), nn.Tanh()]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(z).view(-1, self.w0, self.start, self.start))


class AnomalyGAN(nn.Module):
    """Generator, critic and encoder together (one weights file); `bands` names the input channels."""

    def __init__(self, bands=("g", "r", "i"), size: int = 32, z_dim: int = Z_DIM, g_widths=(64, 32, 16),
                 d_widths=(16, 32, 64)):
        super().__init__()
        self.bands, self.size, self.z_dim = list(bands), int(size), int(z_dim)
        self.generator = Generator(len(bands), tuple(g_widths), size, z_dim)
        self.critic = Critic(len(bands), tuple(d_widths), size)
        self.encoder = Critic(len(bands), tuple(d_widths), size, out=z_dim)



def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Gulrajani et al.'s penalty E[(||grad_x D(x_hat)||_2 - 1)^2] at x_hat = eps real + (1 - eps) fake,
    eps ~ U(0, 1) per example (or given, shape (N, 1, 1, 1)). Multiply by lambda_GP = 10 in the loss."""
    if eps is None:
        eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    out = critic(x_hat)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


@contextmanager
def frozen(*modules: nn.Module):
    """Within the block, the parameters of `modules` take no gradient (they are restored after), so that a
    backward pass reaches only what is being fitted: z when scoring, G or E when training."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def residuals(model: AnomalyGAN, x: torch.Tensor, z: torch.Tensor, fx: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example pixel residual sum|x - G(z)| and feature residual sum|f(x) - f(G(z))|."""
    g = model.generator(z)
    fx = model.critic.features(x) if fx is None else fx
    return (x - g).abs().flatten(1).sum(1), (fx - model.critic.features(g)).abs().sum(1)


def refine_latent(model: AnomalyGAN, x: torch.Tensor, z: torch.Tensor, fx: torch.Tensor, steps: int, lr: float,
                  lam: float) -> torch.Tensor:
    """z after `steps` Adam steps (lr) on the paper's L = (1 - lam) pixel + lam feature residual of stamps x
    (fx: their critic features), the full mode's refinement; z itself for steps = 0. Call it with the model's
    parameters frozen (gradients flow to z only)."""
    if steps <= 0:
        return z
    z = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        pix, feat = residuals(model, x, z, fx)
        loss = ((1 - lam) * pix + lam * feat).sum()  # examples are independent: one sum, own gradients
        opt.zero_grad()
        loss.backward()
        opt.step()
    return z.detach()


def anomaly_scores(model: AnomalyGAN, x: np.ndarray, steps: int = 20, lr: float = 0.05, lam: float = LAMBDA,
                   batch: int = 256, device: str | torch.device | None = None) -> dict[str, np.ndarray]:
    """Scores of scaled stamps x (N, 3, S, S): dict(score, pixel, feature), each (N,) float32.
    steps: Adam steps refining z from E(x) (0: the fast, encoder-only mode)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with frozen(model):  # gradients flow to z only
            return _scores(model, x, steps, lr, lam, batch, device)
    finally:
        model.train(was_training)


def _scores(model: AnomalyGAN, x: np.ndarray, steps: int, lr: float, lam: float, batch: int, device
            ) -> dict[str, np.ndarray]:
    out = {k: [] for k in ("score", "pixel", "feature")}
    for k in range(0, len(x), batch):
        xb = torch.as_tensor(x[k:k + batch]).to(device)
        with torch.no_grad():
            z0 = model.encoder(xb)
            fx = model.critic.features(xb)
        z0 = refine_latent(model, xb, z0, fx, steps, lr, lam)
        with torch.no_grad():
            pix, feat = residuals(model, xb, z0, fx)
        out["pixel"].append(pix.cpu().numpy())
        out["feature"].append(feat.cpu().numpy())
        out["score"].append(((1 - lam) * pix + lam * feat).cpu().numpy())
    empty = np.zeros(0, np.float32)
    return {k: (np.concatenate(v).astype(np.float32) if v else empty) for k, v in out.items()}


# The local score (issue 18): the paper's two terms, each reduced to the worst region of the stamp.
POOL = 1  # residuals are averaged over POOL x POOL px cells before the worst cell is taken
TOP_K = 1  # cells averaged into the local pixel term
#   (the worst single pixel: a cosmic ray or a hot pixel is often one pixel, which 2 x 2 cells dilute four
#   times; on the held-out fields of `deepfield eval anomaly`, the fast mode's local score went from AUROC
#   0.803 and 36 % of the injected anomalies in the top 1 % (2 x 2 cells, the two worst) to 0.815 and 52 %,
#   cosmic rays 0.936 -> 0.986, hot pixels 0.976 -> 0.995; 1 x 1 with the 2 or 4 worst: 47 %, 40 %)
MODEL_SCALE = 30.0  # sky sigmas: a pixel's residual noise grows as sqrt(1 + m / MODEL_SCALE + (MODEL_FRAC m)^2)
MODEL_FRAC = 0.05  # with the generator's model m (in sky sigmas): the source's photon noise and the model's error
MODEL_REACH = 5  # px: a pixel's model brightness is the model's largest within this square and over bands (a
#   source the generator draws a pixel or two off, or fainter in one band, forgives its own residuals, not a
#   cosmic ray's; on the held-out fields it took the local pixel term's top-1 % figure from 0.31 to 0.36)
SKY_LEVEL = 3.0  # sky sigmas: pixels the model puts below this in every band are sky for the diffuse term
MIN_SKY = 64  # a quarter of the stamp with fewer sky pixels has no diffuse term


_UNSCALE_K = float(np.arcsinh(FULL_SCALE / SOFTENING))  # unscale's factor (local_terms applies it in place too)


def unscale(x: np.ndarray | torch.Tensor):
    """The inverse of scale_snr: network values -> pixels in units of the stamp's sky sigma (unclipped)."""
    if isinstance(x, torch.Tensor):
        return SOFTENING * torch.sinh(x * _UNSCALE_K)
    return SOFTENING * np.sinh(np.asarray(x) * _UNSCALE_K)


def _square_max(a: torch.Tensor, width: int) -> torch.Tensor:
    """The largest value of `a` (N, C, H, W) within the width x width square about each pixel (odd width; the
    square cut by the edges), as max_pool2d(a, width, 1, width // 2) gives it. Written as the maxima of shifted
    slices, rows then columns: torch's stride-1 max_pool2d takes 4.6 ms for 256 32 x 32 planes on this CPU,
    a quarter of the fast mode's local terms, the shifted maxima a tenth of that."""
    h = width // 2
    ny, nx = a.shape[-2:]
    p = torch.nn.functional.pad(a, (h, h, h, h), value=float("-inf"))
    rows = p[..., 0:ny, :]
    for d in range(1, width):
        rows = torch.maximum(rows, p[..., d:d + ny, :])
    out = rows[..., 0:nx]
    for d in range(1, width):
        out = torch.maximum(out, rows[..., d:d + nx])
    return out


def _band_max(a: torch.Tensor) -> torch.Tensor:
    """The largest value over the bands (dim 1) of `a` (N, B, H, W), as (N, 1, H, W): elementwise maxima of the
    band planes (the values of a.amax(1, keepdim=True))."""
    out = a[:, 0:1]
    for b in range(1, a.shape[1]):
        out = torch.maximum(out, a[:, b:b + 1])
    return out


def local_terms(x: torch.Tensor, g: torch.Tensor, fx: torch.Tensor, fg: torch.Tensor, noise: torch.Tensor,
                reach: int = MODEL_REACH, lines: bool = False) -> tuple[torch.Tensor, ...]:
    """Local pixel and feature terms of stamps x and their reconstructions g (N, B, S, S, network values), with
    fx, fg the critic's last feature maps of both (N, C, h, w):
    - pixel: |x - G(z)| in units of each pixel's noise (`noise`: its sigma in units of the stamp's sky sigma,
      from the inverse variance, 0 for no data; inflated where the model is bright, MODEL_SCALE and
      MODEL_FRAC, the model's brightness taken as its largest over bands and over `reach` x `reach` px around
      each pixel; reach 0: each band's own model at the pixel), averaged over POOL x POOL cells, the largest
      over bands, the mean of the TOP_K worst cells;
    - feature: |f(x) - f(G(z))| summed over the critic's channels at each of its spatial cells (8 x 8 px of
      the stamp), the worst cell;
    - the band index and (y, x) stamp position of the worst pixel cell's centre;
    - diffuse: over each quarter of the stamp, the signed residual of the model's sky pixels summed in units
      of its noise, the worst quarter (below);
    - the model's brightest pixel over bands, in units of the stamp's sky sigma (how bright a source the
      reconstruction holds: the merge compares a window's score with those of windows as bright);
    - with `lines`, also the line term (N, 5) of the residual over the same sky pixels (line_terms)."""
    # Written for speed, the same values to the bit as the plain expressions: one memory layout for every
    # operand (a mix of channels-last and contiguous tensors takes torch's slow strided paths), results
    # computed in place where autograd is off (training needs the gradient: out of place there), and maxima
    # over bands as elementwise maxima of planes rather than reductions over dim 1 (2.3 ms against 0.4 for 256
    # windows of 4 bands on this CPU): 20-25 % of the local terms' time.
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, g, fx, fg, noise))

    def ip(t: torch.Tensor, op: str, *args) -> torch.Tensor:  # t.op_(*args), or t.op(*args) under autograd
        return getattr(t, op)(*args) if grad else getattr(t, op + "_")(*args)

    x, g, noise = x.contiguous(), g.contiguous(), noise.contiguous()
    ug = ip(ip(torch.mul(g, _UNSCALE_K), "sinh"), "mul", SOFTENING)  # unscale(g), in place (2 % of the scoring)
    m = ug.abs()
    brightest = _band_max(m)  # (N, 1, S, S)
    near = m  # reach 0: each band's own model at each pixel (the encoder's training loss)
    if reach:
        near = _square_max(brightest, reach)
    fac = ip(ip(ip(near / MODEL_SCALE, "add", 1), "add", ip(MODEL_FRAC * near, "pow", 2)), "sqrt")
    eff = ip(noise * fac, "clamp_min", 1e-6)
    has = noise > 0
    signed = ip(ip(torch.mul(x, _UNSCALE_K), "sinh"), "mul", SOFTENING)  # unscale(x), in place
    signed = ip(ip(ip(signed, "sub", ug), "div", eff), "masked_fill", ~has, 0.0)  # (unscale(x) - ug) / eff, 0 without noise
    r = signed.abs()
    pooled = torch.nn.functional.avg_pool2d(r, POOL) if POOL > 1 else r  # (N, B, S/P, S/P)
    best = _band_max(pooled)[:, 0]  # (N, S/P, S/P)
    flat = best.flatten(1)
    top, where = flat.topk(min(TOP_K, flat.shape[1]), dim=1)
    w = where[:, 0]
    iy, ix = torch.div(w, best.shape[2], rounding_mode="floor"), w % best.shape[2]
    band0 = pooled[torch.arange(len(w)), :, iy, ix].argmax(1)  # the worst cell's band (the first of equals)
    cy = iy * POOL + (POOL - 1) / 2
    cx = ix * POOL + (POOL - 1) / 2
    cells = (fx - fg).abs().sum(1).flatten(1).max(1).values
    # diffuse: over each quarter of the stamp, the signed residual of the pixels the model calls sky (below
    # SKY_LEVEL sky sigmas in every band), summed in units of its noise: sum / sqrt(n), for n >= MIN_SKY pixels
    q = x.shape[-1] // 2
    sky = (has & (brightest < SKY_LEVEL)).to(signed.dtype)
    total = torch.nn.functional.avg_pool2d(ip(signed, "mul", sky), q) * q * q
    n = torch.nn.functional.avg_pool2d(sky, q) * q * q
    diffuse = torch.where(n >= MIN_SKY, total.abs() / n.clamp_min(1).sqrt(), torch.zeros_like(n)).flatten(1).max(1).values
    out = (top.mean(1), cells, band0, torch.stack([cy, cx], 1), diffuse, ug.flatten(1).amax(1))
    return out + (line_terms(signed, sky),) if lines else out  # line_terms keeps the sky of every band


def grid_scores(model: AnomalyGAN, x: np.ndarray, noise: np.ndarray, steps: int = 0, lr: float = 0.05,
                lam: float = LAMBDA, batch: int = 256, device: str | torch.device | None = None,
                norm: dict | None = None, lines: bool = True) -> dict[str, np.ndarray]:
    """Scores of scaled stamps x (N, B, S, S) with each pixel's noise (N, B, S, S; window_stamps): the paper's
    (`paper`, with its terms `pixel` and `feature`, as anomaly_scores) and the local one, L = (1 - lam)
    local_pixel / n_pixel + lam local_feature / n_feature (`score`; local_terms), each term over its median
    on normal stamps (the model's `score_norm`, measured at training; 1 where the model has none), and
    `band` and `peak` (the worst pixel cell's band index and (y, x) in the stamp), `model_peak` (G(z)'s
    brightest pixel over bands, in sky sigmas), and the line term's `line` (S/N), `line_peak` ((y, x) in the
    stamp), `line_band` and `line_angle` (line_terms; 0 with lines=False). z: E(x), refined by
    `steps` Adam steps on the paper's L (the full mode) or not (steps = 0, the fast mode)."""
    device = device or next(model.parameters()).device
    norm = norm or getattr(model, "training_info", {}).get("score_norm") or {"pixel": 1.0, "feature": 1.0}
    out: dict[str, list] = {k: [] for k in ("score", "paper", "pixel", "feature", "local_pixel", "local_feature",
                                            "diffuse", "band", "peak", "model_peak", "line", "line_peak", "line_band",
                                            "line_angle")}
    was_training = model.training
    model.eval()
    try:
        with frozen(model):
            for k in range(0, len(x), batch):
                xb = torch.as_tensor(x[k:k + batch]).to(device).contiguous(memory_format=torch.channels_last)
                nb = torch.as_tensor(noise[k:k + batch]).to(device)
                with torch.no_grad():
                    z = model.encoder(xb)
                    fxm = model.critic.conv(xb)
                fx = fxm.flatten(1)
                z = refine_latent(model, xb, z, fx, steps, lr, lam)
                with torch.no_grad():
                    g = model.generator(z)
                    fgm = model.critic.conv(g)
                    pix = (xb - g).abs().flatten(1).sum(1)
                    feat = (fx - fgm.flatten(1)).abs().sum(1)
                    terms = local_terms(xb, g, fxm, fgm, nb, lines=lines)
                    lp, lf, band, peak, diffuse, model_peak = terms[:6]
                    line = terms[6] if lines else torch.zeros(len(xb), 5, device=xb.device)
                out["line"].append(line[:, 0])
                out["line_peak"].append(line[:, 1:3])
                out["line_band"].append(line[:, 3].long())
                out["line_angle"].append(line[:, 4])
                out["diffuse"].append(diffuse)
                out["model_peak"].append(model_peak)
                out["paper"].append((1 - lam) * pix + lam * feat)
                out["pixel"].append(pix)
                out["feature"].append(feat)
                out["local_pixel"].append(lp)
                out["local_feature"].append(lf)
                res = torch.maximum(lp / norm["pixel"], diffuse / norm.get("diffuse", 1e9))
                out["score"].append((1 - lam) * res + lam * lf / norm["feature"])
                out["band"].append(band)
                out["peak"].append(peak)
    finally:
        model.train(was_training)
    empty = {"band": np.zeros(0, np.int64), "line_band": np.zeros(0, np.int64), "peak": np.zeros((0, 2), np.float32),
             "line_peak": np.zeros((0, 2), np.float32)}
    return {k: (torch.cat(v).cpu().numpy() if v else empty.get(k, np.zeros(0, np.float32))) for k, v in out.items()}


def score_norm(model: AnomalyGAN, x: np.ndarray, noise: np.ndarray | None = None, device=None) -> dict:
    """Medians of the local pixel and feature terms over normal stamps x (fast mode): the `score_norm` that
    puts both terms of the local score on one scale. noise: each pixel's (default 1: the sky's)."""
    noise = np.ones_like(x) if noise is None else noise
    r = grid_scores(model, x, noise, steps=0, device=device, norm={"pixel": 1.0, "feature": 1.0, "diffuse": 1.0})
    return {"pixel": float(np.median(r["local_pixel"])), "feature": float(np.median(r["local_feature"])),
            "diffuse": float(np.median(r["diffuse"]))}
