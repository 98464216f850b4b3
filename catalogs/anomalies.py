"""The anomaly stage's merge step: anomaly scores over a whole run, and the ranked anomaly list with its stamps.

- `anomaly_sigma` = (anomaly_score - mean) / std, the mean and standard deviation taken over every scored
  tile-primary row of the run (`score_stats`), as the sigma-scores of Storey-Fisher et al. 2021: a score's
  meaning depends on the survey's depth and seeing, its rank within the run does not. (Rows of overlapping
  fields that another field owns are still in the statistics: a fraction of a per cent of the rows.)
- `anomalies.parquet`, when the stage scored its dense grid (the tiles' `anomaly_map` tables, the default): the
  anomaly candidates of catalogs/anomaly_candidates.py (regions of grid windows with sigma-score >=
  `sigma_cut`, 5, each listed once), ranked by sigma-score, at most `top` (100), with ra, dec, x, y, extent,
  bands, shape hint, score, the paper's score and the coinciding source's `source_id`. Without the grid: the
  `top` rows with the highest `anomaly_sigma` that their field owns, ranked (`anomaly_rank` 1 the most
  anomalous), with positions, magnitudes, shape and the score components.
- `anomaly_stamps.fits`: their cutouts from the Zarr store, `stamp` x `stamp` px (64), one image HDU
  (band, y, x) with WCS per candidate, EXTNAME ANOMALY_<anomaly_rank>, and a ROWS table of every stamp's
  anomaly_rank and source_id (-1 for a candidate on no source): the layout of catalogs/cutouts.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads
from pydantic import Field

from deepfield.tasks.atomic import atomic_path

from .cutouts import write_cutouts
from .steps import MergeContext, MergeStep, MergeStepConfig, StepResult

__all__ = ["AnomalyMerge", "score_stats", "add_sigma", "write_anomaly_list", "ANOMALY_TABLE", "ANOMALY_STAMPS"]

ANOMALY_TABLE = "anomalies.parquet"
ANOMALY_STAMPS = "anomaly_stamps.fits"
COLUMNS = ("source_id", "field", "tile", "ra", "dec", "x", "y", "a", "b", "pa", "anomaly_score",
           "anomaly_sigma", "anomaly_pixel", "anomaly_feature", "lens_score")


def score_stats(files: list[Path]) -> dict | None:
    """Mean, standard deviation and count of the finite `anomaly_score` of the tile-primary rows of the
    tile tables `files`; None when they carry no anomaly_score (the stage did not run)."""
    ds = pads.dataset([str(f) for f in files], format="parquet")
    if "anomaly_score" not in ds.schema.names:
        return None
    col = ds.to_table(columns=["anomaly_score"], filter=pads.field("is_primary")).column("anomaly_score")
    v = pc.drop_null(col).to_numpy(zero_copy_only=False).astype(np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return dict(mean=float(v.mean()) if v.size else 0.0, std=1.0, n=int(v.size))
    return dict(mean=float(v.mean()), std=float(v.std()) or 1.0, n=int(v.size))


def add_sigma(df: pd.DataFrame, stats: dict | None) -> pd.DataFrame:
    """Add `anomaly_sigma` to a partition (rows without a score get NaN)."""
    if stats is not None and "anomaly_score" in df.columns:
        df["anomaly_sigma"] = ((df["anomaly_score"].astype(np.float64) - stats["mean"]) / stats["std"]).astype(np.float32)
    return df


def write_anomaly_list(flat_dir: Path, store_path: Path | None, table_path: Path, stamps_path: Path,
                       top: int = 100, stamp: int = 64) -> int | None:
    """Write the ranked anomaly table and, when `store_path` is given, its stamps; returns the number of
    rows, or None when the catalog has no anomaly_sigma column."""
    ds = pads.dataset(flat_dir, format="parquet")
    if "anomaly_sigma" not in ds.schema.names:
        return None
    keep = [c for c in ds.schema.names if c in COLUMNS or c.startswith("mag_auto_")]
    table = ds.to_table(columns=keep, filter=pads.field("anomaly_sigma").is_valid()
                        & pads.field("is_primary_field")).to_pandas()
    table = table[np.isfinite(table["anomaly_sigma"])]
    table = table.sort_values(["anomaly_sigma", "source_id"], ascending=[False, True]).head(top).reset_index(drop=True)
    table.insert(0, "anomaly_rank", np.arange(1, len(table) + 1))
    with atomic_path(table_path) as tmp:
        table.to_parquet(tmp, index=False)
    if store_path is not None:
        write_cutouts(Path(store_path), table, stamps_path, "anomaly", "anomaly_rank", stamp,
                      "anomaly stamps of anomalies.parquet: one HDU (band, y, x) per row, local median subtracted")
    return int(len(table))


def write_candidates(maps: list[Path], flat_dir: Path, store_path: Path | None, table_path: Path, stamps_path: Path,
                     sigma_cut: float, top: int, stride: float, stamp: int = 64, sigma_grow: float | None = None,
                     lens_term: bool = True, merger_term: bool = True) -> tuple[int, dict]:
    """Write the ranked anomaly candidates of the grid (catalogs/anomaly_candidates.py) with sigma >= sigma_cut,
    at most `top`, and their stamps; returns their number and the windows' statistics. lens_term (merger_term)
    false: the catalog's lens (merger) scores are not read (no lens or merger term)."""
    from .anomaly_candidates import build_candidates
    windows = pd.concat([pd.read_parquet(f) for f in maps], ignore_index=True)
    ds = pads.dataset(flat_dir, format="parquet")
    cols = [c for c in ("source_id", "field", "ra", "dec", "x", "y", "anomaly_sigma")
            + (("lens_score",) if lens_term else ()) + (("merger_score",) if merger_term else ())
            if c in ds.schema.names]
    sources = ds.to_table(columns=cols, filter=pads.field("is_primary_field")).to_pandas()
    cand, stats = build_candidates(windows, sigma_cut, stride, sources, sigma_grow=sigma_grow)
    stats["candidates"] = int(len(cand))
    cand = cand.head(top)
    with atomic_path(table_path) as tmp:
        cand.to_parquet(tmp, index=False)
    if store_path is not None:
        write_cutouts(Path(store_path), cand, stamps_path, "anomaly", "anomaly_rank", stamp,
                      "anomaly candidate stamps of anomalies.parquet: one HDU (band, y, x) per row, local median "
                      "subtracted")
    return int(len(cand)), stats


class AnomalyMergeConfig(MergeStepConfig):
    top: int = Field(100, ge=1, description="most anomalous candidates (or sources, without the grid) kept in "
                     "anomalies.parquet with their stamps")
    sigma_cut: float = Field(5.0, description="grid windows of at least this sigma-score make anomaly candidates")
    sigma_grow: Optional[float] = Field(None, description="a candidate's region grows through neighbouring windows "
                                        "of at least this sigma-score (default: half of sigma_cut)")
    stamp: int = Field(64, ge=8, le=512, description="side of the anomaly stamps, pixels")
    lens_term: bool = Field(True, description="rank the lens stage's candidates (lens_score >= 0.5) among the grid's "
                            "windows, shape hint 'lens' (catalogs/anomaly_candidates.py); false: the grid's own "
                            "scores and ring term alone")
    merger_term: bool = Field(True, description="rank the merger stage's candidates (merger_score >= 0.5) among the "
                              "grid's windows, shape hint 'merger' (catalogs/anomaly_candidates.py); false: not")


class AnomalyMerge(MergeStep):
    stage: ClassVar[str] = "anomaly"
    Config: ClassVar[type[MergeStepConfig]] = AnomalyMergeConfig
    version: ClassVar[str] = "4"  # 2: the lens term; 3: the merger term (catalogs/score_terms.py); 4: the line term

    stats: dict | None = None

    def prepare(self, ctx: MergeContext) -> None:
        self.stats = score_stats(ctx.tile_tables)

    def partition(self, df: pd.DataFrame) -> pd.DataFrame:
        return add_sigma(df, self.stats)

    def write(self, ctx: MergeContext, flat_dir: Path, staging: Path) -> StepResult:
        maps = ctx.side_tables("anomaly_map")
        if maps:
            stride = float(getattr(self.stage_config, "stride", 16))
            n, wstats = write_candidates(maps, flat_dir, ctx.store_path, staging / ANOMALY_TABLE,
                                         staging / ANOMALY_STAMPS, self.config.sigma_cut, self.config.top, stride,
                                         self.config.stamp, self.config.sigma_grow, self.config.lens_term,
                                         self.config.merger_term)
            files = {"anomalies": ANOMALY_TABLE}
            if ctx.store_path is not None:
                files["anomaly_stamps"] = ANOMALY_STAMPS
            return StepResult(summary=dict(anomalies=n, anomaly_candidates=True, anomaly_window_stats=wstats,
                                           anomaly_score_stats=self.stats), files=files)
        n = write_anomaly_list(flat_dir, ctx.store_path, staging / ANOMALY_TABLE, staging / ANOMALY_STAMPS,
                               self.config.top, self.config.stamp)
        files = {}
        if n is not None:
            files["anomalies"] = ANOMALY_TABLE
            if ctx.store_path is not None:
                files["anomaly_stamps"] = ANOMALY_STAMPS
        return StepResult(summary=dict(anomalies=n, anomaly_score_stats=self.stats), files=files)

    def report(self, summary: dict, paths: dict[str, str]) -> list[str]:
        if summary.get("anomalies") is None:
            return []
        st = summary.get("anomaly_score_stats") or {}
        if summary.get("anomaly_candidates"):
            ws = summary.get("anomaly_window_stats") or {}
            return [f"anomaly: {ws.get('n', '?')} grid windows and {st.get('n', '?')} source(s) scored; "
                    f"{ws.get('candidates', '?')} candidate(s) at sigma >= {self.config.sigma_cut:g}, the "
                    f"{summary['anomalies']} most anomalous ranked: {paths['anomalies']}"
                    + (f" (stamps: {paths['anomaly_stamps']})" if "anomaly_stamps" in paths else "")]
        return [f"anomaly: {st.get('n', '?')} source(s) scored; the {summary['anomalies']} most anomalous, ranked: "
                f"{paths['anomalies']}" + (f" (stamps: {paths['anomaly_stamps']})" if "anomaly_stamps" in paths
                                           else "")]
