"""One import name: the wheel built from the checkout, installed without the checkout (non-editable, no
dependencies, into its own directory first on the path), gives the `deepfield` command, `deepfield.tasks`,
the shipped weights and model cards, and runs stages, from a working directory holding a user's own
`tasks.py` and `models.py` (which deepfield must never import).

The lock: `make` installs with requirements/lock.txt as constraints, so the lock must pin, once each and at a
version that pyproject.toml allows, every requirement of deepfield and of the extras the Makefile installs,
and must leave out torch (installed first from the Makefile's TORCH_SPEC, which GPU users override; the
default must satisfy pyproject's torch range). The lock is the requirement closure of deepfield[extras] in the
environment that passes the tests, at the installed versions: this module computes it both to check it and,
run as a script by `make lock` (`python tests/test_packaging.py --write-lock requirements/lock.txt`), to
write it, so that what the lock holds and what is checked cannot drift apart."""
from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT, LOCK, MAKEFILE = ROOT / "pyproject.toml", ROOT / "requirements" / "lock.txt", ROOT / "Makefile"

STAGE_SCRIPT = '''
"""Three Gaussian sources on a flat sky through background, detect and measure; a shipped model loaded."""
import numpy as np
from astropy.wcs import WCS

import deepfield
from deepfield.models.registry import create_model, entry
from deepfield.tasks.stages import make_stage
from deepfield.tasks.tiling import Box, TileId
from deepfield.tasks.zarr_read import Tile

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


def makefile_value(makefile: Path, name: str) -> str:
    """The value the Makefile gives `name` (`NAME := value` or `NAME ?= value`), quotes stripped."""
    found = re.search(rf"^{name}\s*[:?]?=\s*(.*?)\s*$", makefile.read_text(), re.M)
    if found is None:
        raise ValueError(f"{makefile}: no {name} = ...")
    return found.group(1).strip("\"'")


def applies(req: Requirement, extras=()) -> bool:
    """Whether `req` is wanted here (its marker, if any, evaluated for this Python and platform), with `extras`."""
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras))


def requirement_closure(extras, through_torch: bool = True) -> dict[str, metadata.Distribution]:
    """Every installed distribution that deepfield[extras] requires, directly or not, by canonical name (deepfield
    itself included); the requirements of torch only if `through_torch`. LookupError names one not installed."""
    found: dict[str, metadata.Distribution] = {}
    seen = set()
    todo = [("deepfield", tuple(extras), "the command line")]
    while todo:
        name, wanted, by = todo.pop()
        key = canonicalize_name(name)
        if (key, wanted) in seen:
            continue
        seen.add((key, wanted))
        if key not in found:
            try:
                found[key] = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                raise LookupError(f"{name}, required by {by}, is not installed in {sys.prefix}") from None
        if key == "torch" and not through_torch:
            continue
        for line in found[key].requires or ():
            req = Requirement(line)
            if applies(req, wanted):
                todo.append((req.name, tuple(sorted(req.extras)), name))
    return found


def lock_text(extras) -> str:
    """The lock of this environment: the closure of deepfield[extras], less deepfield and torch, as name==version.
    LookupError if a requirement is not installed, or deepfield's installed metadata is older than pyproject.toml."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    declared = {canonicalize_name(Requirement(r).name) for r in
                [*project["dependencies"], *sum(project.get("optional-dependencies", {}).values(), [])]}
    installed = {canonicalize_name(Requirement(r).name) for r in metadata.requires("deepfield") or ()}
    if declared != installed:
        raise LookupError(f"deepfield is installed with other requirements than {PYPROJECT} names "
                          f"({', '.join(sorted(declared ^ installed))})")
    dists = requirement_closure(extras)
    pins = sorted((key, f"{dists[key].metadata['Name']}=={dists[key].version}") for key in dists
                  if key not in ("deepfield", "torch"))
    return (f"# Constraints for `make` (pip install -c): every package that deepfield[{','.join(extras)}] requires, directly\n"
            f"# or not, at the version installed in the environment that passed the tests (Python "
            f"{sys.version_info.major}.{sys.version_info.minor}, {platform.system()} {platform.machine()}).\n"
            "# Regenerated by `make lock` (tests/test_packaging.py run as a script); do not edit by hand.\n"
            "# torch is not here: the Makefile installs it first from TORCH_SPEC / TORCH_INDEX, which GPU users override.\n"
            + "".join(line + "\n" for _, line in pins))


def read_lock(lock: Path) -> tuple[dict[str, Version], list[str]]:
    """The lock's pins by canonical name, and what is wrong with its lines (not name==version, a name twice)."""
    pins, problems = {}, []
    for n, line in enumerate(lock.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        pin = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)", line)
        try:
            version = Version(pin.group(2)) if pin else None
        except InvalidVersion:
            version = None
        if version is None:
            problems.append(f"{lock}:{n}: not a name==version pin: {line!r}")
            continue
        key = canonicalize_name(pin.group(1))
        if key in pins:
            problems.append(f"{lock}:{n}: {pin.group(1)} is pinned twice")
        pins[key] = version
    return pins, problems


def lock_problems(pyproject: Path, lock: Path, makefile: Path) -> list[str]:
    """What keeps the lock from agreeing with pyproject.toml and the Makefile (empty: they agree)."""
    pins, problems = read_lock(lock)
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = makefile_value(makefile, "EXTRAS").split(",")
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        if extra not in project.get("optional-dependencies", {}):
            problems.append(f"{makefile}: installs the extra {extra!r}, which {pyproject} does not define")
        reqs += [Requirement(r) for r in project.get("optional-dependencies", {}).get(extra, ())]
    torch_spec = Requirement(makefile_value(makefile, "TORCH_SPEC"))
    for req in filter(applies, reqs):
        key = canonicalize_name(req.name)
        if key == "torch":
            default = [s.version for s in torch_spec.specifier if s.operator == "=="]
            if len(default) != 1 or not req.specifier.contains(default[0], prereleases=True):
                problems.append(f"{makefile}: TORCH_SPEC {torch_spec} is not one version within {pyproject}'s {req}")
        elif key not in pins:
            problems.append(f"{lock}: {req.name} (required by {pyproject}: {req}) is not pinned")
        elif not req.specifier.contains(pins[key], prereleases=True):
            problems.append(f"{lock}: {req.name}=={pins[key]} is outside {pyproject}'s {req}")
    if "torch" in pins:
        problems.append(f"{lock}: pins torch, which the Makefile installs first from TORCH_SPEC (GPU overrides)")
    return problems


def environment_problems(lock: Path, extras) -> list[str]:
    """Where the running environment differs from the lock: a pinned package installed at another version or
    not at all, or a requirement of deepfield (not only of torch, whose build GPU users choose) left unpinned."""
    pins, problems = read_lock(lock)
    for key, version in sorted(pins.items()):
        try:
            installed = Version(metadata.version(key))
        except metadata.PackageNotFoundError:
            problems.append(f"{lock}: {key}=={version} is not installed in {sys.prefix}")
            continue
        if installed != version:
            problems.append(f"{lock}: {key}=={version}, but {installed} is installed in {sys.prefix}")
    for key in sorted(set(requirement_closure(extras, through_torch=False)) - set(pins) - {"deepfield", "torch"}):
        problems.append(f"{lock}: {key}, which deepfield requires, is not pinned (installed: {metadata.version(key)})")
    return problems


def test_the_lock_pins_what_pyproject_requires():
    assert lock_problems(PYPROJECT, LOCK, MAKEFILE) == []


def test_the_makefiles_environment_is_the_lock():
    """In an environment the Makefile made (its stamp is there: `make test`, CI), what is installed is the lock;
    the check is skipped anywhere else, where other versions are the user's choice."""
    if not (Path(sys.prefix) / ".installed").is_file():
        pytest.skip(f"{sys.prefix} was not made by the Makefile (no .installed stamp)")
    assert environment_problems(LOCK, makefile_value(MAKEFILE, "EXTRAS").split(",")) == []


@pytest.mark.parametrize("name, broken, problem", [
    ("pyproject.toml", lambda s: s.replace('"pytest>=8",', '"pytest>=8", "websocket-client>=1.8",'),
     "websocket-client (required by"),
    ("lock.txt", lambda s: re.sub(r"(?m)^fastapi==.*$", "fastapi==0.155.0", s), "fastapi==0.155.0 is outside"),
    ("lock.txt", lambda s: s + "NumPy==1.26.4\n", "NumPy is pinned twice"),
    ("lock.txt", lambda s: s + "torch==2.13.0\n", "pins torch"),
    ("lock.txt", lambda s: s + "pandas>=2\n", "not a name==version pin"),
    ("Makefile", lambda s: s.replace("torch==2.13.0", "torch==2.1.0"), "TORCH_SPEC torch==2.1.0 is not"),
    ("Makefile", lambda s: s.replace("EXTRAS      := test,eval", "EXTRAS      := test,evaluation"),
     "the extra 'evaluation'"),
])
def test_the_lock_check_fails_on_a_broken_copy(tmp_path, name, broken, problem):
    files = {"pyproject.toml": PYPROJECT, "lock.txt": LOCK, "Makefile": MAKEFILE}
    copies = {}
    for each, src in files.items():
        copies[each] = tmp_path / each
        text = src.read_text()
        copies[each].write_text(broken(text) if each == name else text)
        assert each != name or broken(text) != text, f"the breakage of {name} changed nothing"
    found = lock_problems(copies["pyproject.toml"], copies["lock.txt"], copies["Makefile"])
    assert len(found) == 1 and problem in found[0], found


def test_the_environment_check_fails_on_a_broken_lock(tmp_path):
    """The lock of the running environment passes; with one version changed, or one pin removed, it fails."""
    extras = makefile_value(MAKEFILE, "EXTRAS").split(",")
    text = lock_text(extras)
    assert "\ntorch==" not in text and "\ndeepfield==" not in text and "\nfastapi==" in text
    good = tmp_path / "good.txt"
    good.write_text(text)
    assert read_lock(good)[1] == [] and environment_problems(good, extras) == []
    changed, dropped = tmp_path / "changed.txt", tmp_path / "dropped.txt"
    changed.write_text(re.sub(r"(?m)^(pyarrow==)(.*)$", r"\g<1>1.0.0", text))
    dropped.write_text(re.sub(r"(?m)^pyarrow==.*\n", "", text))
    assert [p for p in environment_problems(changed, extras) if "pyarrow==1.0.0, but" in p] != []
    assert len(environment_problems(changed, extras)) == 1
    (problem,) = environment_problems(dropped, extras)
    assert "pyarrow, which deepfield requires, is not pinned" in problem


if __name__ == "__main__":  # `make lock`: python tests/test_packaging.py --write-lock requirements/lock.txt
    from deepfield.tasks.atomic import write_text

    if len(sys.argv) != 3 or sys.argv[1] != "--write-lock":
        sys.exit(f"usage: {sys.argv[0]} --write-lock LOCKFILE")
    try:
        write_text(sys.argv[2], lock_text(makefile_value(MAKEFILE, "EXTRAS").split(",")))
    except LookupError as e:
        sys.exit(f"make lock: {e} (run `make install` first)")
    print(f"wrote {sys.argv[2]}")
