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
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


Z_DIM = 64
LAMBDA = 0.3  # weight of the feature residual in the score (Storey-Fisher et al. 2021)
SOFTENING = 3.0  # Q, in sky sigma
FULL_SCALE = 1000.0  # P, in sky sigma: scaled value 1


def scale_snr(snr: np.ndarray) -> np.ndarray:
    """Pixels in units of their sky sigma -> float32 network input in [-1, 1] (module docstring)."""
    x = np.arcsinh(np.asarray(snr, np.float32) / SOFTENING) / np.arcsinh(FULL_SCALE / SOFTENING)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


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
        if steps > 0:
            z = z0.clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                pix, feat = residuals(model, xb, z, fx)
                loss = ((1 - lam) * pix + lam * feat).sum()  # examples are independent: one sum, own gradients
                opt.zero_grad()
                loss.backward()
                opt.step()
            z0 = z.detach()
        with torch.no_grad():
            pix, feat = residuals(model, xb, z0, fx)
        out["pixel"].append(pix.cpu().numpy())
        out["feature"].append(feat.cpu().numpy())
        out["score"].append(((1 - lam) * pix + lam * feat).cpu().numpy())
    empty = np.zeros(0, np.float32)
    return {k: (np.concatenate(v).astype(np.float32) if v else empty) for k, v in out.items()}
