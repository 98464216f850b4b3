"""Synthetic photo-z data with a known colour-redshift relation, for tests/test_photoz.py and
tests/test_photoz_training.py: measured reference galaxies, and whole seeds (truth and measured table) of a
library fit."""
from __future__ import annotations

import numpy as np
import pandas as pd


def synthetic_reference(rng, n, sigma=0.03):
    """Galaxies whose g-r and r-i colours are known functions of z (a smooth, non-degenerate track), with
    Gaussian flux noise of `sigma` (fractional) in every band."""
    z = rng.uniform(0.05, 1.5, n)
    mag_i = rng.uniform(20, 23, n)
    mags = np.stack([mag_i + 1.2 * z + 0.3, mag_i + 0.6 * z, mag_i, mag_i - 0.4 * z], axis=1)  # g r i z
    flux = 10 ** (-0.4 * (mags - 31.4))
    err = sigma * flux
    return flux + rng.normal(size=flux.shape) * err, err, z, mag_i


def synthetic_seed(rng, n, ratio=0.5, depth=25.3, field="field000"):
    """One seed of a library fit: its truth (n galaxies on the synthetic colour track, positions, total
    magnitudes) and the measured table of its first 70 % (the photometry keeps `ratio` of the total flux in every
    band, with sky-limited noise: S/N 5 at magnitude `depth`; the true total fluxes as `true_flux_<b>`), as
    tasks/trainsets/photoz.py and the simulator give them."""
    bands = ["g", "r", "i", "z"]
    z = rng.uniform(0.05, 1.5, n)
    mag_i = rng.uniform(19.5, 23.5, n)
    mags = np.stack([mag_i + 1.2 * z + 0.3, mag_i + 0.6 * z, mag_i, mag_i - 0.4 * z], axis=1)
    x, y = rng.uniform(0, 2048, n), rng.uniform(0, 2048, n)
    truth = pd.DataFrame({"kind": "galaxy", "field": field, "x": x, "y": y, "z": z,
                          **{f"mag_{b}": mags[:, i] for i, b in enumerate(bands)}})
    m = int(0.7 * n)
    flux = ratio * 10 ** (-0.4 * (mags[:m] - 31.4))
    err = np.full(flux.shape, ratio * 10 ** (-0.4 * (depth - 31.4)) / 5)
    meas = flux + rng.normal(size=flux.shape) * err
    table = pd.DataFrame({"field": f"{field}@1", "x": x[:m] + rng.normal(0, 0.3, m), "y": y[:m], "z": z[:m],
                          "mag_true": mag_i[:m], **{f"flux_{b}": meas[:, i] for i, b in enumerate(bands)},
                          **{f"fluxerr_{b}": err[:, i] for i, b in enumerate(bands)},
                          **{f"true_flux_{b}": 10 ** (-0.4 * (mags[:m, i] - 31.4)) for i, b in enumerate(bands)}})
    return truth, table
