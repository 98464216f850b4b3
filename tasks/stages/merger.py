"""Merger scoring: the merger CNN (the lens stage's network trained on mergers, models/cards/merger_resnet.md)
scores stamps of bright resolved galaxies for tidal tails.

Galaxy mergers with tidal tails are anomalies the anomaly stage's generator hardly sees: two overlapping
galaxies and a faint tail look like any close pair to a per-pixel residual (above the normal windows' 99th
percentile 0.00-0.31 of the simulated mergers, `deepfield eval anomaly`). A classifier trained to tell a merger
from a close pair without tails, field galaxies, spirals, ring galaxies, red galaxies with companions and
lenses sees them; its scores rank candidates among the anomaly windows in the anomaly merge (the merger term of
catalogs/score_terms.py).

Candidates are the detected sources that could be a merger or one of its nuclei:
- AUTO magnitude in the reference band `ref_band` (i, or the reddest band of the weights without i) brighter
  than `max_mag` (22.5): the simulated mergers have total i 19-23, and a merger fainter than that carries tails
  near the sky noise (its tails hold 10-25 % of its light);
- resolved: second-moment semi-major axis `a` above `min_size` (1.3) times the PSF's sigma in pixels (no stars);
- primary in its tile and not saturated.

For each the stage cuts a stamp of the model's size (48 x 48 px) centred on the nearest pixel to its centroid, as
the lens stage does (on a field of another pixel scale than the training stamps' 0.2", resampled onto their grid:
completeness above 0.5 0.859 -> 0.949 at 0.262" and 0.921 -> 0.951 at 0.168", lens.py; the training stamps are
centred on the pair's barycentre or on either nucleus, as a detection that splits the pair sees them), and scores
it. Columns added: `merger_candidate` (bool: passed the cuts) and `merger_score` (the CNN's merger probability; NaN
for non-candidates). The network runs as the lens stage's does (batch norms folded, channels-last, bfloat16 where
the CPU computes it natively).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd

from .base import StageConfig
from .lens import CandidateStampConfig, LensStage

__all__ = ["MergerStage", "MergerConfig"]


class MergerConfig(CandidateStampConfig):
    """The lens stage's magnitude and size cuts, batch and arithmetic (CandidateStampConfig), without its colour
    cut."""


class MergerStage(LensStage):
    name: ClassVar[str] = "merger"
    version: ClassVar[str] = "2"  # 2: stamps resampled onto the training grid on a field of another pixel scale
    Config: ClassVar[type[StageConfig]] = MergerConfig
    models: ClassVar[tuple[str, ...]] = ("merger_resnet",)
    reads: ClassVar[tuple[str, ...]] = ("mag_auto_{band}", "a", "x_tile", "y_tile")
    adds: ClassVar[tuple[str, ...]] = ("merger_candidate", "merger_score")
    merge_step: ClassVar[str | None] = None  # its scores rank in the anomaly merge (catalogs/score_terms.py)
    columns: ClassVar[tuple[str, str]] = ("merger_candidate", "merger_score")

    def cut_bands(self) -> tuple[str, str]:
        if self.ref_band:
            return self.ref_band, self.ref_band
        model = self.model_bands()
        ref = "i" if "i" in model else model[-1]
        return ref, ref

    def required_bands(self) -> list[str]:
        return list(dict.fromkeys([*self.model_bands(), self.cut_bands()[0]]))

    def candidates(self, tile, sources: pd.DataFrame) -> np.ndarray:
        """Boolean mask of the rows that pass the candidate cuts (see the module docstring)."""
        if len(sources) == 0:
            return np.zeros(0, bool)
        ref_band = self.cut_bands()[0]
        self.require(sources, [ref_band])
        return self.bright_resolved(tile, sources, ref_band)
