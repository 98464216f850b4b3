"""Surveys with other band sets than g, r, i, z run end to end with the default stages (issue: any survey's
bands): Legacy Surveys g, r, z; KiDS u, g, r, i; HSC g, r, i, z, y; a one-band image. Each learned stage runs
with the shipped weights of a band set the survey has, or is left out with its reason (missing_bands: skip);
the catalogs hold exactly the survey's bands."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.coordinates import SkyCoord

from deepfield.flows.run_config import RunConfig
from deepfield.tasks.ingest_config import StoreSpec
from deepfield.tasks.sim.config import SimConfig
from deepfield.tasks.sim.survey import simulate_survey

ALL_BANDS = ("u", "g", "r", "i", "z", "y")
# band set -> (the stages with models that run, with the weights variant they take; those left out) with the
# shipped weights: lens, merger and cluster have g,r,i,z and g,r,z weights, anomaly g,r,i, g,r,i,z and g,r,z, the detector
# any of g,r,i,z, the photo-z reference set any two of g,r,i,z (u,g,r,i and u,g,r,i,z,y: their own sets); the deblender (symmetric templates) any bands
CASES = {
    "grz": (["g", "r", "z"], {"detect": "", "deblend": "", "photoz": "", "lens": "grz", "merger": "grz",
                              "cluster": "grz", "anomaly": "grz"}, set()),
    "ugri": (["u", "g", "r", "i"], {"detect": "", "deblend": "", "photoz": "ugri", "anomaly": ""},
             {"lens", "merger", "cluster"}),
    "grizy": (["g", "r", "i", "z", "y"], {"detect": "", "deblend": "", "photoz": "", "lens": "", "merger": "",
                                          "cluster": "", "anomaly": "griz"}, set()),
    "r": (["r"], {"detect": "", "deblend": ""}, {"photoz", "lens", "merger", "cluster", "anomaly"}),
}
# a column each learned stage adds to the source catalog
ADDS = {"deblend": "flux_deblend_{b}", "lens": "lens_score", "merger": "merger_score", "anomaly": "anomaly_score", "detect": "blend_id",
        "photoz": "z_phot"}


@pytest.fixture(scope="module", params=list(CASES))
def survey_run(request, tmp_path_factory, prefect_harness, ray_session):
    from deepfield.flows.run import run_flow
    bands = CASES[request.param][0]
    out = tmp_path_factory.mktemp(f"bands-{request.param}")
    cfg = SimConfig(seed=31, size=768, fields=1, bands=bands,
                    population=dict(cluster_z=(0.3, 0.5), clusters_per_field=1.0, lenses_per_field=2,
                                   star_density_i24=6.0, star_count_slope=0.12))
    simulate_survey(cfg, out / "sim", workers=2)
    run = RunConfig(inputs=out / "sim" / "manifest.yaml", run_dir=out / "run", missing_bands="skip",
                    store_layout=StoreSpec(tile=512, chunk=128), halo=48)
    summary = run_flow(run)
    cat = pd.read_parquet(summary["merge"]["paths"]["parquet"])
    truth = pd.read_parquet(out / "sim" / "truth" / "objects.parquet")
    return request.param, summary, cat, truth


def test_the_stages_run_or_are_left_out_with_their_reason(survey_run):
    name, summary, cat, _ = survey_run
    bands, runs, skips = CASES[name]
    assert summary["failed_tiles"] == 0 and summary["process"]["done"] > 0
    skipped = summary["skipped_stages"]
    assert {line.split("'")[1] for line in skipped} == skips, skipped
    for line in skipped:  # the reason names the bands the stage needs and those the field lacks
        assert "skipped: needs bands" in line and "missing" in line and "has " + ", ".join(bands) in line, line
    for stage, variant in runs.items():
        assert summary["weights_variants"][stage] == variant, (stage, summary["weights_variants"])
        col = ADDS[stage].format(b="g" if "g" in bands else bands[-1]) if stage in ADDS else None
        if col:
            assert col in cat.columns, (stage, col)
    for stage in skips & set(ADDS):
        assert ADDS[stage].format(b="g" if "g" in bands else bands[-1]) not in cat.columns, stage
    if "cluster" in runs:
        assert "clusters" in summary["merge"]["paths"]


def test_the_catalog_holds_the_survey_bands(survey_run):
    name, _, cat, truth = survey_run
    bands = CASES[name][0]
    for b in ALL_BANDS:
        present = {c for c in (f"flux_auto_{b}", f"mag_auto_{b}", f"fluxerr_auto_{b}") if c in cat.columns}
        assert present == ({f"flux_auto_{b}", f"mag_auto_{b}", f"fluxerr_auto_{b}"} if b in bands else set()), (b, present)
    # and the bands are the right ones: bright isolated stars' magnitudes against the truth in every band
    ref = truth[f"mag_{'i' if 'i' in bands else bands[-1]}"]
    stars = truth[(truth.kind == "star") & (ref > 18.5) & (ref < 21.5) & (truth.n_blend == 1)
                  & truth.x.between(20, 747) & truth.y.between(20, 747)]
    t = SkyCoord(stars.ra.values, stars.dec.values, unit="deg")
    idx, sep, _ = t.match_to_catalog_sky(SkyCoord(cat.ra.values, cat.dec.values, unit="deg"))
    ok = sep.arcsec < 0.5
    assert ok.sum() >= 3, ok.sum()
    for b in bands:
        d = cat[f"mag_auto_{b}"].to_numpy(float)[idx[ok]] - stars[f"mag_{b}"].to_numpy(float)[ok]
        assert abs(np.nanmedian(d)) < 0.1, (b, np.nanmedian(d))


def test_detection_against_the_truth(survey_run):
    name, _, cat, truth = survey_run
    bands = CASES[name][0]
    ref = truth[f"mag_{'i' if 'i' in bands else bands[-1]}"]
    bright = truth[truth.kind.isin(["galaxy", "star"]) & (ref < 22.5) & (ref > 18.5)
                   & (truth.n_blend == 1) & truth.x.between(20, 747) & truth.y.between(20, 747)]
    t = SkyCoord(bright.ra.values, bright.dec.values, unit="deg")
    _, sep, _ = t.match_to_catalog_sky(SkyCoord(cat.ra.values, cat.dec.values, unit="deg"))
    # one band alone merges a few bright neighbours the colours would split (r: 27 of 29 found)
    assert np.mean(sep.arcsec < 1.0) >= 0.9, np.mean(sep.arcsec < 1.0)
