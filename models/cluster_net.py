"""Cluster finder: a fully convolutional centre-point detector on binned multi-band images, with the centre
heat map split into redshift slices.

In the spirit of YOLO-CL (Grishin et al. 2023), which finds clusters as objects in colour images, but with
a centre heat map (CenterNet, Zhou et al. 2019) instead of boxes: a cluster has no sharp edge, and its
centre, redshift and richness are what a catalog needs. The heat map has one channel per redshift slice
(`Z_EDGES`, 10 slices of 0.11 from z = 0.05 to 1.15): two clusters on one line of sight at different
redshifts are two peaks, in two channels, and `peaks` keeps both (a peak is a maximum over its 3 x 3
pixels and the neighbouring slices).

Input: (bands + 1, H, W) planes from tasks.stages.cluster_planes.binned_planes (each band binned 8 x 8 to 1.6"
pixels, background-subtracted, in asinh-scaled units of the binned sky noise, plus a coverage plane);
H and W are padded up to a multiple of 32 inside `forward`.
Output at stride 4 (6.4" pixels), per redshift slice: a heat-map logit whose peaks are cluster centres,
the redshift (as an offset from the slice's centre, in slice widths) and ln(richness). Encoder of strided
conv blocks (24-96 channels, down to stride 32, 51"), a feature pyramid back to stride 4, and two heads.
Kept small (about 0.3 M parameters) so that it trains on a CPU.

Training targets (`targets`): around each cluster of richness >= `POSITIVE_RICHNESS`, a Gaussian of
`HEAT_SIGMA` output pixels on the sky times a Gaussian of `Z_SIGMA` slices in redshift (scaled to 1 in the
nearest slice, so 1 at the centre's pixel there); clusters of richness `IGNORE_RICHNESS` to `POSITIVE_RICHNESS` are neither
positives nor negatives (no loss within 2 HEAT_SIGMA of them in their slice and its neighbours); poorer
groups are negatives. The penalty-reduced focal loss of CenterNet (alpha 2, beta 4), and L1 losses on z
and ln(richness) at the centre pixels of the nearest two slices.

Richness calibration: `richness_cal` (a, b), fitted on validation skies after training, maps the network's
ln richness to ln lambda = a + b ln richness_net, the count the simulator (and redMaPPer) makes: members
brighter than 0.2 L* within R_lambda.
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
Z_EDGES = tuple(np.round(np.linspace(0.05, 1.15, 11), 3))
Z_SIGMA = 0.6  # slices
POSITIVE_RICHNESS, IGNORE_RICHNESS = 15.0, 8.0


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ClusterNet(nn.Module):
    def __init__(self, bands=("g", "r", "i", "z"), bin: int = 8, widths=(24, 32, 48, 64, 96), fpn: int = 32,
                 z_edges=Z_EDGES, binned_arcsec: float = 1.6):
        super().__init__()
        # binned_arcsec: the binned pixel of the training skies (`bin` pixels of 0.2" for the shipped weights);
        # a field on another grid is binned to about that angle (field_bin)
        self.bands, self.bin, self.binned_arcsec = list(bands), int(bin), float(binned_arcsec)
        self.z_edges = [float(z) for z in z_edges]
        k = len(self.z_edges) - 1
        self.register_buffer("richness_cal", torch.tensor([0.0, 1.0]))
        w = list(widths)
        self.stem = nn.Sequential(conv_bn(len(self.bands) + 1, w[0], 2), conv_bn(w[0], w[0]))  # stride 2
        self.down = nn.ModuleList([nn.Sequential(conv_bn(w[k], w[k + 1], 2), conv_bn(w[k + 1], w[k + 1]))
                                   for k in range(4)])  # strides 4, 8, 16, 32
        self.lateral = nn.ModuleList([nn.Conv2d(w[k], fpn, 1) for k in range(1, 5)])
        self.smooth = conv_bn(fpn, fpn)
        self.heat = nn.Sequential(conv_bn(fpn, fpn), nn.Conv2d(fpn, k, 1))
        self.reg = nn.Sequential(conv_bn(fpn, fpn), nn.Conv2d(fpn, 2 * k, 1))
        nn.init.constant_(self.heat[-1].bias, -2.19)  # CenterNet's prior: sigmoid = 0.1
        with torch.no_grad():
            self.reg[-1].bias[k:].fill_(float(np.log(30.0)))  # ln richness starts at a typical cluster's

    @property
    def z_centres(self) -> np.ndarray:
        e = np.asarray(self.z_edges)
        return (e[1:] + e[:-1]) / 2

    def field_bin(self, pixel_scale: float) -> int:
        """The binning of a field of `pixel_scale` arcsec per pixel whose binned pixel is nearest the training
        skies' (`binned_arcsec`): 8 at the simulator's 0.2" (1.6"), 10 at HSC's 0.168" (1.68"), 6 at the Legacy
        Surveys' 0.262" (1.57"). The network sees a cluster's members at the angular scale it learned; binned
        by 8, a 0.262" field's binned pixels were 2.1" and its richness came out 1.8 times the truth, a 0.396"
        field's 3.2" with the same richness error and 7 of 9 rich clusters found against 9 (README,
        `eval cluster`)."""
        return max(1, int(round(self.binned_arcsec / float(pixel_scale))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C, H, W) -> per redshift slice, heat-map logits (N, K, H4, W4), z (N, K, H4, W4) and ln
        richness (N, K, H4, W4), H4 = ceil(H / 32) * 8 (the input is zero-padded to a multiple of 32 at the
        bottom and right)."""
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
        k = len(self.z_edges) - 1
        e = torch.as_tensor(self.z_edges, dtype=p.dtype, device=p.device)
        centre, width = ((e[1:] + e[:-1]) / 2)[None, :, None, None], (e[1:] - e[:-1])[None, :, None, None]
        return self.heat(p), centre + width * reg[:, :k], reg[:, k:]



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


def targets(shape: tuple[int, int], centres: np.ndarray, z: np.ndarray, richness: np.ndarray,
            z_edges=Z_EDGES) -> tuple[np.ndarray, ...]:
    """Targets on an output grid of `shape` (H4, W4) for clusters at binned-pixel `centres` (K, 2: x, y)
    (module docstring): heat (S, H4, W4) in 0-1 with 1 at each positive's centre pixel in its nearest
    slice, z and ln richness maps (S, H4, W4; NaN away from the centre pixels), and the loss weight
    (S, H4, W4; 0 around the clusters that are neither positive nor negative). Centres off the grid add
    nothing."""
    h4, w4 = shape
    e = np.asarray(z_edges, float)
    zc, width = (e[1:] + e[:-1]) / 2, e[1:] - e[:-1]
    ns = len(zc)
    heat = np.zeros((ns, h4, w4), np.float32)
    zmap = np.full((ns, h4, w4), np.nan, np.float32)
    rmap = np.full((ns, h4, w4), np.nan, np.float32)
    weight = np.ones((ns, h4, w4), np.float32)
    yy, xx = np.mgrid[:h4, :w4]
    for (xb, yb), zk, lk in zip(np.reshape(centres, (-1, 2)), z, richness):
        cx, cy = int(round(float(to_output(xb)))), int(round(float(to_output(yb))))
        if not (-3 * HEAT_SIGMA <= cx < w4 + 3 * HEAT_SIGMA and -3 * HEAT_SIGMA <= cy < h4 + 3 * HEAT_SIGMA):
            continue
        d2 = (xx - cx) ** 2 + (yy - cy) ** 2
        s = (zk - zc) / width  # slices from each slice's centre
        near = np.argsort(np.abs(s), kind="stable")[:2]
        if lk < POSITIVE_RICHNESS:
            if lk >= IGNORE_RICHNESS:
                for k in near:
                    weight[k][d2 <= (2 * HEAT_SIGMA) ** 2] = 0.0
            continue
        g = np.exp(-d2 / (2 * HEAT_SIGMA**2))
        for k in range(ns):
            if abs(s[k]) < 3 * Z_SIGMA:
                heat[k] = np.maximum(heat[k], g * np.exp(-(s[k] ** 2 - s[near[0]] ** 2) / (2 * Z_SIGMA**2)))
        if not (0 <= cx < w4 and 0 <= cy < h4):
            continue
        heat[near[0], cy, cx] = 1.0
        box = (np.abs(xx - cx) <= 1) & (np.abs(yy - cy) <= 1)
        for k in near:
            zmap[k][box], rmap[k][box] = zk, np.log(lk)
    weight[heat > 0] = 1.0
    return heat, zmap, rmap, weight


def focal_loss(logits: torch.Tensor, heat: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss (alpha 2, beta 4), per positive pixel; `weight`
    (0 or 1 per pixel) leaves pixels out."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat >= 1.0 - 1e-6
    w = torch.ones_like(heat) if weight is None else weight
    pos_loss = -((1 - p) ** 2 * torch.log(p))[pos].sum()
    neg_loss = -(w * (1 - heat) ** 4 * p**2 * torch.log(1 - p))[~pos].sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def loss_terms(model: ClusterNet, x: torch.Tensor, heat: torch.Tensor, zmap: torch.Tensor, rmap: torch.Tensor,
               weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Focal, z and ln-richness losses and their weighted total for a batch (targets (N, S, H4, W4))."""
    logit, z, lnr = model(x)
    logit, z, lnr = (t[..., :heat.shape[-2], :heat.shape[-1]] for t in (logit, z, lnr))
    focal = focal_loss(logit, heat, weight)
    has = torch.isfinite(zmap)
    zl = (z[has] - zmap[has]).abs().mean() if has.any() else logit.sum() * 0
    rl = (lnr[has] - rmap[has]).abs().mean() if has.any() else logit.sum() * 0
    return dict(total=focal + Z_WEIGHT * zl + RICH_WEIGHT * rl, focal=focal, z=zl, richness=rl)


@torch.no_grad()
def predict(model: ClusterNet, planes: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(heat 0-1, z, calibrated richness) maps, each (S, H4, W4), on the output grid of one image's `planes`
    (C, H, W)."""
    x = torch.as_tensor(np.ascontiguousarray(planes, np.float32))[None].to(device)
    logit, z, lnr = model.eval()(x)
    a, b = (float(v) for v in model.richness_cal)
    h4, w4 = -(-planes.shape[-2] // STRIDE), -(-planes.shape[-1] // STRIDE)
    out = [t[0, :, :h4, :w4].float().cpu().numpy() for t in (torch.sigmoid(logit), z, torch.exp(a + b * lnr))]
    return out[0], out[1], out[2]


def peaks(heat: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local maxima of the heat map (S, H4, W4) above `threshold`, a maximum over its 3 x 3 pixels in its
    own and the neighbouring slices: (K, 2) x, y in output pixels (the heat-weighted centroid of the 3 x 3
    box in its slice), their slices and heights, highest first."""
    t = torch.as_tensor(heat)[None, None]
    is_max = (F.max_pool3d(t, 3, 1, 1) == t)[0, 0].numpy() & (heat > threshold)
    ks, ys, xs = np.nonzero(is_max)
    order = np.argsort(-heat[ks, ys, xs], kind="stable")
    ks, ys, xs = ks[order], ys[order], xs[order]
    pos = np.zeros((len(ys), 2))
    for j, (k, y, x) in enumerate(zip(ks, ys, xs)):
        y0, y1, x0, x1 = max(y - 1, 0), min(y + 2, heat.shape[1]), max(x - 1, 0), min(x + 2, heat.shape[2])
        w = heat[k, y0:y1, x0:x1]
        gy, gx = np.mgrid[y0:y1, x0:x1]
        pos[j] = (gx * w).sum() / w.sum(), (gy * w).sum() / w.sum()
    return pos, ks, heat[ks, ys, xs]


def detect(model: ClusterNet, planes: np.ndarray, threshold: float, device: str = "cpu") -> dict[str, np.ndarray]:
    """Clusters in one image: x, y (binned pixels of `planes`), score, z and richness, highest score first."""
    heat, zmap, rmap = predict(model, planes, device)
    pos, ks, score = peaks(heat, threshold)
    iy, ix = np.round(pos[:, 1]).astype(int), np.round(pos[:, 0]).astype(int)
    return dict(x=from_output(pos[:, 0]), y=from_output(pos[:, 1]), score=score.astype(float),
                z=zmap[ks, iy, ix].astype(float), richness=rmap[ks, iy, ix].astype(float))
