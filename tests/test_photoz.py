"""Photometric redshifts (issue 23): the p(z) summary, the neighbour estimator against a known colour-redshift
relation, the band checks before a run, and the stage with the shipped reference set in the session's default
run against the simulated truth: its galaxies, and the red-sequence members of its clusters at known z."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepfield.models.photoz import QUANTILES, Z_MAX, PhotoZKNN, cdf, nmad_figures, pdf


def random_quantiles(rng, n):
    q = np.sort(rng.uniform(0, Z_MAX, (n, len(QUANTILES))), axis=1)
    q[: n // 4, :2] = 0.0  # clipped at z = 0
    q[n // 4: n // 2, 1:4] = q[n // 4: n // 2, [2]]  # coinciding quantiles: a narrow peak
    q[-3:, -1] = Z_MAX
    return q


def test_pz_integrates_to_one_and_its_cdf_gives_the_quantile_levels():
    rng = np.random.default_rng(4)
    q = random_quantiles(rng, 200)
    grid = np.linspace(0.0, Z_MAX, 801)
    p = pdf(q, grid)
    width = np.diff(np.concatenate([[grid[0] - 0.0025], 0.5 * (grid[1:] + grid[:-1]), [grid[-1] + 0.0025]]))
    assert np.all(p >= 0)
    np.testing.assert_allclose((p * width).sum(axis=1), 1.0, atol=1e-9)
    distinct = np.all(np.diff(q, axis=1) > 0, axis=1) & (q[:, 0] > 0) & (q[:, -1] < Z_MAX)
    assert distinct.sum() > 50
    for k, level in enumerate(QUANTILES):  # at a quantile, the CDF is its level (where the quantiles differ)
        np.testing.assert_allclose(cdf(q[distinct], q[distinct, k]), level, atol=1e-12)
    # mass at z = 0: the highest level whose quantile is 0 (the estimate clipped there), else none
    at_zero = np.array([max([lv for lv, v in zip(QUANTILES, row) if v == 0.0], default=0.0) for row in q])
    np.testing.assert_allclose(cdf(q, np.zeros(len(q))), at_zero, atol=1e-12)
    assert np.all(cdf(q, np.full(len(q), Z_MAX)) == 1.0)


def synthetic_reference(rng, n, sigma=0.03):
    """Galaxies whose g-r and r-i colours are known functions of z (a smooth, non-degenerate track), with
    Gaussian flux noise of `sigma` (fractional) in every band."""
    z = rng.uniform(0.05, 1.5, n)
    mag_i = rng.uniform(20, 23, n)
    mags = np.stack([mag_i + 1.2 * z + 0.3, mag_i + 0.6 * z, mag_i, mag_i - 0.4 * z], axis=1)  # g r i z
    flux = 10 ** (-0.4 * (mags - 31.4))
    err = sigma * flux
    return flux + rng.normal(size=flux.shape) * err, err, z, mag_i


def test_neighbours_recover_a_known_colour_redshift_relation_with_calibrated_intervals():
    from deepfield.models.train_photoz import fit_spread
    rng = np.random.default_rng(11)
    bands = ["g", "r", "i", "z"]
    flux, err, z, _ = synthetic_reference(rng, 20000)
    est = PhotoZKNN(bands, flux, z, np.median(err, axis=0), k=32)
    f2, e2, z2, m2 = synthetic_reference(rng, 4000)
    held = pd.DataFrame({**{f"flux_{b}": f2[:, i] for i, b in enumerate(bands)},
                         **{f"fluxerr_{b}": e2[:, i] for i, b in enumerate(bands)}, "z": z2, "mag_true": m2})
    est.spread = fit_spread(est, held.iloc[:2000], bands)
    res = est.predict(f2[2000:], e2[2000:], bands)
    f = nmad_figures(res["z_phot"], z2[2000:])
    # the colours move 1.8 mag over the z range with ~0.04 mag noise per colour: a few hundredths in z
    assert f["sigma_nmad"] < 0.04 and f["outliers"] < 0.02 and abs(f["bias"]) < 0.01, f
    inside = (z2[2000:] >= res["z_phot_q16"]) & (z2[2000:] <= res["z_phot_q84"])
    assert 0.62 < inside.mean() < 0.74, inside.mean()  # fitted on other galaxies of the same population
    # two bands still give an estimate; one band none, flagged; a missing band falls back to the others
    two = est.predict(f2[2000:2100, 1:3], e2[2000:2100, 1:3], ["r", "i"])
    assert np.isfinite(two["z_phot"]).all() and (two["z_phot_flag"] & 8 == 0).all()
    one = est.predict(f2[:5, 2:3], e2[:5, 2:3], ["i"])
    assert np.isnan(one["z_phot"]).all() and (one["z_phot_flag"] & 8 == 8).all()
    holes = f2[2000:2100].copy()
    holes[:, 3] = np.nan
    part = est.predict(holes, e2[2000:2100], bands)
    assert (part["z_phot_flag"] & 4 == 4).all() and np.isfinite(part["z_phot"]).all()


def test_a_band_set_without_two_reference_bands_is_reported_before_the_run():
    from deepfield.tasks.stages.registry import BandError, resolve_bands
    stages = [("background", {}), ("detect", {}), ("measure", {}), ("photoz", {})]
    kept, skipped = resolve_bands(stages, {"a": ["g", "r", "z"], "b": ["u", "g", "r", "i"]}, "error")
    assert [n for n, _ in kept][-1] == "photoz" and not skipped
    with pytest.raises(BandError) as exc:
        resolve_bands(stages, {"a": ["g", "r", "i", "z"], "b": ["r", "y"]}, "error")
    line = str(exc.value)
    assert "photoz" in line and "field 'b' has r, y" in line and "at least two" in line, line
    kept, skipped = resolve_bands(stages, {"b": ["r"]}, "skip")
    assert "photoz" not in [n for n, _ in kept] and any("stage 'photoz' skipped" in x for x in skipped)


def test_the_stage_in_the_default_run_against_the_truth(default_run, survey):
    """The default run's catalog carries the photo-z columns with their declared units; its galaxies brighter
    than i = 23 matched to the truth have redshifts within the colour baseline's accuracy."""
    from astropy.coordinates import SkyCoord

    from deepfield.catalogs.schema import describe
    _, summary, cat = default_run
    cols = ["z_phot", "z_phot_err", "z_phot_q025", "z_phot_q16", "z_phot_q50", "z_phot_q84", "z_phot_q975",
            "z_phot_flag"]
    for c in cols:
        assert c in cat.columns and describe(c, "sources") is not None, c
    q = cat[cols[2:7]].to_numpy(float)
    ok = np.isfinite(q).all(axis=1)
    assert ok.mean() > 0.95 and np.all(np.diff(q[ok], axis=1) >= 0)
    truth = pd.read_parquet(survey / "truth" / "objects.parquet")
    gal = truth[truth.kind.isin(["galaxy", "bcg"]) & (truth.mag_i < 23) & (truth.n_blend == 1)]
    idx, sep, _ = SkyCoord(gal.ra.values, gal.dec.values, unit="deg").match_to_catalog_sky(
        SkyCoord(cat.ra.values, cat.dec.values, unit="deg"))
    m = sep.arcsec < 0.5
    assert m.sum() > 100, m.sum()
    f = nmad_figures(cat.z_phot.to_numpy(float)[idx[m]], gal.z.to_numpy(float)[m])
    assert f["sigma_nmad"] < 0.12 and f["outliers"] < 0.25 and abs(f["bias"]) < 0.05, f


def test_red_sequence_members_of_the_default_run_clusters_are_at_their_cluster_redshift(default_run, survey):
    """The simulated clusters (z 0.3-0.6) have red-sequence members (the E template at the cluster's z): each bright
    member (i < 22) the run measured gets z_phot from the shipped reference set within 0.05 (1 + z), but for a
    few (blends with other members)."""
    from astropy.coordinates import SkyCoord
    _, _, cat = default_run
    truth = pd.read_parquet(survey / "truth" / "objects.parquet")
    members = truth[(truth.cluster_id >= 0) & (truth.sed == "E") & (truth.mag_i < 22)]
    idx, sep, _ = SkyCoord(members.ra.values, members.dec.values, unit="deg").match_to_catalog_sky(
        SkyCoord(cat.ra.values, cat.dec.values, unit="deg"))
    m = sep.arcsec < 0.5
    assert m.sum() >= 10, m.sum()
    z = members.z.to_numpy(float)[m]
    dz = np.abs(cat.z_phot.to_numpy(float)[idx[m]] - z) / (1 + z)
    assert np.mean(dz < 0.05) >= 0.8 and np.median(dz) < 0.03, (np.round(dz, 3), z)
