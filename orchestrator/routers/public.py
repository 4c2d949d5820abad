"""Read-only routes that expose nothing secret: health, run status and the loss log."""

from __future__ import annotations

from fastapi import APIRouter, Query

from common.protocol import (
    HEALTH,
    LEDGER,
    LOSSES,
    MERGES,
    PROTOCOL_VERSION,
    STATUS,
    EpochLedger,
    LossPage,
    LossRecord,
    MergeRecord,
    MinerStatus,
    RunStatus,
    StageStatus,
)
from orchestrator.assignment import stage_capacity
from orchestrator.deps import Orch, serve
from orchestrator.service import Orchestrator

router = APIRouter(tags=["public"])

# SQLite's INTEGER range: a larger cursor cannot even be bound to a query (found by the fuzzer as a 500).
MAX_ID = 2**63 - 1


@serve(router, HEALTH)
async def health(orch: Orch) -> dict[str, str]:
    return {"status": "ok", "run_id": orch.run_id}


@serve(router, STATUS)
async def status(orch: Orch) -> RunStatus:
    return run_status(orch)


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


@serve(router, LOSSES)
async def losses(
    orch: Orch, after: int = Query(0, ge=0, le=MAX_ID), limit: int = Query(1000, ge=1, le=10_000)
) -> LossPage:
    """The tail's losses in order, each with its pathway (the miner at every stage)."""
    rows = orch.db.losses_after(after, limit)
    records = [
        LossRecord(seq=seq, sample=sample, attempt=attempt, loss=loss, at=at, pathway=pathway)
        for seq, sample, attempt, loss, at, pathway in rows
    ]
    return LossPage(records=records, next_after=records[-1].seq if records else after)


@serve(router, MERGES)
async def merges(
    orch: Orch, after_epoch: int = Query(0, ge=0, le=MAX_ID), limit: int = Query(100, ge=1, le=1000)
) -> list[MergeRecord]:
    """What every finished merge did: who contributed with what weight, who was left out or flagged."""
    return orch.epochs.records(after_epoch, limit)


@serve(router, LEDGER)
async def ledger(
    orch: Orch, after_epoch: int = Query(0, ge=0, le=MAX_ID), limit: int = Query(100, ge=1, le=1000)
) -> list[EpochLedger]:
    """Per finished epoch: each miner's accepted work and merge flags, and every replay verdict; the
    record validators compute scores from."""
    return orch.validation.ledger(after_epoch, limit, orch.epochs.state.epoch)
