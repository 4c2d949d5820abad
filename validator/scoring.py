"""Miner scores from the orchestrator's epoch ledgers, and chain weights from the scores.

Everything here is a pure function of its arguments, so anyone holding the public ledgers, the
metagraph and the CLASP factors can recompute a validator's weights.

The formula
-----------
Let E be the highest epoch among the ledgers and W = ``window_epochs``. The window is the epochs
``E-W+1 .. E``; ledgers of older epochs are ignored, and so are verdicts about older epochs (a verdict
counts for the epoch it replayed, ``VerdictRecord.epoch``, whichever ledger it was published in).

For a miner m and an epoch e of the window::

    work(m, e) = items(m, e) + partition_weight * partitions(m, e)     (0 if m has no entry in e)
    work(m)    = sum over e in the window of  decay ** (E - e) * work(m, e)
    score(m)   = q(m) * work(m)     if m is registered and not penalized
               = 0                  otherwise

where ``q(m) = quality.get(m, 1.0)`` is the CLASP factor, in [0, 1].

m is *penalized* if, for some epoch e of the window:

(a) its replay of e failed: take the verdicts about (m, e), one per validator (a validator's latest
    verdict, by ``at``); the replay failed if the stake of the validators whose verdict failed is more
    than half the stake of all of them. A validator with unknown or zero stake weighs 0; if they all
    weigh 0, each weighs 1 (a plain majority). A single verdict decides alone.
(b) the merge flagged it in e (``MinerEpochWork.flags`` is not empty).

A penalty lasts exactly as long as the epoch that caused it is inside the window: cheating once
forfeits the whole window.

Weights: with S = the sum of score(m) over the miners registered in the metagraph and
b = ``burn_fraction``::

    weight[uid(m)]  = (1 - b) * score(m) / S      for each registered m         (if S > 0)
    weight[burn_uid] += b                          (added to a miner's share if burn_uid is one)
    weight           = {burn_uid: 1.0}             (if S == 0)

Zero weights are dropped; the weights sum to 1.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.chain.base import Metagraph
from common.protocol import EpochLedger, VerdictRecord


@dataclass(frozen=True)
class ScoringConfig:
    window_epochs: int = 8  # epochs that count: the latest finished epoch E and the 7 before it
    decay: float = 0.8  # an epoch e counts decay**(E - e)
    partition_weight: float = 1.0  # work units per reduced partition the merge used
    burn_fraction: float = 0.0  # share of the weights set on burn_uid
    burn_uid: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.window_epochs, bool) or not isinstance(self.window_epochs, int):
            raise ValueError(f"window_epochs must be an int, got {self.window_epochs!r}")
        if self.window_epochs < 1:
            raise ValueError(f"window_epochs must be >= 1, got {self.window_epochs}")
        if not (math.isfinite(self.decay) and 0 < self.decay <= 1):
            raise ValueError(f"decay must be in (0, 1], got {self.decay!r}")
        if not (math.isfinite(self.partition_weight) and self.partition_weight >= 0):
            raise ValueError(f"partition_weight must be finite and >= 0, got {self.partition_weight!r}")
        if not (math.isfinite(self.burn_fraction) and 0 <= self.burn_fraction <= 1):
            raise ValueError(f"burn_fraction must be in [0, 1], got {self.burn_fraction!r}")
        if isinstance(self.burn_uid, bool) or not isinstance(self.burn_uid, int) or self.burn_uid < 0:
            raise ValueError(f"burn_uid must be a uid (an int >= 0), got {self.burn_uid!r}")


@dataclass(frozen=True)
class MinerScore:
    hotkey: str
    work: float  # decayed validated work over the window
    quality: float  # CLASP factor used
    penalized: bool
    reasons: list[str]  # why penalized (failed replay, merge flag), and "not registered"
    score: float


def _weight(stake: float | None) -> float:
    return stake if stake is not None and math.isfinite(stake) and stake > 0 else 0.0


def _latest_per_validator(verdicts: Sequence[VerdictRecord]) -> list[VerdictRecord]:
    latest: dict[str, VerdictRecord] = {}
    for record in verdicts:
        seen = latest.get(record.validator)
        if seen is None or (record.at, record.task_id) > (seen.at, seen.task_id):
            latest[record.validator] = record
    return [latest[v] for v in sorted(latest)]


def replay_failed(verdicts: Sequence[VerdictRecord], stakes: Mapping[str, float]) -> bool:
    """Whether the verdicts about one (miner, epoch) fail it, per the module docstring's rule (a).

    Each validator counts once, with its latest verdict; the failing stake must exceed half the total
    (exactly half passes). With no stake at all, a plain majority of validators decides.
    """
    opinions = _latest_per_validator(verdicts)
    if not opinions:
        return False
    weights = [_weight(stakes.get(r.validator)) for r in opinions]
    if math.fsum(weights) == 0:
        weights = [1.0] * len(opinions)
    failing = math.fsum(w for w, r in zip(weights, opinions, strict=True) if not r.verdict.passed)
    return failing > math.fsum(weights) / 2


def score_miners(
    ledgers: Sequence[EpochLedger],
    quality: Mapping[str, float],
    metagraph: Metagraph,
    config: ScoringConfig,
) -> dict[str, MinerScore]:
    """Score every miner named in the window's ledgers (its work or a verdict about it), by hotkey.

    Raises ValueError if two ledgers share an epoch, a work count is negative, or a quality factor is
    outside [0, 1].
    """
    if not ledgers:
        return {}
    epochs = [ledger.epoch for ledger in ledgers]
    duplicated = sorted({e for e in epochs if epochs.count(e) > 1})
    if duplicated:
        raise ValueError(f"more than one ledger for epoch(s) {duplicated}")
    last = max(epochs)
    first = last - config.window_epochs + 1

    work: dict[str, float] = defaultdict(float)
    penalties: dict[str, list[str]] = defaultdict(list)
    verdicts: dict[tuple[str, int], list[VerdictRecord]] = defaultdict(list)
    for ledger in ledgers:
        # Verdicts are published when the replay finishes, possibly in a later ledger than their epoch.
        for record in ledger.verdicts:
            if first <= record.epoch <= last:
                verdicts[(record.miner, record.epoch)].append(record)
        if ledger.epoch < first:
            continue
        factor = config.decay ** (last - ledger.epoch)
        for entry in ledger.miners:
            if entry.items < 0 or entry.partitions < 0:
                raise ValueError(f"negative work for {entry.hotkey} in epoch {ledger.epoch}")
            work[entry.hotkey] += factor * (entry.items + config.partition_weight * entry.partitions)
            penalties[entry.hotkey].extend(f"merge flag in epoch {ledger.epoch}: {f}" for f in entry.flags)

    stakes = {n.hotkey: n.stake for n in metagraph.neurons}
    for (miner, epoch), group in sorted(verdicts.items()):
        if replay_failed(group, stakes):
            penalties[miner].extend(
                f"failed replay in epoch {epoch} by validator {r.validator}: {r.verdict.failure or '-'}"
                for r in _latest_per_validator(group)
                if not r.verdict.passed
            )

    registered = set(metagraph.hotkeys)
    scores: dict[str, MinerScore] = {}
    for hotkey in sorted(work.keys() | {miner for miner, _ in verdicts}):
        q = quality.get(hotkey, 1.0)
        if not (math.isfinite(q) and 0 <= q <= 1):
            raise ValueError(f"quality of {hotkey} must be in [0, 1], got {q!r}")
        reasons = sorted(penalties.get(hotkey, []))
        penalized = bool(reasons)
        if hotkey not in registered:
            reasons.append("not registered")
        score = 0.0 if reasons else q * work[hotkey]
        scores[hotkey] = MinerScore(hotkey, work[hotkey], q, penalized, reasons, score)
    return scores


def weights_from_scores(
    scores: Mapping[str, MinerScore], metagraph: Metagraph, config: ScoringConfig
) -> dict[int, float]:
    """Chain weights {uid: weight}, per the module docstring: non-negative, finite, summing to 1.

    Only miners registered in `metagraph` get weight. Raises ValueError if a score is negative or not
    finite, or if the burn uid would get weight but is not in the metagraph.
    """
    uid_of = {n.hotkey: n.uid for n in metagraph.neurons}
    paid: dict[int, float] = {}
    for score in scores.values():
        if not (math.isfinite(score.score) and score.score >= 0):
            raise ValueError(f"score of {score.hotkey} must be finite and >= 0, got {score.score!r}")
        uid = uid_of.get(score.hotkey)
        if uid is not None and score.score > 0:
            paid[uid] = paid.get(uid, 0.0) + score.score
    total = math.fsum(paid.values())

    if total == 0:
        weights = {config.burn_uid: 1.0}
    else:
        share = 1.0 - config.burn_fraction
        weights = {uid: share * value / total for uid, value in paid.items()}
        weights[config.burn_uid] = weights.get(config.burn_uid, 0.0) + config.burn_fraction
    weights = {uid: w for uid, w in sorted(weights.items()) if w > 0}
    if config.burn_uid in weights and config.burn_uid not in set(metagraph.uids):
        raise ValueError(f"burn uid {config.burn_uid} gets weight but is not registered in the metagraph")
    return weights
