"""Which stage a miner trains: balance the stages by measured throughput, and move a miner when one starves.

A pipeline runs only as fast as its slowest stage, so the quantity to balance is each stage's capacity in
samples per second (the sum of its live miners' rates), not its head count. These are pure functions of
the miners' measured speeds, so they are tested directly.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

# A miner with no measurement yet counts as the median of its stage (or of everyone, for an empty stage),
# so a newcomer neither looks infinitely fast nor worthless.
_FALLBACK_SECONDS_PER_SAMPLE = 1.0
# Move a miner only if the starving stage has less than this share of the donor's capacity; hysteresis
# keeps miners from flapping between two stages of similar speed.
STARVING_SHARE = 0.5


@dataclass(frozen=True)
class MinerLoad:
    hotkey: str
    stage: int
    seconds_per_sample: float | None  # measured forward + backward time; None until measured


@dataclass(frozen=True)
class Move:
    hotkey: str
    from_stage: int
    to_stage: int


def _rates(miners: list[MinerLoad]) -> dict[str, float]:
    known = [m.seconds_per_sample for m in miners if m.seconds_per_sample]
    fallback = statistics.median(known) if known else _FALLBACK_SECONDS_PER_SAMPLE
    return {m.hotkey: 1.0 / (m.seconds_per_sample or fallback) for m in miners}


def stage_capacity(miners: list[MinerLoad], n_stages: int) -> list[float]:
    """Samples per second each stage can process with its current miners."""
    rates = _rates(miners)
    capacity = [0.0] * n_stages
    for m in miners:
        capacity[m.stage] += rates[m.hotkey]
    return capacity


def assign_stage(miners: list[MinerLoad], n_stages: int) -> int:
    """The stage a new miner should join: the one with least capacity (then fewest miners, then lowest)."""
    capacity = stage_capacity(miners, n_stages)
    counts = [sum(m.stage == s for m in miners) for s in range(n_stages)]
    return min(range(n_stages), key=lambda s: (capacity[s], counts[s], s))


def plan_move(miners: list[MinerLoad], n_stages: int) -> Move | None:
    """One move that relieves the most starved stage, or None if the pipeline is balanced enough.

    The donor is the stage with most capacity among those with at least two miners; it gives up its
    slowest miner, and only if it stays at least as fast as the starving stage becomes.
    """
    capacity = stage_capacity(miners, n_stages)
    rates = _rates(miners)
    starving = min(range(n_stages), key=lambda s: (capacity[s], s))
    donors = [s for s in range(n_stages) if s != starving and sum(m.stage == s for m in miners) >= 2]
    if not donors:
        return None
    donor = max(donors, key=lambda s: (capacity[s], -s))
    if capacity[starving] >= STARVING_SHARE * capacity[donor]:
        return None
    candidate = min((m for m in miners if m.stage == donor), key=lambda m: (rates[m.hotkey], m.hotkey))
    rate = rates[candidate.hotkey]
    if capacity[donor] - rate < capacity[starving] + rate and capacity[starving] > 0:
        return None
    return Move(hotkey=candidate.hotkey, from_stage=donor, to_stage=starving)
