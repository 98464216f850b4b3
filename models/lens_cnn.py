"""Strong-lens classifier: a pre-activation residual CNN over multi-band stamps.

Architecture in the family of CMU DeepLens (Lanusse et al. 2018, MNRAS 473, 3895) and Huang et al.
2020 (ApJ 894, 78): pre-activation ResNet blocks (He et al. 2016: BN-ReLU-conv, BN-ReLU-conv, identity
or 1x1 projection shortcut), widening as the stamp is halved, global average pooling and one logit.
It is narrower and shallower than DeepLens (46 layers) so that it trains on a CPU in minutes:
stem 3x3 conv, stages of widths (16, 32, 64, 128) with (1, 1, 2, 1) blocks at strides (1, 2, 2, 2).

Input: stamps (N, bands, S, S) in image units and the sky noise sigma (N, bands) of each band;
`preprocess` scales every band by its own noise and compresses it with asinh, so that the network sees
S/N-like pixels whatever the zero point and depth: x' = asinh(x / sigma).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .inference import scaled_asinh


def preprocess(images, sigma, device=None) -> torch.Tensor:
    """(N, B, S, S) images and (N, B) noise sigmas -> float32 tensor asinh(image / sigma), computed on `device`
    (default the CPU; models.inference.scaled_asinh)."""
    x = scaled_asinh(images, np.maximum(np.asarray(sigma, np.float32), np.float32(1e-12)), device)
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        short = x if self.short is None else self.short(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + short


class LensResNet(nn.Module):
    """Pre-activation ResNet lens classifier; forward returns one logit per stamp."""

    def __init__(self, in_bands: int = 4, widths=(16, 32, 64, 128), blocks=(1, 1, 2, 1), strides=(1, 2, 2, 2),
                 dropout: float = 0.2):
        super().__init__()
        self.stem = nn.Conv2d(in_bands, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for w, n, s in zip(widths, blocks, strides):
            for k in range(n):
                layers.append(PreActBlock(cin, w, s if k == 0 else 1))
                cin = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(dropout), nn.Linear(cin, 1))

    def forward(self, x):
        return self.head(self.body(self.stem(x))).squeeze(1)



@torch.no_grad()
def score(model: nn.Module, images, sigma, batch: int = 256, device: str | None = None) -> np.ndarray:
    """Lens probability (sigmoid of the logit) of each stamp, in batches on the model's device."""
    device = device or next(model.parameters()).device
    out = []
    for k in range(0, len(images), batch):
        x = preprocess(images[k:k + batch], sigma[k:k + batch], device)
        out.append(torch.sigmoid(model(x)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)
