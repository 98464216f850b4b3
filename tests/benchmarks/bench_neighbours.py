"""Benchmark: the neighbours of every field within the cluster stage's reach, as a run's start finds them
(tasks/provenance.py: input_keys, when a stage reads other fields' pixels), for a survey of many fields (issue 22).

All fields at once (tasks/zarr_sky.py: neighbours_within, one astropy search_around_sky) against the
field-by-field test that input_keys used before (fields_near), the latter timed on a sample of fields and
scaled to all. No store: the fields' footprints alone.

    python tests/benchmarks/bench_neighbours.py --fields 360000    # a Rubin-sized survey in fields of 64 tiles
"""
from __future__ import annotations

import argparse
import time


def measure(n_fields: int, sample: int = 200) -> dict:
    """The neighbours of every field within the cluster stage's reach (provenance.input_keys, when a stage reads
    other fields' pixels): all fields at once (zarr_sky.neighbours_within), against the field-by-field test
    (fields_near, which input_keys used before) timed on `sample` fields and scaled to all. Fields of 4096 px at
    0.2" (579" from centre to corner) on a grid 0.22 deg apart in RA and at most 0.2 deg in declination, from
    -60 to +60 deg (overlapping neighbours)."""
    import numpy as np

    from deepfield.tasks.zarr_sky import fields_near, neighbours_within
    side = int(np.ceil(np.sqrt(n_fields)))
    dec_step = min(0.2, 120.0 / side)
    fp = {f"f{k:07d}": (float((k % side) * 0.22 % 360), float(-60 + (k // side) * dec_step), 579.3)
          for k in range(n_fields)}
    t0 = time.perf_counter()
    near = neighbours_within(fp, 128.0)
    t_all = time.perf_counter() - t0
    names = list(fp)[:: max(1, n_fields // sample)][:sample]
    t0 = time.perf_counter()
    for name in names:
        fields_near(fp, name, 128.0)
    t_one = (time.perf_counter() - t0) / len(names)
    return dict(fields=n_fields, all_s=t_all, pairwise_s=t_one * n_fields,
                mean_neighbours=float(np.mean([len(v) for v in near.values()])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=360_000, help="fields (3.6e5: a Rubin-sized survey)")
    ap.add_argument("--sample", type=int, default=200, help="fields timed with the field-by-field test")
    args = ap.parse_args()
    nb = measure(args.fields, args.sample)
    print(f"Neighbours within the cluster stage's reach (128\"), {nb['fields']:,} fields "
          f"({nb['mean_neighbours']:.1f} each): provenance.input_keys at a run's start")
    print(f"  every field at once (neighbours_within)     {nb['all_s']:8.1f} s")
    print(f"  field by field (fields_near, before)        {nb['pairwise_s']:8.1f} s   (scaled from {args.sample} fields)")


if __name__ == "__main__":
    main()
