"""Scoring of detections against the full truth of a simulated field (`deepfield eval detect`, module
flows/evaluate/detection.py, whose docstring defines every figure).

Positions are field pixels (centres at integers, as the simulator's truth and the stages' x, y); fluxes are
image units (the truth's `flux_<band>` at the simulation's zero point).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

__all__ = ["BLENDEDNESS_CUT", "COMPLETENESS_BINS", "EDGE_PX", "FLUX_MAG_LIMIT", "GALAXY_KINDS", "MATCH_ARCSEC", "TRUTH_MAG_LIMIT",
           "close_pairs", "figures", "interior", "match", "nearest_flux", "score_field", "segment_flux"]

MATCH_ARCSEC = 0.6
EDGE_PX = 10.0
TRUTH_MAG_LIMIT = 26.5
FLUX_MAG_LIMIT = 24.0
GALAXY_KINDS = ("galaxy", "bcg")
BLENDEDNESS_CUT = 0.1
# figure name -> (blended, i from, i to)
COMPLETENESS_BINS = {"blended_22_23": (True, 22, 23), "blended_23_24": (True, 23, 24),
                     "blended_22_24": (True, 22, 24), "isolated_22_24": (False, 22, 24),
                     "isolated_24_25": (False, 24, 25)}


def segment_flux(segmap: np.ndarray, seg_id: np.ndarray, flux: np.ndarray, x: np.ndarray, y: np.ndarray
                 ) -> np.ndarray:
    """Flux of the detection whose segment (segmap value `seg_id`) holds the pixel of each position (x, y:
    pixels of the segmentation map's frame); NaN on sky or outside the map."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ny, nx = segmap.shape
    xi, yi = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
    inside = (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny)
    value = np.zeros(len(x), np.int64)
    value[inside] = segmap[yi[inside], xi[inside]]
    seg_id = np.asarray(seg_id, np.int64)
    lut = np.full(max(int(segmap.max(initial=0)), int(seg_id.max(initial=0))) + 1, np.nan)
    lut[seg_id] = flux
    return np.where(value > 0, lut[value], np.nan)


def nearest_flux(x: np.ndarray, y: np.ndarray, radius: np.ndarray, dx: np.ndarray, dy: np.ndarray,
                 flux: np.ndarray) -> np.ndarray:
    """Flux of the nearest detection (dx, dy) within `radius` (pixels, one per position) of each position;
    NaN where there is none."""
    out = np.full(len(x), np.nan)
    if len(x) == 0 or len(dx) == 0:
        return out
    d, k = cKDTree(np.column_stack([dx, dy])).query(np.column_stack([x, y]))
    near = d <= radius
    out[near] = np.asarray(flux, float)[k[near]]
    return out


def match(tx: np.ndarray, ty: np.ndarray, dx: np.ndarray, dy: np.ndarray, radius: float
          ) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of true positions (tx, ty) and detections (dx, dy), nearest pairs first, pairs
    farther than `radius` (same unit) never: (detection index of each true position or -1, true index of each
    detection or -1)."""
    t2d, d2t = np.full(len(tx), -1, np.int64), np.full(len(dx), -1, np.int64)
    if len(tx) == 0 or len(dx) == 0:
        return t2d, d2t
    pairs = cKDTree(np.column_stack([tx, ty])).sparse_distance_matrix(
        cKDTree(np.column_stack([dx, dy])), radius, output_type="ndarray")
    for k in np.lexsort((pairs["j"], pairs["i"], pairs["v"])):
        i, j = pairs["i"][k], pairs["j"][k]
        if t2d[i] < 0 and d2t[j] < 0:
            t2d[i], d2t[j] = j, i
    return t2d, d2t


def interior(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], edge: float = EDGE_PX) -> np.ndarray:
    """True where (x, y) (pixels, centres at integers) lies at least `edge` pixels inside a field of `shape`."""
    ny, nx = shape
    x, y = np.asarray(x, float), np.asarray(y, float)
    return np.minimum.reduce([x + 0.5, y + 0.5, nx - 0.5 - x, ny - 0.5 - y]) >= edge


def score_field(truth: pd.DataFrame, det: pd.DataFrame, radius_px: float, shape: tuple[int, int], ref: str = "i"
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score one field's detections against its truth (flows/evaluate/detection.py's docstring).

    truth: the field's true objects with x, y (field pixels), kind, mag_<ref>, flux_<ref>, n_blend, hlr
    (arcsec) and swallow_flux (the flux of the detection whose segment holds the true centre, NaN for none);
    det: the field's primary detections with x, y, flux and optionally n_blend (the detect stage's blend
    group size). Returns copies: truth with `interior`, `det_index` (matched detection row or -1), `found`,
    `outcome` ("matched", "swallowed", "missed"), `flux_meas` (matched flux, else swallow_flux, else 0),
    `shredded` (an unmatched detection within radius_px) and, when det has n_blend, `det_n_blend` (the
    matched detection's, NaN for none); det with `interior` and `truth_index` (matched truth row or -1)."""
    truth, det = truth.reset_index(drop=True).copy(), det.reset_index(drop=True).copy()
    usable = (truth[f"mag_{ref}"] < TRUTH_MAG_LIMIT).to_numpy()
    sub = np.flatnonzero(usable)
    t2d, d2t = match(truth.x.to_numpy(float)[sub], truth.y.to_numpy(float)[sub], det.x.to_numpy(float),
                     det.y.to_numpy(float), radius_px)
    det_index = np.full(len(truth), -1, np.int64)
    det_index[sub] = t2d
    truth["interior"] = interior(truth.x, truth.y, shape)
    truth["det_index"] = det_index
    truth["found"] = det_index >= 0
    det["interior"] = interior(det.x, det.y, shape)
    det["truth_index"] = np.where(d2t >= 0, sub[np.maximum(d2t, 0)] if len(sub) else -1, -1)
    swallow = truth["swallow_flux"].to_numpy(float)
    matched_flux = det.flux.to_numpy(float)[np.maximum(det_index, 0)] if len(det) else np.zeros(len(truth))
    truth["outcome"] = np.where(truth.found, "matched", np.where(np.isfinite(swallow), "swallowed", "missed"))
    truth["flux_meas"] = np.where(truth.found, matched_flux, np.where(np.isfinite(swallow), swallow, 0.0))
    if "n_blend" in det.columns:  # the size of the matched detection's blend group (NaN: none matched)
        truth["det_n_blend"] = np.where(truth.found, det.n_blend.to_numpy(float)[np.maximum(det_index, 0)]
                                        if len(det) else np.nan, np.nan)
    shredded = np.zeros(len(truth), bool)
    extra = det[(det.truth_index < 0).to_numpy()]
    if len(extra) and len(truth):
        near = cKDTree(extra[["x", "y"]].to_numpy(float)).query_ball_point(truth[["x", "y"]].to_numpy(float),
                                                                           radius_px, return_length=True)
        shredded = np.asarray(near) > 0
    truth["shredded"] = shredded
    return truth, det


def close_pairs(truth: pd.DataFrame, pixel_scale: float, ref: str = "i", lo: float = 0.5, hi: float = 2.0
                ) -> np.ndarray:
    """(k, 2) row positions in `truth` (one field, scored: `interior`) of the pairs of interior galaxies both
    brighter than FLUX_MAG_LIMIT in `ref` whose separation is `lo` to `hi` times the sum of their half-light
    radii (`hlr`, arcsec)."""
    sel = np.flatnonzero((truth.kind.isin(GALAXY_KINDS) & (truth[f"mag_{ref}"] < FLUX_MAG_LIMIT)
                          & truth.interior).to_numpy())
    if len(sel) < 2:
        return np.zeros((0, 2), np.int64)
    xy = truth[["x", "y"]].to_numpy(float)[sel] * pixel_scale
    hlr = truth.hlr.to_numpy(float)[sel]
    pairs = cKDTree(xy).query_pairs(2 * hi * float(hlr.max()), output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros((0, 2), np.int64)
    d = np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T)
    s = hlr[pairs[:, 0]] + hlr[pairs[:, 1]]
    return sel[pairs[(d >= lo * s) & (d <= hi * s)]]


def _fraction(hit: np.ndarray) -> dict:
    """Count, hits and their fraction (None of nothing)."""
    return {"n": int(hit.size), "found": int(hit.sum()), "fraction": float(hit.mean()) if hit.size else None}


def _flux(t: pd.DataFrame, ref: str) -> dict:
    """Median |F_meas - F_true| / F_true and median (F_meas - F_true) / F_true of the rows of `t` (scored
    truth), with how each was measured."""
    e = (t.flux_meas.to_numpy(float) - t[f"flux_{ref}"].to_numpy(float)) / t[f"flux_{ref}"].to_numpy(float)
    # where the error comes from: matched galaxies whose detection was deblended among others (the detections'
    # `n_blend` >= 2) or alone in its footprint (whatever else lies there undetected), and the swallowed ones
    group = t.det_n_blend.to_numpy(float) if "det_n_blend" in t.columns else np.full(len(t), np.nan)
    matched = (t.outcome == "matched").to_numpy()
    parts = {"deblended": matched & (group >= 2), "alone": matched & (group == 1),
             "swallowed": (t.outcome == "swallowed").to_numpy()}
    return {"n": int(e.size), "median_abs": float(np.median(np.abs(e))) if e.size else None,
            "bias": float(np.median(e)) if e.size else None,
            "outcomes": {k: int((t.outcome == k).sum()) for k in ("matched", "swallowed", "missed")},
            "median_abs_by_part": {k: {"n": int(m.sum()), "median_abs": float(np.median(np.abs(e[m])))
                                       if m.any() else None} for k, m in parts.items()}}


def figures(truth: pd.DataFrame, det: pd.DataFrame, pair_found: np.ndarray, ref: str = "i") -> dict:
    """The figures of one method from its scored truth and detections (score_field, all fields concatenated,
    with a `label` column on the detections: label_sources' label of the unmatched ones) and, per close
    pair (close_pairs), whether both members were found. Besides the blend groups (`n_blend`), galaxies
    "overlapped" by light (truth `blendedness` > BLENDEDNESS_CUT, Bosch et al. 2018, reference band) get a
    completeness at i 22-24 and a flux error at i < 24; isolated galaxies a flux error at i < 24 and at 24-25
    (where a Kron aperture meets the noise)."""
    t = truth[truth.interior.to_numpy(bool)]
    mag = t[f"mag_{ref}"].to_numpy(float)
    gal = t.kind.isin(GALAXY_KINDS).to_numpy()
    blended = t.n_blend.to_numpy() > 1
    found = t.found.to_numpy(bool)
    comp = {k: _fraction(found[gal & (blended == b) & (mag >= lo) & (mag < hi)])
            for k, (b, lo, hi) in COMPLETENESS_BINS.items()}
    overlapped = gal & (t.blendedness.to_numpy(float) > BLENDEDNESS_CUT)  # NaN (not rendered): no
    comp["overlapped_22_24"] = _fraction(found[overlapped & (mag >= 22) & (mag < 24)])
    star = (t.kind == "star").to_numpy()
    comp["stars_lt24"] = _fraction(found[star & (mag < 24)])
    comp["stars_24_25"] = _fraction(found[star & (mag >= 24) & (mag < 25)])
    bright = gal & (mag < FLUX_MAG_LIMIT)
    d = det[det.interior.to_numpy(bool)]
    unmatched = d[(d.truth_index < 0).to_numpy()]
    return {"completeness": comp, "close_pairs": _fraction(np.asarray(pair_found, bool)),
            "flux_blended": _flux(t[bright & blended], ref), "flux_isolated": _flux(t[bright & ~blended], ref),
            "flux_overlapped": _flux(t[bright & overlapped], ref),
            "flux_isolated_24_25": _flux(t[gal & ~blended & (mag >= FLUX_MAG_LIMIT) & (mag < 25)], ref),
            "n_detections": len(d), "purity": float((d.truth_index >= 0).mean()) if len(d) else None,
            "n_unmatched": len(unmatched), "unmatched_by_label": unmatched.label.value_counts().to_dict(),
            "shredded_truth": int((t.shredded & (t[f"mag_{ref}"] < TRUTH_MAG_LIMIT)).sum())}
