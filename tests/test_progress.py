"""`deepfield run` as an operator sees it, on the session's survey with the classical stages, run once through
the command line under the session's Prefect API: the Prefect artifacts of its progress and summary, the log
file in the run directory, the default output free of third-party INFO lines and unwrapped, `status --json`
against the text status, and -q/-v on a second (no-op) run."""
from __future__ import annotations

import json
import re
import signal

import pytest
import yaml
from typer.testing import CliRunner

from deepfield.flows.cli import app
from _stages import CLASSICAL_STAGES

runner = CliRunner()


def invoke(args: list[str]):
    """Run the command line in this process, keeping this process's signal handlers (`run` sets its own)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return runner.invoke(app, args)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


@pytest.fixture(scope="module")
def cli_run(survey, tmp_path_factory, prefect_harness, ray_session):
    """(run configuration file, run directory, the command's result, run summary)."""
    where = tmp_path_factory.mktemp("cli_run")
    cfg = where / "survey.yaml"
    cfg.write_text(yaml.safe_dump(dict(inputs=str(survey / "manifest.yaml"), run_dir="run", halo=48,
                                       store_layout=dict(tile=512, chunk=128), stages=CLASSICAL_STAGES,
                                       merge=dict(fits_export=False))))
    r = invoke(["run", str(cfg)])
    assert r.exit_code == 0, r.output
    run_dir = where / "run"
    return cfg, run_dir, r, json.loads((run_dir / "run-summary.json").read_text())


def _artifacts(**filters):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas import filters as f
    crit = {}
    if "key" in filters:
        crit["key"] = f.ArtifactFilterKey(any_=[filters["key"]])
    if "flow_run_id" in filters:
        crit["flow_run_id"] = f.ArtifactFilterFlowRunId(any_=[filters["flow_run_id"]])
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=f.ArtifactFilter(**crit))


def test_the_prefect_ui_shows_progress_and_summary(cli_run):
    """The run's flow run holds its progress (100 % at the end, for the run and for each field), the table of
    the fields' tiles and the summary with the run's tile counts."""
    from deepfield.flows.process import FIELDS_KEY, PROGRESS_KEY
    from deepfield.flows.run import SUMMARY_KEY
    _, run_dir, _, summary = cli_run
    mine = [a for a in _artifacts(key=SUMMARY_KEY) if str(run_dir) in (a.description or "")]
    assert len(mine) == 1
    md = mine[0].data
    assert "| tiles | 8 |" in md and "| tiles processed | 8 |" in md and "| tiles failed | 0 |" in md
    assert f"| sources in the catalog | {summary['merge']['rows_out']} |" in md
    arts = _artifacts(flow_run_id=mine[0].flow_run_id)
    progress = [a for a in arts if a.type == "progress"]
    overall = [a for a in progress if a.key == PROGRESS_KEY]
    assert len(overall) == 1 and overall[0].data == 100.0 and overall[0].task_run_id is not None
    per_field = [a for a in progress if a.key is None]
    assert sorted(a.description.split(":")[0] for a in per_field) == ["field000", "field001"]
    assert all(a.data == 100.0 for a in per_field)
    table = [a for a in arts if a.key == FIELDS_KEY]
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    assert {r["field"]: (r["tiles"], r["done"], r["failed"], r["left"]) for r in rows} == {
        "field000": (4, 4, 0, 0), "field001": (4, 4, 0, 0)}


def test_the_log_file_holds_the_runs_info_lines(cli_run):
    _, run_dir, r, _ = cli_run
    logs = list((run_dir / "logs").glob("run-*.log"))
    assert len(logs) == 1 and re.fullmatch(r"run-\d{8}T\d{6}Z\.log", logs[0].name)
    text = logs[0].read_text()
    for line in ("INFO deepfield.flows.cli: deepfield ", "INFO deepfield.flows.run: run of ",
                 "INFO deepfield.flows.run: ingest field000: ingested", "INFO deepfield.flows.process: processed 8 tile(s)",
                 "INFO deepfield.flows.run: merge: ", "INFO deepfield.flows.run: run finished in "):
        assert line in text, line
    records = re.findall(r"^\S+Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): ", text, flags=re.M)
    assert records and all(name.startswith("deepfield") or level not in ("DEBUG", "INFO") for level, name in records)
    assert f"logs/{logs[0].name}" in " ".join(r.stderr.split())  # the summary says where it is


def test_default_output_is_the_summary_alone(cli_run):
    """No third-party INFO lines (Ray, Dask, Prefect), no Ray token notice, no deepfield INFO; the summary's
    lines are not wrapped although the output is not a terminal, and name every output path."""
    _, run_dir, r, summary = cli_run
    err = r.stderr
    assert "process: 8 tile(s) processed" in err and "merge:" in err
    assert not re.search(r"\bINFO\b", err) and "Token authentication" not in err, err
    assert not re.search(r"^(?:DEBUG|INFO)\b|\| (?:DEBUG|INFO) +\|", err, flags=re.M), err
    lines = err.splitlines()
    from deepfield.flows.cli_common import rel
    for path in summary["merge"]["paths"].values():  # relative to the run directory in run-summary.json
        full = rel(run_dir / path)  # as printed: relative to the current directory where that is shorter
        assert any(line.endswith(" " + full) for line in lines), (full, err)  # whole, on one line
    assert r.stdout.strip() == str(run_dir)


def test_status_json_states_the_text_facts(cli_run):
    _, run_dir, _, _ = cli_run
    text = invoke(["status", str(run_dir)])
    js = invoke(["status", str(run_dir), "--json"])
    assert text.exit_code == js.exit_code == 0
    facts = json.loads(js.stdout)
    assert set(facts) == {"run_dir", "tiles", "status", "retried", "sources", "primary", "counts", "stage_seconds",
                          "config_hashes", "failed", "problems"}
    assert facts["tiles"] == 8 and facts["status"] == {"done": 8} and facts["failed"] == [] == facts["problems"]
    first, second, stages, hashes = text.stdout.splitlines()[:4]
    assert first == f"tiles: {facts['tiles']}  done: 8  retried: {facts['retried']}"
    assert second == f"sources: {facts['sources']} detected, {facts['primary']} primary in their tile"
    assert stages == "time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in facts["stage_seconds"].items())
    assert set(facts["stage_seconds"]) >= {"background", "detect", "measure"}
    assert hashes == f"configuration hashes: {', '.join(facts['config_hashes'])}"
    for name, c in facts["counts"].items():  # e.g. the background's sky steps, where the fields have any
        assert any(line.endswith(f": {c['total']} in {c['tiles']} tile(s)") for line in text.stdout.splitlines()), name


def test_quiet_and_verbose_runs(cli_run):
    """-q: the final result line alone (the run directory); -v: deepfield's INFO lines as well, still no
    third-party INFO. Both runs are no-ops of the same run (every tile done)."""
    cfg, run_dir, _, _ = cli_run
    q = invoke(["run", str(cfg), "-q"])
    assert q.exit_code == 0, q.output
    assert q.stdout.strip() == str(run_dir) and q.stderr.strip() == "", q.stderr
    v = invoke(["run", "-v", str(cfg)])
    assert v.exit_code == 0, v.output
    assert "INFO deepfield.flows.run: run finished in" in v.stderr
    assert "INFO deepfield.flows.process: processing 0 tile(s) of 8 (8 done before)" in v.stderr
    assert "process: 0 tile(s) processed, 8 already done" in v.stderr
    assert all(line.split()[1].startswith("deepfield") for line in v.stderr.splitlines() if line.startswith("INFO "))
    assert len(list((run_dir / "logs").glob("run-*.log"))) >= 2  # a log file per run (one a second at most)
