"""The benchmarks' simulated survey: the `--sim` directory given, or two 2048^2 g, r, i, z fields (seed 0)
simulated into the benchmark's work directory."""
from __future__ import annotations

from pathlib import Path


def bench_survey(sim: Path | None, work: Path) -> Path:
    """`sim` when given, else a fresh `deepfield simulate` output of two 2048^2 fields under `work`."""
    if sim is not None:
        return sim
    from deepfield.tasks.sim.config import SimConfig
    from deepfield.tasks.sim.survey import simulate_survey
    sim = work / "sim"
    print("simulating 2 fields of 2048^2 px in g,r,i,z ...", flush=True)
    simulate_survey(SimConfig(seed=0, size=2048, fields=2), sim)
    return sim
