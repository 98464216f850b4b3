"""Galaxy-cluster finding on binned multi-band images (models/cluster_net.py), in the spirit of YOLO-CL
(Grishin et al. 2023): the network sees a cluster as a concentration of galaxies of one colour, not a
list of sources.

The network sees the tile's core plus a halo of `halo_arcsec` (128") on each side, binned 8 x 8 (1.6"
pixels) and scaled (`planes_from_sums`). The run's own halo (64 px = 13") is far smaller than a cluster,
so the stage reads its pixels itself: it bins the tile's whole field from the store once per actor and
field (`field_planes`, a strip at a time; the tiles of a field share it), and cuts each tile's window
from that, zero beyond the field's edge as in training (models.cluster_net.window).

Why 128": the red members that make a cluster visible are concentrated within ~0.5 Mpc of its centre,
which is 80" at z = 0.5 and 110" at z = 0.3, so a cluster centred anywhere in the core has its inner
members inside the window from z ~ 0.25 on; the network's coarsest level (51" pixels) sees that scale.

Every peak of the network's centre heat map above `threshold` whose position lies in the tile's core
becomes a row of the tile's cluster table (`tile.tables["clusters"]`, written by the tile runner to
`tiles/<field>/<ty>_<tx>.clusters.parquet`): field and tile, x and y (field pixels), ra and dec
(degrees), `score` (the heat-map peak, 0-1), `z` (the network's redshift) and `richness` (its
estimate of lambda, members brighter than 0.2 L* within R_lambda). The stage's merge step
(catalogs/clusters.py) suppresses the same cluster seen from several tiles or fields and assigns members. The source
table passes through unchanged.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
from pydantic import Field

from ._pixels import UNUSABLE
from .base import ModelStage, ModelStageConfig, StageConfig

__all__ = ["ClusterStage", "ClusterConfig", "binned_planes", "field_planes", "SOFTENING", "BACKGROUND_MESH"]

SOFTENING = 3.0  # asinh softening, in units of the binned sky noise
BACKGROUND_MESH = 32  # binned pixels (51" at bin 8): the smooth sky left over after the ingest's


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
    img = np.asarray(image[:, :ny, :nx], np.float64)
    iv = np.asarray(invvar[:, :ny, :nx], np.float64)
    good = ((np.asarray(mask[:, :ny, :nx]) & UNUSABLE) == 0) & (iv > 0) & np.isfinite(img) & np.isfinite(iv)
    return np.stack([_block_sum(np.where(good, img, 0.0), bin), _block_sum(good.astype(np.float64), bin),
                     _block_sum(np.where(good, iv, 0.0), bin)])


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


def field_planes(group, bands: list[str], bin: int, strip: int = 512) -> np.ndarray:
    """Network input planes of a whole field of the store (its Zarr group), read `strip` rows at a time so
    that a large field never sits in memory at full resolution."""
    from ..zarr_store import read_checked, verify_shards
    field = group.path.rsplit("/", 1)[-1]
    verify_shards(group, field)
    idx = [list(group.attrs["bands"]).index(b) for b in bands]
    _, ny, nx = group.attrs["shape"]
    ny, nx = ny // bin * bin, nx // bin * bin
    step = max(strip // bin, 1) * bin
    parts = []
    for y0 in range(0, ny, step):
        sl = (idx, slice(y0, min(y0 + step, ny)), slice(0, nx))
        what = f"rows {y0}-{sl[1].stop}"
        parts.append(block_sums(*(read_checked(group, field, a, sl, what) for a in ("image", "invvar", "mask")), bin))
    return planes_from_sums(np.concatenate(parts, axis=2), bin)


class ClusterConfig(ModelStageConfig):
    halo_arcsec: float = Field(128.0, ge=0, description="sky around the tile core the network sees, arcsec")
    threshold: float = Field(0.3, gt=0, lt=1, description="heat-map peaks above this are candidates")


class ClusterStage(ModelStage):
    name: ClassVar[str] = "cluster"
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = ClusterConfig
    models: ClassVar[tuple[str, ...]] = ("cluster_net",)
    side_tables: ClassVar[tuple[str, ...]] = ("clusters",)
    merge_step: ClassVar[str] = "deepfield.catalogs.clusters:ClusterMerge"

    def __init__(self, config: StageConfig | None = None, **params):
        super().__init__(config, **params)
        self._cache: tuple[tuple, np.ndarray] | None = None  # the last field's planes

    def setup(self, device: str) -> None:
        super().setup(device)
        self.bin = int(self.model.bin)
        self.bands = list(self.model.bands)

    def field_planes(self, tile) -> np.ndarray:
        """The binned planes of the tile's whole field, computed once per field and actor (the tiles of a
        field are mostly processed one after another)."""
        missing = [b for b in self.bands if b not in tile.bands]
        if missing:
            raise ValueError(f"cluster stage: the model needs bands {self.bands}; field {tile.id.field} lacks {missing}")
        if tile.group is None:
            raise ValueError(f"cluster stage: tile {tile.id} was not read from a store")
        from ..zarr_store import COMPLETE
        key = (tile.id.field, str(tile.group.store), repr(tile.group.attrs.get(COMPLETE)))  # re-ingest: new key
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, field_planes(tile.group, self.bands, self.bin))
        return self._cache[1]

    def window(self, tile) -> tuple[int, int, int, int]:
        """(y0, x0, h, w) in binned pixels of the field: the core plus `halo_arcsec` on each side."""
        b = self.bin
        h = int(round(self.halo_arcsec / (tile.pixel_scale * b)))
        c = tile.core
        y0, x0 = c.y0 // b - h, c.x0 // b - h
        return y0, x0, -(-c.y1 // b) + h - y0, -(-c.x1 // b) + h - x0

    def run(self, tile, sources: pd.DataFrame) -> pd.DataFrame:
        self.ensure_setup()
        from deepfield.models.cluster_net import detect, window
        y0, x0, h, w = self.window(tile)
        found = detect(self.model, window(self.field_planes(tile), y0, x0, h, w), self.threshold, device=self.device)
        b = self.bin
        x = (x0 + found["x"]) * b + (b - 1) / 2.0
        y = (y0 + found["y"]) * b + (b - 1) / 2.0
        c = tile.core
        inside = (x >= c.x0 - 0.5) & (x < c.x1 - 0.5) & (y >= c.y0 - 0.5) & (y < c.y1 - 0.5)
        x, y = x[inside], y[inside]
        if len(x):  # the tile's WCS maps the halo box's pixel (0, 0)
            ra, dec = tile.wcs.all_pix2world(x - tile.box.x0, y - tile.box.y0, 0)
        else:
            ra = dec = np.zeros(0)
        tile.tables["clusters"] = pd.DataFrame(dict(
            field=tile.id.field, tile=str(tile.id), x=x, y=y, ra=np.asarray(ra, float), dec=np.asarray(dec, float),
            score=found["score"][inside], z=found["z"][inside], richness=found["richness"][inside]))
        return sources
