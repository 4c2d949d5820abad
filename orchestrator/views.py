"""The public, read-only views of the orchestrator's state: the run's status (`GET /v1/status`) and the
dashboard's data (`GET /v1/dashboard`), assembled from the scheduler, the epoch clock, the validation book
and the dashboard's own state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.protocol import (
    PROTOCOL_VERSION,
    DashboardData,
    EpochProgress,
    MergeSummary,
    MinerStatus,
    MinerThroughput,
    RunStatus,
    StageStatus,
    ValidatorScores,
)
from orchestrator.assignment import stage_capacity
from orchestrator.dashboard_state import consensus

if TYPE_CHECKING:
    from orchestrator.service import Orchestrator

RECENT_MERGES = 12  # on the dashboard


def run_status(orch: Orchestrator) -> RunStatus:
    """The run at a glance (also embedded in the dashboard's data)."""
    sched, spec, epochs = orch.scheduler, orch.spec, orch.epochs
    active = [m for m in sched.miners.values() if m.active]
    capacity = stage_capacity(sched.loads(), spec.model.n_stages)
    return RunStatus(
        run_id=orch.run_id,
        protocol=PROTOCOL_VERSION,
        preset=spec.model.name,
        n_stages=spec.model.n_stages,
        batch_size=spec.data.batch_size,
        seq_len=spec.data.seq_len,
        started_at=orch.started_at,
        samples_issued=sched.next_sample,
        samples_completed=sched.completed,
        samples_in_flight=sched.in_flight(),
        samples_waiting_retry=sched.waiting_retry(),
        samples_dropped=sched.dropped,
        attempts_failed=sched.attempts_failed,
        items_completed=sched.items_completed,
        epoch=epochs.state.epoch,
        epoch_phase=epochs.state.phase,
        merges_completed=epochs.merges_completed,
        merges_rolled_back=epochs.merges_rolled_back,
        validations=orch.validation.counts(),
        stages=[
            StageStatus(
                stage=s,
                miners=sum(m.stage == s for m in active),
                samples_per_s=capacity[s],
                version=epochs.versions[s],
                merge_phase=epochs.merge_phase(s),
            )
            for s in range(spec.model.n_stages)
        ],
        miners=[
            MinerStatus(
                hotkey=m.hotkey,
                stage=m.stage,
                state="active" if m.active else "inactive",
                items_completed=m.items_completed,
                seconds_per_sample=sched.seconds_per_sample(m),
            )
            for m in sched.miners.values()
        ],
    )


def dashboard_data(orch: Orchestrator) -> DashboardData:
    sched, spec, epochs, board = orch.scheduler, orch.spec, orch.epochs, orch.dashboard
    tokens_per_sample = spec.data.batch_size * spec.data.seq_len
    neurons = orch.registry.neurons
    miners = []
    for m in sched.miners.values():
        seconds = sched.seconds_per_sample(m)
        rate = 1.0 / seconds if seconds else None
        neuron = neurons.get(m.hotkey)
        miners.append(
            MinerThroughput(
                hotkey=m.hotkey,
                uid=neuron.uid if neuron else None,
                stage=m.stage,
                state="active" if m.active else "inactive",
                items_completed=m.items_completed,
                samples_per_s=rate,
                tokens_per_s=None if rate is None else rate * tokens_per_sample,
            )
        )
    board.losses.update(orch.db)  # what arrived since the background task's last read (one page)
    back = RECENT_MERGES // spec.model.n_stages + 1  # epochs that hold the most recent merges
    recent = epochs.records(max(0, epochs.state.epoch - back), (back + 1) * spec.model.n_stages)
    reports = {hotkey: received.report for hotkey, received in board.scores.items()}
    validators = [
        ValidatorScores(
            hotkey=hotkey,
            uid=neuron.uid if (neuron := neurons.get(hotkey)) else None,
            stake=neuron.stake if neuron else 0.0,
            received_at=received.received_at,
            report=received.report,
        )
        for hotkey, received in sorted(board.scores.items())
    ]
    chain_weights = board.chain_weights
    if chain_weights and any(chain_weights.values()):
        source = "chain"
    else:
        source = "validators" if reports else "none"
    return DashboardData(
        at=orch.clock(),
        status=run_status(orch),
        progress=EpochProgress(
            epoch=epochs.state.epoch,
            phase=epochs.state.phase,
            phase_since=epochs.state.since,
            samples_trained=sched.completed - epochs.state.completed_at_start,
            merge_every_samples=orch.settings.merge_every_samples,
            epoch_max_s=orch.settings.epoch_max_s,
        ),
        miners=sorted(miners, key=lambda m: (m.stage, m.hotkey)),
        loss=board.losses.points(),
        losses_recorded=board.losses.count,
        throughput=board.throughput.rates(tokens_per_sample),
        merges=[
            MergeSummary(
                epoch=r.epoch,
                stage=r.stage,
                outcome=r.outcome,
                version=r.version,
                participants=len(r.participants),
                flagged=len(r.flagged),
                finished_at=r.finished_at,
            )
            for r in recent[-RECENT_MERGES:]
        ],
        validators=validators,
        consensus=consensus(
            reports,
            neurons,
            chain_weights,
            lambda hotkey: m.stage if (m := sched.miners.get(hotkey)) else None,
        ),
        chain_weights=chain_weights,
        weights_source=source,
    )


__all__ = ["RECENT_MERGES", "dashboard_data", "run_status"]
