"""The lens or merger stage's candidates cut from simulated fields, labelled by the simulator's truth: training
and validation stamps for the lens finder (`deepfield train lens --fields N`) and the merger finder (`deepfield
train merger --fields N`) as their stages see them, and the held-out field sets of `deepfield eval lens|merger`.

Why: trained on composed stamps alone (tasks.trainsets.lens_stamps), each finder did well on composed stamps and
badly on a field's candidates. The merger finder (merger_config, validation AUROC 0.995) scored 21-31 % of a
simulated field's candidates above 0.5, nearly all of them single galaxies of i 21.5-22.5 among their neighbours,
galaxies under a satellite trail and blends that no composed stamp resembles. The lens finder (validation AUROC
0.9994) scored 42 of the 1,164 candidates of two 2048^2 fields above 0.5 that lay more than 15 px from any lens,
where 10 of the 12 lenses were: 34 ellipticals at z < 0.2, larger than any deflector it was trained on, and 31
members of the fields' two clusters among their red neighbours. The field's own candidates are the negatives a
survey has, in the numbers it has them (42 -> 4, models/cards/lens_resnet.md).

What: `n_fields` fields of `size` px (tasks.sim: the default population and artefacts, with `positives` lenses or
mergers per field so that the positives in context are not too few; for the lens finder two galaxy clusters per
field at z 0.1-0.5 rather than one at z 0.1-1, see FIELD_POPULATION), ingested into a
store as a survey's fields are, then per tile the pipeline's background, detect and measure stages with their
defaults and the target stage's candidate cut: the merger stage's (primary, unsaturated, `mag_auto_<ref>` < 22.5,
a > 1.3 PSF sigma) or the lens stage's (the same and `mag_auto_g - mag_auto_<ref>` > 1.0); ref i, or the reddest
of `bands` without i. Each candidate's stamp (48 px, the stages' `centred_stamps`) in `bands`, with its sky sigma,
is labelled by its distance to the nearest simulated lens (deflector centre) or merger (centre):
- mergers: 1 within 12 px (their nuclei are up to 3" apart, a detection may sit on either), else 0;
- lenses: 1 within 5 px (1": the deflector's own detection), 0 beyond 15 px (3", the largest Einstein radius);
  a candidate in between (a piece of an arc or a counter-image detected on its own, or a neighbour inside the
  arcs) is left out of the set, being neither a lens centred as the stage centres one nor unrelated to one.

Reproducible by seed; the arrays are kept in `cache` (one file per target, seed, field count, size, positives and
bands) so that another training or evaluation run reuses them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..atomic import atomic_path
from ..sim.config import SimConfig
from ..stages._pixels import UNUSABLE, centred_stamps
from ..stages.background import BackgroundStage
from ..stages.detect import DetectStage
from ..stages.lens import LensStage
from ..stages.measure import MeasureStage
from ..stages.merger import MergerStage
from .fields import simulate_fields

__all__ = ["field_stamps", "MATCH_PX", "EXCLUDE_PX", "DEFAULT_POSITIVES"]

# a candidate within MATCH_PX of a simulated lens or merger is that lens or merger; one between MATCH_PX and
# EXCLUDE_PX is left out (module docstring)
MATCH_PX = {"merger": 12.0, "lens": 5.0}
EXCLUDE_PX = {"merger": 12.0, "lens": 15.0}
DEFAULT_POSITIVES = {"merger": 12, "lens": 12}  # lenses or mergers simulated per field
# the fields' population beyond the simulator's defaults. The lens finder's: two clusters per field at z 0.1-0.5.
# Trained on fields with one cluster at z 0.1-1, it still scored 15 members of two clusters at z 0.10 and 0.19
# above 0.5 (of 19 false candidates in two fields, with 11 of 12 lenses): bright, large ellipticals among red
# neighbours, which the fields' clusters at z 0.5-1 barely show
FIELD_POPULATION = {"merger": {}, "lens": {"clusters_per_field": 2.0, "cluster_z": (0.1, 0.5)}}
SIM_BANDS = ["g", "r", "i", "z"]  # the fields are simulated in these; a stamp set takes the bands it needs


def field_stamps(n_fields: int, seed: int, bands: list[str], cache: Path, size: int = 2048,
                 positives: int | None = None, stamp: int = 48, workers: int = 2, target: str = "merger",
                 say: Callable[[str], None] = lambda msg: None) -> dict:
    """The `target` stage's ("lens" or "merger") candidates of `n_fields` simulated fields (module docstring):
    dict(images float32 (n, bands, stamp, stamp), sigma float32 (n, bands), label int8 (n,), meta DataFrame:
    kind ("field_<target>" or "field"), field, x, y, mag (reference band), distance to the nearest simulated lens
    or merger in px)."""
    if target not in MATCH_PX:
        raise ValueError(f"field stamps are made for the lens or merger stage, not {target!r}")
    unknown = [b for b in bands if b not in SIM_BANDS]
    if unknown:
        raise ValueError(f"field stamps are simulated in {', '.join(SIM_BANDS)}; no band {', '.join(unknown)}")
    positives = DEFAULT_POSITIVES[target] if positives is None else positives
    key = hashlib.sha256(json.dumps([target, n_fields, seed, size, positives, stamp, SIM_BANDS,
                                     FIELD_POPULATION[target]]).encode()).hexdigest()[:12]
    path = Path(cache) / f"{target}_fields_{seed}_{n_fields}x{size}_{key}.npz"
    if not path.exists():
        _simulate(target, n_fields, seed, size, positives, stamp, workers, path, say)
    else:
        say(f"field stamps: reusing {path}")
    with np.load(path, allow_pickle=False) as z:
        idx = [SIM_BANDS.index(b) for b in bands]
        ref = "i" if "i" in bands else bands[-1]
        dist = z["dist"]
        keep = z[f"cut_{ref}"] & ((dist <= MATCH_PX[target]) | (dist > EXCLUDE_PX[target]))
        label = (dist[keep] <= MATCH_PX[target]).astype(np.int8)
        meta = pd.DataFrame({"kind": np.where(label == 1, f"field_{target}", "field"),
                             "field": z["field"][keep], "x": z["x"][keep], "y": z["y"][keep],
                             "mag": z[f"mag_{ref}"][keep], "distance": dist[keep]})
        return dict(images=np.ascontiguousarray(z["images"][keep][:, idx]), sigma=z["sigma"][keep][:, idx],
                    label=label, meta=meta)


def _cuts(target: str) -> dict:
    """The target stage's candidate cut for reference band i (g, r, i, z weights) and z (g, r, z weights)."""
    if target == "lens":
        return {b: LensStage(ref_band=b, blue_band="g") for b in ("i", "z")}
    return {b: MergerStage(ref_band=b) for b in ("i", "z")}


def _truth(target: str, truth_dir: Path) -> pd.DataFrame:
    if target == "lens":
        return pd.read_parquet(truth_dir / "lenses.parquet")
    anomalies = pd.read_parquet(truth_dir / "anomalies.parquet")
    return anomalies[anomalies.type == "merger"]


def _simulate(target, n_fields, seed, size, positives, stamp, workers, path: Path, say) -> None:
    from ..zarr_read import read_tile
    from ..zarr_store import all_tiles, open_store
    import tempfile
    import shutil
    population = {"lenses_per_field" if target == "lens" else "mergers_per_field": positives,
                  **FIELD_POPULATION[target]}
    cfg = SimConfig(seed=seed, size=size, fields=n_fields, bands=SIM_BANDS, population=population)
    work = Path(tempfile.mkdtemp(prefix=f"deepfield-{target}-fields-"))
    try:
        say(f"field stamps: simulating {n_fields} {size}x{size} fields (seed {seed}, population {population}) ...")
        root = open_store(simulate_fields(cfg, work, workers, say))
        truth = _truth(target, work / "sim" / "truth")
        stages = [BackgroundStage(), DetectStage(), MeasureStage()]
        cuts = _cuts(target)
        for s in stages:
            s.setup("cpu")
        parts = []
        for tid in all_tiles(root, 64):
            tile = read_tile(root, tid, 64)
            src = pd.DataFrame()
            for s in stages:
                src = s.run(tile, src)
            cut = {b: cuts[b].candidates(tile, src) for b in cuts}  # the stage's cut: i for g, r, i, z; z for g, r, z
            any_cut = cut["i"] | cut["z"]
            if not any_cut.any():
                continue
            c = src[any_cut]
            idx = [tile.bands.index(b) for b in SIM_BANDS]
            good = (tile.mask[idx] & UNUSABLE) == 0
            im, sg = centred_stamps(tile.image[idx], tile.invvar[idx], good, c.x_tile.to_numpy(float),
                                    c.y_tile.to_numpy(float), stamp)
            t = truth[truth.field == tid.field]
            x, y = c.x.to_numpy(float), c.y.to_numpy(float)
            dist = (np.hypot(t.x.to_numpy()[None, :] - x[:, None], t.y.to_numpy()[None, :] - y[:, None]).min(axis=1)
                    if len(t) else np.full(len(c), np.inf))
            parts.append(dict(images=im, sigma=sg, dist=dist, field=np.full(len(c), tid.field), x=x, y=y,
                              cut_i=cut["i"][any_cut], cut_z=cut["z"][any_cut],
                              mag_i=c.mag_auto_i.to_numpy(float), mag_z=c.mag_auto_z.to_numpy(float)))
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out["field"] = out["field"].astype(str)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **out)
        near = int((out["dist"] <= MATCH_PX[target]).sum())
        say(f"field stamps: {len(out['dist'])} candidates, {near} on a {target} -> {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
