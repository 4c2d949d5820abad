"""Long polls: a miner's request for work waits on its own event, which the scheduler sets (through the
`Waker` interface) when something that miner may take arrives."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Wakeups:
    """One event per long-polling miner, set when something that miner may take has arrived.

    A targeted wake-up (`notify`) is for work only that miner may do (its backward). Work any of many miners
    may take (a stage's forward) wakes just one miner that is parked in a long poll and wants it
    (`wake_one`): waking every miner of the stage for each item would have hundreds of them race for it.
    """

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._parked: dict[str, None] = {}  # insertion-ordered: the longest-waiting miner is woken first

    def event(self, hotkey: str) -> asyncio.Event:
        return self._events.setdefault(hotkey, asyncio.Event())

    def notify(self, hotkey: str) -> None:
        event = self._events.get(hotkey)
        if event is not None:
            event.set()

    @contextmanager
    def parked(self, hotkey: str) -> Iterator[None]:
        """While the caller's long poll waits for its event."""
        self._parked[hotkey] = None
        try:
            yield
        finally:
            self._parked.pop(hotkey, None)

    def wake_one(self, wants: Callable[[str], bool]) -> None:
        """Wake the longest-parked miner for which `wants(hotkey)` holds, if any is parked."""
        for hotkey in self._parked:
            if wants(hotkey):
                del self._parked[hotkey]  # the next item wakes another miner, not this one again
                self.notify(hotkey)
                return


__all__ = ["Wakeups"]
