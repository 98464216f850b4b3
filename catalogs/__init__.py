"""Catalog schema, merging, de-duplication, HEALPix partitioning and exports (see DESIGN.md)."""
