"""What the rest of IOTA needs from a chain: who is registered, with what stake, and where weights go.

Two backends implement `Chain`: `LocalChain` (a JSON file, for the one-command devnet and tests) and
`BittensorChain` (the real subnet). Code above this layer never imports the bittensor SDK's chain API.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

from bittensor.sp_core import Keypair
from pydantic import BaseModel, ConfigDict


class ChainError(RuntimeError):
    """A chain read or write failed, or the chain refused it; the message says which and why."""


class Neuron(BaseModel):
    """One registered hotkey on the subnet."""

    model_config = ConfigDict(frozen=True)

    uid: int
    hotkey: str
    coldkey: str
    # TAO on the local chain. On bittensor it is the neuron's total stake weight in the subnet's
    # own units (alpha plus TAO-weighted root stake): the number Yuma consensus weighs validators by.
    stake: float
    validator_permit: bool


class Metagraph(BaseModel):
    """The subnet's neurons at one block, ordered by uid."""

    model_config = ConfigDict(frozen=True)

    netuid: int
    block: int
    neurons: list[Neuron]

    @property
    def hotkeys(self) -> list[str]:
        return [n.hotkey for n in self.neurons]

    @property
    def uids(self) -> list[int]:
        return [n.uid for n in self.neurons]

    def by_hotkey(self, hotkey: str) -> Neuron | None:
        # A linear scan: subnets hold at most a few hundred neurons and callers rarely loop over this.
        return next((n for n in self.neurons if n.hotkey == hotkey), None)

    def by_uid(self, uid: int) -> Neuron | None:
        return next((n for n in self.neurons if n.uid == uid), None)


def normalize_weights(weights: Mapping[int, float]) -> dict[int, float]:
    """Check weights are finite and non-negative with a positive sum, and scale them to sum to 1.

    Both backends run this first, so a bad vector fails the same way, before any chain is contacted.
    """
    clean: dict[int, float] = {}
    for uid, weight in weights.items():
        if isinstance(uid, bool) or not isinstance(uid, int) or uid < 0:
            raise ChainError(f"weight key {uid!r} is not a uid (a non-negative int)")
        value = float(weight)
        if not math.isfinite(value):
            raise ChainError(f"weight for uid {uid} is not finite: {weight!r}")
        if value < 0:
            raise ChainError(f"weight for uid {uid} is negative: {weight!r}")
        clean[uid] = value
    total = math.fsum(clean.values())
    if total <= 0:
        raise ChainError("weights are all zero (or empty); there is nothing to normalise")
    return {uid: value / total for uid, value in sorted(clean.items())}


class Chain(ABC):
    """A subnet's identities and weight sink."""

    netuid: int

    @abstractmethod
    def metagraph(self) -> Metagraph:
        """The subnet's neurons (a backend may serve a recent cached copy)."""

    @abstractmethod
    def block(self) -> int:
        """The current block number."""

    @abstractmethod
    def set_weights(self, hotkey: Keypair, weights: Mapping[int, float]) -> None:
        """Set `hotkey`'s weights, {uid: weight} (relative; only proportions matter)."""

    @abstractmethod
    def weights(self) -> dict[int, dict[int, float]]:
        """Each validator's latest weights on the subnet, {validator_uid: {uid: weight}}, each row summing
        to 1 (a backend may serve a recent cached copy). Read-only."""

    def neuron(self, hotkey: str) -> Neuron | None:
        return self.metagraph().by_hotkey(hotkey)

    def is_registered(self, hotkey: str) -> bool:
        return self.neuron(hotkey) is not None
