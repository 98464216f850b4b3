"""Stage registry: stage name -> class, and construction by name from the run configuration.

A new science stage adds its module and one entry in `STAGES`; the tile runner builds the stages
listed in the configuration with `make_stage(name, **params)` and runs them in order.
"""
from __future__ import annotations

from typing import Any

from .anomaly import AnomalyStage
from .background import BackgroundStage
from .cluster import ClusterStage
from .deblend import DeblendStage
from .detect import DetectStage
from .lens import LensStage
from .measure import MeasureStage

__all__ = ["STAGES", "DEFAULT_STAGES", "make_stage"]

STAGES: dict[str, type] = {cls.name: cls for cls in (BackgroundStage, DetectStage, MeasureStage, DeblendStage, LensStage,
                                                       AnomalyStage, ClusterStage)}

# the order the runner uses when the configuration names no stages
DEFAULT_STAGES: list[str] = ["background", "detect", "measure", "deblend", "lens", "anomaly", "cluster"]


def make_stage(name: str, **params: Any):
    """An instance of the stage registered as `name`, built with keyword `params`.

    Raises ValueError for an unknown name (listing the known ones) or parameters the stage does
    not take."""
    try:
        cls = STAGES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}") from None
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"stage {name!r}: bad parameters {sorted(params)}: {exc}") from exc
