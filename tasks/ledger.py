"""The run ledger: one JSON record per tile, `RUN/ledger/<field>/<ty>_<tx>.json`, written atomically
by the driver (the only writer), so a crash leaves every record whole.

A record holds the tile's status (done or failed), attempts, per-stage timings (s), counts,
configuration hash, stage versions, model versions, the output file and the error text. A tile is
done for a run when its record says "done" under the same configuration hash and versions; a
re-run skips it.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import write_text
from .tiling import TileId


@dataclass
class TileRecord:
    tile: str
    status: str  # "done" or "failed"
    attempts: int
    config_hash: str
    stage_versions: dict[str, str]
    model_versions: dict[str, str] = field(default_factory=dict)
    input_hash: str = ""  # fingerprint of the field's ingested inputs: a re-ingested field is redone
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    output: str | None = None
    error: str | None = None
    finished_at: str = ""
    worker: dict = field(default_factory=dict)  # where it ran: host, pid, device, CUDA_VISIBLE_DEVICES


class Ledger:
    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir) / "ledger"

    def path(self, tile: TileId) -> Path:
        return self.root / tile.field / f"{tile.ty}_{tile.tx}.json"

    def get(self, tile: TileId) -> TileRecord | None:
        try:
            return TileRecord(**json.loads(self.path(tile).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def put(self, rec: TileRecord) -> None:
        rec.finished_at = rec.finished_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_text(self.path(TileId.parse(rec.tile)), json.dumps(asdict(rec), indent=1, sort_keys=True))

    def is_done(self, tile: TileId, config_hash: str, stage_versions: dict[str, str],
                model_versions: dict[str, str] | None = None, output_root: Path | None = None,
                input_hash: str = "") -> bool:
        rec = self.get(tile)
        if rec is None or rec.status != "done" or rec.config_hash != config_hash or rec.input_hash != input_hash:
            return False
        if rec.stage_versions != stage_versions or rec.model_versions != (model_versions or {}):
            return False
        return output_root is None or rec.output is None or (output_root / rec.output).exists()

    def records(self) -> list[TileRecord]:
        out = []
        for p in sorted(self.root.glob("*/*.json")):
            try:
                out.append(TileRecord(**json.loads(p.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return out


def summarise(run_dir: str | Path) -> dict:
    """Counts by status, per-stage total time, sources, attempts and the failed tiles' errors."""
    recs = Ledger(run_dir).records()
    status = Counter(r.status for r in recs)
    timing = Counter()
    for r in recs:
        timing.update(r.timings)
    return dict(tiles=len(recs), status=dict(status), retried=sum(r.attempts > 1 for r in recs),
                sources=sum(r.counts.get("sources", 0) for r in recs),
                primary=sum(r.counts.get("primary", 0) for r in recs),
                stage_seconds={k: round(v, 3) for k, v in timing.items()},
                failed=[(r.tile, r.error) for r in recs if r.status == "failed"],
                config_hashes=sorted({r.config_hash for r in recs}))
