"""Ingest throughput and compression: `python tests/benchmarks/bench_ingest.py [--sim DIR]`.

Ingests a simulated survey (two 2048 x 2048 g, r, i, z fields unless --sim names an existing
`deepfield simulate` output) into a fresh Zarr store with the same code the ingest flow's tasks run,
one thread per field, and prints:
- ingest throughput in MB/s of FITS pixel data, beside a plain in-process numpy baseline that reads
  the same FITS files with astropy and writes the arrays to raw .npy files; the ratio (target >= 0.7);
- the stored size as a fraction of the raw size, per array and in all (target <= 0.85 for the
  simulated float32 images);
- the candidate codecs measured on one image and one inverse-variance map: fraction and speed, the
  measurement behind the default codec.

With --cold (Linux, as root) the page cache is dropped before each contender, so both read their FITS
files from the disk, as a survey reprocessing does; without it both read page-cached files.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from astropy.io import fits
from numcodecs import Blosc

from deepfield.tasks.ingest import ingest_one
from deepfield.tasks.ingest_config import StoreSpec, load_ingest_config
from deepfield.tasks.sim.config import SimConfig
from deepfield.tasks.sim.survey import simulate_survey

CANDIDATES = [("zstd", 1, "bitshuffle"), ("zstd", 3, "bitshuffle"), ("zstd", 5, "bitshuffle"),
              ("zstd", 9, "bitshuffle"), ("zstd", 3, "shuffle"), ("lz4", 5, "bitshuffle")]
SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def codec_table(image: np.ndarray, invvar: np.ndarray) -> None:
    print("codec candidates (one image / one invvar map):")
    print(f"  {'codec':24s} {'image frac':>10s} {'invvar frac':>11s} {'encode MB/s':>12s} {'decode MB/s':>12s}")
    for cname, level, shuf in CANDIDATES:
        c = Blosc(cname, level, SHUFFLE[shuf])
        t0 = time.perf_counter()
        b = c.encode(image)
        t1 = time.perf_counter()
        c.decode(b)
        t2 = time.perf_counter()
        bi = c.encode(invvar)
        print(f"  blosc-{cname}-{level}-{shuf:11s} {len(b) / image.nbytes:10.3f} {len(bi) / invvar.nbytes:11.3f} "
              f"{image.nbytes / (t1 - t0) / 1e6:12.0f} {image.nbytes / (t2 - t1) / 1e6:12.0f}")


def baseline(files: list[Path], out: Path) -> tuple[float, int]:
    """Seconds and bytes to read every FITS file with astropy and write its array to .npy."""
    t0 = time.perf_counter()
    nbytes = 0
    for k, f in enumerate(files):
        data = fits.getdata(f)
        np.save(out / f"{k}.npy", data)
        nbytes += data.nbytes
    return time.perf_counter() - t0, nbytes


def drop_page_cache() -> None:
    """Empty Linux's page cache (needs root), so the next reads come from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold: cannot drop the page cache ({exc}); run as root or without --cold")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim", type=Path, help="existing `deepfield simulate` output to ingest")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--fields", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each contender (root)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deepfield-bench-ingest-"))
    try:
        sim = args.sim
        if sim is None:
            sim = work / "sim"
            print(f"simulating {args.fields} field(s) of {args.size}^2 px in g,r,i,z ...")
            simulate_survey(SimConfig(seed=0, size=args.size, fields=args.fields), sim)
        cfg = load_ingest_config(sim / "manifest.yaml")
        spec: StoreSpec = cfg.store
        files = [p for f in cfg.fields for b in f.bands.values() for p in (b.image, b.invvar, b.mask)]
        for p in files:  # warm the page cache for both contenders alike (unless --cold)
            p.read_bytes()
        (work / "npy").mkdir()
        if args.cold:
            drop_page_cache()
        t_base, nbytes = baseline(files, work / "npy")
        from deepfield.tasks.fits_input import sha256_file
        if args.cold:
            drop_page_cache()
        t0 = time.perf_counter()
        for p in files:
            sha256_file(p)
        t_sha = time.perf_counter() - t0
        store = work / "bench.zarr"
        if args.cold:
            drop_page_cache()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            results = list(pool.map(lambda f: ingest_one(f, str(store), spec), cfg.fields))
        t_ing = time.perf_counter() - t0
        assert all(r["status"] == "ingested" for r in results), results
        raw = {k: sum(r["raw_by_array"][k] for r in results) for k in ("image", "invvar", "mask")}
        stored = {k: sum(r["stored_bytes"][k] for r in results) for k in raw}
        mb = nbytes / 1e6
        print(f"ingest of {len(cfg.fields)} field(s), {mb:.0f} MB of FITS pixel data, {args.threads} thread(s), "
              f"{'cold (page cache dropped)' if args.cold else 'page-cached'} inputs, "
              f"store layout tile {spec.tile} / chunk {spec.chunk} / blosc-{spec.codec.cname}-{spec.codec.clevel}-"
              f"{spec.codec.shuffle}")
        print(f"  ingest (validate, checksum, compress, write)  {mb / t_ing:8.1f} MB/s  ({t_ing:.2f} s)")
        print(f"  baseline numpy FITS -> .npy, in process       {mb / t_base:8.1f} MB/s  ({t_base:.2f} s)")
        print(f"  ratio ingest / baseline                       {t_base / t_ing:8.2f}   (target >= 0.7)")
        print(f"  for scale: sha256 of the input files alone    {mb / t_sha:8.1f} MB/s  (1 thread; ratio "
              f"{t_base / t_sha:.2f})")
        for k in raw:
            print(f"  stored / raw  {k:7s}                          {stored[k] / raw[k]:8.3f}")
        print(f"  stored / raw  all arrays                      {sum(stored.values()) / sum(raw.values()):8.3f}"
              f"   (target <= 0.85)")
        f0 = cfg.fields[0].bands["i"]
        codec_table(np.ascontiguousarray(fits.getdata(f0.image), dtype=np.float32),
                    np.ascontiguousarray(fits.getdata(f0.invvar), dtype=np.float32))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
