"""Training checkpoints that survive a killed session, shared by the trainers that stream their batches
(models/train_detect.py, models/train_deblend.py:train_stream): the model, optimiser and schedule with the step
and whatever else the loop keeps, written atomically, and read back only for the same configuration."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .progress import say


def save_checkpoint(path: Path, config: dict, model, opt, sched, **state) -> None:
    """torch.save to a temporary file beside `path`, then rename: a kill leaves the old checkpoint or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(state, config=config, model=model.state_dict(), opt=opt.state_dict(),
                    sched=sched.state_dict()), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | None, config: dict, model, opt, sched, device="cpu") -> dict | None:
    """Restore model, optimiser and schedule from `path` when it holds a checkpoint of `config`; returns the
    rest of what was saved (step, history, ...), or None (no checkpoint, or one of another configuration)."""
    if path is None or not path.exists():
        return None
    ck = torch.load(path, map_location=device, weights_only=False)
    if ck.get("config") != config:
        say(f"{path}: a checkpoint of another configuration; starting afresh")
        return None
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    say(f"resuming from {path} at step {ck['step']}/{config['steps']}")
    return {k: v for k, v in ck.items() if k not in ("config", "model", "opt", "sched")}
