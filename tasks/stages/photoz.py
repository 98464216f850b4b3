"""Photometric redshifts from the catalog's colours (issue 23's colour baseline): the k-nearest-neighbour
estimator of models/photoz.py against the shipped reference set `photoz_knn` (simulated galaxies measured by
these same stages, with their true redshifts; `deepfield train photoz`).

For every row, the fluxes `flux_<flux>_<b>` and errors of the bands that the field and the reference set share
(at least two; a field with fewer is refused before the run, naming the bands) are converted to nJy with the
row's `zeropoint_<b>` and compared, as colours and a magnitude, with the reference galaxies' (models/photoz.py).
The default `flux` is `aper` (the measure stage's circular aperture of one PSF FWHM, the same in every band):
on the simulated fields its colours gave sigma_NMAD 0.073 against 0.097 for the Kron fluxes and 0.098 for the
deblended ones (one 2048^2 field, i < 24, reference set from another field), because a small aperture has the
least sky noise and the least of the neighbours' light. The reference set was measured with the same `flux`
(its training record says which); another `flux` than the record's is refused.

Columns added: `z_phot` (median of p(z)), `z_phot_err` (half the 16-84 % width), the p(z) summary
`z_phot_q025`, `z_phot_q16`, `z_phot_q50`, `z_phot_q84`, `z_phot_q975` (its quantiles; p(z) is uniform between
them, models.photoz.pdf) and `z_phot_flag` (bits: 1 reference-band S/N < 5, 2 broad: half-width >
0.15 (1 + z), 4 a band's flux missing, estimated from the others, 8 no estimate: fewer than two usable bands).
Every row gets them, stars too (the estimate assumes a galaxy: filter on the catalog's star/galaxy columns).
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

import numpy as np
import pandas as pd
from pydantic import Field

from .base import ModelStage, ModelStageConfig, StageConfig

__all__ = ["PhotoZStage", "PhotoZConfig", "nJy"]


class PhotoZConfig(ModelStageConfig):
    flux: Literal["aper", "auto", "deblend"] = Field("aper", description="photometry the colours come from: aper "
                                                     "(flux_aper_<b>), auto (flux_auto_<b>), deblend "
                                                     "(flux_deblend_<b>, the Kron flux for isolated sources); "
                                                     "must be what the reference set was measured with")
    k: Optional[int] = Field(None, ge=4, le=1024, description="neighbours per galaxy (default: the reference "
                             "set's, fitted in training)")


class PhotoZStage(ModelStage):
    name: ClassVar[str] = "photoz"
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = PhotoZConfig
    models: ClassVar[tuple[str, ...]] = ("photoz_knn",)
    reads: ClassVar[tuple[str, ...]] = ("flux_aper_{band}", "fluxerr_aper_{band}", "zeropoint_{band}")
    adds: ClassVar[tuple[str, ...]] = ("z_phot", "z_phot_err", "z_phot_q025", "z_phot_q16", "z_phot_q50",
                                       "z_phot_q84", "z_phot_q975", "z_phot_flag")

    def required_bands(self) -> list[str] | None:
        return None  # any two of the reference set's bands (band_problem)

    def band_problem(self, have: list[str]) -> str | None:
        ref = self.model_bands()
        if len([b for b in ref if b in have]) < 2:
            return (f"needs bands: at least two of the photo-z reference set's {', '.join(ref)} "
                    f"(missing {', '.join(b for b in ref if b not in have)})")
        return None

    def setup(self, device: str) -> None:
        super().setup(device)
        trained = getattr(self.model, "flux_kind", "aper")
        if self.flux != trained:
            raise ValueError(f"stage 'photoz': flux {self.flux!r}, but the reference set was measured with "
                             f"{trained!r} (retrain with `deepfield train photoz --flux {self.flux}`)")
        self.estimator = self.model.estimator()
        if self.k is not None:
            self.estimator.k = int(self.k)

    def run(self, tile, sources: pd.DataFrame) -> pd.DataFrame:
        self.ensure_setup()
        out = sources.copy()
        bands = [b for b in tile.bands if b in self.estimator.bands]
        if len(sources) == 0 or len(bands) < 2:
            res = self.estimator.predict(np.zeros((len(sources), 0)), np.zeros((len(sources), 0)), [])
        else:
            flux = np.empty((len(sources), len(bands)))
            err = np.empty_like(flux)
            for i, b in enumerate(bands):
                f, e = self.flux_nJy(sources, b)
                flux[:, i], err[:, i] = f, e
            res = self.estimator.predict(flux, err, bands)
        for c in self.adds:
            out[c] = res[c].astype(np.float32) if c != "z_phot_flag" else res[c]
        return out

    def flux_nJy(self, sources: pd.DataFrame, band: str) -> tuple[np.ndarray, np.ndarray]:
        """(flux, error) in nJy of the configured photometry in `band` (nJy below)."""
        return nJy(sources, band, self.flux)


def nJy(sources: pd.DataFrame, band: str, kind: str = "aper") -> tuple[np.ndarray, np.ndarray]:
    """(flux, error) in nJy of `flux_<kind>_<band>`, image units converted with the row's `zeropoint_<band>`;
    for kind "deblend", the Kron (AUTO) flux where a row has no finite deblended flux."""
    scale = 10 ** (-0.4 * (sources[f"zeropoint_{band}"].to_numpy(float) - 31.4))
    base = "auto" if kind == "deblend" else kind
    f = sources[f"flux_{base}_{band}"].to_numpy(float).copy()
    e = sources[f"fluxerr_{base}_{band}"].to_numpy(float).copy()
    if kind == "deblend" and f"flux_deblend_{band}" in sources.columns:
        fd = sources[f"flux_deblend_{band}"].to_numpy(float)
        ed = sources[f"fluxerr_deblend_{band}"].to_numpy(float)
        use = np.isfinite(fd) & np.isfinite(ed)
        f[use], e[use] = fd[use], ed[use]
    return f * scale, e * scale
