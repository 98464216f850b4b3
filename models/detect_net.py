"""Learned source detection: a small fully convolutional network predicts, at every pixel of a multi-band
image, the probability that a source's centre lies there, and the sub-pixel offset of that centre (a
CenterNet-style centre heat map, Zhou et al. 2019, as the cluster finder uses on binned images; here at the
image's own pixels, so that two galaxies a few pixels apart give two peaks).

Input channels (`detector_input`): per band, asinh of the pixel's signal-to-noise, image x sqrt(invvar), with
unusable pixels (masked, zero weight) set to 0; and one channel with the fraction of bands unusable at the
pixel. A band the survey lacks (or that training drops at random) is a channel of zeros, so one network
serves band sets that are subsets of the one it was trained on.

Network (`DetectNet`): an encoder at strides 1, 2 and 4 and a decoder back to stride 1 with skip connections;
3 output channels: the centre heat-map logit and the (dx, dy) offset of the centre from the pixel's centre.
Widths (16, 32, 48): 0.1 M parameters, about 1 core-second per megapixel of tile core on this CPU in float32;
`quantized_for_inference` makes an int8 copy (post-training quantisation, activation ranges from
`int8_calibration` saved with the weights) that takes a quarter of that; `int8_cached` keeps that copy traced
(TorchScript) in the user's cache, so that an actor loads it in about 0.05 s instead of building it again (about
2 s, mostly the imports of PyTorch's FX tracing: torch._dynamo, sympy).

`find_peaks`: local maxima of the heat map (3 x 3) above a threshold, at pixel + offset.
`focal_loss`: the penalty-reduced pixel-wise focal loss of CenterNet (alpha 2, beta 4) plus an L1 loss on the
offsets at the centre pixels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .inference import asinh32

__all__ = ["DetectNet", "detector_input", "find_peaks", "heat_and_offsets", "focal_loss",
           "heat_targets", "int8_calibration", "quantized_for_inference", "int8_cached"]


def detector_input(image: np.ndarray, invvar: np.ndarray, unusable: np.ndarray) -> np.ndarray:
    """(B + 1, H, W) float32 network input from image, inverse variance and a boolean unusable mask, (B, H, W)
    each (see the module docstring)."""
    b = image.shape[0]
    ok = invvar > 0  # in place from here on: a third of the time of the same arithmetic in temporaries
    ok &= ~unusable
    ok &= np.isfinite(image)
    out = np.empty((b + 1,) + image.shape[1:], np.float32)
    x = out[:b]
    np.sqrt(invvar, out=x, where=ok)
    np.multiply(x, image, out=x, where=ok)
    x[~ok] = 0.0
    asinh32(x, out=x)
    np.subtract(1.0, ok.mean(axis=0, dtype=np.float32), out=out[b])
    return out


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class DetectNet(nn.Module):
    """Centre heat map and offsets (see the module docstring). Input (N, B + 1, H, W), H and W multiples of 4;
    output (N, 3, H, W): heat-map logit, dx, dy. `bands`: the band of each input channel, in order."""

    def __init__(self, bands=("g", "r", "i", "z"), widths: tuple[int, int, int] = (16, 32, 48)):
        super().__init__()
        w0, w1, w2 = widths
        self.bands = list(bands)
        self.e0 = _conv(len(self.bands) + 1, w0)
        self.e1 = nn.Sequential(_conv(w0, w1, 2), _conv(w1, w1))
        self.e2 = nn.Sequential(_conv(w1, w2, 2), _conv(w2, w2), _conv(w2, w2))
        self.d1 = _conv(w2 + w1, w1)
        self.d0 = _conv(w1 + w0, w0)
        self.head = nn.Conv2d(w0, 3, 1)
        with torch.no_grad():  # start from a low centre probability everywhere (CenterNet's prior, p = 0.01)
            self.head.bias.copy_(torch.tensor([-4.6, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e0(x)
        b = self.e1(a)
        c = self.e2(b)
        b = self.d1(torch.cat([F.interpolate(c, scale_factor=2, mode="nearest"), b], 1))
        a = self.d0(torch.cat([F.interpolate(b, scale_factor=2, mode="nearest"), a], 1))
        return self.head(a)


def _int8_prepared(model: DetectNet, example: torch.Tensor):
    """`model` (float, eval mode; not modified) prepared for post-training int8 quantisation: PyTorch's FX graph
    mode with the x86 back end's default configuration (per-channel weights; histogram observers on the
    activations, which choose ranges that minimise the quantisation error), convolution + ReLU fused."""
    import copy

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx
    float_model = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    return prepare_fx(float_model, get_default_qconfig_mapping("x86"), (example,))


@torch.no_grad()
def int8_calibration(model: DetectNet, inputs: np.ndarray, batch: int = 16) -> dict[str, torch.Tensor]:
    """The activation statistics of `model` over `inputs` ((n, C, H, W) detector inputs, e.g. composed
    validation scenes): the observer state that `quantized_for_inference` turns into an int8 network. Saved
    with the weights, so that every run quantises the same way whatever tiles it sees first."""
    x = torch.as_tensor(np.asarray(inputs, np.float32))
    prepared = _int8_prepared(model, x[:1])
    for k in range(0, len(x), batch):
        prepared(x[k:k + batch])
    own = set(model.state_dict())
    return {k: v.clone() for k, v in prepared.state_dict().items() if k not in own}


def quantized_for_inference(model: DetectNet, calibration: dict[str, torch.Tensor]) -> nn.Module:
    """An int8 copy of `model` (CPU only: x86 back end, fbgemm/oneDNN kernels) with the activation ranges of
    `calibration` (int8_calibration's). About 4x less CPU time than the float network on this machine's AVX-512
    cores; heat maps within a few hundredths of the float network's (tests/test_learned_detection_stage.py).
    It keeps `bands` and `training_info`."""
    from torch.ao.quantization.quantize_fx import convert_fx
    nb = len(model.bands) + 1
    prepared = _int8_prepared(model, torch.zeros(1, nb, 16, 16))
    missing = [k for k in prepared.state_dict() if k not in model.state_dict() and k not in calibration]
    if missing:
        raise ValueError(f"int8 calibration lacks {len(missing)} observer entries (e.g. {missing[0]}); it was "
                         "made for another architecture")
    prepared.load_state_dict({**model.state_dict(), **calibration}, strict=False)
    q = convert_fx(prepared)
    q.bands = list(model.bands)
    q.training_info = getattr(model, "training_info", {})
    q.quantized = True
    return q


INT8_CACHE_VERSION = 1  # int8_cached's files: a new number when quantized_for_inference makes another network


class _Traced(nn.Module):
    """A traced (TorchScript) detector with the attributes the detect stage reads from a DetectNet."""

    def __init__(self, traced: torch.jit.ScriptModule, bands: list[str], training_info: dict) -> None:
        super().__init__()
        self.traced = traced
        self.bands = list(bands)
        self.training_info = training_info
        self.quantized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.traced(x)


def _check_input(nb: int) -> torch.Tensor:
    """The fixed input on which a cached int8 detector must reproduce, to the bit, the outputs it was saved
    with: 1 x nb x 40 x 44 (neither side the trace's) from a seeded generator, a fifth of it zeros (as
    masked pixels)."""
    g = torch.Generator().manual_seed(20261202)
    x = torch.randn(1, nb, 40, 44, generator=g) * 2.0
    x[:, :, ::5] = 0.0
    return x


@torch.no_grad()
def int8_cached(model: DetectNet, calibration: dict[str, torch.Tensor], cache_dir: str | Path) -> nn.Module:
    """`quantized_for_inference(model, calibration)`, kept traced in `cache_dir` (one file per weights,
    calibration and torch version) and loaded from there when it is. The file holds the traced network and its
    outputs on a fixed input (`_check_input`); a loaded network that does not reproduce them to the bit (a
    damaged file, another CPU's kernels choosing other int8 paths) is made again and the file replaced, so the
    cache can only save time, never change a heat map. Written atomically: actors that start together may both
    make it, and a reader sees a whole file or none. Tracing is valid here because the network has no
    data-dependent branch; every spatial size traces to the same graph (the check input's size is not the
    trace's)."""
    import hashlib
    import io
    import os
    import tempfile
    import warnings

    # torch's one-time notice that its quantised-tensor functions are deprecated: raised from the TorchScript
    # interpreter it goes to the process's stderr (every actor's log), past Python's warning filters; raised
    # once from Python first, as the FX network does, it is an ordinary warning, ignored here, and not again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)
    # the key: this code's version (bump INT8_CACHE_VERSION when quantized_for_inference changes), torch's, the
    # CPU's vector capability (nodes of a cluster sharing a home directory keep one file each), the quantized
    # engine (its kernels round differently), bands, tensors
    h = hashlib.sha256(f"detect-int8 {INT8_CACHE_VERSION}|torch {torch.__version__}|"
                       f"{torch.backends.cpu.get_cpu_capability()}|engine {torch.backends.quantized.engine}|"
                       f"bands {','.join(model.bands)}".encode())
    for name, t in sorted({**model.state_dict(), **calibration}.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    path = Path(cache_dir) / f"detect-int8-{h.hexdigest()[:20]}.pt"
    nb = len(model.bands) + 1
    check = _check_input(nb)
    info = getattr(model, "training_info", {})
    if path.exists():
        try:
            extra = {"expected": b""}
            traced = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            expected = torch.load(io.BytesIO(extra["expected"]), weights_only=True)
            if torch.equal(traced(check), expected):
                return _Traced(traced, model.bands, info)
        except Exception:  # noqa: BLE001 - any unreadable or foreign file: made again below
            pass
    q = quantized_for_inference(model, calibration)
    traced = torch.jit.trace(q, torch.zeros(1, nb, 32, 32), check_trace=False)
    out = q(check)
    if not torch.equal(traced(check), out):  # never expected; then the cache is not used
        return q
    buf = io.BytesIO()
    torch.save(out, buf)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            torch.jit.save(traced, tmp, _extra_files={"expected": buf.getvalue()})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:  # a read-only or full cache: run without it
        pass
    return _Traced(traced, model.bands, info)


@torch.no_grad()
def heat_and_offsets(model: nn.Module, inputs: np.ndarray, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Heat map (H, W) in [0, 1] and offsets (2, H, W) for one input (C, H, W) of any size (padded to a
    multiple of 4 by reflection, cropped back)."""
    device = device or next(iter(model.parameters()), torch.zeros(0)).device
    c, h, w = inputs.shape
    ph, pw = (-h) % 4, (-w) % 4
    x = torch.as_tensor(inputs)[None]
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > 4 else "constant")
    out = model(x.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()[0, :, :h, :w]
    return torch.sigmoid(out[0]).numpy(), out[1:].numpy()


def find_peaks(heat: np.ndarray, offsets: np.ndarray, threshold: float, merge_radius: float = 0.0) -> np.ndarray:
    """(n, 3) array of (x, y, p): local maxima of `heat` over 3 x 3 pixels with p >= threshold, at the pixel
    plus the predicted offset (clipped to +-1.5 px), brightest first. Adjacent pixels of equal heat (a plateau,
    common in the int8 network's coarser output) are one peak: the pixel whose offset is smallest. With
    `merge_radius` > 0, a peak whose centre (pixel plus offset) lies within that many pixels of a higher
    peak's centre is the same source seen twice (the offsets of both point at one centre) and is dropped."""
    yy, xx = np.nonzero(heat >= threshold)
    p = heat[yy, xx]
    padded = np.pad(heat, 1, constant_values=-np.inf)
    peak = np.ones(len(yy), bool)  # at least each of its 8 neighbours (torch's 3 x 3 max-pool: 4x the time)
    for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        peak &= padded[yy + 1 + dy, xx + 1 + dx] <= p
    yy, xx = yy[peak], xx[peak]
    p = heat[yy, xx]
    dx = np.clip(offsets[0, yy, xx], -1.5, 1.5)
    dy = np.clip(offsets[1, yy, xx], -1.5, 1.5)
    order = np.lexsort((np.hypot(dx, dy), -p))
    keep = np.ones(len(order), bool)
    taken = np.zeros(heat.shape, bool)  # pixels next to a peak already kept
    ny, nx = heat.shape
    for k in order:
        if taken[yy[k], xx[k]]:
            keep[k] = False
            continue
        taken[max(yy[k] - 1, 0):min(yy[k] + 2, ny), max(xx[k] - 1, 0):min(xx[k] + 2, nx)] = True
    order = order[keep[order]]
    out = np.c_[xx + dx, yy + dy, p][order]
    if merge_radius > 0 and len(out) > 1:
        from scipy.spatial import cKDTree
        pairs = cKDTree(out[:, :2]).query_pairs(merge_radius, output_type="ndarray")
        drop = np.zeros(len(out), bool)
        for i, j in pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]:  # i < j: i is the higher peak
            if not drop[i]:
                drop[j] = True
        out = out[~drop]
    return out


OFFSET_NEAR_WEIGHT = 0.25  # offset-loss weight of the pixels next to a centre pixel (heat_targets' reach)


def heat_targets(shape: tuple[int, int], centres: np.ndarray, ignore: np.ndarray, sigma: float = 1.0,
                 reach: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training targets for one image of `shape` (H, W): heat map (H, W) with a Gaussian of `sigma` px at each
    of `centres` ((n, 2) as x, y) and exactly 1 at its nearest pixel; loss weight (H, W) that is 0 within 2 px
    of the `ignore` positions ((k, 2): sources too faint to demand, too bright to forbid) and 1 elsewhere;
    offsets (2, H, W) and their mask (H, W): weight 1 at the centre pixels and, with `reach` > 0, weight
    OFFSET_NEAR_WEIGHT at the pixels within `reach` (Chebyshev) of them, each pointing at its nearest centre (a
    peak displaced by a neighbour's overlapping heat still gives the right centre)."""
    h, w = shape
    heat = np.zeros(shape, np.float32)
    weight = np.ones(shape, np.float32)
    off = np.zeros((2, h, w), np.float32)
    omask = np.zeros(shape, np.float32)
    r = int(np.ceil(3 * sigma))
    for (x, y) in np.asarray(ignore, float).reshape(-1, 2):
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        weight[max(iy - 2, 0):max(iy + 3, 0), max(ix - 2, 0):max(ix + 3, 0)] = 0.0
    for (x, y) in np.asarray(centres, float).reshape(-1, 2):
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        y0, y1, x0, x1 = max(iy - r, 0), min(iy + r + 1, h), max(ix - r, 0), min(ix + r + 1, w)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        g = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2)).astype(np.float32)
        heat[y0:y1, x0:x1] = np.maximum(heat[y0:y1, x0:x1], g)
        weight[y0:y1, x0:x1] = 1.0
        if 0 <= iy < h and 0 <= ix < w:
            heat[iy, ix] = 1.0
    if reach > 0 and len(np.asarray(centres).reshape(-1, 2)):
        c = np.asarray(centres, float).reshape(-1, 2)
        near_d = np.full(shape, np.inf)
        for (x, y) in c:
            ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
            y0, y1, x0, x1 = max(iy - reach, 0), min(iy + reach + 1, h), max(ix - reach, 0), min(ix + reach + 1, w)
            if y1 <= y0 or x1 <= x0:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1]
            d = np.hypot(xx - x, yy - y)
            closer = d < near_d[y0:y1, x0:x1]
            near_d[y0:y1, x0:x1] = np.where(closer, d, near_d[y0:y1, x0:x1])
            off[0, y0:y1, x0:x1] = np.where(closer, x - xx, off[0, y0:y1, x0:x1])
            off[1, y0:y1, x0:x1] = np.where(closer, y - yy, off[1, y0:y1, x0:x1])
            omask[y0:y1, x0:x1] = np.where(closer, OFFSET_NEAR_WEIGHT, omask[y0:y1, x0:x1])
    for (x, y) in np.asarray(centres, float).reshape(-1, 2):  # the centre pixels, last: weight 1, own centre
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        if 0 <= iy < h and 0 <= ix < w:
            off[:, iy, ix] = (x - ix, y - iy)
            omask[iy, ix] = 1.0
    return heat, weight, off, omask


def focal_loss(out: torch.Tensor, heat: torch.Tensor, weight: torch.Tensor, off: torch.Tensor,
               omask: torch.Tensor, offset_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(heat-map focal loss, offset L1 loss), each per centre pixel of the batch (see the module docstring)."""
    logit = out[:, 0]
    p = torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4)
    pos = (heat >= 1.0).float()
    npos = pos.sum().clamp(min=1.0)
    lpos = -((1 - p) ** 2) * torch.log(p) * pos
    lneg = -((1 - heat) ** 4) * (p ** 2) * torch.log(1 - p) * (1 - pos) * weight
    loff = (torch.abs(out[:, 1:] - off) * omask[:, None]).sum() / npos
    return (lpos.sum() + lneg.sum()) / npos, offset_weight * loff
