"""Mask bit planes of deepfield images (uint16), shared by the simulator, ingest and measurement.

The FITS mask files carry one header keyword per plane, ``MP<NAME> = bit index``, as Rubin's
afw mask planes do, so that a reader can check the meaning of each bit.
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


def header_cards() -> list[tuple[str, int, str]]:
    """(keyword, bit index, comment) cards describing the planes, for FITS headers."""
    return [(f"MP{name}", value.bit_length() - 1, f"mask plane {name}") for name, value in PLANES.items()]


def describe(value: int) -> list[str]:
    """Names of the planes set in a mask value."""
    return [name for name, bit in PLANES.items() if value & bit]
