"""Simulation throughput: `python tests/benchmarks/bench_simulate.py [--size 2048] [--fields 2]`.

Simulates FIELDS fields of SIZE x SIZE pixels in g, r, i, z with WORKERS processes and prints the
wall time, Mpix/s in all and per core, and, as a baseline measured in the same process, the
throughput of writing the same FITS files filled with plain Gaussian noise (the floor set by
noise generation and I/O). Target (issue 2): two 2048 x 2048 four-band fields in under 5 minutes
on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from deepfield.tasks.sim.config import SimConfig
from deepfield.tasks.sim.survey import simulate_survey


def baseline(n_images: int, size: int, out: Path) -> float:
    """Seconds to make and write n_images x (image, invvar, mask) of Gaussian noise."""
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for k in range(n_images):
        img = rng.normal(0, 1, (size, size)).astype(np.float32)
        fits.PrimaryHDU(img).writeto(out / f"b{k}-image.fits")
        fits.PrimaryHDU(np.ones_like(img)).writeto(out / f"b{k}-invvar.fits")
        fits.PrimaryHDU(np.zeros(img.shape, np.uint16)).writeto(out / f"b{k}-mask.fits")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--fields", type=int, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    bands = ["g", "r", "i", "z"]
    cfg = SimConfig(seed=args.seed, size=args.size, fields=args.fields, bands=bands)
    mpix = args.fields * len(bands) * args.size**2 / 1e6
    work = Path(tempfile.mkdtemp(prefix="deepfield-bench-"))
    try:
        t0 = time.perf_counter()
        simulate_survey(cfg, work / "sim", workers=args.workers)
        t_sim = time.perf_counter() - t0
        (work / "base").mkdir()
        t_base = baseline(args.fields * len(bands), args.size, work / "base")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"simulated {args.fields} field(s) x {len(bands)} bands x {args.size}^2 px = {mpix:.1f} Mpix "
          f"with {args.workers} worker(s)")
    print(f"  wall time            {t_sim:8.1f} s   (target for 2 x 2048^2 x 4 bands on 2 cores: < 300 s)")
    print(f"  throughput           {mpix / t_sim:8.3f} Mpix/s")
    print(f"  per core             {mpix / t_sim / args.workers:8.3f} Mpix/s/core")
    print(f"  baseline noise+FITS  {mpix / t_base:8.3f} Mpix/s on 1 core")
    print(f"  ratio sim/baseline   {(mpix / t_sim / args.workers) / (mpix / t_base):8.4f} (per core)")


if __name__ == "__main__":
    main()
