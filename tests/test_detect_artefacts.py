"""Detections that are not sources (tasks/stages/_artefacts.py): cosmic rays alone in one band are left out of the
detect stage's table; a galaxy hit by a cosmic ray, a star and a source seen in one band only stay."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from test_learned_detection_stage import _galaxy, _scene_tile, _star


def test_neighbour_ratio_is_that_of_a_pixel_integrated_gaussian():
    """The ratio of the mean of the 8 neighbours to the centre pixel, against GalSim's drawing of a Gaussian
    centred on a pixel (its default drawing integrates over the pixels)."""
    import galsim

    from deepfield.tasks.stages._artefacts import neighbour_ratio
    for fwhm in (1.5, 2.5, 3.5, 5.0):
        img = galsim.Gaussian(fwhm=fwhm).drawImage(nx=15, ny=15, scale=1.0).array  # pixel-integrated
        c = img[7, 7]
        n8 = (img[6:9, 6:9].sum() - c) / 8
        assert neighbour_ratio(fwhm) == pytest.approx(n8 / c, rel=2e-3)
    assert neighbour_ratio(0.3) < 0.01 and neighbour_ratio(30.0) > 0.99


def _one_band(mag: float, band: str, dx: float, dy: float) -> dict:
    """A point source seen in `band` only (an i-band dropout seen in z: as wide as the PSF)."""
    import galsim
    flux = 10 ** (-0.4 * (mag - 27.0))
    return {b: galsim.DeltaFunction(flux=flux if b == band else 1e-12).shift(dx, dy) for b in ("g", "r", "i", "z")}


@pytest.mark.parametrize("method", ["sep", "learned"])
def test_cosmic_rays_are_not_sources_and_what_they_hit_stays(method):
    """Two cosmic rays alone (a one-pixel hit in i, a worm of 6 pixels in r; 50 and 500 sky sigma) give no row;
    a galaxy with a hit on its centre in g, a star and a z-only point source each give one, near their centres.
    SEP detects the cosmic rays (they are there with reject_sharp off); the learned detector was taught to
    ignore them (so the rejection must change nothing there)."""
    from deepfield.tasks.sim.config import DEFAULT_BANDS
    from deepfield.tasks.stages.detect import DetectStage
    from deepfield.tasks.trainsets.stamp_survey import StampSurvey

    n, c = 128, (128 - 1) / 2
    ss = StampSurvey()
    sig = {b: ss.noise_sigma(b, DEFAULT_BANDS[b].psf_fwhm) for b in ("g", "r", "i", "z")}
    # arcsec offsets (0.2"/px): galaxy at (-6, -6), star at (6, 6), z-only source at (-6, 6)
    truth = np.array([[c - 30, c - 30], [c + 30, c + 30], [c - 30, c + 30]])
    for seed, amp in ((0, 50.0), (1, 500.0)):
        tile = _scene_tile([_galaxy(21.5, 0.6, -6.0, -6.0), _star(19.0, 6.0, 6.0), _one_band(21.5, "z", -6.0, 6.0)],
                           n, seed)
        tile.image[2][100, 64] += amp * sig["i"]
        for k in range(6):
            tile.image[1][20 + k, 100 + k] += amp * sig["r"]
        tile.image[0][int(c - 30 + 0.5), int(c - 30 + 0.5)] += amp * sig["g"]
        kept = DetectStage(method=method).run(tile, pd.DataFrame())
        d = np.hypot(kept.x_tile.to_numpy()[:, None] - truth[None, :, 0], kept.y_tile.to_numpy()[:, None] - truth[None, :, 1])
        assert len(kept) == 3 and (d.min(axis=0) < 1.5).all(), kept[["x_tile", "y_tile"]]
        assert list(kept.seg_id) == [1, 2, 3] and not kept.is_blended.any()
        seg = tile.meta["segmap"]
        for row in kept.itertuples():  # each row's centre pixel is its own segment
            assert seg[int(row.y_tile + 0.5), int(row.x_tile + 0.5)] == row.seg_id
        if method == "sep":  # SEP finds the worm at 50 sigma, and the hit too at 500
            dropped = tile.meta["detect_artefacts"]
            assert dropped == (1 if amp < 100 else 2) and seg[22, 102] > 3  # the worm's pixels: masked for the others
            assert len(DetectStage(method=method, reject_sharp=False).run(tile, pd.DataFrame())) == 3 + dropped
