"""The end-to-end run on the session's simulated two-field survey (4 tiles per field): detection
against the truth catalog, no duplicates across tile and field boundaries, re-run no-op, an actor
killed mid-tile, a tile that keeps failing, and the merged catalog opened with lsdb."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from astropy.coordinates import SkyCoord

from deepfield.flows.run_config import RunConfig
from deepfield.tasks.ingest_config import StoreSpec
from deepfield.tasks.ledger import summarise
from _stages import CLASSICAL_STAGES


def make_cfg(survey, run_dir) -> RunConfig:
    return RunConfig(inputs=survey / "manifest.yaml", run_dir=run_dir,
                     store_layout=StoreSpec(tile=512, chunk=128), halo=48)


@pytest.fixture(scope="module")
def run(default_run):
    """The session's default run (tests/conftest.py; make_cfg's configuration)."""
    return default_run


@pytest.fixture(scope="module")
def truth(survey):
    return pd.read_parquet(survey / "truth" / "objects.parquet")


def match(truth_rows: pd.DataFrame, cat: pd.DataFrame, radius_arcsec: float):
    """For each truth row: number of catalog sources within radius, nearest index and separation."""
    t = SkyCoord(truth_rows.ra.values, truth_rows.dec.values, unit="deg")
    c = SkyCoord(cat.ra.values, cat.dec.values, unit="deg")
    idx, sep, _ = t.match_to_catalog_sky(c)
    ti, ci, _, _ = c.search_around_sky(t, radius_arcsec / 3600 * __import__("astropy.units", fromlist=["deg"]).deg)
    counts = np.bincount(ti, minlength=len(truth_rows))
    return counts, idx, sep.arcsec


def test_every_tile_processed(run):
    cfg, summary, _ = run
    assert summary["process"]["tiles"] == 8  # 2 fields x 4 tiles of 512 px
    assert summary["process"]["failed"] == 0
    assert summarise(cfg.run_dir)["status"] == {"done": 8}


def test_no_duplicates_across_tile_and_field_boundaries(run, truth):
    _, _, cat = run
    stars = truth[truth.is_primary & (truth.kind == "star") & (truth.mag_i < 22)
                  & (truth.mag_i > 17.5)]  # saturated stars are masked and may split
    counts, _, _ = match(stars, cat, 1.0)
    assert len(stars) >= 10
    assert np.all(counts == 1), stars[counts != 1][["id", "field", "x", "y", "mag_i"]]
    assert cat.source_id.is_unique


def test_completeness_of_isolated_sources(run, truth):
    _, _, cat = run
    iso = truth[truth.is_primary & truth.kind.isin(["galaxy", "star"]) & (truth.mag_i < 23)
                & (truth.n_blend == 1) & (truth.mag_i > 17.5)]
    counts, _, _ = match(iso, cat, 1.0)
    completeness = np.mean(counts >= 1)
    assert completeness >= 0.95, completeness


def test_astrometry_and_photometry_of_bright_stars(run, truth):
    _, _, cat = run
    inside = truth.x.between(10, 1013) & truth.y.between(10, 1013)  # PSF not cut by the field edge
    stars = truth[truth.is_primary & (truth.kind == "star") & (truth.mag_i < 21) & (truth.mag_i > 18.5)
                  & (truth.n_blend == 1) & (truth.blendedness < 0.01) & inside]
    # isolated: no other simulated object brighter than i = 25.5 within 4"
    others = truth[(truth.mag_i < 25.5)]
    near, _, _ = match(stars, others, 4.0)
    stars = stars[near == 1]  # the star itself
    _, idx, sep = match(stars, cat, 1.0)
    assert len(stars) >= 5
    assert np.all(sep < 0.05), sep
    clean = ~(cat.flag_masked | cat.flag_saturated | cat.flag_edge).to_numpy()[idx]  # isolated and unmasked
    assert clean.sum() >= 5
    idx, stars = idx[clean], stars[clean]
    for b in ("g", "r", "i", "z"):
        bright = (stars[f"mag_{b}"] < 21.5).to_numpy()  # bright in this band too (M dwarfs are faint in g)
        assert bright.sum() >= 3, b
        flux = cat[f"flux_auto_{b}"].to_numpy()[idx][bright]  # nJy
        ratio = flux / 10 ** (-0.4 * (stars[f"mag_{b}"].to_numpy()[bright] - 31.4))  # the truth's AB mag in nJy
        assert np.all(np.abs(ratio - 1) < 0.05), (b, ratio)


def test_rerun_is_a_no_op(run, survey):
    from deepfield.flows.run import run_flow
    cfg, first, cat = run
    again = run_flow(cfg)
    assert again["process"]["done"] == 0 and again["process"]["skipped"] == 8
    assert {r["status"] for r in again["ingest"]} == {"skipped"}
    # nothing changed: the published catalogs are those of the same tables, and stay as they are
    assert again["merge"]["up_to_date"] and again["merge"]["paths"] == first["merge"]["paths"]
    cat2 = pd.read_parquet(again["merge"]["paths"]["parquet"])
    assert sorted(cat2.source_id) == sorted(cat.source_id)


def test_lsdb_opens_and_crossmatches(run, truth):
    import lsdb
    from deepfield.catalogs.merge import open_catalog
    _, summary, cat = run
    catalog = open_catalog(summary["merge"]["paths"]["hats"])
    t = truth[truth.is_primary & (truth.mag_i < 22)][["id", "ra", "dec", "mag_i"]]
    truth_cat = lsdb.from_dataframe(t, ra_column="ra", dec_column="dec")
    xm = truth_cat.crossmatch(catalog, radius_arcsec=1.0, n_neighbors=1).compute()
    assert len(xm) >= 0.9 * len(t)
    assert len(catalog.compute()) == len(cat)


def test_deblend_stage_ran_in_the_run(run):
    """Blended sources went through the deblender (symmetric templates, the default), isolated ones passed
    through unchanged. With the learned detector 0.96 of the blended rows are deblended (the rest are near
    the edge of the tile arrays and keep their Kron fluxes); a member whose light all went to brighter ones has
    blendedness 1."""
    _, _, cat = run
    blended = cat.n_blend >= 2
    assert blended.sum() > 10
    assert set(cat.deblend_method[blended]) <= {"symmetric", "auto_fallback"}
    assert (cat.deblend_method[blended] == "symmetric").mean() > 0.9
    assert (cat.deblend_method[~blended] == "isolated").all()
    iso = cat[~blended]
    assert np.allclose(iso.flux_deblend_i, iso.flux_auto_i, equal_nan=True)
    deb = cat[cat.deblend_method == "symmetric"]
    assert deb.blendedness.between(0, 1).all()
    # the members of a blend share its light: their deblended fluxes are positive for real members
    assert (deb.flux_deblend_i > 0).mean() > 0.9


def test_lens_candidate_table_holds_the_visible_lenses(run, survey):
    """Every simulated lens whose arcs are clearly visible (matched-filter S/N > 20 in some band) and
    whose deflector the field owns is in the lens-candidate table, within 1 arcsec."""
    _, summary, cat = run
    lenses = pd.read_parquet(survey / "truth" / "lenses.parquet")
    snr = lenses.filter(like="arc_snr_").max(axis=1)
    visible = lenses[(snr > 20) & lenses.is_primary]
    assert len(visible) >= 3
    cand = pd.read_parquet(summary["merge"]["paths"]["lens_candidates"])
    assert list(cand.lens_rank) == list(range(1, len(cand) + 1))
    assert (np.diff(cand.lens_score.to_numpy()) <= 0).all() and (cand.lens_score > 0.5).all()
    counts, _, _ = match(visible, cand, 1.0)
    assert (counts >= 1).all(), visible.assign(found=counts)[["lens_id", "theta_e", "mag_defl_i", "found"]]
    scored = cat[cat.lens_candidate]
    assert len(scored) > len(cand)  # the cuts leave more candidates than the CNN keeps
    assert cat.loc[~cat.lens_candidate, "lens_score"].isna().all()


def test_status_command_summarises_the_ledger(run):
    from typer.testing import CliRunner

    from deepfield.flows.cli import app
    cfg, _, _ = run
    r = CliRunner().invoke(app, ["status", str(cfg.run_dir)])
    assert r.exit_code == 0, r.output
    assert "tiles: 8" in r.output and "done: 8" in r.output
    r = CliRunner().invoke(app, ["status", str(cfg.run_dir / "nowhere")])
    assert r.exit_code == 2 and "not a run directory" in " ".join(r.output.split())  # rich wraps lines


def test_bad_run_configuration_names_the_file(tmp_path):
    from typer.testing import CliRunner

    from deepfield.flows.cli import app
    bad = tmp_path / "survey.yaml"
    bad.write_text("inputs: x.yaml\nrun_dir: r\nstages: [{name: sharpen}]\n")
    r = CliRunner().invoke(app, ["run", str(bad)])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "survey.yaml" in out and "unknown stage" in out


def test_changed_input_redoes_that_field_and_the_tiles_that_read_it(survey, tmp_path, prefect_harness, ray_session):
    """A changed input re-ingests its field alone; its tiles are redone, and so are the other field's: the
    default stages include the cluster stage, which reads the overlapping field's pixels within 128" of its own
    (with the classical stages alone only the changed field's tiles are redone: tests/test_slurm.py). The
    classical stages and the cluster stage: the other learned stages read their own tile alone."""
    from astropy.io import fits

    from deepfield.flows.run import run_flow
    copy = tmp_path / "sim"
    shutil.copytree(survey, copy)
    stages = [*CLASSICAL_STAGES, {"name": "cluster"}]
    cfg = RunConfig.model_validate(dict(make_cfg(copy, tmp_path / "run").model_dump(), stages=stages))
    first = run_flow(cfg)
    assert first["process"]["done"] == 8
    with fits.open(copy / "fields" / "field001" / "field001-i-image.fits", mode="update") as hdul:
        hdul[0].data[100, 100] += 50.0
    second = run_flow(cfg)
    assert {r["field"]: r["status"] for r in second["ingest"]} == {"field000": "skipped", "field001": "ingested"}
    assert second["process"]["done"] == 8 and second["process"]["skipped"] == 0
    third = run_flow(cfg)  # nothing changed since: everything is reused
    assert third["process"]["done"] == 0 and third["process"]["skipped"] == 8


def test_anomaly_scores_and_ranked_list(run, survey):
    """The anomaly stage scored the selected sources and its grid of windows in the run; the merge's
    anomaly_sigma is the score in units of the run's spread; the candidate list is ranked by sigma-score, each
    candidate once, its stamps agree with it; the simulator's satellite trails are found as one candidate each;
    and the sources on the simulator's lenses, ring galaxies and mergers score above the normal ones (AUROC
    against the truth)."""
    from astropy.io import fits
    from sklearn.metrics import roc_auc_score

    from deepfield.tasks.trainsets.anomaly import anomaly_geometry, label_sources
    cfg, summary, cat = run
    sel = cat[cat.anomaly_selected]
    assert len(sel) > 200 and sel.anomaly_score.notna().all() and sel.anomaly_score_paper.notna().all()
    assert cat.loc[~cat.anomaly_selected, ["anomaly_score", "anomaly_sigma"]].isna().all().all()
    st = summary["merge"]["anomaly_score_stats"]
    np.testing.assert_allclose(sel.anomaly_sigma, (sel.anomaly_score - st["mean"]) / st["std"], rtol=1e-4, atol=1e-4)
    maps = sorted((cfg.run_dir / "tiles").glob("*/*.anomaly_map.parquet"))
    assert len(maps) == 8
    windows = pd.concat([pd.read_parquet(f) for f in maps], ignore_index=True)
    assert not windows.duplicated(["field", "ky", "kx"]).any() and windows.score.notna().all()
    paths = summary["merge"]["paths"]
    top = pd.read_parquet(paths["anomalies"])
    cut = 5.0
    assert 0 < len(top) <= 100 and list(top.anomaly_rank) == list(range(1, len(top) + 1))
    assert (np.diff(top.anomaly_sigma) <= 0).all() and (top.anomaly_sigma >= cut).all()
    assert set(top["shape"]) <= {"ring", "lens", "merger", "point", "linear", "extended"}
    with fits.open(paths["anomaly_stamps"]) as hdul:  # one HDU (band, y, x) with WCS each: catalogs/cutouts.py
        stamps = [hdul[f"ANOMALY_{k}"] for k in top.anomaly_rank]
        assert len(hdul) == len(top) + 2 and all(h.data.shape == (4, 64, 64) for h in stamps)
        assert all([h.header[f"BAND{j + 1}"] for j in range(4)] == ["g", "r", "i", "z"] for h in stamps)
        assert list(hdul["ROWS"].data["anomaly_rank"]) == list(top.anomaly_rank)
        assert np.isfinite(np.stack([h.data for h in stamps])).mean() > 0.9  # NaN only beyond the field's edges
    anomalies = pd.read_parquet(survey / "truth" / "anomalies.parquet")
    lenses = pd.read_parquet(survey / "truth" / "lenses.parquet")
    from deepfield.models.registry import variants
    bands = variants("anomaly_wgan")[summary["weights_variants"].get("anomaly", "")]  # the weights the run chose
    assert bands == ["g", "r", "i", "z"]  # this g, r, i, z survey gets the griz weights: z artefacts are scored
    trails = anomalies[(anomalies.type == "satellite_trail") & anomalies.band.isin(bands)]
    for f, tr in trails.groupby("field"):  # each trail: one candidate on it, whatever tiles it crosses
        on = top[top.field == f]
        for _, kind, d, hit, _ in anomaly_geometry(on.x.to_numpy(float), on.y.to_numpy(float), tr,
                                                   lenses.iloc[:0], 32, bands, 4.0):
            assert hit.sum() == 1, (kind, on[hit])
    # a candidate ranked by the ring term lies inside one of the simulator's ring galaxies
    rings = anomalies[anomalies.type == "ring_galaxy"]
    for _, c in top[top["shape"] == "ring"].iterrows():
        r = rings[rings.field == c.field]
        radius = np.array([json.loads(p)["ring_radius"] for p in r.params]) / 0.2  # arcsec -> px of 0.2"
        assert (np.hypot(r.x - c.x, r.y - c.y) <= radius).any(), c
    # a candidate ranked by the lens term is one of the lens stage's candidates, placed on it; and each of the
    # simulator's lenses that the lens stage found (a source of lens_score >= 0.5 within 4 px of its deflector) is
    # listed there, at least as high as its lens term (6 of 6 lenses in this survey)
    from deepfield.catalogs.score_terms import LENS_MIN_SCORE, lens_sigma
    on_lens = top[top["shape"] == "lens"]
    for _, c in on_lens.iterrows():
        src = cat[cat.source_id == c.source_id]
        assert len(src) == 1 and src.lens_score.iloc[0] >= LENS_MIN_SCORE, c
        assert abs(src.x.iloc[0] - c.x) < 1e-6 and abs(src.y.iloc[0] - c.y) < 1e-6
    found = 0
    for _, t in lenses.iterrows():
        src = cat[(cat.field == t.field) & (np.hypot(cat.x - t.x, cat.y - t.y) <= 4)
                  & (cat.lens_score >= LENS_MIN_SCORE)]
        if len(src):
            found += 1
            # within the Einstein radius and 1": a detected piece of the arc passes the deflector cuts too
            near = top[(top.field == t.field) & (np.hypot(top.x - t.x, top.y - t.y) <= t.theta_e / 0.2 + 5)]
            assert len(near) and near.anomaly_sigma.max() >= lens_sigma(src.lens_score.to_numpy()).max() - 1e-6, t
    assert found >= 1
    # a candidate ranked by the merger term is one of the merger stage's candidates, placed on it
    from deepfield.catalogs.score_terms import MERGER_MIN_SCORE
    assert (cat.merger_score.notna() == cat.merger_candidate).all() and cat.merger_candidate.any()
    for _, c in top[top["shape"] == "merger"].iterrows():
        src = cat[cat.source_id == c.source_id]
        assert len(src) == 1 and src.merger_score.iloc[0] >= MERGER_MIN_SCORE, c
        assert abs(src.x.iloc[0] - c.x) < 1e-6 and abs(src.y.iloc[0] - c.y) < 1e-6
    labels = np.concatenate([label_sources(g, anomalies[anomalies.field == f], lenses[lenses.field == f], 32,
                                           bands) for f, g in sel.groupby("field")])
    # the simulator's astrophysical anomalies (lenses, ring galaxies, mergers) against the normal sources: the
    # paper's sum over the stamp ranks morphology best; the local score (dominated by the worst pixel, made for
    # artefacts) less well. With the g, r, i weights: 0.74 and 0.71 on these two fields; with the griz weights
    # (2026-12-02), which a g, r, i, z survey now runs: 0.711 and 0.677, of 22 anomalous sources (an AUROC's
    # spread there is about 0.06, so 0.68 and 0.62 stay well above a scorer that does not see them, 0.5)
    keep = np.isin(labels, ["normal", "lens", "ring_galaxy", "merger"])
    y = labels[keep] != "normal"
    assert y.sum() >= 5
    for column, floor in (("anomaly_score_paper", 0.68), ("anomaly_score", 0.62)):
        scores = np.concatenate([g[column].to_numpy() for _, g in sel.groupby("field")])
        assert roc_auc_score(y, scores[keep]) > floor, column


def test_cluster_catalog_and_members(run, survey, truth):
    """The cluster stage wrote a candidate table per tile; the merge de-duplicated them into clusters.parquet
    (no two within the suppression radius), numbered by score, with n_members equal to the catalog's
    cluster_id counts; the survey's rich cluster (richness 106, z 0.39, 136 px from field001's edge) comes out
    once, near its BCG, at its redshift, and the galaxies assigned to it are mostly its true members."""
    from deepfield.tasks.astro import separation_arcsec
    from deepfield.tasks.astro import arcsec_per_mpc
    cfg, summary, cat = run
    assert len(list((cfg.run_dir / "tiles").glob("*/*.clusters.parquet"))) == 8
    cl = pd.read_parquet(summary["merge"]["paths"]["clusters"])
    assert summary["merge"]["clusters"] == len(cl) >= 1
    assert list(cl.cluster_id) == list(range(1, len(cl) + 1)) and cl.score.is_monotonic_decreasing
    for i in range(len(cl)):
        d = separation_arcsec(cl.ra.iat[i], cl.dec.iat[i], cl.ra.to_numpy()[i + 1:], cl.dec.to_numpy()[i + 1:])
        assert (d >= 0.5 * arcsec_per_mpc(cl.z.iat[i])).all()
    ids = cat.cluster_id.to_numpy()
    assert set(np.unique(ids)) <= {-1, *cl.cluster_id}
    counts = pd.Series(ids[ids > 0]).value_counts()
    assert [counts.get(c, 0) for c in cl.cluster_id] == list(cl.n_members)

    clusters = pd.read_parquet(survey / "truth" / "clusters.parquet")
    rich = clusters[clusters.richness >= 30].iloc[0]
    scale = arcsec_per_mpc(float(rich.z))
    d = separation_arcsec(rich.ra, rich.dec, cl.ra.to_numpy(), cl.dec.to_numpy())
    assert (d < 0.5 * scale).sum() == 1  # once (the poor cluster 0.9 Mpc away may come out too)
    found = cl.iloc[int(np.argmin(d))]
    # 136 px from its field's edge (the stage extends the field with the neighbouring field's pixels)
    # two-sided, from the evaluation and validation (models/cards/cluster_net.md): the refined z within 3 NMAD
    # (0.013) of the truth, the richness within 3 scatters (0.164 dex = 0.38 in ln, validation skies) of the
    # median ratio (0.90 on the evaluation fields)
    assert d.min() < 0.3 * scale and abs(found.z - rich.z) / (1 + rich.z) < 3 * 0.013
    assert abs(np.log(found.richness / rich.richness) - np.log(0.90)) < 3 * 0.38
    members = cat[cat.cluster_id == found.cluster_id]
    counts, idx, sep = match(members, truth, 1.0)
    true_member = (sep < 1.0) & (truth.cluster_id.to_numpy()[idx] == rich.cluster_id)
    assert len(members) >= 20 and true_member.mean() > 0.4


def test_deblended_fluxes_against_the_truth(run, truth):
    """The deblender's i fluxes of blend members brighter than i = 23.5, matched to their truth galaxy within
    0.3": median |dF|/F against the truth's total flux. Measured 0.090 on this survey (207 members) with the
    symmetric templates (0.078 on 2026-12-08), where the U-Net's fractions gave 0.25 and the members' Kron
    fluxes, with the neighbours' segments masked, are off by 0.205 with SEP's area scaling and by 0.110 with
    their pixels counted as their mirror images (the measure stage's kron_mirror, default). Two-sided, about the
    measured value: within [0.05, 0.15], and under 0.8 times the masked Kron error (0.71 measured)."""
    _, _, cat = run
    deb = cat[cat.deblend_method == "symmetric"]
    t = truth[truth.kind.isin(["galaxy", "bcg"]) & (truth.mag_i < 23.5)]
    _, idx, sep = match(deb, t, 0.3)
    ok = sep < 0.3
    assert ok.sum() >= 100
    ftrue = 10 ** (-0.4 * (t.mag_i.to_numpy()[idx[ok]] - 31.4))  # nJy, as the catalog's fluxes
    err_deb = np.median(np.abs(deb.flux_deblend_i.to_numpy()[ok] / ftrue - 1))
    err_kron = np.median(np.abs(deb.flux_auto_i.to_numpy()[ok] / ftrue - 1))
    assert 0.05 < err_deb < 0.15 and err_deb < 0.8 * err_kron, (err_deb, err_kron)


def test_kron_fluxes_of_faint_isolated_galaxies(run, truth):
    """The AUTO flux of isolated galaxies at i 24-25 (truth blendedness < 0.02, 10 px inside the field), matched
    within 0.5": median within 20 % of the truth's total flux and under a tenth of them below 0.6 of it. Before
    2026-12-07 a faint compact source's Kron ellipse was replaced by a 1.75 px circle (tasks/stages/_kron.py): on
    this survey (279 galaxies) their median was 0.79 with 37 % below 0.6; now 0.89 and 6 %."""
    _, _, cat = run
    inside = truth.x.between(10, 1013) & truth.y.between(10, 1013)
    gal = truth[truth.is_primary & (truth.kind == "galaxy") & truth.mag_i.between(24, 25)
                & (truth.blendedness < 0.02) & inside]
    _, idx, sep = match(gal, cat, 0.5)
    ok = sep < 0.5
    assert ok.sum() >= 50, ok.sum()
    ratio = cat.flux_auto_i.to_numpy()[idx[ok]] / 10 ** (-0.4 * (gal.mag_i.to_numpy()[ok] - 31.4))
    assert 0.8 < np.median(ratio) < 1.2 and np.mean(ratio < 0.6) < 0.1, (np.median(ratio), np.mean(ratio < 0.6))
