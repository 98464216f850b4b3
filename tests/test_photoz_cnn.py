"""Photometric redshifts from images (issue 23): the CNN (models/photoz_cnn.py) and the photoz stage's method
hybrid (models/photoz_hybrid.py: the reference set's candidates weighted also by the CNN's p(z)): the CNN's
quantiles and stamps by hand, its stamps resampled from another grid, the CNN's density weighing a library's
candidates, both methods with the shipped weights on the session's default run against the truth, and the
network's inputs made on its device. The p(z) summary, the colour baseline and the band checks:
tests/test_photoz.py."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepfield.models.photoz import PhotoZKNN
from deepfield.models.photoz_pdf import QUANTILES, Z_MAX, nmad_figures, pdf


def test_cnn_quantiles_of_a_binned_density_by_hand():
    """p(z) uniform within its bins: all mass in the bin [0.40, 0.44) puts the median at 0.42 and the 16 % quantile
    at 0.40 + 0.16 x 0.04; two equal neighbouring bins put the median on the edge between them; spread widens
    about the median."""
    from deepfield.models.photoz_cnn import quantiles_from_probs
    edges = np.linspace(0.0, Z_MAX, 101)
    p = np.zeros((2, 100))
    p[0, 10] = 1.0
    p[1, [10, 11]] = 0.5
    q = quantiles_from_probs(p, edges)
    np.testing.assert_allclose(q[0], 0.40 + 0.04 * np.array(QUANTILES), atol=1e-12)
    np.testing.assert_allclose(q[1, QUANTILES.index(0.5)], 0.44, atol=1e-12)  # half the mass below 0.44
    np.testing.assert_allclose(q[1, QUANTILES.index(0.84)], 0.44 + 0.04 * 0.34 / 0.5, atol=1e-12)
    wide = quantiles_from_probs(p[:1], edges, spread=2.0)
    np.testing.assert_allclose(wide[0] - 0.42, 2.0 * (q[0] - 0.42), atol=1e-12)
    grid = np.linspace(0.0, Z_MAX, 801)
    width = np.diff(np.concatenate([[grid[0] - 0.0025], 0.5 * (grid[1:] + grid[:-1]), [grid[-1] + 0.0025]]))
    np.testing.assert_allclose((pdf(q, grid) * width).sum(axis=1), 1.0, atol=1e-9)


def test_cnn_stamps_are_centred_in_nJy_with_unusable_pixels_and_missing_bands_zero():
    """A hand-made two-band tile: a source at (x, y) lies within half a pixel of the centre of its 32 px stamp
    (15.5, 15.5): (40.2, 29.8) puts pixel (40, 30) at stamp index (15, 16); values converted with each band's zero point (ZP 27: 1 unit = 10^(0.4 x 4.4)
    nJy), a masked pixel and the part outside the tile at 0, and a band the tile lacks all 0."""
    from types import SimpleNamespace

    from deepfield.tasks.maskbits import UNUSABLE
    from deepfield.tasks.stages.photoz import stamps_nJy
    ny, nx = 60, 80
    image = np.zeros((2, ny, nx), np.float32)
    image[0, 30, 40] = 5.0
    image[1, 30, 40] = 2.0
    image[0, 31, 40] = 1.0
    mask = np.zeros((2, ny, nx), np.int32)
    bit = int(UNUSABLE & -UNUSABLE)  # the lowest unusable bit
    mask[0, 31, 40] = bit
    tile = SimpleNamespace(bands=["r", "g"], image=image, invvar=np.ones_like(image), mask=mask,
                           zeropoints=[27.0, 31.4])
    st = stamps_nJy(tile, np.array([40.2, 2.0]), np.array([29.8, 3.0]), ["g", "r", "i"], 32)
    assert st.shape == (2, 3, 32, 32) and st.dtype == np.float32
    np.testing.assert_allclose(st[0, 1, 16, 15], 5.0 * 10 ** (0.4 * 4.4), rtol=1e-6)  # r, ZP 27
    np.testing.assert_allclose(st[0, 0, 16, 15], 2.0, rtol=1e-6)  # g, ZP 31.4: nJy already
    assert st[0, 1, 17, 15] == 0.0  # masked
    assert np.count_nonzero(st[0]) == 2 and not st[:, 2].any()  # band i absent
    # near the corner, (2.3, 3.4): the stamp starts at pixel (-13, -12); what lies before the tile is 0
    image[1, 3, 2] = 7.0
    image[1, 0, :] = 1.0
    st = stamps_nJy(tile, np.array([2.3]), np.array([3.4]), ["g"], 32)
    assert st[0, 0, 15, 15] == np.float32(7.0) and not st[0, 0, :12].any() and not st[0, 0, :, :13].any()
    assert st[0, 0, 12, 13:].all()  # the tile's first row


def test_the_cnn_method_with_the_shipped_weights_on_the_default_runs_fields(default_run, survey):
    """The photoz stage with method cnn (the shipped photoz_cnn) on the default run's store, in this process after
    the default run's measuring stages: every row gets ordered quantiles; bright isolated galaxies matched to the
    truth have redshifts within the method's accuracy, and the red-sequence members of the simulated clusters
    (E template at the cluster's z) are recovered within 0.05 (1 + z)."""
    from deepfield.flows.evaluate.detection import detection_stages
    from deepfield.tasks.sim.config import SimConfig
    from deepfield.tasks.trainsets.photoz import matched_galaxies, process_store
    cfg, _, _ = default_run
    stages, halo = detection_stages()
    rows = process_store(cfg.store_path, [*stages, ("photoz", {"method": "cnn"})], halo)
    q = rows[["z_phot_q025", "z_phot_q16", "z_phot_q50", "z_phot_q84", "z_phot_q975"]].to_numpy(float)
    ok = np.isfinite(q).all(axis=1)
    assert ok.mean() > 0.95 and np.all(np.diff(q[ok], axis=1) >= 0)
    truth = pd.read_parquet(survey / "truth" / "objects.parquet")
    m = matched_galaxies(rows, truth, SimConfig().pixel_scale, ["i"], "i")
    zp = rows.z_phot.to_numpy(float)[m.row.to_numpy()]
    bright = (m.mag_true < 23).to_numpy() & (m.blendedness < 0.1).to_numpy()
    assert bright.sum() > 100, bright.sum()
    f = nmad_figures(zp[bright], m.z.to_numpy(float)[bright])
    assert f["sigma_nmad"] < 0.08 and f["outliers"] < 0.2 and abs(f["bias"]) < 0.03, f
    # red-sequence members: the truth's rows of the matched galaxies
    from scipy.spatial import cKDTree
    red = truth[(truth.cluster_id >= 0) & (truth.sed == "E") & (truth.mag_i < 22)]
    tree = cKDTree(np.c_[m.x.to_numpy(float), m.y.to_numpy(float)])
    d, j = tree.query(np.c_[red.x.to_numpy(float), red.y.to_numpy(float)], distance_upper_bound=2.5)
    hit = np.isfinite(d) & (m.field.to_numpy()[np.minimum(j, len(m) - 1)] == red.field.to_numpy())
    assert hit.sum() >= 10, hit.sum()
    z = red.z.to_numpy(float)[hit]
    dz = np.abs(zp[j[hit]] - z) / (1 + z)
    assert np.mean(dz < 0.05) >= 0.8 and np.median(dz) < 0.03, (np.round(dz, 3), z)


def test_the_cnns_density_times_a_librarys_decides_between_the_colours_modes():
    """models/photoz_hybrid.py: a library whose galaxies at z 0.3 and 1.0 share one colour (the colours cannot
    tell them apart: p(z) bimodal). A CNN p(z) peaked at 1.0 (or at 0.3) moves the estimate there; none (a row of
    NaN) or one of zeros (an underflowed softmax) leaves the colour estimate as it was; a flat CNN p(z) leaves
    the colours' two modes the densest redshifts of the product (their tempered term)."""
    from deepfield.models.photoz_hybrid import POWER, CNNTerm, combined_quantiles, library_prior
    rng = np.random.default_rng(3)
    bands = ["g", "r", "i", "z"]
    n = 400
    base = 10 ** (-0.4 * (np.array([23.5, 23.0, 22.6, 22.4]) - 31.4))
    flux = base[None, :] * rng.uniform(0.9, 1.1, (n, 1))
    z = np.where(np.arange(n) < n // 2, 0.3, 1.0) + rng.normal(0, 0.005, n)
    est = PhotoZKNN(bands, flux, z, base / 20, noiseless=True, candidates=n, spread=1.0)
    edges = np.linspace(0.0, Z_MAX, 101)
    prior = library_prior(z, edges)
    centres = 0.5 * (edges[1:] + edges[:-1])

    def peak(at):
        g = np.exp(-0.5 * ((centres - at) / 0.05) ** 2)
        return g / g.sum()
    probs = np.stack([peak(1.0), peak(0.3), np.full(100, np.nan), np.zeros(100)])
    f, e = np.tile(base, (4, 1)), np.tile(0.02 * base, (4, 1))
    alone = est.predict(f, e, bands)
    assert alone["z_phot_q16"][0] < 0.35 and alone["z_phot_q84"][0] > 0.95  # both modes in the 68 % interval
    both = est.predict(f, e, bands, cnn=CNNTerm(probs, edges, prior, POWER))
    assert abs(both["z_phot"][0] - 1.0) < 0.03 and both["z_phot_q16"][0] > 0.9, both["z_phot_q16"][0]
    assert abs(both["z_phot"][1] - 0.3) < 0.03 and both["z_phot_q84"][1] < 0.4, both["z_phot_q84"][1]
    for c in ("z_phot", "z_phot_q16", "z_phot_q84", "z_phot_q025", "z_phot_q975"):
        assert both[c][2] == alone[c][2]  # no CNN for this row: the colours' estimate
        assert both[c][3] == alone[c][3]  # a CNN that gives every redshift 0: the colours' estimate
    # a flat CNN: the product is the colours' tempered density over the prior, densest at the two modes
    j, w = est.library_weights(f[:1], e[:1], bands)
    flat = np.where(centres < 2.0, 1.0, 0.0)[None, :] / 50.0
    q = combined_quantiles(flat, edges, prior, est.z[j], w, POWER)
    qq = combined_quantiles(flat, edges, prior, est.z[j], w, 1.0)
    assert 0.3 < q[0, 2] < 1.0 and (qq[0, 3] - qq[0, 1]) < (q[0, 3] - q[0, 1])  # power 1: narrower, the modes
    assert np.isnan(combined_quantiles(flat, edges, prior, est.z[j], np.zeros_like(w))).all()  # no candidates


def test_cnn_stamps_of_a_field_on_another_grid_are_resampled_onto_the_networks():
    """stamps_nJy with the network's pixel scale: a Gaussian source (sigma 0.3") on a 0.1"/px tile, cut for a
    network of 0.2"/px, keeps its light (within 1 %) and lies at the stamp's centre (within 0.05 px); on the
    network's own grid the stamps are the plain cut."""
    from types import SimpleNamespace

    from deepfield.tasks.stages.photoz import stamps_nJy
    ny = nx = 120
    yy, xx = np.mgrid[0:ny, 0:nx]
    x0, y0, s = 60.3, 57.8, 3.0  # px of 0.1"
    blob = (np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / s ** 2) / (2 * np.pi * s ** 2)).astype(np.float32)
    image = np.stack([100.0 * blob, 50.0 * blob])
    tile = SimpleNamespace(bands=["g", "r"], image=image, invvar=np.ones_like(image),
                           mask=np.zeros(image.shape, np.int32), zeropoints=[31.4, 31.4], pixel_scale=0.1)
    st = stamps_nJy(tile, np.array([x0]), np.array([y0]), ["g", "r"], 32, pixel_scale=0.2)
    assert st[0, 0].sum() == pytest.approx(100.0, rel=0.01) and st[0, 1].sum() == pytest.approx(50.0, rel=0.01)
    w = st[0, 0] / st[0, 0].sum()
    g = np.arange(32)
    assert abs((w.sum(0) * g).sum() - 15.5) < 0.05 and abs((w.sum(1) * g).sum() - 15.5) < 0.05
    same = stamps_nJy(tile, np.array([x0]), np.array([y0]), ["g"], 32, pixel_scale=0.1)
    np.testing.assert_array_equal(same, stamps_nJy(tile, np.array([x0]), np.array([y0]), ["g"], 32))


def test_the_hybrid_method_on_the_default_runs_fields_against_knn(default_run, survey):
    """Method hybrid (the default) and knn on the default run's store, in this process after the default run's
    measuring stages: the rows under cnn_min_snr (10) get knn's estimate to the bit and the CNN changes the
    others; on the galaxies brighter than i = 23 matched to the truth (about 330), hybrid's sigma_NMAD and
    outliers are knn's within their sampling scatter or better (on the held-out fields' 2,183 galaxies at i < 24
    0.0418 -> 0.0356, outliers 9.0 -> 6.2 %, models/cards/photoz_knn.md)."""
    from deepfield.flows.evaluate.detection import detection_stages
    from deepfield.tasks.sim.config import SimConfig
    from deepfield.tasks.trainsets.photoz import matched_galaxies, process_store
    cfg, _, _ = default_run
    stages, halo = detection_stages()
    rows = {m: process_store(cfg.store_path, [*stages, ("photoz", {"method": m})], halo) for m in ("knn", "hybrid")}
    k, h = rows["knn"], rows["hybrid"]
    assert len(k) == len(h) and (k.x.to_numpy() == h.x.to_numpy()).all()
    snr = (h.flux_gaap_i / h.fluxerr_gaap_i).to_numpy(float)
    low = ~(snr >= 10.0)
    cols = ["z_phot", "z_phot_q025", "z_phot_q16", "z_phot_q84", "z_phot_q975"]
    np.testing.assert_array_equal(h.loc[low, cols].to_numpy(), k.loc[low, cols].to_numpy())
    assert (h.loc[~low, "z_phot"].to_numpy() != k.loc[~low, "z_phot"].to_numpy()).mean() > 0.5
    truth = pd.read_parquet(survey / "truth" / "objects.parquet")
    m = matched_galaxies(h, truth, SimConfig().pixel_scale, ["i"], "i")
    bright = (m.mag_true < 23).to_numpy()
    assert bright.sum() > 100, bright.sum()
    z = m.z.to_numpy(float)[bright]
    f = {meth: nmad_figures(r.z_phot.to_numpy(float)[m.row.to_numpy()][bright], z) for meth, r in rows.items()}
    assert f["hybrid"]["sigma_nmad"] <= 1.1 * f["knn"]["sigma_nmad"], f
    assert f["hybrid"]["outliers"] <= f["knn"]["outliers"] + 0.01, f


def test_cnn_inputs_scaled_on_the_networks_device_give_the_cpus_probabilities():
    """On a GPU the stamps are scaled where the network runs (network_inputs with a device: a tensor there; here
    the meta device stands for a GPU); probabilities take that tensor as they take the CPU's array, to the same
    p(z)."""
    import torch

    from deepfield.models.photoz_cnn import network_inputs, probabilities
    from deepfield.models.registry import create_model
    model = create_model("photoz_cnn").eval()
    nb, s = len(model.bands), model.size
    rng = np.random.default_rng(4)
    stamps = (rng.standard_normal((5, nb, s, s)) * 3.0).astype(np.float32)
    flux = rng.uniform(50, 500, (5, nb))
    present = np.ones((5, nb), bool)
    present[1, 0] = False
    image, phot = network_inputs(model, stamps, flux, present)
    assert isinstance(image, np.ndarray) and not image[1, 0].any()
    on_meta, phot_meta = network_inputs(model, stamps, flux, present, device="meta")
    assert isinstance(on_meta, torch.Tensor) and on_meta.device.type == "meta" and on_meta.shape == image.shape
    np.testing.assert_array_equal(phot_meta, phot)
    np.testing.assert_allclose(probabilities(model, torch.from_numpy(image), phot),
                               probabilities(model, image, phot), rtol=0, atol=1e-7)


def test_the_cnns_bfloat16_convolutions_give_float32s_redshifts():
    """`precision` bfloat16 (the default `auto` on a CPU with AVX512-BF16 or AMX; emulated, slower, elsewhere)
    runs the CNN's convolutions under torch.autocast: on noisy galaxy-like stamps the p(z) of both methods that
    run it stay within 0.01 per bin of float32's and 95 % of the redshifts within 0.005 (1 + z) (on 3,160 simulated
    galaxies at i < 24 the hybrid's sigma_NMAD was 0.0375 in both, models/cards/photoz_cnn.md)."""
    from deepfield.models.photoz_cnn import band_probabilities, estimates
    from deepfield.tasks.stages.photoz import PhotoZStage
    rng = np.random.default_rng(11)
    n, s = 200, 32
    yy, xx = np.mgrid[:s, :s] - (s - 1) / 2
    sigma = rng.uniform(1.2, 4.0, n)
    flux = rng.uniform(300, 30000, n)[:, None] * np.array([0.5, 1.0, 1.5, 1.8]) * rng.uniform(0.6, 1.4, (n, 4))
    var = sigma[:, None, None] ** 2
    prof = np.exp(-(xx ** 2 + yy ** 2)[None] / (2 * var)) / (2 * np.pi * var)
    stamps = (flux[:, :, None, None] * prof[:, None] + rng.normal(0, 6.0, (n, 4, s, s))).astype(np.float32)
    err = np.full_like(flux, 60.0)
    bands = ["g", "r", "i", "z"]
    got = {}
    for precision in ("float32", "bfloat16"):
        for method in ("cnn", "hybrid"):
            stage = PhotoZStage(method=method, precision=precision)
            stage.ensure_setup()
            assert stage.arithmetic == precision
        net = stage.cnn  # hybrid's, the same weights as method cnn's
        got[precision] = (band_probabilities(net, stamps, flux, bands)[0], estimates(net, stamps, flux, err, bands))
    (p32, e32), (p16, e16) = got["float32"], got["bfloat16"]
    assert np.abs(p16 - p32).max() < 0.01
    assert 0 < np.abs(p16 - p32).max()  # the arithmetic did change
    dz = np.abs(e16["z_phot"] - e32["z_phot"]) / (1 + e32["z_phot"])
    # the median of a two-peaked p(z) can move from one peak to the other with either arithmetic: a few rows
    assert np.all(np.isfinite(dz)) and np.median(dz) < 0.001 and np.mean(dz < 0.005) >= 0.95, np.sort(dz)[-10:]
