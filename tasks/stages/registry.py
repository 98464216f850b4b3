"""Stage registry: stage name -> class, construction by name, and the checks a stage list gets before a run.

The stages of this package are listed in `STAGES`; a stage from outside (a plugin module, named by the run
configuration's `plugins`) joins with `register_stage(cls)` when its module is imported (`load_plugins`).
The tile runner builds the stages listed in the configuration with `make_stage(name, **params)` and runs
them in order. Before a run, `check_order` checks with the stages' declarations that every column a stage
reads is added by a stage before it, and `resolve_bands` picks each model stage's band-set variant for the
survey's bands and reports (or leaves out) the stages that cannot run on them.
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
from .merger import MergerStage
from .photoz import PhotoZStage

__all__ = ["STAGES", "DEFAULT_STAGES", "make_stage", "stage_class", "register_stage", "load_plugins",
           "check_order", "check_upstream", "check_bands", "resolve_bands", "BandError"]

STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in (
    BackgroundStage, DetectStage, MeasureStage, DeblendStage, PhotoZStage, LensStage, MergerStage, ClusterStage,
    AnomalyStage)}

# the order the runner uses when the configuration names no stages (the merge steps run in this order too)
DEFAULT_STAGES: list[str] = ["background", "detect", "measure", "deblend", "photoz", "lens", "merger", "cluster",
                             "anomaly"]

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



def check_upstream(stages: list[tuple[str, dict]]) -> None:
    """StageConfigError, one line per stage, when a stage of `stages` ([(name, params)], in run order) cannot
    follow the configured stages before it (Stage.upstream_problem): checked before any run."""
    from .base import StageConfigError
    before: dict = {}
    problems = []
    for name, params in stages:
        cls = stage_class(name)
        cfg = cls.configure(params)
        why = cls.upstream_problem(cfg, dict(before))
        if why:
            problems.append(f"stage {name!r}: {why}")
        before[name] = cfg
    if problems:
        raise StageConfigError("\n".join(problems))


class BandError(ValueError):
    """A field lacks bands a configured stage needs."""


def _band_problems(stage: Stage, field_bands: dict[str, list[str]]) -> list[str]:
    """What keeps `stage` from running on each field of `field_bands` (name -> its bands); [] when nothing."""
    out = []
    need = stage.required_bands()
    for field, have in field_bands.items():
        missing = [b for b in need or () if b not in have]
        if missing:
            out.append(f"needs bands {', '.join(need)}; field {field!r} has {', '.join(have)} "
                       f"(missing {', '.join(missing)})")
        other = stage.band_problem(list(have))
        if other:
            out.append(f": {other}; field {field!r} has {', '.join(have)}")
    return out


def _variant_candidates(name: str, params: dict, field_bands: dict[str, list[str]] | None = None) -> list[dict]:
    """The parameter sets to try for stage `name` on a survey: for a model stage whose configuration names
    neither weights nor variant, one per shipped band-set variant of its model, best first (the most of the
    survey's bands used, counted in the field that has fewest of them: weights that take any subset of their
    bands, such as the photo-z reference sets, use only those a field has; then the most bands, the main weights
    on a tie: models.registry.choose_variant's order); otherwise `params` as they are."""
    from .base import ModelStage
    cls = stage_class(name)
    cfg = cls.configure(params)
    if not issubclass(cls, ModelStage) or cfg.weights is not None or cfg.variant is not None \
            or not cls.used_models(cfg):
        return [dict(params)]
    from deepfield.models.registry import variants
    fields = list((field_bands or {}).values())

    def used(bands: list[str]) -> int:
        return min((len(set(bands) & set(f)) for f in fields), default=len(bands))
    tags = sorted(variants(cls.used_models(cfg)[0]).items(),
                  key=lambda kv: (-used(kv[1]), -len(kv[1]), kv[0] != "", kv[0]))
    # the main weights as the parameters are (variant none), so a survey with the main weights' bands keeps
    # its configuration hash and its ledger
    return [dict(params, variant=tag) if tag else dict(params) for tag, _ in tags] or [dict(params)]


def resolve_bands(stages: list[tuple[str, dict]], field_bands: dict[str, list[str]], missing: str = "error"
                  ) -> tuple[list[tuple[str, dict]], list[str]]:
    """The stages of `stages` ([(name, params)]) as the survey's fields (`field_bands`, name -> its bands) can run
    them, and one line per stage left out.

    A model stage whose configuration names neither `weights` nor `variant` gets the shipped band-set variant
    of its model with the most bands that every field has (models/registry.py; the main weights on a tie); a
    variant other than the main weights is written into its parameters as `variant`, so the run's
    configuration hash and ledger say which ran.
    A stage no variant fits: with `missing` "error", BandError with one line per stage and field (nothing
    runs); with "skip", the stage is left out with a line saying why, and so is any later stage that reads
    columns only a left-out stage adds."""
    if missing not in ("error", "skip"):
        raise ValueError(f"missing bands: {missing!r} is not 'error' or 'skip'")
    kept, skipped, problems = [], [], []
    for name, params in stages:
        tries = _variant_candidates(name, params, field_bands)
        found = None
        for p in tries:
            if not _band_problems(make_stage(name, **p), field_bands):
                found = p
                break
        if found is not None:
            kept.append((name, found))
            continue
        # report the weights that the fewest fields cannot run (the main weights on a tie)
        lines = min(((_band_problems(make_stage(name, **p), field_bands), bool(p.get("variant"))) for p in tries),
                    key=lambda lv: (len(lv[0]), lv[1]))[0]
        if len(tries) > 1:
            from deepfield.models.registry import variants
            cls = stage_class(name)
            sets = "; ".join(",".join(b) for b in variants(cls.used_models(cls.configure(params))[0]).values())
            lines = [f"{ln} (its shipped weights take {sets})" for ln in lines]
        problems += [f"stage {name!r}{'' if ln.startswith(':') else ' '}{ln}" for ln in lines]
        skipped.append(f"stage {name!r} skipped: {lines[0].removeprefix(': ')}")
    if problems and missing == "error":
        raise BandError("\n".join(problems))
    # a kept stage that reads what only a left-out stage adds goes too
    while True:
        added = set()
        for name, params in list(kept):
            cls = stage_class(name)
            lack = [c for c in cls.reads if c not in added]
            if lack:
                kept.remove((name, params))
                skipped.append(f"stage {name!r} skipped: it reads {', '.join(lack)}, added by a skipped stage")
                break
            added |= set(cls.adds)
        else:
            break
    check_upstream(kept)  # with the band-set variants chosen (their weights' training records)
    return kept, skipped


def check_bands(stages: list[tuple[str, dict]], field_bands: dict[str, list[str]]) -> None:
    """BandError, one line per stage and field, when a field of `field_bands` (name -> its bands) lacks a band
    that a stage of `stages` ([(name, params)]) needs with any of its shipped weights (`resolve_bands`)."""
    resolve_bands(stages, field_bands, "error")
