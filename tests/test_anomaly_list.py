"""`deepfield eval anomaly-list` (flows/evaluate/anomaly_list.py): a run's anomaly list scored against a
simulation's truth, checked on a hand-made list and truth whose answer is known."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from deepfield.flows.evaluate.anomaly_list import format_list_report, score_list


def test_the_anomaly_list_evaluation_counts_what_the_list_holds(tmp_path):
    """flows/evaluate/anomaly_list.score_list on a hand-made run and truth: a cosmic ray with a candidate 2 px
    away (rank 1), a trail with a candidate on its segment (rank 3), a lens with none near it, a u-band artefact
    that g, r, i, z weights cannot see (left out), and a candidate on nothing (rank 2): listed 2 of 3, purity of
    the first 2 candidates 1/2, of all 2/3; a missing list is a clear error."""
    (tmp_path / "run" / "catalogs").mkdir(parents=True)
    (tmp_path / "truth").mkdir()
    pd.DataFrame({"anomaly_rank": [1, 2, 3], "field": "f", "x": [102.0, 700.0, 300.0], "y": [101.0, 700.0, 205.0],
                  "anomaly_sigma": [30.0, 20.0, 10.0], "shape": ["point", "extended", "linear"]}).to_parquet(
        tmp_path / "run" / "catalogs" / "anomalies.parquet")
    trail = {"x0": 200.0, "y0": 200.0, "x1": 400.0, "y1": 210.0}
    pd.DataFrame({"anomaly_id": [1, 2, 3], "type": ["cosmic_ray", "satellite_trail", "cosmic_ray"], "field": "f",
                  "band": ["g", "r", "u"], "x": [100.0, 300.0, 500.0], "y": [100.0, 205.0, 500.0],
                  "params": ["{}", json.dumps(trail), "{}"]}).to_parquet(tmp_path / "truth" / "anomalies.parquet")
    pd.DataFrame({"lens_id": [1], "field": ["f"], "x": [900.0], "y": [100.0]}).to_parquet(
        tmp_path / "truth" / "lenses.parquet")
    r = score_list(tmp_path / "run", tmp_path / "truth", top=2, bands=["g", "r", "i", "z"])
    assert r["all"]["injected"] == 3 and abs(r["all"]["listed"] - 2 / 3) < 1e-12
    assert r["types"]["cosmic_ray"] == dict(injected=1, listed=1.0, in_top=1.0, median_rank=1.0)
    assert r["types"]["satellite_trail"] == dict(injected=1, listed=1.0, in_top=0.0, median_rank=3.0)
    assert r["types"]["lens"]["listed"] == 0.0 and r["types"]["lens"]["median_rank"] is None
    assert r["purity_top"] == 0.5 and abs(r["purity_all"] - 2 / 3) < 1e-12
    assert "satellite_trail" in format_list_report(r)
    with pytest.raises(FileNotFoundError, match="no anomaly list"):
        score_list(tmp_path / "elsewhere", tmp_path / "truth")
