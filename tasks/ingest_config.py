"""What `deepfield ingest` reads: a list of fields, each with per-band FITS files, and how the Zarr
store is laid out. Accepts either an ingest configuration (YAML, documented in the README) or the
manifest.yaml written by `deepfield simulate`.

Paths in either file are relative to the file's own directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from .yaml_io import read_mapping
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

HDU = Union[int, str]


class BandFiles(BaseModel):
    """The files of one band of one field."""

    model_config = ConfigDict(extra="forbid")

    image: Path = Field(description="FITS file of the image (sky-subtracted, any linear unit)")
    hdu: Optional[HDU] = Field(None, description="HDU of the image: index or EXTNAME (default: first with data)")
    invvar: Optional[Path] = Field(None, description="inverse-variance (weight) FITS file")
    invvar_hdu: Optional[HDU] = None
    variance: Optional[Path] = Field(None, description="variance FITS file, used when no invvar is given")
    variance_hdu: Optional[HDU] = None
    mask: Optional[Path] = Field(None, description="integer mask FITS file: planes declared by MP<NAME> "
                                 "(deepfield) or MP_<NAME> (Rubin/HSC afw) header keywords are translated to "
                                 "deepfield's planes, informational ones (DETECTED, INTRP, ...) mask nothing; other "
                                 "nonzero bits become BAD unless listed in mask_ignore")
    mask_hdu: Optional[HDU] = None
    zeropoint: Optional[float] = Field(None, description="AB zero point; default: MAGZERO/ZEROPNT/MAGZPT in the header")
    psf_fwhm: Optional[float] = Field(None, description="PSF FWHM, arcsec; default: PSF_FWHM/SEEING/FWHM header keyword")
    saturation: Optional[float] = Field(None, description="saturation level in image units: pixels at or above it "
                                        "are masked SAT; default: the header's SATURATE/SATLEVEL where no mask is given")

    @model_validator(mode="after")
    def _one_noise_map(self) -> "BandFiles":
        if self.invvar is not None and self.variance is not None:
            raise ValueError("give either invvar or variance, not both")
        return self


class FieldSpec(BaseModel):
    """One field: either per-band files, or one multi-extension FITS file (`mef`) whose HDUs are
    named `<band>` or `<band>_IMAGE`, `<band>_INVVAR` (or `<band>_WEIGHT`, or `<band>_VARIANCE`)
    and `<band>_MASK` (matched case-insensitively; the band keeps the EXTNAME's spelling)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="field name, unique in the store (letters, digits, -, _, .)")
    bands: dict[str, BandFiles] = Field(default_factory=dict)
    mef: Optional[Path] = None
    reference_band: Optional[str] = Field(
        None, description="band whose pixel grid the others are resampled onto (default: i if present, else the first)")
    band_names: dict[str, str] = Field(default_factory=dict, description="the inputs' band name -> the physical "
                                       "band it is (e.g. Z: z, HSC-I: i, VIS: VIS); the store and the catalogs use the "
                                       "physical names, and the learned stages match their bands by them (default: the "
                                       "ingest configuration's band_names)")

    mask_ignore: list[Union[str, int]] = Field(
        default_factory=list, description="mask planes that mark measured pixels and mask nothing: plane names as "
        "the masks' MP<NAME>/MP_<NAME> keywords declare them, or bit indices (for masks without keywords); added "
        "to the ingest configuration's mask_ignore and to the afw planes known to be informational")

    check_filter: Optional[bool] = Field(
        None, description="refuse a file given as band u, g, r, i, z or y whose header's filter keyword (BAND, "
        "FILTER, ...) names another of them (a file listed under the wrong band); false: no check, for headers "
        "known to be wrong (default: the ingest configuration's check_filter, true)")

    @field_validator("mask_ignore")
    @classmethod
    def _planes_ok(cls, v: list) -> list:
        for x in v:
            if not isinstance(x, str) and not 0 <= x < 63:
                raise ValueError(f"mask_ignore: bit index {x} is not in 0..62")
        return v

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        import re
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"field name {v!r} must be letters, digits, '.', '_' or '-'")
        return v

    @model_validator(mode="after")
    def _bands_or_mef(self) -> "FieldSpec":
        if bool(self.bands) == (self.mef is not None):
            raise ValueError(f"field {self.name!r}: give either `bands` or `mef`")
        return self


class CodecSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    """Blosc compression of every array. The default was picked by measurement
    (tests/benchmarks/bench_ingest.py): on simulated images lz4 with bit shuffle stores images at
    ~0.875 of raw against ~0.867 for zstd level 5, at about five times the encoding speed."""

    cname: Literal["zstd", "lz4", "lz4hc", "zlib", "blosclz"] = "lz4"
    clevel: int = Field(5, ge=0, le=9)
    shuffle: Literal["noshuffle", "shuffle", "bitshuffle"] = "bitshuffle"


CHECK_KEYS = ("checksum", "checksum_always")  # how inputs are compared: not part of the store's layout
NOT_LAYOUT = CHECK_KEYS + ("sync", "consolidated", "fields_at_once")  # ... nor how the shards are written, the
# outside readers' consolidated metadata or how many fields are written at once


class StoreSpec(BaseModel):
    """Layout of the Zarr store: tile cores (one shard each, so one writer each) and chunks; and how a
    re-ingest tells changed inputs (CHECK_KEYS), whether shards are flushed to disk (`sync`), whether the root
    keeps consolidated metadata (`consolidated`) and how many fields are ingested at a time (`fields_at_once`):
    these are not layout, `layout()` leaves them out (NOT_LAYOUT)."""

    model_config = ConfigDict(extra="forbid")

    tile: int = Field(512, ge=64, le=8192, description="tile core size, pixels; one shard per tile core")
    chunk: int = Field(256, ge=16, le=2048, description="chunk size, pixels; a halo read touches whole chunks")
    write_threads: int = Field(2, ge=1, le=64, description="threads writing one field's tile cores (one shard each)")
    fields_at_once: Optional[int] = Field(
        None, ge=1, le=256, description="fields the ingest flow reads and writes at a time (default: the cores this "
        "process may use, at most 8); each holds its pixels in memory, about 10 bytes per pixel and band (0.17 GB "
        "for a 2048^2 field in four bands, 1.7 GB for 4096^2 in six)")
    codec: CodecSpec = Field(default_factory=CodecSpec)
    checksum: Literal["xxh3", "sha256"] = Field(
        "xxh3", description="content hash of each input file kept in the field's completion record: xxh3 (xxh3_128, "
        "non-cryptographic, ~7x faster) or sha256. A re-ingest trusts the recorded hash of a file whose size and "
        "mtime are those recorded (no read, as rsync's quick check: a change that keeps both is not seen) and "
        "hashes the others again; a field's record keeps the hash it was ingested with")
    checksum_always: Optional[bool] = Field(
        None, description="read and hash every input on every ingest, whatever its size and mtime (default: true "
        "with checksum sha256, false with xxh3)")
    sync: bool = Field(
        False, description="flush every shard to the disk (fsync) before the field's completion record is written, "
        "so that a power loss (not only a kill) cannot leave a record over shards the disk never received. Off by "
        "default, as for every other file deepfield writes: a killed process's writes are in the page cache and "
        "reach the disk; after a power loss a shard that did not is seen by its size, which every reader checks "
        "against the record (tasks.zarr_store.verify_shards), and a damaged chunk by its crc32c. Costs the disk's "
        "write time: the write of a 2048^2 field in g, r, i, z takes 0.22-0.24 s with it, 0.12-0.13 s without, here")

    consolidated: bool = Field(
        True, description="keep the store's consolidated metadata (a copy of every field's metadata in the root "
        "zarr.json, which xarray.open_zarr reads by default) up to date: the ingest flow rewrites the entries of the "
        "fields it wrote, at most a tenth of its time. false: the root keeps none (the ingest removes it), for stores "
        "of so many fields that one file of all their metadata is too big to read (16 kB per field: 1.6 GB at 10^5); "
        "outside readers then open a field with xarray.open_zarr(STORE, group='fields/<field>', consolidated=False)")

    def layout(self) -> dict:
        """The store layout, as the completion record keeps it (without NOT_LAYOUT)."""
        return self.model_dump(exclude=set(NOT_LAYOUT))

    @property
    def read_always(self) -> bool:
        return self.checksum == "sha256" if self.checksum_always is None else self.checksum_always

    @model_validator(mode="after")
    def _chunk_divides_tile(self) -> "StoreSpec":
        if self.tile % self.chunk:
            raise ValueError(f"chunk {self.chunk} must divide tile {self.tile} (shards hold whole chunks)")
        return self


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fields: list[FieldSpec]
    band_names: dict[str, str] = Field(default_factory=dict, description="the inputs' band name -> the physical band "
                                       "it is, for every field (a field's own band_names add to it)")
    mask_ignore: list[Union[str, int]] = Field(default_factory=list, description="mask planes (names or bit "
                                               "indices) that mask nothing, for every field (a field's own add to it)")
    check_filter: bool = Field(True, description="check each file's filter keyword against the band it is given "
                               "as, for every field without its own check_filter")
    store: StoreSpec = Field(default_factory=StoreSpec)
    source: Optional[Path] = Field(None, description="the file this configuration was read from")

    @model_validator(mode="after")
    def _unique_names(self) -> "IngestConfig":
        names = [f.name for f in self.fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate field names {dup}")
        if not names:
            raise ValueError("no fields to ingest")
        return self


class ConfigError(ValueError):
    pass


def _resolve(spec: FieldSpec, base: Path) -> FieldSpec:
    """Make the spec's paths absolute, relative to `base`."""
    def fix(p):
        return p if p is None or p.is_absolute() else (base / p)
    if spec.mef is not None:
        return spec.model_copy(update={"mef": fix(spec.mef)})
    bands = {b: f.model_copy(update={k: fix(getattr(f, k)) for k in ("image", "invvar", "variance", "mask")})
             for b, f in spec.bands.items()}
    return spec.model_copy(update={"bands": bands})


def load_ingest_config(path: str | Path, store: StoreSpec | None = None) -> IngestConfig:
    """Read an ingest configuration or a `deepfield simulate` manifest; paths made absolute."""
    path = Path(path)
    data = read_mapping(path, ConfigError, "ingest configuration")
    if data.get("kind") == "deepfield-simulation":  # a simulate manifest: keep the keys ingest needs
        keep = {"image", "invvar", "mask", "zeropoint", "psf_fwhm"}
        data = {"fields": [{"name": f["name"],
                            "bands": {b: {k: v for k, v in e.items() if k in keep} for b, e in f["bands"].items()}}
                           for f in data.get("fields", [])]}
    try:
        cfg = IngestConfig.model_validate(dict(data, source=str(path)))
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid ingest configuration:\n{exc}") from None
    base = path.resolve().parent  # absolute: the same inputs are the same whatever the working directory
    fields = [f.model_copy(update={"band_names": {**cfg.band_names, **f.band_names}}) if cfg.band_names else f
              for f in cfg.fields]
    if cfg.mask_ignore:
        fields = [f.model_copy(update={"mask_ignore": [*cfg.mask_ignore, *(x for x in f.mask_ignore
                                                                           if x not in cfg.mask_ignore)]})
                  for f in fields]
    fields = [f if f.check_filter is not None else f.model_copy(update={"check_filter": cfg.check_filter})
              for f in fields]
    update = {"fields": [_resolve(f, base) for f in fields]}
    if store is not None:
        update["store"] = store
    return cfg.model_copy(update=update)
