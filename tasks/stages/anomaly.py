"""GAN anomaly scores (Storey-Fisher et al. 2021): the WGAN-GP of models/anomaly_gan.py scores how well its
generator can reproduce each selected source's g, r, i stamp.

Selection (`select`), for the sources of the tile that
- are primary (the core owns them) and not saturated (saturated stars are bright, normal and masked);
- have S/N >= `min_snr` (10) in at least one of the model's bands (AUTO flux over its error): a cosmic ray
  or a trail lives in one band only;
- are not point-like: the second-moment size `a` is outside [1 - `point_tol`, 1 + `point_tol`] (0.15) times
  the PSF's sigma. Stars are normal, but the scorer is trained on galaxies; artefacts sharper than the PSF
  (cosmic rays, hot pixels) stay in.

Stamps (`scaled_stamps`): `size` x `size` px (32, from the model) centred on the nearest pixel to the
centroid, cut from the background-subtracted tile with halo; pixels outside the field or without data
(invvar 0, NaN) are set to 0, other masked pixels keep their values (an artefact is what is sought). Scaled by
the bands' sky noise as in training (models.anomaly_gan.scale_stamps).

Columns added: `anomaly_selected` (bool), `anomaly_score` (L of the paper, lambda = 0.3), `anomaly_pixel`
and `anomaly_feature` (its two residual sums); NaN for unselected rows. `mode` "full" refines the latent
vector with `steps` (20) Adam steps per stamp; "fast" uses the encoder alone. The stage's merge step
(catalogs/anomalies.py) turns the scores into `anomaly_sigma` over the whole run and writes the ranked top
list with stamps.
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

import numpy as np
import pandas as pd
from pydantic import Field

from .. import maskbits
from ._pixels import centred_stamps, fwhm_pixels
from .base import ModelStage, ModelStageConfig, StageConfig

__all__ = ["AnomalyStage", "AnomalyConfig"]

NO_PIXEL = maskbits.NO_DATA | maskbits.ZERO_WEIGHT


class AnomalyConfig(ModelStageConfig):
    min_snr: float = Field(10.0, description="scored sources have at least this AUTO S/N in one of the bands")
    point_tol: float = Field(0.15, ge=0, description="sources with a within 1 +- point_tol PSF sigma are "
                             "point-like and not scored")
    mode: Literal["full", "fast"] = Field("full", description="full: refine the latent vector with `steps` Adam "
                                          "steps; fast: the encoder alone")
    steps: int = Field(20, ge=0, description="Adam steps on the latent vector in the full mode")
    batch: int = Field(256, ge=1, description="stamps per inference batch")
    size: Optional[int] = Field(None, ge=8, description="stamp size before the model is loaded (the model's own "
                                "size is used once it is)")
    bands: Optional[tuple[str, ...]] = Field(None, description="bands before the model is loaded (the model's "
                                             "own bands are used once it is)")


class AnomalyStage(ModelStage):
    name: ClassVar[str] = "anomaly"
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = AnomalyConfig
    models: ClassVar[tuple[str, ...]] = ("anomaly_wgan",)
    reads: ClassVar[tuple[str, ...]] = ("flux_auto_{band}", "fluxerr_auto_{band}", "a", "x_tile", "y_tile")
    adds: ClassVar[tuple[str, ...]] = ("anomaly_selected", "anomaly_score", "anomaly_pixel", "anomaly_feature")
    merge_step: ClassVar[str] = "deepfield.catalogs.anomalies:AnomalyMerge"

    def __init__(self, config: StageConfig | None = None, **params):
        super().__init__(config, **params)
        self.size = int(self.config.size) if self.config.size else 32  # set from the model at setup
        self.bands = list(self.config.bands) if self.config.bands else ["g", "r", "i"]
        self.ref_band = self.bands[-1]

    def setup(self, device: str) -> None:
        super().setup(device)
        self.size, self.bands = self.model.size, list(self.model.bands)
        self.ref_band = self.bands[-1]

    def snr(self, sources: pd.DataFrame) -> np.ndarray:
        """Largest AUTO-flux S/N over the model's bands."""
        cols = []
        for b in self.bands:
            f, e = sources[f"flux_auto_{b}"].to_numpy(float), sources[f"fluxerr_auto_{b}"].to_numpy(float)
            with np.errstate(divide="ignore", invalid="ignore"):
                cols.append(np.where(e > 0, f / e, 0.0))
        return np.nan_to_num(np.max(cols, axis=0), nan=0.0)

    def select(self, tile, sources: pd.DataFrame) -> np.ndarray:
        """Boolean mask of the rows to score (module docstring)."""
        if len(sources) == 0:
            return np.zeros(0, bool)
        self.require(sources, self.bands)
        sigma_px = fwhm_pixels(tile, 3.0) / 2.3548
        size = sources["a"].to_numpy(float) / sigma_px
        ok = (self.snr(sources) >= self.min_snr) & (np.abs(size - 1) > self.point_tol)
        if "is_primary" in sources.columns:
            ok &= sources["is_primary"].to_numpy(bool)
        if "flag_saturated" in sources.columns:
            ok &= ~sources["flag_saturated"].to_numpy(bool)
        return ok

    def scaled_stamps(self, tile, sources: pd.DataFrame) -> np.ndarray:
        """(N, bands, S, S) network inputs of the rows of `sources` (background-subtracted tile)."""
        from deepfield.models.anomaly_gan import scale_stamps
        idx = [tile.bands.index(b) for b in self.bands]
        image = tile.image[idx]
        usable = ((tile.mask[idx] & NO_PIXEL) == 0) & np.isfinite(image)
        stamps, sig = centred_stamps(image, tile.invvar[idx], usable, sources["x_tile"].to_numpy(float),
                                     sources["y_tile"].to_numpy(float), self.size)
        return scale_stamps(stamps, sig)

    def run(self, tile, sources: pd.DataFrame) -> pd.DataFrame:
        self.ensure_setup()
        from deepfield.models.anomaly_gan import anomaly_scores
        out = sources.copy()
        sel = self.select(tile, sources)
        cols = {k: np.full(len(sources), np.nan, np.float32) for k in ("score", "pixel", "feature")}
        if sel.any():
            # the tile's image is background-subtracted by the background stage (in place)
            x = self.scaled_stamps(tile, sources[sel])
            r = anomaly_scores(self.model, x, steps=self.steps if self.mode == "full" else 0, batch=self.batch,
                               device=self.device)
            for k in cols:
                cols[k][sel] = r[k]
        out["anomaly_selected"] = sel
        out["anomaly_score"] = cols["score"]
        out["anomaly_pixel"] = cols["pixel"]
        out["anomaly_feature"] = cols["feature"]
        return out
