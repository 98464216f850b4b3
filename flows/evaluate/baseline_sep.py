"""The classical baseline of `deepfield eval detect`: SEP alone (Barbary 2016) on one band, as a survey astronomer
would run it by hand.

`sep.extract` at 1.5 sigma of the pixel noise after a Gaussian filter of the band's PSF FWHM (`filter_type` "conv":
the threshold is in units of the unfiltered noise, as in Source Extractor), SEP's defaults otherwise (minarea 5, 32
deblending levels, minimum contrast 0.005, cleaning). Flux: the Kron ellipse (Kron radius measured within
`kron_rmax` isophotal radii, `kron_k` Kron radii but at least `kron_min` times a and b, Source Extractor's minimum;
a circle of `min_radius` px where that ellipse's mean radius is smaller: the measure stage's rule,
tasks/stages/_kron.auto_scale), both the radius and the sum taken with the other objects' segmentation pixels masked
(`segmap`, `seg_id`). SEP scales an aperture sum by its area over its unmasked area, so a masked neighbour's pixels
count with the mean surface brightness of the rest of the aperture: that is SEP's own neighbour masking, the one
`deepfield eval deblend`'s SEP baseline uses too.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import sep

from deepfield.tasks.stages._kron import auto_scale
from deepfield.tasks.stages._pixels import configure_sep, gaussian_kernel

__all__ = ["SEP_THRESH", "sep_alone"]

SEP_THRESH = 1.5


def sep_alone(data: np.ndarray, err: np.ndarray, bad: np.ndarray, fwhm_px: float, kron_k: float,
              kron_rmax: float = 6.0, min_radius: float = 1.75,
              kron_min: float = 3.5) -> tuple[pd.DataFrame, np.ndarray]:
    """SEP alone on one background-subtracted band (data, err: (y, x) float64 image units; bad: (y, x) bool,
    True for pixels left out; fwhm_px: the band's PSF FWHM in pixels): see the module docstring. Returns (table with x_tile, y_tile (pixels, centres at integers), flux (image
    units) and seg_id; segmentation map (y, x) int32, object k has value k + 1)."""
    configure_sep(data.size)
    objs, seg = sep.extract(data, SEP_THRESH, err=err, mask=bad, minarea=5, filter_kernel=gaussian_kernel(fwhm_px),
                            filter_type="conv", deblend_nthresh=32, deblend_cont=0.005, segmentation_map=True)
    n = len(objs)
    x, y = objs["x"].astype(float), objs["y"].astype(float)
    seg_id = np.arange(1, n + 1, dtype=np.int32)
    flux = np.zeros(n)
    if n:
        a, b = np.clip(objs["a"].astype(float), 1e-3, None), np.clip(objs["b"].astype(float), 1e-3, None)
        th = np.clip(objs["theta"].astype(float), -np.pi / 2, np.pi / 2)
        kron, _ = sep.kron_radius(data, x, y, a, b, th, kron_rmax, mask=bad, segmap=seg, seg_id=seg_id)
        kron = np.where(np.isfinite(kron), kron, 0.0)
        scale, circle = auto_scale(kron, a, b, kron_k, kron_min, min_radius)
        e = ~circle
        if e.any():
            flux[e] = sep.sum_ellipse(data, x[e], y[e], a[e], b[e], th[e], scale[e], mask=bad, subpix=1,
                                      segmap=seg, seg_id=seg_id[e])[0]
        if circle.any():
            flux[circle] = sep.sum_circle(data, x[circle], y[circle], min_radius, mask=bad, subpix=1, segmap=seg,
                                          seg_id=seg_id[circle])[0]
    return pd.DataFrame({"x_tile": x, "y_tile": y, "flux": flux, "seg_id": seg_id.astype(np.int64)}), seg
