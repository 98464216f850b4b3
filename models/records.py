"""What the training and evaluation commands share: progress lines on stderr, and atomic writes of weights
(with their training record) and of JSON figures, so a killed run leaves the old file or the new one."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def save_weights(out: Path, record: dict, state_dict: dict) -> None:
    """Write torch weights + training record to `out` atomically."""
    import torch
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(dict(record, state_dict=state_dict), tmp)
    tmp.replace(out)


def save_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)
