"""Catalog merging, de-duplication, HEALPix partitioning, exports and the stages' merge steps (docs/design.md)."""
