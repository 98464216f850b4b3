"""The cluster stage's merge step (`ClusterMerge`): the cluster catalog of a run, the stage's per-tile
candidates merged over tiles and fields, and member galaxies assigned in the source catalog.

1. Candidates: every `RUN/tiles/<field>/<ty>_<tx>.clusters.parquet` beside a merged tile table. A tile
   keeps only the peaks in its core, but a cluster near a tile or field edge can still peak in two cores
   (each tile sees a different part of it), and overlapping fields see the same clusters.
2. Non-maximum suppression on the sky and in redshift: candidates in descending `score`; one within
   `nms_mpc` (0.5 Mpc, physical, at the stronger one's redshift) of a kept one AND within `nms_dz` (0.1) of
   its redshift in (z - z_kept) / (1 + z_kept) is the same cluster and is dropped. 0.5 Mpc is about half of
   R_lambda for the richness range of interest; the network's redshifts scatter by ~0.03 (1 + z), so 0.1 is
   3 sigma: two candidates on one line of sight further apart in z are two clusters in projection, and both
   are kept. The same cluster seen from two tiles, or from two overlapping fields (a cluster straddling a
   field edge: the stage reads the neighbouring fields' pixels around each field), is one row.
   `cluster_id` is the rank by score (1 = highest).
3. Redshift (`refine_redshifts`): the network's redshift is kept as `z_net`; `z` is the red-sequence
   redshift of the source catalog's galaxies around the centre, searched within +-0.15 of z_net
   (catalogs/redsequence.py, `refine_redshift`): the colours of a few bright members pin z far better than
   the binned images do. Where fewer than 3 red-sequence galaxies stand above the background, z = z_net.
4. Members (`assign_members`): a source is a member when it lies within R_lambda (redMaPPer's radius,
   1.0/h Mpc (lambda/100)^0.2, from the estimated richness) of the centre and is on the red sequence at
   the cluster's redshift (the red-sequence model of tasks/astro.py, catalogs/redsequence.py: weight exp(-chi^2/2)
   above `MEMBER_WEIGHT`, brighter than m* + 1.75, i.e. 0.2 L*). A source within reach of two clusters
   goes to the one with the higher score. Non-members have cluster_id -1.

Columns of `clusters.parquet`: cluster_id, ra, dec (deg), z (red-sequence), z_net and richness (the
network's estimates), z_excess, score, field, tile, x, y (pixels of that field), r_lambda_arcsec and
n_members (sources assigned). `cluster_cutouts.fits`: the `cutouts` (50) highest scored, `cutout` x `cutout`
px (256) around the centre from the run's store, one HDU per cluster (EXTNAME CLUSTER_<cluster_id>) with
WCS: the layout of catalogs/cutouts.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pydantic import Field

from deepfield.tasks.astro import (WAVELENGTH_ORDER, arcsec_per_mpc, r_lambda_mpc, red_sequence_model,
                                   separation_arcsec)
from deepfield.tasks.atomic import atomic_path
from deepfield.tasks.tile_runner import side_table

from .cutouts import write_cutouts
from .redsequence import membership, refine_redshift
from .steps import MergeContext, MergeStep, MergeStepConfig, StepResult

__all__ = ["ClusterMerge", "CLUSTER_TABLE", "CLUSTER_CUTOUTS", "read_candidates", "suppress", "refine_redshifts", "member_rule",
           "assign_members", "write_cluster_table", "member_bands", "member_ref_band"]

CLUSTER_TABLE = "clusters.parquet"
CLUSTER_CUTOUTS = "cluster_cutouts.fits"
MEMBER_WEIGHT = 0.1  # exp(-chi^2 / 2) > 0.1: chi^2 < 4.6 over the colours
CANDIDATE_COLUMNS = ["field", "tile", "x", "y", "ra", "dec", "score", "z", "richness"]


def read_candidates(tile_tables: list[Path]) -> pd.DataFrame | None:
    """All candidates beside the given tile tables; None when the cluster stage wrote none of them."""
    found = [side_table(f, "clusters") for f in tile_tables if side_table(f, "clusters").exists()]
    if not found:
        return None
    parts = [pd.read_parquet(f) for f in found]
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=CANDIDATE_COLUMNS)


def suppress(cand: pd.DataFrame, nms_mpc: float = 0.5, nms_dz: float = 0.1) -> pd.DataFrame:
    """Non-maximum suppression on the sky and in redshift (module docstring, step 2); the kept rows get
    cluster_id."""
    cand = cand.sort_values(["score", "field", "tile"], ascending=[False, True, True], kind="stable").reset_index(drop=True)
    keep: list[int] = []
    z = cand.z.to_numpy(float)
    # each candidate's radius once (astropy's distance integral per call; in the loop it cost 0.6 s a merge)
    radius_of = nms_mpc * np.array([arcsec_per_mpc(max(float(zz), 0.05)) for zz in z])
    for i in range(len(cand)):
        if keep:
            radius = radius_of[keep]
            sep = separation_arcsec(cand.ra.iat[i], cand.dec.iat[i], cand.ra.to_numpy()[keep], cand.dec.to_numpy()[keep])
            same_z = np.abs(z[i] - z[keep]) / (1 + z[keep]) < nms_dz
            if np.any((sep < radius) & same_z):
                continue
        keep.append(i)
    out = cand.iloc[keep].reset_index(drop=True)
    out.insert(0, "cluster_id", np.arange(1, len(out) + 1, dtype=np.int64))
    return out


def field_sources(tile_tables: list[Path], fields: set[str], bands: list[str]) -> pd.DataFrame:
    """The primary rows (ra, dec and the AUTO photometry in `bands`) of the tile tables of `fields`."""
    cols = ["ra", "dec", "is_primary", *[f"{k}_auto_{b}" for b in bands for k in ("mag", "magerr")]]
    parts = [pd.read_parquet(f, columns=cols) for f in tile_tables if f.parent.name in fields]
    parts = [p[p.is_primary.to_numpy(bool)] for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)


def refine_redshifts(clusters: pd.DataFrame, sources: pd.DataFrame, bands: list[str], ref_band: str = "i"
                     ) -> pd.DataFrame:
    """`clusters` with the network's redshift kept as `z_net` and `z` replaced by the red-sequence redshift of
    the galaxies around each centre (catalogs.redsequence.refine_redshift; z_net where it finds too few),
    and `z_excess`, the red-sequence galaxies in excess of the background within 0.3 Mpc."""
    out = clusters.copy()
    out["z_net"] = out["z"]
    found = [refine_redshift(sources, c.ra, c.dec, float(c.z), bands, ref_band) if bands else (float(c.z), 0.0)
             for c in out.itertuples()]
    out["z"] = np.array([f[0] for f in found], float)
    out["z_excess"] = np.array([f[1] for f in found], float)
    return out


def r_lambda_arcsec(richness: np.ndarray, z: np.ndarray) -> np.ndarray:
    return np.array([r_lambda_mpc(max(float(lam), 1.0)) * arcsec_per_mpc(max(float(zz), 0.05))
                     for lam, zz in zip(richness, z)])


@dataclass
class MemberRule:
    """What membership needs per cluster, computed once for a catalog: R_lambda (arcsec) and the red-sequence
    model at each cluster's z (row k of `clusters` is model index k; None without photometry bands)."""

    radius_arcsec: np.ndarray
    model: object | None


def member_rule(clusters: pd.DataFrame, bands: list[str], ref_band: str = "i") -> MemberRule:
    radius = r_lambda_arcsec(clusters.richness.to_numpy(), clusters.z.to_numpy())
    model = (red_sequence_model(bands, ref_band, z=np.clip(clusters.z.to_numpy(float), 0.05, 1.5))
             if bands and len(clusters) else None)
    return MemberRule(radius, model)


def assign_members(sources: pd.DataFrame, clusters: pd.DataFrame, bands: list[str], ref_band: str = "i",
                   rule: MemberRule | None = None) -> np.ndarray:
    """cluster_id of every row of `sources` (ra, dec, mag_auto_<b>, magerr_auto_<b>), -1 for non-members
    (module docstring, step 4); `clusters` in descending score with cluster_id, ra, dec, z, richness.
    rule: `member_rule(clusters, bands, ref_band)`, made here when not given (the merge makes it once for
    all its partitions)."""
    out = np.full(len(sources), -1, np.int64)
    if len(sources) == 0 or len(clusters) == 0:
        return out
    need = [f"{k}_auto_{b}" for b in bands for k in ("mag", "magerr")]
    if not bands or any(c not in sources.columns for c in need):
        return out
    rule = rule or member_rule(clusters, bands, ref_band)
    for k, (c, r) in enumerate(zip(clusters.itertuples(), rule.radius_arcsec)):
        sep = separation_arcsec(c.ra, c.dec, sources.ra.to_numpy(), sources.dec.to_numpy())
        near = (sep <= r) & (out < 0)
        if not near.any():
            continue
        w = membership(sources[near], rule.model, k)
        out[np.nonzero(near)[0][w > MEMBER_WEIGHT]] = c.cluster_id
    return out


def write_cluster_table(clusters: pd.DataFrame, rule: MemberRule, member_ids: np.ndarray, path: Path) -> int:
    """Write clusters.parquet with R_lambda and n_members counted from the catalog's cluster_id column;
    returns rows."""
    ids, counts = np.unique(member_ids[member_ids > 0], return_counts=True)
    n = dict(zip(ids.tolist(), counts.tolist()))
    table = clusters.copy()
    table["r_lambda_arcsec"] = rule.radius_arcsec
    table["n_members"] = np.array([n.get(int(i), 0) for i in table.cluster_id], np.int64)
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return int(len(table))


def member_bands(columns) -> list[str]:
    """The bands of a catalog's AUTO photometry, in wavelength order (for cluster membership); none with
    fewer than two (no colour, no red sequence)."""
    bands = [b for b in WAVELENGTH_ORDER if f"mag_auto_{b}" in columns and f"magerr_auto_{b}" in columns]
    return bands if len(bands) >= 2 else []


def member_ref_band(bands: list[str]) -> str:
    """The band of the red sequence's magnitude window: i when the catalog has it, else its reddest band."""
    return "i" if "i" in bands else (bands[-1] if bands else "i")


class ClusterMergeConfig(MergeStepConfig):
    nms_mpc: float = Field(0.5, gt=0, le=5, description="cluster candidates closer than this (physical Mpc at "
                           "the stronger one's redshift) and within nms_dz in redshift are one cluster")
    nms_dz: float = Field(0.1, gt=0, le=2, description="cluster candidates further apart than this in "
                          "|z - z_kept| / (1 + z_kept) are two clusters on one line of sight, however close on the sky")
    cutouts: int = Field(50, ge=0, description="the highest scored clusters with a cutout in cluster_cutouts.fits")
    cutout: int = Field(256, ge=8, le=2048, description="side of the cluster cutouts, pixels")


class ClusterMerge(MergeStep):
    """Steps 1-3 of the module docstring in `prepare`, step 4 in `partition`, clusters.parquet in `write`."""

    stage: ClassVar[str] = "cluster"
    Config: ClassVar[type[MergeStepConfig]] = ClusterMergeConfig

    clusters: pd.DataFrame | None = None
    rule: MemberRule | None = None

    def prepare(self, ctx: MergeContext) -> None:
        candidates = read_candidates(ctx.tile_tables)
        if candidates is None:
            return
        clusters = suppress(candidates, self.config.nms_mpc, self.config.nms_dz)
        bands = member_bands(ctx.columns)
        ref = member_ref_band(bands)
        self.clusters = refine_redshifts(clusters, field_sources(ctx.tile_tables, set(clusters.field), bands), bands,
                                         ref)
        self.rule = member_rule(self.clusters, bands, ref)  # once, not per partition

    def partition(self, df: pd.DataFrame) -> pd.DataFrame:
        if self.clusters is not None:
            df["cluster_id"] = assign_members(df, self.clusters, member_bands(df.columns), rule=self.rule)
        return df

    def write(self, ctx: MergeContext, flat_dir: Path, staging: Path) -> StepResult:
        if self.clusters is None:
            return StepResult(summary=dict(clusters=None))
        members = pq.read_table(flat_dir, columns=["cluster_id"])["cluster_id"].to_numpy()
        n = write_cluster_table(self.clusters, self.rule, members, staging / CLUSTER_TABLE)
        files = dict(clusters=CLUSTER_TABLE)
        if ctx.store_path is not None:
            write_cutouts(ctx.store_path, self.clusters.head(self.config.cutouts), staging / CLUSTER_CUTOUTS,
                          "cluster", "cluster_id", self.config.cutout, "clusters of clusters.parquet: one HDU "
                          "(band, y, x) per cluster around its centre, local median subtracted")
            files["cluster_cutouts"] = CLUSTER_CUTOUTS
        return StepResult(summary=dict(clusters=n), files=files)

    def report(self, summary: dict, paths: dict[str, str]) -> list[str]:
        if summary.get("clusters") is None:
            return []
        lines = [f"cluster: {summary['clusters']} galaxy cluster(s) (members carry cluster_id in the catalog): "
                 f"{paths['clusters']}" + (f" (cutouts: {paths['cluster_cutouts']})" if "cluster_cutouts" in paths
                                           else "")]
        for c in pd.read_parquet(paths["clusters"]).head(10).itertuples():
            lines.append(f"         cluster {c.cluster_id}: ra {c.ra:.4f} dec {c.dec:+.4f} z {c.z:.2f} richness "
                         f"{c.richness:.0f} score {c.score:.2f}, {c.n_members} member(s)")
        return lines
