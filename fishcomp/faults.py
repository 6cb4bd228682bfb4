"""Named pause points, so that tests can interrupt a stage at a known place instead of racing the
machine's speed with a sleep.

With `FISHCOMP_PAUSE_AT=<point>` (or `<point>:<n>`, the n-th time) in the environment, when the
process reaches that point it creates the file named by `FISHCOMP_PAUSE_MARKER` and then waits
until it is signalled (Ctrl-C, SIGTERM). Unset, a pause point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_AT = "FISHCOMP_PAUSE_AT"
PAUSE_MARKER = "FISHCOMP_PAUSE_MARKER"


_reached: dict[str, int] = {}


def pause_point(name: str) -> None:
    wanted = os.environ.get(PAUSE_AT)
    if wanted is None or wanted.split(":")[0] != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(wanted.partition(":")[2] or 1):
        return
    marker = os.environ.get(PAUSE_MARKER)
    if marker:
        Path(marker).write_text(name)
    while True:  # until a signal unwinds the process (SIGINT, or SIGTERM handled as an interrupt)
        time.sleep(0.05)
