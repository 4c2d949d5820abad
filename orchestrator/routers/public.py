"""Read-only routes that expose nothing secret: health, run status and the loss log."""

from __future__ import annotations

from fastapi import APIRouter, Query

from common.protocol import (
    HEALTH,
    LEDGER,
    LOSSES,
    MERGES,
    STATUS,
    EpochLedger,
    LossPage,
    MergeRecord,
    RunStatus,
)
from orchestrator.deps import Orch, serve

router = APIRouter(tags=["public"])

# SQLite's INTEGER range: a larger cursor cannot even be bound to a query (found by the fuzzer as a 500).
MAX_ID = 2**63 - 1


@serve(router, HEALTH)
async def health(orch: Orch) -> dict[str, str]:
    return {"status": "ok", "run_id": orch.run_id}


@serve(router, STATUS)
async def status(orch: Orch) -> RunStatus:
    return orch.status()


@serve(router, LOSSES)
async def losses(
    orch: Orch, after: int = Query(0, ge=0, le=MAX_ID), limit: int = Query(1000, ge=1, le=10_000)
) -> LossPage:
    """The tail's losses in order, each with its pathway (the miner at every stage)."""
    return orch.losses(after, limit)


@serve(router, MERGES)
async def merges(
    orch: Orch, after_epoch: int = Query(0, ge=0, le=MAX_ID), limit: int = Query(100, ge=1, le=1000)
) -> list[MergeRecord]:
    """What every finished merge did: who contributed with what weight, who was left out or flagged."""
    return orch.merges(after_epoch, limit)


@serve(router, LEDGER)
async def ledger(
    orch: Orch, after_epoch: int = Query(0, ge=0, le=MAX_ID), limit: int = Query(100, ge=1, le=1000)
) -> list[EpochLedger]:
    """Per finished epoch: each miner's accepted work and merge flags, and every replay verdict; the
    record validators compute scores from."""
    return orch.ledger(after_epoch, limit)
