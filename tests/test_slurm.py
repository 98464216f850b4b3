"""deploy/slurm/deepfield.sbatch on a real (single-node) Slurm: the job brings up Ray with two fake GPUs
and a Dask cluster under srun, runs the session's two-field survey (4 tiles per field) and merges the
catalog; a resubmission after one input file changed redoes only that field's tiles; a job stopped by
the walltime warning (SIGUSR1) and one cancelled with scancel mid-run are resumed by resubmission and
end with the same catalog as the uninterrupted run.

Slurm must be running (deploy/slurm/ci/start-slurm.sh; .ci/run starts it and sets
DEEPFIELD_REQUIRE_SLURM=1, under which a missing Slurm fails these tests instead of skipping them).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.coordinates import SkyCoord

from deepfield.tasks.ledger import Ledger
from _stages import CLASSICAL_STAGES
from slurm_jobs import job_env, require_slurm, submit, wait_for, wait_job

N_TILES = 8  # 2 fields x 4 tiles of 512 px


@pytest.fixture(scope="session")  # session: checked before the session's survey is simulated
def slurm():
    require_slurm()


def make_survey(survey: Path, where: Path) -> Path:
    """A copy of the session's simulated survey with a run configuration beside it; returns the config."""
    shutil.copytree(survey, where / "sim")
    cfg = where / "survey.yaml"
    cfg.write_text(yaml.safe_dump(dict(inputs="sim/manifest.yaml", run_dir="run", halo=48,
                                       store_layout=dict(tile=512, chunk=128), stages=CLASSICAL_STAGES,
                                       merge=dict(fits_export=False))))
    return cfg


def run_job(cfg: Path, name: str, **env) -> tuple[str, str, float, str]:
    """Submit, wait; returns (state, exit code, seconds, job output)."""
    out = cfg.parent / f"{name}.out"
    t0 = time.monotonic()
    job = submit(cfg, out, job_env(DEEPFIELD_GPUS_PER_NODE="2", **env))
    state, code = wait_job(job)
    return state, code, time.monotonic() - t0, out.read_text() if out.exists() else ""


def catalog(run_dir: Path) -> pd.DataFrame:
    cat = pd.read_parquet(run_dir / "catalogs" / "sources_flat")
    return cat.sort_values("source_id").reset_index(drop=True)


def ledger(run_dir: Path) -> dict:
    return {r.tile: r for r in Ledger(run_dir).records()}


@pytest.fixture(scope="module")
def job_a(slurm, survey, tmp_path_factory):
    """One uninterrupted job on a copy of the survey."""
    cfg = make_survey(survey, tmp_path_factory.mktemp("slurm-a"))
    state, code, seconds, out = run_job(cfg, "first")
    assert (state, code) == ("COMPLETED", "0:0"), out[-3000:]
    print(f"\nSlurm job, uninterrupted: {seconds:.1f} s")
    run_dir = cfg.parent / "run"
    return cfg, catalog(run_dir), ledger(run_dir), json.loads((run_dir / "run-summary.json").read_text())


def test_job_processes_every_tile_on_one_actor_per_gpu_and_merges(job_a, survey):
    cfg, cat, recs, summary = job_a
    assert len(recs) == N_TILES and {r.status for r in recs.values()} == {"done"}
    # Ray saw the node's two (fake) GPUs: two actors, each with its own CUDA_VISIBLE_DEVICES
    assert summary["process"]["actors"] == 2
    assert sorted({r.worker["cuda_visible_devices"] for r in recs.values()}) == ["0", "1"]
    assert len({r.worker["pid"] for r in recs.values()}) == 2
    # the merged catalog holds every tile's primary rows except the other field's overlap duplicates
    merge = summary["merge"]
    assert merge["n_tiles"] == N_TILES and merge["primary_rows"] == sum(r.counts["primary"] for r in recs.values())
    assert len(cat) == merge["rows_out"] == merge["primary_rows"] - merge["field_duplicates_dropped"]
    assert cat.source_id.is_unique
    truth = pd.read_parquet(survey / "truth" / "objects.parquet")
    bright = truth[truth.is_primary & truth.kind.isin(["galaxy", "star"]) & truth.mag_i.between(17.5, 22)
                   & (truth.n_blend == 1)]
    _, sep, _ = SkyCoord(bright.ra.values, bright.dec.values, unit="deg").match_to_catalog_sky(
        SkyCoord(cat.ra.values, cat.dec.values, unit="deg"))
    assert len(bright) >= 20 and np.mean(sep.arcsec < 1.0) >= 0.95


def test_stopped_and_cancelled_jobs_resume_to_the_same_catalog(job_a, survey, tmp_path):
    """Walltime warning: SIGUSR1 to the batch script stops dispatching, the job exits with 3 and no
    catalog; then a job killed with scancel mid-run; a third submission finishes with the catalog of
    the uninterrupted job, keeping the tiles the earlier jobs finished."""
    _, cat_a, _, _ = job_a
    cfg = make_survey(survey, tmp_path)
    run_dir = cfg.parent / "run"
    env = job_env(DEEPFIELD_GPUS_PER_NODE="2", DEEPFIELD_FAULT="delay:2")  # every tile takes 2 s more

    job = submit(cfg, tmp_path / "stopped.out", env)
    wait_for(lambda: len(ledger(run_dir)) >= 1, 240, "a first tile in the ledger")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
    state, code = wait_job(job)
    out = (tmp_path / "stopped.out").read_text()
    assert code == "3:0" and "walltime warning" in out and "stopped:" in out, out[-3000:]
    after_stop = ledger(run_dir)
    assert 1 <= len(after_stop) < N_TILES and not (run_dir / "catalogs" / "sources").exists()

    job = submit(cfg, tmp_path / "cancelled.out", env)
    wait_for(lambda: len(ledger(run_dir)) > len(after_stop), 240, "another tile in the ledger")
    subprocess.run(["scancel", job], check=True, timeout=30)
    state, _ = wait_job(job)
    assert state == "CANCELLED"
    # its node-local scratch (Ray's and Dask's, DEEPFIELD_JOB_TMP's default) goes with it
    wait_for(lambda: not Path(f"/tmp/deepfield-{job}").exists(), 30, f"/tmp/deepfield-{job} removed")
    after_cancel = ledger(run_dir)  # the cancel may land after the last tile, but before the merge ends
    assert len(after_cancel) > len(after_stop) and not (run_dir / "catalogs" / "sources").exists()
    assert all(after_cancel[t].finished_at == r.finished_at for t, r in after_stop.items())

    state, code, seconds, out = run_job(cfg, "resumed")
    assert (state, code) == ("COMPLETED", "0:0"), out[-3000:]
    summary = json.loads((run_dir / "run-summary.json").read_text())
    assert summary["process"]["skipped"] == len(after_cancel)
    assert summary["process"]["done"] == N_TILES - len(after_cancel)
    final = ledger(run_dir)
    assert all(final[t].finished_at == r.finished_at for t, r in after_cancel.items())
    pd.testing.assert_frame_equal(catalog(run_dir), cat_a)


def test_changed_input_file_reprocesses_only_its_fields_tiles(job_a):
    cfg, cat_a, before, _ = job_a
    from astropy.io import fits
    with fits.open(cfg.parent / "sim" / "fields" / "field001" / "field001-r-image.fits", mode="update") as hdul:
        hdul[0].data[700, 700] += 500.0
    state, code, seconds, out = run_job(cfg, "second")
    assert (state, code) == ("COMPLETED", "0:0"), out[-3000:]
    print(f"\nSlurm job after one input changed: {seconds:.1f} s")
    run_dir = cfg.parent / "run"
    summary = json.loads((run_dir / "run-summary.json").read_text())
    assert {r["field"]: r["status"] for r in summary["ingest"]} == {"field000": "skipped", "field001": "ingested"}
    assert summary["process"]["done"] == 4 and summary["process"]["skipped"] == 4
    after = ledger(run_dir)
    redone = sorted(t for t in after if after[t].finished_at != before[t].finished_at
                    or after[t].input_hash != before[t].input_hash)
    assert redone == [t for t in sorted(after) if t.startswith("field001/")]
    cat = catalog(run_dir)
    f0 = cat_a[cat_a.field == "field000"].reset_index(drop=True)
    pd.testing.assert_frame_equal(cat[cat.field == "field000"].reset_index(drop=True), f0)
