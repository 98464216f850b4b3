"""Evaluation of a run's anomaly list against a simulation's truth (`deepfield eval anomaly-list`): the product a
survey scientist reads, `RUN/catalogs/anomalies.parquet`, rather than the grid's windows that `deepfield eval
anomaly` scores.

Each injected anomaly of the truth (`anomalies.parquet` and `lenses.parquet` of the simulation's truth
directory) that the run's anomaly weights can see (artefacts of bands they do not take are left out, as
tasks.trainsets.anomaly.anomaly_geometry leaves them) is *listed* when a candidate of its field lies within
`match_px` of it: of its position for the point-like and compact ones (cosmic rays, hot pixels, ring galaxies,
mergers, lenses) or of the trail's segment, or on the ghost's annulus (within its width and `match_px` - 8 px).
Its rank is the best of those candidates'. Figures per type and overall: the fraction listed, the fraction with a
rank within `top`, the median rank; and the list's purity: the fraction of its first `top` candidates that lie on
an injected anomaly. An anomaly in the overlap of two fields is counted in each field whose truth lists it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from deepfield.tasks.trainsets.anomaly import anomaly_geometry

__all__ = ["score_list", "format_list_report"]

MATCH_PX = 12.0  # a candidate this close to an injected anomaly (0.75 of the anomaly grid's window) lists it


def _weights_bands(run_dir: Path) -> list[str] | None:
    """The bands of the anomaly weights the run used (its run-summary.json), None when it does not say."""
    from deepfield.models.registry import variants
    try:
        tag = json.loads((run_dir / "run-summary.json").read_text())["weights_variants"]["anomaly"]
        return list(variants("anomaly_wgan")[tag])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def score_list(run_dir: Path, truth_dir: Path, top: int = 100, match_px: float = MATCH_PX,
               bands: list[str] | None = None) -> dict:
    """The figures of the module docstring for the run at `run_dir` against the truth at `truth_dir`; `bands`:
    those the anomaly weights take (default: as the run's summary says, else every band of the truth)."""
    run_dir, truth_dir = Path(run_dir), Path(truth_dir)
    table = run_dir / "catalogs" / "anomalies.parquet"
    for p in (table, truth_dir / "anomalies.parquet", truth_dir / "lenses.parquet"):
        if not p.exists():
            why = "the run has no anomaly list" if p == table else "not a simulation's truth directory"
            raise FileNotFoundError(f"{p}: no such file ({why})")
    cand = pd.read_parquet(table)
    anomalies = pd.read_parquet(truth_dir / "anomalies.parquet")
    lenses = pd.read_parquet(truth_dir / "lenses.parquet")
    if not bands:
        bands = _weights_bands(run_dir) or sorted(set(anomalies.band.astype(str)) - {"all"})
    on_truth = np.zeros(len(cand), bool)
    rows = []
    for field in sorted(set(anomalies.field) | set(lenses.field)):
        c = cand[cand.field == field]
        x, y = c.x.to_numpy(float), c.y.to_numpy(float)
        # near: within match_px of the anomaly's position or trail, or on a ghost's annulus (its width and
        # match_px - 8 px more)
        for _, kind, _, near, _ in anomaly_geometry(x, y, anomalies[anomalies.field == field],
                                                    lenses[lenses.field == field], 32, list(bands), match_px):
            on_truth[np.flatnonzero(cand.field.to_numpy() == field)[near]] = True
            ranks = c.anomaly_rank.to_numpy()[near]
            rows.append((kind, int(ranks.min()) if len(ranks) else None))
    kinds = sorted({k for k, _ in rows})

    def figures(rs: list) -> dict:
        ranks = np.array([r for r in rs if r is not None], float)
        n = len(rs)
        return dict(injected=n, listed=float(len(ranks) / n) if n else None,
                    in_top=float((ranks <= top).sum() / n) if n else None,
                    median_rank=float(np.median(ranks)) if len(ranks) else None)
    first = on_truth[cand.anomaly_rank.to_numpy() <= top]
    return dict(run_dir=str(run_dir), truth_dir=str(truth_dir), top=top, match_px=match_px, bands=bands,
                candidates=int(len(cand)), purity_top=float(first.mean()) if len(first) else None,
                purity_all=float(on_truth.mean()) if len(cand) else None,
                shapes_top=cand[cand.anomaly_rank <= top]["shape"].value_counts().to_dict(),
                types={k: figures([r for kk, r in rows if kk == k]) for k in kinds},
                all=figures([r for _, r in rows]))


def format_list_report(r: dict) -> str:
    def num(v, fmt=".2f"):
        return "-" if v is None else format(v, fmt)
    lines = [f"anomaly list of {r['run_dir']} ({r['candidates']} candidates) against {r['truth_dir']}, an injected "
             f"anomaly listed when a candidate lies within {r['match_px']:g} px of it (bands "
             f"{','.join(r['bands'] or [])}):",
             f"  the first {r['top']} candidates on an injected anomaly: {num(r['purity_top'])}; all: "
             f"{num(r['purity_all'])}; shapes of the first {r['top']}: {r['shapes_top']}",
             f"  {'type':16s} {'injected':>8s} {'listed':>7s} {'top ' + str(r['top']):>8s} {'median rank':>12s}"]
    for k, f in [*r["types"].items(), ("all", r["all"])]:
        lines.append(f"  {k:16s} {f['injected']:8d} {num(f['listed']):>7s} {num(f['in_top']):>8s} "
                     f"{num(f['median_rank'], '.0f'):>12s}")
    return "\n".join(lines)
