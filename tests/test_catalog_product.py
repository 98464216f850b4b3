"""The catalogs as a calibrated, self-describing product: sky shapes against hand-computed geometry, the declared
schema in every output (Parquet, FITS, HATS, the documentation page), provenance, and relative paths."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from deepfield.catalogs import schema
from deepfield.tasks.stages.measure import MeasureStage
from deepfield.catalogs.calibrate import calibrate_fluxes, njy_per_unit, sky_shapes

ROOT = Path(__file__).resolve().parents[1]


def _wcs(scale_arcsec: float, rot_deg: float = 0.0, flip: bool = False) -> WCS:
    """TAN WCS at (150, 2) deg: north up and east left (east right when `flip`), then the sky rotated by
    `rot_deg` (the +y axis points `rot_deg` east of north)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [50.0, 50.0]
    s = scale_arcsec / 3600.0
    t = np.radians(rot_deg)
    # columns: the sky direction (east, north) of +x and +y; RA grows to the east
    x_dir = np.array([-np.cos(t), np.sin(t)]) if not flip else np.array([np.cos(t), -np.sin(t)])
    y_dir = np.array([np.sin(t), np.cos(t)])
    w.wcs.cd = s * np.column_stack([x_dir, y_dir])
    return w


@pytest.mark.parametrize("rot, flip, theta_deg, pa", [
    (0.0, False, 0.0, 90.0),     # along +x = west: the east-west axis
    (0.0, False, 90.0, 0.0),     # along +y = north
    (0.0, False, 45.0, 135.0),   # toward north-west
    (0.0, True, 45.0, 45.0),     # east right: toward north-east
    (30.0, False, 90.0, 30.0),   # +y points 30 deg east of north
    (30.0, False, 0.0, 120.0),
])
def test_sky_shapes_against_hand_computed_geometry(rot, flip, theta_deg, pa):
    w = _wcs(0.25, rot, flip)
    a, b, p = sky_shapes(w, [50.0], [50.0], [8.0], [2.0], [np.radians(theta_deg)])
    assert np.allclose(a, 2.0, rtol=1e-4) and np.allclose(b, 0.5, rtol=1e-4)  # 8 and 2 px at 0.25"/px
    assert abs((p[0] - pa + 90) % 180 - 90) < 1e-3, (p, pa)


def test_round_source_has_equal_axes_and_nan_propagates():
    w = _wcs(0.2)
    a, b, p = sky_shapes(w, [10.0, 20.0], [10.0, 20.0], [3.0, np.nan], [3.0, 1.0], [0.3, 0.0])
    assert np.isclose(a[0], 0.6, rtol=1e-4) and np.isclose(b[0], 0.6, rtol=1e-4)
    assert np.isnan(a[1]) and np.isnan(b[1]) and np.isnan(p[1])


def test_fluxes_to_njy_and_a_missing_zero_point_is_an_error():
    df = pd.DataFrame({"flux_auto_g": [100.0], "fluxerr_auto_g": [10.0], "zeropoint_g": [27.0],
                       "flux_det": [5.0], "mag_auto_g": [22.0]})
    out = calibrate_fluxes(df)
    assert np.isclose(out.flux_auto_g[0], 100.0 * 10 ** (0.4 * 4.4)) and np.isclose(out.fluxerr_auto_g[0], 10 * 10 ** 1.76)
    assert out.flux_det[0] == 5.0 and out.mag_auto_g[0] == 22.0  # detection image and magnitudes unchanged
    assert np.isclose(njy_per_unit(31.4), 1.0)
    with pytest.raises(ValueError, match="flux_aper_z.*zeropoint_<band>"):
        calibrate_fluxes(pd.DataFrame({"flux_aper_z": [1.0]}))


def test_schema_page_is_current():
    page = (ROOT / "docs" / "schema.md").read_text()
    assert page == schema.markdown(), "docs/schema.md is stale: run `deepfield schema --markdown > docs/schema.md`"


def test_every_catalog_column_is_declared_in_every_output(default_run):
    cfg, summary, cat = default_run
    paths = summary["merge"]["paths"]
    undeclared = [c for c in cat.columns if schema.describe(c) is None]
    assert not undeclared, undeclared
    assert {"pa", "deblend_pa", "zeropoint_g", "zeropoint_z"} <= set(cat.columns) and "theta" not in cat.columns
    # Parquet: unit, UCD and description on every field, the provenance in the schema
    flat = pq.read_schema(sorted(Path(paths["parquet"]).glob("*.parquet"))[0])
    assert flat.field("flux_auto_r").metadata[b"unit"] == b"nJy"
    assert flat.field("pa").metadata[b"ucd"] == b"pos.posAng"
    assert all(f.metadata and f.metadata[b"description"] for f in flat)
    prov = json.loads(flat.metadata[schema.PROVENANCE_KEY])
    chosen = summary.get("weights_variants") or {}  # the band-set weights the run chose (anomaly: griz) are in it
    ran = cfg.with_stages([(n, dict(p, variant=chosen[n]) if chosen.get(n) else p) for n, p in cfg.stage_list()])
    assert prov["config_hash"] == ran.processing_hash()
    assert prov["stage_versions"]["measure"] == MeasureStage.version and prov["model_versions"]
    assert set(prov["inputs"]) == {"field000", "field001"} and prov["deepfield_version"]
    # HATS: the partitions' and _common_metadata's fields, and hats.properties
    hats_dir = Path(paths["hats"]) / "sources"
    common = pq.read_schema(hats_dir / "dataset" / "_common_metadata")
    assert common.field("mag_auto_i").metadata[b"unit"] == b"mag"
    assert json.loads(common.metadata[schema.PROVENANCE_KEY])["config_hash"] == prov["config_hash"]
    props = (hats_dir / "hats.properties").read_text()
    assert "obs_title=deepfield source catalog" in props and f"deepfield_config_hash={prov['config_hash']}" in props
    # FITS: TUNIT/TUCD/TCOMM and the provenance in the primary header
    with fits.open(paths["fits"]) as hdul:
        h, p = hdul[1].header, hdul[0].header
        names = [h[f"TTYPE{n}"] for n in range(1, h["TFIELDS"] + 1)]
        n = names.index("flux_deblend_i") + 1
        assert h[f"TUNIT{n}"] == "nJy" and h[f"TUCD{n}"] == "phot.flux.density" and h[f"TCOMM{n}"]
        assert all(f"TCOMM{k}" in h for k in range(1, len(names) + 1))
        assert p["CFGHASH"] == prov["config_hash"] and p["HIERARCH DF STAGE measure"] == MeasureStage.version
    # the candidate tables: their own declarations and the sources'
    for key, table in (("lens_candidates", "lens_candidates"), ("clusters", "clusters"), ("anomalies", "anomalies")):
        s = pq.read_schema(paths[key])
        assert all(schema.describe(f.name, table) is not None for f in s), (key, s.names)
        assert all(f.metadata[b"description"] != b"undeclared" for f in s)
        assert schema.PROVENANCE_KEY in s.metadata


def test_summary_paths_are_relative_to_the_run(default_run):
    cfg, _, _ = default_run
    written = json.loads((Path(cfg.run_dir) / "catalogs" / "sources.summary.json").read_text())
    for key, rel in written["paths"].items():
        assert not Path(rel).is_absolute(), (key, rel)
        assert (Path(cfg.run_dir) / rel).exists(), (key, rel)
    assert str(cfg.run_dir) not in json.dumps(written)
    run_summary = json.loads((Path(cfg.run_dir) / "run-summary.json").read_text())
    assert run_summary["merge"]["paths"] == written["paths"] | {
        k: v for k, v in run_summary["merge"]["paths"].items() if k not in written["paths"]}
    assert not any(Path(p).is_absolute() for p in run_summary["merge"]["paths"].values())


def test_bright_star_magnitudes_agree_with_calibrated_fluxes(default_run):
    """mag = 31.4 - 2.5 log10(flux / nJy) for every positive flux: the calibration and the AB magnitudes agree."""
    _, _, cat = default_run
    for b in ("g", "r", "i", "z"):
        f, m = cat[f"flux_auto_{b}"].to_numpy(float), cat[f"mag_auto_{b}"].to_numpy(float)
        ok = f > 0
        assert ok.sum() > 100
        assert np.allclose(m[ok], 31.4 - 2.5 * np.log10(f[ok]), atol=1e-6)


def test_store_completion_records_name_inputs_relative_to_the_store(default_run, survey):
    from deepfield.tasks.zarr_store import complete_fields, field_record, open_store

    cfg, _, _ = default_run
    root = open_store(cfg.store_path)
    base = Path(cfg.store_path).absolute().parent
    for name in complete_fields(root):
        rec = field_record(root, name)
        text = json.dumps(rec)
        assert str(survey) not in text and str(cfg.run_dir) not in text, name
        assert rec["checksums"] and all((base / p).resolve().is_file() for p in rec["checksums"]), name


def test_schema_command():
    from typer.testing import CliRunner

    from deepfield.flows.cli import app

    r = CliRunner().invoke(app, ["schema", "--markdown"])
    assert r.exit_code == 0 and r.stdout == (ROOT / "docs" / "schema.md").read_text()
    r = CliRunner().invoke(app, ["schema", "--table", "clusters"])
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert r.exit_code == 0 and {row[0] for row in rows} == {"clusters"} and ["clusters", "z"] == rows[2][:2]
    r = CliRunner().invoke(app, ["schema", "--table", "nope"])
    assert r.exit_code == 2 and "no such table" in r.output
