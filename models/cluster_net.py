"""Cluster finder: a fully convolutional centre-point detector on binned multi-band images.

In the spirit of YOLO-CL (Grishin et al. 2023), which finds clusters as objects in colour images, but with
a centre heat map (CenterNet, Zhou et al. 2019) instead of boxes: a cluster has no sharp edge, and its
centre, redshift and richness are what a catalog needs.

Input: (bands + 1, H, W) planes from tasks.stages.cluster.binned_planes (g, r, i, z binned 8 x 8 to 1.6"
pixels, background-subtracted, in asinh-scaled units of the binned sky noise, plus a coverage plane);
H and W are padded up to a multiple of 32 inside `forward`.
Output at stride 4 (6.4" pixels): a heat-map logit whose peaks are cluster centres, the redshift and
ln(richness). Encoder of strided conv blocks (24-96 channels, down to stride 32, 51"), a feature pyramid
back to stride 4, and two heads. Kept small (about 0.2 M parameters) so that it trains on a CPU.

Training targets (`targets`): a Gaussian of `HEAT_SIGMA` output pixels around each true centre (1 at the
centre's pixel), the penalty-reduced focal loss of CenterNet (alpha 2, beta 4), and L1 losses on z and
ln(richness) at the centre pixels.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


STRIDE = 4
HEAT_SIGMA = 2.0  # output pixels (12.8" at bin 8)
PAD = 32
Z_WEIGHT, RICH_WEIGHT = 10.0, 1.0


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ClusterNet(nn.Module):
    def __init__(self, bands=("g", "r", "i", "z"), bin: int = 8, widths=(24, 32, 48, 64, 96), fpn: int = 32):
        super().__init__()
        self.bands, self.bin = list(bands), int(bin)
        w = list(widths)
        self.stem = nn.Sequential(conv_bn(len(self.bands) + 1, w[0], 2), conv_bn(w[0], w[0]))  # stride 2
        self.down = nn.ModuleList([nn.Sequential(conv_bn(w[k], w[k + 1], 2), conv_bn(w[k + 1], w[k + 1]))
                                   for k in range(4)])  # strides 4, 8, 16, 32
        self.lateral = nn.ModuleList([nn.Conv2d(w[k], fpn, 1) for k in range(1, 5)])
        self.smooth = conv_bn(fpn, fpn)
        self.heat = nn.Sequential(conv_bn(fpn, fpn), nn.Conv2d(fpn, 1, 1))
        self.reg = nn.Sequential(conv_bn(fpn, fpn), nn.Conv2d(fpn, 2, 1))
        nn.init.constant_(self.heat[-1].bias, -2.19)  # CenterNet's prior: sigmoid = 0.1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C, H, W) -> heat-map logits (N, H4, W4), z (N, H4, W4), ln richness (N, H4, W4) with
        H4 = ceil(H / 32) * 8 (the input is zero-padded to a multiple of 32 at the bottom and right)."""
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % PAD, 0, -h % PAD))
        feats = []
        x = self.stem(x)
        for block in self.down:
            x = block(x)
            feats.append(x)
        p = self.lateral[3](feats[3])
        for k in (2, 1, 0):  # top-down pathway to stride 4
            p = self.lateral[k](feats[k]) + F.interpolate(p, scale_factor=2, mode="nearest")
        p = self.smooth(p)
        reg = self.reg(p)
        return self.heat(p)[:, 0], reg[:, 0], reg[:, 1]



def window(planes: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """planes[:, y0:y0+h, x0:x0+w], zero where the window leaves the planes (outside the field)."""
    c, ph, pw = planes.shape
    out = np.zeros((c, h, w), np.float32)
    ys, xs, ye, xe = max(y0, 0), max(x0, 0), min(y0 + h, ph), min(x0 + w, pw)
    if ye > ys and xe > xs:
        out[:, ys - y0:ye - y0, xs - x0:xe - x0] = planes[:, ys:ye, xs:xe]
    return out



def to_output(xb: np.ndarray) -> np.ndarray:
    """Binned-pixel coordinate -> output (stride-4) pixel coordinate."""
    return (np.asarray(xb, float) - (STRIDE - 1) / 2.0) / STRIDE


def from_output(xo: np.ndarray) -> np.ndarray:
    return np.asarray(xo, float) * STRIDE + (STRIDE - 1) / 2.0


def targets(shape: tuple[int, int], centres: np.ndarray, z: np.ndarray, richness: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets on an output grid of `shape` (H4, W4) for clusters at binned-pixel `centres` (K, 2: x, y):
    heat (H4, W4) in 0-1 with 1 at each centre's pixel, and z and ln richness maps (NaN away from the
    centre pixels). Centres off the grid add nothing."""
    h4, w4 = shape
    heat = np.zeros(shape, np.float32)
    zmap = np.full(shape, np.nan, np.float32)
    rmap = np.full(shape, np.nan, np.float32)
    yy, xx = np.mgrid[:h4, :w4]
    for (xb, yb), zk, lk in zip(np.reshape(centres, (-1, 2)), z, richness):
        cx, cy = int(round(float(to_output(xb)))), int(round(float(to_output(yb))))
        if not (0 <= cx < w4 and 0 <= cy < h4):
            continue
        heat = np.maximum(heat, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * HEAT_SIGMA**2)))
        near = (np.abs(xx - cx) <= 1) & (np.abs(yy - cy) <= 1)
        zmap[near], rmap[near] = zk, np.log(lk)
    return heat, zmap, rmap


def focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss (alpha 2, beta 4), per positive pixel."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat >= 1.0 - 1e-6
    pos_loss = -((1 - p) ** 2 * torch.log(p))[pos].sum()
    neg_loss = -((1 - heat) ** 4 * p**2 * torch.log(1 - p))[~pos].sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def loss_terms(model: ClusterNet, x: torch.Tensor, heat: torch.Tensor, zmap: torch.Tensor, rmap: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """Focal, z and ln-richness losses and their weighted total for a batch."""
    logit, z, lnr = model(x)
    logit, z, lnr = (t[..., :heat.shape[-2], :heat.shape[-1]] for t in (logit, z, lnr))
    focal = focal_loss(logit, heat)
    has = torch.isfinite(zmap)
    zl = (z[has] - zmap[has]).abs().mean() if has.any() else logit.sum() * 0
    rl = (lnr[has] - rmap[has]).abs().mean() if has.any() else logit.sum() * 0
    return dict(total=focal + Z_WEIGHT * zl + RICH_WEIGHT * rl, focal=focal, z=zl, richness=rl)


@torch.no_grad()
def predict(model: ClusterNet, planes: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(heat 0-1, z, richness) maps on the output grid of one image's `planes` (C, H, W)."""
    x = torch.as_tensor(np.ascontiguousarray(planes, np.float32))[None].to(device)
    logit, z, lnr = model.eval()(x)
    h4, w4 = -(-planes.shape[-2] // STRIDE), -(-planes.shape[-1] // STRIDE)
    out = [t[0, :h4, :w4].float().cpu().numpy() for t in (torch.sigmoid(logit), z, torch.exp(lnr))]
    return out[0], out[1], out[2]


def peaks(heat: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima (3 x 3) of the heat map above `threshold`, with sub-pixel positions: (K, 2) x, y in
    output pixels (the heat-weighted centroid of the 3 x 3 box) and their heights, highest first."""
    t = torch.as_tensor(heat)[None, None]
    is_max = (F.max_pool2d(t, 3, 1, 1) == t)[0, 0].numpy() & (heat > threshold)
    ys, xs = np.nonzero(is_max)
    order = np.argsort(-heat[ys, xs], kind="stable")
    ys, xs = ys[order], xs[order]
    pos = np.zeros((len(ys), 2))
    for k, (y, x) in enumerate(zip(ys, xs)):
        y0, y1, x0, x1 = max(y - 1, 0), min(y + 2, heat.shape[0]), max(x - 1, 0), min(x + 2, heat.shape[1])
        w = heat[y0:y1, x0:x1]
        gy, gx = np.mgrid[y0:y1, x0:x1]
        pos[k] = (gx * w).sum() / w.sum(), (gy * w).sum() / w.sum()
    return pos, heat[ys, xs]


def detect(model: ClusterNet, planes: np.ndarray, threshold: float, device: str = "cpu") -> dict[str, np.ndarray]:
    """Clusters in one image: x, y (binned pixels of `planes`), score, z and richness, highest score first."""
    heat, zmap, rmap = predict(model, planes, device)
    pos, score = peaks(heat, threshold)
    iy, ix = np.round(pos[:, 1]).astype(int), np.round(pos[:, 0]).astype(int)
    return dict(x=from_output(pos[:, 0]), y=from_output(pos[:, 1]), score=score.astype(float),
                z=zmap[iy, ix].astype(float), richness=rmap[iy, ix].astype(float))
