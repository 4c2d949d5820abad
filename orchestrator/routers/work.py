"""Work: long-poll for an item, complete it (after the upload is checked), give it up, or re-presign."""

from __future__ import annotations

from fastapi import APIRouter, Response

from common.protocol import (
    WORK_COMPLETE,
    WORK_FAIL,
    WORK_NEXT,
    WORK_PRESIGN,
    Ack,
    CompleteRequest,
    CompleteResponse,
    FailRequest,
    PresignRequest,
    UploadTarget,
    WorkRequest,
    WorkResponse,
)
from orchestrator.deps import Orch, Signed, SignedBody, serve

router = APIRouter(tags=["work"])


@serve(router, WORK_NEXT)
async def next_work(
    req: Signed, orch: Orch, response: Response, body: WorkRequest = SignedBody(WORK_NEXT)
) -> WorkResponse:
    """The caller's next item, waiting up to `wait_s` for one; also lists forward state to drop.

    `Server-Timing: wait;dur=<ms>` says how long the request was parked waiting for work, so a client can
    tell the orchestrator's latency from the time there was nothing to do.
    """
    answer, parked_s = await orch.work_next(req.hotkey, body)
    response.headers["Server-Timing"] = f"wait;dur={parked_s * 1000:.1f}"
    return answer


@serve(router, WORK_COMPLETE)
async def complete(
    req: Signed, orch: Orch, body: CompleteRequest = SignedBody(WORK_COMPLETE)
) -> CompleteResponse:
    """Report an item done. The output object must exist with exactly the reported size and sha256."""
    return await orch.work_complete(req.hotkey, body)


@serve(router, WORK_FAIL)
async def fail(req: Signed, orch: Orch, body: FailRequest = SignedBody(WORK_FAIL)) -> Ack:
    """Give up on the caller's current item; with `blame_input`, its input was bad."""
    orch.work_fail(req.hotkey, body)
    return Ack()


@serve(router, WORK_PRESIGN)
async def presign(req: Signed, orch: Orch, body: PresignRequest = SignedBody(WORK_PRESIGN)) -> UploadTarget:
    """A fresh upload URL for the output of the caller's current item (and for no other key)."""
    return orch.work_presign(req.hotkey, body)
