"""One stage's merge run in one process: the orchestrator's state machine and finalize step, and one
`MergeParticipant` per replica, with every transfer through real presigned S3 URLs. No HTTP between them:
the reports go straight into the state machine. For the merge benchmark (bench/merge.py) and the tests that
need many replicas on one machine (tests/test_merge_protocol.py); the devnet runs the same code over HTTP, one
process per miner. Not shipped: no role runs a merge this way.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from common.checkpoints import StoredCheckpoint
from common.model import ModelConfig
from common.protocol import MergeTask
from common.storage import ObjectStore
from miner.merge_participant import MergeParticipant
from orchestrator.links import StoreLinks
from orchestrator.merge_finalize import run_finalize
from orchestrator.stage_merge import StageMerge


@dataclass
class MergeInProcessResult:
    merge: StageMerge
    wall_s: float
    orchestrator_s: float  # of which in the orchestrator's finalize step


def run_merge_in_process(
    participants: dict[str, MergeParticipant],
    *,
    store: ObjectStore,
    cfg: ModelConfig,
    seed: int,
    stage: int,
    epoch: int,
    accepted: dict[str, int],
    previous: StoredCheckpoint | None = None,
    run_id: str = "local",
    clip_factor: float = 2.0,
    timeout_s: float = 600.0,
    threads: int = 4,
) -> MergeInProcessResult:
    """Drive one merge to its end. `participants` maps hotkey to its replica; only those in `accepted`
    (hotkey -> optimizer steps) take part, as the orchestrator would choose them."""
    any_participant = next(iter(participants.values()))
    links = StoreLinks(store, upload_expires_s=900)
    merge = StageMerge.start(
        run_id=run_id,
        epoch=epoch,
        stage=stage,
        version=any_participant.version,
        numel=int(any_participant.start.numel()),
        accepted=accepted,
        timeout_s=timeout_s,
        clip_factor=clip_factor,
        clock=time.time,
    )
    started, finalize_s = time.perf_counter(), 0.0
    training = any_participant.training
    with ThreadPoolExecutor(threads) as pool:
        while not merge.finished:
            if merge.phase == "finalize":
                t0 = time.perf_counter()
                result = run_finalize(
                    merge.finalize_job(),
                    store=store,
                    cfg=cfg,
                    seed=seed,
                    previous=previous,
                    clip_factor=clip_factor,
                    outer_lr=training.outer_lr,
                    outer_momentum=training.outer_momentum,
                )
                finalize_s += time.perf_counter() - t0
                merge.finalized(result)
                continue
            tasks = {h: t for h in sorted(participants) if (t := merge.task_for(h, links)) is not None}
            if not tasks:
                raise RuntimeError(f"the merge waits in phase {merge.phase} for a replica that is not here")

            def work(item: tuple[str, MergeTask], phase: str = merge.phase) -> tuple[str, object]:
                hotkey, task = item
                return hotkey, getattr(participants[hotkey], phase)(task)

            for hotkey, report in pool.map(work, tasks.items()):
                merge.report(hotkey, report)  # type: ignore[arg-type]
    return MergeInProcessResult(merge=merge, wall_s=time.perf_counter() - started, orchestrator_s=finalize_s)


__all__ = ["MergeInProcessResult", "run_merge_in_process"]
