"""How a daemon stops, whatever it is doing: the first SIGINT or SIGTERM sets a stop event, which its loops,
its retries (`common.client`, `common.storage`) and its transfers watch, and arms a deadline; a second
signal, or the deadline, ends the process at once.

The graceful path covers waiting, retrying and moving bytes. What it cannot cut short is one blocking
call already under way (a request to a stalled server waits into its timeout): the deadline covers that.
Ending a miner or validator abruptly loses nothing that was acknowledged: an item it held is requeued by
the orchestrator when its deadline passes, and the orchestrator's SQLite state commits before it answers.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("iota.stop")

# Every daemon is gone within STOP_PROMISE_S of the first signal (the docs and pm2/app.js say so). The
# deadline leaves the rest of it for the forced exit itself.
STOP_PROMISE_S = 10.0
STOP_DEADLINE_S = 8.0


class Stopping(Exception):
    """This process is stopping: a retry, a transfer or a wait was abandoned rather than started."""


def raise_if_stopping(stop: threading.Event | None, what: str) -> None:
    """Raise `Stopping` if `stop` is set, naming `what` was not started."""
    if stop is not None and stop.is_set():
        raise Stopping(f"{what}: not started, this process is stopping")


def pause(stop: threading.Event | None, what: str) -> Callable[[float], None]:
    """A sleep for tenacity's `Retrying(sleep=...)`: the wait between two tries, cut short by `stop`, after
    which the retry is abandoned with `Stopping`."""

    def sleep(seconds: float) -> None:
        if stop is None:
            time.sleep(seconds)
        elif stop.wait(seconds):
            raise Stopping(f"{what}: not retried, this process is stopping")

    return sleep


def exit_now(code: int = 0) -> None:
    """End the process without the interpreter's teardown, once a daemon has finished by itself: with
    torch and the chain SDK loaded, collecting every module takes seconds (5 s and more on a busy machine),
    which would eat into the stop promise for nothing. Logs and the standard streams are flushed first;
    files the daemon wrote are closed already."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def force_exit(name: str, signum: int, why: str) -> None:
    """End the process now, whatever it is doing (buffers of files still open are lost; logs are flushed)."""
    log.warning("%s: %s; exiting now", name, why)
    exit_now(128 + signum)


class StopSignals:
    """The handler of SIGINT and SIGTERM: the first sets `event` and arms the deadline, the second exits."""

    def __init__(self, name: str, deadline_s: float = STOP_DEADLINE_S) -> None:
        self.name, self.deadline_s = name, deadline_s
        self.event = threading.Event()

    def install(self) -> threading.Event:
        """Take SIGINT and SIGTERM (call from the main thread); returns the stop event."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)
        return self.event

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        name = signal.Signals(signum).name
        if self.event.is_set():
            force_exit(self.name, signum, f"a second signal ({name}) while stopping")
        self.event.set()
        log.info(
            "%s: %s received, stopping (within %.0f s; a second signal exits at once)",
            self.name,
            name,
            self.deadline_s,
        )
        why = f"still running {self.deadline_s:.0f} s after {name}"
        timer = threading.Timer(self.deadline_s, force_exit, (self.name, signum, why))
        timer.daemon = True  # a process that stops in time does not wait for it
        timer.start()


def stop_on_signals(name: str, deadline_s: float = STOP_DEADLINE_S) -> threading.Event:
    """Install `StopSignals` for daemon `name`; returns the event its loops watch."""
    return StopSignals(name, deadline_s).install()
