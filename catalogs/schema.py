"""The declared schema of deepfield's catalogs: every column's name, type, unit, UCD and description, in one
place, from which everything that describes a column is written:

- Parquet: each field's metadata (`unit`, `ucd`, `description`) in the flat catalog, the HATS partitions and
  the candidate tables, and the run's provenance in the schema metadata (`deepfield:provenance`, JSON);
- FITS: `TUNITn`, `TUCDn` and `TCOMMn` of every column, the provenance in the primary header;
- `hats.properties`: the catalog's title, description and provenance;
- the documentation page `docs/schema.md` (`deepfield schema --markdown`; a test checks it is current).

Names may hold `{band}` (any band the survey has: nothing here assumes g r i z) and `{aper}` (the measure
stage's apertures: `aper`, `aper_1as`, `aper_2fwhm`, ...). UCDs follow the IVOA UCD1+ vocabulary. A column
that no declaration matches (a plugin stage's) keeps its type and is written with the description
"undeclared" (`describe` returns None for it; `annotate`'s `extra` can describe it; tests hold the built-in
stages to a full declaration). Only the columns named flux_<kind>_<band> and fluxerr_<kind>_<band> are
calibrated to nJy (catalogs/calibrate.py): a plugin's other flux-like columns stay in image units.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pyarrow as pa

__all__ = ["Column", "TABLES", "TITLES", "describe", "annotate", "fits_cards", "markdown", "PROVENANCE_KEY"]

PROVENANCE_KEY = b"deepfield:provenance"


@dataclass(frozen=True)
class Column:
    name: str  # may hold {band} and {aper}
    type: str  # int64, int32, float64, float32, bool, string
    unit: str  # astropy unit string; "" dimensionless
    ucd: str
    description: str

    def pattern(self) -> re.Pattern:
        rx = re.escape(self.name).replace(r"\{band\}", r"(?P<band>[^_]+)").replace(r"\{aper\}", r"(?P<aper>aper(?:_[0-9a-z]+)?)").replace(r"\{gaap\}", r"(?P<gaap>gaap(?:_[0-9a-z]+)?)")
        return re.compile(f"^{rx}$")


_KIND = {"aper": "circular aperture of the measure stage's reference radius (radii_fwhm[0] x the tile's largest "
                 "PSF FWHM)", "auto": "Kron (AUTO) elliptical aperture", "deblend": "deblended (the member alone)"}

_SOURCES = [
    Column("source_id", "int64", "", "meta.id;meta.main", "unique id, stable across re-runs: BLAKE2b of (field, tile, tile_index), 63 bits"),
    Column("field", "string", "", "meta.id;obs.field", "field (input image set) the row was measured in"),
    Column("tile", "string", "", "meta.id;obs.field", "tile of the field, '<field>/<ty>_<tx>'"),
    Column("tile_index", "int64", "", "meta.id", "row of the detection in its tile's table"),
    Column("ra", "float64", "deg", "pos.eq.ra;meta.main", "right ascension, ICRS"),
    Column("dec", "float64", "deg", "pos.eq.dec;meta.main", "declination, ICRS"),
    Column("x", "float64", "pix", "pos.cartesian.x;instr.det", "centroid in the field's pixel frame (0-based, pixel centres at integers)"),
    Column("y", "float64", "pix", "pos.cartesian.y;instr.det", "centroid in the field's pixel frame (0-based, pixel centres at integers)"),
    Column("x_tile", "float64", "pix", "pos.cartesian.x;instr.det", "centroid in the tile's arrays (with halo)"),
    Column("y_tile", "float64", "pix", "pos.cartesian.y;instr.det", "centroid in the tile's arrays (with halo)"),
    Column("a", "float64", "arcsec", "phys.angSize.smajAxis", "isophotal semi-major axis (second moments of the detection image) on the sky"),
    Column("b", "float64", "arcsec", "phys.angSize.sminAxis", "isophotal semi-minor axis on the sky"),
    Column("pa", "float64", "deg", "pos.posAng", "position angle of the major axis, east of north, [0, 180)"),
    Column("npix", "int64", "", "meta.number;instr.pixel", "pixels in the isophotal footprint"),
    Column("xmin_tile", "int64", "pix", "pos.cartesian.x;instr.det;stat.min", "footprint bounding box in the tile's arrays"),
    Column("xmax_tile", "int64", "pix", "pos.cartesian.x;instr.det;stat.max", "footprint bounding box in the tile's arrays"),
    Column("ymin_tile", "int64", "pix", "pos.cartesian.y;instr.det;stat.min", "footprint bounding box in the tile's arrays"),
    Column("ymax_tile", "int64", "pix", "pos.cartesian.y;instr.det;stat.max", "footprint bounding box in the tile's arrays"),
    Column("flux_det", "float64", "", "phot.flux;instr.det", "isophotal flux on the detection image (detection-image units, not calibrated)"),
    Column("peak_det", "float64", "", "phot.flux;stat.max", "peak of the detection image (detection-image units)"),
    Column("det_flag", "int64", "", "meta.code.qual", "SEP object flags: 1 OBJ_MERGED, 2 OBJ_TRUNC, 4 OBJ_DOVERFLOW, 8 OBJ_SINGU"),
    Column("seg_id", "int64", "", "meta.id", "value of the detection in its tile's segmentation map"),
    Column("blend_id", "int64", "", "meta.id.parent", "blend group (parent footprint) within the tile"),
    Column("n_blend", "int64", "", "meta.number", "detections in the blend group"),
    Column("is_blended", "bool", "", "meta.code", "n_blend > 1"),
    Column("is_primary", "bool", "", "meta.code", "the centroid lies in the tile core (always true in the catalog)"),
    Column("kron_radius", "float64", "", "phys.size.radius;arith.factor", "Kron radius in units of a and b (SEP), as the AUTO ellipse (kron_k times it) takes it: at most its footprint bound, at least kron_min / kron_k"),
    Column("flux_{aper}_{band}", "float64", "nJy", "phot.flux.density", "flux in the {kind}, band {band}"),
    Column("fluxerr_{aper}_{band}", "float64", "nJy", "stat.error;phot.flux.density", "1-sigma error of flux_{aper}_{band} (from the inverse variance)"),
    Column("mag_{aper}_{band}", "float64", "mag", "phot.mag", "AB magnitude in the {kind}, band {band}; NaN where the flux <= 0"),
    Column("magerr_{aper}_{band}", "float64", "mag", "stat.error;phot.mag", "1-sigma error of mag_{aper}_{band}"),
    Column("flux_{gaap}_{band}", "float64", "nJy", "phot.flux.density", "Gaussian-aperture (GAaP-like) flux, band {band}: the pixels weighted by the Gaussian that makes, with the band's PSF, the same pre-seeing Gaussian weight in every band (measure.gaap_sigma_psf x the widest PSF sigma), so that colours do not depend on the seeing; normalised to a point source's total flux under a Moffat PSF of the band's FWHM and index (the field's, from its stars, else measure.gaap_psf_beta, 3.5), integrated over the pixels, which takes each band's seeing out of the colours to first order; a galaxy's is less than its total: for colours; NaN where masked pixels (a saturated core) hold over 70 % of the Gaussian's weight"),
    Column("fluxerr_{gaap}_{band}", "float64", "nJy", "stat.error;phot.flux.density", "1-sigma error of the Gaussian-aperture flux in band {band} (from the inverse variance)"),
    Column("flux_auto_{band}", "float64", "nJy", "phot.flux.density", "flux in the {kind}, band {band}"),
    Column("fluxerr_auto_{band}", "float64", "nJy", "stat.error;phot.flux.density", "1-sigma error of flux_auto_{band}"),
    Column("mag_auto_{band}", "float64", "mag", "phot.mag", "AB magnitude in the {kind}, band {band}; NaN where the flux <= 0"),
    Column("magerr_auto_{band}", "float64", "mag", "stat.error;phot.mag", "1-sigma error of mag_auto_{band}"),
    Column("zeropoint_{band}", "float64", "mag", "phot.mag;arith.zp", "AB magnitude of one image unit of the row's field in band {band}: image flux = flux / 10**(-0.4 (zeropoint - 31.4))"),
    Column("flag_masked", "bool", "", "meta.code.qual", "a masked pixel of any band in the largest circular or the Kron aperture"),
    Column("flag_saturated", "bool", "", "meta.code.qual", "a saturated or bleed-trail pixel in the largest circular or the Kron aperture"),
    Column("flag_edge", "bool", "", "meta.code.qual", "the footprint or an aperture reaches a field edge"),
    Column("flag_blended", "bool", "", "meta.code.qual", "a member of a blend group (= is_blended)"),
    Column("phot_flag", "int64", "", "meta.code.qual", "SEP aperture flags OR-ed over bands and apertures (16 APER_TRUNC, 32 APER_HASMASKED, 64 APER_ALLMASKED, 128 APER_NONPOSITIVE)"),
    Column("concentration", "float64", "", "src.morph;arith.ratio", "star/galaxy separation: the Gaussian-aperture flux over that of a wider Gaussian weight (measure.extended_sigma_psf, by default 4/3 of the first gaap_sigma_psf: 2.0 x the widest PSF sigma), both normalised to a point source's total and summed over the bands in nJy: 1 for a point source, less for a galaxy; NaN where undefined"),
    Column("extendedness", "float64", "", "src.class.starGalaxy", "1: extended, a galaxy (concentration below measure.extended_below, 0.93); 0: point-like, a star or an unresolved galaxy; NaN where concentration is undefined"),
    Column("flux_wing_{band}", "float64", "nJy", "phot.flux.density", "saturated sources only (a saturated pixel within a pixel of the centre in some band): the flux of the band's PSF model (a Moffat of its FWHM and index) fitted to the unmasked pixels about the saturated core, band {band}; NaN for other sources"),
    Column("fluxerr_wing_{band}", "float64", "nJy", "stat.error;phot.flux.density", "1-sigma error of flux_wing_{band} (from the inverse variance; not the PSF model's error)"),
    Column("flux_deblend_{band}", "float64", "nJy", "phot.flux.density", "flux of the member alone (deblend stage), band {band}; the Kron flux for isolated sources"),
    Column("fluxerr_deblend_{band}", "float64", "nJy", "stat.error;phot.flux.density", "1-sigma error of flux_deblend_{band}"),
    Column("mag_deblend_{band}", "float64", "mag", "phot.mag", "AB magnitude of the member alone, band {band}"),
    Column("magerr_deblend_{band}", "float64", "mag", "stat.error;phot.mag", "1-sigma error of mag_deblend_{band}"),
    Column("deblend_a", "float64", "arcsec", "phys.angSize.smajAxis", "semi-major axis of the deblended member (second moments, shape band)"),
    Column("deblend_b", "float64", "arcsec", "phys.angSize.sminAxis", "semi-minor axis of the deblended member"),
    Column("deblend_pa", "float64", "deg", "pos.posAng", "position angle of the deblended member, east of north, [0, 180)"),
    Column("blendedness", "float64", "", "stat.value;src.morph", "1 - sum(c^2)/sum(c t) of the deblended image c and the blend t (Bosch et al. 2018): 0 isolated, towards 1 buried; NaN for deblend_method auto_fallback"),
    Column("deblend_method", "string", "", "meta.code", "'symmetric' (shared by symmetric, monotonic templates), 'unet' (by the learned deblender), 'isolated' (alone: Kron flux), 'auto_fallback' (Kron flux kept)"),
    Column("z_phot", "float32", "", "src.redshift.phot", "photometric redshift (photoz stage): the median of p(z); NaN: no estimate (z_phot_flag 8)"),
    Column("z_phot_err", "float32", "", "stat.error;src.redshift.phot", "half the width of p(z)'s 16-84 % interval; at least 0.0099 (1 + z_phot) with the knn and hybrid methods (models/photoz_pdf.floored)"),
    Column("z_phot_q025", "float32", "", "stat.min;src.redshift.phot", "2.5 % quantile of p(z); p(z) is uniform between its quantiles"),
    Column("z_phot_q16", "float32", "", "stat.min;src.redshift.phot", "16 % quantile of p(z)"),
    Column("z_phot_q50", "float32", "", "stat.median;src.redshift.phot", "50 % quantile (median) of p(z)"),
    Column("z_phot_q84", "float32", "", "stat.max;src.redshift.phot", "84 % quantile of p(z)"),
    Column("z_phot_q975", "float32", "", "stat.max;src.redshift.phot", "97.5 % quantile of p(z)"),
    Column("z_phot_flag", "int16", "", "meta.code.qual", "photo-z bits: 1 reference-band S/N < 5, 2 broad (z_phot_err > 0.15 (1 + z_phot)), 4 a band missing, 8 no estimate (fewer than two bands)"),
    Column("lens_candidate", "bool", "", "meta.code.class", "lens_score above the lens stage's threshold"),
    Column("lens_score", "float32", "", "stat.probability", "lens finder's probability that the source is a strong lens (NaN: not scored)"),
    Column("merger_candidate", "bool", "", "meta.code.class", "the source passed the merger stage's cuts (bright, resolved, primary)"),
    Column("merger_score", "float32", "", "stat.probability", "merger finder's probability that the source is (a nucleus of) a merger with tidal tails (NaN: not scored)"),
    Column("anomaly_selected", "bool", "", "meta.code", "the source got a centred anomaly stamp (primary, unsaturated, extended, S/N >= min_snr)"),
    Column("anomaly_score", "float32", "", "stat.value", "local anomaly score of the centred stamp: 0.7 L_res + 0.3 L_feat of the worst region (NaN: not selected)"),
    Column("anomaly_score_paper", "float32", "", "stat.value", "Storey-Fisher et al. 2021 score: sums over all pixels and features"),
    Column("anomaly_pixel", "float32", "", "stat.value", "the paper's pixel-residual sum"),
    Column("anomaly_feature", "float32", "", "stat.value", "the paper's critic-feature residual sum"),
    Column("anomaly_sigma", "float32", "", "stat.value;arith.ratio", "(anomaly_score - mean) / std over the run's scored sources"),
    Column("is_primary_field", "bool", "", "meta.code", "the field owns the object where fields overlap (false only with keep_field_duplicates)"),
    Column("_healpix_29", "int64", "", "pos.healpix", "HEALPix nested index at order 29 of (ra, dec): the HATS spatial index"),
    Column("cluster_id", "int64", "", "meta.id.parent", "cluster_id of the cluster the galaxy is a red-sequence member of; -1 none"),
]

_LENSES = [
    Column("lens_rank", "int64", "", "meta.number", "rank by lens_score, 1 the most lens-like"),
]

_CLUSTERS = [
    Column("cluster_id", "int64", "", "meta.id;meta.main", "rank by score, 1 the strongest"),
    Column("score", "float64", "", "stat.probability", "cluster finder's peak score"),
    Column("z", "float64", "", "src.redshift.phot", "red-sequence redshift of the members (z_net where too few)"),
    Column("z_net", "float64", "", "src.redshift.phot", "the network's redshift"),
    Column("richness", "float64", "", "phys.size;src.class.richness", "the network's richness estimate (lambda)"),
    Column("z_excess", "float64", "", "stat.value", "excess of red-sequence galaxies at z over the background"),
    Column("r_lambda_arcsec", "float64", "arcsec", "phys.angSize", "R_lambda = 1/h Mpc (lambda/100)^0.2 at z"),
    Column("n_members", "int64", "", "meta.number", "sources of the catalog assigned to the cluster"),
]

_ANOMALIES = [
    Column("anomaly_rank", "int64", "", "meta.number", "rank by anomaly_sigma, 1 the most anomalous"),
    Column("anomaly_sigma", "float64", "", "stat.value;arith.ratio", "sigma-score of the candidate's peak window over the run's windows (robust)"),
    Column("score", "float64", "", "stat.value", "local anomaly score of the peak window"),
    Column("score_paper", "float64", "", "stat.value", "Storey-Fisher et al. 2021 score of the peak window"),
    Column("extent_arcsec", "float64", "arcsec", "phys.angSize", "extent of the candidate's region"),
    Column("n_windows", "int64", "", "meta.number", "grid windows in the candidate's region"),
    Column("bands", "string", "", "instr.bandpass", "bands where the candidate shows, comma-separated"),
    Column("shape", "string", "", "src.morph.type", "shape hint: ring, lens, merger, point, linear or extended"),
    Column("source_id", "int64", "", "meta.id.cross", "the catalog source it coincides with; -1 none"),
    Column("source_anomaly_sigma", "float64", "", "stat.value;arith.ratio", "that source's own anomaly_sigma"),
]

TABLES: dict[str, list[Column]] = {"sources": _SOURCES, "lens_candidates": _LENSES, "clusters": _CLUSTERS,
                                   "anomalies": _ANOMALIES}
TITLES = {
    "sources": ("deepfield source catalog", "Sources detected, measured and deblended by deepfield: positions, "
                "calibrated photometry (nJy, AB mag) in every band of the survey, shapes on the sky, blend groups, "
                "and the scores of the learned stages."),
    "lens_candidates": ("deepfield strong-lens candidates", "Sources ranked by the lens finder's score."),
    "clusters": ("deepfield galaxy-cluster candidates", "Clusters found by the cluster finder, with red-sequence "
                 "redshifts and richness."),
    "anomalies": ("deepfield anomaly candidates", "Regions of the images ranked by the GAN anomaly sigma-score."),
}


def _kind(name: str, aper: str | None) -> str:
    if aper:
        return _KIND["aper"] if aper == "aper" else f"circular aperture '{aper}' of the measure stage"
    return next((text for key, text in _KIND.items() if f"_{key}_" in name), "")


def describe(name: str, table: str = "sources") -> dict | None:
    """{type, unit, ucd, description} of column `name` of `table` (its own declarations first, then the
    sources', which the candidate tables copy), None when undeclared."""
    for col in TABLES[table] + (TABLES["sources"] if table != "sources" else []):
        m = col.pattern().match(name)
        if m is None:
            continue
        g = m.groupdict()
        text = col.description.format(band=g.get("band", ""), aper=g.get("aper", ""), kind=_kind(name, g.get("aper")))
        return {"type": col.type, "unit": col.unit, "ucd": col.ucd, "description": text}
    return None


_ARROW = {"int64": pa.int64(), "int32": pa.int32(), "int16": pa.int16(), "float64": pa.float64(),
          "float32": pa.float32(), "bool": pa.bool_()}


def _declared(name: str, table: str, extra: dict | None) -> dict:
    d = describe(name, table)
    if d is None and extra and name in extra:
        d = dict(extra[name])
    return d or {"type": "", "unit": "", "ucd": "", "description": "undeclared"}


def annotate(schema: pa.Schema, table: str = "sources", provenance: dict | None = None,
             extra: dict | None = None) -> pa.Schema:
    """`schema` with every field's unit, UCD and description (and the declared type: a cast target) and the
    provenance (JSON) in the schema metadata. `extra`: declarations of undeclared columns by name."""
    fields = []
    for f in schema:
        d = _declared(f.name, table, extra)
        typ = _ARROW.get(d["type"], f.type)  # strings and undeclared columns keep their type
        meta = {b"unit": d["unit"].encode(), b"ucd": d["ucd"].encode(), b"description": d["description"].encode()}
        fields.append(pa.field(f.name, typ, f.nullable, metadata=meta))
    meta = dict(schema.metadata or {})
    if provenance is not None:
        meta[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True).encode()
    return pa.schema(fields, metadata=meta)


def fits_cards(columns: list[str], table: str = "sources", extra: dict | None = None) -> list[tuple[str, str]]:
    """(keyword, value) of TUNITn, TUCDn and TCOMMn for the table's columns in order (n from 1)."""
    cards = []
    for n, name in enumerate(columns, 1):
        d = _declared(name, table, extra)
        if d["unit"]:
            cards.append((f"TUNIT{n}", d["unit"]))
        if d["ucd"]:
            cards.append((f"TUCD{n}", d["ucd"]))
        cards.append((f"TCOMM{n}", d["description"][:68]))
    return cards


def markdown() -> str:
    """The documentation page of the declared schema (docs/schema.md)."""
    lines = ["# Catalog schema", "",
             "Generated by `deepfield schema --markdown` from `catalogs/schema.py`; do not edit by hand.", "",
             "`{band}` stands for every band of the survey (the catalog holds exactly the survey's bands); "
             "`{aper}` for the measure stage's circular apertures (`aper`, the reference radius; `aper_<r>fwhm` "
             "and `aper_<r>as` for the further radii, dots written `p`); `{gaap}` for its Gaussian apertures "
             "(`gaap`, the first factor of `gaap_sigma_psf`; `gaap_<f>` for the others). Fluxes are in nJy "
             "(AB magnitude 31.4 is 1 nJy), magnitudes AB, angles on the sky, position angles east of north.", ""]
    for table, cols in TABLES.items():
        title, desc = TITLES[table]
        lines += [f"## {table} — {title}", "", desc, ""]
        if table != "sources":
            lines += ["Columns copied from the source catalog keep their declaration there.", ""]
        lines += ["| column | type | unit | UCD | description |", "|---|---|---|---|---|"]
        for c in cols:
            text = c.description.replace("{kind}", _kind(c.name, "aper" if "{aper}" in c.name else None))
            text = text.replace("|", "\\|")
            lines.append(f"| `{c.name}` | {c.type} | {c.unit or '—'} | `{c.ucd}` | {text} |")
        lines.append("")
    return "\n".join(lines)
