"""Sky background subtraction with SEP (Barbary 2016), the Source Extractor background model.

Per band, `sep.Background` estimates the sky on a grid of `box` x `box` pixel meshes (a
sigma-clipped mode per mesh, ignoring masked pixels), median-filters the mesh grid over
`filter_size` x `filter_size` meshes and interpolates it with a bicubic spline back to every
pixel. The stage subtracts that map from `tile.image` in place: the runner gives each actor its own
copy of the tile, and the later stages (detect, measure) read the subtracted pixels.

The source table passes through untouched. The per-band global background level and rms (image
units, the mean of the mesh values) are kept on the stage as `last_stats` and, where the tile
carries a dict attribute `meta`, in `tile.meta["background"]`.
"""
from __future__ import annotations

from typing import ClassVar

import pandas as pd
import numpy as np
import sep
from scipy import ndimage

from ._pixels import band_pixels

__all__ = ["BackgroundStage"]


class BackgroundStage:
    """Subtract a SEP background model from every band of a tile, in place.

    Parameters
    ----------
    box : int
        Mesh size in pixels (Source Extractor BACK_SIZE), default 64.
    filter_size : int
        Median filter over the mesh grid, in meshes (BACK_FILTERSIZE), default 3.
    fthresh : float
        Only meshes whose value differs from their filtered value by more than this are filtered
        (BACK_FILTERTHRESH, image units), default 0.
    """

    name: ClassVar[str] = "background"
    version: ClassVar[str] = "2"

    def __init__(self, box: int = 64, filter_size: int = 3, fthresh: float = 0.0, source_mask_sigma: float = 3.0,
                 source_mask_grow: int = 6) -> None:
        if int(box) < 1 or int(filter_size) < 1:
            raise ValueError(f"background: box ({box}) and filter_size ({filter_size}) must be >= 1")
        self.box = int(box)
        self.filter_size = int(filter_size)
        self.fthresh = float(fthresh)
        self.source_mask_sigma = float(source_mask_sigma)
        self.source_mask_grow = int(source_mask_grow)
        self.last_stats: dict[str, dict[str, float]] = {}

    def setup(self, device: str) -> None:
        """Nothing to load; SEP runs on the CPU whatever `device` is."""

    def model(self, tile, b: int) -> sep.Background:
        """The SEP background of band index `b` (masked, NaN and zero-weight pixels ignored).

        Two passes: the wings of bright sources bias a mesh's mode upwards (fluxes then come out a
        few per cent low), so pixels more than `source_mask_sigma` above the first-pass background,
        grown by `source_mask_grow` pixels, are left out of the second pass."""
        data, _, bad = band_pixels(tile, b)
        ny, nx = data.shape
        # a mesh larger than the image would leave SEP with a single, partly empty mesh
        bw, bh = min(self.box, nx), min(self.box, ny)
        kw = dict(bw=bw, bh=bh, fw=self.filter_size, fh=self.filter_size, fthresh=self.fthresh)
        bkg = sep.Background(data, mask=bad, **kw)
        if self.source_mask_sigma <= 0:
            return bkg
        sources = (data - bkg.back()) > self.source_mask_sigma * bkg.globalrms
        if self.source_mask_grow > 0:
            sources = ndimage.binary_dilation(sources, iterations=self.source_mask_grow)
        both = np.ascontiguousarray(bad | sources)
        if both.mean() > 0.7:  # too little sky left to improve on the first pass
            return bkg
        return sep.Background(data, mask=both, **kw)

    def run(self, tile, sources: pd.DataFrame) -> pd.DataFrame:
        """Subtract the background of each band from `tile.image` (band, y, x) in place; return
        `sources` unchanged."""
        stats: dict[str, dict[str, float]] = {}
        for b, band in enumerate(tile.bands):
            bkg = self.model(tile, b)
            level = bkg.back()
            img = tile.image[b]
            img -= level.astype(img.dtype, copy=False)
            stats[band] = {"level": float(bkg.globalback), "rms": float(bkg.globalrms)}
        self.last_stats = stats
        meta = getattr(tile, "meta", None)
        if isinstance(meta, dict):
            meta["background"] = stats
        return sources

