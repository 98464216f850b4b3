"""The fault drill of tests/drills/kill_drill.py in its short form: the driver killed once and an actor once at
random moments of a run, each run brought to the clean run's catalog with nothing left behind."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_kill_drill_short_form(tmp_path):
    spec = importlib.util.spec_from_file_location("kill_drill", Path(__file__).parent / "drills" / "kill_drill.py")
    drill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drill)
    assert drill.main(["--runs", "2", "--seed", "3", "--targets", "driver,actor", "--work", str(tmp_path)]) == 0
