"""Inference-time rewrites shared by the networks the stages run: batch normalisations folded into the
convolutions before them, channels-last tensors, and transposed convolutions as convolutions and pixel shuffles
(the same outputs to float rounding, less CPU time); and on a GPU, mixed precision (`autocast_modules`: the
forward of the modules a stage calls under torch.autocast, outputs back in float32, so that the code after
them sees the tensors it sees on a CPU; the registry's GPU settings say which and in what dtype), and on a CPU
that computes bfloat16 natively the same autocast to bfloat16 (`cpu_precision`, the stages' `precision`). And
the inputs' asinh scaling in float32 (`asinh32`)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["fold_batch_norms", "for_inference", "transposed_as_shuffle", "autocast_modules", "plain_modules",
           "cpu_has_bf16", "cpu_precision", "asinh32", "scaled_asinh"]


def _simd_arcsinh() -> bool:
    """Whether numpy's float32 arcsinh has its SIMD loop on this CPU (the AVX512_SKX dispatch, SVML's); numpy
    does not say which loop a ufunc runs, so this reads the CPU features its dispatch chose among (a private
    attribute: False where it is missing)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        return False
    return bool(features.get("AVX512_SKX"))


SIMD_ARCSINH = _simd_arcsinh()


def asinh32(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """asinh of a float32 array (into `out` when given, which may be `x`): np.arcsinh where its SIMD loop runs
    (SIMD_ARCSINH: 1.1 against 4.6 ms for a tile's 4 x 640^2 detector input, one thread, Intel Xeon with
    AVX-512), else as sign(x) log(|x| + sqrt(x^2 + 1)): numpy's float32 log and sqrt have SIMD loops on any
    x86-64 CPU and its arcsinh has none without AVX-512 (a fifth to a quarter of np.arcsinh's time there, 6-9
    against 31-33 ms, AMD EPYC), within a few float32 steps of it (2e-7 relative; 1.5e-7 absolute near 0).
    Above 1e18, where x^2 would overflow, as log(2 |x|), the same to float32; infinities and NaN come out as
    np.arcsinh gives them."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"asinh32 takes float32, not {x.dtype}")
    if SIMD_ARCSINH:
        return np.arcsinh(x, out=out)
    a = np.abs(x)
    t = np.minimum(a, np.float32(1e18))  # NaN stays NaN
    np.square(t, out=t)
    t += 1
    np.sqrt(t, out=t)
    t += a
    np.log(t, out=t)
    big = a > 1e18  # NaN compares False
    if big.any():
        t[big] = np.log(a[big]) + np.float32(np.log(2.0))
    return np.copysign(t, x, out=t if out is None else out)


def scaled_asinh(stamps, scale, device=None) -> np.ndarray | torch.Tensor:
    """asinh(stamps / scale) in float32 for stamps (N, B, S, S) and `scale` (N, B) or (B,) (each stamp's or
    each band's): a numpy array by `asinh32` on the CPU (`device` None or a CPU), else a tensor computed on
    `device` from the raw pixels copied there (one CPU thread's asinh held an H200 to 4,000-7,000 stamps per
    second in the lens and photo-z CNNs)."""
    s = np.asarray(scale, np.float32)[..., None, None]
    if device is None or torch.device(device).type == "cpu":
        u = np.asarray(stamps, np.float32) / s
        return asinh32(u, out=u)
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(stamps, np.float32)).to(device)
        return torch.asinh(x / torch.as_tensor(s).to(device))


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """`model` (eval mode) with every BatchNorm2d that follows a Conv2d in an nn.Sequential folded into that
    convolution (the norm becomes an identity). Modifies and returns `model`."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    model = model.eval()
    for mod in model.modules():
        if isinstance(mod, nn.Sequential):
            for k in range(len(mod) - 1):
                if isinstance(mod[k], nn.Conv2d) and isinstance(mod[k + 1], nn.BatchNorm2d):
                    mod[k] = fuse_conv_bn_eval(mod[k], mod[k + 1])
                    mod[k + 1] = nn.Identity()
    return model


def for_inference(model: nn.Module) -> nn.Module:
    """fold_batch_norms, then the parameters in channels-last order (feed it channels-last inputs): on this
    machine's CPU 20 % (detector) to 40 % (deblender) less time for the same outputs."""
    return fold_batch_norms(model).to(memory_format=torch.channels_last)


def _shuffle_conv(ct: nn.ConvTranspose2d, bn: nn.BatchNorm2d | None) -> nn.Sequential:
    """A ConvTranspose2d of kernel 4, stride 2, padding 1 as a 3 x 3 Conv2d to four times the channels and a
    PixelShuffle(2), with the BatchNorm2d after it (eval mode) folded in: the same outputs to float rounding.
    Output pixel 2m + r of the transposed convolution takes input m - 1 and m through kernel taps 3 and 1
    (r = 0), or m and m + 1 through taps 2 and 0 (r = 1): one 3 x 3 convolution per output parity."""
    w = ct.weight.detach()  # (cin, cout, 4, 4)
    cin, cout = w.shape[:2]
    taps = {0: {-1: 3, 0: 1}, 1: {0: 2, 1: 0}}  # parity -> {input offset: kernel index}
    weight = torch.zeros(cout * 4, cin, 3, 3, dtype=w.dtype)
    out = torch.arange(cout) * 4
    for ry in (0, 1):
        for rx in (0, 1):
            for dy, ky in taps[ry].items():
                for dx, kx in taps[rx].items():
                    weight[out + ry * 2 + rx, :, dy + 1, dx + 1] = w[:, :, ky, kx].T
    bias = ct.bias.detach().clone() if ct.bias is not None else torch.zeros(cout, dtype=w.dtype)
    if bn is not None:
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        bias = (bias - bn.running_mean) * scale + bn.bias.detach()
        weight = weight * scale.repeat_interleave(4)[:, None, None, None]
    conv = nn.Conv2d(cin, cout * 4, 3, padding=1)
    conv.weight.data, conv.bias.data = weight, bias.repeat_interleave(4)
    return nn.Sequential(conv, nn.PixelShuffle(2))


def transposed_as_shuffle(model: nn.Module) -> nn.Module:
    """`model` (eval mode) with every ConvTranspose2d(kernel 4, stride 2, padding 1) of an nn.Sequential, and the
    BatchNorm2d after it, replaced by _shuffle_conv: on this CPU the transposed convolutions were the slowest
    layers of the anomaly scorer's generator. Modifies and returns `model`."""
    model = model.eval()
    for mod in model.modules():
        if isinstance(mod, nn.Sequential):
            for k in range(len(mod)):
                ct = mod[k]
                if isinstance(ct, nn.ConvTranspose2d) and ct.kernel_size == (4, 4) and ct.stride == (2, 2) \
                        and ct.padding == (1, 1) and ct.groups == 1 and ct.dilation == (1, 1):
                    bn = mod[k + 1] if k + 1 < len(mod) and isinstance(mod[k + 1], nn.BatchNorm2d) else None
                    mod[k] = _shuffle_conv(ct, bn)
                    if bn is not None:
                        mod[k + 1] = nn.Identity()
    return model


def _float32(out):
    """`out` (a tensor, or a tuple, list or dict of them) with floating tensors in float32."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _float32(v) for k, v in out.items()}
    return out


def _submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def autocast_modules(model: nn.Module, paths=("",), dtype: str = "bfloat16", device_type: str | None = None
                     ) -> nn.Module:
    """`model` with the forward of each of its submodules `paths` ("" the model itself, "critic.conv" a nested
    one) run under torch.autocast of `dtype` ("bfloat16", "float16") on `device_type` (default: the device of
    the model's parameters), floating outputs returned in float32. Rewrites that modify a submodule in place
    (fold_batch_norms, transposed_as_shuffle, `.to(...)`) keep it. Modifies and returns `model`."""
    device_type = device_type or next(model.parameters()).device.type
    cast = getattr(torch, dtype)
    for path in paths:
        mod = _submodule(model, path)
        plain = type(mod).forward.__get__(mod)

        def forward(*args, _plain=plain, **kwargs):
            with torch.autocast(device_type, dtype=cast):
                out = _plain(*args, **kwargs)
            return _float32(out)

        mod.forward = forward  # an instance attribute: nn.Module.__call__ calls it
    return model


def plain_modules(model: nn.Module, paths=("",)) -> nn.Module:
    """Undo autocast_modules on the submodules `paths`: their class's forward, in float32. Returns `model`."""
    for path in paths:
        vars(_submodule(model, path)).pop("forward", None)
    return model


def cpu_precision(model: nn.Module, paths, precision: str, device: str) -> str:
    """A stage's `precision` setting on its device: on a CPU, the submodules `paths` of `model` run under
    torch.autocast to bfloat16 (autocast_modules) with precision "bfloat16", or "auto" where the CPU computes it
    natively (cpu_has_bf16); float32 otherwise, and on a GPU (whose precision is the registry's GPU settings').
    Returns the arithmetic chosen, "bfloat16" or "float32"."""
    if str(device).startswith("cpu") and (precision == "bfloat16" or precision == "auto" and cpu_has_bf16()):
        autocast_modules(model, paths, "bfloat16", "cpu")
        return "bfloat16"
    return "float32"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX instructions), where torch.autocast to
    bfloat16 is faster than float32; elsewhere it is emulated, and slower. torch's own checks (private API, so
    False where this torch lacks them)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False
