"""`deepfield eval detect`'s scoring against hand-computed truth: the matching radius and order, a swallowed
member measured with the flux of the detection that holds it, a missed one counted as |dF|/F = 1, a close pair,
purity and shreds, the field-edge margin; SEP alone on synthetic sources; the stage list of the default run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepfield.flows.evaluate.baseline_sep import sep_alone
from deepfield.flows.evaluate.detection import detection_stages
from deepfield.flows.evaluate.detection_scoring import close_pairs, figures, match, score_field, segment_flux

SCALE = 0.2  # arcsec per pixel
RADIUS = 0.6 / SCALE  # the matching radius, 3 px


def test_match_radius_and_nearest_first():
    # 0.5" (2.5 px) matches, 0.7" (3.5 px) does not
    t2d, d2t = match(np.array([100.0, 200.0]), np.array([100.0, 100.0]), np.array([102.5, 203.5]),
                     np.array([100.0, 100.0]), RADIUS)
    assert t2d.tolist() == [0, -1] and d2t.tolist() == [0, -1]
    # one detection between two true objects goes to the nearer; each is matched once
    t2d, d2t = match(np.array([10.0, 13.0]), np.array([0.0, 0.0]), np.array([12.0]), np.array([0.0]), RADIUS)
    assert t2d.tolist() == [-1, 0] and d2t.tolist() == [1]
    # two detections, two objects: nearest pairs first, not first come first served
    t2d, _ = match(np.array([0.0, 2.0]), np.array([0.0, 0.0]), np.array([1.8, 4.0]), np.array([0.0, 0.0]), RADIUS)
    assert t2d.tolist() == [-1, 0]  # object 1 takes detection 0 (0.2 px); object 0 is 1.8 px from it, 4 px from 1


def _flux(mag: float) -> float:
    """Flux in image units at the simulator's zero point, 27."""
    return 10 ** (-0.4 * (mag - 27.0))


def _galaxy(x, y, mag, n_blend, hlr=0.5, kind="galaxy", swallow=np.nan, blendedness=0.0):
    return {"x": x, "y": y, "kind": kind, "mag_i": mag, "flux_i": _flux(mag), "n_blend": n_blend, "hlr": hlr,
            "swallow_flux": swallow, "blendedness": blendedness}


def _scored(n_blend=None):
    """A 200 x 200 px field with hand-placed truth and detections (fluxes in units of each object's F_true);
    `n_blend`: the detections' blend group sizes, if given."""
    f = _flux
    truth = pd.DataFrame([
        _galaxy(50, 50, 23.0, 1),                         # 0 isolated, detected 0.3" away, +10 %
        _galaxy(100, 100, 23.2, 2),                       # 1 close pair with 2 (1.2" apart, hlr sum 1.0")
        _galaxy(106, 100, 23.6, 2),                       # 2   both detected
        _galaxy(150, 150, 22.5, 2),                       # 3 blended, detected: its detection holds 4's light
        _galaxy(153, 152, 23.5, 2, swallow=f(22.5) * 1.3, blendedness=0.3),  # 4 not found, in 3's detection
        _galaxy(40, 150, 23.8, 2, blendedness=0.2),       # 5 blended, in no detection's segment: |dF|/F = 1
        _galaxy(150, 40, 20.0, 1, hlr=0.0, kind="star"),  # 6 star, detected
        _galaxy(5, 100, 22.0, 1),                         # 7 4 px from the edge: scored by no figure
        _galaxy(100, 160, 24.5, 1),                       # 8 isolated, 24-25, 0.7" from its only detection
    ])
    det = pd.DataFrame([
        {"x": 51.5, "y": 50.0, "flux": f(23.0) * 1.1},      # 0 -> truth 0
        {"x": 48.0, "y": 48.5, "flux": 1.0},                # 1 extra detection 2.5 px from truth 0: a shred
        {"x": 100.2, "y": 100.0, "flux": f(23.2) * 0.8},    # 2 -> truth 1
        {"x": 106.0, "y": 100.5, "flux": f(23.6) * 1.2},    # 3 -> truth 2
        {"x": 150.0, "y": 150.0, "flux": f(22.5) * 1.3},    # 4 -> truth 3 (holds 4)
        {"x": 150.0, "y": 40.0, "flux": f(20.0)},           # 5 -> star
        {"x": 100.0, "y": 163.5, "flux": f(24.5)},          # 6 3.5 px from truth 8: unmatched
        {"x": 180.0, "y": 20.0, "flux": 5.0},               # 7 nothing there: unmatched
        {"x": 4.0, "y": 100.0, "flux": f(22.0)},            # 8 -> truth 7, but near the edge: not counted
    ])
    if n_blend is not None:
        det["n_blend"] = n_blend
    return score_field(truth, det, RADIUS, (200, 200))


def test_score_field_outcomes():
    t, d = _scored()
    assert t.det_index.tolist() == [0, 2, 3, 4, -1, -1, 5, 8, -1]
    assert t.outcome.tolist() == ["matched"] * 4 + ["swallowed", "missed", "matched", "matched", "missed"]
    assert t.flux_meas[4] == pytest.approx(t.flux_i[3] * 1.3)  # the swallowing detection's flux
    assert t.flux_meas[5] == 0.0
    assert t.interior.tolist() == [True] * 7 + [False, True]
    assert d.truth_index.tolist() == [0, -1, 1, 2, 3, 6, -1, -1, 7]
    assert t.shredded.tolist() == [True, False, False, False, False, False, False, False, False]


def test_flux_error_by_part():
    # the pair's detections (2, 3) deblended together; truth 3's detection (4) alone, holding 4's light too
    t, d = _scored(n_blend=[1, 1, 2, 2, 1, 1, 1, 1, 1])
    assert t.det_n_blend.tolist()[:4] == [1, 2, 2, 1] and np.isnan(t.det_n_blend[4:6]).all()
    r = figures(t, d.assign(label="none"), np.zeros(0, bool))
    parts = r["flux_blended"]["median_abs_by_part"]
    assert parts["deblended"] == {"n": 2, "median_abs": pytest.approx(0.2)}  # truth 1, 2: -0.2, +0.2
    assert parts["alone"] == {"n": 1, "median_abs": pytest.approx(0.3)}  # truth 3: +0.3
    assert parts["swallowed"]["n"] == 1


def test_figures_by_hand():
    t, d = _scored()
    pairs = close_pairs(t, SCALE)
    assert sorted(map(tuple, pairs.tolist())) == [(1, 2), (3, 4)]  # 3-4: 0.72" apart, hlr sum 1.0"
    found = t.found.to_numpy()[pairs].all(axis=1)
    r = figures(t, d.assign(label=np.where(d.truth_index < 0, "none", "matched")), found)
    c = r["completeness"]
    assert (c["blended_22_24"]["n"], c["blended_22_24"]["found"]) == (5, 3)  # 1, 2, 3 of 1-5
    assert (c["blended_22_23"]["n"], c["blended_22_23"]["found"]) == (1, 1)  # 3 (22.5)
    assert (c["blended_23_24"]["n"], c["blended_23_24"]["found"]) == (4, 2)  # 1, 2 of 1, 2, 4, 5
    assert (c["isolated_22_24"]["n"], c["isolated_22_24"]["fraction"]) == (1, 1.0)  # 7 is at the edge
    assert (c["isolated_24_25"]["n"], c["isolated_24_25"]["fraction"]) == (1, 0.0)
    assert c["stars_lt24"]["fraction"] == 1.0
    assert r["close_pairs"] == {"n": 2, "found": 1, "fraction": 0.5}
    # blended i < 24: errors -0.2, +0.2, +0.3, (1.3 F_3 - F_4) / F_4, -1
    e4 = 1.3 * 10 ** (-0.4 * (22.5 - 23.5)) - 1
    errors = np.array([-0.2, 0.2, 0.3, e4, -1.0])
    fb = r["flux_blended"]
    assert fb["n"] == 5 and fb["outcomes"] == {"matched": 3, "swallowed": 1, "missed": 1}
    assert fb["median_abs"] == pytest.approx(np.median(np.abs(errors)))
    parts = fb["median_abs_by_part"]  # no n_blend on the detections: matched ones are neither deblended nor alone
    assert parts["deblended"] == {"n": 0, "median_abs": None} and parts["alone"]["n"] == 0
    assert parts["swallowed"] == {"n": 1, "median_abs": pytest.approx(abs(e4))}
    assert fb["bias"] == pytest.approx(np.median(errors))
    assert r["flux_isolated"]["median_abs"] == pytest.approx(0.1)
    # overlapped by light (blendedness > 0.1): 4 and 5, neither found
    assert (c["overlapped_22_24"]["n"], c["overlapped_22_24"]["found"]) == (2, 0)
    assert r["flux_overlapped"]["median_abs"] == pytest.approx(np.median(np.abs([e4, -1.0])))
    # interior detections: 8 (the edge one left out), matched 0, 2, 3, 4, 5
    assert r["n_detections"] == 8 and r["purity"] == pytest.approx(5 / 8)
    assert r["n_unmatched"] == 3 and r["shredded_truth"] == 1


def test_segment_flux():
    seg = np.zeros((20, 20), np.int32)
    seg[2:8, 2:8] = 1
    seg[10:18, 10:18] = 3  # a segment id need not follow the row order
    f = segment_flux(seg, np.array([1, 3]), np.array([5.0, 7.0]), np.array([4.0, 12.4, 0.0, 30.0]),
                     np.array([4.0, 17.4, 0.0, 5.0]))
    assert f[:2].tolist() == [5.0, 7.0] and np.isnan(f[2:]).all()  # sky, outside


def _gaussians(sources, sigma: float = 2.0, noise: float = 1.0, seed: int = 1) -> np.ndarray:
    """A 96 x 96 image of round Gaussians (x, y, flux) plus Gaussian noise of `noise` per pixel."""
    yy, xx = np.mgrid[0:96, 0:96]
    img = sum(f / (2 * np.pi * sigma ** 2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
              for x, y, f in sources)
    return np.ascontiguousarray(img + np.random.default_rng(seed).normal(0, noise, img.shape))


@pytest.mark.parametrize("sep_px, rel", [(32.0, 0.02), (12.0, 0.25)])
def test_sep_alone_kron_flux_with_the_neighbour_masked(sep_px, rel):
    """A faint and a 4x brighter round Gaussian: far apart, each Kron flux within 2 % of its true flux; 12 px
    apart (overlapping footprints, deblended by SEP), the faint one within 25 % with the other's segment masked
    (its plain Kron ellipse would hold 5 times its flux; SEP scales a sum up by the aperture's area over its
    unmasked area, hence the excess)."""
    sources = [(40.0, 48.0, 2000.0), (40.0 + sep_px, 48.0, 8000.0)]
    table, seg = sep_alone(_gaussians(sources), np.ones((96, 96)), np.zeros((96, 96), bool), fwhm_px=4.7,
                           kron_k=3.5)
    assert len(table) == 2 and seg.max() == 2
    flux = table.flux.to_numpy()[np.argsort(table.x_tile.to_numpy())]
    assert flux == pytest.approx([2000.0, 8000.0], rel=rel)


def test_the_default_runs_detection_stages():
    stages, halo = detection_stages({"thresh": 2.0})
    assert [n for n, _ in stages] == ["background", "detect", "measure", "deblend"] and halo > 0
    assert dict(stages)["detect"]["thresh"] == 2.0
    assert dict(stages)["measure"]["kron_k"] > 0
    with pytest.raises(ValueError, match="detect"):
        detection_stages({"no_such_key": 1})


def test_the_command_on_a_small_field(tmp_path):
    """`deepfield eval detect` end to end on one 256 x 256 field (about 10 s): the simulation, both methods on
    its tile, the report and the JSON; a mistyped detect parameter is one line before anything runs."""
    import json

    from typer.testing import CliRunner

    from deepfield.flows.cli import app
    runner = CliRunner()
    bad = runner.invoke(app, ["eval", "detect", "--detect-param", "no_such_key=1"])
    assert bad.exit_code == 2 and "no_such_key" in bad.output
    out = tmp_path / "figures.json"
    r = runner.invoke(app, ["eval", "detect", "--fields", "1", "--size", "256", "--seed", "5", "--workers", "1",
                            "--work", str(tmp_path / "work"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "SEP alone" in r.output and "close pairs" in r.output and "deblended / alone / swallowed" in r.output
    fig = json.loads(out.read_text())
    assert fig["swallow_method"] == "segmap" and fig["flux_column"] == "flux_deblend_i"
    for m in ("sep", "deepfield"):
        f = fig["methods"][m]
        assert f["n_detections"] > 20 and 0 < f["purity"] <= 1
        assert f["flux_blended"]["n"] == sum(f["flux_blended"]["outcomes"].values())
        parts = f["flux_blended"]["median_abs_by_part"]
        assert parts["swallowed"]["n"] == f["flux_blended"]["outcomes"]["swallowed"]
        # SEP alone's detections carry no blend group: its matched galaxies are in neither part
        assert parts["deblended"]["n"] + parts["alone"]["n"] == (f["flux_blended"]["outcomes"]["matched"]
                                                                  if m == "deepfield" else 0)
        assert f["cpu_seconds_per_mpx"] > 0
    # both are scored against the same true galaxies
    sep_, net = fig["methods"]["sep"], fig["methods"]["deepfield"]
    assert {k: v["n"] for k, v in sep_["completeness"].items()} == {k: v["n"] for k, v in net["completeness"].items()}
    assert sep_["flux_blended"]["n"] == net["flux_blended"]["n"] and sep_["close_pairs"]["n"] == net["close_pairs"]["n"]


def test_the_shifted_fields():
    """`eval detect --shifted`: the simulator's configuration with Moffat index 2.5, every band's seeing 1.25
    times wider and 0.3 mag shallower, PSF ellipticity up to 0.08, all else as given."""
    from deepfield.flows.evaluate.detection import shifted_fields
    from deepfield.tasks.sim.config import SimConfig
    cfg = SimConfig(seed=3, size=512, fields=2)
    s = shifted_fields(cfg)
    assert (s.psf_beta, s.psf_ellipticity) == (2.5, 0.08) and (cfg.psf_beta, cfg.psf_ellipticity) == (3.5, 0.03)
    for b, spec in cfg.band_specs.items():
        assert s.band_specs[b].psf_fwhm == pytest.approx(1.25 * spec.psf_fwhm)
        assert s.band_specs[b].m5 == pytest.approx(spec.m5 - 0.3) and s.band_specs[b].sky_mag == spec.sky_mag
    assert (s.seed, s.size, s.fields, s.bands) == (cfg.seed, cfg.size, cfg.fields, cfg.bands)


def test_held_out_fields_on_another_pixel_grid():
    """`eval detect --pixel-scale`: the held-out fields sampled at HSC's 0.168" or the Legacy Surveys' 0.262" per
    pixel, the sky, seeing and depth as the simulator's (or as --shifted makes them); a scale the simulator
    refuses is refused."""
    from pydantic import ValidationError

    from deepfield.flows.evaluate.detection import held_out_config, shifted_fields
    from deepfield.tasks.sim.config import SimConfig
    base = held_out_config(3, 512, 2)
    assert base.pixel_scale == 0.2 and base == SimConfig(seed=3, size=512, fields=2)
    for scale in (0.168, 0.262):
        c = held_out_config(3, 512, 2, pixel_scale=scale)
        assert c.pixel_scale == scale
        assert c.model_dump(exclude={"pixel_scale"}) == base.model_dump(exclude={"pixel_scale"})
        s = held_out_config(3, 512, 2, shifted=True, pixel_scale=scale)
        assert s.model_dump(exclude={"pixel_scale"}) == shifted_fields(base).model_dump(exclude={"pixel_scale"})
    with pytest.raises(ValidationError):
        held_out_config(3, 512, 2, pixel_scale=0.0)
