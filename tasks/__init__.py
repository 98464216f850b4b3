"""The work the flows call: FITS reading and validation, the ingest of a field, tiling geometry, Zarr I/O,
the stages (stages/), the tile runner and the Ray actor pool, the ledger and provenance hashes, shared
astronomy helpers (astro.py), the training-set builders (trainsets/) and the survey simulator (sim/)."""
