"""Anomaly candidates from hand-made grids of windows (no network, no simulated field): one candidate per region
with its shape hint and fields merged, a cosmic ray on a trail split out, a trail's pieces on one line joined, the
sigma-score against windows as bright; and the figures of `deepfield eval anomaly` on hand-made scores."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepfield.catalogs.anomaly_candidates import build_candidates, window_sigma
from deepfield.tasks.stages._anomaly_grid import LINE_OFFSET, LINE_SIGMA_MAX


def _grid(field: str, n: int, ra0: float, hot: dict[tuple[int, int], tuple[float, float, float]]) -> pd.DataFrame:
    """An n x n grid of windows (stride 16, 0.2"/px, ra increasing with x) of score 1 (+- 0.1), and `hot`
    windows (ky, kx) -> (score, peak offset x, peak offset y)."""
    rng = np.random.default_rng(len(hot))
    ky, kx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    w = pd.DataFrame({"field": field, "ky": ky.ravel(), "kx": kx.ravel()})
    w["x"], w["y"] = w.kx * 16 + 15.5, w.ky * 16 + 15.5
    w["score"] = 1 + 0.1 * rng.standard_normal(len(w))
    w["peak_x"], w["peak_y"] = w.x, w.y
    for (y, x), (s, dx, dy) in hot.items():
        k = y * n + x
        w.loc[k, ["score", "peak_x", "peak_y"]] = [s, w.x[k] + dx, w.y[k] + dy]
    w["ra"], w["dec"] = ra0 + w.peak_x * 0.2 / 3600, 0.0 + w.peak_y * 0.2 / 3600
    w["score_paper"], w["band"] = w.score, "g"
    return w


def test_candidates_one_per_region_with_shape_hints_and_fields_merged():
    """Hand-made grids: a point (four windows seeing one pixel), a diagonal line of ten windows whose middle
    fades below the cut but not below the growth threshold, and an extended blob are three candidates with
    their shapes; the same point seen by a second field overlapping on the sky is not a fourth."""
    point = {(5, 5): (20.0, 8, 8), (5, 6): (18.0, -8, 8), (6, 5): (18.0, 8, -8), (6, 6): (17.0, -8, -8)}
    line = {(20 + k, 3 + k): ((9.0 if k in (4, 5) else 15.0), 0, 0) for k in range(10)}
    blob = {(y, x): (16.0, 0, 0) for y in range(10, 13) for x in range(25, 28)}
    a = _grid("fa", 40, 10.0, {**point, **line, **blob})
    b = _grid("fb", 12, 10.0, {(5, 5): (20.0, 8, 8)})  # field fb: the same sky as fa's corner
    sigma, stats = window_sigma(pd.concat([a, b]).score.to_numpy())
    cut = float((15.0 - stats["median"]) / stats["scale"])  # 15: the line's fading middle (9) is below
    cand, _ = build_candidates(pd.concat([a, b], ignore_index=True), cut, 16, sigma_grow=cut / 3)
    assert len(cand) == 3, cand
    by_shape = dict(zip(cand["shape"], cand.n_windows))
    assert by_shape == {"point": 5, "linear": 10, "extended": 9}  # the point: fa's four and fb's one
    assert list(cand.anomaly_rank) == [1, 2, 3] and cand.anomaly_sigma.is_monotonic_decreasing
    p = cand[cand["shape"] == "point"].iloc[0]
    assert (p.x, p.y) == (5 * 16 + 15.5 + 8, 5 * 16 + 15.5 + 8)


def test_a_cosmic_ray_on_a_trail_is_its_own_candidate_and_the_trail_stays_whole():
    """A trail two windows wide and 16 long (sigma 12, each window's worst pixel its own place along it) with
    a cosmic ray on it (the four windows that hold its pixel all find it the worst, sigma 40-50): two candidates,
    the cosmic ray at its pixel and the trail in one piece on both sides of it, placed at its middle. Before the
    points were split out they were one candidate, at the cosmic ray: the trail was not listed."""
    trail = {(10 + r, 2 + k): (12.0, 0, 0) for r in (0, 1) for k in range(16)}
    ray = {(10, 8): (50.0, 8, 8), (10, 9): (45.0, -8, 8), (11, 8): (44.0, 8, -8), (11, 9): (40.0, -8, -8)}
    w = _grid("f", 30, 10.0, {**trail, **ray})
    sigma, stats = window_sigma(w.score.to_numpy())
    cut = float((10.0 - stats["median"]) / stats["scale"])
    cand, _ = build_candidates(w, cut, 16)
    assert len(cand) == 2, cand
    ray_row, trail_row = cand.iloc[0], cand.iloc[1]
    assert ray_row["shape"] == "point" and ray_row.n_windows == 4
    assert (ray_row.x, ray_row.y) == (8 * 16 + 15.5 + 8, 10 * 16 + 15.5 + 8)
    assert trail_row["shape"] == "linear" and trail_row.n_windows == 28  # both sides of the ray, one piece
    assert abs(trail_row.x - (2 + 7.5) * 16 - 15.5) <= 16  # the middle of the trail, not one end


def test_pieces_of_a_trail_on_one_line_are_one_candidate_and_crossing_trails_two():
    """Hand-made grid with the line term: a trail y = 0.25 x + 100 whose windows' line term (S/N 12, sigma 9)
    falls to nothing over two gaps of three windows, and a steeper trail in two pieces, whose line would cross the
    first's, each window's line point on its trail and its direction the line term's nearest (11.25 and 112.5
    degrees against 14.0 and 116.6): two candidates, each of all its pieces' windows, linear, in r, placed on its
    trail."""
    w = _grid("f", 64, 10.0, {})
    for c, v in (("line", 0.0), ("line_angle", 0.0), ("line_band", "g")):
        w[c] = v
    w["line_x"], w["line_y"] = w.x, w.y

    def paint(xs, ys, angle) -> set:
        ks = set()
        for x, y in zip(xs, ys):
            k = int(np.rint((y - 15.5) / 16)) * 64 + int(np.rint((x - 15.5) / 16))
            w.loc[k, ["line", "line_x", "line_y", "line_angle", "line_band"]] = [12.0, x, y, angle, "r"]
            ks.add(k)
        return ks

    xa = np.array([16 * k + 15.5 for k in range(64) if not (10 <= k < 13 or 30 <= k < 33)])
    a = paint(xa, 0.25 * xa + 100, 11.25)
    yb = np.array([16 * k + 15.5 for k in range(25, 60) if not (40 <= k < 44)])
    b = paint(600 - 0.5 * yb, yb, 112.5)
    w["line_ra"], w["line_dec"] = 10.0 + w.line_x * 0.2 / 3600, w.line_y * 0.2 / 3600
    cand, stats = build_candidates(w, 5.0, 16)
    assert stats["line_windows"] == len(a | b)
    assert len(cand) == 2, cand
    n = sorted(cand.n_windows)  # every painted window, and a window of the noise beside it maybe
    assert sorted([len(a), len(b)]) <= n and n[0] <= len(b) + 2 and n[1] <= len(a) + 2, n
    assert (cand["shape"] == "linear").all() and (cand.bands == "r").all()
    assert np.allclose(cand.anomaly_sigma, min(12.0 - LINE_OFFSET, LINE_SIGMA_MAX))
    on_a = np.abs(cand.y - (0.25 * cand.x + 100)) < 2
    on_b = np.abs(cand.x - (600 - 0.5 * cand.y)) < 2
    assert (on_a ^ on_b).all() and on_a.sum() == 1


def test_window_sigma_compares_a_window_with_those_as_bright():
    """Faint windows (model peak 2 sky sigma, log score N(0, 0.1)) and bright ones (peak 100, N(1.5, 0.3)):
    a score that is ordinary among the bright windows is a high sigma on a faint one. The sigma-score is the
    formula of the module docstring, checked against medians and MADs computed here; without model_peak, with a
    window lacking it, or with too few windows for two bins, it is the plain (score - median) / (1.4826 MAD)."""
    from deepfield.catalogs.anomaly_candidates import MIN_BIN
    rng = np.random.default_rng(3)
    n = 2 * MIN_BIN
    ls = np.concatenate([rng.normal(0.0, 0.1, n), rng.normal(1.5, 0.3, n), [2.1, 2.1]])
    peak = np.concatenate([np.full(n, 2.0), np.full(n, 100.0), [100.0, 2.0]])
    sigma, stats = window_sigma(np.exp(ls), peak)
    assert stats["log"] and stats["bins"] == 4

    def robust(v):
        m = np.median(v)
        return m, 1.4826 * np.median(np.abs(v - m))
    med, scale = robust(ls)
    bright, faint = peak == 100.0, peak == 2.0  # four bins of equal counts: two of each, split at the tie
    for who, k in ((bright, -2), (faint, -1)):
        edges = np.quantile(np.log1p(peak), np.linspace(0, 1, 5))
        b = np.clip(np.searchsorted(edges, np.log1p(peak), side="right") - 1, 0, 3)
        mb, sb = robust(ls[b == b[k]])
        assert sigma[k] == pytest.approx((ls[k] - 0.5 * (med + mb)) / np.sqrt(scale * sb), rel=1e-9)
    assert sigma[-1] > 5 and sigma[-2] < 2  # the same score: 5.3 on a faint window, 1.7 on a bright one
    plain = (np.exp(ls) - np.median(np.exp(ls))) / (1.4826 * np.median(np.abs(np.exp(ls) - np.median(np.exp(ls)))))
    for args in ((np.exp(ls),), (np.exp(ls), np.where(np.arange(len(ls)) == 5, np.nan, peak)),
                 (np.exp(ls[:MIN_BIN]), peak[:MIN_BIN])):
        s, st = window_sigma(*args)
        assert not st["log"]
        np.testing.assert_allclose(s, plain if len(s) == len(ls) else
                                   window_sigma(np.exp(ls[:MIN_BIN]))[0], rtol=1e-12)


def test_evaluation_ghost_snr_and_a_group_row():
    """`deepfield eval anomaly`'s helpers: a ghost's S/N in a window, computed by hand (amplitudes over the
    sky noise added in quadrature over the bands, a band without its own amplitude taking the ghost's; times the
    square root of size x min(width, size) pixels); and a group's row (its windows against the normal ones, its
    anomalies' best windows against the 99th percentile), here with scores whose ranks are known."""
    from deepfield.flows.evaluate.anomaly import figures, ghost_window_snr
    p = dict(amplitude=0.3, width_pix=10.0, amplitude_by_band={"g": 0.1, "r": 0.2})
    assert ghost_window_snr(p, {"g": 1.0, "r": 0.5}, 32) == pytest.approx(np.sqrt(0.01 + 0.16) * np.sqrt(320))
    assert ghost_window_snr(dict(p, width_pix=50.0), {"g": 1.0, "r": 0.5, "i": 0.3}, 32) == pytest.approx(
        np.sqrt(0.01 + 0.16 + 1.0) * 32)
    # 1000 normal windows scored 0..999; a faint ghost on windows 1000-1001 (scores 1.5, 2.5: below almost
    # every normal window), a visible one on 1002-1003 (scores 500.5 and 1500: above every normal window)
    scores = np.concatenate([np.arange(1000.0), [1.5, 2.5, 500.5, 1500.0]])
    label = np.array(["normal"] * 1000 + ["ghost"] * 4)
    faint, visible = np.array([1000, 1001]), np.array([1002, 1003])
    f = figures(scores, label, [("ghost", faint), ("ghost", visible)], {"visible": [visible]})
    auroc_visible = (501 / 1000 + 1.0) / 2  # the share of normal windows below each of its windows (0..500), averaged
    assert f["types"]["visible"]["auroc"] == pytest.approx(auroc_visible)
    assert f["types"]["visible"]["windows"] == 2 and f["types"]["visible"]["injected"] == 1
    assert f["types"]["visible"]["top1"] == 1.0
    assert f["types"]["ghost"]["injected"] == 2 and f["types"]["ghost"]["top1"] == 0.5
    assert f["types"]["ghost"]["auroc"] == pytest.approx((0.002 + 0.003 + 0.501 + 1.0) / 4)
    assert f["types"]["visible"]["top1_normal"] == 1.0 and f["types"]["ghost"]["top1_normal"] == 0.5
    assert f["top1_normal_type_mean"] == 0.5  # one type (ghost) among the injected anomalies


def test_evaluation_top_percent_against_the_normal_windows():
    """Many anomalies crowd the top 1 % of all windows: 30 cosmic rays, each on one window scoring 995-997.9,
    above every normal window but five (scores 0..999; their 99th percentile is 989.01), hold 9 of the top 1 %
    of all 1,030 windows (the 99th percentile of all is 997.07); against the normal windows alone every one is
    above the 99th percentile and none reaches the 99.9th (998.0)."""
    from deepfield.flows.evaluate.anomaly import figures
    cr = 995.0 + 0.1 * np.arange(30)
    scores = np.concatenate([np.arange(1000.0), cr])
    label = np.array(["normal"] * 1000 + ["cosmic_ray"] * 30)
    f = figures(scores, label, [("cosmic_ray", np.array([1000 + i])) for i in range(30)])
    assert np.percentile(scores, 99) == pytest.approx(997.07, abs=0.01)
    assert f["top1"] == pytest.approx(9 / 30) and f["top1_normal"] == 1.0 and f["top01_normal"] == 0.0
    assert f["types"]["cosmic_ray"]["top1_normal"] == 1.0 and f["top1_normal_type_mean"] == 1.0


def test_evaluation_figures_of_the_anomalies_a_window_can_show():
    """The `visible` figures leave out the windows and the anomalies that no window can show: 1000 normal windows
    scored 0..999, a faint ghost on windows 1000-1001 (scores 1.5, 2.5) and a cosmic ray on window 1002 (1500).
    All counted, the AUROC is (0.002 + 0.003 + 1) / 3 and half the anomalies are above the normal 99th
    percentile; without the faint ghost the AUROC is 1 and every anomaly is above it."""
    from deepfield.flows.evaluate.anomaly import figures
    scores = np.concatenate([np.arange(1000.0), [1.5, 2.5, 1500.0]])
    label = np.array(["normal"] * 1000 + ["ghost", "ghost", "cosmic_ray"])
    subjects = [("ghost", np.array([1000, 1001])), ("cosmic_ray", np.array([1002]))]
    unseen = np.zeros(len(scores), bool)
    unseen[1000:1002] = True
    f = figures(scores, label, subjects, None, unseen, [False, True])
    assert f["auroc"] == pytest.approx((0.002 + 0.003 + 1.0) / 3) and f["top1_normal"] == 0.5
    v = f["visible"]
    assert v["auroc"] == 1.0 and v["anomalous_windows"] == 1 and v["injected"] == 1
    assert v["top1_normal"] == 1.0 and v["top1_normal_type_mean"] == 1.0
    assert "visible" not in figures(scores, label, subjects)


def test_eval_anomaly_fields_on_another_grid():
    """`eval anomaly --pixel-scale`: the held-out fields (6 lenses, ring galaxies and mergers and 2 trails per
    field) on another survey's grid, all else the simulator's; the report names the grid."""
    from deepfield.flows.evaluate.anomaly import evaluation_fields, format_report
    base = evaluation_fields(3, 2, 512)
    assert base.pixel_scale == 0.2 and base.population.ring_galaxies_per_field == 6
    other = evaluation_fields(3, 2, 512, 0.262)
    assert other.pixel_scale == 0.262
    assert other.model_dump(exclude={"pixel_scale"}) == base.model_dump(exclude={"pixel_scale"})
    r = dict(stride=16, bands=["g", "r"], n_fields=2, field_size=512, seed=3, labels={}, modes={}, pixel_scale=0.262)
    assert '0.262" pixels' in format_report(r).splitlines()[0]
    assert "pixels" not in format_report({**r, "pixel_scale": 0.2}).splitlines()[0]
