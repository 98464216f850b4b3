"""deepfield: survey-scale batch processing of astronomical imaging.

The four code folders at the top of the repository install as sub-packages of this one package:
`deepfield.flows` (Prefect flows, the evaluation flows and the `deepfield` command line),
`deepfield.tasks` (the work the flows call: FITS and Zarr I/O, tiling, the stages, the tile runner and
actor pool, shared astronomy helpers, training-set builders and the simulator), `deepfield.models`
(networks, their training loops, the model registry and shipped weights) and `deepfield.catalogs` (schema,
merge, de-duplication, per-stage merge steps and exports). Imports run one way, flows -> catalogs / tasks ->
models; docs/design.md describes the whole.
"""
# no relative import here: pytest imports this file on its own (the repository root, holding it, is a package
# to pytest), under a name taken from the checkout's directory
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deepfield")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
