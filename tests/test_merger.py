"""The merger finder: its training stamps (tasks/trainsets/lens_stamps.py, merger_config), its stage
(tasks/stages/merger.py) and the merger term of the anomaly candidates (catalogs/anomaly_candidates.py), checked
against answers known by construction."""
from __future__ import annotations

import numpy as np
import pytest

from deepfield.tasks.trainsets.lens_stamps import StampConfig, _one_stamp, merger_config, simulate_stamps


def _quiet(**kw) -> StampConfig:
    """The merger finder's stamps 20 mag deeper (noise negligible), no neighbours."""
    return merger_config(depth_offset=20.0, neighbour_rate=0.0, **kw)


def test_a_pair_is_its_merger_without_the_tails():
    """The same draw as a merger and as a pair: the same galaxies (magnitudes, separation, centring), and the
    merger's extra light is its tails, 10-25 % of its total by construction (less what leaves the stamp), lying
    away from the nuclei."""
    cfg = _quiet(nucleus_centred=0.0)
    bp = cfg.bandpasses()
    fracs = []
    for k in range(6):
        m = _one_stamp("merger", cfg, np.random.default_rng(50 + k), bp)
        p = _one_stamp("pair", cfg, np.random.default_rng(50 + k), bp)
        assert m[2]["separation"] == p[2]["separation"] and m[2]["label"] == 1 and p[2]["label"] == 0
        assert m[2]["mag"] < p[2]["mag"]  # the merger's total holds its tails
        tails = m[0].sum(axis=0) - p[0].sum(axis=0)
        frac = tails.sum() / m[0].sum()
        assert 0.01 < frac < 0.26, (k, frac)  # a long tail leaves the 9.6" stamp (k = 5: 0.025 inside)
        fracs.append(frac)
        # the tails' light lies away from the brightest pixel of the pair (a nucleus)
        yy, xx = np.indices(tails.shape)
        py, px = np.unravel_index(np.argmax(p[0].sum(axis=0)), tails.shape)
        r = np.hypot(yy - py, xx - px)
        assert (tails * r).sum() / tails.sum() > 6.0, k
    assert np.mean(fracs) > 0.05, fracs


def test_merger_stamps_are_reproducible_and_labelled():
    """A set of the merger finder's stamps: the same by seed whatever the workers, labels 1 exactly for the
    mergers, the configured negatives present, close pairs among them."""
    cfg = merger_config()
    a = simulate_stamps(70, 0.5, 3, cfg)
    b = simulate_stamps(70, 0.5, 3, cfg, workers=2)
    np.testing.assert_array_equal(a["images"], b["images"])
    meta = a["meta"]
    assert ((meta.kind == "merger") == (a["label"] == 1)).all()
    assert 20 < a["label"].sum() < 50
    assert set(meta.kind) <= {"merger", *cfg.negatives} and "pair" in set(meta.kind)
    assert meta.loc[meta.kind.isin(["merger", "pair"]), "separation"].between(0.8, 3.0).all()


def test_stamp_configuration_rejects_unknown_or_clashing_kinds():
    with pytest.raises(ValueError, match="unknown stamp kind"):
        StampConfig(positive="blob")
    with pytest.raises(ValueError, match="also among the negatives"):
        merger_config(negatives={"merger": 1.0, "pair": 1.0})


def test_the_shipped_weights_score_mergers_above_their_pairs():
    """The same two galaxies, noise and PSF with and without tidal tails: the shipped merger finder scores the
    merger higher for most draws, and the merger stage's network as run scores as the plain one."""
    from deepfield.models.lens_cnn import score
    from deepfield.models.registry import create_model
    from deepfield.tasks.stages.merger import MergerStage
    cfg = merger_config(neighbour_rate=0.0, nucleus_centred=0.0)
    bp = cfg.bandpasses()
    model = create_model("merger_resnet")
    ims, sgs, mags = [], [], []
    for k in range(12):
        for kind in ("merger", "pair"):
            im, sg, meta = _one_stamp(kind, cfg, np.random.default_rng(300 + k), bp)
            ims.append(im)
            sgs.append(sg)
        mags.append(meta["mag"])
    s = score(model, np.stack(ims), np.stack(sgs))
    m, p = s[0::2], s[1::2]
    assert (m > p).sum() >= 10, (m, p, mags)  # 12 of 12 with the shipped weights of 2026-12-06
    stage = MergerStage(precision="float32")
    stage.setup("cpu")
    np.testing.assert_allclose(score(stage.model, np.stack(ims), np.stack(sgs)), s, atol=1e-5)


def test_field_stamps_are_the_stage_candidates_labelled_by_truth(tmp_path):
    """The merger stage's candidates on a small simulated field with four mergers: each stamp labelled 1 exactly
    when a simulated merger's centre lies within MATCH_PX of the candidate, at least one such; the g, r, z set
    takes the same fields' pixels from the cache (no second simulation), cut with z as the reference band."""
    from deepfield.tasks.trainsets.candidate_fields import MATCH_PX, field_stamps
    d = field_stamps(1, 5, ["g", "r", "i", "z"], tmp_path, size=640, positives=4)
    meta = d["meta"]
    assert d["images"].shape == (len(meta), 4, 48, 48) and d["sigma"].shape == (len(meta), 4)
    assert ((meta.distance <= MATCH_PX["merger"]) == (d["label"] == 1)).all() and d["label"].sum() >= 1
    assert (meta.mag < 22.5).all() and len(meta) > 20
    files = list(tmp_path.iterdir())
    g = field_stamps(1, 5, ["g", "r", "z"], tmp_path, size=640, positives=4)
    assert list(tmp_path.iterdir()) == files and g["images"].shape[1] == 3
    both = meta.merge(g["meta"], on=["field", "x", "y"])  # a candidate of both cuts: the same g, r, z pixels
    assert len(both)
    i = meta.reset_index().merge(g["meta"].reset_index(), on=["field", "x", "y"])
    np.testing.assert_array_equal(d["images"][i.index_x.to_numpy()][:, [0, 1, 3]], g["images"][i.index_y.to_numpy()])
