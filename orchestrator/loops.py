"""The orchestrator's background loops, beside the requests on the same event loop: reaping silent miners
and late items and moving the epoch clock on, rebalancing stages, running merges' finalize steps in
threads, deleting objects past their retention, refreshing the metagraph, the dashboard and the status
line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from common.checkpoints import StoredCheckpoint
from common.storage import StorageError
from orchestrator.merge_finalize import run_finalize
from orchestrator.metrics import status_loop
from orchestrator.service import Orchestrator
from orchestrator.stage_merge import FinalizeJob, FinalizeResult

log = logging.getLogger("iota.orchestrator")


def background_loops(orch: Orchestrator) -> list[Coroutine[Any, Any, None]]:
    """Every loop the app runs for its lifetime (`orchestrator.app`)."""
    return [
        reap_loop(orch),
        garbage_loop(orch),
        merge_loop(orch),
        orch.registry.run(),
        orch.dashboard.run(),
        status_loop(orch, orch.settings.status_interval_s),
    ]


async def reap_loop(orch: Orchestrator) -> None:
    last_rebalance = orch.clock()
    while True:
        await asyncio.sleep(1.0)
        try:
            orch.scheduler.reap()
            orch.epochs.tick()
            if orch.clock() - last_rebalance >= orch.settings.rebalance_interval_s:
                last_rebalance = orch.clock()
                if move := orch.scheduler.rebalance():
                    log.info(
                        "moving miner %s from stage %d to %d", move.hotkey[:8], move.from_stage, move.to_stage
                    )
        except Exception:
            log.exception("reaping failed; will try again")


async def merge_loop(orch: Orchestrator) -> None:
    """Run each stage's finalize step (settle, outer step, checkpoint) off the event loop."""
    while True:
        await asyncio.sleep(0.2)
        for job, previous in orch.epochs.finalize_jobs():
            orch.spawn(_finalize(orch, job, previous))


async def _finalize(orch: Orchestrator, job: FinalizeJob, previous: StoredCheckpoint | None) -> None:
    s = job.state
    result: FinalizeResult | None = None
    try:
        result = await asyncio.to_thread(
            run_finalize,
            job,
            store=orch.store,
            cfg=orch.spec.model,
            seed=orch.spec.seed,
            previous=previous,
            clip_factor=orch.settings.merge_clip_factor,
            outer_lr=orch.settings.outer_lr,
            outer_momentum=orch.settings.outer_momentum,
        )
    except Exception:
        log.exception("finalizing the merge of stage %d failed; will try again", s.stage)
        await asyncio.sleep(2.0)
    orch.epochs.finalized(s.stage, s.epoch, result)
    orch.epochs.tick()


async def garbage_loop(orch: Orchestrator) -> None:
    while True:
        await asyncio.sleep(2.0)
        keys = orch.db.due_garbage(orch.clock())
        if not keys:
            continue
        try:
            await asyncio.to_thread(orch.store.delete, keys)
        except StorageError as error:
            log.warning("could not delete %d objects (will retry): %s", len(keys), error)
            continue
        with orch.db.transaction():
            orch.db.remove_garbage(keys)


__all__ = ["background_loops", "garbage_loop", "merge_loop", "reap_loop"]
