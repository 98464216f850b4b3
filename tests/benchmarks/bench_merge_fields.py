"""What the merge's per-field WCS argument costs as the survey grows: `python tests/benchmarks/bench_merge_fields.py
[--fields 100,1000,5000]`.

The merge (catalogs/merge.py) hands every partition of the tile tables the WCS of every field, to put shapes on
the sky. Dask tokenizes map_partitions' arguments once, and pickles them into each partition's task (also on the
threads-only local cluster). Until 2026-12-06 the argument was a dict of astropy WCS objects, which Dask can only
tokenize by pickling, and which every partition unpickled whole, rebuilding every field's WCS: a cost of fields
times partitions. It is now a `catalogs.merge.FieldWCS`: each field's header text, made into a WCS only where a
partition asks for that field.

For each number of fields (TAN-SIP WCSs, as a survey's are, of 2048^2 fields on a grid) it prints, for the dict of WCS
(before) and for FieldWCS (now): building the argument, Dask's tokenize, and what one partition pays (unpickling
the argument and looking up the WCS of the 4 fields of its 16 tile tables); then the sum over a survey's
partitions (one per 16 tiles of 512^2, 16 tiles per field), against a target of nothing that grows as fields
times partitions.
"""
from __future__ import annotations

import argparse
import pickle
import time

import numpy as np
from astropy.wcs import WCS
from dask.base import tokenize

from deepfield.catalogs.merge import FILES_PER_PARTITION, FieldWCS
from deepfield.tasks.tiling import SkyField

TILES_PER_FIELD = 16  # a 2048^2 field in tiles of 512^2
FIELDS_PER_PARTITION = 4  # the fields whose rows one partition of FILES_PER_PARTITION tile tables holds, at most


def field_wcs(k: int) -> WCS:
    """A TAN-SIP WCS of a 2048^2 field at 0.2"/px, the k-th of a grid of fields 0.12 deg apart."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crpix = [1024.5, 1024.5]
    w.wcs.crval = [150.0 + 0.12 * (k % 100), 2.0 + 0.12 * (k // 100)]
    w.wcs.cd = np.array([[-0.2, 0.0], [0.0, 0.2]]) / 3600.0
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[2, 0], b[0, 2] = 1e-7, -1e-7
    from astropy.wcs import Sip
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


def seconds(f, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", default="100,1000,5000", help="survey sizes (fields), comma-separated")
    args = ap.parse_args()
    print(f"the merge's per-field WCS argument; one partition per {FILES_PER_PARTITION} tile tables, "
          f"{TILES_PER_FIELD} tiles per field, a partition looking up {FIELDS_PER_PARTITION} fields")
    print(f"  {'fields':>7s} {'argument':24s} {'build s':>9s} {'tokenize s':>11s} {'per partition s':>16s} "
          f"{'all partitions s':>17s}")
    for n in [int(v) for v in args.fields.split(",")]:
        fields = [SkyField(f"f{k:06d}", field_wcs(k), 2048, 2048) for k in range(n)]
        partitions = -(-n * TILES_PER_FIELD // FILES_PER_PARTITION)
        names = [f.name for f in fields[:FIELDS_PER_PARTITION]]
        for label, build in (("dict of WCS (before)", lambda: {f.name: f.wcs for f in fields}),
                             ("FieldWCS", lambda: FieldWCS.of(fields))):
            t_build = seconds(build, 1)
            arg = build()
            t_token = seconds(lambda: tokenize(arg), 1)
            blob = pickle.dumps(arg)

            def partition():
                got = pickle.loads(blob)
                for name in names:
                    got[name].pixel_to_world_values(1000.0, 1000.0)
            t_part = seconds(partition, 3 if n <= 1000 else 1)
            print(f"  {n:7d} {label:24s} {t_build:9.3f} {t_token:11.3f} {t_part:16.4f} "
                  f"{t_part * partitions:17.1f}")


if __name__ == "__main__":
    main()
