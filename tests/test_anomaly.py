"""The GAN anomaly scorer: shapes, the gradient penalty on a case worked by hand, a short training run, the
labelling of stamps against the truth, the shipped weights on galaxies with and without artefacts, and the
merge's sigma scores and ranked list."""
from __future__ import annotations

import galsim
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from deepfield.tasks.trainsets.anomaly import label_sources
from deepfield.models.anomaly_gan import AnomalyGAN, anomaly_scores, gradient_penalty, scale_stamps
from deepfield.models.registry import create_model, entry, model_version
from deepfield.models.train_anomaly import N_CRITIC, critic_step, train_gan
from deepfield.tasks.sim.artefacts import add_satellite_trail
from deepfield.tasks.trainsets.stamp_survey import StampSurvey


def test_shapes_and_determinism():
    torch.manual_seed(0)
    m = AnomalyGAN().eval()
    z = torch.randn(5, m.z_dim)
    x = m.generator(z)
    assert x.shape == (5, 3, 32, 32) and x.abs().max() <= 1
    assert m.critic(x).shape == (5, 1)
    assert m.critic.features(x).shape == (5, m.critic.n_features)
    assert m.encoder(x).shape == (5, m.z_dim)
    torch.manual_seed(0)
    m2 = AnomalyGAN().eval()
    assert torch.equal(x, m2.generator(z))  # same seed, same initial weights
    r = anomaly_scores(m, x.detach().numpy(), steps=3)
    assert set(r) == {"score", "pixel", "feature"} and r["score"].shape == (5,)
    np.testing.assert_allclose(r["score"], 0.7 * r["pixel"] + 0.3 * r["feature"], rtol=1e-5)
    assert all(p.requires_grad for p in m.parameters())  # scoring leaves the model trainable


class _Linear(nn.Module):
    """D(x) = sum(w * x): its gradient is w everywhere, so the penalty is (||w|| - 1)^2 exactly."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("norm, expected", [(1.0, 0.0), (3.0, 4.0), (0.5, 0.25)])
def test_gradient_penalty_of_a_linear_critic(norm, expected):
    w = torch.randn(3, 8, 8)
    w = w / w.norm() * norm
    real, fake = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    gp = gradient_penalty(_Linear(w), real, fake)
    assert float(gp.detach()) == pytest.approx(expected, abs=1e-5)


def test_scaling_is_asinh_in_sky_sigma():
    sigma = np.array([[2.0, 4.0, 1.0]], np.float32)
    stamps = np.zeros((1, 3, 4, 4), np.float32)
    stamps[0, :, 0, 0] = [2.0 * 3, 4.0 * 3000, -1e6]  # 3 sigma in g, 3000 sigma in r, far below in i
    x = scale_stamps(stamps, sigma)
    assert x[0, 0, 0, 0] == pytest.approx(np.arcsinh(1.0) / np.arcsinh(1000 / 3), rel=1e-5)
    assert x[0, 1, 0, 0] == 1.0 and x[0, 2, 0, 0] == -1.0  # clipped to [-1, 1]
    assert x[0, 0, 1, 1] == 0.0


def _blobs(n: int, seed: int) -> torch.Tensor:
    """Toy 'galaxies': round Gaussians of random width and brightness, scaled like stamps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] - 15.5
    out = np.zeros((n, 3, 32, 32), np.float32)
    for k in range(n):
        s, a = rng.uniform(1.5, 4), rng.uniform(20, 300)
        out[k] = a * np.exp(-(xx ** 2 + yy ** 2) / (2 * s * s)) * np.array([0.5, 0.8, 1.0])[:, None, None]
    return torch.as_tensor(scale_stamps(out + rng.normal(size=out.shape).astype(np.float32), np.ones((n, 3))))


def test_critic_learns_to_separate_real_from_generated():
    """With the generator held, the critic's Wasserstein estimate E[D(real)] - E[D(G(z))] starts near 0 and
    grows as the critic learns, while the penalty keeps its gradient norm near 1; a short GAN run logs
    finite figures."""
    torch.manual_seed(0)
    m = AnomalyGAN()
    x = _blobs(128, 0)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(m.critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
    ws = [critic_step(m, opt, x[torch.randint(0, 128, (32,), generator=g)], g) for _ in range(40)]
    first, last = np.mean([w["w"] for w in ws[:3]]), np.mean([w["w"] for w in ws[-5:]])
    assert abs(first) < 0.25 * last and last > 0.2
    assert np.mean([w["gp"] for w in ws[-5:]]) < 1.0
    log = train_gan(m, x, iters=4, batch=16, seed=0, device="cpu", log_every=2)
    assert len(log) == 2 and all(np.isfinite([r["w"], r["gp"], r["g_loss"]]).all() for r in log)
    assert N_CRITIC == 5


def test_gan_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    """A run stopped after 3 of 6 steps and resumed from its checkpoint ends with the weights of an
    uninterrupted run of the same seed."""
    x = _blobs(64, 1)
    runs = []
    for stop in (None, 3):
        torch.manual_seed(0)
        m = AnomalyGAN()
        ck = tmp_path / f"gan{stop}.ckpt"
        if stop:
            assert train_gan(m, x, iters=6, batch=8, seed=0, device="cpu", checkpoint=ck, stop_after=stop) is None
            assert ck.exists()
            torch.manual_seed(0)
            m = AnomalyGAN()  # a fresh process: nothing but the checkpoint carries over
        log = train_gan(m, x, iters=6, batch=8, seed=0, device="cpu", log_every=2, checkpoint=ck)
        runs.append((m.state_dict(), log))
    (a, log_a), (b, log_b) = runs
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_a[-1]["w"] == log_b[-1]["w"] and log_b[-1]["iter"] == 6


def test_a_new_encoder_keeps_the_generator_and_critic_and_lowers_its_loss():
    """retrain_encoder: the generator and critic of the given weights unchanged to the bit, the encoder started
    afresh from its own seed (not the old one) and trained (its loss falls over 60 steps on toy galaxies), the
    record naming the source; stamps of other bands than the weights' are refused."""
    from deepfield.models.train_anomaly import retrain_encoder, stalled
    x = _blobs(96, 2).numpy()
    torch.manual_seed(0)
    m = AnomalyGAN()
    weights = dict(model="anomaly_wgan", arch=dict(bands=["g", "r", "i"], size=32), command="deepfield train anomaly",
                   gan_log=[{"iter": 1, "w": 0.0}], state_dict=m.state_dict())
    rec, state = retrain_encoder(x, weights, enc_iters=60, batch=16, seed=0, encoder_seed=3,
                                 data={"bands": "g,r,i"}, source="old.pt", log_every=20)
    old = m.state_dict()
    for k in old:
        same = torch.equal(old[k], state[k])
        assert same == (not k.startswith("encoder.")) or "num_batches" in k, k
    torch.manual_seed(3)
    start = AnomalyGAN().encoder.state_dict()
    assert any(not torch.equal(start[k], state["encoder." + k]) for k in start)  # trained from that start
    log = [e["loss"] for e in rec["encoder_log"]]
    assert rec["encoder_from"] == "old.pt" and rec["encoder_seed"] == 3 and rec["gan_log"] == weights["gan_log"]
    assert log[-1] < log[0] and set(rec["score_norm"]) >= {"pixel", "feature"}
    assert not stalled(rec["encoder_log"]) and stalled([{"iter": 200, "loss": 0.187}, {"iter": 3000, "loss": 0.188}])
    with pytest.raises(ValueError, match="do not fit"):
        retrain_encoder(x, weights, enc_iters=2, data={"bands": "g,r,z"}, source="old.pt")


def test_labels_against_the_truth():
    src = pd.DataFrame(dict(x=[100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0],
                            y=[100.0, 100.0, 100.0, 100.0, 500.0, 500.0, 900.0]))
    anomalies = pd.DataFrame([
        dict(type="cosmic_ray", band="g", x=103.0, y=104.0, params="{}"),  # 5 px: the subject
        dict(type="cosmic_ray", band="g", x=215.0, y=100.0, params="{}"),  # 15 px: in the stamp, off centre
        dict(type="cosmic_ray", band="z", x=300.0, y=100.0, params="{}"),  # z: not in the scorer's bands
        dict(type="satellite_trail", band="r", x=400.0, y=300.0,
             params='{"x0": 396.0, "y0": 0.0, "x1": 396.0, "y1": 1000.0}'),  # passes 4 px away
        dict(type="ghost", band="all", x=500.0, y=450.0, params='{"radius_pix": 50.0, "width_pix": 20.0}'),
        dict(type="amp_offset", band="i", x=600.0, y=500.0, params="{}"),  # not an anomaly
    ])
    lenses = pd.DataFrame(dict(x=[701.0], y=[898.0]))
    got = label_sources(src, anomalies, lenses, stamp=32, bands=["g", "r", "i"])
    assert list(got) == ["cosmic_ray", "contaminated", "normal", "satellite_trail", "ghost", "normal", "lens"]


def _galaxies(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n noisy g, r, i stamps (32 x 32, background zero) of simulated disk galaxies, i = 20-21.5, and sigmas."""
    survey = StampSurvey(bands=["g", "r", "i"], size=32)
    rng = np.random.default_rng(seed)
    sig = np.array([survey.noise_sigma(b, 0.7) for b in survey.bands], np.float32)
    out = np.zeros((n, 3, 32, 32), np.float32)
    for k in range(n):
        mag = rng.uniform(20.0, 21.5)
        gal = galsim.Exponential(half_light_radius=rng.uniform(0.4, 0.9)).shear(
            g=rng.uniform(0, 0.4), beta=rng.uniform(0, np.pi) * galsim.radians)
        for j, dm in enumerate((0.8, 0.3, 0.0)):  # g - i = 0.8, r - i = 0.3
            flux = 10 ** (-0.4 * (mag + dm - survey.zeropoint))
            img = galsim.Convolve(gal.withFlux(flux), galsim.Moffat(beta=3.5, fwhm=0.7))
            out[k, j] = img.drawImage(nx=32, ny=32, scale=0.2).array + rng.normal(0, sig[j], (32, 32))
    return out, np.broadcast_to(sig, (n, 3)).copy()


@pytest.fixture(scope="module")
def shipped():
    return create_model("anomaly_wgan")


def test_shipped_weights_are_small_and_versioned(shipped):
    assert entry("anomaly_wgan").weights.stat().st_size < 10e6
    assert model_version("anomaly_wgan") != "untrained"
    assert shipped.size == 32 and shipped.bands == ["g", "r", "i"]


def test_obvious_artefacts_score_above_normal_galaxies(shipped):
    """Galaxies (i 20-21.5) crossed by a satellite trail (50 sky sigma, r band) or with a cosmic ray (four
    pixels of 100 sky sigma, g band) in their stamp 9-13 px from the centre score above every clean galaxy of
    the set with the local score, in both modes. (Trails of 20 sky sigma across these galaxies do not, nor does
    either kind with the paper's sum; a cosmic ray 5-8 px from the centre, on the galaxy, does not always in the
    fast mode: the model's brightness nearby forgives it, see models/anomaly_gan.py MODEL_REACH.)"""
    from deepfield.models.anomaly_gan import grid_scores
    clean, sig = _galaxies(12, 1)
    trail = clean[:4].copy()
    for k in range(4):
        add_satellite_trail(trail[k, 1], 0.0, 3.0 + 6 * k, 31.0, 28.0 - 6 * k, 1.0, 50 * sig[k, 1])
    cr = clean[4:8].copy()
    for k in range(4):
        cr[k, 0, 6 + 4 * k, 25:29] += 100 * sig[k, 0]
    ones = np.ones_like(clean[:4])
    for steps in (20, 0):
        s_clean = grid_scores(shipped, scale_stamps(clean, sig), np.ones_like(clean), steps=steps)["score"]
        for bad in (trail, cr):
            s_bad = grid_scores(shipped, scale_stamps(bad, sig[:4]), ones, steps=steps)["score"]
            assert s_bad.min() > s_clean.max(), (steps, s_clean, s_bad)


def test_generator_with_transposed_convolutions_as_pixel_shuffles_gives_the_same_images():
    """models.inference.transposed_as_shuffle (the stage's faster generator) reproduces the generator's output
    to float rounding, batch norms (with non-trivial running statistics) folded in."""
    import copy

    from deepfield.models.inference import transposed_as_shuffle
    torch.manual_seed(3)
    g = AnomalyGAN().generator
    g.train()
    with torch.no_grad():
        for _ in range(5):  # running statistics away from 0 and 1
            g(torch.randn(64, 64) * 2 + 0.5)
    g.eval()
    fast = transposed_as_shuffle(copy.deepcopy(g))
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in fast.modules())
    z = torch.randn(16, 64)
    with torch.no_grad():
        np.testing.assert_allclose(fast(z).numpy(), g(z).numpy(), atol=2e-6)


def test_training_windows_of_another_band_set(tmp_path):
    """--bands: windows in the bands asked for, the record naming them; a cache made for other bands is not
    reused; g, r, i and g, r, z windows come from the same fields and positions (their g, r planes agree); u,
    which the default fields lack, is simulated besides g, r, i, z."""
    from deepfield.tasks.trainsets.anomaly import training_windows
    cache = tmp_path / "w.npz"
    kw = dict(fields=1, field_size=256, seed=3, per_tile=5, workers=1)
    gri, d1 = training_windows(cache=cache, bands=["g", "r", "i"], **kw)
    assert gri.shape[1:] == (3, 32, 32) and d1["bands"] == "g,r,i" and len(gri) > 0
    np.testing.assert_array_equal(training_windows(cache=cache, bands=["g", "r", "i"], **kw)[0], gri)  # reused
    grz, d2 = training_windows(cache=cache, bands=["g", "r", "z"], **kw)
    assert d2["bands"] == "g,r,z"
    np.testing.assert_array_equal(grz[:, :2], gri[:, :2])
    assert not np.array_equal(grz[:, 2], gri[:, 2])
    ugr, d3 = training_windows(bands=["u", "g", "r"], **kw)
    assert ugr.shape[1:] == (3, 32, 32) and d3["bands"] == "u,g,r"
    assert np.isfinite(ugr).all() and (np.abs(ugr) > 0).any(axis=(0, 2, 3)).all()  # every band has pixels


def _local_terms_as_written(x, g, fx, fg, noise, reach):
    """The local terms of models/anomaly_gan.local_terms in their plain form (its docstring), as they were
    written before the function was made faster: the reference it must match to the bit."""
    from deepfield.models import anomaly_gan as ag
    ug = ag.unscale(g)
    m = ug.abs()
    near = ag._square_max(m.amax(1, keepdim=True), reach) if reach else m
    eff = noise * torch.sqrt(1 + near / ag.MODEL_SCALE + (ag.MODEL_FRAC * near) ** 2)
    signed = torch.where(noise > 0, (ag.unscale(x) - ug) / eff.clamp_min(1e-6), torch.zeros_like(x))
    r = signed.abs()
    pooled = torch.nn.functional.avg_pool2d(r, ag.POOL) if ag.POOL > 1 else r
    best, band = pooled.max(dim=1)
    flat = best.flatten(1)
    top, where = flat.topk(min(ag.TOP_K, flat.shape[1]), dim=1)
    w = where[:, 0]
    band0 = band.flatten(1).gather(1, w[:, None])[:, 0]
    cy = torch.div(w, best.shape[2], rounding_mode="floor") * ag.POOL + (ag.POOL - 1) / 2
    cx = (w % best.shape[2]) * ag.POOL + (ag.POOL - 1) / 2
    cells = (fx - fg).abs().sum(1).flatten(1).max(1).values
    q = x.shape[-1] // 2
    sky = ((m.amax(1, keepdim=True) < ag.SKY_LEVEL) & (noise > 0)).to(signed.dtype)
    total = torch.nn.functional.avg_pool2d(signed * sky, q) * q * q
    n = torch.nn.functional.avg_pool2d(sky.expand_as(signed), q) * q * q
    diffuse = torch.where(n >= ag.MIN_SKY, total.abs() / n.clamp_min(1).sqrt(), torch.zeros_like(n)).flatten(1).max(1).values
    return top.mean(1), cells, band0, torch.stack([cy, cx], 1), diffuse, ug.flatten(1).amax(1)


@pytest.mark.parametrize("reach", [0, 5])
def test_local_terms_match_their_plain_form_to_the_bit(reach):
    """The fast local terms (in place, one memory layout, band maxima as plane maxima) equal the plain
    expressions exactly on windows with bright sources, sky, pixels and a whole band without noise, and a
    window without data, in the networks' channels-last layout; under autograd (the encoder's training) they
    give the same value and gradient."""
    from deepfield.models.anomaly_gan import local_terms, scale_stamps
    rng = np.random.default_rng(5)
    n, nb, s = 64, 4, 32
    sky = rng.normal(size=(n, nb, s, s))
    yy, xx = np.mgrid[0:s, 0:s]
    src = np.exp(-((xx - 15.3) ** 2 + (yy - 16.1) ** 2) / 6.0) * rng.uniform(0, 400, size=(n, 1, 1, 1))
    x = torch.as_tensor(scale_stamps((sky + src).astype(np.float32), np.ones((n, nb), np.float32)))
    g = torch.as_tensor(scale_stamps((0.9 * src + 0.1 * rng.normal(size=(n, nb, s, s))).astype(np.float32),
                                     np.ones((n, nb), np.float32)))
    noise = torch.as_tensor(rng.uniform(0.8, 1.5, size=(n, nb, s, s)).astype(np.float32))
    noise[3, :, :5] = 0
    noise[4, 2] = 0
    noise[5] = 0
    fx, fg = torch.randn(n, 64, 4, 4), torch.randn(n, 64, 4, 4)
    cl = torch.channels_last
    with torch.no_grad():
        got = local_terms(x.contiguous(memory_format=cl), g.contiguous(memory_format=cl), fx, fg, noise, reach)
        want = _local_terms_as_written(x, g, fx, fg, noise, reach)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert got[0][5] == 0 and got[4][5] == 0  # no data: no pixel or diffuse term
    grads = []
    for f in (local_terms, _local_terms_as_written):
        gg = g.clone().requires_grad_(True)
        v = f(x, gg, fx, fg, noise, reach)[0].mean()
        v.backward()
        grads.append((v.detach(), gg.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_line_term_finds_a_faint_line_and_not_noise_blobs_or_slopes():
    """line_terms on residuals in noise units (4 bands, 32 px): white noise alone stays under 2.5 (the merge's
    offset is 3); a trail 4 sigma on its axis (Gaussian profile, sigma 1.3 px) in one band at 30 degrees, 5 px off
    the centre, reaches 4.5 and more, with its band, its direction within one step (11.25 degrees) and its point
    within 3 px of the trail; a compact source's residual of total S/N 60 and a sky slope of 0.1 sigma per px
    (3 sigma per pixel across the window) stay under 2.5; a window that is not sky gives 0."""
    from deepfield.models.anomaly_lines import line_terms
    rng = np.random.default_rng(5)
    n, nb, s = 64, 4, 32
    noise = rng.normal(size=(n, nb, s, s)).astype(np.float32)
    sky = torch.ones(n, nb, s, s)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    c, th = (s - 1) / 2, np.radians(30.0)
    d = -(xx - c) * np.sin(th) + (yy - c) * np.cos(th) - 5.0  # distance from the trail
    trail = (4.0 * np.exp(-0.5 * (d / 1.3) ** 2)).astype(np.float32)
    blob = np.exp(-0.5 * ((xx - 20) ** 2 + (yy - 12) ** 2) / 1.5 ** 2)
    blob = (60 * blob / np.sqrt((blob ** 2).sum())).astype(np.float32)  # matched-filter S/N 60
    slope = (0.1 * (xx - c)).astype(np.float32)
    base = line_terms(torch.as_tensor(noise), sky).numpy()
    assert base[:, 0].max() < 2.5, base[:, 0].max()  # 1.3
    out = {}
    for name, add in (("trail", trail), ("blob", blob), ("slope", slope)):
        x = noise.copy()
        x[:, 2] += add
        out[name] = line_terms(torch.as_tensor(x), sky).numpy()
    t = out["trail"]
    assert np.median(t[:, 0]) > 4.5 and (t[:, 3] == 2).mean() > 0.9, np.median(t[:, 0])  # 5.3
    assert np.median(np.abs((t[:, 4] - 30.0 + 90) % 180 - 90)) <= 11.25
    py, px = t[:, 1], t[:, 2]
    dist = np.abs(-(px - c) * np.sin(th) + (py - c) * np.cos(th) - 5.0)
    assert np.median(dist) < 3, np.median(dist)
    assert np.median(out["blob"][:, 0]) < 2.5 and np.median(out["slope"][:, 0]) < 2.5, (  # 1.0, 2.0
        np.median(out["blob"][:, 0]), np.median(out["slope"][:, 0]))
    none = line_terms(torch.as_tensor(noise[:2] + trail), torch.zeros(2, nb, s, s)).numpy()
    assert (none[:, 0] == 0).all()
