"""The classical stages as a run configuration lists them: background, SEP's detection (`method: sep`, not the
learned detector, the detect stage's default) and measurement. The orchestration and fault tests run these:
what they test is the orchestration's, and the learned stages would double each run's time (they are tested on
their own and in the session's default run)."""
from __future__ import annotations

CLASSICAL_STAGES = [{"name": "background"}, {"name": "detect", "params": {"method": "sep"}}, {"name": "measure"}]
