"""Run as `python bench/<name>.py`, a benchmark imports as `python -m bench.<name>` would have it.

A script's own folder is sys.path[0]: `bench/` is there and the repo root is not, so `bench.report` would
not import, and each benchmark would shadow any top-level module of its name (`model`, `merge`, ...). The
benchmarks import this first when they run as a script (`if not __package__`), and it puts the repo root in
that place. The roles' packages import through the editable install either way; `bench` is not installed
(it ships in no wheel), so it alone needs this.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent

if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == BENCH:
    sys.path[0] = str(BENCH.parent)
