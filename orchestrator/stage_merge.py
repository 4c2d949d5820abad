"""One stage's merge (a redundant Butterfly All-Reduce, DiLoCo-style) as a state machine.

    upload -> reduce -> finalize -> apply -> done
       \\________\\_________\\-> rolled_back (nobody left, or the merge ran out of time before apply)

- upload: every participant (a live miner of the stage that trained this epoch) uploads its pseudo-gradient
  (start-of-epoch weights minus current weights) cut into partitions. Late ones are left out.
- reduce: every partition goes to two reducers (`common.merge.assign_reducers`). Each downloads the other
  participants' slices and uploads the clipped, work-weighted mean with its hash. A reducer that misses the
  deadline is replaced once by a participant that did report.
- finalize (the orchestrator, in a thread, `orchestrator.merge_finalize`): a partition whose two reducers
  agree bit for bit is taken as is; any other (disagreement, a missing reducer, a reducer blaming a slice)
  is recomputed by the orchestrator from the slices themselves, and a reducer whose result differs is
  flagged. A participant whose own upload is bad is thrown out and the reduce phase starts again without
  it. Then the orchestrator takes the outer Nesterov step itself and stores the result as the stage's
  checkpoint.
- apply: every participant downloads the merged partitions it did not compute, takes the same outer step and
  reports the digest of its new weights; a digest other than the checkpoint's is flagged, and that miner,
  like every late one, reloads the checkpoint before it trains again.

The machine does no I/O: it presigns through `Links`, and the service runs the finalize job and feeds the
result back. Its whole state is one pydantic model, saved after every change so a restart resumes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from common.checkpoints import StoredCheckpoint, checkpoint_keys
from common.merge import assign_reducers, partitions, slice_limit
from common.protocol import (
    ApplyReport,
    ArtifactRef,
    DownloadSource,
    MergedPartition,
    MergeFlag,
    MergeRecord,
    MergeTask,
    PartitionSpan,
    ReduceJob,
    ReduceReport,
    ReduceSource,
    UploadReport,
    UploadTarget,
)
from orchestrator.errors import RequestRejected

MergePhase = Literal["upload", "reduce", "finalize", "apply", "done", "rolled_back"]
REDUNDANCY = 2
# Phases before apply must all fit in this many phase timeouts, or the merge rolls back.
_MAX_PHASES_BEFORE_APPLY = 6


class Links(Protocol):
    def upload_target(self, key: str) -> UploadTarget: ...

    def download_source(self, ref: ArtifactRef) -> DownloadSource: ...


class MergeState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str
    epoch: int
    stage: int
    version: int
    numel: int
    partitions: list[PartitionSpan]
    phase: MergePhase = "upload"
    started_at: float
    deadline: float
    accepted: dict[str, int] = Field(description="Participant -> optimizer steps the orchestrator accepted.")
    claimed: dict[str, int] = Field(default_factory=dict)
    pg: dict[str, list[ArtifactRef]] = Field(default_factory=dict)
    excluded: dict[str, str] = Field(default_factory=dict)
    round: int = 0
    reducers: dict[int, list[str]] = Field(default_factory=dict)
    results: dict[int, dict[str, ArtifactRef]] = Field(default_factory=dict)
    reported: list[str] = Field(default_factory=list)
    accused: dict[str, list[str]] = Field(default_factory=dict)
    replaced: bool = False
    canonical: dict[int, ArtifactRef] = Field(default_factory=dict)
    settled: list[int] = Field(default_factory=list)
    checkpoint: StoredCheckpoint | None = None
    applied: dict[str, str] = Field(default_factory=dict)
    flagged: list[MergeFlag] = Field(default_factory=list)
    finished_at: float | None = None


@dataclass
class FinalizeJob:
    """What the orchestrator's finalize step needs, frozen at the moment it starts."""

    state: MergeState
    members: dict[str, float]  # hotkey -> work weight
    agreed: dict[int, list[ArtifactRef]]  # partition -> reducer results with the agreed hash, to try in order
    recompute: list[int]
    settled_keys: dict[int, str]
    checkpoint_keys: tuple[str, str]


@dataclass
class FinalizeResult:
    canonical: dict[int, ArtifactRef] = field(default_factory=dict)
    settled: list[int] = field(default_factory=list)
    flags: list[MergeFlag] = field(default_factory=list)
    bad_participants: dict[str, str] = field(default_factory=dict)
    checkpoint: StoredCheckpoint | None = None


class StageMerge:
    def __init__(
        self, state: MergeState, *, timeout_s: float, clip_factor: float, clock: Callable[[], float]
    ) -> None:
        self.state, self.timeout_s, self.clip_factor, self.clock = state, timeout_s, clip_factor, clock
        self.finalizing = False  # a finalize job is running (in memory: a restart starts it again)
        self.closed = self.finished  # its record is written (saved in the same transaction as the state)

    @classmethod
    def start(
        cls,
        *,
        run_id: str,
        epoch: int,
        stage: int,
        version: int,
        numel: int,
        accepted: dict[str, int],
        timeout_s: float,
        left_out: dict[str, str] | None = None,
        clip_factor: float,
        clock: Callable[[], float],
    ) -> StageMerge:
        now = clock()
        count = max(1, min(len(accepted), numel))
        state = MergeState(
            run_id=run_id,
            epoch=epoch,
            stage=stage,
            version=version,
            numel=numel,
            partitions=[
                PartitionSpan(index=p.index, start=p.start, end=p.end) for p in partitions(numel, count)
            ],
            started_at=now,
            deadline=now + timeout_s,
            accepted=dict(sorted(accepted.items())),
            excluded=dict(sorted((left_out or {}).items())),
        )
        merge = cls(state, timeout_s=timeout_s, clip_factor=clip_factor, clock=clock)
        if not accepted:
            merge._roll_back("no miner of the stage trained this epoch")
        return merge

    # -- who and where ------------------------------------------------------------------------------------

    @property
    def phase(self) -> MergePhase:
        return self.state.phase

    @property
    def finished(self) -> bool:
        return self.state.phase in ("done", "rolled_back")

    def members(self) -> list[str]:
        """Participants whose pseudo-gradient is in the merge."""
        return sorted(h for h in self.state.pg if h not in self.state.excluded)

    def work(self) -> dict[str, float]:
        return {h: float(min(self.state.accepted[h], self.state.claimed[h])) for h in self.members()}

    def involved(self) -> list[str]:
        """Miners this merge may still want something from (for wake-ups)."""
        return sorted(h for h in self.state.accepted if h not in self.state.excluded)

    def _prefix(self, hotkey: str) -> str:
        s = self.state
        return f"runs/{s.run_id}/{hotkey}/merge/e{s.epoch}.s{s.stage}/"

    def pg_key(self, hotkey: str, partition: int) -> str:
        return f"{self._prefix(hotkey)}pg.{partition}"

    def reduce_key(self, hotkey: str, partition: int) -> str:
        return f"{self._prefix(hotkey)}reduced.{partition}.r{self.state.round}"

    def settled_key(self, partition: int) -> str:
        s = self.state
        return f"runs/{s.run_id}/merge/e{s.epoch}.s{s.stage}/settled.{partition}.r{s.round}"

    def checkpoint_keys(self) -> tuple[str, str]:
        s = self.state
        return checkpoint_keys(s.run_id, s.stage, s.version + 1)

    def objects(self) -> list[str]:
        """Every transient object of this merge (not the checkpoint), for deletion once it is over."""
        s = self.state
        keys = [ref.key for refs in s.pg.values() for ref in refs]
        keys += [ref.key for res in s.results.values() for ref in res.values()]
        keys += [self.settled_key(p) for p in s.settled]
        return sorted(set(keys))

    # -- tasks --------------------------------------------------------------------------------------------

    def task_for(self, hotkey: str, links: Links) -> MergeTask | None:
        s = self.state
        if hotkey in s.excluded or hotkey not in s.accepted:
            return None
        if s.phase == "upload" and hotkey not in s.pg:
            uploads = [links.upload_target(self.pg_key(hotkey, p.index)) for p in s.partitions]
            return self._task("upload", uploads=uploads)
        if s.phase == "reduce" and hotkey not in s.reported and hotkey in s.pg:
            jobs = [
                self._reduce_job(hotkey, p, links) for p, rs in sorted(s.reducers.items()) if hotkey in rs
            ]
            jobs = [j for j in jobs if hotkey not in s.results.get(j.partition, {})]
            return self._task("reduce", reduce=jobs) if jobs else None
        if s.phase == "apply" and hotkey in s.pg and hotkey not in s.applied:
            merged = []
            for p in s.partitions:
                ref = s.canonical[p.index]
                mine = s.results.get(p.index, {}).get(hotkey)
                own = mine is not None and mine.sha256 == ref.sha256
                merged.append(
                    MergedPartition(
                        partition=p.index,
                        sha256=ref.sha256,
                        source=None if own else links.download_source(ref),
                    )
                )
            return self._task("apply", merged=merged)
        return None

    def _task(self, phase: Literal["upload", "reduce", "apply"], **parts: object) -> MergeTask:
        s = self.state
        return MergeTask(
            epoch=s.epoch,
            stage=s.stage,
            phase=phase,
            version=s.version,
            partitions=s.partitions,
            clip_factor=self.clip_factor,
            deadline_in_s=max(0.0, s.deadline - self.clock()),
            **parts,  # type: ignore[arg-type]
        )

    def _reduce_job(self, hotkey: str, partition: int, links: Links) -> ReduceJob:
        # Your own slice is listed too: a miner restarted since its upload no longer holds it.
        work = self.work()
        sources = [
            ReduceSource(hotkey=h, work=work[h], source=links.download_source(self.state.pg[h][partition]))
            for h in self.members()
        ]
        return ReduceJob(
            partition=partition,
            sources=sources,
            output=links.upload_target(self.reduce_key(hotkey, partition)),
        )

    # -- reports ------------------------------------------------------------------------------------------

    def report(self, hotkey: str, report: UploadReport | ReduceReport | ApplyReport) -> None:
        s = self.state
        if hotkey not in s.accepted:
            raise RequestRejected(403, "not_a_participant", "you are not a participant of this merge")
        if hotkey in s.excluded:
            raise RequestRejected(409, "excluded", f"you were left out of this merge: {s.excluded[hotkey]}")
        if report.phase != s.phase:
            raise RequestRejected(409, "wrong_phase", f"the merge is in phase {s.phase}, not {report.phase}")
        if isinstance(report, UploadReport):
            self._upload_report(hotkey, report)
        elif isinstance(report, ReduceReport):
            self._reduce_report(hotkey, report)
        else:
            self._apply_report(hotkey, report)

    def _check_ref(self, ref: ArtifactRef, key: str, partition: int) -> None:
        span = self.state.partitions[partition]
        if ref.key != key:
            raise RequestRejected(422, "wrong_output", f"partition {partition} must be uploaded to {key}")
        if ref.size > slice_limit(span.end - span.start):
            raise RequestRejected(422, "too_large", f"partition {partition} cannot take {ref.size} bytes")

    def _upload_report(self, hotkey: str, report: UploadReport) -> None:
        s = self.state
        if hotkey in s.pg:
            if s.pg[hotkey] == list(report.parts):
                return  # a retried request whose first answer was lost
            raise RequestRejected(409, "already_reported", "your pseudo-gradient is already in")
        if len(report.parts) != len(s.partitions):
            raise RequestRejected(422, "wrong_parts", f"upload exactly {len(s.partitions)} partitions")
        for p, ref in enumerate(report.parts):
            self._check_ref(ref, self.pg_key(hotkey, p), p)
        s.claimed[hotkey] = report.steps
        s.pg[hotkey] = list(report.parts)
        if min(report.steps, s.accepted[hotkey]) == 0:
            s.excluded[hotkey] = "no optimizer steps this epoch"
        if all(h in s.pg or h in s.excluded for h in s.accepted):
            self._start_reduce()

    def _reduce_report(self, hotkey: str, report: ReduceReport) -> None:
        s = self.state
        if hotkey in s.reported:
            return  # a retry; the first report counts
        done = {p for p, res in s.results.items() if hotkey in res}  # before a reducer was replaced
        mine = {p for p, rs in s.reducers.items() if hotkey in rs} - done
        given = {r.partition for r in report.results}
        if len(given) != len(report.results) or not given <= mine:
            raise RequestRejected(
                422, "not_your_partition", f"you reduce partitions {sorted(mine)}, once each"
            )
        members = set(self.members())
        if any(h not in members or h == hotkey for h in report.bad_sources):
            raise RequestRejected(422, "unknown_source", "bad_sources must name other participants")
        if not report.bad_sources and given != mine:
            raise RequestRejected(422, "missing_partitions", f"report all of partitions {sorted(mine)}")
        for r in report.results:
            self._check_ref(r.output, self.reduce_key(hotkey, r.partition), r.partition)
        for r in report.results:
            s.results.setdefault(r.partition, {})[hotkey] = r.output
        if report.bad_sources:
            s.accused[hotkey] = sorted(set(report.bad_sources))
        s.reported.append(hotkey)
        assigned = {h for rs in s.reducers.values() for h in rs}
        if assigned <= set(s.reported):
            self._to_finalize()

    def _apply_report(self, hotkey: str, report: ApplyReport) -> None:
        s = self.state
        assert s.checkpoint is not None
        if hotkey not in self.members():
            raise RequestRejected(409, "not_a_member", "your pseudo-gradient is not in this merge")
        if report.version != s.version + 1:
            raise RequestRejected(422, "wrong_version", f"the merge makes version {s.version + 1}")
        if hotkey in s.applied:
            return
        s.applied[hotkey] = report.weights_sha256
        if report.weights_sha256 != s.checkpoint.digest:
            s.flagged.append(MergeFlag(hotkey=hotkey, reason="applied weights differ from the checkpoint"))
        if set(self.members()) <= set(s.applied):
            self._finish()

    # -- time ---------------------------------------------------------------------------------------------

    def tick(self) -> bool:
        """Act on a passed deadline; True if the state changed."""
        s, now = self.state, self.clock()
        if self.finished or s.phase == "finalize" and now < self._give_up_at():
            return False
        if s.phase in ("upload", "reduce", "finalize") and now >= self._give_up_at():
            self._roll_back(f"the merge did not reach its apply phase in {now - s.started_at:.0f} s")
            return True
        if now < s.deadline:
            return False
        if s.phase == "upload":
            for h in s.accepted:
                if h not in s.pg:
                    s.excluded[h] = "no pseudo-gradient by the deadline"
            self._start_reduce()
        elif s.phase == "reduce":
            self._replace_late_reducers()
        elif s.phase == "apply":
            self._finish()
        return True

    def _give_up_at(self) -> float:
        return self.state.started_at + _MAX_PHASES_BEFORE_APPLY * self.timeout_s

    # -- transitions --------------------------------------------------------------------------------------

    def _start_reduce(self) -> None:
        s = self.state
        members = self.members()
        if not members:
            self._roll_back("no participant uploaded a pseudo-gradient with work in it")
            return
        s.results, s.reported, s.accused, s.replaced, s.canonical = {}, [], {}, False, {}
        if len(members) == 1:
            # One replica: its own pseudo-gradient is the mean; the orchestrator checks it while finalizing.
            s.reducers = {}
            self._to_finalize()
            return
        plan = assign_reducers(
            len(s.partitions), members, redundancy=REDUNDANCY, seed=f"{s.epoch}.{s.stage}.{s.round}"
        )
        s.reducers = {p: list(rs) for p, rs in plan.items()}
        s.phase, s.deadline = "reduce", self.clock() + self.timeout_s

    def _replace_late_reducers(self) -> None:
        """Once per round, hand each late reducer's partitions to a participant that did report."""
        s = self.state
        late = {h for rs in s.reducers.values() for h in rs} - set(s.reported)
        alive = [h for h in s.reported if h not in s.accused]
        if s.replaced or not alive:
            self._to_finalize()  # the orchestrator computes what is still missing
            return
        load = {h: sum(h in rs for rs in s.reducers.values()) for h in alive}
        again: set[str] = set()
        for _, rs in sorted(s.reducers.items()):
            if not set(rs) & late:
                continue
            rs[:] = [h for h in rs if h not in late]
            candidates = sorted((h for h in alive if h not in rs), key=lambda h: (load[h], h))
            if candidates:
                rs.append(candidates[0])
                load[candidates[0]] += 1
                again.add(candidates[0])
        s.reported = [h for h in s.reported if h not in again]
        s.replaced, s.deadline = True, self.clock() + self.timeout_s
        if not again:
            self._to_finalize()

    def _to_finalize(self) -> None:
        self.state.phase = "finalize"

    def finalize_job(self) -> FinalizeJob:
        s = self.state
        members = self.work()
        agreed: dict[int, list[ArtifactRef]] = {}
        recompute: list[int] = []
        for p in s.partitions:
            if len(members) == 1:
                (only,) = members
                agreed[p.index] = [s.pg[only][p.index]]
                continue
            results = s.results.get(p.index, {})
            votes: dict[str, list[ArtifactRef]] = {}
            for h in s.reducers.get(p.index, []):
                if h in results:
                    votes.setdefault(results[h].sha256, []).append(results[h])
            best = max(votes.values(), key=len, default=[])
            if len(best) >= REDUNDANCY and len(votes) == 1:
                agreed[p.index] = best
            else:
                recompute.append(p.index)
        return FinalizeJob(
            state=s.model_copy(deep=True),
            members=members,
            agreed=agreed,
            recompute=recompute,
            settled_keys={p.index: self.settled_key(p.index) for p in s.partitions},
            checkpoint_keys=self.checkpoint_keys(),
        )

    def finalized(self, result: FinalizeResult) -> None:
        s = self.state
        s.flagged.extend(result.flags)
        if result.bad_participants:
            for h, why in result.bad_participants.items():
                s.excluded[h] = why
                s.flagged.append(MergeFlag(hotkey=h, reason=why))
            s.round += 1
            self._start_reduce()
            return
        for accuser, accused in s.accused.items():
            s.flagged.append(
                MergeFlag(
                    hotkey=accuser, reason=f"blamed sound uploads of {', '.join(a[:8] for a in accused)}"
                )
            )
        assert result.checkpoint is not None
        s.canonical, s.settled, s.checkpoint = result.canonical, result.settled, result.checkpoint
        s.phase, s.deadline = "apply", self.clock() + self.timeout_s

    def _finish(self) -> None:
        s = self.state
        s.phase, s.finished_at = "done", self.clock()

    def _roll_back(self, reason: str) -> None:
        s = self.state
        s.phase, s.finished_at = "rolled_back", self.clock()
        s.flagged.append(MergeFlag(hotkey="", reason=f"rolled back: {reason}"))

    # -- results ------------------------------------------------------------------------------------------

    def in_sync(self) -> list[str]:
        """Miners that hold the new global weights (reported the checkpoint's digest)."""
        s = self.state
        if s.phase != "done" or s.checkpoint is None:
            return []
        return sorted(h for h, d in s.applied.items() if d == s.checkpoint.digest)

    def reduced(self) -> dict[str, int]:
        """Reducer -> partitions whose canonical mean is the one it uploaded."""
        s, counts = self.state, {}
        for p, results in s.results.items():
            canonical = s.canonical.get(p)
            for hotkey, ref in results.items():
                if canonical is not None and ref.sha256 == canonical.sha256:
                    counts[hotkey] = counts.get(hotkey, 0) + 1
        return counts

    def record(self) -> MergeRecord:
        s = self.state
        merged = s.phase == "done"
        return MergeRecord(
            epoch=s.epoch,
            stage=s.stage,
            outcome="merged" if merged else "rolled_back",
            version=s.version + 1 if merged else s.version,
            participants=self.work() if s.pg else {},
            excluded=dict(s.excluded),
            in_sync=self.in_sync(),
            flagged=list(s.flagged),
            partitions=len(s.partitions),
            settled=len(s.settled),
            reduced=self.reduced() if merged else {},
            weights_sha256=s.checkpoint.digest if merged and s.checkpoint else None,
            started_at=s.started_at,
            finished_at=s.finished_at or self.clock(),
        )
