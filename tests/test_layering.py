"""The package's layering, read from the source with `ast` (every import, at module level or inside a function):
imports run one way, flows -> catalogs / tasks -> models; the simulator and the training-set builders are used
only where data is simulated (training, evaluation, `deepfield simulate` and `deepfield demo`); no import
circles."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "models", "catalogs")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package) for every module of the four code folders."""
    out = {}
    for top in PACKAGES:
        for f in sorted((ROOT / top).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(["deepfield", *(parts[:-1] if is_pkg else parts)])] = (f, is_pkg)
    return out


MODULES = _modules()


def imports_of(name: str) -> set[str]:
    """The deepfield modules `name` imports (relative imports resolved; `from pkg import mod` is pkg.mod)."""
    path, is_pkg = MODULES[name]
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names}
    return {m for m in out if m == "deepfield" or m.startswith("deepfield.")}


GRAPH = {name: imports_of(name) for name in MODULES}


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_walk_sees_the_imports():
    """The graph is not empty by mistake: known edges of each kind are found."""
    assert "deepfield.tasks.stages.registry" in GRAPH["deepfield.tasks.tile_runner"]  # relative, module level
    assert "deepfield.models.registry" in GRAPH["deepfield.tasks.stages.base"]  # inside a function
    assert "deepfield.tasks.maskbits" in GRAPH["deepfield.tasks.stages.measure"]  # from .. import maskbits
    assert "deepfield.catalogs.merge" in GRAPH["deepfield.flows.merge"]
    assert len(MODULES) > 80


@pytest.mark.parametrize("layer", ["deepfield.tasks", "deepfield.models", "deepfield.catalogs"])
def test_nothing_below_flows_imports_flows(layer):
    bad = {m: sorted(i for i in deps if _under(i, "deepfield.flows"))
           for m, deps in GRAPH.items() if _under(m, layer)}
    assert not {m: v for m, v in bad.items() if v}


def test_models_import_only_models():
    """The networks, their training loops and the registry take arrays; they need none of the pipeline."""
    bad = {m: sorted(i for i in deps if not _under(i, "deepfield.models"))
           for m, deps in GRAPH.items() if _under(m, "deepfield.models")}
    assert not {m: v for m, v in bad.items() if v}


SIMULATING = ("deepfield.tasks.sim", "deepfield.tasks.trainsets", "deepfield.flows.evaluate",
              "deepfield.flows.cli", "deepfield.flows.cli_models", "deepfield.flows.cli_detect",
              "deepfield.flows.cli_photoz", "deepfield.flows.cli_anomaly", "deepfield.flows.cli_lens")


def test_only_simulating_code_imports_the_simulator_or_the_training_sets():
    """Real survey data must never need the simulator: the stages, the tile runner, the actor pool, the store,
    the merge and the catalogs do not import tasks.sim or tasks.trainsets; only the simulator itself, the
    training-set builders, the evaluations and the commands that simulate (simulate, demo, train) do."""
    bad = {m: sorted(i for i in deps if _under(i, "deepfield.tasks.sim", "deepfield.tasks.trainsets"))
           for m, deps in GRAPH.items() if not _under(m, *SIMULATING)}
    assert not {m: v for m, v in bad.items() if v}
    stages_and_merge = [m for m in GRAPH if _under(m, "deepfield.tasks.stages", "deepfield.catalogs")]
    assert len(stages_and_merge) > 15


def test_no_import_circles():
    """Depth-first search for a cycle in the explicit imports (a module importing its own package's
    __init__ for a name does not count)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if d not in GRAPH or (MODULES[d][1] and _under(m, d)):
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)
