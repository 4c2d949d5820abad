"""Polling for something another thread or process will do: the one loop the tests share."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.1) -> bool:
    """Whether `condition` held within `timeout_s`, checked every `poll_s` and once more at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float, poll_s: float) -> None:
    """`wait_until`, failing with TimeoutError (naming `what`) where a long end-to-end wait runs out."""
    if not wait_until(condition, timeout_s, poll_s):
        raise TimeoutError(f"not within {timeout_s} s: {what}")
