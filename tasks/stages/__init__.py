"""Tile stages run by the tile runner in order (DESIGN.md, "Stage"): each has `setup(device)` and
`run(tile, sources) -> sources`. The SEP-based ones are `background` (sky subtraction in place),
`detect` (detection and deblending on the band-weighted image) and `measure` (aperture and Kron
photometry, RA/Dec, flags). Build one by name with `make_stage`; `STAGES` lists them.
"""
from .registry import DEFAULT_STAGES, STAGES, make_stage

__all__ = ["STAGES", "DEFAULT_STAGES", "make_stage"]
