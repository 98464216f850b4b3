"""Progress lines of the training loops (and of the training-set builders and evaluations that call them):
one line on standard error per step, flushed, so that a run in the background can be followed in its log."""
from __future__ import annotations

import sys


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
