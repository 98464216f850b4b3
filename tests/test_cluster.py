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
from deepfield.tasks.stages.cluster import SOFTENING, binned_planes


def test_forward_shapes_padding_and_determinism():
    torch.manual_seed(0)
    a = ClusterNet().eval()
    torch.manual_seed(0)
    b = ClusterNet().eval()
    x = torch.randn(2, 5, 100, 130)
    heat, z, lnr = a(x)
    assert heat.shape == z.shape == lnr.shape == (2, 32, 40)  # padded to 128 x 160, stride 4
    for ta, tb in zip(a(x), b(x)):
        assert torch.equal(ta, tb)
    h, zm, rm = predict(a, x[0].numpy())
    assert h.shape == zm.shape == rm.shape == (25, 33)  # ceil(100 / 4), ceil(130 / 4)
    assert ((h > 0) & (h < 1)).all() and (rm > 0).all()


def test_target_geometry():
    # binned pixel 41.5 is output pixel (41.5 - 1.5) / 4 = 10; 21.5 -> 5
    assert to_output(41.5) == 10.0 and from_output(10.0) == 41.5
    heat, zmap, rmap = targets((16, 16), np.array([[41.5, 21.5]]), np.array([0.4]), np.array([50.0]))
    assert heat[5, 10] == 1.0 and heat.max() == 1.0
    assert heat[5, 12] == pytest.approx(np.exp(-4 / 8))  # 2 px away, sigma 2
    assert np.isfinite(zmap).sum() == 9 and np.nanmax(np.abs(zmap - 0.4)) < 1e-6
    assert np.nanmax(np.abs(rmap - np.log(50.0))) < 1e-5
    off, _, _ = targets((16, 16), np.array([[200.0, 21.5]]), np.array([0.4]), np.array([50.0]))
    assert off.max() == 0.0  # a centre off the grid adds nothing


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


def test_short_training_lowers_the_loss(tmp_path):
    from deepfield.models.train_cluster import train, validate

    rng = np.random.default_rng(3)
    planes = rng.normal(0, 0.3, (3, 5, 128, 128)).astype(np.float32)
    planes[:, 4] = 1.0
    rows = []
    for k in range(3):  # red blobs: a "cluster" of 40 bright points around each centre
        for c in range(2):
            cx, cy = rng.uniform(24, 104, 2)
            for px, py in rng.normal([cx, cy], 5, (40, 2)).astype(int).clip(0, 127):
                planes[k, :4, py, px] += [0.5, 1.5, 2.5, 3.0]
            rows.append(dict(k=k, xb=cx, yb=cy, z=0.5, richness=40.0))
    truth = pd.DataFrame(rows)
    torch.manual_seed(0)
    before = validate(ClusterNet(), planes, truth, np.array([0]), "cpu")["loss"]
    rec, state = train(planes, truth, iters=60, batch=8, crop_size=64, lr=3e-3, val_fields=1, seed=0, threads=1,
                       log_every=30)
    assert rec["val_fields"] == [int(np.random.default_rng(0).permutation(3)[0])]
    assert rec["log"][-1]["total"] < rec["log"][0]["total"]
    assert rec["final_val"]["loss"] < 0.7 * before
    trained = ClusterNet(**rec["arch"])
    trained.load_state_dict(state)  # the weights returned are the trained network's
    assert validate(trained, planes, truth, np.array(rec["val_fields"]), "cpu")["loss"] == pytest.approx(
        rec["final_val"]["loss"], rel=1e-5)


def test_suppress_keeps_the_strongest_of_one_cluster():
    dec0 = 2.0
    cand = pd.DataFrame(dict(field="f", tile=["f/0_0", "f/0_1", "f/1_1"],
                             ra=[150.0, 150.0 + 10 / 3600 / np.cos(np.radians(dec0)), 150.0],
                             dec=[dec0, dec0, dec0 + 300 / 3600], score=[0.5, 0.8, 0.6], z=[0.5, 0.5, 0.5],
                             richness=[40.0, 40.0, 40.0], x=0.0, y=0.0))
    out = suppress(cand, 0.5)  # 0.5 Mpc at z = 0.5 is 81": the first two are one cluster
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
    from deepfield.tasks.zarr_store import field_grid, open_store

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
    # the 1024 px field holds only the inner 100" of a cluster whose R_lambda is 238": the network, which
    # counts what it sees, estimates low here (on 2048 px fields its scatter is in the model card)
    # two-sided, from the evaluation (models/weights/cluster_net.eval.json: ln richness bias -0.27, NMAD
    # scatter 0.35): within 3 scatters of the bias; measured 0.48 here
    assert abs(np.log(best.richness / truth.richness) + 0.27) < 3 * 0.35
    assert best.score > 0.5
