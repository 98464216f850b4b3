"""Strong-lens scoring: the lens CNN (models/lens_cnn.py) scores stamps of candidate deflectors.

Candidate deflectors are the detected sources that look like massive early-type galaxies:
- AUTO magnitude in the reference band `ref_band` (i) brighter than `max_mag` (22.5): the simulated
  deflector population (Faber-Jackson ellipticals at z 0.2-0.8) has i = 16.5-22.7, 95% brighter than 21.5;
- colour `blue_band` - `ref_band` (g - i) redder than `min_colour` (1.0): deflectors have g - i = 1.7-3.2,
  and the cut leaves room for blue arcs inside the Kron aperture pulling the colour down;
- by default the reference band is i and the blue band g when the weights take them, else the reddest and
  the bluest of the weights' bands (z and g for the g, r, z variant: deflectors have g - z = 2.1-3.9 and
  z about 0.4 mag brighter than i, so the same cuts keep the same deflectors and a few fainter ones);
- resolved: second-moment semi-major axis `a` above `min_size` (1.3) times the PSF's sigma in pixels, which
  removes stars (a point source has a = sigma);
- primary in its tile (the core owns it) and not saturated.

For each candidate the stage cuts a stamp of the model's size (48 x 48 px) centred on the nearest pixel to its
centroid from the background-subtracted tile with halo (the halo, 64 px by default, holds a whole stamp around any
core pixel); pixels outside the field or masked are set to 0. Each band is scaled by its sky noise, sigma = 1 /
sqrt(median invvar) over the stamp, as in training. On a field whose pixel scale differs from the training stamps'
(0.2" per pixel, the weights' `stamp_config`) by more than 1 %, the stamp is resampled onto the training grid
instead, centred on the centroid (_pixels.resampled_stamps: each 0.2" pixel the light of the area it covers, its
sigma that of a 0.2" pixel at the field's depth), so that an Einstein radius or a tidal tail spans the pixels it
spanned in training. Measured on stamps simulated at other pixel scales (4,000 per set, 10 % lenses or mergers,
seed 20261124; native -> resampled): at 0.262" (the Legacy Surveys') the lens finder's AUROC 0.9971 -> 0.9983,
TPR10 0.905 -> 0.956, lenses above 0.5 0.972 -> 0.981, and the merger finder's 0.9888 -> 0.9963, 0.729 -> 0.884,
0.859 -> 0.949; at 0.168" (HSC's) 0.9988 -> 0.9993, 0.947 -> 0.965, 0.979 -> 0.981 and 0.9917 -> 0.9957, 0.757 ->
0.847, 0.921 -> 0.951. Stamps are scored in batches on the actor's device. Columns added: `lens_candidate` (bool:
passed the cuts) and `lens_score` (the CNN's lens probability; NaN for non-candidates). The stage's merge step
(catalogs/lenses.py) writes those above its `threshold` to the lens-candidate table, ranked by score.

The network runs with the batch normalisations that follow a convolution folded into it, channels-last
(the same scores to 2e-7 in 0.8 of the time), and with `precision` "auto" (the default) under torch.autocast to
bfloat16 on a CPU that computes it natively (AVX512-BF16 or AMX): a third of float32's time there, probabilities
within 0.005 and `deepfield eval lens` the same to its third decimal (models/cards/lens_resnet.md).
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

import numpy as np
import pandas as pd
from pydantic import Field

from ._pixels import DEFAULT_FWHM_PX, UNUSABLE, centred_stamps, fwhm_pixels, resampled_stamps
from .base import ModelStage, ModelStageConfig, StageConfig

__all__ = ["LensStage", "LensConfig", "CandidateStampConfig"]


class CandidateStampConfig(ModelStageConfig):
    """What the lens and merger stages share: the candidates' magnitude and size cuts and the network's batch and
    arithmetic."""
    max_mag: float = Field(22.5, description="candidates are brighter than this AUTO magnitude in ref_band")
    min_size: float = Field(1.3, gt=0, description="candidates have a > min_size x the PSF sigma (not stars)")
    ref_band: Optional[str] = Field(None, description="reference band of the candidate cuts (default: i, or the "
                                    "reddest band of the weights without i)")
    batch: int = Field(256, ge=1, description="stamps per inference batch")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="the network's arithmetic on a CPU: 'auto', bfloat16 (torch.autocast) where the CPU "
        "computes it natively (AVX512-BF16 or AMX), else float32")


class LensConfig(CandidateStampConfig):
    min_colour: float = Field(1.0, description="candidates are redder than this in blue_band - ref_band, mag")
    blue_band: Optional[str] = Field(None, description="blue band of the colour cut (default: g, or the bluest band "
                                     "of the weights without g)")


class LensStage(ModelStage):
    name: ClassVar[str] = "lens"
    # 3: stamps resampled onto the training grid on a field of another pixel scale; 2: bfloat16 on CPUs
    version: ClassVar[str] = "3"
    Config: ClassVar[type[StageConfig]] = LensConfig
    models: ClassVar[tuple[str, ...]] = ("lens_resnet",)
    reads: ClassVar[tuple[str, ...]] = ("mag_auto_{band}", "a", "x_tile", "y_tile")
    adds: ClassVar[tuple[str, ...]] = ("lens_candidate", "lens_score")
    merge_step: ClassVar[str] = "deepfield.catalogs.lenses:LensMerge"
    columns: ClassVar[tuple[str, str]] = ("lens_candidate", "lens_score")  # (passed the cuts, score)

    def cut_bands(self) -> tuple[str, str]:
        """(reference band, blue band) of the deflector cuts: as configured, else i and g when the weights take
        them, else the weights' reddest and bluest bands (their channels run from blue to red)."""
        model = self.model_bands()
        ref = self.ref_band or ("i" if "i" in model else model[-1])
        blue = self.blue_band or ("g" if "g" in model else model[0])
        return ref, blue

    def required_bands(self) -> list[str]:
        return list(dict.fromkeys([*self.model_bands(), *self.cut_bands()]))

    def setup(self, device: str) -> None:
        from deepfield.models.inference import cpu_precision, for_inference
        super().setup(device)
        # batch norms folded where a convolution precedes them, channels-last: the same scores (1e-7) in 0.8 of
        # the time; bfloat16 on a CPU that computes it natively: a third of float32's time (module docstring)
        self.model = for_inference(self.model)
        self.arithmetic = cpu_precision(self.model, ("",), self.precision, device)
        cfg = self.model.training_info.get("stamp_config", {})
        self.size = int(cfg.get("size", 48))
        self.bands = list(cfg.get("bands", ["g", "r", "i", "z"]))
        self.train_pixel_scale = float(cfg.get("pixel_scale", 0.2))  # arcsec per pixel of the training stamps

    def bright_resolved(self, tile, sources: pd.DataFrame, ref_band: str) -> np.ndarray:
        """The cuts the lens and merger stages share: AUTO magnitude in `ref_band` below max_mag (finite), a above
        min_size PSF sigmas, primary, not saturated."""
        sigma_px = fwhm_pixels(tile, DEFAULT_FWHM_PX) / 2.3548
        m = sources[f"mag_auto_{ref_band}"].to_numpy(float)
        ok = (m < self.max_mag) & (sources["a"].to_numpy(float) > self.min_size * sigma_px)
        if "is_primary" in sources.columns:
            ok &= sources["is_primary"].to_numpy(bool)
        if "flag_saturated" in sources.columns:
            ok &= ~sources["flag_saturated"].to_numpy(bool)
        return ok & np.isfinite(m)

    def candidates(self, tile, sources: pd.DataFrame) -> np.ndarray:
        """Boolean mask of the rows that pass the deflector cuts (see the module docstring)."""
        if len(sources) == 0:
            return np.zeros(0, bool)
        ref_band, blue_band = self.cut_bands()
        self.require(sources, [blue_band, ref_band])
        colour = sources[f"mag_auto_{blue_band}"].to_numpy(float) - sources[f"mag_auto_{ref_band}"].to_numpy(float)
        return self.bright_resolved(tile, sources, ref_band) & (colour > self.min_colour) & np.isfinite(colour)

    def stamps(self, tile, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, bands, S, S) stamps centred on the nearest pixels to (x, y) (tile-array pixel coordinates)
        and (N, bands) noise sigmas; on a field whose pixel scale is not the training stamps' (by more than 1 %),
        stamps resampled onto the training grid, centred on (x, y) (_pixels.resampled_stamps)."""
        idx = [tile.bands.index(b) for b in self.bands]
        good = (tile.mask[idx] & UNUSABLE) == 0
        ratio = self.grid_ratio(tile)
        if ratio != 1.0:
            return resampled_stamps(tile.image[idx], tile.invvar[idx], good, x, y, self.size, ratio)
        return centred_stamps(tile.image[idx], tile.invvar[idx], good, x, y, self.size)

    def grid_ratio(self, tile) -> float:
        """The training stamps' pixel side in the field's pixels: 1 where the field's pixel scale is unknown or
        within 1 % of the training stamps'."""
        scale = float(tile.pixel_scale or 0)
        ratio = self.train_pixel_scale / scale if scale > 0 else 1.0
        return 1.0 if abs(ratio - 1.0) <= 0.01 else ratio

    def run(self, tile, sources: pd.DataFrame) -> pd.DataFrame:
        self.ensure_setup()
        from deepfield.models.lens_cnn import score  # the merger stage (merger.py) runs the same network
        out = sources.copy()
        cand = self.candidates(tile, sources)
        scores = np.full(len(sources), np.nan, np.float32)
        if cand.any():
            # the tile's image is background-subtracted by the background stage (in place)
            x = sources["x_tile"].to_numpy(float)[cand]
            y = sources["y_tile"].to_numpy(float)[cand]
            st, sg = self.stamps(tile, x, y)
            scores[cand] = score(self.model, st, sg, batch=self.inference_batch(), device=self.device)
        out[self.columns[0]] = cand
        out[self.columns[1]] = scores
        return out
