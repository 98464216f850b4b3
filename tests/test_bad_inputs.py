"""Bad inputs, as a new user would give them, through `deepfield ingest` and `deepfield run`: each is refused
with one line naming the offending file and the problem, and the documented exit status (2: a bad
configuration, before anything starts; 1: a field whose files are bad, the other fields going on), and
nothing of the bad field reaches the store as complete. A few oddities are repaired with a note instead.

The field is a small hand-made one (64 x 80 px, g and r, unit-sigma noise, a TAN WCS) written per case."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits
from astropy.wcs import WCS
from typer.testing import CliRunner

from deepfield.flows.cli import app
from deepfield.tasks import maskbits
from deepfield.tasks.zarr_store import complete_fields, open_store

NY, NX = 64, 80


def _wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [40.5, 32.5]
    w.wcs.cd = 0.2 / 3600 * np.array([[-1.0, 0.0], [0.0, 1.0]])
    return w


def write_field(d: Path) -> dict:
    """Files of a good two-band field in `d`; returns the ingest configuration's `bands` mapping."""
    rng = np.random.default_rng(3)
    bands = {}
    for b in ("g", "r"):
        h = _wcs().to_header()
        h["MAGZERO"], h["PSF_FWHM"] = 27.0, 0.8
        img = d / f"{b}-image.fits"
        fits.PrimaryHDU(rng.normal(size=(NY, NX)).astype(np.float32), h).writeto(img)
        iv = d / f"{b}-invvar.fits"
        fits.PrimaryHDU(np.ones((NY, NX), np.float32), _wcs().to_header()).writeto(iv)
        m = d / f"{b}-mask.fits"
        mh = _wcs().to_header()
        for key, bit, comment in maskbits.header_cards():
            mh[key] = (bit, comment)
        fits.PrimaryHDU(np.zeros((NY, NX), np.int16), mh).writeto(m)
        bands[b] = {"image": img.name, "invvar": iv.name, "mask": m.name}
    return bands


def write_config(d: Path, bands: dict, **field) -> Path:
    cfg = d / "ingest.yaml"
    cfg.write_text(yaml.safe_dump({"fields": [dict({"name": "f", "bands": bands}, **field)]}))
    return cfg


def rewrite(path: Path, data=None, **cards) -> None:
    """Write `path` again with new data and/or header cards."""
    with fits.open(path) as h:
        header, old = h[0].header.copy(), h[0].data.copy()
    for k, v in cards.items():
        if v is None:
            del header[k]
        else:
            header[k] = v
    fits.PrimaryHDU(old if data is None else data, header).writeto(path, overwrite=True)


def ingest(cfg: Path, store: Path):
    r = CliRunner().invoke(app, ["ingest", str(cfg), "--store", str(store)], env={"COLUMNS": "400"})
    return r.exit_code, r.output


# (name, breaks the field in directory d given its bands mapping, file to blame (relative to d), phrase)
FILE_CASES = [
    ("image missing", lambda d, b: (d / "g-image.fits").unlink(), "g-image.fits", "no such file"),
    ("image not FITS", lambda d, b: (d / "g-image.fits").write_bytes(b"SIMPLE? no\n" * 600), "g-image.fits", "FITS"),
    ("image truncated", lambda d, b: (d / "g-image.fits").write_bytes((d / "g-image.fits").read_bytes()[:8000]),
     "g-image.fits", "truncated"),
    ("image path is a directory", lambda d, b: ((d / "g-image.fits").unlink(), (d / "g-image.fits").mkdir()),
     "g-image.fits", "not a regular file"),
    ("mask path is a directory", lambda d, b: ((d / "r-mask.fits").unlink(), (d / "r-mask.fits").mkdir()),
     "r-mask.fits", "not a regular file"),
    ("no zero point", lambda d, b: rewrite(d / "g-image.fits", MAGZERO=None), "g-image.fits", "no zero point"),
    ("zero point not a number", lambda d, b: rewrite(d / "g-image.fits", MAGZERO="bright"), "g-image.fits",
     "invalid zero point"),
    ("singular WCS", lambda d, b: rewrite(d / "r-image.fits", PC1_1=0.0, PC1_2=0.0, PC2_1=0.0, PC2_2=0.0),
     "r-image.fits", "invalid WCS"),
    ("no celestial WCS", lambda d, b: rewrite(d / "r-image.fits", CTYPE1="LINEAR", CTYPE2="LINEAR"), "r-image.fits",
     "WCS"),
    ("invvar of another shape", lambda d, b: rewrite(d / "g-invvar.fits", np.ones((NY, NX - 1), np.float32)),
     "g-invvar.fits", "differs from the image shape"),
    ("mask of floats", lambda d, b: rewrite(d / "g-mask.fits", np.zeros((NY, NX), np.float32)), "g-mask.fits",
     "not an integer image"),
    ("mask of another shape", lambda d, b: rewrite(d / "g-mask.fits", np.zeros((NY - 2, NX), np.int16)),
     "g-mask.fits", "differs from the image shape"),
    ("invvar all NaN", lambda d, b: rewrite(d / "r-invvar.fits", np.full((NY, NX), np.nan, np.float32)),
     "r-invvar.fits", "no pixel of band r has a positive, finite inverse variance"),
    ("invvar all zero", lambda d, b: rewrite(d / "g-invvar.fits", np.zeros((NY, NX), np.float32)),
     "g-invvar.fits", "no pixel of band g has a positive, finite inverse variance"),
    ("every pixel masked", lambda d, b: rewrite(d / "g-mask.fits", np.full((NY, NX), maskbits.BAD, np.int16)),
     "g-mask.fits", "all pixels masked in band g"),
    ("99.95 % masked", lambda d, b: rewrite(d / "r-mask.fits", np.where(np.arange(NY * NX).reshape(NY, NX) < 2,
                                                                        0, maskbits.BAD).astype(np.int16)),
     "r-mask.fits", "too few to measure anything"),
    ("image of zeros", lambda d, b: rewrite(d / "g-image.fits", np.zeros((NY, NX), np.float32)), "g-image.fits",
     "every usable pixel of band g is 0"),
    ("constant image", lambda d, b: rewrite(d / "r-image.fits", np.full((NY, NX), 7.5, np.float32)), "r-image.fits",
     "a constant image"),
    ("variance given as invvar", lambda d, b: rewrite(d / "g-invvar.fits", np.full((NY, NX), 0.01, np.float32)),
     "g-invvar.fits", "a variance or sigma map given as invvar"),
    ("3-d image", lambda d, b: rewrite(d / "g-image.fits", np.zeros((2, NY, NX), np.float32)), "g-image.fits",
     "2-d"),
    ("image HDU without data", lambda d, b: fits.PrimaryHDU(header=fits.open(d / "g-image.fits")[0].header).writeto(
        d / "g-image.fits", overwrite=True), "g-image.fits", "no HDU with 2-d image data"),
]


@pytest.mark.parametrize("name, brk, blame, phrase", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_a_bad_file_fails_its_field_in_one_line_naming_it(name, brk, blame, phrase, tmp_path):
    bands = write_field(tmp_path)
    brk(tmp_path, bands)
    code, out = ingest(write_config(tmp_path, bands), tmp_path / "store.zarr")
    assert code == 1, out
    line = next((x for x in out.splitlines() if x.startswith("failed:")), "")
    assert str(tmp_path / blame) in line and phrase in line, out
    assert "Traceback" not in out
    root = tmp_path / "store.zarr"
    assert not root.exists() or "f" not in complete_fields(open_store(root))


CONFIG_CASES = [
    ("missing configuration", lambda d, cfg: cfg.unlink(), "no such file"),
    ("YAML syntax", lambda d, cfg: cfg.write_text("fields: [name: f\n"), "cannot read ingest configuration"),
    ("key given twice", lambda d, cfg: cfg.write_text(cfg.read_text() + "fields: []\n"), "found the key 'fields' twice"),
    ("binary file", lambda d, cfg: cfg.write_bytes(bytes(range(256)) * 4), "not a text file"),
    ("a directory", lambda d, cfg: (cfg.unlink(), cfg.mkdir()), "is a directory"),
    ("unknown key", lambda d, cfg: cfg.write_text(cfg.read_text().replace("name: f", "name: f\n  colour: red")),
     "colour"),
    ("invvar and variance both", lambda d, cfg: cfg.write_text(cfg.read_text().replace(
        "invvar: g-invvar.fits", "invvar: g-invvar.fits\n      variance: g-invvar.fits")), "not both"),
    ("bad field name", lambda d, cfg: cfg.write_text(cfg.read_text().replace("name: f", "name: f/../x")),
     "must be letters, digits"),
]


@pytest.mark.parametrize("name, brk, phrase", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_ingest_configuration_is_one_line_and_exit_2(name, brk, phrase, tmp_path):
    cfg = write_config(tmp_path, write_field(tmp_path))
    brk(tmp_path, cfg)
    code, out = ingest(cfg, tmp_path / "store.zarr")
    assert code == 2, out
    assert "ingest.yaml" in out and phrase in out and "Traceback" not in out, out
    assert not (tmp_path / "store.zarr").exists()


def test_a_store_path_that_is_a_file_is_one_line_and_exit_2(tmp_path):
    cfg = write_config(tmp_path, write_field(tmp_path))
    (tmp_path / "store.zarr").write_text("not a store\n")
    code, out = ingest(cfg, tmp_path / "store.zarr")
    assert code == 2 and f"{tmp_path / 'store.zarr'}: not a directory" in out and "Traceback" not in out, out


def test_huge_pixel_values_are_masked_with_a_note(tmp_path):
    """3e38 in the image (a sentinel, garbage): masked NODATA with a printed note; the rest is ingested."""
    bands = write_field(tmp_path)
    with fits.open(tmp_path / "g-image.fits") as h:
        img = h[0].data.copy()
    img[10:12, 20:25] = 3e38
    rewrite(tmp_path / "g-image.fits", img)
    code, out = ingest(write_config(tmp_path, bands), tmp_path / "store.zarr")
    assert code == 0, out
    assert "10 pixels with |value| >= 1e+30 masked NO_DATA" in out
    g = open_store(tmp_path / "store.zarr")["fields"]["f"]
    assert np.all(g["mask"][0, 10:12, 20:25] & maskbits.NO_DATA) and np.all(g["invvar"][0, 10:12, 20:25] == 0)


def test_run_refuses_a_missing_inputs_file_and_an_unwritable_run_directory(tmp_path):
    """`deepfield run` (in its own process, as a user starts it): exit 2 and one line naming the path."""
    import subprocess
    import sys

    def run(cfg):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # as a fresh shell has it
        r = subprocess.run([sys.executable, "-m", "deepfield.flows.cli", "run", str(cfg)], capture_output=True,
                           text=True, timeout=300, env=dict(env, COLUMNS="400"))
        return r.returncode, r.stdout + r.stderr

    cfg = tmp_path / "survey.yaml"
    cfg.write_text(yaml.safe_dump({"inputs": "nowhere.yaml", "run_dir": "out/run"}))
    code, out = run(cfg)
    assert code == 2 and str(tmp_path / "nowhere.yaml") in out and "no such file" in out, out
    assert not (tmp_path / "out").exists()  # nor the directories made for Prefect's server before the check
    write_config(tmp_path, write_field(tmp_path))
    (tmp_path / "run").write_text("a file where the run directory should be\n")
    cfg.write_text(yaml.safe_dump({"inputs": "ingest.yaml", "run_dir": "run"}))
    code, out = run(cfg)
    assert code == 2 and str(tmp_path / "run") in out and "Traceback" not in out, out
    assert len([x for x in out.splitlines() if x.startswith("error:")]) == 1
