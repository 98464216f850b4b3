"""The stage contract: typed stage configurations checked before anything starts, declared columns and bands,
and a stage from outside deepfield (a plugin module) run in a full run with its own merge step, through the
registry alone."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import yaml

from deepfield.flows.run_config import RunConfig, RunConfigError, load_run_config
from deepfield.tasks.stages import registry
from deepfield.tasks.stages.base import expand_columns
from _stages import CLASSICAL_STAGES

TOY = '''
"""A toy stage from outside deepfield: `toy_flux` = scale x the AUTO flux in `band`, a per-tile side table
`toy` (sources and primary flux per tile), and a merge step that adds `toy_share` (the row's share of the
run's primary toy flux, from the side tables) and writes the `top` brightest rows to toy_top.parquet."""
import pandas as pd
from pydantic import Field

from deepfield.catalogs.steps import MergeStep, MergeStepConfig, StepResult
from deepfield.tasks.stages import Stage, StageConfig, register_stage


class ToyMergeConfig(MergeStepConfig):
    top: int = Field(5, ge=1)


class ToyMerge(MergeStep):
    stage = "toy"
    Config = ToyMergeConfig

    def prepare(self, ctx):
        self.tiles = pd.concat([pd.read_parquet(p) for p in ctx.side_tables("toy")], ignore_index=True)
        self.total = float(self.tiles.flux_sum.sum())

    def partition(self, df):
        df["toy_share"] = df["toy_flux"] / self.total
        return df

    def write(self, ctx, flat_dir, staging):
        cat = pd.read_parquet(flat_dir, columns=["source_id", "toy_flux"])
        cat.sort_values(["toy_flux", "source_id"], ascending=[False, True]).head(self.config.top).to_parquet(
            staging / "toy_top.parquet", index=False)
        return StepResult(summary={"toy_tiles": len(self.tiles)}, files={"toy_top": "toy_top.parquet"})

    def report(self, summary, paths):
        return [f"toy:     {summary['toy_tiles']} tile(s) counted: {paths['toy_top']}"]


class ToyConfig(StageConfig):
    band: str = "i"
    scale: float = Field(1.0, gt=0)


@register_stage
class ToyStage(Stage):
    name = "toy"
    version = "7"
    Config = ToyConfig
    reads = ("flux_auto_{band}", "is_primary")
    adds = ("toy_flux",)
    side_tables = ("toy",)
    merge_step = ToyMerge

    def required_bands(self):
        return [self.band]

    def run(self, tile, sources):
        out = sources.copy()
        out["toy_flux"] = self.scale * out[f"flux_auto_{self.band}"]
        tile.tables["toy"] = pd.DataFrame(dict(tile=[str(tile.id)], n=[len(out)],
                                               flux_sum=[float(out.toy_flux[out.is_primary].sum())]))
        return out
'''


@pytest.fixture
def clean_registry(monkeypatch):
    """The stage registry as it was after the test (the toy stage is registered only within it)."""
    monkeypatch.setattr(registry, "STAGES", dict(registry.STAGES))
    monkeypatch.setattr(registry, "_PLUGINS", dict(registry._PLUGINS))


@pytest.fixture
def toy(tmp_path, clean_registry):
    path = tmp_path / "plugins" / "toy_stage.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(TOY))
    return path


def run_yaml(tmp_path, survey, **extra) -> object:
    cfg = dict(inputs=str(survey / "manifest.yaml"), run_dir=str(tmp_path / "run"),
               store_layout=dict(tile=512, chunk=128), halo=48, **extra)
    path = tmp_path / "survey.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_mistyped_stage_parameter_exits_2_before_anything_starts(tmp_path, survey):
    """`threshold` for detect's `thresh`: one line naming the file, the stage and the key, exit status 2, and
    no run directory (nothing was ingested, no Ray, no Prefect)."""
    cfg = run_yaml(tmp_path, survey, stages=[{"name": "background"}, {"name": "detect", "params": {"threshold": 3}},
                                             {"name": "measure"}])
    r = subprocess.run([sys.executable, "-m", "deepfield.flows.cli", "run", str(cfg)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, COLUMNS="300"))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    line = next(x for x in err if "threshold" in x)
    assert "survey.yaml" in line and "stage 'detect'" in line and "unknown parameter 'threshold'" in line
    assert "did you mean 'thresh'" in line
    assert not (tmp_path / "run").exists()


def test_stage_and_merge_configuration_errors_name_stage_and_key(tmp_path, survey):
    def problem(**extra) -> str:
        with pytest.raises(RunConfigError) as exc:
            load_run_config(run_yaml(tmp_path, survey, **extra))
        return str(exc.value)

    assert "stage 'anomaly': parameter 'mode'" in problem(stages=[
        {"name": n} for n in ("background", "detect", "measure")] + [{"name": "anomaly", "params": {"mode": "slow"}}])
    assert "stage 'lens' reads mag_auto_{band}" in problem(stages=[{"name": "background"}, {"name": "lens"}])
    assert "merge.lens: unknown parameter 'treshold'; did you mean 'threshold'?" in problem(
        merge={"lens": {"treshold": 0.7}})
    assert "merge.lens_threshold is now merge.lens.threshold" in problem(merge={"lens_threshold": 0.7})
    assert "merge: detect: not a stage of this run with a merge step" in problem(merge={"detect": {}})
    cfg = load_run_config(run_yaml(tmp_path, survey, merge={"lens": {"threshold": 0.7}, "fits_export": False}))
    steps = {s.stage: s for s in cfg.merge_steps()}
    assert list(steps) == ["lens", "cluster", "anomaly"] and steps["lens"].config.threshold == 0.7
    assert steps["anomaly"].config.top == 100 and not cfg.merge.fits_export


def test_configuration_hash_covers_defaults():
    """The hash is of the full configurations: a parameter given at its default value changes nothing, another
    value changes it."""
    base = dict(inputs="x.yaml", run_dir="r")
    h = RunConfig.model_validate(base).processing_hash()
    same = RunConfig.model_validate(dict(base, stages=[{"name": n, "params": {"thresh": 1.5} if n == "detect" else {}}
                                                       for n in registry.DEFAULT_STAGES])).processing_hash()
    other = RunConfig.model_validate(dict(base, stages=[{"name": n, "params": {"thresh": 2.0} if n == "detect" else {}}
                                                        for n in registry.DEFAULT_STAGES])).processing_hash()
    assert h == same != other


@pytest.fixture(scope="module")
def tile_columns(survey, tmp_path_factory) -> list[str]:
    """The columns of one tile processed with the default stages (the tile runner, no Ray)."""
    from deepfield.tasks.ingest import ingest_one
    from deepfield.tasks.ingest_config import StoreSpec, load_ingest_config
    from deepfield.tasks.tile_runner import TileRunner
    work = tmp_path_factory.mktemp("contract")
    spec = load_ingest_config(survey / "manifest.yaml").fields[0]
    assert ingest_one(spec, str(work / "store.zarr"), StoreSpec(tile=512, chunk=128))["status"] == "ingested"
    runner = TileRunner(str(work / "store.zarr"), str(work / "run"), [(n, {}) for n in registry.DEFAULT_STAGES], 48)
    res = runner.process(f"{spec.name}/0_0")
    assert (work / "run" / "tiles" / spec.name / "0_0.clusters.parquet").exists()  # the declared side table
    return list(pd.read_parquet(work / "run" / res["output"]).columns)


def test_declared_columns_are_what_the_stages_add(survey_cfg, tile_columns):
    """Every default stage's declared `adds` and `reads`, over the bands it works on, are columns of a real
    tile table, and the default order satisfies the declarations."""
    registry.check_order(registry.DEFAULT_STAGES)
    for name in registry.DEFAULT_STAGES:
        cls = registry.stage_class(name)
        bands = cls().required_bands() or survey_cfg.bands
        assert set(expand_columns(cls.adds + cls.reads, bands)) <= set(tile_columns), name


def test_a_stage_from_a_plugin_module_runs_with_its_own_merge_step(toy, survey, tmp_path, prefect_harness,
                                                                   ray_session):
    """The toy stage of a .py file named by `plugins`: the Ray actors import it, it runs after the classical
    stages, its side tables and merge step's column and file come out of the unchanged runner and merge."""
    from deepfield.flows.run import run_flow
    from deepfield.tasks.ledger import Ledger
    cfg_path = run_yaml(tmp_path, survey, plugins=["plugins/toy_stage.py"],  # relative to the file
                        stages=[*CLASSICAL_STAGES, {"name": "toy", "params": {"scale": 2.0}}],
                        merge={"toy": {"top": 3}})
    cfg = load_run_config(cfg_path)
    assert cfg.plugins == [str(toy)]
    summary = run_flow(cfg)
    assert summary["process"]["done"] == 8 and summary["process"]["failed"] == 0
    merge = summary["merge"]
    assert merge["toy_tiles"] == 8
    assert merge["report"] == [f"toy:     8 tile(s) counted: {cfg.run_dir / 'catalogs' / 'toy_top.parquet'}"]
    cat = pd.read_parquet(merge["paths"]["parquet"])
    # the catalog's flux_auto_i is calibrated to nJy at the merge; toy_flux, not a flux_<kind>_<band> column,
    # stays in the image units the stage saw
    from deepfield.catalogs.calibrate import njy_per_unit
    image_units = cat.flux_auto_i.to_numpy() / njy_per_unit(cat.zeropoint_i.to_numpy())
    np.testing.assert_allclose(cat.toy_flux.to_numpy(), 2.0 * image_units, rtol=1e-12)
    # the side tables hold every tile's row count and primary flux, as the tile tables do
    tiles = {r.tile: r for r in Ledger(cfg.run_dir).records()}
    assert all(r.stage_versions["toy"] == "7" for r in tiles.values())
    total = 0.0
    for t in tiles:
        field, _, name = t.partition("/")
        table = pd.read_parquet(cfg.run_dir / "tiles" / field / f"{name}.parquet")
        side = pd.read_parquet(cfg.run_dir / "tiles" / field / f"{name}.toy.parquet")
        assert side.n.iat[0] == len(table)
        total += float(2.0 * table.flux_auto_i[table.is_primary].sum())
    np.testing.assert_allclose(cat.toy_share.to_numpy() * total, cat.toy_flux.to_numpy(), rtol=1e-12)
    top = pd.read_parquet(merge["paths"]["toy_top"])
    expect = cat.sort_values(["toy_flux", "source_id"], ascending=[False, True]).head(3)
    assert list(top.source_id) == list(expect.source_id)
    # the same merge on a distributed Dask cluster (worker processes, as on Slurm): the steps, the plugin's
    # included, are pickled to the workers, and the catalog comes out the same
    from dask.distributed import Client, LocalCluster

    from deepfield.catalogs.merge import merge_catalog
    from deepfield.tasks.zarr_sky import sky_fields
    from deepfield.tasks.zarr_store import open_store
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            Client(lc) as client:
        again = merge_catalog(cfg.run_dir, sky_fields(open_store(cfg.store_path)), tmp_path / "distributed",
                              steps=cfg.merge_steps(), store_path=cfg.store_path, client=client, write_fits=False,
                              plugins=cfg.plugins)
    cat2 = pd.read_parquet(again["paths"]["parquet"])
    pd.testing.assert_frame_equal(cat.sort_values("source_id").reset_index(drop=True)[cat2.columns],
                                  cat2.sort_values("source_id").reset_index(drop=True), check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(again["paths"]["toy_top"]), top)


def test_a_field_without_a_band_a_stage_needs_stops_the_run_before_any_tile(tmp_path, prefect_harness):
    """A g, r, i survey with the default stages: the lens, merger and cluster networks take g, r, i, z (or g, r, z). The run
    stops after the ingest with one line per stage naming the field and the missing band; no tile is done."""
    from deepfield.flows.run import run_flow
    from deepfield.tasks.sim.config import SimConfig
    from deepfield.tasks.sim.survey import simulate_survey
    from deepfield.tasks.stages.registry import BandError
    simulate_survey(SimConfig(seed=3, size=256, bands=["g", "r", "i"]), tmp_path / "sim", workers=1)
    cfg = RunConfig(inputs=tmp_path / "sim" / "manifest.yaml", run_dir=tmp_path / "run")
    with pytest.raises(BandError) as exc:
        run_flow(cfg)
    lines = str(exc.value).splitlines()
    assert {line.split("'")[1] for line in lines} == {"lens", "merger", "cluster"}
    assert all("field 'field000' has g, r, i (missing z)" in line for line in lines)
    assert not (tmp_path / "run" / "ledger").exists() and not (tmp_path / "run" / "tiles").exists()
