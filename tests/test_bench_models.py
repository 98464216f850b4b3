"""tests/benchmarks/bench_models.py runs on a CPU (as in CI) and prints a row for every registry network, and the
GPU settings it reads are complete; models.inference's autocast wrapping changes nothing on a CPU unless asked
and is undone by plain_modules. No speed thresholds: figures come from the benchmark itself."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfield.models import inference
from deepfield.models.registry import create_model, gpu_settings, list_models

BENCH = Path(__file__).resolve().parent / "benchmarks" / "bench_models.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_models", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_table_has_every_model_with_finite_positive_throughput(bench, capsys):
    threads = torch.get_num_threads()
    rows = bench.main(["--n", "4", "--tiles", "1", "--tile-size", "32", "--planes", "32", "--device", "cpu"])
    assert torch.get_num_threads() == threads  # the benchmark's one thread is not left behind
    out = capsys.readouterr().out
    assert sorted((r["model"], r["dtype"]) for r in rows) == sorted(
        (m, d) for m in list_models(networks_only=True) for d in ("bfloat16", "float16"))
    assert sorted(bench.MODELS) == list_models(networks_only=True)
    table = [x.split() for x in out.splitlines()]
    for r in rows:
        assert r["device"] == "cpu"
        for key in ("float32_per_s", "mixed_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, r
        assert math.isfinite(r["max_diff"]) and r["max_diff"] >= 0, r
        line = next(x for x in table if x[:2] == [r["model"], "cpu"] and x[5] == r["dtype"])
        assert float(line[4]) == pytest.approx(r["float32_per_s"], rel=0.05, abs=0.05)
        assert float(line[6]) == pytest.approx(r["mixed_per_s"], rel=0.05, abs=0.05)


def test_gpu_settings_name_a_dtype_and_existing_modules():
    for name in list_models():
        gpu = gpu_settings(name)
        assert gpu.batch >= 1
        assert gpu.autocast in (None, "bfloat16", "float16")
        model = create_model(name)
        for path in gpu.modules:
            assert isinstance(model.get_submodule(path) if path else model, torch.nn.Module)


def test_autocast_only_where_asked_and_undone():
    model = create_model("lens_resnet")
    x = torch.asinh(torch.as_tensor(np.random.default_rng(1).normal(0, 5, (3, 4, 48, 48)).astype(np.float32)))
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(create_model("lens_resnet", device="cpu")(x), ref)  # CPU: no autocast by default
        inference.autocast_modules(model, ("",), "bfloat16", "cpu")
        mixed = model(x)
        assert mixed.dtype == torch.float32 and not torch.equal(mixed, ref)  # bfloat16 inside, float32 out
        assert (torch.sigmoid(mixed) - torch.sigmoid(ref)).abs().max() < 0.05
        inference.plain_modules(model, ("",))
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("simd", [False, True])
def test_asinh32_is_numpys_arcsinh_to_float32_steps(simd, monkeypatch):
    """models.inference.asinh32 (the detector's and the anomaly GAN's input scaling) against np.arcsinh over
    float32's whole range, by its formula and by np.arcsinh's float32 loop (the SIMD one where the CPU has it):
    within 2.5e-7 relative and 2e-7 absolute (near 0), the same signed zeros, infinities and NaN, the formula's
    overflow-safe branch above 1e18 too, in place as well."""
    from deepfield.models import inference
    from deepfield.models.inference import asinh32
    monkeypatch.setattr(inference, "SIMD_ARCSINH", simd)
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(20000) * 3,
                        10.0 ** rng.uniform(-12, 38.5, 20000) * rng.choice([-1, 1], 20000),
                        [0.0, -0.0, 1e18, 1.1e18, 3.4e38, -3.4e38, np.inf, -np.inf, np.nan]]).astype(np.float32)
    want, got = np.arcsinh(x.astype(np.float64)), asinh32(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    fin = np.isfinite(want)
    err = np.abs(got[fin] - want[fin])
    assert (err <= 2.5e-7 * np.abs(want[fin]) + 2e-7).all(), err.max()
    assert np.array_equal(got[~fin], want[~fin].astype(np.float32), equal_nan=True)
    assert np.array_equal(np.signbit(got[np.abs(x) < 1e-30]), np.signbit(x[np.abs(x) < 1e-30]))
    y = x.copy()
    assert asinh32(y, out=y) is y and np.array_equal(y, got, equal_nan=True)
    with pytest.raises(TypeError, match="float32"):
        asinh32(x.astype(np.float64))
