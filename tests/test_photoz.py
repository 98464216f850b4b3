"""Photometric redshifts (issue 23): the p(z) summary, the neighbour estimator against a known colour-redshift
relation, the band checks and the weights' photometry before a run, the models the ledger records, and the stage
in the session's default run against the simulated truth: its galaxies, and the red-sequence members of its
clusters at known z. The CNN and method hybrid: tests/test_photoz_cnn.py; training the reference sets:
tests/test_photoz_training.py."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from _photoz_synthetic import synthetic_reference

from deepfield.models.photoz import PhotoZKNN
from deepfield.models.photoz_pdf import QUANTILES, Z_MAX, cdf, nmad_figures, pdf


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


def test_neighbours_recover_a_known_colour_redshift_relation_with_calibrated_intervals():
    from deepfield.models.photoz_pdf import fit_spread
    rng = np.random.default_rng(11)
    bands = ["g", "r", "i", "z"]
    flux, err, z, _ = synthetic_reference(rng, 20000)
    est = PhotoZKNN(bands, flux, z, np.median(err, axis=0), k=32)
    f2, e2, z2, _ = synthetic_reference(rng, 4000)
    zn = est.neighbours(f2[:2000], bands)  # the spread fitted on 2,000 held-out galaxies
    est.spread = fit_spread(lambda s: est.quantiles(zn, s), z2[:2000])
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


def test_no_pz_is_narrower_than_the_floor():
    """models/photoz_pdf.floored: a point mass at z = 0.5 (every quantile 0.5, as a library galaxy that takes all the
    weight gives) becomes a Gaussian of sigma 0.01 (1 + z): its 16-84 % half-width 0.015 x 0.9945 and 2.5-97.5 %
    0.015 x 1.96 (hand-computed); a broad row and a point mass at z = 0 (clipped at 0) keep their order; and a
    reference set of galaxies that all lie at one redshift gives every row that width, not 0."""
    from deepfield.models.photoz_pdf import WIDTH_FLOOR, floored
    q = np.array([[0.5] * 5, [0.2, 0.35, 0.5, 0.7, 0.9], [0.0] * 5])
    out = floored(q)
    assert WIDTH_FLOOR == 0.01
    np.testing.assert_allclose(out[0], 0.5 + 0.015 * np.array([-1.959964, -0.994458, 0, 0.994458, 1.959964]))
    np.testing.assert_array_equal(out[1], q[1])
    assert out[2, 2] == 0.0 and out[2, 0] == 0.0 and out[2, 4] == pytest.approx(0.01 * 1.959964)
    assert (np.diff(out, axis=1) >= 0).all()
    rng = np.random.default_rng(2)
    flux = np.exp(rng.normal(5, 0.3, (200, 4))) * np.array([0.5, 1.0, 1.5, 1.8])  # one SED, z = 0.7 for all
    est = PhotoZKNN(["g", "r", "i", "z"], flux, np.full(200, 0.7), np.full(4, 1.0), k=16)
    res = est.predict(flux[:20], np.ones((20, 4)), ["g", "r", "i", "z"])
    np.testing.assert_allclose(res["z_phot_err"], 0.017 * 0.994458, rtol=1e-6)


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
    _, _, cat = default_run
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


def test_the_gaussian_apertures_psf_index_of_the_default_runs_fields(default_run):
    """The measure stage measured each field's PSF index once and kept it in the run's shared directory
    (cache/measure/<field>/psf_beta.*.json), the same as measuring the store again gives; a field with enough
    stars has one index for its bands, the simulator's 3.5 within 0.3 (3.45 and 3.65 measured on these 1024^2
    fields, 10-20 stars per band), a field without has none (the stage's 3.5 then)."""
    import json

    import zarr

    from deepfield.tasks.stages._pixels import band_fwhm_pixels
    from deepfield.tasks.stages._psf_shape import field_betas
    from deepfield.tasks.zarr_read import read_tile
    from deepfield.tasks.tiling import TileId
    cfg, _, _ = default_run
    root = zarr.open_group(str(cfg.store_path), mode="r", use_consolidated=False)
    for name in root["fields"].group_keys():
        kept = list((cfg.run_dir / "cache" / "measure" / name).glob("psf_beta.*.json"))
        assert len(kept) == 1, kept
        got = json.loads(kept[0].read_text())
        tile = read_tile(root, TileId(name, 0, 0), 0)
        assert got == field_betas(tile.group, tile.bands, band_fwhm_pixels(tile))
        assert len(got) == len(tile.bands)
        assert all(b is None for b in got) or (len(set(got)) == 1 and abs(got[0] - 3.5) < 0.3), got


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


def test_the_method_chooses_the_model_the_ledger_and_band_checks_follow(tmp_path):
    """model_versions (what a tile's ledger record must match) names the method's models (hybrid, the default:
    the reference set and the CNN), with a `weights` file applying to the first; the band check before a run
    reads the method's weights."""
    import shutil

    from deepfield.models.registry import entry, model_version, weights_version
    from deepfield.tasks.provenance import model_versions
    from deepfield.tasks.stages.registry import make_stage
    assert model_versions([("photoz", {})]) == {"photoz_knn": model_version("photoz_knn"),
                                                "photoz_cnn": model_version("photoz_cnn")}
    assert model_versions([("photoz", {"method": "knn"})]) == {"photoz_knn": model_version("photoz_knn")}
    assert model_versions([("photoz", {"method": "cnn"})]) == {"photoz_cnn": model_version("photoz_cnn")}
    copy = tmp_path / "cnn.pt"
    shutil.copy(entry("photoz_cnn").weights, copy)
    shutil.copy(entry("photoz_cnn").weights.with_suffix(".train.json"), copy.with_suffix(".train.json"))
    v = model_versions([("photoz", {"method": "cnn", "weights": str(copy)})])
    assert list(v) == ["photoz_cnn"] and v["photoz_cnn"].startswith("file:")
    # hybrid's CNN from cnn_weights: its file's content is in the keys (a file changed in place redoes the tiles)
    v = model_versions([("photoz", {"cnn_weights": str(copy)})])
    assert v == {"photoz_knn": model_version("photoz_knn"), "photoz_cnn": "file:" + weights_version(copy)}
    with open(copy, "ab") as fh:
        fh.write(b"\0")
    assert model_versions([("photoz", {"cnn_weights": str(copy)})])["photoz_cnn"] != v["photoz_cnn"]
    stage = make_stage("photoz", method="cnn")
    assert stage.model_bands() == ["g", "r", "i", "z"]
    assert stage.band_problem(["g", "r"]) is None and "CNN" in stage.band_problem(["g", "y"])


def test_a_flux_other_than_the_weights_is_refused_when_the_configuration_is_read(tmp_path):
    """`flux: auto` against weights made with other fluxes (the shipped reference set and CNN: Gaussian
    apertures) is a one-line configuration error naming both, raised by the run configuration's
    validation (before any actor starts), for either method; without `flux` the stage takes the weights'."""
    from deepfield.tasks.stages.base import StageConfigError
    from deepfield.tasks.stages.registry import make_stage
    for method, trained in (("knn", "gaap"), ("cnn", "gaap"), ("hybrid", "gaap")):
        with pytest.raises(StageConfigError) as exc:
            make_stage("photoz", method=method, flux="auto")
        assert "flux 'auto'" in str(exc.value) and f"'{trained}'" in str(exc.value) and method in str(exc.value)
        stage = make_stage("photoz", method=method)
        assert stage.flux is None
        stage.setup("cpu")
        assert stage.flux == trained
        assert make_stage("photoz", method=method, flux=trained).flux == trained


def test_weights_made_on_another_measure_stages_photometry_are_refused_before_the_run(tmp_path):
    """The shipped photo-z weights record what their Gaussian-aperture fluxes depend on (the measure stage's
    photometry version and the aperture's width, gaap_sigma_psf), and it is the default measure stage's; a run
    configuration whose measure stage would measure those fluxes otherwise is refused when it is read, naming the
    key and both values, for either method and for a band-set variant that resolve_bands chooses; measure settings
    the weights do not depend on (other apertures, further Gaussian apertures, the PSF's Moffat index, which
    describes the survey) pass."""
    import yaml

    from deepfield.flows.run_config import RunConfigError, load_run_config
    from deepfield.models.registry import training_record, variant_weights
    from deepfield.tasks.stages.base import StageConfigError
    from deepfield.tasks.stages.photoz import photometry_settings
    from deepfield.tasks.stages.registry import resolve_bands
    default = photometry_settings("gaap", {})
    assert default == {"photometry_version": "3", "gaap_sigma_psf": 1.5}
    for model, tag in (("photoz_knn", None), ("photoz_knn", "ugri"), ("photoz_knn", "ugrizy"), ("photoz_cnn", None)):
        rec = training_record(model, variant_weights(model, tag) if tag else None)
        assert rec["photometry"] == default, (model, tag)

    def config(measure: dict, photoz: dict):
        stages = [{"name": n} for n in ("background", "detect")] + [{"name": "measure", "params": measure},
                                                                     {"name": "photoz", "params": photoz}]
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({"inputs": "manifest.yaml", "run_dir": "run", "stages": stages}))
        return load_run_config(path)
    for method in ("knn", "cnn", "hybrid"):
        with pytest.raises(RunConfigError) as exc:
            config({"gaap_sigma_psf": [2.0, 3.0]}, {"method": method})
        text = str(exc.value)
        assert "run.yaml" in text and "stage 'photoz'" in text and "gaap_sigma_psf 2.0 (weights: 1.5)" in text \
            and f"{method} weights" in text
        cfg = config({"radii_fwhm": [2.0], "gaap_sigma_psf": [1.5, 3.0], "gaap_psf_beta": 2.5}, {"method": method})
        assert dict(cfg.stage_list())["measure"]["gaap_sigma_psf"] == [1.5, 3.0]
    stages = [("background", {}), ("detect", {}), ("measure", {"gaap_sigma_psf": [1.2]}), ("photoz", {})]
    with pytest.raises(StageConfigError, match=r"photoz_knn.ugrizy.pt\).*gaap_sigma_psf 1.2 \(weights: 1.5\)"):
        resolve_bands(stages, {"a": list("ugrizy")})
    kept, _ = resolve_bands([("background", {}), ("detect", {}), ("measure", {}), ("photoz", {})], {"a": list("ugrizy")})
    assert dict(kept)["photoz"]["variant"] == "ugrizy"


def test_a_survey_with_all_of_a_band_set_variants_bands_gets_that_reference_set():
    """The band-set variants of the reference set (photoz_knn.<bands>.pt) are measured with all of their bands,
    so a run gets one only where every field has all of them (the most bands first); any other survey with two
    of g, r, i, z gets the main set, a u or y band then left unused."""
    from deepfield.models.registry import variants
    from deepfield.tasks.stages.registry import BandError, make_stage, resolve_bands
    shipped = variants("photoz_knn")
    assert shipped[""] == ["g", "r", "i", "z"] and shipped["ugrizy"] == list("ugrizy") and shipped["ugri"] == list("ugri")

    def chosen(fields):
        stages = [("background", {}), ("detect", {}), ("measure", {}), ("photoz", {})]
        return dict(resolve_bands(stages, fields)[0])["photoz"].get("variant", "")
    assert chosen({"a": list("ugrizy")}) == "ugrizy"
    assert chosen({"a": list("ugri")}) == "ugri"
    assert chosen({"a": list("ugri"), "b": list("ugrizy")}) == "ugri"  # every field must have the variant's bands
    assert chosen({"a": list("grizy")}) == ""  # HSC: the main set, y unused
    assert chosen({"a": list("griz")}) == "" and chosen({"a": list("grz")}) == ""
    with pytest.raises(BandError, match="at least two"):  # no variant fits, and the main set shares g alone
        chosen({"a": ["u", "g"]})
    assert "variant 'ugri'" in make_stage("photoz", variant="ugri").band_problem(list("griz"))
    stage = make_stage("photoz", variant="ugrizy")
    stage.setup("cpu")
    assert stage.estimator.bands == list("ugrizy") and len(stage.estimator.z) > 10000
