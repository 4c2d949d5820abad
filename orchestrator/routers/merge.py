"""Merging: a miner reports the phase of the merge it was given (see `orchestrator.stage_merge`)."""

from __future__ import annotations

from fastapi import APIRouter

from common.protocol import MERGE_REPORT, Ack, MergeReportRequest
from orchestrator.deps import Orch, Signed, SignedBody, serve

router = APIRouter(tags=["merge"])


@serve(router, MERGE_REPORT)
async def report(req: Signed, orch: Orch, body: MergeReportRequest = SignedBody(MERGE_REPORT)) -> Ack:
    """Report a merge phase done: the pseudo-gradient uploaded, partitions reduced, or the step applied."""
    orch.merge_report(req.hotkey, body)
    return Ack()
