"""Work: long-poll for an item, complete it (after the upload is checked), give it up, or re-presign."""

from __future__ import annotations

import asyncio

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
from common.storage import StorageError
from orchestrator.deps import Orch, Signed, SignedBody, serve
from orchestrator.scheduler import SchedulerError

router = APIRouter(tags=["work"])


@serve(router, WORK_NEXT)
async def next_work(
    req: Signed, orch: Orch, response: Response, body: WorkRequest = SignedBody(WORK_NEXT)
) -> WorkResponse:
    """The caller's next item, waiting up to `wait_s` for one; also lists forward state to drop.

    `Server-Timing: wait;dur=<ms>` says how long the request was parked waiting for work, so a client can
    tell the orchestrator's latency from the time there was nothing to do.
    """
    loop = asyncio.get_running_loop()
    parked_s = 0.0
    until = loop.time() + min(body.wait_s, orch.settings.poll_wait_s)
    event = orch.wakeups.event(req.hotkey)
    while True:
        # Checked again after every wait: the miner may have re-registered meanwhile.
        miner = orch.scheduler.session_miner(req.hotkey, body.run_id, body.session)
        event.clear()  # before looking, so a notify that lands after the look is not lost
        cancelled = orch.scheduler.take_cancelled(miner)
        merge = orch.epochs.task_for(miner)
        reload = None if merge else orch.epochs.reload_for(miner)
        item = None if merge or reload else orch.scheduler.next_item(miner)
        remaining = until - loop.time()
        if item or merge or reload or cancelled or miner.move_to is not None or remaining <= 0:
            break
        parked_at = loop.time()
        try:
            with orch.wakeups.parked(req.hotkey):
                await asyncio.wait_for(event.wait(), remaining)
        except TimeoutError:
            pass
        parked_s += loop.time() - parked_at
    response.headers["Server-Timing"] = f"wait;dur={parked_s * 1000:.1f}"
    return WorkResponse(
        item=orch.work_item(item) if item is not None else None,
        cancelled=cancelled,
        move_to_stage=miner.move_to,
        merge=merge,
        reload=reload,
    )


@serve(router, WORK_COMPLETE)
async def complete(
    req: Signed, orch: Orch, body: CompleteRequest = SignedBody(WORK_COMPLETE)
) -> CompleteResponse:
    """Report an item done. The output object must exist with exactly the reported size and sha256."""
    miner = orch.scheduler.session_miner(req.hotkey, body.run_id, body.session)
    item = orch.scheduler.check_complete(miner, body)
    if item is not None and body.output is not None:
        try:
            problem = await orch.checked_upload(body.output)
        except StorageError as error:
            raise SchedulerError(503, "storage_unavailable", f"could not check the upload: {error}") from None
        if problem is not None:
            orch.scheduler.record_bad_upload(miner, item, problem)
            raise SchedulerError(422, "bad_upload", problem)
        miner = orch.scheduler.session_miner(req.hotkey, body.run_id, body.session)
    return CompleteResponse(sample_completed=orch.scheduler.complete(miner, body))


@serve(router, WORK_FAIL)
async def fail(req: Signed, orch: Orch, body: FailRequest = SignedBody(WORK_FAIL)) -> Ack:
    """Give up on the caller's current item; with `blame_input`, its input was bad."""
    miner = orch.scheduler.session_miner(req.hotkey, body.run_id, body.session)
    orch.scheduler.fail_item(miner, body.item_id, body.reason, blame_input=body.blame_input)
    return Ack()


@serve(router, WORK_PRESIGN)
async def presign(req: Signed, orch: Orch, body: PresignRequest = SignedBody(WORK_PRESIGN)) -> UploadTarget:
    """A fresh upload URL for the output of the caller's current item (and for no other key)."""
    miner = orch.scheduler.session_miner(req.hotkey, body.run_id, body.session)
    orch.scheduler.may_upload(miner, body.key)
    return orch.links.upload_target(body.key)
