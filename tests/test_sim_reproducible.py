"""Same seed, same bytes; another seed, another sky; a killed simulation is finished by a re-run."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepfield.tasks.sim.config import SimConfig
from deepfield.tasks.sim.survey import SimulationError, simulate_survey

SMALL = dict(size=256, fields=3, bands=["g", "i"], overlap=10.0,
             population=dict(lenses_per_field=1, clusters_per_field=0.5))


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    simulate_survey(SimConfig(seed=11, **SMALL), out, workers=2)
    return out


def test_same_seed_gives_identical_files(reference, tmp_path):
    simulate_survey(SimConfig(seed=11, **SMALL), tmp_path, workers=1)
    a, b = digests(reference), digests(tmp_path)
    assert a.keys() == b.keys()
    assert a == b


def test_other_seed_gives_another_field(reference, tmp_path):
    simulate_survey(SimConfig(seed=12, **SMALL), tmp_path, workers=2)
    a, b = digests(reference), digests(tmp_path)
    images = [k for k in a if k.endswith("-image.fits")]
    assert images and all(a[k] != b[k] for k in images)


def test_rerun_is_a_no_op_and_other_config_is_refused(reference):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    simulate_survey(SimConfig(seed=11, **SMALL), reference, workers=2)
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()} == before
    with pytest.raises(SimulationError, match="another configuration"):
        simulate_survey(SimConfig(seed=13, **SMALL), reference, workers=2)


def test_killed_simulation_leaves_complete_fields_and_a_rerun_finishes(reference, tmp_path):
    cfg = tmp_path / "sim.yaml"
    import yaml
    cfg.write_text(yaml.safe_dump(dict(seed=11, **SMALL)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "deepfield.flows.cli", "simulate", "--out", str(out), "--config", str(cfg), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "fields" / "field000").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "fields" / "field000").exists(), "simulation did not get as far as one field"
    assert not (out / "manifest.yaml").exists()
    for d in (out / "fields").iterdir():  # what is visible is complete
        if not d.name.startswith("."):
            assert (d / "field.json").exists()
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    a, b = digests(reference), digests(out)
    assert a == b
