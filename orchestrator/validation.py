"""Shadowing: which miners' epochs validators replay, the replay tasks, their verdicts, and the ledger.

When a stage's merge closes, each of its participants is shadowed with probability `validation_fraction`,
decided only then, so that nothing a miner sees during the epoch tells it whether it is watched. A shadowed
epoch becomes a task: the miner's accepted items in the order it completed them (its optimizer steps, see
`common.training`), the start-of-epoch checkpoint and the pseudo-gradient it uploaded for the merge. Every
object a replay may need is kept for `validation_retention_s` (see `OrchestratorSettings.object_retention_s`).

Validators lease tasks (a lease expires after `validation_lease_s` and the task goes to another validator),
replay them beside the training and report a verdict. The ledger (`GET /v1/ledger`) is the public record
that scores are computed from: per finished epoch, each miner's accepted work and merge flags, and every
verdict.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from common.checkpoints import StoredCheckpoint, global_weights
from common.data import SampleId
from common.protocol import (
    ArtifactRef,
    DownloadSource,
    EpochLedger,
    MergeRecord,
    MinerEpochWork,
    PartitionSpan,
    ReplayOp,
    ReplayVerdict,
    ValidationTask,
    VerdictRecord,
    is_last_stage,
    work_kind,
)
from orchestrator.db import Item, StateDB
from orchestrator.errors import RequestRejected
from orchestrator.settings import OrchestratorSettings
from orchestrator.stage_merge import MergeState


class Shadow(BaseModel):
    """What the orchestrator fixes about a shadowed epoch when the merge closes (stored as JSON)."""

    model_config = ConfigDict(extra="forbid")

    epoch: int
    stage: int
    miner: str
    device: str  # the miner's device when the epoch closed: it decides how the replay computes
    seed: int
    version: int
    checkpoint: StoredCheckpoint | None
    partitions: list[PartitionSpan]
    pseudo_gradient: list[ArtifactRef]
    claimed_steps: int | None


class ValidationBook:
    def __init__(
        self,
        db: StateDB,
        settings: OrchestratorSettings,
        *,
        n_stages: int,
        download_source: Callable[[ArtifactRef], DownloadSource],
        sample_ids: Callable[[int], list[SampleId]],
        device_of: Callable[[str], str],
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.db, self.settings, self.n_stages = db, settings, n_stages
        self.download_source, self.sample_ids, self.device_of = download_source, sample_ids, device_of
        self.clock = clock
        # Unpredictable by default: a miner must not be able to compute whether it will be shadowed.
        self.rng = rng or random.SystemRandom()

    # -- choosing whom to shadow --------------------------------------------------------------------------

    def shadow(self, state: MergeState, start: StoredCheckpoint | None, seed: int) -> list[str]:
        """Create replay tasks for a random share of the merge's participants; returns their ids."""
        fraction = self.settings.validation_fraction
        created = []
        for hotkey in sorted(state.accepted):
            if fraction <= 0 or self.rng.random() >= fraction:
                continue
            uploaded = hotkey in state.pg and hotkey not in state.excluded
            shadow = Shadow(
                epoch=state.epoch,
                stage=state.stage,
                miner=hotkey,
                device=self.device_of(hotkey),
                seed=seed,
                version=state.version,
                checkpoint=start,
                partitions=state.partitions if uploaded else [],
                pseudo_gradient=state.pg[hotkey] if uploaded else [],
                claimed_steps=state.claimed.get(hotkey) if uploaded else None,
            )
            task_id = f"v{state.epoch}.{state.stage}.{secrets.token_hex(4)}"
            self.db.add_validation(
                task_id, state.epoch, state.stage, hotkey, self.clock(), shadow.model_dump_json()
            )
            created.append(task_id)
        return created

    # -- validators ---------------------------------------------------------------------------------------

    def lease(self, validator: str) -> ValidationTask | None:
        """The oldest waiting task (never one about the validator's own hotkey), leased to `validator`."""
        now = self.clock()
        self._expire(now)
        with self.db.transaction():
            for row in self.db.validations(statuses=("queued",)):
                if row["miner"] == validator:
                    continue
                shadow = Shadow.model_validate_json(row["task"])
                ops = self._ops(shadow)
                if not ops:
                    row["status"] = "skipped"  # nothing was accepted from it at that stage: nothing to check
                    self.db.save_validation(row)
                    continue
                row.update(
                    status="leased",
                    validator=validator,
                    lease_deadline=now + self.settings.validation_lease_s,
                )
                self.db.save_validation(row)
                return self._task(row["task_id"], shadow, ops, self.settings.validation_lease_s)
        return None

    def verdict(self, validator: str, task_id: str, verdict: ReplayVerdict) -> None:
        rows = [r for r in self.db.validations(statuses=("leased",)) if r["task_id"] == task_id]
        if not rows or rows[0]["validator"] != validator:
            raise RequestRejected(403, "not_your_task", f"task {task_id} is not leased to you")
        row = rows[0]
        row.update(
            status="passed" if verdict.passed else "failed",
            verdict=verdict.model_dump_json(),
            verdict_at=self.clock(),
        )
        with self.db.transaction():
            self.db.save_validation(row)
            if not verdict.passed:
                self.db.add_event(
                    self.clock(),
                    "replay_failed",
                    f"epoch {row['epoch']} stage {row['stage']}: {verdict.failure}",
                    miner=row["miner"],
                )

    def _expire(self, now: float) -> None:
        retention = self.settings.validation_retention_s
        with self.db.transaction():
            for row in self.db.validations(statuses=("queued", "leased")):
                if now - row["created_at"] > retention:
                    row["status"] = "expired"  # its objects are gone: nobody can replay it any more
                elif row["status"] == "leased" and row["lease_deadline"] < now:
                    row.update(status="queued", validator=None, lease_deadline=None)
                else:
                    continue
                self.db.save_validation(row)

    def counts(self) -> dict[str, int]:
        return self.db.count_validations()

    # -- building a task -----------------------------------------------------------------------------------

    def _ops(self, shadow: Shadow) -> list[ReplayOp]:
        items = self.db.done_items(shadow.miner, shadow.epoch, shadow.stage)
        if not items:
            return []
        # A new session starts again from the global weights (see miner.worker.register): replay the last.
        session = items[-1].session
        items = [it for it in items if it.session == session]
        backed = {it.forward_item for it in items if it.kind == "backward"}
        return [self._op(it, backed) for it in items]

    def _op(self, it: Item, backed: set[str | None]) -> ReplayOp:
        kind = work_kind(it.kind, it.stage, self.n_stages)
        source = self._source
        if it.kind == "backward":
            return ReplayOp(
                item_id=it.item_id,
                kind="backward",
                forward_item=it.forward_item,
                input=source(it.input),
                output=source(it.output),
            )
        return ReplayOp(
            item_id=it.item_id,
            kind=kind,
            samples=self.sample_ids(it.sample),
            input=source(it.input),
            output=source(it.output),
            loss=it.loss if kind == "tail" else None,
            backward_follows=it.item_id in backed,
        )

    def _source(self, ref: ArtifactRef | None) -> DownloadSource | None:
        return None if ref is None else self.download_source(ref)

    def _task(self, task_id: str, shadow: Shadow, ops: list[ReplayOp], deadline_s: float) -> ValidationTask:
        return ValidationTask(
            task_id=task_id,
            epoch=shadow.epoch,
            stage=shadow.stage,
            miner=shadow.miner,
            device=shadow.device,
            weights=global_weights(shadow.version, shadow.seed, shadow.checkpoint, self.download_source),
            ops=ops,
            partitions=shadow.partitions,
            pseudo_gradient=[self.download_source(ref) for ref in shadow.pseudo_gradient],
            claimed_steps=shadow.claimed_steps,
            deadline_in_s=deadline_s,
        )

    # -- the ledger ------------------------------------------------------------------------------------------

    def ledger(self, after_epoch: int, limit: int, current_epoch: int) -> list[EpochLedger]:
        """Finished epochs from `after_epoch` on (at most `limit`), oldest first."""
        ledgers = []
        for epoch in range(after_epoch, min(current_epoch, after_epoch + limit)):
            records = [MergeRecord.model_validate_json(r) for r in self.db.merges_of(epoch)]
            if records:
                ledgers.append(self._epoch_ledger(epoch, records))
        return ledgers

    def _epoch_ledger(self, epoch: int, records: list[MergeRecord]) -> EpochLedger:
        by_stage = {r.stage: r for r in records}
        items = self.db.items_per_miner(epoch)
        for r in records:
            for hotkey in [*r.reduced, *(f.hotkey for f in r.flagged if f.hotkey)]:
                items.setdefault((hotkey, r.stage), 0)
        miners = []
        for (hotkey, stage), count in sorted(items.items()):
            record = by_stage.get(stage)
            miners.append(
                MinerEpochWork(
                    hotkey=hotkey,
                    stage=stage,
                    # A tail item is a forward and a backward in one: paid as two, like the stages above.
                    items=count * 2 if is_last_stage(stage, self.n_stages) else count,
                    partitions=record.reduced.get(hotkey, 0) if record else 0,
                    merged=bool(record and hotkey in record.participants and hotkey not in record.excluded),
                    flags=[f.reason for f in record.flagged if f.hotkey == hotkey] if record else [],
                )
            )
        verdicts = [
            _verdict_record(row) for row in self.db.validations(statuses=("passed", "failed"), epoch=epoch)
        ]
        return EpochLedger(
            epoch=epoch,
            finished_at=max(r.finished_at for r in records),
            miners=miners,
            verdicts=verdicts,
        )


def _verdict_record(row: dict[str, Any]) -> VerdictRecord:
    return VerdictRecord(
        task_id=row["task_id"],
        validator=row["validator"],
        miner=row["miner"],
        epoch=row["epoch"],
        stage=row["stage"],
        verdict=ReplayVerdict.model_validate_json(row["verdict"]),
        at=row["verdict_at"],
    )
