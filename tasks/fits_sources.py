"""What a field's configuration names: for each band its image, noise, mask files and HDUs (per-band files, or one
multi-extension file whose HDUs are named for their band and kind, or a one-band exposure's IMAGE, MASK, VARIANCE
HDUs), the bands' physical names (band_names) and the reference band. tasks/fits_input.py reads the pixels."""
from __future__ import annotations

from astropy.io import fits

from .fits_files import IMAGE_HDUS, FitsFiles, InputError
from .ingest_config import FieldSpec

__all__ = ["MEF_KINDS", "KNOWN_BANDS", "band_sources", "physical_names", "reference_band"]

MEF_KINDS = {"IMAGE": "image", "INVVAR": "invvar", "WEIGHT": "invvar", "VARIANCE": "variance", "MASK": "mask"}


def band_sources(spec: FieldSpec, files: FitsFiles, notes: list[str]) -> list[tuple]:
    """(band, image, invvar, variance, mask, zeropoint, psf_fwhm, saturation) for each band, in order."""
    if spec.mef is None:
        out, seen = [], {}
        for band, f in spec.bands.items():
            if band.lower() in seen:
                raise InputError(f.image, f"duplicate band {band!r} (same as {seen[band.lower()]!r} but for case)")
            seen[band.lower()] = band
            src = lambda p, h: None if p is None else (p, h)  # noqa: E731
            out.append((band, (f.image, f.hdu), src(f.invvar, f.invvar_hdu), src(f.variance, f.variance_hdu),
                        src(f.mask, f.mask_hdu), f.zeropoint, f.psf_fwhm, f.saturation))
        return out
    path = spec.mef
    hdul = files.hdul(path)
    found: dict[str, dict] = {}
    for i, h in enumerate(hdul):
        name = str(h.header.get("EXTNAME", "")).strip()
        if not name or (i == 0 and name.upper() == "PRIMARY"):
            continue
        band, kind, upper = name, "image", name.upper()
        if upper in MEF_KINDS:  # a one-band exposure (Rubin's, HSC's: IMAGE, MASK, VARIANCE HDUs)
            band, kind = _exposure_band(path, i, name, h.header, hdul[0].header), MEF_KINDS[upper]
        else:
            for suffix, k in MEF_KINDS.items():
                if upper.endswith("_" + suffix) and len(name) > len(suffix) + 1:
                    band, kind = name[: -len(suffix) - 1], k
                    break
        if band == name and kind == "image":
            if not isinstance(h, IMAGE_HDUS) or not h.header.get("NAXIS"):
                notes.append(f"{path.name}: HDU {i} ({name}) is not a band image, ignored")
                continue
        entry = found.setdefault(band.lower(), {})
        if kind in entry:
            raise InputError(path, f"duplicate band {band!r}: HDUs {entry[kind][0]} ({entry[kind][1]}) "
                                   f"and {i} ({name}) both hold its {kind}")
        entry[kind] = (i, name, band)
    bands = []
    for key, entry in found.items():
        if "image" not in entry:
            i, name, band = next(iter(entry.values()))
            raise InputError(path, f"HDU {i} ({name}) has no image HDU {band} or {band}_IMAGE")
        if "invvar" in entry and "variance" in entry:
            raise InputError(path, f"band {entry['image'][2]!r} has both invvar and variance HDUs")
        bands.append(entry)
    if not bands:
        raise InputError(path, "no band image HDUs (named <band> or <band>_IMAGE)")
    bands.sort(key=lambda e: e["image"][0])
    src = lambda e, k: (path, e[k][0]) if k in e else None  # noqa: E731
    return [(e["image"][2], src(e, "image"), src(e, "invvar"), src(e, "variance"), src(e, "mask"), None, None, None)
            for e in bands]


def _exposure_band(path, i: int, name: str, header: fits.Header, primary: fits.Header) -> str:
    """The band of an HDU named for what it holds alone (IMAGE, MASK, VARIANCE, ...: a one-band exposure file, as
    Rubin's and HSC's pipelines write them): the HDU's or the primary header's BAND, else FILTER keyword. Read as
    band names, those HDUs had made bands "IMAGE", "MASK" and "VARIANCE" of one band's image, mask and noise."""
    for h in (header, primary):
        for key in ("BAND", "FILTER"):
            val = h.get(key)
            if isinstance(val, str) and val.strip():
                return val.strip()
    raise InputError(path, f"HDU {i} ({name}) names no band, and neither it nor the primary header has a BAND or "
                           f"FILTER keyword: name the HDUs <band>_{name.upper()}, or give the file under `bands:` "
                           f"with its HDUs (hdu, mask_hdu, variance_hdu)")


KNOWN_BANDS = ("u", "g", "r", "i", "z", "y", "Y", "J", "H", "K", "VIS", "NUV", "FUV")


def physical_names(spec: FieldSpec, srcs: list[tuple], notes: list[str]) -> list[tuple]:
    """`srcs` with each band named by its physical band (spec.band_names: input name -> physical name; matched
    case-sensitively, then case-insensitively); InputError when two inputs map to one band. A name that is not
    a known physical band gets a note: the learned stages, which match bands by name, will not use it."""
    table = dict(spec.band_names)
    lower = {k.lower(): v for k, v in table.items()}
    out, seen = [], {}
    first = srcs[0][1][0] if srcs else spec.mef
    for s in srcs:
        name = table.get(s[0], lower.get(s[0].lower(), s[0]))
        if name in seen:
            raise InputError(first, f"bands {seen[name]!r} and {s[0]!r} are both {name!r} (band_names)")
        seen[name] = s[0]
        if name != s[0]:
            notes.append(f"band {s[0]} is {name} (band_names)")
        elif name not in KNOWN_BANDS:
            notes.append(f"band {name!r} is not a physical band name ({' '.join(KNOWN_BANDS)}): stages that need "
                         f"given bands will not use it; map it with band_names in the ingest configuration")
        out.append((name, *s[1:]))
    unknown = [k for k in table if k not in seen.values() and k.lower() not in {v.lower() for v in seen.values()}]
    if unknown:
        notes.append(f"band_names {', '.join(unknown)}: no such band in field {spec.name}")
    return out


def reference_band(spec: FieldSpec, names: list[str], first_path) -> str:
    want = spec.band_names.get(spec.reference_band, spec.reference_band) if spec.reference_band else None
    want = want or ("i" if "i" in [n.lower() for n in names] else names[0])
    match = [n for n in names if n == want] or [n for n in names if n.lower() == want.lower()]
    if len(match) != 1:
        raise InputError(first_path, f"reference band {want!r} is not among the bands {names}")
    return match[0]
