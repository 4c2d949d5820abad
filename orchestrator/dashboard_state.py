"""What the dashboard shows that the run's state does not already keep, all of it bounded in memory:
the completion rate over time, the loss curve in bins, each validator's latest scores report, and the
chain's weight rows (read in the background, never inside a request).

The throughput history and the validators' reports live in memory only: after a restart the history
starts again and the reports come back with each validator's next round. The loss curve is rebuilt from
the loss log on the first request.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from common.chain import Chain, Neuron
from common.protocol import LossPoint, MinerConsensus, ScoresReport, ThroughputPoint
from orchestrator.db import StateDB

log = logging.getLogger("iota.orchestrator")

MAX_LOSS_BINS = 500
MAX_THROUGHPUT_POINTS = 600
RATE_SPAN = 5  # a point's rate is measured over this many snapshots back, to smooth the bursty completions
_LOSS_PAGE = 10_000
_K = TypeVar("_K", str, int)


class ThroughputHistory:
    """Snapshots of (time, samples completed), thinned as they accumulate: once there are more than
    `max_points`, every other one is dropped and the interval doubles, so the whole run stays visible in
    bounded memory at a coarser and coarser grain."""

    def __init__(self, interval_s: float, max_points: int = MAX_THROUGHPUT_POINTS) -> None:
        self.interval_s, self.max_points = interval_s, max_points
        self.points: list[tuple[float, int]] = []

    def record(self, at: float, completed: int) -> None:
        # 0.9: the loop wakes about every interval; a little jitter must not skip a snapshot.
        if self.points and at - self.points[-1][0] < 0.9 * self.interval_s:
            return
        self.points.append((at, completed))
        if len(self.points) > self.max_points:
            self.points = self.points[::2]
            self.interval_s *= 2

    def rates(self, tokens_per_sample: int) -> list[ThroughputPoint]:
        out: list[ThroughputPoint] = []
        for i in range(1, len(self.points)):
            (t0, c0), (t1, c1) = self.points[max(0, i - RATE_SPAN)], self.points[i]
            rate = (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0
            out.append(
                ThroughputPoint(
                    at=t1, samples_completed=c1, samples_per_s=rate, tokens_per_s=rate * tokens_per_sample
                )
            )
        return out


class LossCurve:
    """Mean loss per bin of sample ids, read incrementally from the loss log. Bins start one sample wide
    and double (merging neighbours) whenever there would be more than `max_bins`."""

    def __init__(self, max_bins: int = MAX_LOSS_BINS) -> None:
        self.max_bins = max_bins
        self.width = 1
        self.bins: dict[int, tuple[float, float, int]] = {}  # bin -> (sum of losses, sum of sample ids, n)
        self.after = 0  # the last loss-log position read
        self.count = 0

    def _add(self, key: int, loss: float, sample: float, n: int) -> None:
        s_loss, s_sample, count = self.bins.get(key, (0.0, 0.0, 0))
        self.bins[key] = (s_loss + loss, s_sample + sample, count + n)

    def update(self, db: StateDB) -> bool:
        """Read one page of new losses; whether the log may hold more."""
        rows = db.losses_after(self.after, _LOSS_PAGE)
        for seq, sample, _attempt, loss, _at, _pathway in rows:
            self._add(sample // self.width, loss, float(sample), 1)
            self.after, self.count = seq, self.count + 1
        while len(self.bins) > self.max_bins:
            old, self.bins, self.width = self.bins, {}, self.width * 2
            for key, (s_loss, s_sample, n) in old.items():
                self._add(key // 2, s_loss, s_sample, n)
        return len(rows) == _LOSS_PAGE

    def points(self) -> list[LossPoint]:
        return [
            LossPoint(sample=s_sample / n, loss=s_loss / n, count=n)
            for _, (s_loss, s_sample, n) in sorted(self.bins.items())
        ]


@dataclass(frozen=True)
class ReceivedScores:
    report: ScoresReport
    received_at: float


def _stake_weights(keys: list[_K], stake: Callable[[_K], float]) -> dict[_K, float]:
    # As validator.scoring weighs verdicts: by stake, or one each when none has any.
    weights = {k: s if math.isfinite(s := stake(k)) and s > 0 else 0.0 for k in keys}
    total = math.fsum(weights.values())
    if total <= 0:
        return {k: 1.0 / len(keys) for k in keys}
    return {k: w / total for k, w in weights.items()}


@dataclass
class _Tally:
    score: float = 0.0
    scored_share: float = 0.0  # the stake share of the validators that scored it
    weight: float = 0.0
    chain_weight: float = 0.0
    penalized: int = 0
    flagged: int = 0
    by_validator: dict[str, float] = field(default_factory=dict)


def consensus(
    reports: Mapping[str, ScoresReport],
    neurons: Mapping[str, Neuron],
    chain_weights: Mapping[int, Mapping[int, float]] | None,
    stage_of: Callable[[str], int | None],
) -> list[MinerConsensus]:
    """Stake-weighted consensus per miner of the validators' scores and weights, and of the chain's rows.

    A row is one neuron (hotkey and uid joined through the metagraph), or a hotkey or uid the metagraph
    no longer lists. Weights are stake-weighted means of rows that each sum to 1, so each column sums to
    1; a score is the mean over the validators that scored the miner.
    """
    by_uid = {n.uid: n.hotkey for n in neurons.values()}
    tallies: dict[tuple[str | None, int | None], _Tally] = {}

    def tally(hotkey: str | None, uid: int | None) -> _Tally:
        if hotkey is None and uid is not None:
            hotkey = by_uid.get(uid)
        if uid is None and hotkey is not None and hotkey in neurons:
            uid = neurons[hotkey].uid
        return tallies.setdefault((hotkey, uid), _Tally())

    def stake(hotkey: str) -> float:
        return neurons[hotkey].stake if hotkey in neurons else 0.0

    for validator, share in _stake_weights(sorted(reports), stake).items():
        report = reports[validator]
        for hotkey, entry in report.scores.items():
            t = tally(hotkey, None)
            t.score += share * entry.score
            t.scored_share += share
            t.penalized += entry.penalized
            t.flagged += entry.flagged
            t.by_validator[validator] = entry.score
        for uid, weight in report.weights.items():
            tally(None, uid).weight += share * weight
    if chain_weights:
        rows = {uid: row for uid, row in chain_weights.items() if row}
        for validator_uid, share in _stake_weights(
            sorted(rows), lambda u: stake(by_uid[u]) if u in by_uid else 0.0
        ).items():
            for uid, weight in rows[validator_uid].items():
                tally(None, uid).chain_weight += share * weight

    out = [
        MinerConsensus(
            hotkey=hotkey,
            uid=uid,
            stage=stage_of(hotkey) if hotkey else None,
            score=t.score / t.scored_share if t.scored_share > 0 else None,
            weight=t.weight,
            chain_weight=None if chain_weights is None else t.chain_weight,
            penalized_by=t.penalized,
            flagged_by=t.flagged,
            by_validator=t.by_validator,
        )
        for (hotkey, uid), t in tallies.items()
    ]
    return sorted(out, key=lambda c: (c.uid is None, c.uid or 0, c.hotkey or ""))


class DashboardState:
    """The dashboard's own bookkeeping; `run()` is the background task that feeds it."""

    def __init__(
        self,
        chain: Chain,
        db: StateDB,
        completed: Callable[[], int],
        clock: Callable[[], float],
        *,
        sample_every_s: float = 2.0,
        chain_every_s: float = 30.0,
    ) -> None:
        self.chain, self.db, self.completed, self.clock = chain, db, completed, clock
        self.sample_every_s, self.chain_every_s = sample_every_s, chain_every_s
        self.throughput = ThroughputHistory(sample_every_s)
        self.losses = LossCurve()
        # Latest report per validator hotkey. Only hotkeys with a validator permit may post, so this is
        # bounded by the subnet's validator slots.
        self.scores: dict[str, ReceivedScores] = {}
        self.chain_weights: dict[int, dict[int, float]] | None = None
        self._chain_failing = False

    def receive(self, validator: str, report: ScoresReport) -> None:
        self.scores[validator] = ReceivedScores(report, self.clock())

    async def refresh_chain_weights(self) -> None:
        try:
            self.chain_weights = await asyncio.to_thread(self.chain.weights)
            self._chain_failing = False
        except Exception as error:  # the chain being unreachable must not stop the orchestrator
            if not self._chain_failing:
                log.warning("could not read the chain's weights (the dashboard keeps the last): %s", error)
            self._chain_failing = True

    async def catch_up_losses(self) -> None:
        # A page at a time, yielding between pages: after a restart of a long run the whole log is read
        # again, and requests must not wait for that.
        while self.losses.update(self.db):
            await asyncio.sleep(0)

    async def run(self) -> None:
        last_chain = -math.inf
        while True:
            now = self.clock()
            self.throughput.record(now, self.completed())
            await self.catch_up_losses()
            if now - last_chain >= self.chain_every_s:
                last_chain = now
                await self.refresh_chain_weights()
            await asyncio.sleep(self.sample_every_s)
