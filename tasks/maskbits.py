"""Mask bit planes of deepfield images (uint16), shared by the simulator, ingest and measurement.

The FITS mask files carry one header keyword per plane, ``MP<NAME> = bit index``, as Rubin's
afw mask planes do, so that a reader can check the meaning of each bit; the Zarr store's `mask` arrays carry
the same meanings as attributes (`zarr_attributes`: CF `flag_masks`/`flag_meanings` and a readable table).

Input masks of other pipelines are translated by the planes they declare (`FOREIGN`): Rubin's and HSC's afw
masks write ``MP_<NAME> = bit index`` and set informational planes as well as bad ones, above all DETECTED on
every pixel of every detected source's footprint. Read as bad pixels, those planes masked the sources
themselves (a Rubin-style mask on the simulator's fields: 6 % of the galaxies at i < 24 found, exit 0).
"""
from __future__ import annotations

BAD = 1 << 0  # bad pixel or column of the detector
SAT = 1 << 1  # saturated
BLEED = 1 << 2  # charge bleed trail of a saturated star
NO_DATA = 1 << 3  # NaN or infinite pixel value
ZERO_WEIGHT = 1 << 4  # inverse variance <= 0 or not finite

UNUSABLE = NO_DATA | BAD | SAT | BLEED  # planes whose pixels no stage measures

# plane names are short enough for 8-character FITS keywords MP<NAME>
PLANES: dict[str, int] = {"BAD": BAD, "SAT": SAT, "BLEED": BLEED, "NODATA": NO_DATA, "ZEROWT": ZERO_WEIGHT}
MEANINGS: dict[str, str] = {
    "BAD": "bad pixel or column of the detector",
    "SAT": "saturated",
    "BLEED": "charge bleed trail of a saturated star",
    "NODATA": "no measurement: NaN, infinite or huge (>= 1e30) input value, or no input coverage after resampling",
    "ZEROWT": "zero weight: inverse variance <= 0 or not finite",
}


# Planes that other pipelines declare (lsst.afw.image.Mask, as written by Rubin's and HSC's pipelines with
# MP_<NAME> keywords; names compared in upper case): the plane of ours their pixels get, or None for a plane
# that says something about a measured pixel (a detection footprint, an interpolated or clipped value, a
# streak) and masks nothing. A declared plane in neither table is BAD, with a note naming it (`mask_ignore`
# in the ingest configuration lists the informational ones this table lacks).
FOREIGN: dict[str, str | None] = {
    "BAD": "BAD", "SAT": "SAT", "BLEED": "BLEED", "NODATA": "NODATA", "NO_DATA": "NODATA",
    "UNMASKEDNAN": "NODATA", "ZEROWT": "ZEROWT", "CR": "BAD", "EDGE": "BAD", "VIGNETTED": "BAD",
    "DETECTED": None, "DETECTED_NEGATIVE": None, "INTRP": None, "SUSPECT": None, "CLIPPED": None,
    "CROSSTALK": None, "INEXACT_PSF": None, "REJECTED": None, "SENSOR_EDGE": None, "STREAK": None,
    "NOT_DEBLENDED": None, "BRIGHT_OBJECT": None, "SAT_TEMPLATE": None, "INJECTED": None,
    "INJECTED_TEMPLATE": None, "FAKE": None, "ITL_DIP": None,
}


def header_cards() -> list[tuple[str, int, str]]:
    """(keyword, bit index, comment) cards describing the planes, for FITS headers."""
    return [(f"MP{name}", value.bit_length() - 1, f"mask plane {name}") for name, value in PLANES.items()]


def zarr_attributes() -> dict:
    """Attributes describing the planes for a mask array: CF `flag_masks`, `flag_meanings` (what xarray and
    cf-xarray read) and `flag_descriptions`, plane name -> {bit (index), value, meaning}."""
    return {"long_name": "mask bit planes", "flag_masks": list(PLANES.values()),
            "flag_meanings": " ".join(PLANES),
            "flag_descriptions": {name: {"bit": value.bit_length() - 1, "value": value, "meaning": MEANINGS[name]}
                                  for name, value in PLANES.items()}}


def describe(value: int) -> list[str]:
    """Names of the planes set in a mask value."""
    return [name for name, bit in PLANES.items() if value & bit]
