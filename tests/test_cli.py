"""The command line: help on every command, clear errors, the preview picture."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from deepfield.flows.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["simulate"], ["preview"], ["demo"]])
def test_every_command_has_help(command):
    result = runner.invoke(app, command + ["--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_bad_config_file_names_the_file(tmp_path):
    bad = tmp_path / "sim.yaml"
    bad.write_text("bands: [g, g]\n")
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path / "o"), "--config", str(bad)])
    assert result.exit_code != 0
    assert "sim.yaml" in result.output and "duplicate" in result.output
    assert not (tmp_path / "o").exists()


def test_unknown_band_is_refused(tmp_path):
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path / "o"), "--bands", "g,x"])
    assert result.exit_code != 0 and "band_specs" in result.output


def test_preview_writes_a_colour_png(survey, tmp_path):
    from PIL import Image
    out = tmp_path / "f.png"
    result = runner.invoke(app, ["preview", str(survey / "fields" / "field000"), "--out", str(out), "--bin", "2"])
    assert result.exit_code == 0, result.output
    img = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 255.0
    assert img.shape == (512, 512, 3)
    rgb = img
    assert rgb.std() > 0.01  # not blank
    # colour: some pixels are much redder than others (red sequence vs blue cloud and stars)
    ratio = (rgb[..., 0] + 1e-3) / (rgb[..., 2] + 1e-3)
    bright = rgb.sum(axis=2) > 0.5
    assert np.percentile(ratio[bright], 90) > 1.3 * np.percentile(ratio[bright], 10)


def test_preview_of_a_non_field_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["preview", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "field.json" in result.output


def test_version():
    from deepfield import __version__
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"deepfield {__version__}" and __version__[0].isdigit()
