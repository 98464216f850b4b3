"""GAN anomaly scores (Storey-Fisher et al. 2021): the WGAN-GP of models/anomaly_gan.py scores how well its
generator can reproduce g, r, i stamps of the tile: a dense grid of windows over every pixel, and stamps centred
on the selected sources.

Grid (`grid`, default on; tasks/stages/_anomaly_grid.py): windows of the model's stamp size (32 px) every
`stride` (16, at most half a window) px of the field, each scored by the tile whose core holds its centre. Every
pixel lies in at least one window, so a cosmic ray or a trail in one band, or a ghost too diffuse to be
detected, is scored whatever the detection found. The halo (64 px by default) must be at least half a window
for the windows of a core's edge to hold their pixels.

Coarse to fine (`refine`, `refine_above`): the tile first scores the grid's coarse windows (every second one on
each axis, and the last: a step of at most one window, so they alone hold every pixel once or more), then every
window one grid step from a coarse window that scored at least `refine_above` (3.0) or among the `refine`
(0.1) highest of the tile's coarse windows. The windows left out lie where every coarse window around them
scored low. On `deepfield eval anomaly`'s fields (seed 20261125, two 2048^2 fields) 51 % of the windows are
scored; the injected anomalies in the top 1 % are the same (0.475 of 326 by the sigma-score, the windows left
out ranked last) and the AUROC over windows 0.834 against 0.837. `refine` 1 scores every window.

Each window scored is a row of the tile's side table
`anomaly_map` (`tiles/<field>/<ty>_<tx>.anomaly_map.parquet`): field, ky, kx (grid indices), x, y (window
centre) and peak_x, peak_y (its worst pixel; field pixels), ra, dec (of the peak,
degrees), score, score_paper, local_pixel, local_feature, model_peak (the reconstruction's brightest pixel, sky
sigmas), band (of the peak), mode, coarse (on the coarse grid: the merge's sigma-scores are taken against those,
a uniform sample of the grid), and the ring term's ring (depth, S/N; 0 for none), ring_x, ring_y (field pixels)
and ring_ra, ring_dec (NaN for none): the ring's centre, the mean of its rim (_rings.rims), and the line term's
line (S/N), line_x, line_y, line_ra, line_dec (the line's point nearest the window's centre), line_band and
line_angle (its direction, degrees from +x towards +y). The
merge step (catalogs/anomalies.py) turns high-scoring windows into anomaly candidates.

Ring term (`ring`, default on; tasks/stages/_rings.py): the deepest depression of the light enclosed all round by
a rim of at least `ring_rim` (8) times the noise, in each window, on the detection image of every band filtered by
the PSF (the detect stage's S/N map where it ran): a ring galaxy's ring about its fainter centre, which the
generator's residual hardly sees (a smooth blob drawn where the ring is, and bright galaxies' residuals large
anyway). The merge ranks a window by the larger of its sigma-score and the depth less RING_OFFSET (4). On the
simulator's fields the ring galaxies' depressions are 12 to 171 times the noise, everything else's at most 4.4.

Line term (models/anomaly_lines.line_terms, always on): the S/N of the best straight strip across the window's sky
residual (x - G(z) over the pixels the generator calls sky, in units of their noise), summed in 4 x 4 px cells along
16 directions and 9 offsets from the centre, less the cells beside the strip, held by all four pieces along it:
a faint satellite trail in one band, which no pixel of shows above the noise's worst in a window (a trail 4 sigma
on its axis scored under the normal windows' 99th percentile, `deepfield eval anomaly` seed 20261125) and which
summed along its length stands far out. The merge ranks a window by the larger of its sigma-score and the line S/N
less LINE_OFFSET (2), at most LINE_SIGMA_MAX (8; tasks/stages/_anomaly_grid.py), placed on the line. It is taken
on the coarse windows (lines up to 16 px from a window's centre: the coarse windows, which hold every pixel, see
every line), and where a coarse window's is above LINE_REFINE (3) its neighbours are scored too (refine_scores) and
take it as well (line_neighbours); the other windows' line is 0. For every scored window it cost 0.04-0.05
core-s per Mpx on the evaluation's fields, so about 0.02 (and the merge joins the pieces of a trail on one line,
catalogs/anomaly_candidates._join_lines).

Sources (as before), for the rows of the tile that
- are primary (the core owns them) and not saturated (saturated stars are bright, normal and masked);
- have S/N >= `min_snr` (10) in at least one of the model's bands (AUTO flux over its error);
- are not point-like: the second-moment size `a` is outside [1 - `point_tol`, 1 + `point_tol`] (0.15) times
  the PSF's sigma (stars are normal; artefacts sharper than the PSF stay in);
get a stamp centred on the nearest pixel to the centroid.

Stamps and windows are cut from the background-subtracted tile with halo; pixels outside the field or
without data (invvar 0, NaN) are 0 and carry no noise, other masked pixels keep their values (an artefact is
what is sought). Scaled by the bands' sky noise as in training (models.anomaly_gan.scale_stamps): the tile's,
1 / sqrt(median invvar) of each band over the tile (_anomaly_grid.tile_inputs), scaled once per tile for the
sources' stamps and the grid's windows alike (training scales each stamp by its own median, which differs from
the tile's only where the depth changes within a tile; the sources' stamps were scaled one by one so before
stage version 6, at 0.06 core-s per Mpx more).

Scores (models.anomaly_gan.grid_scores): `score` is the local score, L = 0.7 L_res + 0.3 L_feat with L_res
the larger of the worst pixel of |x - G(z)| in units of each pixel's noise (from the
inverse variance), the largest over bands, and the worst quarter's signed residual over the model's sky pixels
(a trail), and L_feat the worst spatial cell of the critic's feature residual, each over its median on normal
training windows; `score_paper` is the paper's sum over all pixels and features. Saturated and bleed-trail
pixels (mask bits SAT, BLEED) stay in the input but out of the score.
z = E(x) (the fast mode, `mode` "fast", the default); in the full mode z is refined by `steps` (20) Adam steps.
With `rescore` > 0, the `rescore` highest-scoring windows and sources of each tile are scored again in the full
mode (their `mode` says which); off by default: on the held-out fields re-scoring the top 3 % of the windows in
the full mode changed none of `deepfield eval anomaly`'s figures.

Precision (`precision`, default "auto"): on a CPU that computes bfloat16 natively (AVX512-BF16 or AMX) the
encoder, generator and critic run under torch.autocast to bfloat16, elsewhere in float32. On an AMD EPYC with
AVX512-BF16 the windows are scored 1.3 times faster (fast mode, one thread, on a quiet machine), the scores
within 0.5 % of float32's (median; 5 % at most) and `deepfield eval anomaly`'s figures within 0.006
(models/cards/anomaly_wgan.md).

Columns added to the sources: `anomaly_selected` (bool), `anomaly_score`, `anomaly_score_paper`,
`anomaly_pixel` and `anomaly_feature` (the paper's two sums); NaN for unselected rows. The merge turns the
scores into `anomaly_sigma` over the whole run.
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

import numpy as np
import pandas as pd
from pydantic import Field

from .. import maskbits
from ._anomaly_grid import extract, line_neighbours, refine_scores, refined, tile_inputs, tile_windows, window_stamps
from ._pixels import DEFAULT_FWHM_PX, filtered_snr, fwhm_pixels, gaussian_kernel, tile_detection_image
from ._rings import rims, ring_depth, ring_search
from .base import ModelStage, ModelStageConfig, StageConfig

__all__ = ["AnomalyStage", "AnomalyConfig"]

NO_PIXEL = maskbits.NO_DATA | maskbits.ZERO_WEIGHT
NOT_COUNTED = maskbits.SAT | maskbits.BLEED  # in the input, out of the score
AUTOCAST = ("encoder", "generator", "critic.conv")  # the networks grid_scores calls (precision bfloat16)
REFINE_ABOVE = 3.0  # 82 % of the grid's windows score less (`deepfield eval anomaly`, seed 20261125)


class AnomalyConfig(ModelStageConfig):
    min_snr: float = Field(10.0, description="scored sources have at least this AUTO S/N in one of the bands")
    point_tol: float = Field(0.15, ge=0, description="sources with a within 1 +- point_tol PSF sigma are "
                             "point-like and not scored")
    mode: Literal["full", "fast"] = Field("fast", description="full: refine the latent vector with `steps` Adam "
                                          "steps; fast: the encoder alone")
    grid: bool = Field(True, description="score a dense grid of windows over every pixel of the tile core")
    stride: int = Field(16, ge=1, description="grid step, pixels (at most half the model's stamp size)")
    rescore: int = Field(0, ge=0, description="per tile, this many of the highest-scoring windows and as many "
                         "sources are scored again in the full mode (0: none; on the held-out fields, re-scoring "
                         "the top 3 % of the windows changed no figure, at 40x their cost)")
    refine: float = Field(0.1, ge=0, le=1, description="coarse to fine: the grid's coarse windows (every second "
                          "one on each axis, which alone hold every pixel) are scored first, then the windows around "
                          "this fraction of them that score highest in the tile (1: every window of the grid)")
    refine_above: float = Field(REFINE_ABOVE, description="the windows around every coarse window scoring at least "
                                "this are scored too, however many")
    steps: int = Field(20, ge=0, description="Adam steps on the latent vector in the full mode")
    ring: bool = Field(True, description="the ring term: each window's deepest enclosed depression of the light "
                       "(a ring galaxy's centre; tasks/stages/_rings.py), which the merge ranks beside the score")
    ring_rim: float = Field(8.0, gt=0, description="ring term: the least S/N of the rim all round a depression")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="the networks' arithmetic on a CPU: 'auto', bfloat16 (torch.autocast) where the CPU "
        "computes it natively (AVX512-BF16 or AMX), else float32")
    batch: int = Field(256, ge=1, description="stamps per inference batch")
    size: Optional[int] = Field(None, ge=8, description="stamp size before the model is loaded (the model's own "
                                "size is used once it is)")
    bands: Optional[tuple[str, ...]] = Field(None, description="bands before the model is loaded (the model's "
                                             "own bands are used once it is)")


class AnomalyStage(ModelStage):
    name: ClassVar[str] = "anomaly"
    # 3: the grid's model_peak (the merge's sigma-scores by brightness); 4: coarse to fine; 5: bfloat16 on CPUs
    # that compute it (precision); 6: the ring term, the sources' stamps scaled by the tile's sky sigma; 7: the line
    # term
    version: ClassVar[str] = "7"
    Config: ClassVar[type[StageConfig]] = AnomalyConfig
    models: ClassVar[tuple[str, ...]] = ("anomaly_wgan",)
    reads: ClassVar[tuple[str, ...]] = ("flux_auto_{band}", "fluxerr_auto_{band}", "a", "x_tile", "y_tile")
    adds: ClassVar[tuple[str, ...]] = ("anomaly_selected", "anomaly_score", "anomaly_score_paper", "anomaly_pixel",
                                       "anomaly_feature")
    side_tables: ClassVar[tuple[str, ...]] = ("anomaly_map",)
    merge_step: ClassVar[str] = "deepfield.catalogs.anomalies:AnomalyMerge"

    def __init__(self, config: StageConfig | None = None, **params):
        super().__init__(config, **params)
        self.size = int(self.config.size) if self.config.size else 32  # set from the model at setup
        self.bands = list(self.config.bands) if self.config.bands else ["g", "r", "i"]
        self.ref_band = self.bands[-1]

    def setup(self, device: str) -> None:
        import torch

        from deepfield.models.inference import cpu_precision, transposed_as_shuffle
        super().setup(device)
        # the same scores to float rounding in less time: the generator's transposed convolutions as
        # convolutions and pixel shuffles (batch norms folded), channels-last tensors (models/inference.py)
        self.model.generator = transposed_as_shuffle(self.model.generator)
        self.model = self.model.to(memory_format=torch.channels_last)
        # bfloat16: 1.3x faster scoring on AVX512-BF16 cores, scores within 0.5 % of float32's (module docstring)
        self.arithmetic = cpu_precision(self.model, AUTOCAST, self.precision, device)
        self.size, self.bands = self.model.size, list(self.model.bands)
        self.ref_band = self.bands[-1]
        if self.grid and self.stride > self.size // 2:
            raise ValueError(f"stage 'anomaly': stride {self.stride} is more than half the model's stamp size "
                             f"({self.size}); some pixels would be scored only at a window's edge")

    def snr(self, sources: pd.DataFrame) -> np.ndarray:
        """Largest AUTO-flux S/N over the model's bands."""
        cols = []
        for b in self.bands:
            f, e = sources[f"flux_auto_{b}"].to_numpy(float), sources[f"fluxerr_auto_{b}"].to_numpy(float)
            with np.errstate(divide="ignore", invalid="ignore"):
                cols.append(np.where(e > 0, f / e, 0.0))
        return np.nan_to_num(np.max(cols, axis=0), nan=0.0)

    def select(self, tile, sources: pd.DataFrame) -> np.ndarray:
        """Boolean mask of the rows to score (module docstring)."""
        if len(sources) == 0:
            return np.zeros(0, bool)
        self.require(sources, self.bands)
        sigma_px = fwhm_pixels(tile, DEFAULT_FWHM_PX) / 2.3548
        size = sources["a"].to_numpy(float) / sigma_px
        ok = (self.snr(sources) >= self.min_snr) & (np.abs(size - 1) > self.point_tol)
        if "is_primary" in sources.columns:
            ok &= sources["is_primary"].to_numpy(bool)
        if "flag_saturated" in sources.columns:
            ok &= ~sources["flag_saturated"].to_numpy(bool)
        return ok

    def _pixels(self, tile, counted: bool = False):
        """The model's bands of the tile: image, invvar, usable (data there) and, with `counted`, the pixels
        the score counts (usable, neither saturated nor in a bleed trail)."""
        idx = [tile.bands.index(b) for b in self.bands]
        image = tile.image[idx]
        usable = ((tile.mask[idx] & NO_PIXEL) == 0) & np.isfinite(image)
        if not counted:
            return image, tile.invvar[idx], usable
        return image, tile.invvar[idx], usable, usable & ((tile.mask[idx] & NOT_COUNTED) == 0)

    def scaled_stamps(self, tile, sources: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(N, bands, S, S) network inputs of the rows of `sources` (background-subtracted tile) and each
        pixel's noise in units of its stamp's sky sigma, each stamp scaled by its own (training's stamps,
        tasks/trainsets/anomaly.py; the stage scales by the tile's, module docstring)."""
        from deepfield.models.anomaly_gan import scale_stamps
        image, invvar, usable, counted = self._pixels(tile, counted=True)
        c = (self.size - 1) / 2.0
        y0 = np.rint(sources["y_tile"].to_numpy(float) - c).astype(int)
        x0 = np.rint(sources["x_tile"].to_numpy(float) - c).astype(int)
        stamps, sig, noise = window_stamps(image, invvar, usable, y0, x0, self.size)
        noise *= extract([counted.astype(np.float32)], y0, x0, self.size)[0]  # saturated, bleeding: not scored
        return scale_stamps(stamps, sig), noise

    def _score(self, x: np.ndarray, noise: np.ndarray, rescore: bool = True, lines: bool = True) -> dict:
        """Scores in the configured mode, with `rescore` the `rescore` best again in the full mode; adds `mode`
        (str)."""
        from deepfield.models.anomaly_gan import grid_scores
        full = self.mode == "full"
        r = grid_scores(self.model, x, noise, steps=self.steps if full else 0, batch=self.inference_batch(),
                        device=self.device, lines=lines)
        r["mode"] = np.full(len(x), self.mode, object)
        if rescore:
            self._rescore(r, lambda ix: (x[ix], noise[ix]), lines)
        return r

    def _rescore(self, r: dict, stamps, lines: bool = True) -> None:
        """The `rescore` highest of the scores `r` again in the full mode, in place; stamps(ix) gives their
        inputs (x, noise); `lines`: with the line term (grid_scores)."""
        from deepfield.models.anomaly_gan import grid_scores
        if self.mode == "full" or not self.rescore or not len(r["score"]):
            return
        best = np.argsort(-r["score"], kind="stable")[:self.rescore]
        again = grid_scores(self.model, *stamps(best), steps=self.steps, batch=self.inference_batch(),
                            device=self.device, lines=lines)
        for k, v in again.items():
            if lines or not k.startswith("line"):  # without lines: the line term stays the fast mode's
                r[k][best] = v
        r["mode"][best] = "full"

    def ring_terms(self, tile, y0: np.ndarray, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ring term of the windows starting at tile-array pixels (y0, x0): the depth of the deepest enclosed
        depression whose ring's centre lies in each (S/N; 0 for none) and that centre (tile-array pixels; NaN for
        none). The PSF-filtered S/N map and the depressions are the detect stage's (`tile.meta["detection_snr"]`,
        `tile.meta["detect_rings"]`) where it ran, else made the same way."""
        if not len(y0):
            return np.zeros(0, np.float32), np.zeros(0), np.zeros(0)
        det, noise, bad = tile_detection_image(tile)
        meta = getattr(tile, "meta", None)
        meta = meta if isinstance(meta, dict) else {}
        fwhm = fwhm_pixels(tile, DEFAULT_FWHM_PX)
        snr, scale = meta.get("detection_snr"), meta.get("detect_noise_scale", 1.0)
        if snr is None:
            snr, scale = filtered_snr(det, noise, bad, fwhm)
        found = meta.get("detect_rings")  # the detect stage's search, where it ran with these parameters
        if found is not None and found[0] == (self.size // 2, self.ring_rim):
            x, y, depth = found[1]
        else:
            guard = gaussian_kernel(fwhm).shape[0] // 2  # a pixel without data in the filter: no test there
            box = (int(y0.min()), int(y0.max()) + self.size, int(x0.min()), int(x0.max()) + self.size)
            x, y, depth = ring_search(snr, det, noise, bad, fwhm, scale, self.size // 2, self.ring_rim, guard, box)
        # placed at the ring's centre (its rim's), not at the depression: beside a nucleus that is the moat's
        # deepest point, up to half the ring's radius off
        cx, cy, _ = rims(snr, x, y, self.size // 2)
        return ring_depth(cx, cy, depth, y0, x0, self.size)

    def windows(self, tile, inputs: list[np.ndarray] | None = None) -> pd.DataFrame:
        """The tile's grid windows scored (the `anomaly_map` table, module docstring): the coarse grid, then the
        windows around its highest-scoring windows (`refine`, `refine_above`; tasks/stages/_anomaly_grid.py).
        inputs: the tile's tile_inputs, when made already."""
        w = tile_windows(tile, self.size, self.stride)
        inputs = inputs if inputs is not None else list(tile_inputs(*self._pixels(tile, counted=True)))
        y0, x0 = w.y0.to_numpy() - tile.box.y0, w.x0.to_numpy() - tile.box.x0

        def stamps(ix: np.ndarray) -> list[np.ndarray]:
            return extract(inputs, y0[ix], x0[ix], self.size)

        def score(ix: np.ndarray, lines: bool) -> dict:
            return self._score(*stamps(ix), rescore=False, lines=lines)

        # the coarse windows first, with the line term, then the others, with it next to a line (module docstring)
        coarse, ky, kx = w.coarse.to_numpy(bool), w.ky.to_numpy(), w.kx.to_numpy()
        first = np.flatnonzero(coarse)
        r0 = score(first, True)
        line = np.full(len(w), np.nan)
        line[first] = r0["line"]
        if self.refine >= 1:  # every window
            keep = np.arange(len(w))
        else:
            s = np.full(len(w), np.nan)
            s[first] = refine_scores(r0["score"], r0["line"])
            keep = np.flatnonzero(refined(ky, kx, coarse, s, self.refine, self.refine_above))
        near = line_neighbours(ky, kx, coarse, line)
        more = keep[~coarse[keep]]
        lined, plain = more[near[more]], more[~near[more]]
        r1, r2 = score(lined, True), score(plain, False)
        order = np.argsort(np.concatenate([first, lined, plain]), kind="stable")  # back in grid order
        r = {k: np.concatenate([r0[k], r1[k], r2[k]])[order] for k in r0}
        w = w.iloc[keep].reset_index(drop=True)
        self._rescore(r, lambda ix: stamps(keep[ix]), lines=False)
        w0 = w.y0.to_numpy(), w.x0.to_numpy()
        py, px = w0[0] + r["peak"][:, 0], w0[1] + r["peak"][:, 1]
        if len(w):
            ra, dec = tile.wcs.pixel_to_world_values(px - tile.box.x0, py - tile.box.y0)
        else:
            ra = dec = np.zeros(0)
        ly, lx = w0[0] + r["line_peak"][:, 0], w0[1] + r["line_peak"][:, 1]  # the line's point, field pixels
        if len(w):
            lra, ldec = tile.wcs.pixel_to_world_values(lx - tile.box.x0, ly - tile.box.y0)
        else:
            lra = ldec = np.zeros(0)
        ring = np.zeros(len(w), np.float32)
        rx, ry, rra, rdec = (np.full(len(w), np.nan) for _ in range(4))
        if self.ring and len(w):
            ring, rx, ry = self.ring_terms(tile, w.y0.to_numpy() - tile.box.y0, w.x0.to_numpy() - tile.box.x0)
            at = np.isfinite(rx)
            if at.any():
                rra[at], rdec[at] = tile.wcs.pixel_to_world_values(rx[at], ry[at])
            rx, ry = rx + tile.box.x0, ry + tile.box.y0
        return pd.DataFrame({
            "field": tile.id.field, "ky": w.ky.to_numpy(np.int32), "kx": w.kx.to_numpy(np.int32),
            "x": w.xc.to_numpy(float), "y": w.yc.to_numpy(float), "peak_x": px.astype(float),
            "peak_y": py.astype(float), "ra": np.asarray(ra, float), "dec": np.asarray(dec, float),
            "score": r["score"].astype(np.float32), "score_paper": r["paper"].astype(np.float32),
            "local_pixel": r["local_pixel"].astype(np.float32), "local_feature": r["local_feature"].astype(np.float32),
            "model_peak": r["model_peak"].astype(np.float32),
            "band": pd.array([self.bands[int(b)] for b in r["band"]], dtype="string"),
            "mode": pd.array(r["mode"].astype(str), dtype="string"), "coarse": w.coarse.to_numpy(bool),
            "ring": ring.astype(np.float32), "ring_x": rx, "ring_y": ry, "ring_ra": rra, "ring_dec": rdec,
            "line": r["line"].astype(np.float32), "line_x": lx.astype(float), "line_y": ly.astype(float),
            "line_ra": np.asarray(lra, float), "line_dec": np.asarray(ldec, float),
            "line_band": pd.array([self.bands[int(b)] for b in r["line_band"]], dtype="string"),
            "line_angle": r["line_angle"].astype(np.float32)})

    def run(self, tile, sources: pd.DataFrame) -> pd.DataFrame:
        self.ensure_setup()
        out = sources.copy()
        sel = self.select(tile, sources)
        cols = {k: np.full(len(sources), np.nan, np.float32) for k in ("score", "paper", "pixel", "feature")}
        # the network's inputs over the whole tile, once for the sources' stamps and the grid's windows (the tile's
        # image is background-subtracted by the background stage, in place)
        inputs = list(tile_inputs(*self._pixels(tile, counted=True))) if sel.any() or self.grid else None
        if sel.any():
            c = (self.size - 1) / 2.0
            y0 = np.rint(sources["y_tile"].to_numpy(float)[sel] - c).astype(int)
            x0 = np.rint(sources["x_tile"].to_numpy(float)[sel] - c).astype(int)
            r = self._score(*extract(inputs, y0, x0, self.size), lines=False)  # the line term is the grid's
            for k in cols:
                cols[k][sel] = r[k]
        out["anomaly_selected"] = sel
        out["anomaly_score"] = cols["score"]
        out["anomaly_score_paper"] = cols["paper"]
        out["anomaly_pixel"] = cols["pixel"]
        out["anomaly_feature"] = cols["feature"]
        if self.grid:
            tile.tables["anomaly_map"] = self.windows(tile, inputs)
        return out
