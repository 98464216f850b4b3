"""An input mask's bits in deepfield's planes (tasks/maskbits.py), for the ingest (tasks/fits_input.py): the
planes a mask declares by header keywords (deepfield's MP<NAME>, the MP_<NAME> of Rubin's and HSC's afw masks)
translated by name, informational ones masking nothing, everything else BAD, with the note that says what was
made of them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from . import maskbits

__all__ = ["mask_bits", "SHARE_WARN"]


def _declared_planes(header: fits.Header) -> dict[str, int]:
    """Plane name (upper case) -> bit index, from deepfield's MP<NAME> keywords and the MP_<NAME> keywords of
    Rubin's and HSC's afw masks; a keyword whose value is not a bit number (a logical T) declares nothing."""
    planes = {}
    for key in header.keys():  # the keywords first: items() parses every card's value
        if key.startswith("MP_"):
            name = key[3:].upper()
        elif key.startswith("MP") and key[2:] in maskbits.PLANES:
            name = key[2:]
        else:
            continue
        val = header[key]
        if isinstance(val, int) and not isinstance(val, bool) and 0 <= val < 63:
            planes[name] = val
    return planes


def mask_bits(raw: np.ndarray, header: fits.Header, path, band: str, notes: list[str],
               out: np.ndarray | None = None, ignore: tuple = ()) -> np.ndarray:
    """Our bits from an input integer mask, written into `out` (uint16, the mask's shape) when given.

    Planes declared by MP<NAME> (ours) or MP_<NAME> (afw) keywords are translated by maskbits.FOREIGN: ours and
    the bad planes of other pipelines to our planes, informational ones (DETECTED, INTRP, ...) to nothing; a
    declared plane in neither table, any undeclared nonzero bit, and any nonzero pixel of a mask without MP
    keywords become BAD. `ignore`: plane names or bit indices (the configuration's `mask_ignore`) that mask
    nothing."""
    planes = _declared_planes(header)
    ignore_names = {str(x).upper().removeprefix("MP_") for x in ignore if isinstance(x, str)}
    ignore_bits = {int(x) for x in ignore if not isinstance(x, str)}
    meaning: dict[int, int] = {}  # input bit -> our planes (0: masks nothing)
    info, unknown = [], []
    for name, bit in planes.items():
        if name in ignore_names or bit in ignore_bits:
            value = 0
        elif name not in maskbits.FOREIGN:
            value = maskbits.BAD
            unknown.append((name, bit))
        else:
            target = maskbits.FOREIGN[name]
            value = 0 if target is None else maskbits.PLANES[target]
        if value == 0 and name not in ignore_names and bit not in ignore_bits:
            info.append((name, bit))
        meaning[bit] = meaning.get(bit, 0) | value
    for bit in ignore_bits:
        meaning[bit] = 0
    m = raw
    if out is None:
        out = np.zeros(m.shape, np.uint16)
    else:
        out[:] = 0
    wide = m.astype(np.int64, copy=False) if m.dtype.itemsize > 2 or m.dtype.kind == "i" else m
    ignored = f"; bits {sorted(ignore_bits)} masking nothing (mask_ignore)" if ignore_bits and not planes else ""
    if not planes:
        nz = (wide & ~_bits(ignore_bits)) != 0 if ignore_bits else m != 0
        out[nz] = maskbits.BAD
        count = int(nz.sum())
        notes.append(f"band {band}: mask {Path(path).name} has no MP<NAME> keywords (foreign bit meanings): "
                     f"{count} nonzero pixels set BAD{_share(count, m.size)}{ignored}")
        return out
    declared = _bits(meaning)
    other = (wide & ~declared) != 0 if m.dtype.itemsize > 2 or m.dtype.kind == "i" \
        else (m & np.array(~declared & 0xFFFF, m.dtype)) != 0
    own = _bits(b for b, v in meaning.items() if v == 1 << b)  # bits that are our own plane at our own bit
    np.bitwise_and(m, own, out=out, casting="unsafe")
    for bit, value in meaning.items():
        if value and value != 1 << bit:
            out[(wide >> bit) & 1 == 1] |= value
    undeclared = bool(other.any())
    if undeclared:  # a boolean index costs a pass even when it selects nothing
        out[other] |= maskbits.BAD
    mine = not info and not unknown and all(n in maskbits.PLANES for n in planes) and own == declared
    parts = [f"band {band}: mask bits of {Path(path).name} " + ("kept (our MP keywords)" if mine else
             "translated by their MP keywords")]
    if info:
        n = m.size
        parts.append("informational planes masking nothing: " + ", ".join(
            f"{name} ({100 * np.count_nonzero((wide >> bit) & 1) / n:.1f} % of pixels)" for name, bit in info))
    if unknown:
        parts.append("planes unknown to deepfield set BAD: " + ", ".join(
            f"{name} (bit {bit}, {np.count_nonzero((wide >> bit) & 1)} pixels)" for name, bit in unknown)
            + " (list those that mark measured pixels in the configuration's mask_ignore)")
    if undeclared:
        count = int(other.sum())
        parts.append(f"{count} pixels with undeclared bits set BAD{_share(count, m.size)}")
    notes.append("; ".join(parts))
    return out


SHARE_WARN = 0.05  # a foreign mask's bits setting BAD on more of the pixels than this get a warning in the note


def _share(count: int, size: int) -> str:
    """The note's warning when a mask's foreign bits set BAD on more than SHARE_WARN of the pixels: a detection
    footprint or a bright-star mask read as bad pixels would mask the very sources."""
    if count <= SHARE_WARN * size:
        return ""
    return (f" ({100 * count / size:.1f} % of the pixels: if those bits mark measured pixels, a detection "
            f"footprint or a bright-star mask, list them in mask_ignore)")


def _bits(bits) -> int:
    """The integer with the given bit indices set."""
    v = 0
    for b in bits:
        v |= 1 << int(b)
    return v
