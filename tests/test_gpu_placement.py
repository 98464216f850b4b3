"""GPU pinning without GPUs: Ray started with two fake GPUs gives each processing actor its own
CUDA_VISIBLE_DEVICES, distinct from the other's, and a stage inside it would use cuda:0, the first
(and only) device it sees."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_one_actor_per_gpu_each_with_its_own_device():
    probe = Path(__file__).with_name("gpu_placement_probe.py")
    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=300,
                         cwd=probe.parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == 2 and res["opts"] == {"num_gpus": 1, "num_cpus": 1}
    visible = [s["visible"] for s in res["seen"]]
    assert sorted(visible) == ["0", "1"]  # one GPU each, no two actors share one
    assert len({s["pid"] for s in res["seen"]}) == 2
    assert all(s["device"] == "cuda:0" for s in res["seen"])
    # the one device each sees is the GPU Ray assigned to it
    assert all([str(int(g)) for g in s["ray_gpu_ids"]] == [s["visible"]] for s in res["seen"])


def test_cpu_plan_without_gpus():
    from deepfield.tasks.actor_pool import actor_plan
    assert actor_plan({"CPU": 2.0}, use_gpus=True, num_actors=None) == (2, {"num_cpus": 1})
    assert actor_plan({"CPU": 8.0, "GPU": 4.0}, use_gpus=False, num_actors=3) == (3, {"num_cpus": 1})
    assert actor_plan({"CPU": 8.0, "GPU": 4.0}, use_gpus=True, num_actors=3) == (4, {"num_gpus": 1, "num_cpus": 1})


def test_device_choice():
    from deepfield.tasks.tile_runner import device_for, pick_device
    assert device_for("3", cuda_available=True) == "cuda:0"
    assert device_for("", cuda_available=True) == "cpu"
    assert device_for("1", cuda_available=False) == "cpu"
    assert pick_device() == "cpu"  # no GPU on this machine
