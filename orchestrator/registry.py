"""Which hotkeys may call: those registered on the subnet, as the chain's metagraph last said."""

from __future__ import annotations

import asyncio
import logging

from common.chain import Chain, Neuron

log = logging.getLogger("iota.orchestrator")


class HotkeyRegistry:
    """Which hotkeys are registered on the subnet, refreshed from the chain in the background.

    The check runs inside request verification, so it must never wait on the chain: it reads a cached
    set, and a miss only asks the background loop to refresh sooner.
    """

    def __init__(self, chain: Chain, refresh_s: float) -> None:
        self.chain, self.refresh_s = chain, refresh_s
        self.hotkeys: frozenset[str] = frozenset()
        self.neurons: dict[str, Neuron] = {}
        self._wake = asyncio.Event()

    def refresh(self) -> None:
        neurons = {n.hotkey: n for n in self.chain.metagraph().neurons}
        self.neurons, self.hotkeys = neurons, frozenset(neurons)

    def validator_problem(self, hotkey: str, min_stake: float) -> str | None:
        """Why `hotkey` may not act as a validator (no permit, too little stake), or None."""
        neuron = self.neurons.get(hotkey)
        if neuron is None:
            return "this hotkey is not registered on the subnet"
        if not neuron.validator_permit:
            return "this hotkey has no validator permit"
        if neuron.stake < min_stake:
            return f"this hotkey has {neuron.stake:g} stake; validators need at least {min_stake:g}"
        return None

    def admit(self, hotkey: str) -> bool:
        if hotkey in self.hotkeys:
            return True
        self._wake.set()
        return False

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.refresh_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as error:  # the chain being unreachable must not stop the orchestrator
                log.warning("could not refresh the metagraph: %s", error)
            await asyncio.sleep(1.0)  # at most one refresh a second, however many misses


__all__ = ["HotkeyRegistry"]
