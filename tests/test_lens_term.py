"""The anomaly candidates' lens and merger terms (catalogs/score_terms.py): the lens and merger stages'
candidates ranked among the grid's windows, checked on hand-made window grids and catalogs whose answer is
known."""
from __future__ import annotations

import numpy as np
import pandas as pd

from deepfield.catalogs.anomaly_candidates import build_candidates
from deepfield.catalogs.score_terms import (LENS_MIN_SCORE, LENS_SIGMA, MERGER_MIN_SCORE, MERGER_TERM, lens_sigma,
                                            lens_term, score_term)


def _windows(n: int = 20, field: str = "f", seed: int = 1) -> pd.DataFrame:
    """A field's grid of n x n windows every 16 px (centres at 15.5 + 16 k), scores 1 +- 0.1, no ring."""
    rng = np.random.default_rng(seed)
    ky, kx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    w = pd.DataFrame({"field": field, "ky": ky.ravel(), "kx": kx.ravel()})
    w["x"], w["y"] = w.kx * 16 + 15.5, w.ky * 16 + 15.5
    w["score"] = 1 + 0.1 * rng.standard_normal(len(w))
    w["peak_x"], w["peak_y"] = w.x, w.y
    w["ra"], w["dec"] = 10 + w.peak_x * 0.2 / 3600, w.peak_y * 0.2 / 3600
    w["score_paper"], w["band"] = w.score, "g"
    return w


def _sources(rows) -> pd.DataFrame:
    s = pd.DataFrame(rows, columns=["field", "x", "y", "lens_score"])
    s["source_id"] = np.arange(len(s), dtype=np.int64) + 100
    s["ra"], s["dec"] = 10 + s.x * 0.2 / 3600, s.y * 0.2 / 3600
    return s


def test_lens_sigma_follows_its_calibration_and_ignores_low_scores():
    at, val = np.array(LENS_SIGMA).T
    assert np.allclose(lens_sigma(at), val)
    assert np.isnan(lens_sigma(np.array([LENS_MIN_SCORE - 0.01, np.nan]))).all()
    s = lens_sigma(np.array([0.6, 0.95, 0.9999]))
    assert np.all(np.diff(s) > 0) and s[-1] == val[-1]  # rising, held at the last point


def test_a_lens_candidate_is_one_candidate_at_the_deflector_with_its_source():
    """One lens candidate (score 0.99) on a grid of plain windows: one anomaly candidate, shape "lens", at the
    source's position with its source_id, ranked at lens_sigma(0.99); a deflector below LENS_MIN_SCORE, one in
    another field's catalog and a catalog without lens_score make none."""
    w = _windows()
    src = _sources([("f", 130.2, 141.7, 0.99), ("f", 250.0, 60.0, 0.3), ("g", 50.0, 50.0, 0.999)])
    sig, row = lens_term(w, src, 16)
    assert np.isfinite(sig).sum() == 1 and row[np.isfinite(sig)][0] == 0
    hit = w[np.isfinite(sig)].iloc[0]  # the window whose centre is nearest: (127.5, 143.5)
    assert (hit.x, hit.y) == (127.5, 143.5)
    cand, stats = build_candidates(w, 5.0, 16, src)
    assert len(cand) == 1 and stats["lens_windows"] == 1, cand
    c = cand.iloc[0]
    assert c["shape"] == "lens" and (c.x, c.y) == (130.2, 141.7) and c.source_id == 100
    assert abs(c.anomaly_sigma - float(lens_sigma(np.array([0.99]))[0])) < 1e-9
    assert len(build_candidates(w, 5.0, 16, src.drop(columns=["lens_score"]))[0]) == 0


def test_a_stronger_window_keeps_its_own_shape_and_sigma():
    """A window already ranked above the lens term (a cosmic ray's sigma) keeps its sigma and shape: the lens
    term only lifts windows."""
    w = _windows()
    at = (w.ky == 8) & (w.kx == 8)
    w.loc[at, "score"] = 1000.0
    before, _ = build_candidates(w, 5.0, 16)
    src = _sources([("f", 8 * 16 + 15.5, 8 * 16 + 15.5, 0.5)])
    after, stats = build_candidates(w, 5.0, 16, src)
    assert stats["lens_windows"] == 0
    assert len(after) == len(before) == 1 and after.iloc[0]["shape"] == before.iloc[0]["shape"] != "lens"
    assert after.iloc[0].anomaly_sigma == before.iloc[0].anomaly_sigma > LENS_SIGMA[-1][1]


def test_a_lens_beyond_every_window_is_not_placed():
    """A source more than half a window (the stride) from every window centre on an axis (the grid stops at
    x = 319.5) gets no window."""
    w = _windows()
    sig, _ = lens_term(w, _sources([("f", 340.0, 100.0, 0.999)]), 16)
    assert not np.isfinite(sig).any()
    sig, _ = lens_term(w, _sources([("f", 335.0, 100.0, 0.999)]), 16)
    assert np.isfinite(sig).sum() == 1


def test_a_merge_step_version_is_in_the_provenance_and_makes_the_merge_key_change(monkeypatch):
    """A merge step's `version` (bumped when its code changes what it writes, as the lens term did the anomaly
    step's) is in the run's provenance and its merge key, and so are the merge's own code version and the schema's
    text: a re-run with the new code merges again instead of keeping catalogs written by the old (flows/merge.py:
    published_summary compares the keys)."""
    from types import SimpleNamespace

    from deepfield.catalogs.anomalies import AnomalyMerge
    from deepfield.flows.merge import merge_key, run_provenance
    from deepfield.flows.run_config import RunConfig
    cfg = RunConfig.model_validate(dict(
        inputs="/nonexistent/manifest.yaml", run_dir="/nonexistent/run",
        stages=[{"name": "background"}, {"name": "detect", "params": {"method": "sep"}}, {"name": "measure"},
                {"name": "anomaly"}]))
    keys = SimpleNamespace(config_hash="c", stage_versions={}, model_versions={}, inputs={})
    prov = run_provenance(cfg, keys)
    assert prov["merge_versions"] == {"anomaly": AnomalyMerge.version} and AnomalyMerge.version >= "2"
    before = merge_key(cfg, ["f"], [], [], prov)
    assert merge_key(cfg, ["f"], [], [], run_provenance(cfg, keys)) == before
    monkeypatch.setattr(AnomalyMerge, "version", "999")
    assert merge_key(cfg, ["f"], [], [], run_provenance(cfg, keys)) != before
    monkeypatch.undo()
    assert merge_key(cfg, ["f"], [], [], run_provenance(cfg, keys)) == before
    # the merge's own code version and the schema's text (units, descriptions) are in the key too
    import deepfield.catalogs.schema as schema
    import deepfield.catalogs.steps as steps
    monkeypatch.setattr(steps, "MERGE_VERSION", steps.MERGE_VERSION + "x")
    assert merge_key(cfg, ["f"], [], [], prov) != before
    monkeypatch.undo()
    text = schema.markdown()
    monkeypatch.setattr(schema, "markdown", lambda: text.replace("shape hint", "shape"))
    assert merge_key(cfg, ["f"], [], [], prov) != before


def test_the_merge_reads_the_lens_scores_of_the_flat_catalog_unless_told_not_to(tmp_path):
    """catalogs/anomalies.write_candidates on a grid's map and a flat catalog with one lens candidate (primary in
    its field) and one that another field owns (is_primary_field false: left out): one candidate, shape "lens";
    with merge.anomaly.lens_term false, none."""
    from deepfield.catalogs.anomalies import AnomalyMergeConfig, write_candidates
    w = _windows()
    w.to_parquet(tmp_path / "f_0_0.anomaly_map.parquet")
    flat = tmp_path / "flat"
    flat.mkdir()
    src = _sources([("f", 130.2, 141.7, 0.99), ("f", 250.0, 250.0, 0.999)])
    src["is_primary_field"] = [True, False]
    src.to_parquet(flat / "part0.parquet")
    maps = [tmp_path / "f_0_0.anomaly_map.parquet"]
    n, stats = write_candidates(maps, flat, None, tmp_path / "a.parquet", tmp_path / "a.fits", 5.0, 100, 16)
    cand = pd.read_parquet(tmp_path / "a.parquet")
    assert n == 1 and list(cand["shape"]) == ["lens"] and cand.source_id.iloc[0] == 100 and stats["lens_windows"] == 1
    assert AnomalyMergeConfig().lens_term is True
    n, stats = write_candidates(maps, flat, None, tmp_path / "b.parquet", tmp_path / "b.fits", 5.0, 100, 16,
                                lens_term=False)
    assert n == 0 and stats["lens_windows"] == 0


def test_a_merger_candidate_is_one_candidate_at_its_source_with_shape_merger():
    """A source of merger_score 0.995 on a grid of plain windows: one anomaly candidate, shape "merger", at the
    source with its source_id and MERGER_TERM's sigma; one below MERGER_MIN_SCORE makes none; a lens candidate
    on the same window with a lower term's sigma leaves it to the merger term."""
    w = _windows(seed=2)
    src = pd.DataFrame({"field": ["f", "f"], "x": [130.2, 250.0], "y": [141.7, 60.0],
                        "merger_score": [0.995, MERGER_MIN_SCORE - 0.1], "lens_score": [0.5, np.nan]})
    src["source_id"] = [100, 101]
    src["ra"], src["dec"] = 10 + src.x * 0.2 / 3600, src.y * 0.2 / 3600
    sig, row = score_term(w, src, 16, MERGER_TERM)
    assert np.isfinite(sig).sum() == 1 and row[np.isfinite(sig)][0] == 0
    cand, stats = build_candidates(w, 5.0, 16, src)
    assert len(cand) == 1 and stats["merger_windows"] == 1 and stats["lens_windows"] == 0, (cand, stats)
    c = cand.iloc[0]
    assert c["shape"] == "merger" and (c.x, c.y) == (130.2, 141.7) and c.source_id == 100
    assert abs(c.anomaly_sigma - float(MERGER_TERM.sigma(np.array([0.995]))[0])) < 1e-9
    assert len(build_candidates(w, 5.0, 16, src, terms=())[0]) == 0  # without the score terms: nothing
