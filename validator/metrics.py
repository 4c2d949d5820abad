"""The validator's Prometheus metrics and its status line, both read from the daemon's own state (its replay
counts and its latest weights round), so they never disagree with each other or with its report file."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import Metric

from common.metrics import SECONDS_BUCKETS, StateCollector, counter, gauge, labelled_counter, labelled_gauge

if TYPE_CHECKING:
    from validator.daemon import ValidatorDaemon


class ValidatorMetrics:
    def __init__(self, daemon: ValidatorDaemon) -> None:
        self.daemon = daemon
        self.rounds = 0  # weights rounds set on the chain
        self.round_failures = 0
        self.registry = CollectorRegistry()
        self.replay_seconds = Histogram(
            "iota_validator_replay_seconds",
            "Seconds each judged replay took (the whole shadowed epoch of one miner at one stage).",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(StateCollector(self._families))

    def _families(self) -> Iterator[Metric]:
        d = self.daemon
        yield labelled_gauge(
            "iota_validator_info",
            "This validator's hotkey and replay device (always 1).",
            ["hotkey", "device"],
            [([d.keypair.ss58_address, d.device], 1.0)],
        )
        yield labelled_counter(
            "iota_validator_replays",
            "Replays by result: passed, failed (the work did not reproduce), unreplayable (not judged).",
            ["result"],
            [([result], n) for result, n in dict(d.replays).items()],
        )
        yield counter("iota_validator_weight_rounds", "Weights rounds set on the chain.", self.rounds)
        yield counter(
            "iota_validator_weight_round_failures",
            "Weights rounds that failed (retried next round).",
            self.round_failures,
        )
        last = d.last_round
        if last is None:
            return
        yield gauge(
            "iota_validator_last_round_timestamp_seconds", "When the latest weights were set.", last.at
        )
        yield gauge(
            "iota_validator_last_round_epoch", "The epoch the latest weights were computed after.", last.epoch
        )
        yield labelled_gauge(
            "iota_validator_miner_score",
            "Each miner's score in the latest round (validated work x CLASP quality; 0 if penalized).",
            ["hotkey"],
            [([hotkey], s.score) for hotkey, s in sorted(last.scores.items())],
        )
        yield labelled_gauge(
            "iota_validator_miner_weight",
            "The weight set on each uid in the latest round (they sum to 1).",
            ["uid"],
            [([str(uid)], w) for uid, w in sorted(last.weights.items())],
        )
        yield gauge(
            "iota_validator_flagged_miners",
            "Miners CLASP flagged in the latest round.",
            len(last.clasp_flagged),
        )
        yield gauge(
            "iota_validator_penalized_miners",
            "Miners whose score the latest round zeroed (failed replay, merge flag, not registered).",
            sum(s.penalized for s in last.scores.values()),
        )


class ValidatorStatusLine:
    """'replays 3 passed, 0 failed, 0 unreplayable | weights 2 rounds, last 4 s ago after epoch 2 ...'"""

    def __init__(self, metrics: ValidatorMetrics) -> None:
        self.metrics = metrics

    def render(self) -> str:
        m, d = self.metrics, self.metrics.daemon
        replays = dict(d.replays)
        parts = [
            f"replays {replays.get('passed', 0)} passed, {replays.get('failed', 0)} failed, "
            f"{replays.get('unreplayable', 0)} unreplayable"
        ]
        last = d.last_round
        if last is None:
            parts.append(f"no weights set yet ({m.round_failures} rounds failed)")
        else:
            penalized = sum(s.penalized for s in last.scores.values())
            ago = time.time() - last.at
            parts.append(
                f"weights: {m.rounds} rounds, last {ago:.0f} s ago after epoch {last.epoch} on "
                f"{len(last.weights)} uids ({penalized} penalized, {len(last.clasp_flagged)} flagged)"
            )
        return " | ".join(parts)
