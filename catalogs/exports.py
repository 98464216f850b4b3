"""The merged catalog's outputs as the ecosystem reads them (catalogs/merge.py writes them; what each holds is
in its module docstring): the HATS collection with its margin cache and skymap (hats-import), the FITS export,
the merge steps' Parquet tables rewritten with their declared schema, and paths relative to the run."""
from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from astropy.table import Table

from deepfield.tasks.atomic import atomic_path

from . import schema

__all__ = ["MARGIN_ARCSEC", "write_hats", "export_fits", "annotate_file", "relative"]

CATALOG_NAME = "sources"
HEALPIX_COLUMN = "_healpix_29"  # hats.pixel_math.spatial_index.SPATIAL_INDEX_COLUMN

MARGIN_ARCSEC = 10.0  # the HATS margin cache: rows within this of a partition's edge, for cross-matches


def _hats_properties(provenance: dict) -> dict:
    """hats.properties entries: title, description and the provenance (one line each)."""
    title, desc = schema.TITLES[CATALOG_NAME]
    out = {"obs_title": title, "obs_description": desc,
           "deepfield_version": provenance.get("deepfield_version", ""),
           "deepfield_created": provenance.get("created", "")}
    if provenance.get("config_hash"):
        out["deepfield_config_hash"] = provenance["config_hash"]
    for key in ("stage_versions", "merge_versions", "model_versions", "inputs"):
        if provenance.get(key):
            out[f"deepfield_{key}"] = " ".join(f"{k}:{v}" for k, v in sorted(provenance[key].items()))
    return out


class _HatsChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "found collection" not in record.getMessage()


@contextmanager
def _quiet_hats():
    """hats-import writing a collection: its validation logs "Looking for catalog - found collection." on the
    root logger at WARNING and the margin step warns that it computes partitions from the files; both are
    expected here and are not the user's business."""
    chatter = _HatsChatter()
    logging.getLogger().addFilter(chatter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Computing partitions from catalog parquet files")
            yield
    finally:
        logging.getLogger().removeFilter(chatter)


def write_hats(flat_dir: Path, staging: Path, client, highest_order: int, threshold: int,
                provenance: dict) -> Path:
    """The HATS collection `staging/sources`: the catalog `sources/sources` (with its skymap) and its margin
    cache `sources/sources_<MARGIN_ARCSEC>arcs`, the collection's default, so that lsdb.open_catalog of the
    collection cross-matches across partition edges."""
    from hats.pixel_math.spatial_index import SPATIAL_INDEX_COLUMN, SPATIAL_INDEX_ORDER
    from hats_import.collection.arguments import CollectionArguments
    from hats_import.pipeline import pipeline_with_client

    from .jit_cache import cache_hats_kernels
    cache_hats_kernels()  # the margin cache's plan aligns pixel trees with numba: compiled once per machine
    assert SPATIAL_INDEX_COLUMN == HEALPIX_COLUMN
    props = _hats_properties(provenance)
    args = CollectionArguments(output_path=staging, output_artifact_name=CATALOG_NAME, tmp_dir=staging / "hats_tmp",
                               resume=False, progress_bar=False, addl_hats_properties=props)
    args.catalog(
        catalog_type="object", input_file_list=sorted(flat_dir.glob("*.parquet")), file_reader="parquet",
        ra_column="ra", dec_column="dec", use_healpix_29=True,
        addl_hats_properties={"hats_col_healpix": SPATIAL_INDEX_COLUMN, "hats_col_healpix_order": SPATIAL_INDEX_ORDER,
                              "hats_cols_survey_id": "source_id", **props},
        highest_healpix_order=highest_order, pixel_threshold=threshold, should_write_skymap=True)
    args.add_margin(margin_threshold=MARGIN_ARCSEC, is_default=True)
    with _quiet_hats():
        pipeline_with_client(args, client)
    collection = staging / CATALOG_NAME
    for common in collection.glob("*/dataset/_common_metadata"):  # hats-import keeps the columns' metadata,
        sch = pq.read_schema(common)                              # not the schema's: the provenance
        pq.write_metadata(sch.with_metadata({**(sch.metadata or {}),
                                             schema.PROVENANCE_KEY: json.dumps(provenance, sort_keys=True).encode()}),
                          common)
    return collection


def export_fits(table: pd.DataFrame, path: Path, provenance: dict | None = None,
                kind: str = CATALOG_NAME) -> None:
    """Write `table` as a FITS binary table, atomically: every column's unit, UCD and description from the
    declared schema (TUNITn, TUCDn, TCOMMn) and the provenance in the primary header."""
    from astropy.io import fits

    t = Table.from_pandas(table)
    hdu = fits.table_to_hdu(t)
    for key, value in schema.fits_cards(list(t.colnames), kind):
        hdu.header[key] = value
    hdu.header["EXTNAME"] = kind.upper()
    primary = fits.PrimaryHDU()
    h = primary.header
    title, _ = schema.TITLES[kind]
    h["TITLE"] = title
    h["COMMENT"] = "fluxes in nJy (AB mag 31.4 = 1 nJy), magnitudes AB, a/b in arcsec, pa deg east of north"
    h["COMMENT"] = "ra, dec: ICRS degrees; source_id stable across re-runs; schema: docs/schema.md"
    prov = provenance or {}
    h["DFVERSN"] = (prov.get("deepfield_version", ""), "deepfield version")
    h["DATE"] = (prov.get("created", ""), "UTC time the catalog was made")
    if prov.get("config_hash"):
        h["CFGHASH"] = (prov["config_hash"], "processing configuration hash")
    for key, label in (("stage_versions", "STAGE"), ("merge_versions", "MERGE"), ("model_versions", "MODEL"),
                       ("inputs", "INPUT")):
        for name, value in sorted((prov.get(key) or {}).items()):
            h[f"HIERARCH DF {label} {name}"] = str(value)
    with atomic_path(path) as tmp:
        fits.HDUList([primary, hdu]).writeto(tmp, overwrite=True)


def relative(path: Path, run_dir: Path) -> str:
    """`path` relative to the run directory where it lies under it (the catalogs move with their run)."""
    try:
        return os.path.relpath(Path(path).absolute(), Path(run_dir).absolute())
    except ValueError:  # another drive
        return str(path)


def annotate_file(path: Path, provenance: dict) -> None:
    """A merge step's Parquet output rewritten with the declared schema of its table (named by the file's
    stem: lens_candidates, clusters, anomalies) and the provenance; other files as they are."""
    if path.suffix != ".parquet" or not path.is_file():
        return
    table = pq.read_table(path)
    kind = path.stem if path.stem in schema.TABLES else CATALOG_NAME
    target = schema.annotate(table.schema, kind, provenance)
    with atomic_path(path) as tmp:
        pq.write_table(table.cast(target), tmp)
