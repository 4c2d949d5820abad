"""The run's epoch clock: train, drain, merge every stage, repeat.

    training --(enough samples, epoch_max_s after its first sample, or max_samples done)--> draining
    --(nothing in flight, or drain_timeout_s)--> merging
    --(every stage merged or rolled back)--> training (next epoch)

While draining, no new sample starts; samples in flight finish, and any still running at the timeout are
carried over (retried next epoch, not counted against them). While merging, nothing trains: each stage runs
its own `StageMerge`. Each stage's global version counts its merges; a miner whose weights are not the
current version (it joined during a merge, missed one, or applied it wrongly) reloads the checkpoint before
it trains again. Everything here is saved in the state database and survives a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from common.checkpoints import StoredCheckpoint, global_weights
from common.protocol import (
    ApplyReport,
    GlobalWeights,
    MergeRecord,
    MergeTask,
    ReduceReport,
    UploadReport,
)
from orchestrator.db import Miner, StateDB
from orchestrator.errors import RequestRejected
from orchestrator.scheduler import Scheduler
from orchestrator.settings import OrchestratorSettings
from orchestrator.stage_merge import (
    FinalizeJob,
    FinalizeResult,
    Links,
    MergeState,
    StageMerge,
)

log = logging.getLogger("iota.orchestrator")

EpochPhase = Literal["training", "draining", "merging"]


class EpochState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epoch: int = 0
    phase: EpochPhase = "training"
    since: float
    # Training's clock (`epoch_max_s`) starts when the epoch's first sample is in flight, not when the
    # phase began: miners still starting up or reloading a checkpoint must not eat the epoch's time.
    training_began: bool = False
    completed_at_start: int = 0


class EpochListener(Protocol):
    """What the rest of the orchestrator does when an epoch or a stage's merge ends (the service)."""

    def epoch_ended(self) -> None:
        """The next epoch began: the stages' checkpoints are final for the one that ended."""

    def merge_closed(self, state: MergeState, start: StoredCheckpoint | None) -> None:
        """A stage's merge finished, merged or rolled back; `start` holds the weights it began from."""


class NoEpochListener:
    def epoch_ended(self) -> None:
        pass

    def merge_closed(self, state: MergeState, start: StoredCheckpoint | None) -> None:
        pass


class EpochClock:
    def __init__(
        self,
        db: StateDB,
        scheduler: Scheduler,
        settings: OrchestratorSettings,
        *,
        n_stages: int,
        stage_numel: list[int],
        seed: int,
        links: Links,
        clock: Callable[[], float],
        listener: EpochListener | None = None,
    ) -> None:
        self.db, self.scheduler, self.settings = db, scheduler, settings
        self.n_stages, self.stage_numel, self.seed = n_stages, stage_numel, seed
        self.links, self.clock = links, clock
        self.listener: EpochListener = listener or NoEpochListener()
        stored = db.get_meta("epoch")
        self.state = EpochState.model_validate(stored) if stored else EpochState(since=clock())
        self.versions = [int(db.get_meta(f"version.{s}") or 0) for s in range(n_stages)]
        self.checkpoints: list[StoredCheckpoint | None] = [
            StoredCheckpoint.model_validate(c) if (c := db.get_meta(f"checkpoint.{s}")) else None
            for s in range(n_stages)
        ]
        self.merges: dict[int, StageMerge] = {}
        if self.state.phase == "merging":
            for s in range(n_stages):
                if saved := db.get_meta(f"merge.{s}"):
                    self.merges[s] = self._merge(MergeState.model_validate(saved))
        self.merges_completed = db.count_merges("merged")
        self.merges_rolled_back = db.count_merges("rolled_back")
        scheduler.restore_epoch(self.state.epoch, paused=self.state.phase != "training")

    def _merge(self, state: MergeState) -> StageMerge:
        return StageMerge(
            state,
            timeout_s=self.settings.merge_phase_timeout_s,
            clip_factor=self.settings.merge_clip_factor,
            clock=self.clock,
        )

    # -- the clock ----------------------------------------------------------------------------------------

    def tick(self) -> None:
        """Move the clock on; called about once a second (and after every merge report)."""
        now, st = self.clock(), self.state
        if st.phase == "training" and not st.training_began and self._training_began():
            st.training_began = True
            self._set_phase("training", now)
        if st.phase == "training" and self._epoch_over(now):
            self._set_phase("draining", now)
            self.scheduler.pause()
            log.info(
                "epoch %d: training over, draining %d samples in flight", st.epoch, self.scheduler.in_flight()
            )
        if st.phase == "draining":
            if self.scheduler.in_flight() and now - st.since < self.settings.drain_timeout_s:
                return
            if carried := self.scheduler.carry_over(f"epoch {st.epoch} ended; retried next epoch"):
                log.info("epoch %d: carried %d unfinished samples over", st.epoch, carried)
            self._start_merges(now)
        if st.phase == "merging":
            for merge in self.merges.values():
                if not merge.finished and merge.tick():
                    self._changed(merge)
            if all(m.finished for m in self.merges.values()):
                self._next_epoch(now)

    def _training_began(self) -> bool:
        """A sample of this epoch is in flight or done (only asked until the first one is)."""
        return bool(self.scheduler.in_flight()) or self.scheduler.completed > self.state.completed_at_start

    def _epoch_over(self, now: float) -> bool:
        s, st = self.settings, self.state
        trained = self.scheduler.completed - st.completed_at_start
        if s.merge_every_samples and trained >= s.merge_every_samples:
            return True
        if trained and (s.merge_every_samples or s.epoch_max_s) and self.scheduler.out_of_samples():
            return True  # the run's last samples: merge them now rather than after epoch_max_s
        return bool(s.epoch_max_s) and trained > 0 and now - st.since >= s.epoch_max_s

    def _set_phase(self, phase: EpochPhase, now: float) -> None:
        if phase != self.state.phase:
            self.state.training_began = False
        self.state.phase, self.state.since = phase, now
        self.db.set_meta("epoch", self.state.model_dump())

    def _start_merges(self, now: float) -> None:
        epoch = self.state.epoch
        with self.db.transaction():
            for s in range(self.n_stages):
                accepted: dict[str, int] = {}
                left_out: dict[str, str] = {}
                for m in self.scheduler.miners.values():
                    if m.stage != s or not (m.active or m.epoch_steps):
                        continue
                    if why := self._left_out(m, self.versions[s]):
                        left_out[m.hotkey] = why
                    else:
                        accepted[m.hotkey] = m.epoch_steps
                merge = StageMerge.start(
                    run_id=self.scheduler.run_id,
                    epoch=epoch,
                    stage=s,
                    version=self.versions[s],
                    numel=self.stage_numel[s],
                    accepted=accepted,
                    left_out=left_out,
                    timeout_s=self.settings.merge_phase_timeout_s,
                    clip_factor=self.settings.merge_clip_factor,
                    clock=self.clock,
                )
                self.merges[s] = merge
                self.db.set_meta(f"merge.{s}", merge.state.model_dump(mode="json"))
            self._set_phase("merging", now)
        log.info("epoch %d: merging %d stages", epoch, self.n_stages)
        for merge in self.merges.values():
            self._changed(merge)

    @staticmethod
    def _left_out(miner: Miner, version: int) -> str | None:
        """Why a miner of the stage takes no part in its merge (kept in the public record), or None."""
        if not miner.active:
            return "inactive when the merge started"
        if miner.weights_version != version:
            return f"its weights are at version {miner.weights_version}, the stage's at {version}"
        if miner.epoch_steps == 0:
            return "no optimizer steps this epoch"
        return None

    def _next_epoch(self, now: float) -> None:
        st = self.state
        with self.db.transaction():
            st.epoch += 1
            self.scheduler.start_epoch(st.epoch)
            st.completed_at_start = self.scheduler.completed
            self._set_phase("training", now)
        self.merges.clear()
        self.listener.epoch_ended()
        self.scheduler.notify_all()

    # -- one stage's merge -----------------------------------------------------------------------------

    def _changed(self, merge: StageMerge) -> None:
        """Save the merge, close it if it finished, and wake the miners it may now want."""
        s = merge.state
        with self.db.transaction():
            self.db.set_meta(f"merge.{s.stage}", s.model_dump(mode="json"))
            if merge.finished and not merge.closed:
                self._close(merge)
        for hotkey in merge.involved():
            self.scheduler.notify(hotkey)

    def _close(self, merge: StageMerge) -> None:
        s, record = merge.state, merge.record()
        start = self.checkpoints[s.stage]  # the start-of-epoch weights, which replays begin from
        merge.closed = True
        self.db.add_merge(s.epoch, s.stage, record.model_dump_json())
        for flag in record.flagged:
            self.db.add_event(
                self.clock(),
                "merge_flag",
                f"epoch {s.epoch} stage {s.stage}: {flag.reason}",
                miner=flag.hotkey or None,
            )
        if record.outcome == "merged":
            assert s.checkpoint is not None
            old = self.checkpoints[s.stage]
            self.versions[s.stage], self.checkpoints[s.stage] = s.checkpoint.version, s.checkpoint
            self.db.set_meta(f"version.{s.stage}", s.checkpoint.version)
            self.db.set_meta(f"checkpoint.{s.stage}", s.checkpoint.model_dump(mode="json"))
            for hotkey in merge.in_sync():
                miner = self.scheduler.miners.get(hotkey)
                if miner is not None and miner.stage == s.stage:
                    self.scheduler.set_weights_version(miner, s.checkpoint.version)
            self.merges_completed += 1
            garbage = merge.objects() + ([old.weights.key, old.momentum.key] if old else [])
        else:
            self.merges_rolled_back += 1
            garbage = merge.objects()
            # Participants may hold trained weights the merge never combined: back to the stage's version.
            for hotkey in s.accepted:
                miner = self.scheduler.miners.get(hotkey)
                if miner is not None and miner.stage == s.stage:
                    self.scheduler.set_weights_version(miner, -1)
        self.scheduler.collect(garbage)
        self.listener.merge_closed(s, start)
        log.info(
            "epoch %d stage %d: %s (version %d, %d participants, %d flagged)",
            s.epoch,
            s.stage,
            record.outcome,
            record.version,
            len(record.participants),
            len(record.flagged),
        )

    def task_for(self, miner: Miner) -> MergeTask | None:
        merge = self.merges.get(miner.stage)
        if self.state.phase != "merging" or merge is None or merge.finished:
            return None
        return merge.task_for(miner.hotkey, self.links)

    def report(
        self, miner: Miner, epoch: int, stage: int, report: UploadReport | ReduceReport | ApplyReport
    ) -> None:
        merge = self.merges.get(stage)
        if self.state.phase != "merging" or merge is None or epoch != self.state.epoch:
            raise RequestRejected(409, "no_merge", f"no merge of stage {stage} in epoch {epoch} is running")
        if miner.stage != stage:
            raise RequestRejected(403, "wrong_stage", f"you run stage {miner.stage}, not {stage}")
        before = (merge.phase, len(merge.state.reported))
        merge.report(miner.hotkey, report)
        self._changed(merge)
        if (merge.phase, len(merge.state.reported)) != before:
            self.tick()

    # -- the finalize step, run by the service in a thread ------------------------------------------------

    def finalize_jobs(self) -> list[tuple[FinalizeJob, StoredCheckpoint | None]]:
        jobs = []
        for merge in self.merges.values():
            if merge.phase == "finalize" and not merge.finalizing:
                merge.finalizing = True
                jobs.append((merge.finalize_job(), self.checkpoints[merge.state.stage]))
        return jobs

    def finalized(self, stage: int, epoch: int, result: FinalizeResult | None) -> None:
        """The finalize job's result (None: it failed and runs again on the next tick)."""
        merge = self.merges.get(stage)
        if merge is None or merge.state.epoch != epoch or merge.phase != "finalize":
            return
        merge.finalizing = False
        if result is not None:
            merge.finalized(result)
            self._changed(merge)

    # -- global weights -----------------------------------------------------------------------------------

    def global_weights(self, stage: int) -> GlobalWeights:
        return global_weights(
            self.versions[stage], self.seed, self.checkpoints[stage], self.links.download_source
        )

    def joined(self, miner: Miner) -> GlobalWeights:
        """A miner (re)registering loads its stage's current global weights."""
        self.scheduler.set_weights_version(miner, self.versions[miner.stage])
        return self.global_weights(miner.stage)

    def reload_for(self, miner: Miner) -> GlobalWeights | None:
        """The weights a miner must load before it trains again, if it does not hold the current ones."""
        if (
            self.state.phase == "merging"
            and miner.stage in self.merges
            and not self.merges[miner.stage].finished
        ):
            return None  # mid-merge: its start-of-epoch weights may still be needed
        version = self.versions[miner.stage]
        if miner.weights_version == version:
            return None
        self.scheduler.set_weights_version(miner, version)
        return self.global_weights(miner.stage)

    def merge_phase(self, stage: int) -> str | None:
        merge = self.merges.get(stage)
        return None if merge is None or merge.finished else merge.phase

    def records(self, after_epoch: int, limit: int) -> list[MergeRecord]:
        return [MergeRecord.model_validate_json(r) for r in self.db.merges_after(after_epoch, limit)]
