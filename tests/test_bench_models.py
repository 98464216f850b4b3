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
