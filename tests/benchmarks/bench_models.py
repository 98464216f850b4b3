"""Inference speed of every registry network, per device, in float32 and in mixed precision:
`python tests/benchmarks/bench_models.py [--n N] [--tiles K] [--device cpu,cuda] [--dtypes bfloat16,float16]`.

Each network runs through the function its stage calls (lens `score`, deblend `fractions`, anomaly `grid_scores`
in the fast mode, cluster `predict` on one field's binned planes, detect `heat_and_offsets` on one tile with its
halo), prepared as its stage prepares it (batch norms folded, channels-last, the generator's transposed
convolutions as pixel shuffles; the detector in float32, not the CPU's int8), on synthetic inputs: sky noise
with Gaussian sources of signal-to-noise 3 to 1000, scaled as each stage scales its pixels. Batch sizes: the
stage's default on a CPU, the registry's GPU settings (models/registry.py, `gpu`) on a GPU.

For each network, device and autocast dtype (`--dtypes`, bfloat16 and float16): inputs per second in float32
and under torch.autocast, and the largest difference between the two of the output the stage uses (lens
probability, deblend fractions, anomaly local score in units of its median on normal stamps, cluster and
detection heat maps), beside the tolerance the registry accepts and its GPU setting (the row of the chosen
dtype marked ok or OVER), and on a CUDA device the peak memory it allocated. A CPU's differences are only a
rough proxy for a GPU's (the anomaly score's float16 difference was 0.039 on this project's CPU and 0.089 on an
H200), and its speeds none (its float16 convolutions are emulated and slow; bfloat16 ones use AVX-512 BF16
where the CPU has it). `--batch 256,1024,4096` tries several batch sizes for the stamp networks on a CUDA
device (how the registry's were chosen). One "input" is a
stamp for the stamp networks, one tile (`--tile-size` px with halo) for the detector and one field's binned
planes (`--planes` binned px a side) for the cluster finder. The CPU runs on `--threads` threads (default 1,
as in a one-core actor; 0 leaves torch's setting).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

MODELS = ("lens_resnet", "merger_resnet", "deblend_unet", "anomaly_wgan", "cluster_net", "detect_net", "photoz_cnn")
STAGE_OF = {"lens_resnet": "lens", "merger_resnet": "merger", "deblend_unet": "deblend", "anomaly_wgan": "anomaly",
            "photoz_cnn": "photoz"}


def sky(rng, n: int, c: int, s: int, sources: int) -> np.ndarray:
    """(n, c, s, s) float32 pixels in units of the sky sigma: unit noise and `sources` round Gaussians per image
    (sigma 1-3 px, peak signal-to-noise log-uniform in 3-1000, the same position in every channel)."""
    out = rng.standard_normal((n, c, s, s)).astype(np.float32)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    for k in range(n):
        for _ in range(sources):
            y, x = rng.uniform(0, s, 2)
            w = rng.uniform(1.0, 3.0)
            peak = np.exp(rng.uniform(np.log(3), np.log(1000)))
            g = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * w * w)).astype(np.float32)
            out[k] += (peak * rng.uniform(0.3, 1.0, c)).astype(np.float32)[:, None, None] * g
    return out


def first_conv_channels(model) -> int:
    from torch import nn
    return next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))).in_channels


def case(name: str, device: str, batch: int, n: int, tiles: int, tile_size: int, planes: int, rng):
    """(model as its stage runs it, inputs, call(model) -> the output the stage uses, inputs' description,
    number of inputs)."""
    import torch

    from deepfield.models import inference
    from deepfield.models.registry import create_model
    model = create_model(name, device="cpu", mixed_precision=False)
    if name in ("lens_resnet", "merger_resnet"):  # one network, two trainings
        from deepfield.models.lens_cnn import score
        c = first_conv_channels(model)
        x = sky(rng, n, c, 48, 2)
        sigma = np.ones((n, c), np.float32)
        return model.to(device), lambda m: score(m, x, sigma, batch=batch, device=device), f"{c}x48x48", n
    if name == "deblend_unet":
        from deepfield.models.deblend_unet import fractions, position_map
        model = inference.for_inference(model)
        c = first_conv_channels(model)
        img = np.arcsinh(sky(rng, n, c - 2, 48, 3))
        pos = np.stack([position_map(np.array([[24.0, 24.0]]), 48), position_map(np.array([[20.0, 30.0]]), 48)])
        x = np.concatenate([img, np.broadcast_to(pos, (n, 2, 48, 48))], axis=1).astype(np.float32)
        return model.to(device), lambda m: fractions(m, x, batch=batch, device=device), f"{c}x48x48", n
    if name == "anomaly_wgan":
        from deepfield.models.anomaly_gan import grid_scores, scale_snr
        model.generator = inference.transposed_as_shuffle(model.generator)
        model = model.to(memory_format=torch.channels_last)
        c, s = len(model.bands), int(model.size)
        x = scale_snr(sky(rng, n, c, s, 1))
        noise = np.ones_like(x)
        return (model.to(device), lambda m: grid_scores(m, x, noise, steps=0, batch=batch, device=device)["score"],
                f"{c}x{s}x{s}", n)
    if name == "cluster_net":
        from deepfield.models.cluster_net import predict
        c = first_conv_channels(model)
        p = np.arcsinh(sky(rng, tiles, c, planes, planes // 8) / 3.0)
        p[:, -1] = 1.0  # the coverage plane: all usable
        return (model.to(device), lambda m: np.stack([predict(m, q, device)[0] for q in p]),
                f"{c}x{planes}x{planes}", tiles)
    if name == "detect_net":
        from deepfield.models.detect_net import heat_and_offsets
        model = inference.for_inference(model)
        c = first_conv_channels(model)
        t = np.arcsinh(sky(rng, tiles, c, tile_size, tile_size ** 2 // 2000 + 1))
        t[:, -1] = 0.0  # the unusable-fraction plane: every pixel usable
        return (model.to(device), lambda m: np.stack([heat_and_offsets(m, q, device)[0] for q in t]),
                f"{c}x{tile_size}x{tile_size}", tiles)
    if name == "photoz_cnn":
        from deepfield.models.photoz_cnn import estimates
        nb, s = len(model.bands), model.size
        x = sky(rng, n, nb, s, 1) * model.pix_soft.numpy()[None, :, None, None]  # nJy, noise at pix_soft
        flux = x[:, :, s // 2 - 2:s // 2 + 2, s // 2 - 2:s // 2 + 2].sum(axis=(2, 3)).astype(float)
        err = np.ones_like(flux)
        return (model.to(device), lambda m: estimates(m, x, flux, err, list(m.bands), batch=batch,
                                                      device=device)["z_phot"], f"{nb}x{s}x{s}", n)
    raise KeyError(name)


def timed(call, model, device: str) -> tuple[np.ndarray, float]:
    """(output, seconds) of `call(model)` after one uncounted call (lazy initialisation, kernel selection)."""
    import torch
    call(model)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = call(model)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return np.asarray(out, np.float64), time.perf_counter() - t0


def measure(devices, n: int, tiles: int, tile_size: int, planes: int, dtypes=("bfloat16", "float16"),
            seed: int = 0, batches=None) -> list[dict]:
    """One row per network, device, batch size and autocast dtype of `dtypes` (see the module docstring).
    `batches`: batch sizes to try for the stamp networks on a CUDA device (default: the registry's)."""
    import torch

    from deepfield.models import inference
    from deepfield.models.registry import gpu_settings
    from deepfield.tasks.stages.registry import stage_class
    rows = []
    for device in devices:
        cuda = device.startswith("cuda")
        for name in MODELS:
            gpu = gpu_settings(name)
            if cuda:
                sizes = list(batches) if batches and name in STAGE_OF else [gpu.batch]
            elif name in STAGE_OF:
                sizes = [int(stage_class(STAGE_OF[name]).Config.model_fields["batch"].default)]
            else:
                sizes = [1]
            for batch in sizes:
                model, call, shape, count = case(name, device, batch, n, tiles, tile_size, planes,
                                                 np.random.default_rng(seed))
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                ref, t32 = timed(call, model, device)
                for cast in dtypes:
                    inference.autocast_modules(model, gpu.modules, cast, device.split(":")[0])
                    try:
                        mixed, tmix = timed(call, model, device)
                    finally:
                        inference.plain_modules(model, gpu.modules)
                    rows.append(dict(model=name, device=device, batch=batch, input=shape, n=count, dtype=cast,
                                     float32_per_s=count / t32, mixed_per_s=count / tmix,
                                     max_diff=float(np.max(np.abs(mixed - ref))) if ref.size else 0.0,
                                     tolerance=gpu.tolerance, chosen=gpu.autocast or "float32",
                                     gpu_batch=gpu.batch,
                                     peak_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")))
                del model
                if cuda:
                    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="stamps per stamp network")
    ap.add_argument("--tiles", type=int, default=4, help="tiles (detector) and fields (cluster finder)")
    ap.add_argument("--tile-size", type=int, default=640, help="detector input side, px (a 512 px tile + halo)")
    ap.add_argument("--planes", type=int, default=416, help="cluster finder input side, binned px (a 2048 px "
                    "field binned 8x with its 128\" halo)")
    ap.add_argument("--device", default=None, help="comma-separated devices (default: cpu, and cuda when available)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's setting)")
    ap.add_argument("--dtypes", default="bfloat16,float16", help="comma-separated autocast dtypes to try")
    ap.add_argument("--batch", default=None, help="comma-separated batch sizes to try for the stamp networks on a "
                    "CUDA device (default: the registry's GPU batch)")
    args = ap.parse_args(argv)
    import torch
    devices = args.device.split(",") if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows = measure(devices, args.n, args.tiles, args.tile_size, args.planes, args.dtypes.split(","),
                       batches=[int(b) for b in args.batch.split(",")] if args.batch else None)
    finally:
        torch.set_num_threads(threads)
    print(f"inputs per second, float32 and autocast (torch {torch.__version__}, CPU threads "
          f"{args.threads or threads}{', ' + torch.cuda.get_device_name() if 'cuda' in devices else ''})")
    print(f"  {'model':13s}{'device':>7s}{'batch':>6s}{'input':>12s}{'float32/s':>11s}{'autocast':>10s}"
          f"{'/s':>9s}{'speed-up':>9s}{'max diff':>10s}{'tolerance':>10s}{'peak GB':>8s}  GPU setting")
    for r in rows:
        ok = "" if r["chosen"] != r["dtype"] else ("  <- " + ("ok" if r["max_diff"] <= r["tolerance"] else "OVER"))
        if r["batch"] != r["gpu_batch"] and r["device"].startswith("cuda"):
            ok += f" (registry batch {r['gpu_batch']})"
        print(f"  {r['model']:13s}{r['device']:>7s}{r['batch']:6d}{r['input']:>12s}{r['float32_per_s']:11.1f}"
              f"{r['dtype']:>10s}{r['mixed_per_s']:9.1f}{r['mixed_per_s'] / r['float32_per_s']:9.2f}"
              f"{r['max_diff']:10.4f}{r['tolerance']:10.4f}{r['peak_gb']:8.2f}  {r['chosen']}{ok}")
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    main()
