"""Galaxy-cluster finding on binned multi-band images (models/cluster_net.py), in the spirit of YOLO-CL
(Grishin et al. 2023): the network sees a cluster as a concentration of galaxies of one colour, not a
list of sources.

The network runs once per field, not once per tile: the stage bins the tile's whole field from the store
(`field_planes`, a strip at a time), 8 x 8 (1.6" pixels) and scaled (`planes_from_sums`), extends the planes by
`halo_arcsec` (128") on each side (`extend_planes`), runs the network on the whole (`detect_planes`) and keeps
the detections; each tile of the field takes those whose position lies in its core. The run's own halo (64 px
= 13") is far smaller than a cluster, so the stage reads its pixels itself.

Once per field for the whole run, not per actor: the tiles of a field go to several actors, and each actor
binning the whole field (and its neighbours) again cost the run up to (actors - 1) times the work, a field read
at full resolution each (about 0.5 core-s for a 2048^2 field in four bands). Inside a run (`shared_dir`, the run
directory's cache/cluster, and the driver handing out the fields' tiles in turn: tasks/actor_pool.py) the first
actor to need a field's binned planes, or its detections, computes them under the field's lock for them
(tasks.locks.waiting) and writes them atomically (`<field>/planes.<key>.npy`, `<field>/detections.<key>.npz`);
the others wait for the lock and read them. The keys are hashes of everything the files depend on: the
completion records of the field and, for the detections, of every neighbour within `halo_arcsec` (a re-ingest
makes a new key), the model's bands and binning, the stage's configuration and version, the weights file's
content (detections) and deepfield's version. A file that cannot be read is computed again; a directory that
cannot be locked or written is a warning, and the actor computes for itself. Outside a run (no `shared_dir`)
they are computed once per stage object.

Across field edges: the extension is filled from the other complete fields of the same store that cover that
sky (neighbours that overlap or adjoin the field), each binned whole as its own tiles see it and resampled
onto the field's binned grid by the WCS (nearest binned pixel); where no field covers, the planes are 0
(coverage 0), as beyond a field's edge in training (models.cluster_net.window). So a cluster on a field's
edge is seen whole, and one in the overlap of two fields may be found by both: the merge suppresses the
duplicate on the sky. The binned planes of the fields are cached per actor (`PLANES_CACHE_BYTES`), so a
field binned as a neighbour is not binned again for its own tiles.

Why 128": the red members that make a cluster visible are concentrated within ~0.5 Mpc of its centre,
which is 80" at z = 0.5 and 110" at z = 0.3, so a cluster centred anywhere in the field has its inner
members inside the planes from z ~ 0.25 on; the network's coarsest level (51" pixels) sees that scale.

A very large field (planes with their halo over `MAX_SIDE` = 4096 binned pixels a side, a 32768 px field)
runs in blocks, so that the network's memory stays bounded (about 3 GB at 4096^2 binned pixels): block
cores of `MAX_SIDE - 2 * BLOCK_HALO` binned pixels, each seen with `BLOCK_HALO` (80 binned pixels, 128")
around it, keep the detections in their cores. The network reaches a little beyond 80 binned pixels, so
blocks find what the whole would to about 0.2 binned pixels and 0.05 in score (measured on 2048^2 px
fields cut into blocks of 96 binned pixels).

Every peak of the network's centre heat map (one map per redshift slice: two clusters on one line of sight
are two peaks) above `threshold` whose position lies in the tile's core becomes a row of the tile's cluster
table (`tile.tables["clusters"]`, written by the tile runner to `tiles/<field>/<ty>_<tx>.clusters.parquet`):
field and tile, x and y (field pixels), ra and dec (degrees), `score` (the heat-map peak, 0-1), `z` (the
network's redshift) and `richness` (its estimate of lambda, members brighter than 0.2 L* within R_lambda,
calibrated against the simulator's count). The stage's merge step (catalogs/clusters.py) suppresses the same
cluster seen from several tiles or fields and assigns members. The source table passes through unchanged.

A tile's result depends on the neighbouring fields within `halo_arcsec` (`sky_reach_arcsec`): the run's input
key of a field covers them (tasks/provenance.py), so re-ingesting a neighbour redoes the field's tiles.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from pydantic import Field

from ._pixels import UNUSABLE
from ..zarr_sky import field_footprint, field_wcs, fields_near
from ..zarr_store import fields_attrs
from .base import ModelStage, ModelStageConfig, StageConfig

__all__ = ["BACKGROUND_MESH", "BLOCK_HALO", "MAX_SIDE", "SOFTENING", "ClusterConfig", "ClusterStage", "binned_planes",
           "detect_planes", "extend_planes", "field_planes", "field_sums"]

SOFTENING = 3.0  # asinh softening, in units of the binned sky noise
SHARED_FORMAT = 1  # of the shared planes' and detections' files: bump when what they hold changes
log = logging.getLogger(__name__)
BACKGROUND_MESH = 32  # binned pixels (51" at bin 8): the smooth sky left over after the ingest's
MAX_SIDE = 4096  # binned pixels: planes larger than this on a side run through the network in blocks
BLOCK_HALO = 80  # binned pixels (128" at bin 8) around each block's core
PLANES_CACHE_BYTES = 1 << 30  # binned planes of fields kept per actor (a 2048^2 px field's are 1.3 MB)


def _block_sum(a: np.ndarray, b: int) -> np.ndarray:
    """Sum over b x b blocks of the last two axes (their lengths are multiples of b)."""
    *lead, ny, nx = a.shape
    return a.reshape(*lead, ny // b, b, nx // b, b).sum(axis=(-1, -3))


def block_sums(image: np.ndarray, invvar: np.ndarray, mask: np.ndarray, bin: int) -> np.ndarray:
    """Per band and bin x bin block: the sum of the usable pixels' values, their number and the sum of their
    inverse variances, (3, band, ny // bin, nx // bin) float64. Usable: no mask bit in UNUSABLE, invvar > 0,
    finite. Rows and columns beyond a multiple of `bin` are dropped."""
    nb, ny, nx = image.shape
    ny, nx = ny // bin * bin, nx // bin * bin
    img, iv = np.asarray(image[:, :ny, :nx]), np.asarray(invvar[:, :ny, :nx])
    good = (np.asarray(mask[:, :ny, :nx]) & UNUSABLE) == 0
    good &= iv > 0
    good &= np.isfinite(img)
    good &= np.isfinite(iv)
    # one float64 buffer for the three sums (the values and their order of summation as in float64 copies of
    # the inputs, without the copies, which cost most of the time)
    buf = np.zeros(img.shape, np.float64)
    out = np.empty((3, nb, ny // bin, nx // bin))
    np.copyto(buf, img, where=good)
    out[0] = _block_sum(buf, bin)
    np.copyto(buf, good)
    out[1] = _block_sum(buf, bin)
    buf[...] = 0.0
    np.copyto(buf, iv, where=good)
    out[2] = _block_sum(buf, bin)
    return out


def planes_from_sums(sums: np.ndarray, bin: int) -> np.ndarray:
    """Network input planes, (bands + 1, H, W) float32, from `block_sums` (module docstring of the scaling).

    Per band: the mean of each block's usable pixels, minus a smooth background (SEP on `BACKGROUND_MESH`
    binned-pixel meshes), divided by the binned sky noise (sigma / bin, sigma = 1 / sqrt of the median over
    blocks of the mean inverse variance), then asinh(x / SOFTENING). The last plane is the coverage: the
    fraction of usable pixels in the block, the least over the bands (0 outside the field or where all is
    masked, where the band planes are 0 too)."""
    import sep
    total, n, ivsum = sums
    nb, h, w = n.shape
    out = np.zeros((nb + 1, h, w), np.float32)
    if h == 0 or w == 0:
        return out
    cover = np.ones((h, w))
    for b in range(nb):
        cover = np.minimum(cover, n[b] / bin**2)
        empty = n[b] == 0
        if empty.all():
            continue
        mean = total[b] / np.maximum(n[b], 1)
        sigma = 1.0 / np.sqrt(np.median(ivsum[b][~empty] / n[b][~empty])) / bin
        mesh = min(BACKGROUND_MESH, h, w)
        bkg = sep.Background(np.ascontiguousarray(mean), mask=np.ascontiguousarray(empty), bw=mesh, bh=mesh,
                             fw=3, fh=3).back()
        out[b] = np.where(empty, 0.0, np.arcsinh((mean - bkg) / sigma / SOFTENING))
    out[nb] = cover
    out[:nb] *= cover > 0
    return out


def binned_planes(image: np.ndarray, invvar: np.ndarray, mask: np.ndarray, bin: int) -> np.ndarray:
    """Network input planes of in-memory (band, y, x) pixels (see `planes_from_sums`)."""
    return planes_from_sums(block_sums(image, invvar, mask, bin), bin)


def field_sums(group, bands: list[str], bin: int, strip: int = 512) -> np.ndarray:
    """`block_sums` of `bands` of a whole field of the store (its Zarr group), read `strip` rows at a time so
    that a large field never sits in memory at full resolution; a damaged shard is an error naming the field."""
    from ..zarr_store import read_checked, verify_shards
    field = group.path.rsplit("/", 1)[-1]
    verify_shards(group, field)
    idx = [list(group.attrs["bands"]).index(b) for b in bands]
    _, ny, nx = group.attrs["shape"]
    ny, nx = ny // bin * bin, nx // bin * bin
    step = max(strip // bin, 1) * bin
    # the bands as one slice, picked after the read: zarr reads a list of bands (orthogonal indexing) about
    # 15x slower than a slice of the same pixels
    lo, hi = min(idx), max(idx) + 1
    pick = None if idx == list(range(lo, hi)) else [i - lo for i in idx]
    parts = []
    for y0 in range(0, ny, step):  # read by TensorStore (tasks/zarr_store.py: read_checked)
        sl = (slice(lo, hi), slice(y0, min(y0 + step, ny)), slice(0, nx))
        what = f"rows {y0}-{sl[1].stop}"
        arrays = [read_checked(group, field, a, sl, what) for a in ("image", "invvar", "mask")]
        parts.append(block_sums(*(a if pick is None else a[pick] for a in arrays), bin))
    return np.concatenate(parts, axis=2)


def field_planes(group, bands: list[str], bin: int, strip: int = 512) -> np.ndarray:
    """Network input planes of a whole field of the store (its Zarr group): `planes_from_sums` of `field_sums`."""
    return planes_from_sums(field_sums(group, bands, bin, strip), bin)


def _world_to_pixel(wcs, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel coordinates of (ra, dec) in `wcs`, NaN where a distortion's inversion does not converge
    (far off the field)."""
    from astropy.wcs import NoConvergence
    try:
        x, y = wcs.all_world2pix(ra, dec, 0)
        return np.asarray(x, float), np.asarray(y, float)
    except NoConvergence as exc:
        sol = np.array(exc.best_solution, float)
        for bad in (exc.divergent, exc.slow_conv):
            if bad is not None:
                sol[bad] = np.nan
        return sol[:, 0], sol[:, 1]


def extend_planes(planes: np.ndarray, wcs, bin: int, halo: int, neighbours) -> np.ndarray:
    """`planes` (C, H, W) of a field grown by `halo` binned pixels on each side, (C, H + 2 halo, W + 2 halo):
    the field's own planes in the middle; around them, where the field has no binned pixel, the planes of the
    first of `neighbours` ((wcs, planes) of other fields, each binned whole by `field_planes`) that covers the
    spot (coverage > 0 there); 0 (coverage 0) where none does. `wcs`: the field's WCS (full-resolution
    pixels, 0-based); binned pixel (i, j) of the field holds its pixels [i bin, (i + 1) bin) x [j bin, ...).

    Nearest binned pixel: the fields of a survey share the pixel scale, so the neighbour's binned pixel that
    fills a spot is centred within half a binned pixel (0.8") of it on each axis; the network's first level
    is 3.2", its output 6.4" and a cluster's core tens of arcsec, so the shift is far below what it
    resolves, while interpolating (or reproject's flux-conserving resampling) would average neighbouring
    binned pixels, lowering their noise below the unit noise of every other binned pixel the network sees
    and was trained on."""
    c, h, w = planes.shape
    out = np.zeros((c, h + 2 * halo, w + 2 * halo), np.float32)
    out[:, halo:halo + h, halo:halo + w] = planes
    if halo == 0 or not neighbours:
        return out
    ring = np.ones(out.shape[1:], bool)
    ring[halo:halo + h, halo:halo + w] = False
    iy, ix = np.nonzero(ring)
    ra, dec = wcs.all_pix2world((ix - halo) * bin + (bin - 1) / 2.0, (iy - halo) * bin + (bin - 1) / 2.0, 0)
    for nwcs, nplanes in neighbours:
        if not len(iy):
            break
        x, y = _world_to_pixel(nwcs, ra, dec)
        with np.errstate(invalid="ignore"):
            jx, jy = np.floor((x + 0.5) / bin), np.floor((y + 0.5) / bin)  # the binned pixel holding (x, y)
        nh, nw = nplanes.shape[1:]
        ok = np.isfinite(jx) & np.isfinite(jy) & (jx >= 0) & (jx < nw) & (jy >= 0) & (jy < nh)
        jx, jy = np.where(ok, jx, 0).astype(int), np.where(ok, jy, 0).astype(int)
        ok &= nplanes[-1, jy, jx] > 0
        out[:, iy[ok], ix[ok]] = nplanes[:, jy[ok], jx[ok]]
        iy, ix, ra, dec = iy[~ok], ix[~ok], ra[~ok], dec[~ok]  # the first neighbour that covers a spot fills it
    return out


def detect_planes(model, planes: np.ndarray, threshold: float, device: str = "cpu", max_side: int = 0,
                  halo: int = 0) -> dict[str, np.ndarray]:
    """models.cluster_net.detect on `planes` (C, H, W), run at once when both sides are at most `max_side`
    (default MAX_SIDE), else in blocks: cores of max_side - 2 halo (default BLOCK_HALO) binned pixels, each
    seen with `halo` around it (zero beyond the planes), each keeping the detections in its core. Detections
    in binned pixels of `planes`, highest score first."""
    from deepfield.models.cluster_net import detect, window
    max_side, halo = max_side or MAX_SIDE, halo or BLOCK_HALO
    _, h, w = planes.shape
    if h <= max_side and w <= max_side:
        return detect(model, planes, threshold, device=device)
    core = (max_side - 2 * halo) // 4 * 4  # every block's output grid (stride 4) on the whole planes' grid
    if core <= 0 or halo % 4:
        raise ValueError(f"cluster stage: blocks of {max_side} binned px with a halo of {halo}: the halo must be a "
                         "multiple of 4 and under half the block")
    parts = []
    for y0 in range(0, h, core):
        for x0 in range(0, w, core):
            bh, bw = min(core, h - y0), min(core, w - x0)
            f = detect(model, window(planes, y0 - halo, x0 - halo, bh + 2 * halo, bw + 2 * halo), threshold,
                       device=device)
            f["x"], f["y"] = f["x"] + (x0 - halo), f["y"] + (y0 - halo)
            keep = (f["x"] >= x0 - 0.5) & (f["x"] < x0 + bw - 0.5) & (f["y"] >= y0 - 0.5) & (f["y"] < y0 + bh - 0.5)
            parts.append({k: v[keep] for k, v in f.items()})
    found = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(-found["score"], kind="stable")
    return {k: v[order] for k, v in found.items()}


def _shared(lock: Path, path: Path, compute, load, save):
    """What `compute()` returns, kept at `path` in a run's shared directory: read when it is there, else computed
    and written (atomically) by the first process to take `lock` while the others wait for it; one that cannot
    be read is computed again. Files beside it of the same kind (other keys: older inputs or configurations)
    are removed. `save(file, value)` writes to an open binary file, `load(path)` reads. A directory that cannot
    be written (read-only, full) only costs the sharing: a warning, and each process computes for itself."""
    from ..atomic import atomic_path
    from ..locks import waiting
    kind = path.name.split(".", 1)[0]
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(waiting(lock))
        except OSError as exc:
            log.warning(f"cluster: no lock in {path.parent} ({exc}); computing without the run's shared copy")
            return compute()
        if path.exists():
            try:
                return load(path)
            except Exception as exc:  # damaged: computed again below
                log.warning(f"cluster: {path} cannot be read ({type(exc).__name__}: {exc}); computing it again")
        for tmp in path.parent.glob(f".{kind}.*.tmp"):  # atomic_path's, of a writer killed holding this lock
            tmp.unlink(missing_ok=True)
        value = compute()
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                save(fh, value)
        except OSError as exc:
            log.warning(f"cluster: cannot write {path} ({exc}); the other actors compute it for themselves")
            return value
        for old in path.parent.glob(f"{kind}.*{path.suffix}"):
            if old != path:
                old.unlink(missing_ok=True)
        return value


class ClusterConfig(ModelStageConfig):
    halo_arcsec: float = Field(128.0, ge=0, description="sky around the field the network sees (filled from the "
                                                        "store's neighbouring fields), arcsec")
    threshold: float = Field(0.3, gt=0, lt=1, description="heat-map peaks above this are candidates")


class ClusterStage(ModelStage):
    name: ClassVar[str] = "cluster"
    version: ClassVar[str] = "2"
    Config: ClassVar[type[StageConfig]] = ClusterConfig
    models: ClassVar[tuple[str, ...]] = ("cluster_net",)
    side_tables: ClassVar[tuple[str, ...]] = ("clusters",)
    merge_step: ClassVar[str] = "deepfield.catalogs.clusters:ClusterMerge"

    @classmethod
    def sky_reach_arcsec(cls, config: StageConfig) -> float:
        return float(config.halo_arcsec)

    def __init__(self, config: StageConfig | None = None, **params):
        super().__init__(config, **params)
        self._found: tuple[tuple, dict] | None = None  # the last field's detections
        self._planes: OrderedDict[tuple, np.ndarray] = OrderedDict()  # fields' binned planes, least recent first
        self._sky: tuple[str, dict] | None = None  # (store, {field: (record, footprint)}) of its complete fields
        self._weights_digest: str | None = None  # sha256 of the weights file (shared_key)

    def setup(self, device: str) -> None:
        super().setup(device)
        self.bin = int(self.model.bin)
        self.bands = list(self.model.bands)

    @staticmethod
    def _key(group) -> tuple:
        """A field's cache key: its name, store and completion record (a re-ingest makes a new key)."""
        from ..zarr_store import COMPLETE
        return group.path.rsplit("/", 1)[-1], str(group.store), repr(group.attrs.get(COMPLETE))

    def halo_bins(self, tile) -> int:
        """`halo_arcsec` in binned pixels of the tile's field."""
        return round(self.halo_arcsec / (tile.pixel_scale * self.bin))

    def binned(self, group) -> np.ndarray:
        """`field_planes` of a field of the store (its group), cached per actor: the most recently used fields',
        up to PLANES_CACHE_BYTES in all (a field binned as a neighbour is not binned again for its own tiles)."""
        key = self._key(group)
        if key in self._planes:
            self._planes.move_to_end(key)
            return self._planes[key]
        planes = field_planes(group, self.bands, self.bin) if self.shared_dir is None else self._shared_planes(group)
        self._planes[key] = planes
        while len(self._planes) > 1 and sum(p.nbytes for p in self._planes.values()) > PLANES_CACHE_BYTES:
            self._planes.popitem(last=False)
        return planes

    def neighbours(self, group, margin_arcsec: float) -> list[str]:
        """The other complete fields of the store of the field `group` that may cover sky within `margin_arcsec`
        of it (the circles through the fields' corners, grown by the margin's diagonal and 1' for distortion,
        meet), by name. The store's fields are listed once per actor, again when this field is not among them
        as it is now (ingested since, or again)."""
        import zarr

        from ..zarr_store import COMPLETE
        name, store, record = self._key(group)
        if self._sky is None or self._sky[0] != store or self._sky[1].get(name, (None,))[0] != record:
            # every field's attributes read straight from its zarr.json (fields_attrs: 0.05 ms a field against
            # 1.5 ms through zarr, once per actor and store change; a survey has 10^4-10^5 fields)
            root = zarr.open_group(store=group.store, mode="r", use_consolidated=False)
            sky = {n: (repr(a[COMPLETE]), field_footprint(a)) for n, a in sorted(fields_attrs(root).items())
                   if a and COMPLETE in a}
            self._sky = (store, sky)
        sky = self._sky[1]
        footprints = {n: v[1] for n, v in sky.items()}
        if name not in footprints:
            footprints[name] = field_footprint(group.attrs.asdict())
        return fields_near(footprints, name, margin_arcsec)

    def extended_planes(self, tile) -> np.ndarray:
        """The binned planes of the tile's whole field grown by `halo_arcsec` on each side (`extend_planes`),
        filled from the other complete fields of the store that cover that sky: each binned whole
        (`binned`, as its own tiles see it), a damaged one an error naming it; one without the model's bands
        covers nothing."""
        import zarr

        from ..zarr_store import COMPLETE
        group, halo = tile.group, self.halo_bins(tile)
        planes = self.binned(group)
        found = []
        if halo:
            fields = zarr.open_group(store=group.store, mode="r", use_consolidated=False)["fields"]
            for n in self.neighbours(group, self.halo_arcsec):
                g = fields[n]
                if COMPLETE in g.attrs and set(self.bands) <= set(g.attrs["bands"]):
                    found.append((field_wcs(g.attrs), self.binned(g)))
            self.binned(group)  # the field's own planes stay the most recently used
        return extend_planes(planes, field_wcs(group.attrs), self.bin, halo, found)

    def field_detections(self, tile) -> dict[str, np.ndarray]:
        """The network's detections over the tile's whole field and its halo (`extended_planes`,
        `detect_planes`), once per field (module docstring): x and y in field pixels (binned pixel j is field
        pixels j bin to (j + 1) bin - 1, its centre j bin + (bin - 1) / 2), score, z, richness, highest score
        first. Those off the field belong to no tile."""
        key = self._key(tile.group)
        if self._found is None or self._found[0] != key:
            found = self._detect(tile) if self.shared_dir is None else self._shared_detections(tile)
            self._found = (key, found)
        return self._found[1]

    def _detect(self, tile) -> dict[str, np.ndarray]:
        found = detect_planes(self.model, self.extended_planes(tile), self.threshold, device=self.device)
        b, halo = self.bin, self.halo_bins(tile)
        found["x"] = (found["x"] - halo) * b + (b - 1) / 2.0
        found["y"] = (found["y"] - halo) * b + (b - 1) / 2.0
        return found

    def shared_key(self, tile) -> str:
        """The hash of what the field's detections depend on (module docstring)."""
        from deepfield.models.registry import _weights_path

        from ..version import __version__
        if self._weights_digest is None:
            path = _weights_path(self.model_name, self.config.weights_file(self.model_name))
            self._weights_digest = hashlib.sha256(path.read_bytes()).hexdigest()
        _, _, record = self._key(tile.group)
        near = self.neighbours(tile.group, self.halo_arcsec) if self.halo_bins(tile) else []
        what = dict(format=SHARED_FORMAT, version=__version__, stage=self.version, field=record,
                    weights=self._weights_digest, config=self.config.model_dump(mode="json"), bin=self.bin,
                    halo=self.halo_bins(tile), neighbours={n: self._sky[1][n][0] for n in near})
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def _shared_detections(self, tile) -> dict[str, np.ndarray]:
        """The field's detections from the run's shared directory, computed there by the first actor to need
        them (module docstring)."""
        def load(path):
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        where = Path(self.shared_dir) / tile.id.field
        return _shared(where / ".detections.lock", where / f"detections.{self.shared_key(tile)}.npz",
                       lambda: self._detect(tile), load, lambda fh, found: np.savez(fh, **found))

    def _shared_planes(self, group) -> np.ndarray:
        """`field_planes` of a field from the run's shared directory, computed there by the first actor to need
        them: keyed by the field's completion record, the model's bands and binning, the stage's and
        deepfield's versions."""
        from ..version import __version__
        name, _, record = self._key(group)
        what = dict(format=SHARED_FORMAT, version=__version__, stage=self.version, field=record, bands=self.bands,
                    bin=self.bin)
        key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]
        where = Path(self.shared_dir) / name
        return _shared(where / ".planes.lock", where / f"planes.{key}.npy",
                       lambda: field_planes(group, self.bands, self.bin), lambda p: np.load(p, allow_pickle=False),
                       np.save)

    def run(self, tile, sources: pd.DataFrame) -> pd.DataFrame:
        self.ensure_setup()
        missing = [b for b in self.bands if b not in tile.bands]
        if missing:
            raise ValueError(f"cluster stage: the model needs bands {self.bands}; field {tile.id.field} lacks {missing}")
        if tile.group is None:
            raise ValueError(f"cluster stage: tile {tile.id} was not read from a store")
        found = self.field_detections(tile)
        x, y, c = found["x"], found["y"], tile.core
        inside = (x >= c.x0 - 0.5) & (x < c.x1 - 0.5) & (y >= c.y0 - 0.5) & (y < c.y1 - 0.5)
        x, y = x[inside], y[inside]
        if len(x):  # the tile's WCS maps the halo box's pixel (0, 0)
            ra, dec = tile.wcs.all_pix2world(x - tile.box.x0, y - tile.box.y0, 0)
        else:
            ra = dec = np.zeros(0)
        tile.tables["clusters"] = pd.DataFrame({
            "field": tile.id.field, "tile": str(tile.id), "x": x, "y": y, "ra": np.asarray(ra, float),
            "dec": np.asarray(dec, float), "score": found["score"][inside], "z": found["z"][inside],
            "richness": found["richness"][inside]})
        return sources
