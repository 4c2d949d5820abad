"""`iota miner` on a machine whose clock is wrong: the wall clock of this one process is shifted by the
seconds written in the file named by $SKEWED_CLOCK_FILE (a test rewrites it to break and to fix the clock;
no file, or no number in it, means no shift).

    SKEWED_CLOCK_FILE=/tmp/offset python tests/skewed_miner.py miner

Only `time.time` and `time.time_ns` move, as they do when a system clock is off; monotonic clocks do not.
The product runs unchanged: requests are signed with the shifted time because `common.auth` reads
`time.time_ns()` at call time.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

OFFSET_FILE_ENV = "SKEWED_CLOCK_FILE"
_REREAD_S = 0.2  # how stale the offset may be: a rewrite takes effect within this long

_real_time, _real_time_ns = time.time, time.time_ns


class _Offset:
    """The offset in the file, read again at most every `_REREAD_S` (time.time is called often)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.seconds = 0.0
        self.read_at = -_REREAD_S

    def __call__(self) -> float:
        now = time.monotonic()
        if self.path is not None and now - self.read_at >= _REREAD_S:
            self.read_at = now
            try:
                self.seconds = float(self.path.read_text().strip() or 0)
            except (OSError, ValueError):
                self.seconds = 0.0
        return self.seconds


def install(offset: _Offset) -> None:
    time.time = lambda: _real_time() + offset()
    time.time_ns = lambda: _real_time_ns() + int(offset() * 1e9)


def set_offset(path: Path, seconds: float) -> None:
    """Shift the clock of the miner reading `path` by `seconds` (atomically: it never reads half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{seconds}\n")
    tmp.replace(path)


def main() -> None:
    named = os.environ.get(OFFSET_FILE_ENV)
    install(_Offset(Path(named) if named else None))
    from iota.cli import app  # after the patch, so that nothing holds the real functions

    app(args=sys.argv[1:], prog_name="iota")


if __name__ == "__main__":
    main()
