"""Shared fixtures: one small simulated survey per test session (about 30 s on 2 cores)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from deepfield.tasks.sim.config import SimConfig
from deepfield.tasks.sim.survey import simulate_survey

# Two overlapping 1024 x 1024 fields in g, r, i, z. More stars than the default sky so that the
# photometry test has enough bright unsaturated ones; clusters at intermediate redshift so that
# their cores fit in a field.
SURVEY_CONFIG = dict(
    seed=7, size=1024, fields=2, overlap=20.0, bands=["g", "r", "i", "z"],
    population=dict(star_density_i24=6.0, star_count_slope=0.12, cluster_z=(0.3, 0.6), clusters_per_field=1.0,
                    lenses_per_field=3),
)


@pytest.fixture(scope="session")
def survey_cfg() -> SimConfig:
    return SimConfig.model_validate(SURVEY_CONFIG)


# The test files by their total time, heaviest first (worker-seconds of `pytest --durations=0` under `make test`,
# 2026-12-01: faults 600 (now with test_resume.py, about 200 of it), slurm 440, run 300, survey_bands 280 ... prefect_env 40; the rest less): `make test`
# hands whole files to two pytest-xdist workers in this order (--no-loadscope-reorder: xdist's own order is by
# number of tests, which left the Slurm file and the kill drill to the end, one worker busy alone).
HEAVY_FIRST = ("test_faults.py", "test_slurm.py", "test_run.py", "test_survey_bands.py", "test_schedule.py",
               "test_drill.py", "test_resume.py", "test_distributed.py", "test_cluster.py", "test_redsequence.py", "test_any_survey.py",
               "test_sim_reproducible.py", "test_merge.py", "test_lens.py", "test_shipped_models.py",
               "test_bad_inputs.py", "test_learned_detection.py", "test_stages.py", "test_background.py", "test_cli.py",
               "test_stage_contract.py", "test_cluster_render.py", "test_progress.py", "test_anomaly_grid.py",
               "test_prefect_env.py", "test_catalog_product.py", "test_photoz.py", "test_photoz_cnn.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def survey(tmp_path_factory, survey_cfg, worker_id) -> Path:
    """Directory of the session's simulated survey (manifest.yaml inside; tests copy it before changing it).
    Under pytest-xdist the workers share one: the first to get here simulates it, the others wait for it."""
    return made_once(tmp_path_factory, worker_id, "survey", lambda out: simulate_survey(survey_cfg, out, workers=2))


def made_once(tmp_path_factory, worker_id: str, name: str, make) -> Path:
    """The directory `name` that `make(directory)` fills, made once per test session: under pytest-xdist the
    first worker to get here makes it in the session's directory (above each worker's), holding a file lock, and
    the others wait for it and take it as it is."""
    if worker_id == "master":
        out = tmp_path_factory.mktemp(name)
        make(out)
        return out
    import fcntl
    shared = tmp_path_factory.getbasetemp().parent
    out, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a worker that died half-way
            out.mkdir(parents=True)
            make(out)
            done.write_text("done\n")
    return out


@pytest.fixture(scope="session")
def manifest(survey) -> dict:
    return yaml.safe_load((survey / "manifest.yaml").read_text())


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect API for the whole session (it takes 10-25 s to start)."""
    from deepfield.flows import prefect_env
    prefect_env.configure(tmp_path_factory.mktemp("prefect"))
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120), prefect_env.flow_settings():  # as `deepfield run`'s
        yield


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (it takes about 6 s to start)."""
    import ray
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()  # no Ray of the tests outlives them


@pytest.fixture(scope="session")
def clean(survey, tmp_path_factory, worker_id, request):
    """The session's survey run once with the classical stages (tests/_classical_run.py's `config`: tiles of
    512 px, halo 32): (run directory, its catalog sorted by source_id), the reference of test_faults.py and
    test_resume.py. Tests copy the directory (copy_run) before changing anything in it. Under pytest-xdist the
    workers share one run, as they share the survey."""
    from _classical_run import config, flat_catalog
    # the run directory as deep under the session's directory as a test's tmp_path (a worker's directory, then
    # the test's): the store's ingest record keeps the inputs' paths relative to the run directory, and a copy
    # made in a test's tmp_path must find them the same, or it ingests the survey again
    depth = Path("run") if worker_id == "master" else Path("worker") / "run"

    def run(where: Path) -> None:
        request.getfixturevalue("prefect_harness")
        request.getfixturevalue("ray_session")
        from deepfield.flows.run import run_flow
        summary = run_flow(config(survey, where / depth))
        assert summary["process"]["done"] == 8 and not summary["failed_tiles"]

    run_dir = made_once(tmp_path_factory, worker_id, "clean-run", run) / depth
    return run_dir, flat_catalog(run_dir / "catalogs" / "sources_flat")


@pytest.fixture(scope="session")
def default_run(survey, tmp_path_factory, worker_id, request):
    """The session's survey run once with the default stages (tile 512, chunk 128, halo 48): (RunConfig,
    run summary, merged catalog as a DataFrame). Tests must not change its run directory. Under pytest-xdist the
    workers share one run, as they share the survey (the first to get here runs it, in its own Prefect and Ray,
    the others wait); every worker reads the summary back from the same JSON, so all see the same values."""
    import json

    import pandas as pd

    from deepfield.flows.run_config import RunConfig
    from deepfield.tasks.ingest_config import StoreSpec

    def make_cfg(run_dir: Path) -> RunConfig:
        return RunConfig(inputs=survey / "manifest.yaml", run_dir=run_dir,
                         store_layout=StoreSpec(tile=512, chunk=128), halo=48)

    def run(where: Path) -> None:
        request.getfixturevalue("prefect_harness")
        request.getfixturevalue("ray_session")
        from deepfield.flows.run import run_flow
        (where / "summary.json").write_text(json.dumps(run_flow(make_cfg(where / "run")), default=str))

    where = made_once(tmp_path_factory, worker_id, "default-run", run)
    run_dir = where / "run"
    summary = json.loads((where / "summary.json").read_text())
    return make_cfg(run_dir), summary, pd.read_parquet(summary["merge"]["paths"]["parquet"])
