"""The orchestrator as one object: the run, its scheduler and epoch clock, the bucket, who may call; and one
method per request, which the HTTP routes call after parsing it (the routes do nothing else).

Its parts: what the run is (`orchestrator.run`), the scheduler (`scheduler`) and the epoch clock (`epochs`),
the validation book (`validation`), who may call (`registry`), the long polls (`wakeups`), the public
views (`views`) and the background loops (`loops`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common.auth import EpistulaVerifier, signed_request_dependency
from common.chain import Chain
from common.checkpoints import StoredCheckpoint, manifest_key
from common.codec import content_hash
from common.config import AuthSettings
from common.data import Corpus, SampleId, SampleSchedule
from common.model import boundary_payload_limit, stage_sizes
from common.protocol import (
    ArtifactRef,
    CheckpointManifest,
    CompleteRequest,
    CompleteResponse,
    DashboardData,
    EpochLedger,
    FailRequest,
    LossPage,
    LossRecord,
    MergeRecord,
    MergeReportRequest,
    PresignRequest,
    RegisterRequest,
    RegisterResponse,
    RunStatus,
    ScoresReport,
    UploadTarget,
    ValidatorRegisterRequest,
    ValidatorRegisterResponse,
    ValidatorTaskRequest,
    ValidatorTaskResponse,
    VerdictRequest,
    WorkItem,
    WorkRequest,
    WorkResponse,
)
from common.storage import UPLOAD_CHECK_THREADS, ObjectStore, StorageError
from orchestrator import views
from orchestrator.dashboard_state import DashboardState
from orchestrator.db import Item, Miner, StateDB
from orchestrator.epochs import EpochClock
from orchestrator.errors import RequestRejected
from orchestrator.links import StoreLinks
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.registry import HotkeyRegistry
from orchestrator.run import RunMismatch, RunSpec, open_run, run_spec
from orchestrator.scheduler import Scheduler
from orchestrator.settings import OrchestratorSettings
from orchestrator.stage_merge import MergeState
from orchestrator.validation import ValidationBook
from orchestrator.wakeups import Wakeups

log = logging.getLogger("iota.orchestrator")

# How often a held replay-task request looks again; tasks appear only when merges close.
_VALIDATOR_POLL_S = 0.5


class Orchestrator:
    def __init__(
        self,
        settings: OrchestratorSettings,
        *,
        spec: RunSpec,
        corpus: Corpus,
        db: StateDB,
        store: ObjectStore,
        chain: Chain,
        auth: AuthSettings,
        metagraph_refresh_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.spec, self.corpus, self.db, self.store = settings, spec, corpus, db, store
        self.clock = clock
        self.run_id = open_run(db, spec, clock)
        self.started_at = float(db.get_meta("started_at") or clock())
        self.schedule = SampleSchedule(corpus, seed=spec.seed)
        self.wakeups = Wakeups()
        self.metrics = OrchestratorMetrics(spec.model.n_stages)
        self.scheduler = Scheduler(
            db,
            run_id=self.run_id,
            n_stages=spec.model.n_stages,
            settings=settings,
            sample_ids=self.sample_ids,
            clock=clock,
            wakeups=self.wakeups,
            on_item_done=self.metrics.item_done,
        )
        # Upload URLs outlive an item's deadline, so a slow but honest upload still lands.
        self.links = StoreLinks(store, upload_expires_s=max(60, int(settings.item_timeout_s * 2)))
        self.epochs = EpochClock(
            db,
            self.scheduler,
            settings,
            n_stages=spec.model.n_stages,
            stage_numel=[s.parameters for s in stage_sizes(spec.model)],
            seed=spec.seed,
            links=self.links,
            clock=clock,
            listener=self,
        )
        self.validation = ValidationBook(
            db,
            settings,
            n_stages=spec.model.n_stages,
            download_source=self.links.download_source,
            sample_ids=self.sample_ids,
            device_of=lambda hotkey: m.device if (m := self.scheduler.miners.get(hotkey)) else "unknown",
            clock=clock,
        )
        self._jobs: set[asyncio.Task[None]] = set()
        # Upload checks wait on the store, one GET each: a pool of their own, so that under load they neither
        # queue behind asyncio's default pool (cores + 4 threads) nor hold up the other jobs sent there.
        self._checks = ThreadPoolExecutor(UPLOAD_CHECK_THREADS, thread_name_prefix="upload-check")
        self.registry = HotkeyRegistry(chain, metagraph_refresh_s)
        self.dashboard = DashboardState(
            chain, db, lambda: self.scheduler.completed, clock, chain_every_s=max(metagraph_refresh_s, 5.0)
        )
        self.verifier = EpistulaVerifier(auth, clock=clock, admit=self.registry.admit)
        self.verify = signed_request_dependency(self.verifier)
        self.max_payload_bytes = boundary_payload_limit(spec.model, spec.data.batch_size, spec.data.seq_len)
        self.metrics.watch(self)

    def sample_ids(self, sample: int) -> list[SampleId]:
        return self.schedule.batch(sample, self.spec.data.batch_size)

    def spawn(self, job: Coroutine[Any, Any, None]) -> None:
        """Run `job` in the background (the loop keeps only weak references to tasks: hold them here)."""
        task = asyncio.get_running_loop().create_task(job)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    # -- what the epoch clock tells (its `EpochListener`) -------------------------------------------------

    def merge_closed(self, state: MergeState, start: StoredCheckpoint | None) -> None:
        self.metrics.merge_closed(state)
        if shadowed := self.validation.shadow(state, start, self.spec.seed):
            log.info("epoch %d stage %d: %d miners shadowed", state.epoch, state.stage, len(shadowed))

    def epoch_ended(self) -> None:
        self.spawn(self._write_manifest(self.manifest().model_dump_json(indent=1).encode()))

    def manifest(self) -> CheckpointManifest:
        return CheckpointManifest(
            run_id=self.run_id,
            epoch=self.epochs.state.epoch,
            model=self.spec.model.to_dict(),
            seed=self.spec.seed,
            data=self.spec.data,
            stages=[
                None if c is None else c.manifest_entry(s) for s, c in enumerate(self.epochs.checkpoints)
            ],
        )

    async def _write_manifest(self, data: bytes) -> None:
        for attempt in range(5):
            try:
                await asyncio.to_thread(self.store.put_bytes, manifest_key(self.run_id), data)
                return
            except StorageError as error:
                log.warning("could not write the checkpoint manifest (attempt %d): %s", attempt + 1, error)
                await asyncio.sleep(2.0 * (attempt + 1))

    # -- who is calling ------------------------------------------------------------------------------------

    def _same_run(self, run_id: str) -> None:
        if run_id != self.run_id:
            raise RequestRejected(
                409, "run_mismatch", f"this orchestrator runs {self.run_id}; register again"
            )

    def _same_corpus(self, fingerprint: str) -> None:
        if fingerprint != self.spec.data.fingerprint:
            raise RequestRejected(
                409,
                "corpus_mismatch",
                f"your corpus fingerprint {fingerprint[:12]} differs from the run's "
                f"{self.spec.data.fingerprint[:12]}; configure the same data source (IOTA_DATA_*)",
            )

    def check_validator(self, hotkey: str) -> None:
        """Refuses (403) a hotkey without a validator permit or with too little stake."""
        problem = self.registry.validator_problem(hotkey, self.settings.validator_min_stake)
        if problem is not None:
            raise RequestRejected(403, "not_a_validator", problem)

    # -- miners: joining, work, merges ---------------------------------------------------------------------

    def miner_register(self, hotkey: str, body: RegisterRequest) -> RegisterResponse:
        """Join the run: a stage, a session, the model, the data and the global weights to load."""
        self._same_corpus(body.corpus_fingerprint)
        miner = self.scheduler.register(hotkey, body.device, body.preferred_stage)
        return RegisterResponse(
            run_id=self.run_id,
            session=miner.session,
            stage=miner.stage,
            model=self.spec.model.to_dict(),
            data=self.spec.data,
            training=self.spec.training,
            weights=self.epochs.joined(miner),
            poll_wait_s=self.settings.poll_wait_s,
        )

    async def work_next(self, hotkey: str, body: WorkRequest) -> tuple[WorkResponse, float]:
        """The caller's next thing to do, waiting up to `wait_s` (capped by `poll_wait_s`) for one; and the
        seconds the request was parked waiting."""
        loop = asyncio.get_running_loop()
        parked_s = 0.0
        until = loop.time() + min(body.wait_s, self.settings.poll_wait_s)
        event = self.wakeups.event(hotkey)
        while True:
            # Checked again after every wait: the miner may have re-registered meanwhile.
            miner = self.scheduler.session_miner(hotkey, body.run_id, body.session)
            event.clear()  # before looking, so a notify that lands after the look is not lost
            answer = self._work_for(miner)
            remaining = until - loop.time()
            if answer is not None or remaining <= 0:
                return answer or WorkResponse(), parked_s
            parked_at = loop.time()
            try:
                with self.wakeups.parked(hotkey):
                    await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                pass
            parked_s += loop.time() - parked_at

    def _work_for(self, miner: Miner) -> WorkResponse | None:
        """What the miner should do now, in order: its stage's merge, reloading the current weights, an
        item; with any forward state to drop and a move to another stage. None: nothing yet."""
        cancelled = self.scheduler.take_cancelled(miner)
        merge = self.epochs.task_for(miner)
        reload = None if merge else self.epochs.reload_for(miner)
        item = None if merge or reload else self.scheduler.next_item(miner)
        if not (item or merge or reload or cancelled or miner.move_to is not None):
            return None
        return WorkResponse(
            item=self.work_item(item) if item is not None else None,
            cancelled=cancelled,
            move_to_stage=miner.move_to,
            merge=merge,
            reload=reload,
        )

    def work_item(self, it: Item) -> WorkItem:
        source = None if it.input is None else self.links.download_source(it.input)
        target = None
        if it.output_key is not None:
            target = self.links.upload_target(it.output_key)
        return WorkItem(
            item_id=it.item_id,
            kind=it.kind,
            sample=it.sample,
            attempt=it.attempt,
            stage=it.stage,
            forward_item=it.forward_item,
            samples=self.scheduler.samples_of(it),
            input=source,
            output=target,
            deadline_in_s=max(0.0, it.deadline - self.clock()),
        )

    async def work_complete(self, hotkey: str, body: CompleteRequest) -> CompleteResponse:
        """Accept an item done, once its output object exists with exactly the reported size and sha256."""
        miner = self.scheduler.session_miner(hotkey, body.run_id, body.session)
        item = self.scheduler.check_complete(miner, body)
        if item is not None and body.output is not None:
            try:
                problem = await self.checked_upload(body.output)
            except StorageError as error:
                raise RequestRejected(
                    503, "storage_unavailable", f"could not check the upload: {error}"
                ) from None
            if problem is not None:
                self.scheduler.record_bad_upload(miner, item, problem)
                raise RequestRejected(422, "bad_upload", problem)
            # Checked again after the wait: the miner may have re-registered meanwhile.
            miner = self.scheduler.session_miner(hotkey, body.run_id, body.session)
        return CompleteResponse(sample_completed=self.scheduler.complete(miner, body))

    def work_fail(self, hotkey: str, body: FailRequest) -> None:
        """Give up on the caller's current item; with `blame_input`, its input was bad."""
        miner = self.scheduler.session_miner(hotkey, body.run_id, body.session)
        self.scheduler.fail_item(miner, body.item_id, body.reason, blame_input=body.blame_input)

    def work_presign(self, hotkey: str, body: PresignRequest) -> UploadTarget:
        """A fresh upload URL for the output of the caller's current item (and for no other key)."""
        miner = self.scheduler.session_miner(hotkey, body.run_id, body.session)
        self.scheduler.may_upload(miner, body.key)
        return self.links.upload_target(body.key)

    def merge_report(self, hotkey: str, body: MergeReportRequest) -> None:
        miner = self.scheduler.session_miner(hotkey, body.run_id, body.session)
        self.epochs.report(miner, body.epoch, body.stage, body.report)

    # -- checking an upload before accepting it ---------------------------------------------------------

    async def checked_upload(self, ref: ArtifactRef) -> str | None:
        """`check_upload` on the upload-check pool."""
        return await asyncio.get_running_loop().run_in_executor(self._checks, self.check_upload, ref)

    def check_upload(self, ref: ArtifactRef) -> str | None:
        """Why the object behind `ref` is not what its producer announced, or None if it is.

        Blocking (a GET against the bucket): run it in a thread.
        """
        if ref.size > self.max_payload_bytes:
            return f"{ref.size} bytes is more than a boundary tensor can take ({self.max_payload_bytes})"
        # A presigned PUT cannot pin the content, so read back what is actually stored: one GET.
        data = self.store.get_exact(ref.key, ref.size)
        if data is None:
            return f"no object of {ref.size} bytes at {ref.key}; upload it before reporting completion"
        if content_hash(data) != ref.sha256:
            return f"the object at {ref.key} does not hash to the reported sha256"
        return None

    # -- validators ----------------------------------------------------------------------------------------

    def validator_register(self, hotkey: str, body: ValidatorRegisterRequest) -> ValidatorRegisterResponse:
        """Join as a validator: the run's model, data and training settings, to replay miners' work with."""
        self._same_corpus(body.corpus_fingerprint)
        self.db.add_event(self.clock(), "validator_registered", body.device, miner=hotkey)
        return ValidatorRegisterResponse(
            run_id=self.run_id,
            model=self.spec.model.to_dict(),
            data=self.spec.data,
            training=self.spec.training,
            seed=self.spec.seed,
            poll_wait_s=self.settings.poll_wait_s,
        )

    async def validator_task(self, hotkey: str, body: ValidatorTaskRequest) -> ValidatorTaskResponse:
        """A replay task leased to the caller, waiting up to `wait_s` (capped by `poll_wait_s`) for one."""
        self._same_run(body.run_id)
        loop = asyncio.get_running_loop()
        until = loop.time() + min(body.wait_s, self.settings.poll_wait_s)
        while True:
            leased = self.validation.lease(hotkey)
            remaining = until - loop.time()
            if leased is not None or remaining <= 0:
                return ValidatorTaskResponse(task=leased)
            await asyncio.sleep(min(_VALIDATOR_POLL_S, remaining))

    def validator_verdict(self, hotkey: str, body: VerdictRequest) -> None:
        self._same_run(body.run_id)
        self.validation.verdict(hotkey, body.task_id, body.verdict)

    def validator_scores(self, hotkey: str, body: ScoresReport) -> None:
        """Kept for the dashboard, the latest per validator, in memory; it decides nothing."""
        self._same_run(body.run_id)
        self.dashboard.receive(hotkey, body)

    # -- public views --------------------------------------------------------------------------------------

    def status(self) -> RunStatus:
        return views.run_status(self)

    def dashboard_data(self) -> DashboardData:
        return views.dashboard_data(self)

    def losses(self, after: int, limit: int) -> LossPage:
        rows = self.db.losses_after(after, limit)
        records = [
            LossRecord(seq=seq, sample=sample, attempt=attempt, loss=loss, at=at, pathway=pathway)
            for seq, sample, attempt, loss, at, pathway in rows
        ]
        return LossPage(records=records, next_after=records[-1].seq if records else after)

    def merges(self, after_epoch: int, limit: int) -> list[MergeRecord]:
        return self.epochs.records(after_epoch, limit)

    def ledger(self, after_epoch: int, limit: int) -> list[EpochLedger]:
        return self.validation.ledger(after_epoch, limit, self.epochs.state.epoch)


__all__ = ["Orchestrator", "RequestRejected", "RunMismatch", "RunSpec", "open_run", "run_spec"]
