"""Ingest throughput and compression: `python tests/benchmarks/bench_ingest.py [--sim DIR] [--cold]`.

Ingests a simulated survey (two 2048 x 2048 g, r, i, z fields unless --sim names an existing
`deepfield simulate` output) into a fresh Zarr store with the same code the ingest flow's tasks run,
one thread per field, and prints:
- ingest throughput in MB/s of FITS pixel data, beside a plain in-process numpy baseline that reads
  the same FITS files with astropy and writes the arrays to raw .npy files, and the ratio beside its
  target (>= 0.7); page-cached inputs, and with --cold (Linux, as root) also with the page cache dropped
  before each contender, so that both read their FITS files from the disk, as a survey reprocessing does;
  each contender runs --repeat times in turn, the best time counts (the machine may be shared);
- for scale, the content hashes a re-ingest may need on the same files, one thread: xxh3_128 (the
  default), BLAKE3 (when the blake3 package is installed) and sha256 (`checksum: sha256`);
- the stored size as a fraction of the raw size, per array and in all (target <= 0.85 for the
  simulated float32 images);
- the candidate codecs measured on one image and one inverse-variance map: fraction and speed, the
  measurement behind the default codec.

With --noise it prints instead what measuring the aperture-scale noise (tasks/fits_noise.py) on one stripe
of blocks in every `step` costs in accuracy: per band of the first field, and for its i band resampled onto a
turned grid as a coadd is (the case the rescale is for), the noise over 4x4-pixel sums relative to the pixel
noise of the inverse variance from every row of blocks, and from each of the `step` stripe offsets.

What the ingest costs as the survey grows (the store's metadata, the flow's memory and its own cost per field) is
bench_ingest_scale.py's.
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


def hash_seconds(files: list[Path], make) -> float:
    """Seconds to hash every file with the hash object `make()` makes, read in 4 MiB blocks, one thread."""
    t0 = time.perf_counter()
    for p in files:
        h, buf = make(), bytearray(1 << 22)
        view = memoryview(buf)
        with open(p, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
        h.hexdigest()
    return time.perf_counter() - t0


def hashes() -> dict:
    import hashlib

    import xxhash
    out = {"xxh3_128 (default)": xxhash.xxh3_128}
    try:
        import blake3
        out["blake3 (1 thread)"] = lambda: blake3.blake3(max_threads=1)
    except ImportError:
        out["blake3 (1 thread)"] = None
    out["sha256 (checksum: sha256)"] = hashlib.sha256
    return out


def run_ingest(cfg, store: Path, spec: StoreSpec, threads: int) -> tuple[float, list[dict]]:
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda f: ingest_one(f, str(store), spec), cfg.fields))
    t = time.perf_counter() - t0
    assert all(r["status"] == "ingested" for r in results), results
    return t, results


def noise_table(cfg, work: Path) -> None:
    """The aperture-scale noise from all rows of blocks and from each row offset (--noise)."""
    import sys

    from deepfield.tasks.fits_noise import (BLOCK, MAX_BLOCKS, RESCALE_RATIO, STRIPE, _block_noise_stripes,
                                           _inverse_sqrt_median)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _resample import resample_band
    f = cfg.fields[0]
    cases = [(b, e.image, e.invvar, e.mask) for b, e in f.bands.items()]
    i = f.bands["i"]
    t0 = time.perf_counter()
    pi, pv, _ = resample_band(i.image, i.invvar, work / "rot", mask=i.mask)
    cases.append(("i resampled (turned 17 deg, bilinear)", pi, pv, work / "rot" / i.mask.name))
    print(f"resampled the i band in {time.perf_counter() - t0:.1f} s")
    print(f"aperture-scale noise / invvar's pixel noise ({BLOCK}x{BLOCK} sums; rescaled outside 1/{RESCALE_RATIO} .. "
          f"{RESCALE_RATIO}), field {f.name}:")
    for name, img, iv, msk in cases:
        image = fits.getdata(img).astype(np.float32)
        invvar = fits.getdata(iv).astype(np.float32)
        usable = (fits.getdata(msk) == 0) & (invvar > 0) & np.isfinite(image)
        image[~np.isfinite(image)] = 0
        n = int(usable.sum())
        expected = _inverse_sqrt_median(invvar[usable][:: max(1, n // 1_000_000)])
        blocks = (image.shape[0] // BLOCK) * (image.shape[1] // BLOCK)
        step = max(1, blocks // MAX_BLOCKS)
        t0 = time.perf_counter()
        full = _block_noise_stripes(image, usable, 1, 0) / expected
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        subs = [_block_noise_stripes(image, usable, step, o) / expected for o in range(step)]
        t_sub = (time.perf_counter() - t0) / step
        print(f"  {name:38s} all {blocks} blocks: {full:.4f} ({t_full * 1e3:.0f} ms); {STRIPE}-row stripes, 1 in "
              f"{step}, each offset: " + " ".join(f"{v:.4f}" for v in subs)
              + f" ({t_sub * 1e3:.0f} ms); largest difference "
              f"{max(abs(v / full - 1) for v in subs):.2%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim", type=Path, help="existing `deepfield simulate` output to ingest")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--fields", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each contender; the best counts")
    ap.add_argument("--cold", action="store_true", help="also with the page cache dropped before each contender "
                                                        "(root)")
    ap.add_argument("--noise", action="store_true", help="only the accuracy of the aperture-scale noise measured on "
                                                         "every step-th row of blocks")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deepfield-bench-ingest-"))
    try:
        sim = args.sim
        if sim is None:
            sim = work / "sim"
            print(f"simulating {args.fields} field(s) of {args.size}^2 px in g,r,i,z ...")
            simulate_survey(SimConfig(seed=0, size=args.size, fields=args.fields), sim)
        cfg = load_ingest_config(sim / "manifest.yaml")
        if args.noise:
            noise_table(cfg, work)
            return
        spec: StoreSpec = cfg.store
        files = [p for f in cfg.fields for b in f.bands.values() for p in (b.image, b.invvar, b.mask)]
        (work / "npy").mkdir()
        store = work / "bench.zarr"
        rows, results = [], None
        for cold in (False, True) if args.cold else (False,):
            t_base = t_ing = float("inf")
            for _ in range(args.repeat):  # in turn, so that both see the same machine
                if cold:
                    drop_page_cache()
                else:
                    for p in files:  # page-cached inputs for both contenders alike
                        p.read_bytes()
                t, nbytes = baseline(files, work / "npy")
                t_base = min(t_base, t)
                if cold:
                    drop_page_cache()
                t, results = run_ingest(cfg, store, spec, args.threads)
                t_ing = min(t_ing, t)
            rows.append(("cold (page cache dropped)" if cold else "page-cached", t_ing, t_base))
        mb = nbytes / 1e6
        check = getattr(spec, "checksum", "sha256")  # sha256 before it was an option
        print(f"ingest of {len(cfg.fields)} field(s), {mb:.0f} MB of FITS pixel data, {args.threads} thread(s), "
              f"best of {args.repeat}, store layout tile {spec.tile} / chunk {spec.chunk} / "
              f"blosc-{spec.codec.cname}-{spec.codec.clevel}-{spec.codec.shuffle}, checksum {check}")
        for what, t_ing, t_base in rows:
            print(f"  {what} inputs:")
            print(f"    ingest (hash, validate, compress, write)      {mb / t_ing:8.1f} MB/s  ({t_ing:.2f} s)")
            print(f"    baseline numpy FITS -> .npy, in process       {mb / t_base:8.1f} MB/s  ({t_base:.2f} s)")
            print(f"    ratio ingest / baseline                       {t_base / t_ing:8.2f}   (target >= 0.7: "
                  f"{'met' if t_base / t_ing >= 0.7 else 'NOT met'})")
        t_base = rows[0][2]
        print("  for scale, content hashes of the input files alone (page-cached, 1 thread):")
        for p in files:
            p.read_bytes()
        for name, make in hashes().items():
            if make is None:
                print(f"    {name:30s}  not installed (pip install blake3)")
                continue
            t = min(hash_seconds(files, make) for _ in range(args.repeat))
            print(f"    {name:30s} {mb / t:8.1f} MB/s  ({t:.3f} s; {t / t_base:.2f} of the baseline's time)")
        raw = {k: sum(r["raw_by_array"][k] for r in results) for k in ("image", "invvar", "mask")}
        stored = {k: sum(r["stored_bytes"][k] for r in results) for k in raw}
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
