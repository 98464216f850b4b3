"""Training the photo-z reference sets (issue 23, `deepfield train photoz`): each seed's measured tables kept
apart by band set, the measured set's choice of k and magnitude weight carried by its weights, and the library
set of the truth's galaxies counting the noise once; on synthetic seeds with a known colour-redshift relation
(tests/_photoz_synthetic.py) and one small simulated field."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _photoz_synthetic import synthetic_reference, synthetic_seed


def test_training_tables_of_fields_in_other_bands_are_kept_apart(tmp_path):
    """`train photoz --bands`: the fields are simulated in those bands (they were once simulated in the default
    bands whatever was asked), their tables kept under seed<N>_<bands>, read back on a rerun, a table that
    lacks a band asked for is refused, naming the file, and one that other stage versions measured is measured
    again."""
    from deepfield.flows.evaluate.detection import detection_stages
    from deepfield.tasks.trainsets.photoz import seed_tables, stage_versions, table_path
    stages, halo = detection_stages()
    said: list[str] = []
    (t,) = seed_tables([7], 256, tmp_path, stages, halo, workers=1, kind="gaap", bands=["u", "g", "r"],
                       progress=said.append)
    assert {"flux_u", "flux_g", "flux_r"} <= set(t.columns) and "flux_i" not in t.columns and len(t) > 0
    path = table_path(tmp_path, 7, "gaap", ["u", "g", "r"])
    assert path.parent.name == "seed7_ugr" and path.exists()
    assert (path.parent / "sim" / "truth" / "objects.parquet").exists()
    said.clear()
    (again,) = seed_tables([7], 256, tmp_path, stages, halo, workers=1, kind="gaap", bands=["u", "g", "r"],
                           progress=said.append)
    assert any("measured before" in s for s in said) and again.equals(t)
    t.drop(columns=["flux_u"]).to_parquet(path)
    with pytest.raises(ValueError, match="seed7_ugr.*band"):
        seed_tables([7], 256, tmp_path, stages, halo, workers=1, kind="gaap", bands=["u", "g", "r"])
    # a table that an older measure stage made is measured again, not read back: its fluxes are of another kind
    assert set(t["stages"]) == {stage_versions(stages)} and "measure:" in stage_versions(stages)
    stale = t.assign(stages=stage_versions(stages).replace("measure:", "measure:old"), flux_u=-1.0)
    stale.to_parquet(path)
    said.clear()
    (fresh,) = seed_tables([7], 256, tmp_path, stages, halo, workers=1, kind="gaap", bands=["u", "g", "r"],
                           progress=said.append)
    assert any("measuring again" in s for s in said) and fresh.equals(t)


def test_training_chooses_k_and_the_magnitude_weight_and_the_weights_carry_them():
    """train photoz's fit on three synthetic seeds: the (k, magnitude weight) with the smallest leave-one-seed-out
    sigma_NMAD of its recorded grid is the one saved, each smaller band set's own weight likewise, and the
    reference set loaded from the record and state answers as the fitted estimator; a set saved before the
    weights were chosen keeps the weight it was fitted with (0.25)."""
    from deepfield.models.photoz import MAG_WEIGHT, PhotoZReference
    from deepfield.models.train_photoz import K_CHOICES, MAG_WEIGHTS, estimator, train
    rng = np.random.default_rng(23)
    bands = ["g", "r", "i", "z"]
    tables = []
    for _ in range(3):
        flux, err, z, mag = synthetic_reference(rng, 3000, sigma=0.08)
        tables.append(pd.DataFrame({**{f"flux_{b}": flux[:, i] for i, b in enumerate(bands)},
                                    **{f"fluxerr_{b}": err[:, i] for i, b in enumerate(bands)}, "z": z,
                                    "mag_true": mag}))
    record, state = train("test", tables, [1, 2, 3], flux="gaap")
    grid = record["model_selection"]["k_mag_weight_sigma_nmad_i_lt_24"]
    assert len(grid) == len(K_CHOICES) * len(MAG_WEIGHTS)
    arch = record["arch"]
    best = min(grid.values())
    assert round(grid[f"{arch['k']},{arch['mag_weight']}"], 4) == round(best, 4)
    ref = PhotoZReference(**arch)
    ref.load_state_dict(state)
    est = ref.estimator()
    assert est.mag_weight == arch["mag_weight"] and est.k == arch["k"]
    # every band set of two or three of the four bands has its own weight, the best of its own recorded grid
    per_set = record["model_selection"]["band_set_mag_weight_sigma_nmad_i_lt_24"]
    assert set(arch["mag_weights"]) == set(per_set) and len(per_set) == 10 and "grz" in per_set
    for key, got in per_set.items():
        assert round(got[str(arch["mag_weights"][key])], 4) == round(min(got.values()), 4)
        assert est.weight(list(key)) == arch["mag_weights"][key]
    assert est.weight(bands) == arch["mag_weight"]
    fitted = estimator(pd.concat(tables, ignore_index=True), bands, arch["k"], arch["spread"], arch["mag_weight"])
    fitted.mag_weights = dict(arch["mag_weights"])
    f, e = tables[0][[f"flux_{b}" for b in bands]].to_numpy(), tables[0][[f"fluxerr_{b}" for b in bands]].to_numpy()
    for use in (bands, ["g", "r", "z"]):
        cols = [bands.index(b) for b in use]
        np.testing.assert_allclose(est.predict(f[:300, cols], e[:300, cols], use)["z_phot"],
                                   fitted.predict(f[:300, cols], e[:300, cols], use)["z_phot"], rtol=1e-5)
    old = {k: v for k, v in arch.items() if k not in ("mag_weight", "mag_weights")}
    before = PhotoZReference(**old)
    assert before.mag_weight == MAG_WEIGHT == 0.25 and before.mag_weights == {}
    # the weight enters the features: the last column is it times the reference band's magnitude
    a, b = est.features(f[:5], bands), PhotoZReference(**{**arch, "mag_weight": 1.0, "mag_weights": {}})
    b.load_state_dict(state)
    np.testing.assert_allclose(b.estimator().features(f[:5], bands)[:, -1] * arch["mag_weight"], a[:, -1], rtol=1e-9)


def test_a_library_of_the_truths_galaxies_counts_the_noise_once():
    """train photoz --library on three synthetic seeds: the photometry's share of the total flux (0.5) is found
    from the bright matched galaxies; each seed's galaxies estimated from the other seeds' noiseless library come
    out with a smaller sigma_NMAD than from their measured neighbours (whose noise adds to the galaxy's own),
    with calibrated 68 % intervals; the reference set loaded from the record and state answers as fitted, two
    bands still give an estimate, and a library galaxy's own fluxes give its redshift back."""
    from deepfield.models.photoz import PhotoZReference
    from deepfield.models.train_photoz import train, train_library
    rng = np.random.default_rng(5)
    seeds = [synthetic_seed(rng, 4000, depth=24.0) for _ in range(3)]
    truths, tables = [s[0] for s in seeds], [s[1] for s in seeds]
    # no systematic floor (these colours have none) and candidates enough for the libraries' 8,000 galaxies on one
    # track; the shipped set's are chosen on the simulator's fields (models/cards/photoz_knn.md)
    record, state = train_library("test", tables, truths, [1, 2, 3], flux="gaap", sys_floor=0.0, candidates=2000)
    ratios = record["data"]["band_ratios"]
    assert all(abs(r - 0.5) < 0.01 for r in ratios.values()), ratios
    lib = record["model_selection"]["pooled"]["i_lt_24"]
    knn = train("test", tables, [1, 2, 3], flux="gaap")[0]["model_selection"]["cross_validation_i_lt_24"]
    assert lib["sigma_nmad"] < 0.9 * knn["sigma_nmad"], (lib, knn)  # 0.0141 against 0.0165 (seed 5)
    assert 0.62 < lib["coverage_68"] < 0.74, lib
    arch = record["arch"]
    assert arch["noiseless"] and record["data"]["library_galaxies"] == 12000
    ref = PhotoZReference(**arch)
    ref.load_state_dict(state)
    est = ref.estimator()
    bands = ["g", "r", "i", "z"]
    f, e = tables[0][[f"flux_{b}" for b in bands]].to_numpy(), tables[0][[f"fluxerr_{b}" for b in bands]].to_numpy()
    res = est.predict(f[:500], e[:500], bands)
    q = np.stack([res[c] for c in ("z_phot_q025", "z_phot_q16", "z_phot_q50", "z_phot_q84", "z_phot_q975")], 1)
    assert np.isfinite(q).all() and np.all(np.diff(q, axis=1) >= 0) and (res["z_phot"] == q[:, 2]).all()
    two = est.predict(f[:200, 1:3], e[:200, 1:3], ["r", "i"])
    assert np.isfinite(two["z_phot"]).all()
    own = est.predict(est.flux[::40], 0.01 * est.flux[::40], bands)["z_phot"]
    np.testing.assert_allclose(own, est.z[::40], atol=0.03)
    assert np.all(np.diff(est.z) >= 0)  # saved in redshift order: the quantiles take the candidates unsorted


def test_the_depth_floor_tells_a_photometry_at_its_noise_from_one_with_errors_of_its_own():
    """eval photoz's truth_floor: the reference set on the true fluxes (on the photometry's scale) with noise at the
    measured errors is what the depth allows. On synthetic seeds whose photometry is exactly the true flux x 0.5
    plus its stated noise, the floor finds the ratio 0.5 and the measured sigma_NMAD is the floor's (within 25 %);
    a photometry with 12 % errors of its own in every band (colours it does not state) is well above the floor,
    which does not change; without noise the floor is lower still."""
    from deepfield.flows.evaluate.photoz import truth_floor
    from deepfield.models.photoz_pdf import QUANTILE_COLUMNS, binned_figures
    from deepfield.models.train_photoz import library_estimator
    rng = np.random.default_rng(11)
    seeds = [synthetic_seed(rng, 4000, depth=24.0) for _ in range(3)]
    bands = ["g", "r", "i", "z"]
    soft = np.array([np.median(seeds[0][1][f"fluxerr_{b}"]) for b in bands])
    est = library_estimator([s[1] for s in seeds[:2]], [s[0] for s in seeds[:2]], bands, soft, sys_floor=0.0,
                            candidates=1000)
    matched = seeds[2][1]
    z, mag = matched.z.to_numpy(), matched.mag_true.to_numpy()

    def measured(m):
        res = est.predict(m[[f"flux_{b}" for b in bands]].to_numpy(), m[[f"fluxerr_{b}" for b in bands]].to_numpy(),
                          bands)
        return binned_figures(res["z_phot"], np.stack([res[c] for c in QUANTILE_COLUMNS], 1), z, mag)["i_lt_24"]

    floor = truth_floor(est, matched, z, mag)
    assert all(abs(r - 0.5) < 0.01 for r in floor["ratios"].values()), floor["ratios"]
    noise, none = floor["noise"]["i_lt_24"]["sigma_nmad"], floor["noiseless"]["i_lt_24"]["sigma_nmad"]
    at_depth = measured(matched)["sigma_nmad"]
    assert 0.8 < at_depth / noise < 1.25, (at_depth, noise)  # 0.0152 against 0.0150 (seed 11)
    worse = matched.assign(**{f"flux_{b}": matched[f"flux_{b}"] * (1 + 0.12 * rng.normal(size=len(matched)))
                              for b in bands})
    off = measured(worse)["sigma_nmad"]
    floor2 = truth_floor(est, worse, z, mag)
    assert off > 2 * noise, (off, noise)  # 0.077
    assert abs(floor2["noise"]["i_lt_24"]["sigma_nmad"] / noise - 1) < 0.1  # the floor is the depth's, not the errors'
    assert none < 0.5 * noise, (none, noise)  # 0.0016


def test_seeds_option_takes_ranges_and_single_seeds_in_the_given_order():
    """`--seeds` of `train photoz` and `train photoz-cnn`: ranges and seeds mixed, the last one (held out) where
    it was given; a malformed or repeated list is refused (typer.Exit, with the message)."""
    import typer

    from deepfield.flows.cli_photoz import _seeds
    assert _seeds("1001-1003,1007,1005-1006,1004") == [1001, 1002, 1003, 1007, 1005, 1006, 1004]
    assert _seeds("1001-1010") == list(range(1001, 1011)) and _seeds("7, 3") == [7, 3]
    for bad in ("1001-x", "1001", "1001-1003,1002", "5-3", ""):
        with pytest.raises(typer.Exit):
            _seeds(bad)


def test_eval_photoz_refuses_a_method_or_precision_the_stage_does_not_take():
    """`eval photoz --method/--precision`: a value outside the stage's own choices (PhotoZConfig's) is one line
    naming them, before any field is simulated (exit 2)."""
    from typer.testing import CliRunner

    from deepfield.flows.cli import app
    runner = CliRunner()
    for option, value, choices in (("--method", "forest", "knn, cnn, hybrid"),
                                   ("--precision", "float16", "auto, float32, bfloat16")):
        r = runner.invoke(app, ["eval", "photoz", option, value])
        assert r.exit_code == 2 and f"{option} '{value}': one of {choices}" in r.output, r.output
