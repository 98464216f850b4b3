"""The shipped weights, re-checked on fresh simulated data against the evaluation recorded beside them
(`models/weights/<model>.eval.json`): a figure outside a tolerance derived from the recorded value and the
sample's size, on either side, means the weights, the simulator or the scoring code changed the science.

- lens_resnet: 400 fresh stamps, half lenses; AUROC is independent of the lens fraction, recorded 0.9987 on
  10,000 stamps: within [recorded - 0.01, 1].
- deblend_unet: 60 fresh blends (about 55 detected members brighter than i = 23.5); the median |dF|/F in i,
  recorded 0.087 on 98 members (the learned detector's centres), whose standard error on 55 members is about
  0.02 (the 16-84 % spread of dF/F is about 0.16): within recorded +- 0.05; and the median signed error
  (recorded +0.016) within +- 0.06.
The anomaly scorer and the cluster finder need whole simulated fields (minutes each); their evaluation
commands re-check them (`deepfield eval anomaly`, `deepfield eval cluster`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights"


@pytest.mark.slow
def test_lens_resnet_auroc_on_fresh_stamps():
    from deepfield.flows.evaluate.lens import evaluate
    recorded = json.loads((WEIGHTS / "lens_resnet.eval.json").read_text())[0]
    assert recorded["config"] == "same"
    r = evaluate(n=400, lens_fraction=0.5, seed=777, workers=2)
    assert r["n_lens"] >= 150
    assert recorded["auroc"] - 0.01 <= r["auroc"] <= 1.0, (r["auroc"], recorded["auroc"])


@pytest.mark.slow
def test_deblend_unet_flux_errors_on_fresh_blends():
    from deepfield.flows.evaluate.deblend import evaluate
    recorded = json.loads((WEIGHTS / "deblend_unet.eval.json").read_text())["methods"]["unet"]["bands"]["i"]
    r = evaluate(n=60, seed=778, scarlet=False)
    got = r["methods"]["unet"]["bands"]["i"]
    assert got["n"] >= 35
    assert abs(got["median_abs"] - recorded["median_abs"]) <= 0.05, (got, recorded)
    assert abs(got["median"] - recorded["median"]) <= 0.06, (got, recorded)
    assert np.isfinite(r["methods"]["sep"]["bands"]["i"]["median_abs"])
    # the stage's default, symmetric templates, on the same blends and detections (no weights)
    sym = r["methods"]["symmetric"]["bands"]["i"]
    recorded_sym = json.loads((WEIGHTS / "deblend_unet.eval.json").read_text())["methods"]["symmetric"]["bands"]["i"]
    assert abs(sym["median_abs"] - recorded_sym["median_abs"]) <= 0.04, (sym, recorded_sym)
