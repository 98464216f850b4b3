"""The lens stage's merge step: the ranked lens-candidate table of a run, and their cutouts.

`lens_candidates.parquet` holds the catalog rows with `lens_score` above `threshold` (0.5) that their field
owns, ranked by score (`lens_rank` 1 the highest, ties by source_id), with positions, shape and the AUTO
magnitudes. `lens_cutouts.fits`: the `cutouts` (100) highest ranked, `cutout` x `cutout` px (64) from the
run's store, one HDU per candidate (EXTNAME LENS_<lens_rank>) with WCS: the layout of catalogs/cutouts.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
from pydantic import Field

from deepfield.tasks.atomic import atomic_path

from .cutouts import write_cutouts
from .steps import MergeContext, MergeStep, MergeStepConfig, StepResult

__all__ = ["LensMerge", "LENS_TABLE", "LENS_CUTOUTS", "write_lens_candidates"]

LENS_TABLE = "lens_candidates.parquet"
LENS_CUTOUTS = "lens_cutouts.fits"
LENS_COLUMNS = ("source_id", "field", "tile", "ra", "dec", "x", "y", "a", "b", "pa", "lens_score")


def write_lens_candidates(flat_dir: Path, path: Path, threshold: float) -> pd.DataFrame | None:
    """Write the ranked lens-candidate table and return it; None when the catalog has no lens_score column."""
    ds = pads.dataset(flat_dir, format="parquet")
    if "lens_score" not in ds.schema.names:
        return None
    keep = [c for c in ds.schema.names if c in LENS_COLUMNS or c.startswith("mag_auto_")]
    table = ds.to_table(columns=keep, filter=(pads.field("lens_score") > threshold)
                        & pads.field("is_primary_field")).to_pandas()
    table = table.sort_values(["lens_score", "source_id"], ascending=[False, True]).reset_index(drop=True)
    table.insert(0, "lens_rank", np.arange(1, len(table) + 1))
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return table


class LensMergeConfig(MergeStepConfig):
    threshold: float = Field(0.5, ge=0, le=1, description="lens_score above which a source enters "
                             "lens_candidates.parquet")
    cutouts: int = Field(100, ge=0, description="the highest ranked lens candidates with a cutout in "
                         "lens_cutouts.fits")
    cutout: int = Field(64, ge=8, le=512, description="side of the lens cutouts, pixels")


class LensMerge(MergeStep):
    stage: ClassVar[str] = "lens"
    Config: ClassVar[type[MergeStepConfig]] = LensMergeConfig

    def write(self, ctx: MergeContext, flat_dir: Path, staging: Path) -> StepResult:
        table = write_lens_candidates(flat_dir, staging / LENS_TABLE, self.config.threshold)
        if table is None:
            return StepResult(summary=dict(lens_candidates=None))
        files = dict(lens_candidates=LENS_TABLE)
        if ctx.store_path is not None:
            write_cutouts(ctx.store_path, table.head(self.config.cutouts), staging / LENS_CUTOUTS, "lens",
                          "lens_rank", self.config.cutout, "lens candidates of lens_candidates.parquet: one HDU "
                          "(band, y, x) per row, local median subtracted")
            files["lens_cutouts"] = LENS_CUTOUTS
        return StepResult(summary=dict(lens_candidates=int(len(table))), files=files)

    def report(self, summary: dict, paths: dict[str, str]) -> list[str]:
        if summary.get("lens_candidates") is None:
            return []
        return [f"lenses:  {summary['lens_candidates']} lens candidate(s) above lens_score "
                f"{self.config.threshold}: {paths['lens_candidates']}"
                + (f" (cutouts: {paths['lens_cutouts']})" if "lens_cutouts" in paths else "")]
