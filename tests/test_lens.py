"""The strong-lens finder: network shapes and determinism, the challenge metrics on hand-made scores, a
short training run, the shipped weights on lens / non-lens pairs, and the stage on tile pixels."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepfield.models.lens_cnn import LensResNet, preprocess, score
from deepfield.models.registry import create_model, input_bands, list_models, model_version
from deepfield.models.train_lens import metrics, tpr_at_fp
from deepfield.tasks.trainsets.lens_stamps import StampConfig, _one_stamp, simulate_stamps


def test_forward_shapes_and_determinism():
    torch.manual_seed(0)
    m = LensResNet(in_bands=4).eval()
    x = torch.randn(5, 4, 48, 48)
    out = m(x)
    assert out.shape == (5,)
    assert torch.equal(out, m(x))
    torch.manual_seed(0)
    m2 = LensResNet(in_bands=4).eval()
    assert torch.equal(out, m2(x))  # same seed, same initial weights
    assert m(torch.randn(2, 4, 64, 64)).shape == (2,)  # any stamp size (global pooling)


def test_registry_and_shipped_weights_are_small():
    assert "lens_resnet" in list_models()
    model = create_model("lens_resnet")
    from deepfield.models.registry import entry
    assert entry("lens_resnet").weights.stat().st_size < 10e6
    assert model_version("lens_resnet") != "untrained"
    assert model.training_info["stamp_config"]["size"] == 48
    with pytest.raises(KeyError, match="unknown model"):
        create_model("no_such_model")


def test_tpr_definitions_on_hand_made_scores():
    # 12 negatives scored 0.0 .. 0.55; lenses at 0.95, 0.6, 0.5, 0.2
    neg = np.linspace(0.0, 0.55, 12)
    pos = np.array([0.95, 0.6, 0.5, 0.2])
    s = np.concatenate([neg, pos])
    y = np.r_[np.zeros(12, int), np.ones(4, int)]
    assert tpr_at_fp(s, y, 0) == 0.5  # above the best negative (0.55): 0.95 and 0.6
    # fewer than ten false positives: above the 10th highest negative, 0.1 -> 0.95, 0.6, 0.5, 0.2
    assert tpr_at_fp(s, y, 9) == 1.0
    m = metrics(s, y)
    assert m["n"] == 16 and m["n_lens"] == 4
    assert 0.5 < m["auroc"] < 1.0


def test_stamps_are_reproducible_and_labelled():
    a = simulate_stamps(70, 0.5, seed=3)
    b = simulate_stamps(70, 0.5, seed=3, workers=2)
    assert np.array_equal(a["images"], b["images"])  # same stamps whatever the number of workers
    assert a["images"].shape == (70, 4, 48, 48) and a["sigma"].shape == (70, 4)
    lenses = a["meta"][a["meta"].label == 1]
    assert set(a["meta"].kind[a["label"] == 1]) == {"lens"}
    assert lenses.theta_e.between(0.8, 3.0).all() and (lenses.magnification > 1).all()
    assert not np.array_equal(a["images"], simulate_stamps(70, 0.5, seed=4)["images"])


def test_short_training_lowers_the_loss(tmp_path):
    """`deepfield train lens` end to end: stamps from the training-set builder, the training loop, the weights
    and their record written where asked, and loadable by the registry."""
    from typer.testing import CliRunner

    from deepfield.flows.cli import app
    w = tmp_path / "w.pt"
    r = CliRunner().invoke(app, ["train", "lens", "--out", str(w), "--n-train", "384", "--n-val", "128", "--epochs",
                                 "4", "--batch", "64", "--lr", "3e-3", "--seed", "1", "--workers", "1"])
    assert r.exit_code == 0, r.output
    rec = json.loads(w.with_suffix(".train.json").read_text())
    h = rec["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    m = create_model("lens_resnet", weights=w)
    assert m.training_info["n_train"] == 384 and m.training_info["history"] == h
    assert input_bands("lens_resnet", w) == ["g", "r", "i", "z"]


def test_shipped_weights_score_lenses_above_their_deflectors_alone():
    """The same deflector, noise and PSF with and without a lensed source: the lens scores higher."""
    model = create_model("lens_resnet")
    cfg = StampConfig(src_mag=(22.0, 23.0), neighbour_rate=0.0)
    bp = cfg.bandpasses()
    wins = 0
    for k in range(8):
        lens = _one_stamp("lens", cfg, np.random.default_rng(100 + k), bp)
        plain = _one_stamp("lone_red", cfg, np.random.default_rng(100 + k), bp)
        s = score(model, np.stack([lens[0], plain[0]]), np.stack([lens[1], plain[1]]))
        wins += s[0] > s[1]
        assert lens[2]["defl_mag"] == plain[2]["defl_mag"]  # same deflector drawn
    assert wins == 8


def test_the_stage_network_as_run_scores_as_the_plain_one():
    """The lens stage's network (batch norms folded, channels-last; `precision` float32 and bfloat16) against
    the plain float32 model on simulated lens and non-lens stamps: float32 the same to 1e-5, bfloat16 (the
    default on a CPU that computes it natively; emulated elsewhere) within 0.03 of the lens probability and
    every lens still above every one of these non-lenses that the plain model puts below it."""
    from deepfield.tasks.stages.lens import LensStage
    cfg = StampConfig(src_mag=(22.0, 23.0))
    d = simulate_stamps(48, 0.5, 7, cfg, workers=1)
    plain = score(create_model("lens_resnet"), d["images"], d["sigma"])
    got = {}
    for precision in ("float32", "bfloat16"):
        stage = LensStage(precision=precision)
        stage.setup("cpu")
        assert stage.arithmetic == precision
        got[precision] = score(stage.model, d["images"], d["sigma"])
    np.testing.assert_allclose(got["float32"], plain, atol=1e-5)
    assert np.abs(got["bfloat16"] - plain).max() < 0.03
    lab = d["label"].astype(bool)
    assert 0 < lab.sum() < len(lab)
    below = plain[~lab] < plain[lab].min()
    assert (got["bfloat16"][~lab][below] < got["bfloat16"][lab].min()).all()


def test_preprocess_scales_by_noise():
    x = np.full((1, 2, 4, 4), 6.0, np.float32)
    out = preprocess(x, np.array([[2.0, 3.0]], np.float32))
    assert torch.allclose(out[0, 0], torch.asinh(torch.tensor(3.0)))
    assert torch.allclose(out[0, 1], torch.asinh(torch.tensor(2.0)))


def test_preprocess_scales_on_the_device_it_is_given():
    """On a GPU the raw pixels are copied and scaled there (the meta device stands for it here)."""
    x = np.full((3, 2, 4, 4), 6.0, np.float32)
    out = preprocess(x, np.ones((3, 2), np.float32), device="meta")
    assert out.device.type == "meta" and out.shape == (3, 2, 4, 4) and out.dtype == torch.float32


def test_field_stamps_are_the_lens_stage_candidates_labelled_by_truth(tmp_path):
    """The lens stage's candidates on a small simulated field with four lenses: brighter than i 22.5; each stamp
    labelled 1 exactly when a simulated deflector lies within 5 px of the candidate, and none kept between 5 and
    15 px of one (an arc piece or a neighbour inside the arcs: neither); each stamp
    centred on its candidate's light."""
    from deepfield.tasks.trainsets.candidate_fields import EXCLUDE_PX, MATCH_PX, field_stamps
    d = field_stamps(1, 5, ["g", "r", "i", "z"], tmp_path, size=640, positives=4, target="lens")
    meta = d["meta"]
    assert d["images"].shape == (len(meta), 4, 48, 48) and d["sigma"].shape == (len(meta), 4)
    assert MATCH_PX["lens"] == 5.0 and EXCLUDE_PX["lens"] == 15.0
    assert ((meta.distance <= 5.0) == (d["label"] == 1)).all() and d["label"].sum() >= 2
    assert not ((meta.distance > 5.0) & (meta.distance <= 15.0)).any()
    assert (meta.mag < 22.5).all() and len(meta) > 50
    assert set(meta.kind) == {"field", "field_lens"}
    # the stamp's middle is the candidate's own light: brighter than the stamp's edge in i
    i_band = d["images"][:, 2]
    centre = i_band[:, 22:26, 22:26].mean(axis=(1, 2))
    edge = np.concatenate([i_band[:, :4].reshape(len(meta), -1), i_band[:, -4:].reshape(len(meta), -1)], 1)
    assert (centre > np.median(edge, axis=1) + 3 * d["sigma"][:, 2]).mean() > 0.95
    with pytest.raises(ValueError, match="lens or merger"):
        field_stamps(1, 5, ["g"], tmp_path, target="cluster")
