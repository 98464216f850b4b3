"""Galaxy-cluster finding on binned multi-band images (models/cluster_net.py), in the spirit of YOLO-CL
(Grishin et al. 2023): the network sees a cluster as a concentration of galaxies of one colour, not a
list of sources.

The network runs once per field, not once per tile: the stage bins the tile's whole field from the store
(`field_planes`, a strip at a time), into binned pixels of about the network's training skies' 1.6" (8 x 8 at
0.2" per pixel; 10 x 10 at 0.168", 6 x 6 at 0.262": `group_bin`) and scaled (`planes_from_sums`), extends the planes by
`halo_arcsec` (128") on each side (`extend_planes`), runs the network on the whole (`detect_planes`; those four
in tasks/stages/cluster_planes.py) and keeps the detections; each tile of the field takes those whose position
lies in its core. The run's own halo (64 px = 13") is far smaller than a cluster, so the stage reads its pixels
itself.

Once per field for the whole run, not per actor: the tiles of a field go to several actors, and each actor
binning the whole field (and its neighbours) again cost the run up to (actors - 1) times the work, a field read
at full resolution each (about 0.5 core-s for a 2048^2 field in four bands). Inside a run (`shared_dir`, the run
directory's cache/cluster, and the driver handing out the fields' tiles in turn: tasks/actor_pool.py) the first
actor to need a field's binned planes, or its detections, computes them under the field's lock for them and
writes them atomically (tasks.atomic.shared_result: `<field>/planes.<key>.npy`, `<field>/detections.<key>.npz`);
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

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from pydantic import Field

from ..atomic import shared_result
from ..zarr_sky import field_footprint, field_wcs, fields_near
from ..zarr_store import fields_attrs
from .base import ModelStage, ModelStageConfig, StageConfig
from .cluster_planes import detect_planes, extend_planes, field_planes

__all__ = ["ClusterConfig", "ClusterStage"]

SHARED_FORMAT = 1  # of the shared planes' and detections' files: bump when what they hold changes
PLANES_CACHE_BYTES = 1 << 30  # binned planes of fields kept per actor (a 2048^2 px field's are 1.3 MB)


class ClusterConfig(ModelStageConfig):
    halo_arcsec: float = Field(128.0, ge=0, description="sky around the field the network sees (filled from the "
                                                        "store's neighbouring fields), arcsec")
    threshold: float = Field(0.3, gt=0, lt=1, description="heat-map peaks above this are candidates")


class ClusterStage(ModelStage):
    name: ClassVar[str] = "cluster"
    # 3: fields binned to the training skies' angular pixel whatever their pixel scale (8 x 8 at any scale before)
    version: ClassVar[str] = "3"
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
        self._weights_version: str | None = None  # of the weights file it runs (shared_key)

    def setup(self, device: str) -> None:
        super().setup(device)
        self.bands = list(self.model.bands)

    @staticmethod
    def _key(group) -> tuple:
        """A field's cache key: its name, store and completion record (a re-ingest makes a new key)."""
        from ..zarr_store import field_key
        return field_key(group)

    def group_bin(self, group) -> int:
        """The binning of a field of the store (its group): its binned pixel nearest the network's training
        skies' (models.cluster_net.ClusterNet.field_bin; 8 at 0.2" per pixel)."""
        return self.model.field_bin(float(group.attrs["pixel_scale"]))

    def halo_bins(self, tile) -> int:
        """`halo_arcsec` in binned pixels of the tile's field."""
        return round(self.halo_arcsec / (tile.pixel_scale * self.group_bin(tile.group)))

    def binned(self, group) -> np.ndarray:
        """`field_planes` of a field of the store (its group), cached per actor: the most recently used fields',
        up to PLANES_CACHE_BYTES in all (a field binned as a neighbour is not binned again for its own tiles)."""
        key = self._key(group)
        if key in self._planes:
            self._planes.move_to_end(key)
            return self._planes[key]
        planes = field_planes(group, self.bands, self.group_bin(group)) if self.shared_dir is None \
            else self._shared_planes(group)
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
        group, halo, b = tile.group, self.halo_bins(tile), self.group_bin(tile.group)
        planes = self.binned(group)
        found = []
        if halo:
            fields = zarr.open_group(store=group.store, mode="r", use_consolidated=False)["fields"]
            for n in self.neighbours(group, self.halo_arcsec):
                g = fields[n]
                # a neighbour on another grid (binned otherwise) covers nothing: extend_planes maps binned
                # pixels of one size
                if COMPLETE in g.attrs and set(self.bands) <= set(g.attrs["bands"]) and self.group_bin(g) == b:
                    found.append((field_wcs(g.attrs), self.binned(g)))
            self.binned(group)  # the field's own planes stay the most recently used
        return extend_planes(planes, field_wcs(group.attrs), b, halo, found)

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
        b, halo = self.group_bin(tile.group), self.halo_bins(tile)
        found["x"] = (found["x"] - halo) * b + (b - 1) / 2.0
        found["y"] = (found["y"] - halo) * b + (b - 1) / 2.0
        return found

    def _digest(self, **what) -> str:
        """A shared file's key: 24 hex digits of the sha256 of `what`, the files' format, the stage's version and
        deepfield's."""
        from ..version import __version__
        what = dict(what, format=SHARED_FORMAT, stage=self.version, version=__version__)
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def shared_key(self, tile) -> str:
        """The key of the field's detections: what they depend on (module docstring)."""
        from deepfield.models.registry import entry, weights_version
        if self._weights_version is None:  # the file the stage runs: the configured one or the shipped one
            self._weights_version = weights_version(self.config.weights_file(self.model_name)
                                                    or entry(self.model_name).weights)
        near = self.neighbours(tile.group, self.halo_arcsec) if self.halo_bins(tile) else []
        return self._digest(field=self._key(tile.group)[2], weights=self._weights_version,
                            config=self.config.model_dump(mode="json"), bin=self.group_bin(tile.group),
                            halo=self.halo_bins(tile),
                            neighbours={n: self._sky[1][n][0] for n in near})

    def _shared_detections(self, tile) -> dict[str, np.ndarray]:
        """The field's detections from the run's shared directory, computed there by the first actor to need
        them (module docstring)."""
        def load(path):
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        where = Path(self.shared_dir) / tile.id.field
        return shared_result(where / ".detections.lock", where / f"detections.{self.shared_key(tile)}.npz",
                             lambda: self._detect(tile), load, lambda fh, found: np.savez(fh, **found))

    def _shared_planes(self, group) -> np.ndarray:
        """`field_planes` of a field from the run's shared directory, computed there by the first actor to need
        them: keyed by the field's completion record, the model's bands and binning and the versions."""
        name, _, record = self._key(group)
        where = Path(self.shared_dir) / name
        b = self.group_bin(group)
        return shared_result(where / ".planes.lock",
                             where / f"planes.{self._digest(field=record, bands=self.bands, bin=b)}.npy",
                             lambda: field_planes(group, self.bands, b),
                             lambda p: np.load(p, allow_pickle=False), np.save)

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
