"""The orchestrator's Prometheus metrics (`GET /metrics`) and its periodic status line.

Counts that the orchestrator already keeps (samples, queues, miners, epochs, merges, replays) are read from
its state at scrape time, so they survive restarts and cannot drift from `/v1/status`. Only events with a
duration or a value distribution (item latency, merge duration, losses) are recorded as they happen.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import Metric

from common.metrics import SECONDS_BUCKETS, StateCollector, counter, gauge, labelled_counter, labelled_gauge
from common.protocol import MinerConsensus, work_kind
from orchestrator.dashboard_state import consensus
from orchestrator.db import Item
from orchestrator.stage_merge import MergeState

if TYPE_CHECKING:
    from orchestrator.service import Orchestrator

log = logging.getLogger("iota.orchestrator")

_EPOCH_PHASES = ("training", "draining", "merging")
_MERGE_PHASES = ("idle", "upload", "reduce", "finalize", "apply")
_VERDICTS = ("passed", "failed", "skipped", "expired")  # a replay task's final states
_LOSS_BUCKETS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, math.inf)


class OrchestratorMetrics:
    def __init__(self, n_stages: int) -> None:
        self.n_stages = n_stages
        self.registry = CollectorRegistry()
        self.items = Counter(
            "iota_items_completed",
            "Work items accepted since this orchestrator started, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.item_latency = Histogram(
            "iota_item_latency_seconds",
            "Seconds from handing a work item out to accepting its completion, by kind.",
            ["kind"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.losses = Histogram(
            "iota_sample_loss",
            "The tail's reported loss of each completed forward.",
            buckets=_LOSS_BUCKETS,
            registry=self.registry,
        )
        self.merge_duration = Histogram(
            "iota_merge_duration_seconds",
            "Seconds from the start of a stage's merge to its end (merged or rolled back), by stage.",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        for kind in ("forward", "backward", "tail"):
            self.items.labels(kind)  # every kind shows from the first scrape, at 0
        self.last_loss: float | None = None

    # -- events -------------------------------------------------------------------------------------------

    def item_done(self, it: Item) -> None:
        kind = work_kind(it.kind, it.stage, self.n_stages)
        self.items.labels(kind).inc()
        if it.assigned_at is not None and it.completed_at is not None:
            self.item_latency.labels(kind).observe(max(0.0, it.completed_at - it.assigned_at))
        if it.loss is not None and math.isfinite(it.loss):
            self.last_loss = it.loss
            self.losses.observe(it.loss)

    def merge_closed(self, state: MergeState) -> None:
        if state.finished_at is not None:
            self.merge_duration.labels(str(state.stage)).observe(
                max(0.0, state.finished_at - state.started_at)
            )

    # -- state, read at scrape time -----------------------------------------------------------------------

    def watch(self, orch: Orchestrator) -> None:
        self.registry.register(StateCollector(lambda: _state_families(orch, self.last_loss)))


def _state_families(orch: Orchestrator, last_loss: float | None) -> Iterator[Metric]:
    sched, epochs, spec = orch.scheduler, orch.epochs, orch.spec
    stages = [str(s) for s in range(spec.model.n_stages)]
    tokens_per_sample = spec.data.batch_size * spec.data.seq_len
    yield labelled_gauge(
        "iota_run_info",
        "The run this orchestrator serves (always 1).",
        ["run_id", "preset", "stages"],
        [([orch.run_id, spec.model.name, str(spec.model.n_stages)], 1.0)],
    )
    yield counter(
        "iota_samples_completed", "Samples trained through every stage, in the whole run.", sched.completed
    )
    yield counter(
        "iota_tokens_processed",
        "Tokens trained: completed samples x batch size x sequence length.",
        sched.completed * tokens_per_sample,
    )
    yield counter("iota_samples_issued", "Samples handed to the head so far.", sched.next_sample)
    yield counter("iota_samples_dropped", "Samples given up after their last attempt.", sched.dropped)
    yield counter(
        "iota_attempts_failed",
        "Sample attempts abandoned (deadline, dead miner, bad upload).",
        sched.attempts_failed,
    )
    yield gauge("iota_samples_in_flight", "Samples somewhere in the pipeline now.", sched.in_flight())
    yield gauge(
        "iota_samples_waiting_retry", "Samples waiting to start another attempt.", sched.waiting_retry()
    )

    queued = {(stage, kind): 0 for stage in stages for kind in ("forward", "backward")}
    for it in sched.items.values():
        if it.status == "queued":
            queued[(str(it.stage), it.kind)] += 1
    yield labelled_gauge(
        "iota_queue_depth",
        "Work items waiting for a miner, by stage and kind.",
        ["stage", "kind"],
        [([stage, kind], n) for (stage, kind), n in queued.items()],
    )

    miners = {(stage, state): 0 for stage in stages for state in ("active", "inactive")}
    for m in sched.miners.values():
        miners[(str(m.stage), "active" if m.active else "inactive")] += 1
    yield labelled_gauge(
        "iota_miners",
        "Registered miners by stage and state.",
        ["stage", "state"],
        [([stage, state], n) for (stage, state), n in miners.items()],
    )

    state = epochs.state
    yield gauge("iota_epoch", "The current epoch (merges so far of the whole run).", state.epoch)
    yield labelled_gauge(
        "iota_epoch_phase",
        "1 for the epoch clock's current phase.",
        ["phase"],
        [([phase], float(phase == state.phase)) for phase in _EPOCH_PHASES],
    )
    yield labelled_gauge(
        "iota_merge_phase",
        "1 for each stage's current merge phase (idle outside a merge).",
        ["stage", "phase"],
        [
            ([stage, phase], float(phase == (epochs.merge_phase(int(stage)) or "idle")))
            for stage in stages
            for phase in _MERGE_PHASES
        ],
    )
    yield labelled_gauge(
        "iota_stage_version",
        "Each stage's global weights version (its merges so far).",
        ["stage"],
        [([stage], v) for stage, v in zip(stages, epochs.versions, strict=True)],
    )
    yield labelled_counter(
        "iota_merges",
        "Stage merges by result, in the whole run.",
        ["result"],
        [(["completed"], epochs.merges_completed), (["rolled_back"], epochs.merges_rolled_back)],
    )

    counts = orch.validation.counts()
    yield labelled_counter(
        "iota_validations",
        "Replay tasks by final result, in the whole run.",
        ["result"],
        [([result], counts.get(result, 0)) for result in _VERDICTS],
    )
    yield labelled_gauge(
        "iota_validations_pending",
        "Replay tasks waiting for a validator or leased to one.",
        ["state"],
        [([s], counts.get(s, 0)) for s in ("queued", "leased")],
    )
    if last_loss is not None:
        yield gauge("iota_loss", "The latest loss the tail reported.", last_loss)
    yield from _score_families(orch)


def _score_families(orch: Orchestrator) -> Iterator[Metric]:
    """Validators' latest scores reports and the chain's weights, as the dashboard combines them (stake-
    weighted consensus per miner)."""
    board, sched = orch.dashboard, orch.scheduler
    reports = {hotkey: received.report for hotkey, received in board.scores.items()}
    yield gauge(
        "iota_validator_reports",
        "Validators whose latest scores report this orchestrator holds.",
        len(reports),
    )
    rows = consensus(
        reports,
        orch.registry.neurons,
        board.chain_weights,
        lambda hotkey: m.stage if (m := sched.miners.get(hotkey)) else None,
    )
    labels = ["hotkey", "uid"]

    def key(c: MinerConsensus) -> list[str]:
        return [c.hotkey or "", "" if c.uid is None else str(c.uid)]

    yield labelled_gauge(
        "iota_miner_score",
        "Each miner's score: the stake-weighted mean over the validators that scored it.",
        labels,
        [(key(c), c.score) for c in rows if c.score is not None],
    )
    yield labelled_gauge(
        "iota_miner_weight",
        "The weight validators reported setting on each uid, stake-weighted across validators.",
        labels,
        [(key(c), c.weight) for c in rows],
    )
    yield labelled_gauge(
        "iota_miner_chain_weight",
        "The weight on each uid in the chain's rows, stake-weighted across validators (absent until read).",
        labels,
        [(key(c), c.chain_weight) for c in rows if c.chain_weight is not None],
    )


class StatusLine:
    """One human-readable line about the whole run, for the orchestrator's log every few seconds."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self._last = (time.monotonic(), orch.scheduler.completed)

    def render(self) -> str:
        orch = self.orch
        sched, epochs, spec = orch.scheduler, orch.epochs, orch.spec
        now, done = time.monotonic(), sched.completed
        since, done_before = self._last
        self._last = (now, done)
        rate = (done - done_before) / (now - since) if now > since else 0.0
        per_stage = [0] * spec.model.n_stages
        for m in sched.miners.values():
            if m.active:
                per_stage[m.stage] += 1
        counts = orch.validation.counts()
        tokens = rate * spec.data.batch_size * spec.data.seq_len
        loss = "" if orch.metrics.last_loss is None else f" | loss {orch.metrics.last_loss:.3f}"
        st = epochs.state
        return " | ".join(
            [
                f"miners {'/'.join(map(str, per_stage))} per stage",
                f"{rate:.2f} samples/s ({tokens:,.0f} tok/s)",
                f"{done:,} done, {sched.in_flight()} in flight, {sched.waiting_retry()} to retry, "
                f"{sched.dropped} dropped",
                f"epoch {st.epoch} {st.phase}",
                f"{epochs.merges_completed} merges, {epochs.merges_rolled_back} rolled back",
                f"replays {counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed{loss}",
            ]
        )


async def status_loop(orch: Orchestrator, interval_s: float) -> None:
    """Log the status line every `interval_s` seconds (0: never)."""
    if interval_s <= 0:
        return
    line = StatusLine(orch)
    while True:
        await asyncio.sleep(interval_s)
        try:
            log.info("%s", line.render())
        except Exception:  # a status line must never take the orchestrator down
            log.exception("could not build the status line")
