"""Named kill points for the crash tests: the process SIGKILLs itself where a real crash could strike.

`RLHF_KILL_AT=<point>[:<n>]` makes the n-th arrival (default the first) at `kill_point("<point>")` in this process
kill it with SIGKILL: no exception handler, `finally` block or atexit hook runs, as with an out-of-memory kill or
a pulled plug. Unset, a kill point is one environment lookup. The points (see the reliability tests):
`publish:<stage>` before a stage's Parquet output is written; `write-parquet` and `write-dir` between writing a
temporary file or folder and renaming it into place; `progress:<stage>` at every progress step (a decode step of
generation, an optimizer step of an update); `optimizer-step:rank<r>` after each optimizer step of rank r inside
the update (torchrun and Ray Train workers too, which report no progress); `mlflow-log` between registering an
iteration's checkpoint and logging its metrics.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

KILL_AT_ENV = "RLHF_KILL_AT"
_arrivals: Counter[str] = Counter()


def kill_point(name: str) -> None:
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    point, _, nth = spec.rpartition(":") if spec.rsplit(":", 1)[-1].isdigit() else (spec, "", "1")
    if point != name:
        return
    _arrivals[name] += 1
    if _arrivals[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
