"""The command line: help on every command, clear errors, the preview picture."""
from __future__ import annotations

import re

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


@pytest.mark.parametrize("args", [["simulate"], ["status"], ["run"], ["train", "lens"], ["eval", "detect"]])
def test_every_command_takes_verbose_and_quiet(args):
    r = runner.invoke(app, args + ["--help"])
    assert r.exit_code == 0 and "--verbose" in r.output and "--quiet" in r.output


@pytest.mark.parametrize("level", [-1, 0, 1, 2])
def test_verbosity_levels_of_deepfield_and_third_party_records(level, capsys, monkeypatch):
    """-q: errors only; default: WARNING of everything; -v: deepfield's INFO too; -vv: DEBUG of everything."""
    import logging
    import os

    from deepfield.flows.cli_common import _logging
    for key in ("PREFECT_LOGGING_LEVEL", "DASK_LOGGING__DISTRIBUTED"):  # what the levels set for libraries
        if key in os.environ:                                           # imported later: this test's alone
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    before = [logging.getLogger(n).level for n in ("", "deepfield", "distributed", "ray")]
    with _logging(level):
        for name in ("deepfield.flows.run", "distributed.scheduler", "ray", "prefect.server", "lsdb"):
            for lvl in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
                logging.getLogger(name).log(lvl, "%s at %s", name, logging.getLevelName(lvl))
    err = capsys.readouterr().err
    shown = set(re.findall(r"^([A-Z]+) (\S+): ", err, flags=re.M))
    want = set()
    for name in ("deepfield.flows.run", "distributed.scheduler", "ray", "prefect.server", "lsdb"):
        ours = name.startswith("deepfield")
        lowest = {-1: "ERROR", 0: "WARNING", 1: "INFO" if ours else "WARNING", 2: "DEBUG"}[level]
        levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
        want |= {(lv, name) for lv in levels[levels.index(lowest):]}
    assert shown == want
    logging.getLogger("deepfield.flows.run").warning("after the command")  # our handler is gone
    assert "after the command" not in capsys.readouterr().err
    assert [logging.getLogger(n).level for n in ("", "deepfield", "distributed", "ray")] == before


def test_quiet_prints_the_result_line_alone(tmp_path):
    out = tmp_path / "sim"
    args = ["simulate", "--out", str(out), "--size", "64", "--fields", "1", "--bands", "r"]
    r = runner.invoke(app, args + ["-q"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out / "manifest.yaml") and r.stderr == ""
    r = runner.invoke(app, args)  # default: what it did, on stderr
    assert r.exit_code == 0 and "already holds this simulation" in r.stderr
    r = runner.invoke(app, ["simulate", "--out", str(out), "--bands", "g,x", "-q"])  # errors at every verbosity
    assert r.exit_code != 0 and "error:" in r.stderr


def test_ingest_help_states_the_store_defaults():
    from deepfield.tasks.ingest_config import StoreSpec
    out = " ".join(runner.invoke(app, ["ingest", "--help"]).output.split())
    assert f"(default: {StoreSpec().chunk})" in out and f"(default: {StoreSpec().tile})" in out


def test_measure_docstring_states_the_defaults():
    """Every `parameter` (value) the measure stage's module docstring gives is the configuration's default (the
    first of a tuple's)."""
    from deepfield.tasks.stages import measure
    said = dict(re.findall(r"`(\w+)`\s+\(([\d.]+)", " ".join(measure.__doc__.split())))
    assert {"kron_k", "kron_rmax", "min_radius", "kron_max_footprint", "gaap_sigma_psf"} <= set(said)
    for name, value in said.items():
        default = getattr(measure.MeasureConfig(), name)
        assert float(value) == (default[0] if isinstance(default, tuple) else default), name


def test_ingest_notes_are_grouped_and_capped_for_a_survey(monkeypatch):
    """Fields with the same notes print them once, as a group; a field's per-band counts are one line; past
    MAX_NOTE_FIELDS fields or groups one line says how many more there are and where their notes are."""
    import io

    from rich.console import Console

    from deepfield.flows import cli_report
    out = Console(width=300, record=True, file=io.StringIO())
    monkeypatch.setattr(cli_report, "console", out)
    same = ["band g: 12 pixels with non-positive invvar masked", "band r: 30 pixels with non-positive invvar masked",
            "band g: kept (our MP keywords)", "PSF FWHM of band i measured from the stars"]
    results = [dict(field=f"f{k:04d}", notes=list(same)) for k in range(200)]
    results += [dict(field="odd", notes=["band z: image resampled onto the field's grid"]),
                dict(field="quiet", notes=["band g: kept (our MP keywords)"])]
    cli_report.print_ingest_notes(results, "/data/s.zarr")
    lines = out.export_text().splitlines()
    assert lines == ["  f0000, f0001 and 198 more fields: g 12, r 30 pixels with non-positive invvar masked",
                     "  f0000, f0001 and 198 more fields: PSF FWHM of band i measured from the stars",
                     "  odd: band z: image resampled onto the field's grid"]
    many = [dict(field=f"g{k:03d}", notes=[f"band g: noise rescaled by {1 + k / 1000:.3f}"]) for k in range(40)]
    out = Console(width=300, record=True, file=io.StringIO())
    monkeypatch.setattr(cli_report, "console", out)
    cli_report.print_ingest_notes(many, "/data/s.zarr")
    lines = out.export_text().splitlines()
    assert len(lines) == cli_report.MAX_NOTE_FIELDS + 1 and lines[0] == "  g000: band g: noise rescaled by 1.000"
    assert lines[-1].startswith(f"  ... and the notes of {40 - cli_report.MAX_NOTE_FIELDS} more field(s): in each "
                                "field's attributes (`notes`) of the store")
