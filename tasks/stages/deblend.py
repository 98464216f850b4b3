"""Deblending of blend groups: every member of every blend group found by `detect` is measured as if it were
alone, its share of each pixel's light given by symmetric, monotonic templates (default) or by the U-Net
deblender (models/deblend_unet.py).

For each blend group (`n_blend` >= 2 from the detect stage), the stage cuts one stamp from the
background-subtracted tile with halo, centred on the group's mean centroid (masked pixels set to 0): 48 x 48 px
(the network's size), or with the symmetric templates as large as the members' light needs, up to `max_stamp`
(72) px: twice the largest of each member's offset from the centre plus EXTENT (2.5) Kron radii (the measure
stage's kron_radius x a), plus the 6 px margin, in steps of 8 px. Each member's share of each pixel's light,
per band:
- `templates: symmetric` (default): in proportion to the members' symmetric, monotonic templates, made from the
  stamp smoothed by `template_smooth` (0.5 px), made again from the stamp less the other members' templates,
  weighted by how much brighter they are (tasks/stages/_templates.py; the classical SDSS and scarlet priors,
  no training); masked pixels (a saturated core, a bad pixel) constrain no template;
- `templates: unet`: the network, given the stamp, the member's centroid and the other members' centroids,
  returns the fraction of each pixel's light that is the member's; the members' fractions are renormalised to
  add up to one wherever they add up to more than 0.05 (models.deblend_unet.share).
Each pixel's light goes to the members once. Then:
- `flux_deblend_<b>` = sum(fraction x pixels), `fluxerr_deblend_<b>` = sqrt(sum(fraction^2 / invvar)),
  `mag_deblend_<b>`, `magerr_deblend_<b>` (AB, the band's zero point);
- `deblend_a`, `deblend_b`, `deblend_theta`: second-moment shape (pixels, radians as `theta`) of the
  deblended reference-band image (fraction x pixels, negative pixels clipped);
- `blendedness` in the reference band (Bosch et al. 2018): 1 - sum(c^2) / sum(c t), c the deblended image and
  t the blend (both clipped at 0): 0 for an isolated source, towards 1 for one buried in a neighbour;
- `deblend_method`: "symmetric" or "unet" (the templates that shared the light) for those, "isolated" for
  sources alone in their footprint, whose `flux_deblend_<b>` is their Kron (`flux_auto`) flux and blendedness 0
  (they pass through unchanged), and "auto_fallback" (Kron flux kept) for sources within a quarter stamp of the
  edge of the tile arrays (never a primary one: the halo is wider).

On the two pairs of held-out 2048^2 fields of `deepfield eval detect --size 2048` (seeds 20261127 and
20261201), median |dF|/F in i of the galaxies with truth blendedness > 0.1 at i < 24 (273 and 344; the
undetected ones with the flux of the detection that swallowed them): U-Net 0.378 and 0.330, symmetric templates
0.243 and 0.277; of those the stage deblends (175 and 255) 0.360 and 0.292 (bias -7 %) against 0.173 and 0.243
(+4 and +2 %); of all the galaxies in blend groups at i < 24 (779 and 888) 0.146 and 0.143 against 0.118 and
0.112. The rest of the first figure is galaxies the detector does not separate from a neighbour (swallowed,
median 1.7-2.3) or alone in their footprint with an undetected neighbour (Kron flux, 0.28-0.39).
Stamps that grow with their members (`max_stamp` 72; 48 before, 2026-12-03) take the first figure to 0.227 and
0.256 (bias +10 -> +8 % and +8 -> +2 %) and the blend groups' to 0.109 and 0.108, for 0.55-0.58 core-s per Mpx
against 0.39-0.42 (one AMD EPYC core, the 32 tiles of the first pair). Measured on the same tiles: fixed 56,
64 and 80 px 0.240 / 0.258, 0.228 / 0.258, 0.233 / 0.250; growing up to 96 px 0.224 / 0.250 at 0.80-0.87
core-s per Mpx (1.5 Kron radii: 0.233 / 0.250); the large galaxies (half-light radius > 1.2") lost 27 % of
their light in 48 px stamps and 23 % up to 96 px, the compact ones' +13 % fell to +10 %.

With the symmetric templates the stamp is cut with a margin that holds the mirror image of each of its pixels
about each member, from which the templates read the mirror images beyond the stamp (a bright member off the
stamp's centre had no template on the stamp's far side, and its wing went to the faint members there;
tasks/stages/_templates.py): on the same fields 0.245 -> 0.231 and 0.224 -> 0.218 (seeds 20261201 and 20261127,
2026-12-05).

A group larger than `max_members` (6), or whose members do not fit in one stamp (6 px margin), or centred
within a quarter stamp of the arrays' edge, is deblended member by member instead: a stamp centred on each
member, shared (as above) among the members whose centres lie in that stamp (the `max_members` nearest). On
two held-out 2048^2 fields this moved 37 members of such groups from Kron fluxes (median |dF|/F 0.87) to the
network's (the U-Net, the default then), and the median |dF|/F of the galaxies with truth blendedness > 0.1 at
i < 24 from 0.427 to 0.39 (`deepfield eval detect --size 2048`).

With `templates: unet`, weights with an image head (`deepfield train deblend --output image`) predict each
member's noiseless image instead (a template, models.deblend_unet.member_images). With `template_flux: fit`
(default) the members' templates are fitted to the stamp together, band by band (models.deblend_unet.fit_fluxes:
inverse-variance weighted least squares, masked pixels left out): `flux_deblend_<b>` is the amplitude times the
template's sum, `fluxerr_deblend_<b>` from the fit's covariance, and the deblended image for shape and
blendedness is the scaled template; a member whose template is empty in some band keeps its Kron fluxes
(`auto_fallback`). With `template_flux: share` each pixel's light is shared in proportion to the templates, as
with fractions.

With `mask_others` (the default), the pixels of a stamp that the detect stage's segmentation map
(`tile.meta["segmap"]`, valued `seg_id`) gives to a detection that is not one of the stamp's members are set to
0 before the network, as the measure stage masks neighbours' segments in its Kron sums: a faint member whose own
stamp holds the wing of a bright galaxy 25-40 px away (outside the stamp, so not given to the network as a
member) had been given that light, up to 10x its own flux. On the same fields: median |dF|/F of the galaxies
with truth blendedness > 0.1 at i < 24 0.403 -> 0.378 (bias +0.133 -> +0.058), of blend-group members 0.166
-> 0.147 (bias +0.043 -> -0.005).
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

import numpy as np
import pandas as pd
from pydantic import Field

from ._pixels import UNUSABLE, band_unit_scales, cut_stamp
from ._templates import mirror_pad, template_fractions
from .base import ModelStage, ModelStageConfig, StageConfig
from .measure import magnitudes

__all__ = ["DeblendStage", "DeblendConfig"]

EXTENT = 2.5  # templates 'symmetric': a member's light reaches this many Kron radii (kron_radius x a) out


def _moments(img: np.ndarray) -> tuple[float, float, float]:
    """Second-moment semi-axes and angle (a, b, theta) of a non-negative image, SExtractor's formulas."""
    tot = img.sum()
    if tot <= 0:
        return np.nan, np.nan, np.nan
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    x0, y0 = (img * xx).sum() / tot, (img * yy).sum() / tot
    xx2 = (img * (xx - x0) ** 2).sum() / tot
    yy2 = (img * (yy - y0) ** 2).sum() / tot
    xy = (img * (xx - x0) * (yy - y0)).sum() / tot
    half, root = (xx2 + yy2) / 2, np.sqrt(((xx2 - yy2) / 2) ** 2 + xy ** 2)
    return float(np.sqrt(half + root)), float(np.sqrt(max(half - root, 0.0))), float(0.5 * np.arctan2(2 * xy, xx2 - yy2))


class DeblendConfig(ModelStageConfig):
    ref_band: Optional[str] = Field(None, description="band of blendedness and of the deblended shape (default: "
                                    "the reference band the weights were trained with)")
    max_members: int = Field(6, ge=1, description="blend groups with more members are deblended member by member, "
                             "each on its own stamp")
    batch: int = Field(128, ge=1, description="network inputs per inference batch")
    mask_others: bool = Field(True, description="zero the pixels of a stamp that the detect stage's segmentation "
                              "gives to detections outside the stamp's members")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="templates 'unet': the network's arithmetic on a CPU: 'auto', bfloat16 "
        "(torch.autocast) where the CPU computes it natively (AVX512-BF16 or AMX), else float32")
    templates: Literal["symmetric", "unet"] = Field(
        "symmetric", description="how each pixel's light is shared among a blend's members: 'symmetric', in "
        "proportion to their symmetric, monotonic templates (tasks/stages/_templates.py); 'unet', the network's")
    template_smooth: float = Field(0.5, ge=0, description="templates 'symmetric': the Gaussian (sigma, px) that "
                                   "smooths the blend before its templates are made")
    max_stamp: int = Field(72, ge=16, description="templates 'symmetric': a blend's stamp grows from 48 px to "
                           "hold its members' light (EXTENT Kron radii about each), up to this side (px)")
    template_flux: Literal["fit", "share"] = Field(
        "fit", description="templates 'unet', weights with an image head (the members' noiseless images): 'fit', "
        "the templates' amplitudes fitted to the pixels together; 'share', each pixel's light shared in proportion "
        "to the templates")


class DeblendStage(ModelStage):
    name: ClassVar[str] = "deblend"
    # 9: the symmetric templates' brightness weights sum the bands in one flux unit (by their zero points);
    # 8: masked pixels constrain no symmetric template (a saturated star's template was empty); 7: mirror images
    # beyond the stamp read from the tile; 6: stamps grow to hold the members (max_stamp); 5: symmetric templates by
    # default; 4: bfloat16 on CPUs
    version: ClassVar[str] = "9"
    Config: ClassVar[type[StageConfig]] = DeblendConfig
    models: ClassVar[tuple[str, ...]] = ("deblend_unet",)
    reads: ClassVar[tuple[str, ...]] = ("x_tile", "y_tile", "blend_id", "n_blend")
    adds: ClassVar[tuple[str, ...]] = (
        "flux_deblend_{band}", "fluxerr_deblend_{band}", "mag_deblend_{band}", "magerr_deblend_{band}",
        "deblend_a", "deblend_b", "deblend_theta", "blendedness", "deblend_method")

    @classmethod
    def used_models(cls, config: StageConfig) -> tuple[str, ...]:
        return cls.models if config.templates == "unet" else ()  # symmetric templates need no network

    def shape_band(self, bands: list[str] | None = None) -> str:
        """The band of blendedness and shape: `ref_band`, else the weights' training reference band (i for the
        main weights), else r, else their reddest band; with symmetric templates, i, else r, else the last of
        `bands` (the tile's)."""
        if self.ref_band:
            return self.ref_band
        if self.templates == "symmetric":
            return next(b for b in ("i", "r", bands[-1]) if b in bands)
        if getattr(self, "_shape_band", None):
            return self._shape_band
        bands = self.model_bands()
        ref = (self.training_record().get("blend_config") or {}).get("reference_band")
        self._shape_band = next(b for b in (ref, "r", bands[-1]) if b in bands)
        return self._shape_band

    def required_bands(self) -> list[str] | None:
        if self.templates == "symmetric":
            return [self.ref_band] if self.ref_band else None  # any bands
        return list(dict.fromkeys([*self.model_bands(), self.shape_band()]))

    def ensure_setup(self) -> None:
        if self.templates == "unet":
            super().ensure_setup()
        elif getattr(self, "size", None) is None:
            self.setup(self.device)

    def setup(self, device: str) -> None:
        if self.templates == "symmetric":  # no network: the tile's bands, the network's stamp size
            self.device, self.size, self.bands = device, 48, None
            return
        from deepfield.models.inference import cpu_precision, for_inference
        super().setup(device)
        self.model = for_inference(self.model)  # batch norms folded, channels-last: 40 % less CPU time
        # bfloat16: 2.2-2.6x faster on AVX512-BF16 or AMX cores, fractions within 0.006 of float32's
        self.arithmetic = cpu_precision(self.model, ("",), self.precision, device)
        cfg = self.model.training_info.get("blend_config", {})
        self.size = int(cfg.get("size", 48))
        self.bands = list(cfg.get("bands", ["g", "r", "i", "z"]))

    def run(self, tile, sources: pd.DataFrame) -> pd.DataFrame:
        self.ensure_setup()
        from deepfield.models.deblend_unet import fit_fluxes, fractions, member_images, member_inputs, share
        bands = self.bands or list(tile.bands)
        self.require(sources, bands)
        out = sources.copy()
        n = len(out)
        idx = [tile.bands.index(b) for b in bands]
        ref = bands.index(self.shape_band(bands))
        s, c = self.size, (self.size - 1) / 2.0
        ny, nx = tile.image.shape[1:]
        image = tile.image[idx].astype(np.float32)
        bad = (tile.mask[idx] & UNUSABLE) != 0
        image = np.where(bad, 0.0, image).astype(np.float32)
        var = np.where(tile.invvar[idx] > 0, 1.0 / np.maximum(tile.invvar[idx], 1e-30), 0.0)
        sigma = np.array([1.0 / np.sqrt(np.median(v[v > 0])) if np.any(v > 0) else 1.0  # the network's scale
                          for v in tile.invvar[idx]], np.float32) if self.templates == "unet" else None
        method = np.full(n, "isolated", object)
        flux = np.full((n, len(idx)), np.nan)
        ferr = np.full((n, len(idx)), np.nan)
        shape = np.full((n, 3), np.nan)
        blended = np.zeros(n)
        for j, b in enumerate(bands):
            if f"flux_auto_{b}" in out.columns:
                flux[:, j] = out[f"flux_auto_{b}"].to_numpy(float)
                ferr[:, j] = out[f"fluxerr_auto_{b}"].to_numpy(float)
        x, y = out["x_tile"].to_numpy(float), out["y_tile"].to_numpy(float)
        jobs = []  # (rows of one stamp, the rows among them it measures, stamp, variance stamp)
        inputs = []
        groups = out.index[out["n_blend"].to_numpy() >= 2]
        grow = self.templates == "symmetric" and self.max_stamp > s
        reach = (EXTENT * out["kron_radius"].to_numpy(float) * out["a"].to_numpy(float)
                 if grow and {"kron_radius", "a"} <= set(out.columns) else np.zeros(n))
        reach = np.nan_to_num(reach, nan=0.0)

        def side(rows, cx: float, cy: float) -> int:
            """The stamp side for members `rows` about (cx, cy): the base size, or with `max_stamp` larger, what
            holds every member's light (its offset plus `reach`, and the 6 px margin), in steps of 8 px."""
            if not grow:
                return s
            need = 2 * (np.max(np.maximum(np.abs(x[rows] - cx), np.abs(y[rows] - cy)) + reach[rows]) + 6)
            return int(min(self.max_stamp, max(s, 8 * np.ceil(need / 8))))

        def at_edge(cx: float, cy: float) -> bool:  # a stamp centred here would leave the tile arrays
            return cx < s / 4 or cy < s / 4 or cx > nx - s / 4 or cy > ny - s / 4

        seg = tile.meta.get("segmap") if self.mask_others else None
        seg_ids = out["seg_id"].to_numpy(np.int64) if seg is not None and "seg_id" in out.columns else None
        if seg_ids is not None and seg.shape != (ny, nx):
            seg_ids = None

        def add_job(rows: list[int], measured: list[int], cx: float, cy: float, size: int = s) -> None:
            x0, y0 = int(np.rint(cx - (size - 1) / 2.0)), int(np.rint(cy - (size - 1) / 2.0))
            centres = np.c_[y[rows] - y0, x[rows] - x0]
            # symmetric templates: the stamp with a margin holding the mirror image of its every pixel about
            # every member (less than a stamp's side: the members lie on the stamp)
            pad = mirror_pad(size, centres) if self.templates == "symmetric" else 0
            grown = cut_stamp(image, y0 - pad, x0 - pad, size + 2 * pad)
            inner = (slice(pad, pad + size), slice(pad, pad + size))
            vstamp = cut_stamp(var, y0, x0, size)
            if seg_ids is not None:  # other detections' light: not the members' to share
                sgrown = cut_stamp(seg, y0 - pad, x0 - pad, size + 2 * pad)
                other = (sgrown > 0) & ~np.isin(sgrown, seg_ids[rows])
                grown = np.where(other, 0.0, grown).astype(np.float32)
                vstamp = np.where(other[inner], 0.0, vstamp)
            stamp = np.ascontiguousarray(grown[(slice(None),) + inner])
            if self.templates == "unet":
                inputs.append(member_inputs(stamp, sigma, centres))
            unknown = cut_stamp(bad, y0 - pad, x0 - pad, size + 2 * pad) if self.templates == "symmetric" else None
            jobs.append((rows, measured, stamp, vstamp, centres, grown if pad else None, unknown))
            method[measured] = self.templates

        for bid, members in out.loc[groups].groupby("blend_id").groups.items():
            rows = [out.index.get_loc(r) for r in members]
            cx, cy = float(np.mean(x[rows])), float(np.mean(y[rows]))
            big = side(rows, cx, cy)
            if len(rows) <= self.max_members and np.max(np.abs(x[rows] - cx)) <= big / 2 - 6 \
                    and np.max(np.abs(y[rows] - cy)) <= big / 2 - 6 and not at_edge(cx, cy):
                add_job(rows, rows, cx, cy, big)
                continue
            # a group too large or too spread out for one stamp: a stamp centred on each member, deblended among
            # the members whose centres it holds (at most max_members, the nearest)
            rows = np.asarray(rows)
            for r in rows:
                if at_edge(x[r], y[r]):
                    method[r] = "auto_fallback"
                    continue
                d = np.maximum(np.abs(x[rows] - x[r]), np.abs(y[rows] - y[r]))
                order = np.argsort(d, kind="stable")[:self.max_members]
                near = [int(k) for k in rows[order][d[order] <= c]]
                add_job(near, [int(r)], x[r], y[r], side(near, x[r], y[r]))
        if jobs:
            if inputs:
                out_all = fractions(self.model, np.concatenate(inputs), batch=self.inference_batch(),
                                    device=self.device)
            image_head = self.templates == "unet" and getattr(self.model, "output", "fraction") == "image"
            # the templates' brightness weights sum the members' light over the bands in one unit
            scale = band_unit_scales(tile)
            k0 = 0
            for rows, measured, stamp, vstamp, centres, grown, unknown in jobs:
                if self.templates == "symmetric":  # masked pixels: no measurement, no constraint on the templates
                    frac = template_fractions(stamp, centres, self.template_smooth, grown, unknown=unknown,
                                              band_scale=scale)
                else:
                    net = out_all[k0:k0 + len(rows)]
                    k0 += len(rows)
                    if not image_head:
                        frac = share(net)  # each pixel's light goes to the members, once
                    else:
                        tmpl = member_images(net, sigma)  # templates of the members' light
                        if self.template_flux == "fit":  # their amplitudes fitted to the pixels together
                            fit_flux, fit_err, amp = fit_fluxes(tmpl, stamp, vstamp)
                        else:  # in proportion to the templates wherever they have light
                            frac = share(tmpl, floor=0.0)
                for k, r in enumerate(rows):
                    if r not in measured:  # a neighbour on another member's own stamp
                        continue
                    if image_head and self.template_flux == "fit":
                        if not np.isfinite(fit_err[k]).all():  # the network drew no template in some band
                            method[r] = "auto_fallback"  # its Kron fluxes stay
                            continue
                        child = tmpl[k] * amp[k][:, None, None].astype(np.float32)
                        flux[r], ferr[r] = fit_flux[k], fit_err[k]
                    else:
                        child = frac[k] * stamp
                        flux[r] = child.sum(axis=(1, 2))
                        ferr[r] = np.sqrt((frac[k] ** 2 * vstamp).sum(axis=(1, 2)))
                    cpos, tpos = np.clip(child[ref], 0, None), np.clip(stamp[ref], 0, None)
                    denom = (cpos * tpos).sum()
                    # no light of its own left (its template empty: all of it taken by brighter members): buried
                    blended[r] = 1.0 - (cpos ** 2).sum() / denom if denom > 0 else 1.0
                    shape[r] = _moments(cpos)
        for j, b in enumerate(bands):
            zp = tile.zeropoints[tile.bands.index(b)]
            out[f"flux_deblend_{b}"] = flux[:, j]
            out[f"fluxerr_deblend_{b}"] = ferr[:, j]
            mag, magerr = magnitudes(flux[:, j], ferr[:, j], zp)
            out[f"mag_deblend_{b}"] = mag
            out[f"magerr_deblend_{b}"] = magerr
        iso = method != self.templates
        shape[iso] = np.c_[out["a"].to_numpy(float), out["b"].to_numpy(float), out["theta"].to_numpy(float)][iso] \
            if {"a", "b", "theta"} <= set(out.columns) else np.nan
        out["deblend_a"], out["deblend_b"], out["deblend_theta"] = shape[:, 0], shape[:, 1], shape[:, 2]
        out["blendedness"] = np.where(method == "isolated", 0.0, np.where(method == self.templates, blended, np.nan))
        out["deblend_method"] = pd.array(method.astype(str), dtype="string")
        return out
