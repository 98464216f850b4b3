"""The SEP method's pixel work (tasks/stages/detect.py, `method: sep`): SEP's deblended children assigned to the
parent footprints (`assign_parents`), a footprint with two or more children replaced by them, and the
segmentation of the rows that come out (`split_by_sep`), as tasks/stages/_learned_split.py does for the learned
method."""
from __future__ import annotations

import numpy as np

__all__ = ["assign_parents", "split_by_sep"]


def split_by_sep(parents: np.ndarray, pseg: np.ndarray, children: np.ndarray, cseg: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(objs, blend_id sorted, segmap) from SEP's parent footprints (`parents`, segmentation `pseg`) and its
    deblended children (`children`, `cseg`): a parent with at most one child is kept whole, one with two or
    more is replaced by them (blend_id: the parent's index)."""
    owner = assign_parents(cseg, pseg, children["x"], children["y"], len(parents))
    nchild = np.bincount(owner[owner < len(parents)], minlength=len(parents))
    split = nchild > 1
    keep_child = (owner < len(parents)) & split[np.minimum(owner, len(parents) - 1)]
    objs = np.concatenate([parents[~split], children[keep_child]])
    blend_id = np.concatenate([np.flatnonzero(~split), owner[keep_child]]).astype(np.int64)
    order = np.argsort(blend_id, kind="stable")
    objs, blend_id = objs[order], blend_id[order]
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    n_par = int((~split).sum())
    label_parent = np.zeros(len(parents) + 1, dtype=np.int32)
    label_parent[np.flatnonzero(~split) + 1] = rank[:n_par]
    label_child = np.zeros(len(children) + 1, dtype=np.int32)
    label_child[np.flatnonzero(keep_child) + 1] = rank[n_par:]
    return objs, blend_id, _final_segmap(pseg, cseg, label_parent, label_child, objs, blend_id)


def _final_segmap(pseg, cseg, label_parent, label_child, objs, blend_id) -> np.ndarray:
    """Segmentation of the output rows (row k has value k+1), (y, x) int32.

    label_parent / label_child: output value of each parent / child segment value (index = segment
    value, 0 = not an output row). Unsplit parents keep their footprint; a split parent's footprint
    goes to its children, and pixels outside the children's (narrower) footprints to the nearest
    child centroid."""
    seg = label_parent[pseg]
    seg = np.where((seg == 0) & (cseg > 0), label_child[cseg], seg).astype(np.int32)
    left = (seg == 0) & (pseg > 0)
    if left.any():
        yy, xx = np.nonzero(left)
        owners = pseg[yy, xx] - 1
        for p in np.unique(owners):
            sel = owners == p
            rows = np.flatnonzero(blend_id == p)
            if len(rows) == 0:
                continue
            d = np.hypot(xx[sel, None] - objs["x"][rows][None], yy[sel, None] - objs["y"][rows][None])
            seg[yy[sel], xx[sel]] = rows[d.argmin(axis=1)] + 1
    return seg


def assign_parents(seg: np.ndarray, pseg: np.ndarray, x: np.ndarray, y: np.ndarray,
                   nparents: int) -> np.ndarray:
    """Parent (blend) index of each child, (n,) int64.

    seg: deblended segmentation (child k has value k+1); pseg: un-deblended segmentation (parent j
    has value j+1); x, y: child centroids in array pixels. A child takes the parent segment holding
    most of its pixels, else the one at its centroid pixel, else a fresh id >= nparents."""
    n = len(x)
    best = np.zeros(n + 1, dtype=np.int64)  # 1-based parent per 1-based child, 0 = none
    both = (seg > 0) & (pseg > 0)
    if both.any():
        pairs = seg[both].astype(np.int64) * (nparents + 1) + pseg[both].astype(np.int64)
        uniq, counts = np.unique(pairs, return_counts=True)
        order = np.argsort(counts, kind="stable")  # larger overlaps written last win
        best[uniq[order] // (nparents + 1)] = uniq[order] % (nparents + 1)
    pid = best[1:]
    missing = pid == 0
    if missing.any():
        ny, nx = pseg.shape
        xi = np.clip(np.floor(x[missing] + 0.5).astype(np.int64), 0, nx - 1)
        yi = np.clip(np.floor(y[missing] + 0.5).astype(np.int64), 0, ny - 1)
        pid[missing] = pseg[yi, xi]
    blend = pid - 1
    orphans = blend < 0
    blend[orphans] = nparents + np.arange(int(orphans.sum()))
    return blend.astype(np.int64)
