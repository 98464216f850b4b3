"""Source detection on a multi-band detection image: SEP footprints (Barbary 2016), split into sources by a learned
detector (the default) or by SEP's deblending.

The detection image is the inverse-variance weighted mean of the (background-subtracted) bands,
det = sum_b w_b img_b / sum_b w_b with w_b = invvar_b on unmasked pixels, whose 1-sigma noise is
1 / sqrt(sum_b w_b); pixels with no unmasked band are masked.

Footprints: `sep.extract` at `thresh` sigma (in units of the unfiltered pixel noise, as in Source Extractor)
after filtering with a Gaussian of the PSF FWHM. With `measure_noise` (default) the pixel noise is first scaled
by the filtered image's measured noise over what white noise would give (`_pixels.filtered_snr`:
1.00 for independent pixels, about 1.4 for a bilinearly resampled coadd whose inverse variance matches its
pixel scatter), so the threshold means the same false-detection rate on any image; footprints of at least `minarea` pixels, deblending off
(deblend_cont = 1). Its segments are the parent footprints, the blend groups. They are split into sources by
`method`:

- `learned` (default): the learned detector (models/detect_net.py, trained on scenes composed from rendered
  galaxies) computes its centre heat map over the tile; its peaks (local maxima at or above `peak_threshold`,
  default the threshold chosen at training) inside a parent footprint are that footprint's sources; of two peaks
  whose centres (with the offsets) lie within `merge_radius` PSF FWHM (0.7), only the higher is kept. A footprint
  with two or more peaks is split among them by a watershed of the PSF-filtered detection image seeded at the
  peaks (scikit-image); each child's centre is its peak (with the network's sub-pixel offset), its shape the
  second moments of the detection image over its part of the footprint, its flag sep.OBJ_MERGED. A footprint
  with no peak is kept as one source when the heat map reaches `confirm_threshold` inside it or when it covers
  at least `keep_area` PSF FWHM^2 (a large object is never dropped), and dropped otherwise (noise and
  artefacts the network was taught to ignore). A peak on pixels with no usable band outside every footprint, in a
  region that one footprint rings (a saturated star's masked core, with or without a bleed trail:
  _saturated_cores.py, `masked_cores`; footprints on either side of a trail that cuts the star's halo, each
  holding a good share of the core's border, are joined into one) is that footprint's peak, at the star's centre,
  the region flooded as the footprint's brightest in the watershed. A region of saturated pixels (any band, bleed trails left out) with no peak within two PSF FWHM
  gets one at its core (`saturated_seeds`: a star saturated in some bands only leaves holes in some of the
  detector's channels and can stay under its threshold). With `outside_peaks`, a peak outside every footprint is a
  source of its own (footprint: the pixels within one PSF FWHM of the peak, its own blend group). The network runs
  on any subset of the bands it was trained on (a missing band is a channel of zeros, as in training), and only
  over the part of the tile the core's sources need: the core, the footprints that reach it and the network's
  reach about them (tasks/stages/_learned_split.py: `network_box`; the heat map there is the whole tile's to the
  bit, the primary sources the same; about 0.93 of a 640^2 tile's pixels on simulated fields, whose footprints
  reach far into the halo); the footprints of the halo alone are then kept whole.
- `sep`: `sep.extract` again inside the parent footprints only, with a narrow filter (Gaussian of
  `deblend_filter_scale` x PSF FWHM; 0 = none) and multi-threshold deblending (`deblend_nthresh` levels,
  minimum contrast `deblend_cont`). A PSF-wide filter merges two point sources closer than ~1.7 FWHM into one
  peak; the narrow one keeps pairs 1.5 FWHM apart resolved. Each child goes to the parent segment holding
  most of its pixels (else the one at its centroid pixel; tasks/stages/_sep_split.py).

A parent with at most one source is reported as itself (the footprint's centroid, shape and footprint; with the
learned method and `peak_centres`, centred on its one peak: tasks/stages/_learned_split.py, `peak_centres`); a
parent with two or more is replaced by them. With `reject_sharp` (default), a detection whose light is sharper
than the band's PSF in one band and absent from the others (an unrejected cosmic ray or a hot pixel:
tasks/stages/_artefacts.py) is left out; its pixels keep a segmap value above the row count, so measure and
deblend treat them as another detection's. `blend_id` is the parent's index (unique within the tile),
`n_blend` the rows sharing it, `is_blended` = n_blend > 1.

Output columns (one row per detection, ordered by blend_id):
  x, y              centroid in the FIELD frame, pixels (x_tile + box.x0, y_tile + box.y0)
  x_tile, y_tile    centroid in the halo arrays, pixels (pixel centres at integers)
  a, b, theta       isophotal semi-axes (pixels) and position angle (radians, counter-clockwise
                    from +x, in (-pi/2, pi/2]), SEP convention
  npix              pixels in the isophotal footprint (of the deblending pass for children,
                    so it can be smaller than the row's share of `segmap`)
  xmin_tile ... ymax_tile  footprint bounding box in the halo arrays (inclusive)
  flux_det, peak_det  isophotal flux and peak on the detection image (image units)
  det_flag          SEP object flags (sep.OBJ_MERGED, OBJ_TRUNC, OBJ_DOVERFLOW, OBJ_SINGU)
  seg_id            value of the detection in `DetectStage.segmap` (row index + 1)
  blend_id, n_blend, is_blended   blend group (see above)
  is_primary        the centroid's pixel, floor(coord + 0.5), lies in the tile core
"""
from __future__ import annotations

import logging
from typing import ClassVar, Literal, Optional

import numpy as np
import pandas as pd
import sep
from pydantic import Field

from .. import maskbits
from ._learned_split import fill_thin_defects, network_box, saturated_seeds, split_by_peaks, thin_defects
from ._pixels import (DEFAULT_FWHM_PX, UNUSABLE, band_fwhm_pixels, configure_sep, filtered_snr, fwhm_pixels,
                      gaussian_kernel, tile_detection_image)
from ._detect_table import COLUMNS, detections_table, empty_table, without_rows
from ._sep_split import split_by_sep
from .base import ModelStage, ModelStageConfig, StageConfig

__all__ = ["DetectStage", "DetectConfig", "COLUMNS", "INT8_KEY"]


log = logging.getLogger(__name__)
INT8_KEY = "int8_calibration"  # the detector's weights file: int8 activation ranges (detect_net.int8_calibration)


class DetectConfig(ModelStageConfig):
    method: Literal["sep", "learned"] = Field("learned", description="how parent footprints are split into sources: "
                                              "SEP's multi-threshold deblending or the learned detector's peaks")
    peak_threshold: Optional[float] = Field(None, gt=0, lt=1, description="learned: least heat-map peak that "
                                            "is a source; none: the threshold chosen at training")
    merge_radius: float = Field(0.7, ge=0, description="learned: two peaks whose centres (with the network's "
                                "sub-pixel offsets) lie within this many PSF FWHM are one source (the higher "
                                "peak): closer than the seeing resolves, most are one galaxy seen twice")
    confirm_threshold: float = Field(0.3, ge=0, le=1, description="learned: a footprint without a peak is kept "
                                     "when its heat map reaches this (0 keeps every footprint)")
    keep_area: float = Field(10.0, ge=0, description="learned: a footprint without a peak is kept whatever its "
                             "heat map when it covers at least this many PSF FWHM^2 (a large object is never "
                             "dropped)")
    outside_peaks: bool = Field(True, description="learned: a peak outside every footprint is a source too, "
                                "with a footprint of the pixels within one PSF FWHM")
    peak_centres: bool = Field(True, description="learned: a footprint with one peak is centred on the peak, not "
                               "on its barycentre, when the peak lies within two PSF FWHM of the barycentre and "
                               "no pixel of the footprint is unusable in any band, a one-pixel defect interpolated "
                               "for the network excepted (a faint neighbour merged into the footprint pulls the "
                               "barycentre off the galaxy)")
    precision: Literal["int8", "float32"] = Field("int8", description="learned: the detector's arithmetic on a "
                                                  "CPU; int8 (post-training quantisation with the activation "
                                                  "ranges saved in the weights) takes about a quarter of float32's "
                                                  "time. A GPU, and weights without int8 ranges, run float32")
    int8_engine: Literal["onednn", "x86", "fbgemm"] = Field(
        "onednn", description="learned, int8: PyTorch's quantized engine for the int8 network. onednn: oneDNN's "
        "kernels, which torch's default engine (x86) picks itself on CPUs with AVX-512 VNNI; without VNNI x86 "
        "takes fbgemm's, half as fast for this network on an AVX2 AMD EPYC (detect stage 1.3-1.5 -> 0.9 core-s "
        "per Mpx, the same detections to a few in a thousand)")
    thresh: float = Field(1.5, gt=0, description="detection threshold in units of the detection image's noise")
    measure_noise: bool = Field(True, description="scale the detection image's noise (1 / sqrt(sum of invvar)) by "
                                "the measured noise of the filtered image over the white-noise value, so that "
                                "correlated noise (a resampled coadd) gives white noise's false-detection rate")
    minarea: int = Field(5, ge=1, description="minimum footprint in pixels")
    deblend_nthresh: int = Field(32, ge=1, description="SEP multi-threshold deblending levels")
    deblend_cont: float = Field(0.005, ge=0, le=1, description="SEP deblending minimum contrast")
    clean: bool = Field(True, description="SEP's removal of spurious detections in the wings of bright ones")
    clean_param: float = Field(1.0, description="SEP's cleaning parameter")
    filter_fwhm: Optional[float] = Field(None, gt=0, description="FWHM (pixels) of the Gaussian detection filter; "
                                         "none: the tile's PSF FWHM")
    deblend_filter_scale: float = Field(0.25, ge=0, description="FWHM of the deblending pass's Gaussian filter "
                                        "in units of the PSF FWHM (0: no filter)")
    default_fwhm_px: float = Field(DEFAULT_FWHM_PX, gt=0, description="PSF FWHM (pixels) assumed when the tile gives "
                                   "none")
    merge_rings: bool = Field(True, description="a ring galaxy (an enclosed depression of the light with an even "
                              "rim: the anomaly stage's ring term) is one source: the detections of its footprint "
                              "within 1.2 ring radii of its centre are joined (tasks/stages/_ring_merge.py)")
    reject_sharp: bool = Field(True, description="drop detections whose light is sharper than the PSF in one band "
                               "and absent from the others (unrejected cosmic rays, hot pixels; "
                               "tasks/stages/_artefacts.py); their pixels stay masked for the other sources")
    sharp_snr: float = Field(6.0, gt=0, description="reject_sharp: least S/N of a pixel's excess over its "
                             "neighbours beyond what the band's PSF allows")
    sharp_other_snr: float = Field(3.0, gt=0, description="reject_sharp: a detection whose matched-filter S/N "
                                   "reaches this in another band is a source (a cosmic ray on a galaxy is kept)")


class DetectStage(ModelStage):
    """Detect and deblend sources on the inverse-variance weighted band mean (parameters: DetectConfig).

    After `run`, `segmap` ((y, x) int32 over the halo arrays, 0 = sky, k = row k-1, above the row count: a
    left-out artefact) and
    `parent_segmap` (the un-deblended footprints) hold the last tile's segmentation; `segmap` is also left in
    `tile.meta["segmap"]` for the stages after this one (measure masks neighbours with it).
    """

    name: ClassVar[str] = "detect"
    # 14: a saturated star's halo cut in pieces by its bleed trail is one footprint, the masked core inside its
    # footprint's box (masked_cores); 13: the detection image in one flux unit (bands of other zero points weighed
    # by their noise in it, _pixels.detection_image); 12: the pixels that two peaks outside every footprint share
    # go to the nearer one (_outside_sources);
    # 11: a ring galaxy's detections joined (merge_rings); 10: the network over the part of the tile the core
    # needs (the primary sources as before, the halo's own footprints kept whole); 9: a thin defect (interpolated
    # for the network) no longer keeps a footprint from its peak's centre; 8: masked cores with bleed trails;
    # 7: saturated regions seed sources; 6: a peak in a saturated star's masked core, ringed by its footprint, is
    # the star's; 5: peak_centres
    version: ClassVar[str] = "14"
    Config: ClassVar[type[StageConfig]] = DetectConfig
    models: ClassVar[tuple[str, ...]] = ("detect_net",)
    adds: ClassVar[tuple[str, ...]] = tuple(COLUMNS)

    def __init__(self, config: StageConfig | None = None, **params) -> None:
        super().__init__(config, **params)
        self.segmap: np.ndarray | None = None
        self.parent_segmap: np.ndarray | None = None

    def required_bands(self) -> list[str] | None:
        return None  # any bands: SEP uses them all, the learned detector any subset of its own

    def band_problem(self, have: list[str]) -> str | None:
        if self.method != "learned":
            return None
        bands = self.model_bands()
        if not set(bands) & set(have):
            return (f"the learned detector takes bands {', '.join(bands)} and needs at least one of them "
                    "(or set method: sep)")
        return None

    def setup(self, device: str) -> None:
        """Load the learned detector when `method` is learned; SEP runs on the CPU whatever `device` is."""
        self.device = device
        if self.method == "learned":
            from deepfield.models.inference import for_inference
            super().setup(device)
            self.model = self._int8() or for_inference(self.model)

    def _int8(self):
        """The int8 detector when `precision` is int8 on a CPU and the weights carry int8 activation ranges,
        else None (float32, with a warning when int8 was asked for and the weights cannot give it)."""
        if self.precision != "int8" or not str(self.device).startswith("cpu"):
            return None
        cal = self.model.training_info.get(INT8_KEY)
        if cal is None:
            log.warning("detect: the detector's weights carry no int8 activation ranges (`deepfield train detect "
                        "--calibrate-only` adds them); running float32")
            return None
        import warnings

        import torch
        from deepfield.models.detect_net import int8_cached
        from deepfield.models.registry import user_cache_dir
        if self.int8_engine in torch.backends.quantized.supported_engines:
            # the engine packs the weights when the network is built or loaded; the packed weights then run with
            # their own kernels whatever the process's engine is later
            torch.backends.quantized.engine = self.int8_engine
        else:
            log.warning(f"detect: this torch ({torch.__version__}) has no quantized engine {self.int8_engine!r}; "
                        f"running the int8 detector with {torch.backends.quantized.engine!r}")
        with warnings.catch_warnings():  # torch's notices on its quantised-tensor API, not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return int8_cached(self.model, cal, user_cache_dir() / "torch")
            except (ImportError, AttributeError, NotImplementedError, RuntimeError) as exc:
                # torch.ao.quantization is deprecated upstream (torchao replaces it); the pinned torch 2.13 has
                # it, another build may not
                log.warning(f"detect: this torch ({torch.__version__}) cannot run the int8 detector ({exc}); "
                            "running float32")
                return None

    def _peaks(self, tile, fwhm: float, region: tuple[int, int, int, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The learned detector's peaks ((n, 3) x, y, p in the halo arrays), heat map over the tile (0 beyond
        `region`, _learned_split.network_box's, where the network ran) and the pixels where it ran (None: the whole
        tile); `fwhm`: the tile's reference PSF FWHM in pixels (merge_radius is in its units)."""
        from deepfield.models.detect_net import detector_input, find_peaks, heat_and_offsets
        if self.model is None:
            self.setup(self.device)
        bands = self.model.bands
        if not set(bands) & set(tile.bands):
            raise ValueError(f"detect: the learned detector takes bands {', '.join(bands)}; tile {tile.id} has "
                             f"{', '.join(tile.bands)} (set method: sep for these bands)")
        full = tuple(tile.image.shape[1:])
        y0, y1, x0, x1 = region or (0, full[0], 0, full[1])
        sl = (slice(y0, y1), slice(x0, x1))
        shape = (len(bands), y1 - y0, x1 - x0)
        image, invvar = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        unusable = np.ones(shape, bool)
        for j, b in enumerate(bands):
            if b in tile.bands:
                k = tile.bands.index(b)
                image[j], invvar[j] = tile.image[k][sl], tile.invvar[k][sl]
                mask = np.asarray(tile.mask[k][sl])
                unusable[j] = (mask & UNUSABLE) != 0
                fill_thin_defects(image[j], invvar[j], unusable[j], (mask & maskbits.BAD) != 0)
        heat, off = heat_and_offsets(self.model, detector_input(image, invvar, unusable), self.device)
        thr = self.peak_threshold or float(self.model.training_info.get("threshold", 0.4))
        peaks = find_peaks(heat, off, thr, self.merge_radius * fwhm)
        if region is None:
            return peaks, heat, None
        peaks[:, 0] += x0
        peaks[:, 1] += y0
        whole = np.zeros(full, heat.dtype)
        whole[sl] = heat
        known = np.zeros(full, bool)
        known[sl] = True
        return peaks, whole, known

    def _extract(self, det, noise, bad, kernel, deblend_cont: float):
        # filter_type "conv": the threshold is `thresh` times the unfiltered pixel noise, as in
        # Source Extractor (SEP's "matched" would threshold the filtered S/N map instead)
        return sep.extract(det, self.thresh, err=noise, mask=bad, minarea=self.minarea,
                           filter_kernel=kernel, filter_type="conv",
                           deblend_nthresh=self.deblend_nthresh, deblend_cont=deblend_cont,
                           clean=self.clean, clean_param=self.clean_param, segmentation_map=True)

    def run(self, tile, sources: pd.DataFrame | None = None) -> pd.DataFrame:
        """Detect sources on `tile`; returns a new table (the incoming `sources` is not used)."""
        det, noise, bad = tile_detection_image(tile)
        configure_sep(det.size)
        fwhm = fwhm_pixels(tile, self.default_fwhm_px)
        # the threshold in units of the filtered image's measured noise: a resampled coadd's correlated
        # noise (or a noise map off by a factor) then gives the false-detection rate of white noise
        scale, noise0 = 1.0, noise
        if self.measure_noise:
            # the filtered S/N map, in units of its measured noise, is the anomaly stage's too (its ring term)
            tile.meta["detection_snr"], scale = filtered_snr(det, noise, bad, self.filter_fwhm or fwhm)
        tile.meta["detect_noise_scale"] = scale
        noise = noise * scale
        kernel = gaussian_kernel(self.filter_fwhm or fwhm)
        dfwhm = self.deblend_filter_scale * fwhm
        dkernel = gaussian_kernel(dfwhm) if dfwhm > 0 else None
        try:
            parents, pseg = self._extract(det, noise, bad, kernel, 1.0)
            if self.method == "sep":
                children, cseg = self._extract(det, noise, bad | (pseg == 0), dkernel, self.deblend_cont)
        except Exception as exc:  # SEP raises bare Exceptions (pixel buffer full, deblending overflow)
            raise RuntimeError(f"detect: SEP extraction failed on tile {getattr(tile, 'id', '?')}: {exc}") from exc
        self.parent_segmap = pseg
        if len(parents) == 0:
            self.segmap = np.zeros_like(pseg)
            tile.meta["segmap"] = self.segmap
            return empty_table()
        if self.method == "learned":
            peaks, heat, known = self._peaks(tile, fwhm, network_box(tile, pseg, 2.0 * fwhm))
            unusable, saturated = self._mask_planes(tile, bad)
            peaks = saturated_seeds(peaks, heat, saturated, 2.0 * fwhm)
            objs, blend_id, self.segmap = split_by_peaks(det, kernel, parents, pseg, peaks, heat,
                                                         self.confirm_threshold, self.keep_area * fwhm ** 2,
                                                         fwhm if self.outside_peaks else None, bad,
                                                         2.0 * fwhm if self.peak_centres else 0.0, unusable,
                                                         known=known)
            tile.meta["segmap"] = self.segmap
        else:
            objs, blend_id, self.segmap = split_by_sep(parents, pseg, children, cseg)
            tile.meta["segmap"] = self.segmap
        table = self._rings_merged(tile, detections_table(tile, objs, blend_id), det, noise0, bad, fwhm, scale)
        return self._without_artefacts(tile, table)

    def _rings_merged(self, tile, table: pd.DataFrame, det, noise, bad, fwhm: float, scale: float) -> pd.DataFrame:
        """The table with each ring galaxy's detections joined into one (merge_rings; _ring_merge.py); keeps the
        rings found in `tile.meta["detect_rings"]` ((reach, rim), (x, y, depth)) for the anomaly stage's ring
        term, and their number in `tile.meta["detect_rings_merged"]`."""
        from ._ring_merge import REACH, RIM, merge_rings
        from ._rings import ring_search
        tile.meta["detect_rings_merged"] = 0
        if not self.merge_rings or table.empty:
            return table
        snr = tile.meta.get("detection_snr")
        if snr is None:
            snr, scale = filtered_snr(det, noise, bad, fwhm)
        rings = ring_search(snr, det, noise, bad, fwhm, scale, REACH, RIM, gaussian_kernel(fwhm).shape[0] // 2)
        tile.meta["detect_rings"] = ((REACH, RIM), rings)
        table, self.segmap, n = merge_rings(table, self.segmap, det, snr, rings, tile.core)
        tile.meta["segmap"] = self.segmap
        tile.meta["detect_rings_merged"] = n
        return table

    @staticmethod
    def _mask_planes(tile, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """From one pass over the bands' masks: the pixels unusable in any band (an UNUSABLE mask bit or no
        positive inverse variance; not a thin defect the detector saw interpolated, fill_thin_defects) or in all
        (`bad`, the detection image's), for peak_centres; and the pixels saturated in any band outside flagged
        bleed trails, for saturated_seeds."""
        unusable, saturated = bad.copy(), np.zeros(bad.shape, bool)
        for b in range(tile.image.shape[0]):
            m = np.asarray(tile.mask[b])
            u = ((m & UNUSABLE) != 0) | ~(np.asarray(tile.invvar[b]) > 0)
            thin = thin_defects(u, (m & maskbits.BAD) != 0)
            if thin is not None:  # a bad column or pixel: the detector's peak near it is as good as elsewhere
                u &= ~thin
            unusable |= u
            saturated |= ((m & maskbits.SAT) != 0) & ((m & maskbits.BLEED) == 0)
        return unusable, saturated

    def _without_artefacts(self, tile, table: pd.DataFrame) -> pd.DataFrame:
        """The table without the detections that are artefacts (reject_sharp; tasks/stages/_artefacts.py). The
        rows left are numbered again (seg_id, segmap 1..n); an artefact's pixels take values above n, so the
        stages after this one mask them as another detection's; blend groups are counted again."""
        from ._artefacts import artefacts, sharp_and_present
        tile.meta["detect_artefacts"] = 0
        if not self.reject_sharp or table.empty:
            return table
        fwhm = [self.default_fwhm_px if f is None else f for f in band_fwhm_pixels(tile)]
        sharp, present = sharp_and_present(tile, table.x_tile.to_numpy(), table.y_tile.to_numpy(), fwhm,
                                           only_sharp=self.sharp_snr)
        drop = artefacts(sharp, present, self.sharp_snr, self.sharp_other_snr)
        if not drop.any():
            return table
        out, self.segmap = without_rows(table, self.segmap, drop)
        tile.meta["segmap"] = self.segmap
        tile.meta["detect_artefacts"] = int(drop.sum())
        log.debug("detect: tile %s: %d detection(s) sharper than the PSF in one band only left out",
                  getattr(tile, "id", "?"), int(drop.sum()))
        return out
