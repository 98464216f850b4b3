"""Tile stages run by the tile runner in order; the contract every stage follows (typed configuration,
declared columns, bands, side tables, models and merge step) is in `base.py` and docs/design.md ("Stage").

Classical (SEP): `background` (sky subtraction in place), `detect` (detection and deblending on the
band-weighted image), `measure` (aperture and Kron photometry, RA/Dec, flags). Learned: `deblend`, `photoz`,
`lens`, `merger`, `cluster`, `anomaly`. Build one by name with `make_stage`; `STAGES` lists them; `register_stage` adds one.
"""
from .base import ModelStage, Stage, StageConfig, StageConfigError
from .registry import DEFAULT_STAGES, STAGES, check_order, load_plugins, make_stage, register_stage, stage_class

__all__ = ["STAGES", "DEFAULT_STAGES", "make_stage", "stage_class", "register_stage", "load_plugins", "check_order",
           "Stage", "ModelStage", "StageConfig", "StageConfigError"]
