"""Merging: a miner reports the phase of the merge it was given (see `orchestrator.merging`)."""

from __future__ import annotations

from fastapi import APIRouter

from common.protocol import Ack, MergeReportRequest
from orchestrator.deps import Orch, Signed, parse, signed_body

router = APIRouter(prefix="/v1/merge", tags=["merge"])


@router.post("/report", response_model=Ack, openapi_extra=signed_body(MergeReportRequest))
async def report(req: Signed, orch: Orch) -> Ack:
    """Report a merge phase done: the pseudo-gradient uploaded, partitions reduced, or the step applied."""
    body = parse(MergeReportRequest, req)
    miner = orch.scheduler.session_miner(req.hotkey, body.run_id, body.session)
    orch.epochs.report(miner, body.epoch, body.stage, body.report)
    return Ack()
