"""Strong-lens scoring: the lens CNN (models/lens_cnn.py) scores stamps of candidate deflectors.

Candidate deflectors are the detected sources that look like massive early-type galaxies:
- AUTO magnitude in the reference band `ref_band` (i) brighter than `max_mag` (22.5): the simulated
  deflector population (Faber-Jackson ellipticals at z 0.2-0.8) has i = 16.5-22.7, 95% brighter than 21.5;
- colour `blue_band` - `ref_band` (g - i) redder than `min_colour` (1.0): deflectors have g - i = 1.7-3.2,
  and the cut leaves room for blue arcs inside the Kron aperture pulling the colour down;
- resolved: second-moment semi-major axis `a` above `min_size` (1.3) times the PSF's sigma in pixels, which
  removes stars (a point source has a = sigma);
- primary in its tile (the core owns it) and not saturated.

For each candidate the stage cuts a stamp of the model's size (48 x 48 px) centred on the nearest pixel to
its centroid from the background-subtracted tile with halo (the halo, 64 px by default, holds a whole
stamp around any core pixel); pixels outside the field or masked are set to 0. Each band is scaled by its
sky noise, sigma = 1 / sqrt(median invvar) over the stamp, as in training. Stamps are scored in batches
on the actor's device. Columns added: `lens_candidate` (bool: passed the cuts) and `lens_score` (the
CNN's lens probability; NaN for non-candidates). The merge writes those above `threshold` to the
lens-candidate table, ranked by score.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd

from .base import load_model
from ._pixels import UNUSABLE, centred_stamps, fwhm_pixels

__all__ = ["LensStage"]


class LensStage:
    name: ClassVar[str] = "lens"
    version: ClassVar[str] = "1"
    models: ClassVar[tuple[str, ...]] = ("lens_resnet",)

    def __init__(self, max_mag: float = 22.5, min_colour: float = 1.0, min_size: float = 1.3,
                 ref_band: str = "i", blue_band: str = "g", batch: int = 256, threshold: float = 0.5,
                 weights: str | None = None):
        self.max_mag, self.min_colour, self.min_size = float(max_mag), float(min_colour), float(min_size)
        self.ref_band, self.blue_band = ref_band, blue_band
        self.batch, self.threshold = int(batch), float(threshold)
        self.weights = weights
        self.model = None
        self.device = "cpu"

    def setup(self, device: str) -> None:
        load_model(self, device)
        cfg = self.model.training_info.get("stamp_config", {})
        self.size = int(cfg.get("size", 48))
        self.bands = list(cfg.get("bands", ["g", "r", "i", "z"]))

    def candidates(self, tile, sources: pd.DataFrame) -> np.ndarray:
        """Boolean mask of the rows that pass the deflector cuts (see the module docstring)."""
        n = len(sources)
        if n == 0:
            return np.zeros(0, bool)
        ref, blue = f"mag_auto_{self.ref_band}", f"mag_auto_{self.blue_band}"
        missing = [c for c in (ref, blue, "a", "x_tile", "y_tile") if c not in sources.columns]
        if missing:
            raise ValueError(f"lens stage needs the measure stage's columns; missing {missing}")
        sigma_px = fwhm_pixels(tile, 3.0) / 2.3548
        m = sources[ref].to_numpy(float)
        colour = sources[blue].to_numpy(float) - m
        ok = (m < self.max_mag) & (colour > self.min_colour) & (sources["a"].to_numpy(float) > self.min_size * sigma_px)
        if "is_primary" in sources.columns:
            ok &= sources["is_primary"].to_numpy(bool)
        if "flag_saturated" in sources.columns:
            ok &= ~sources["flag_saturated"].to_numpy(bool)
        return ok & np.isfinite(m) & np.isfinite(colour)

    def stamps(self, tile, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, bands, S, S) stamps centred on the nearest pixels to (x, y) (tile-array pixel coordinates)
        and (N, bands) noise sigmas."""
        idx = [tile.bands.index(b) for b in self.bands]
        good = (tile.mask[idx] & UNUSABLE) == 0
        return centred_stamps(tile.image[idx], tile.invvar[idx], good, x, y, self.size)

    def run(self, tile, sources: pd.DataFrame) -> pd.DataFrame:
        if self.model is None:
            self.setup(self.device)
        from deepfield.models.lens_cnn import score
        out = sources.copy()
        cand = self.candidates(tile, sources)
        scores = np.full(len(sources), np.nan, np.float32)
        if cand.any():
            # the tile's image is background-subtracted by the background stage (in place)
            x = sources["x_tile"].to_numpy(float)[cand]
            y = sources["y_tile"].to_numpy(float)[cand]
            st, sg = self.stamps(tile, x, y)
            scores[cand] = score(self.model, st, sg, batch=self.batch, device=self.device)
        out["lens_candidate"] = cand
        out["lens_score"] = scores
        return out
