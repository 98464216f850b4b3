"""The cluster finder: network shapes and targets, the stage's binning, a short training run, the merge's
suppression and membership, and the shipped weights on a simulated rich cluster cut by tile boundaries."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from deepfield.catalogs.clusters import assign_members, suppress
from deepfield.tasks.astro import separation_arcsec
from deepfield.models.cluster_net import ClusterNet, from_output, predict, targets, to_output
from deepfield.tasks import maskbits
from deepfield.tasks.stages.cluster_planes import SOFTENING, binned_planes


def test_forward_shapes_padding_and_determinism():
    torch.manual_seed(0)
    a = ClusterNet().eval()
    torch.manual_seed(0)
    b = ClusterNet().eval()
    x = torch.randn(2, 5, 100, 130)
    heat, z, lnr = a(x)
    assert heat.shape == z.shape == lnr.shape == (2, 10, 32, 40)  # 10 redshift slices; padded to 128 x 160, stride 4
    for ta, tb in zip(a(x), b(x)):
        assert torch.equal(ta, tb)
    h, zm, rm = predict(a, x[0].numpy())
    assert h.shape == zm.shape == rm.shape == (10, 25, 33)  # ceil(100 / 4), ceil(130 / 4)
    assert ((h > 0) & (h < 1)).all() and (rm > 0).all()


def test_target_geometry():
    # binned pixel 41.5 is output pixel (41.5 - 1.5) / 4 = 10; 21.5 -> 5; z 0.4 is in slice 3 (0.38-0.49)
    assert to_output(41.5) == 10.0 and from_output(10.0) == 41.5
    heat, zmap, rmap, weight = targets((16, 16), np.array([[41.5, 21.5]]), np.array([0.4]), np.array([50.0]))
    assert heat.shape == (10, 16, 16) and heat[3, 5, 10] == 1.0 and (heat == 1.0).sum() == 1
    assert heat[3, 5, 12] == pytest.approx(np.exp(-4 / 8))  # 2 px away, sigma 2
    s2, s3 = (0.4 - 0.325) / 0.11, (0.4 - 0.435) / 0.11  # from slice 2's and 3's centres: 0.6 slices in z
    assert heat[2, 5, 10] == pytest.approx(np.exp(-(s2**2 - s3**2) / (2 * 0.6**2)), rel=1e-5) and heat[6].max() == 0
    assert np.isfinite(zmap).sum() == 18 and np.nanmax(np.abs(zmap - 0.4)) < 1e-6  # slices 3 and 2
    assert np.nanmax(np.abs(rmap - np.log(50.0))) < 1e-5 and (weight == 1).all()
    off = targets((16, 16), np.array([[200.0, 21.5]]), np.array([0.4]), np.array([50.0]))[0]
    assert off.max() == 0.0  # a centre off the grid adds nothing
    # a group of richness 10 is neither positive nor negative: no loss around it; one of 5 is a negative
    h, _, _, w = targets((16, 16), np.array([[41.5, 21.5]]), np.array([0.4]), np.array([10.0]))
    assert h.max() == 0 and w[3, 5, 10] == 0 and w[2, 5, 10] == 0 and w[3, 5, 15] == 1 and w[6].min() == 1
    h, _, _, w = targets((16, 16), np.array([[41.5, 21.5]]), np.array([0.4]), np.array([5.0]))
    assert h.max() == 0 and (w == 1).all()


def test_two_clusters_on_one_line_of_sight_are_two_peaks():
    """Clusters at the same place on the sky, z 0.3 and 0.62: two peaks in two slices, and the merge's
    suppression keeps both; the same pair at z 0.30 and 0.33 is one cluster."""
    from deepfield.models.cluster_net import peaks
    heat, zmap, _, _ = targets((16, 16), np.array([[41.5, 21.5], [41.5, 21.5]]), np.array([0.3, 0.62]),
                               np.array([50.0, 40.0]))
    pos, ks, _ = peaks(heat, 0.3)
    assert len(pos) == 2 and sorted(ks) == [2, 5] and np.allclose(pos, [[10, 5], [10, 5]])
    assert sorted(zmap[ks, 5, 10]) == pytest.approx([0.3, 0.62])
    cand = pd.DataFrame(dict(field="f", tile="f/0_0", ra=150.0, dec=2.0, score=[0.9, 0.7], z=[0.3, 0.6],
                             richness=50.0, x=0.0, y=0.0))
    assert len(suppress(cand, 0.5, 0.1)) == 2
    assert len(suppress(cand.assign(z=[0.30, 0.33]), 0.5, 0.1)) == 1


def test_binned_planes_mean_noise_units_and_coverage():
    rng = np.random.default_rng(1)
    sigma, bin = 2.0, 8
    image = rng.normal(0, sigma, (2, 256, 256)).astype(np.float32) + 5.0  # a flat sky left over
    invvar = np.full_like(image, 1 / sigma**2)
    mask = np.zeros(image.shape, np.uint16)
    image[:, 128:136, 64:72] += 40.0  # one bright block: mean +40 = 160 binned sigma
    mask[1, 0, 0] = maskbits.BAD
    p = binned_planes(image, invvar, mask, bin)
    assert p.shape == (3, 32, 32)
    expect = np.arcsinh(40.0 / (sigma / bin) / SOFTENING)
    assert p[0, 16, 8] == pytest.approx(expect, rel=0.02)
    others = np.delete(p[0].ravel(), 16 * 32 + 8)
    assert abs(np.median(others)) < 0.05 and 0.2 < np.std(others) < 0.45  # sky removed; unit noise, asinh(x/3)
    assert p[2, 0, 0] == pytest.approx(63 / 64) and p[2, 1:, 1:].min() == 1.0


@pytest.fixture(scope="module")
def tiny_sky(tmp_path_factory):
    from deepfield.tasks.trainsets.cluster_sky import build_library
    path = tmp_path_factory.mktemp("cluster-sky") / "library.npz"
    return build_library(path, seed=1, n_backgrounds=3, n_clusters=30, field_size=1024, workers=1)


def test_short_training_lowers_the_loss_and_resumes_identically(tiny_sky, tmp_path, monkeypatch):
    import deepfield.models.train_cluster as tc
    import deepfield.tasks.trainsets.cluster_sky as cs
    monkeypatch.setattr(cs, "VAL_SKIES", 4)
    monkeypatch.setattr(cs, "VAL_EMPTY", 2)
    monkeypatch.setattr(cs, "VAL_SIZE", 128)
    source = cs.sky_source(tiny_sky, 0)
    kw = dict(iters=40, batch=4, crop_size=64, lr=3e-3, seed=0, threads=1, log_every=4)
    rec, state = tc.train(source, **kw)
    first, last = (np.mean([r["total"] for r in part]) for part in (rec["log"][:3], rec["log"][-3:]))
    assert last < 0.7 * first  # a batch of 4 is noisy: the mean of three logged steps (measured 0.56)
    assert rec["split"] == dict(val_backgrounds=1, train_backgrounds=2, val_clusters=3, train_clusters=27)
    assert rec["arch"]["binned_arcsec"] == pytest.approx(1.6)  # 8 x 0.2": what the stage bins other grids to
    a, b = rec["richness_cal"]
    assert np.allclose(state["richness_cal"].numpy(), [a, b])  # the calibration travels with the weights
    ck = tmp_path / "ck.pt"
    assert tc.train(source, **kw, checkpoint=ck, stop_after=1e-3) is None and ck.exists()  # stopped at its first log
    assert torch.load(ck, weights_only=False)["step"] == 4
    _, state2 = tc.train(source, **kw, checkpoint=ck)  # resumed: the same weights as in one go
    for k in state:
        assert torch.allclose(state[k].float(), state2[k].float(), atol=1e-5), k


def test_suppress_keeps_the_strongest_of_one_cluster():
    dec0 = 2.0
    cand = pd.DataFrame(dict(field="f", tile=["f/0_0", "f/0_1", "f/1_1"],
                             ra=[150.0, 150.0 + 10 / 3600 / np.cos(np.radians(dec0)), 150.0],
                             dec=[dec0, dec0, dec0 + 300 / 3600], score=[0.5, 0.8, 0.6], z=[0.5, 0.5, 0.5],
                             richness=[40.0, 40.0, 40.0], x=0.0, y=0.0))
    out = suppress(cand, 0.5, 0.1)  # 0.5 Mpc at z = 0.5 is 81": the first two are one cluster
    assert list(out.cluster_id) == [1, 2]
    assert list(out.tile) == ["f/0_1", "f/1_1"]
    assert separation_arcsec(150, dec0, out.ra.iat[0], out.dec.iat[0])[()] == pytest.approx(10.0, rel=1e-3)


def _red_sequence_catalog(z: float, colour_shift: np.ndarray, r_arcsec: np.ndarray, rng) -> pd.DataFrame:
    """Galaxies at radius r_arcsec (random angles) around (150, 2) with the red-sequence colours of z (g-r,
    r-i, i-z) plus colour_shift (N, 3), and i within m* - 1 to m* + 1.5; errors 0.02 mag."""
    from deepfield.tasks.astro import red_sequence_model
    m = red_sequence_model(["g", "r", "i", "z"], "i", z=[z])
    n = len(r_arcsec)
    col = m.colours[0] + colour_shift
    ang = rng.uniform(0, 2 * np.pi, n)
    src = pd.DataFrame(dict(ra=150 + r_arcsec * np.cos(ang) / 3600 / np.cos(np.radians(2)),
                            dec=2 + r_arcsec * np.sin(ang) / 3600))
    src["mag_auto_i"] = rng.uniform(m.m_star[0] - 1, m.m_star[0] + 1.5, n)
    src["mag_auto_z"] = src.mag_auto_i - col[:, 2]
    src["mag_auto_r"] = src.mag_auto_i + col[:, 1]
    src["mag_auto_g"] = src.mag_auto_r + col[:, 0]
    for b in "griz":
        src[f"magerr_auto_{b}"] = 0.02
    return src


def test_members_are_red_sequence_galaxies_within_r_lambda():
    rng = np.random.default_rng(5)
    n = 30
    shift = np.zeros((3 * n, 3))
    shift[n:2 * n] = -0.8  # blue galaxies
    r = np.concatenate([rng.uniform(0, 100, 2 * n), rng.uniform(400, 600, n)])  # R_lambda ~ 270" at z 0.4, lambda 50
    src = _red_sequence_catalog(0.4, shift, r, rng)
    clusters = pd.DataFrame(dict(cluster_id=[7], ra=[150.0], dec=[2.0], z=[0.4], richness=[50.0]))
    ids = assign_members(src, clusters, ["g", "r", "i", "z"])
    assert (ids[:n] == 7).all()
    assert (ids[n:] == -1).all()


def test_red_sequence_redshift_of_a_cluster_over_a_background():
    from deepfield.catalogs.redsequence import refine_redshift
    rng = np.random.default_rng(9)
    members = _red_sequence_catalog(0.45, rng.normal(0, 0.03, (25, 3)), rng.uniform(0, 60, 25), rng)
    # field galaxies over 0-500": colours of the red sequence anywhere between z 0.1 and 1, or bluer
    field = pd.concat([_red_sequence_catalog(float(zf), np.full((1, 3), -rng.uniform(0, 0.6)), rng.uniform(0, 500, 1), rng)
                       for zf in rng.uniform(0.1, 1.0, 400)], ignore_index=True)
    z, excess = refine_redshift(pd.concat([members, field], ignore_index=True), 150.0, 2.0, 0.33, ["g", "r", "i", "z"])
    assert abs(z - 0.45) < 0.015 and excess > 10
    z_none, _ = refine_redshift(field, 150.0, 2.0, 0.33, ["g", "r", "i", "z"])
    assert z_none == 0.33  # no cluster: the first guess is kept


@pytest.fixture(scope="module")
def boundary_cluster_run(tmp_path_factory):
    """One simulated 1024^2 field whose one rich cluster (richness 55, z 0.44) is centred 2 px from the
    boundary x = 512 between tile cores (tiles of 256 px), run through the cluster stage on every tile."""
    from deepfield.tasks.ingest import ingest_one
    from deepfield.tasks.ingest_config import StoreSpec, load_ingest_config
    from deepfield.tasks.sim.config import SimConfig
    from deepfield.tasks.sim.survey import simulate_survey
    from deepfield.tasks.tile_runner import TileRunner
    from deepfield.tasks.zarr_store import open_store
    from deepfield.tasks.zarr_read import field_grid

    work = tmp_path_factory.mktemp("cluster-boundary")
    cfg = SimConfig(seed=7, size=1024, fields=1, population=dict(
        clusters_per_field=1.0, cluster_richness=(60.0, 90.0), cluster_z=(0.35, 0.55), lenses_per_field=0,
        ring_galaxies_per_field=0, mergers_per_field=0))
    simulate_survey(cfg, work / "sim", workers=2)
    store = work / "store.zarr"
    for f in load_ingest_config(work / "sim" / "manifest.yaml").fields:
        assert ingest_one(f, str(store), StoreSpec(tile=256, chunk=128))["status"] != "failed"
    runner = TileRunner(str(store), str(work / "run"), [("cluster", {})], halo=0)
    grid = field_grid(open_store(store), "field000", 0)
    for tile in grid.tiles("field000"):
        runner.process(str(tile))
    return work


def test_shipped_weights_find_a_rich_cluster_on_a_tile_boundary_once(boundary_cluster_run):
    from deepfield.catalogs.clusters import read_candidates
    from deepfield.tasks.astro import arcsec_per_mpc
    from deepfield.tasks.tile_runner import source_tables

    work = boundary_cluster_run
    truth = pd.read_parquet(work / "sim" / "truth" / "clusters.parquet").iloc[0]
    assert truth.richness >= 50 and abs(truth.x - 512) < 5  # the field is the one described above
    tables = source_tables(work / "run")
    assert len(tables) == 16
    cand = read_candidates(tables)
    merged = suppress(cand, 0.5)
    scale = arcsec_per_mpc(float(truth.z))
    d = separation_arcsec(truth.ra, truth.dec, merged.ra.to_numpy(), merged.dec.to_numpy())
    assert (d < 1.0 * scale).sum() == 1  # found, and once
    best = merged.iloc[int(np.argmin(d))]
    assert d.min() < 0.15 * scale  # within 150 kpc of the BCG
    assert abs(best.z - truth.z) / (1 + truth.z) < 0.05
    # the 1024 px field holds only the inner 100" of a cluster whose R_lambda is 238": the network counts what
    # it sees. Two-sided, from the model card: within 3 scatters (0.164 dex = 0.38 in ln, validation skies) of
    # the median ratio (0.90 on the evaluation fields); measured 0.86 here, score 0.63
    assert abs(np.log(best.richness / truth.richness) - np.log(0.90)) < 3 * 0.38
    assert best.score > 0.5


@pytest.fixture(scope="module")
def straddling_cluster_run(tmp_path_factory):
    """Two overlapping 1024^2 fields (20" overlap) whose one rich cluster (richness 88, z 0.35) is centred in
    the overlap: 10 px inside field000's edge and 90 px inside field001's; the cluster stage on every tile
    of both fields (tiles of 256 px)."""
    from deepfield.tasks.sim.config import SimConfig
    from deepfield.tasks.tile_runner import TileRunner
    from deepfield.tasks.trainsets.fields import simulate_fields
    from deepfield.tasks.zarr_store import all_tiles, open_store

    work = tmp_path_factory.mktemp("cluster-straddle")
    cfg = SimConfig(seed=7, size=1024, fields=2, population=dict(
        clusters_per_field=0.5, cluster_richness=(60.0, 90.0), cluster_z=(0.3, 0.5), lenses_per_field=0,
        ring_galaxies_per_field=0, mergers_per_field=0, close_pairs_per_field=0))
    store = simulate_fields(cfg, work, 2)
    runner = TileRunner(str(store), str(work / "run"), [("cluster", {})], halo=0)
    for tile in all_tiles(open_store(store), 0):
        runner.process(str(tile))
    return work


def test_a_cluster_straddling_two_fields_is_one_row(straddling_cluster_run):
    """Both fields' tiles find the cluster (each field's planes are extended with the other's pixels), and the
    merge's suppression (catalogs/clusters.py, its default configuration) leaves one row: near the BCG and at
    the cluster's redshift."""
    from deepfield.catalogs.clusters import ClusterMergeConfig, read_candidates
    from deepfield.tasks.astro import arcsec_per_mpc
    from deepfield.tasks.tile_runner import source_tables

    work = straddling_cluster_run
    truth = pd.read_parquet(work / "sim" / "truth" / "clusters.parquet")
    assert len(truth) == 1 and truth.richness.iat[0] >= 80
    t = truth.iloc[0]
    scale = arcsec_per_mpc(float(t.z))
    cand = read_candidates(source_tables(work / "run"))
    d = separation_arcsec(t.ra, t.dec, cand.ra.to_numpy(), cand.dec.to_numpy())
    near = cand[(d < 0.5 * scale) & (cand.score >= 0.3)]
    assert set(near.field) == {"field000", "field001"}  # seen from both sides of the edge
    cfg = ClusterMergeConfig()
    merged = suppress(cand[cand.score >= 0.3], cfg.nms_mpc, cfg.nms_dz)
    d = separation_arcsec(t.ra, t.dec, merged.ra.to_numpy(), merged.dec.to_numpy())
    assert (d < 1.0 * scale).sum() == 1
    best = merged.iloc[int(np.argmin(d))]
    assert d.min() < 0.15 * scale and abs(best.z - t.z) / (1 + t.z) < 0.05


def test_shipped_weights_keep_two_clusters_on_one_line_of_sight():
    """Two rich clusters (richness ~80) at z 0.3 and 0.6, 25.6" apart on the sky (0.11 Mpc at z 0.3, well inside
    each other's R_lambda and the merge's 0.5 Mpc suppression radius), drawn with the simulator's own cluster
    model into a field of its sky (the fast renderer, tasks/trainsets/binned_render.py): the network finds
    both, each at its own redshift, and the merge's suppression keeps both, where one on the sky alone would
    keep one. (Exactly superposed, the network reports one cluster at the foreground's z with the summed
    richness: the model card.)"""
    from deepfield.catalogs.clusters import ClusterMergeConfig
    from deepfield.models.cluster_net import detect
    from deepfield.models.registry import create_model
    from deepfield.tasks.sim.catalog import bandpasses_of, build_survey_catalog
    from deepfield.tasks.sim.clusters import sample_cluster
    from deepfield.tasks.sim.config import SimConfig
    from deepfield.tasks.sim.field import plan_field
    from deepfield.tasks.sim.layout import survey_layout
    from deepfield.tasks.sim.render import Placed
    from deepfield.tasks.stages.cluster_planes import planes_from_sums
    from deepfield.tasks.trainsets.binned_render import render_binned

    cfg = SimConfig(seed=41, size=2048, fields=1, population=dict(clusters_per_field=0.0))
    cat = build_survey_catalog(cfg)
    lay = survey_layout(cfg)[0]
    plan = plan_field(cfg, lay, cat.sources, *cat.positions())
    rng = np.random.default_rng(2)
    centres = []
    for k, z in enumerate((0.3, 0.6)):
        ra, dec = lay.wcs().all_pix2world([1024.0 + 128 * k], [1024.0], 0)
        centres.append((float(ra[0]), float(dec[0])))
        _, members = sample_cluster(rng, k + 1, float(ra[0]), float(dec[0]), z, 80.0, 10**7 * (k + 1),
                                    bandpasses_of(cfg), "i", cfg.population.galaxy_mag_faint)
        x, y = lay.wcs().all_world2pix([m.ra for m in members], [m.dec for m in members], 0)
        plan.placed += [Placed(m, float(xi), float(yi)) for m, xi, yi in zip(members, x, y)]
    model = create_model("cluster_net").eval()
    planes = planes_from_sums(render_binned(plan, 8, np.random.default_rng(3)), 8)
    found = pd.DataFrame(detect(model, planes, 0.3))
    mid = ((1024 + 64) - 3.5) / 8, (1024 - 3.5) / 8  # binned pixel between the two centres
    near = found[np.hypot(found.x - mid[0], found.y - mid[1]) < 20].sort_values("z")
    assert len(near) == 2, found
    assert list(near.z) == pytest.approx([0.3, 0.6], abs=0.1)
    ra, dec = lay.wcs().all_pix2world(near.x.to_numpy() * 8 + 3.5, near.y.to_numpy() * 8 + 3.5, 0)
    cand = near.assign(field="f", tile="f/0_0", ra=ra, dec=dec)
    cfg_m = ClusterMergeConfig()
    assert len(suppress(cand, cfg_m.nms_mpc, cfg_m.nms_dz)) == 2
    assert len(suppress(cand, cfg_m.nms_mpc, 10.0)) == 1  # on the sky alone they would be one


def test_eval_cluster_fields_on_another_grid():
    """`eval cluster --pixel-scale`: the held-out survey on another survey's grid, all else the simulator's."""
    from deepfield.flows.evaluate.cluster import eval_fields
    base = eval_fields(3, 4, 512, 2.0)
    assert base.pixel_scale == 0.2 and base.population.clusters_per_field == 2.0
    other = eval_fields(3, 4, 512, 2.0, 0.396)
    assert other.pixel_scale == 0.396
    assert other.model_dump(exclude={"pixel_scale"}) == base.model_dump(exclude={"pixel_scale"})
