"""One import name: the wheel built from the checkout, installed without the checkout (non-editable, no
dependencies, into its own directory first on the path), gives the `deepfield` command, `deepfield.tasks`,
the shipped weights and model cards, and runs stages, from a working directory holding a user's own
`tasks.py` and `models.py` (which deepfield must never import)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STAGE_SCRIPT = '''
"""Three Gaussian sources on a flat sky through background, detect and measure; a shipped model loaded."""
import numpy as np
from astropy.wcs import WCS

import deepfield
from deepfield.models.registry import create_model, entry
from deepfield.tasks.stages import make_stage
from deepfield.tasks.tiling import Box, TileId
from deepfield.tasks.zarr_store import Tile

n = 128
yy, xx = np.mgrid[:n, :n]
rng = np.random.default_rng(0)
image = rng.normal(100.0, 1.0, (2, n, n)).astype(np.float32)  # a sky of 100, noise 1
for x, y in ((30.2, 40.7), (90.5, 20.1), (70.0, 100.3)):
    image += (200.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5 ** 2)))[None].astype(np.float32)
w = WCS(naxis=2)
w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
w.wcs.crval = [150.0, 2.0]
w.wcs.crpix = [64.0, 64.0]
w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
box = Box(0, n, 0, n)
tile = Tile(id=TileId("f", 0, 0), bands=["g", "r"], image=image, invvar=np.ones_like(image),
            mask=np.zeros(image.shape, np.uint16), box=box, core=box, wcs=w, zeropoints=[27.0, 27.0],
            psf_fwhm=[0.7, 0.7], pixel_scale=0.2, field_shape=(n, n))
sources = None
for name in ("background", "detect", "measure"):
    sources = make_stage(name).run(tile, sources)
print("sources", len(sources), " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(sources.x, sources.y)))
model = create_model("lens_resnet")
print("weights", entry("lens_resnet").weights, model.training_info["model"])
print("package", deepfield.__file__)
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout's files (tracked and new, not ignored), so that nothing left
    in the checkout's build/ can slip into it."""
    tmp = tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    src = tmp / "src"
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                        "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("deepfield-*.whl")
    return whl


def test_wheel_holds_the_packages_weights_and_cards(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("lens_resnet", "deblend_unet", "anomaly_wgan", "cluster_net"):
        assert f"deepfield/models/weights/{model}.pt" in names
        assert f"deepfield/models/weights/{model}.train.json" in names
        assert f"deepfield/models/cards/{model}.md" in names
    tops = {n.split("/")[0] for n in names}
    assert {"deepfield"} == {t for t in tops if not t.endswith(".dist-info")}  # one import name, nothing else
    assert {"deepfield/flows/cli.py", "deepfield/tasks/stages/detect.py", "deepfield/catalogs/merge.py",
            "deepfield/flows/evaluate/cluster.py", "deepfield/tasks/trainsets/fields.py"} <= names


def test_installed_wheel_runs_beside_a_users_tasks_and_models_modules(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    for name in ("tasks", "models", "catalogs", "flows"):  # common file names in a user's directory
        (work / f"{name}.py").write_text(f'raise RuntimeError("the user\'s own {name}.py was imported")\n')
    (work / "stage_check.py").write_text(textwrap.dedent(STAGE_SCRIPT))
    env = dict(os.environ, PYTHONPATH=str(target), COLUMNS="200")

    def run(*cmd):
        out = subprocess.run(list(cmd), cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    assert "simulate" in run(str(target / "bin" / "deepfield"), "--help")
    where = run(sys.executable, "-c", "import deepfield.tasks, deepfield.catalogs.dedup; print(deepfield.tasks.__file__)")
    assert Path(where.strip()).is_relative_to(target)
    out = dict(line.split(" ", 1) for line in run(sys.executable, "stage_check.py").splitlines())
    assert out["sources"].split()[0] == "3"
    found = sorted(tuple(float(v) for v in p.split(",")) for p in out["sources"].split()[1:])
    truth = sorted([(30.2, 40.7), (90.5, 20.1), (70.0, 100.3)])
    assert all(abs(f[0] - t[0]) < 0.2 and abs(f[1] - t[1]) < 0.2 for f, t in zip(found, truth)), found
    assert Path(out["weights"].split()[0]).is_relative_to(target) and out["weights"].split()[1] == "lens_resnet"
    assert Path(out["package"]).is_relative_to(target)
