"""Stage registry: stage name -> class, construction by name, and the checks a stage list gets before a run.

The stages of this package are listed in `STAGES`; a stage from outside (a plugin module, named by the run
configuration's `plugins`) joins with `register_stage(cls)` when its module is imported (`load_plugins`).
The tile runner builds the stages listed in the configuration with `make_stage(name, **params)` and runs
them in order. Before a run, `check_order` checks with the stages' declarations that every column a stage
reads is added by a stage before it, and `check_bands` that every field has the bands every stage needs.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from .anomaly import AnomalyStage
from .background import BackgroundStage
from .base import Stage, StageConfig
from .cluster import ClusterStage
from .deblend import DeblendStage
from .detect import DetectStage
from .lens import LensStage
from .measure import MeasureStage

__all__ = ["STAGES", "DEFAULT_STAGES", "make_stage", "stage_class", "register_stage", "load_plugins",
           "check_order", "check_bands", "BandError"]

STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in (
    BackgroundStage, DetectStage, MeasureStage, DeblendStage, LensStage, ClusterStage, AnomalyStage)}

# the order the runner uses when the configuration names no stages (the merge steps run in this order too)
DEFAULT_STAGES: list[str] = ["background", "detect", "measure", "deblend", "lens", "cluster", "anomaly"]

_PLUGINS: dict[str, str] = {}  # plugin as named -> module name it was loaded as


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Add a stage class to the registry (usable as a decorator); ValueError when it does not follow the
    contract (tasks/stages/base.py) or another class has its name."""
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise ValueError(f"{cls!r} is not a subclass of deepfield.tasks.stages.base.Stage")
    for attr in ("name", "version"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise ValueError(f"stage class {cls.__qualname__} declares no {attr} (a non-empty string)")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, StageConfig)):
        raise ValueError(f"stage {cls.name!r}: Config must subclass deepfield.tasks.stages.base.StageConfig")
    old = STAGES.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"stage name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}")
    STAGES[cls.name] = cls
    return cls


def stage_class(name: str) -> type[Stage]:
    """The class registered as `name`; ValueError listing the known stages otherwise."""
    try:
        return STAGES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}") from None


def make_stage(name: str, **params: Any) -> Stage:
    """An instance of the stage registered as `name`, built with keyword `params`.

    Raises ValueError for an unknown name (listing the known ones) or parameters the stage does not take or
    that fail its configuration's checks (tasks.stages.base.StageConfigError, one line per problem)."""
    return stage_class(name)(**params)


def load_plugins(plugins: list[str] | tuple[str, ...]) -> None:
    """Import plugin modules, which register their stages on import. A plugin is a module name (importable
    where the run, its actors and its Dask workers run) or the path of a .py file (on a file system they all
    see); a file is imported as module `deepfield_plugin_<stem>_<hash of its absolute path>`, the same name in
    every process, so that objects of its classes pickled in one process load in another that imported it
    too. Each is imported once per process. ValueError naming the plugin when it cannot be imported."""
    for spec in plugins:
        spec = str(spec)
        if spec in _PLUGINS:
            continue
        try:
            if spec.endswith(".py") or "/" in spec:
                path = Path(spec).resolve()
                name = f"deepfield_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
                loader = importlib.util.spec_from_file_location(name, path)
                if loader is None or not path.is_file():
                    raise FileNotFoundError(f"{path}: no such file")
                module = importlib.util.module_from_spec(loader)
                sys.modules[name] = module
                try:
                    loader.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            else:
                name = importlib.import_module(spec).__name__
        except Exception as exc:
            raise ValueError(f"plugin {spec!r}: cannot import it: {type(exc).__name__}: {exc}") from exc
        _PLUGINS[spec] = name


def check_order(names: list[str]) -> None:
    """ValueError naming the stage and the columns when a stage of `names` (in run order) reads a column
    that no stage before it adds (declared `reads` and `adds`, "{band}" templates compared as written)."""
    added: dict[str, str] = {}
    for name in names:
        cls = stage_class(name)
        missing = [c for c in cls.reads if c not in added]
        if missing:
            makers = sorted(s.name for s in STAGES.values() if set(s.adds) & set(missing))
            raise ValueError(f"stage {name!r} reads {', '.join(missing)}, which no stage before it adds"
                             + (f" (added by: {', '.join(makers)})" if makers else ""))
        for c in cls.adds:
            added.setdefault(c, name)



class BandError(ValueError):
    """A field lacks bands a configured stage needs."""


def check_bands(stages: list[tuple[str, dict]], field_bands: dict[str, list[str]]) -> None:
    """BandError, one line per stage and field, when a field of `field_bands` (name -> its bands) lacks a band
    that a stage of `stages` ([(name, params)]) needs (`required_bands`)."""
    problems = []
    for name, params in stages:
        stage = make_stage(name, **params)
        need = stage.required_bands()
        for field, have in field_bands.items():
            missing = [b for b in need or () if b not in have]
            if missing:
                problems.append(f"stage {name!r} needs bands {', '.join(need)}; field {field!r} has "
                                f"{', '.join(have)} (missing {', '.join(missing)})")
            other = stage.band_problem(list(have))
            if other:
                problems.append(f"stage {name!r}: {other}; field {field!r} has {', '.join(have)}")
    if problems:
        raise BandError("\n".join(problems))
