"""The merger stage's candidates cut from simulated fields, labelled by the simulator's truth: training and
validation stamps for the merger finder (`deepfield train merger --fields N`) as the stage sees them.

Why: trained on composed stamps alone (tasks.trainsets.lens_stamps.merger_config: mergers against close pairs,
field galaxies and other look-alikes, validation AUROC 0.995), the finder scored 21-31 % of a simulated field's
candidates above 0.5, nearly all of them single galaxies of i 21.5-22.5 among their neighbours, galaxies under a
satellite trail and blends that no composed stamp resembles. The field's own candidates are the negatives a
survey has, in the numbers it has them.

What: `n_fields` fields of `size` px (tasks.sim: the default population and artefacts, with `mergers` mergers per
field so that the positives in context are not too few), ingested into a store as a survey's fields are, then
per tile the pipeline's background, detect and measure stages with their defaults and the merger stage's
candidate cut (primary, unsaturated, `mag_auto_<ref>` < 22.5, a > 1.3 PSF sigma; ref i, or the reddest of
`bands` without i). Each candidate's stamp (48 px, the stage's `centred_stamps`) in `bands`, with its sky sigma,
is labelled 1 when a simulated merger's centre lies within MATCH_PX (12 px: its nuclei are up to 3" apart, a
detection may sit on either) of the candidate, else 0. Reproducible by seed; the arrays are kept in `cache`
(one file per seed, field count, size, mergers and bands) so that another training run reuses them.
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
from ..stages.measure import MeasureStage
from ..stages.merger import MergerStage
from .fields import simulate_fields

__all__ = ["field_stamps", "MATCH_PX"]

MATCH_PX = 12.0  # a candidate within this of a simulated merger's centre is that merger (module docstring)
SIM_BANDS = ["g", "r", "i", "z"]  # the fields are simulated in these; a stamp set takes the bands it needs


def field_stamps(n_fields: int, seed: int, bands: list[str], cache: Path, size: int = 2048, mergers: int = 12,
                 stamp: int = 48, workers: int = 2, say: Callable[[str], None] = lambda msg: None) -> dict:
    """The merger stage's candidates of `n_fields` simulated fields (module docstring): dict(images float32 (n,
    bands, stamp, stamp), sigma float32 (n, bands), label int8 (n,), meta DataFrame: kind ("field_merger" or
    "field"), field, x, y, mag (reference band), distance to the nearest merger in px)."""
    unknown = [b for b in bands if b not in SIM_BANDS]
    if unknown:
        raise ValueError(f"field stamps are simulated in {', '.join(SIM_BANDS)}; no band {', '.join(unknown)}")
    key = hashlib.sha256(json.dumps([n_fields, seed, size, mergers, stamp, SIM_BANDS]).encode()).hexdigest()[:12]
    path = Path(cache) / f"merger_fields_{seed}_{n_fields}x{size}_{key}.npz"
    if not path.exists():
        _simulate(n_fields, seed, size, mergers, stamp, workers, path, say)
    else:
        say(f"field stamps: reusing {path}")
    with np.load(path, allow_pickle=False) as z:
        idx = [SIM_BANDS.index(b) for b in bands]
        ref = "i" if "i" in bands else bands[-1]
        keep = z[f"cut_{ref}"]
        meta = pd.DataFrame({"kind": np.where(z["label"][keep] == 1, "field_merger", "field"),
                             "field": z["field"][keep], "x": z["x"][keep], "y": z["y"][keep],
                             "mag": z[f"mag_{ref}"][keep], "merger_distance": z["dist"][keep]})
        return dict(images=np.ascontiguousarray(z["images"][keep][:, idx]), sigma=z["sigma"][keep][:, idx],
                    label=z["label"][keep].astype(np.int8), meta=meta)


def _simulate(n_fields, seed, size, mergers, stamp, workers, path: Path, say) -> None:
    from ..zarr_read import read_tile
    from ..zarr_store import all_tiles, open_store
    import tempfile
    import shutil
    cfg = SimConfig(seed=seed, size=size, fields=n_fields, bands=SIM_BANDS,
                    population=dict(mergers_per_field=mergers))
    work = Path(tempfile.mkdtemp(prefix="deepfield-merger-fields-"))
    try:
        say(f"field stamps: simulating {n_fields} {size}x{size} fields (seed {seed}, {mergers} mergers each) ...")
        root = open_store(simulate_fields(cfg, work, workers, say))
        truth = pd.read_parquet(work / "sim" / "truth" / "anomalies.parquet")
        truth = truth[truth.type == "merger"]
        stages = [BackgroundStage(), DetectStage(), MeasureStage()]
        cuts = {b: MergerStage(ref_band=b) for b in ("i", "z")}
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
            parts.append(dict(images=im, sigma=sg, label=(dist <= MATCH_PX).astype(np.int8), dist=dist,
                              field=np.full(len(c), tid.field), x=x, y=y,
                              cut_i=cut["i"][any_cut], cut_z=cut["z"][any_cut],
                              mag_i=c.mag_auto_i.to_numpy(float), mag_z=c.mag_auto_z.to_numpy(float)))
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out["field"] = out["field"].astype(str)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **out)
        say(f"field stamps: {len(out['label'])} candidates, {int(out['label'].sum())} on a merger -> {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
