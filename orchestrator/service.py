"""The orchestrator as one object: the run, its scheduler, the bucket, who may call, and the background
loops (reaping, rebalancing, garbage collection, chain refresh). The HTTP routes are thin over this."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from common.auth import EpistulaVerifier, signed_request_dependency
from common.chain import Chain, Neuron
from common.checkpoints import StoredCheckpoint, manifest_key
from common.codec import content_hash
from common.config import AuthSettings, DataSettings, ModelSettings
from common.data import Corpus, SampleId, SampleSchedule
from common.model import ModelConfig, boundary_payload_limit, get_preset, stage_sizes
from common.model.config import split_blocks
from common.protocol import (
    ArtifactRef,
    CheckpointManifest,
    DataSpec,
    TrainingSpec,
    WorkItem,
)
from common.storage import UPLOAD_CHECK_THREADS, ObjectStore, StorageError
from orchestrator.dashboard_state import DashboardState
from orchestrator.db import Item, StateDB
from orchestrator.epochs import EpochClock, StoreLinks
from orchestrator.merge_jobs import run_finalize
from orchestrator.merging import FinalizeJob, FinalizeResult, MergeState
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.scheduler import Scheduler, SchedulerError
from orchestrator.settings import OrchestratorSettings, training_spec
from orchestrator.validation import ValidationBook

log = logging.getLogger("iota.orchestrator")


class RunMismatch(RuntimeError):
    """The state file belongs to a run with other settings; refuse rather than silently mix two runs."""


@dataclass(frozen=True)
class RunSpec:
    """What a run is; fixed at creation and checked on every restart."""

    model: ModelConfig
    data: DataSpec
    training: TrainingSpec
    seed: int

    def as_json(self) -> dict[str, object]:
        return {
            "model": self.model.to_dict(),
            "data": self.data.model_dump(),
            "training": self.training.model_dump(),
            "seed": self.seed,
        }


def run_spec(
    settings: OrchestratorSettings, model: ModelSettings, data: DataSettings, corpus: Corpus
) -> RunSpec:
    overrides: dict[str, object] = {}
    if model.bottleneck_ratio:
        overrides["bottleneck_ratio"] = model.bottleneck_ratio
    cfg = get_preset(model.preset, **overrides)
    if model.stages:
        cfg = cfg.with_overrides(stage_blocks=split_blocks(cfg.n_layers, model.stages))
    if data.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {data.seq_len} exceeds the preset's max_seq_len {cfg.max_seq_len}")
    if corpus.tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {corpus.tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}"
        )
    return RunSpec(
        model=cfg,
        data=DataSpec(
            source=data.source,
            fingerprint=corpus.fingerprint,
            tokenizer=data.tokenizer,
            batch_size=data.batch_size,
            seq_len=data.seq_len,
        ),
        training=training_spec(settings),
        seed=model.seed,
    )


def open_run(db: StateDB, spec: RunSpec, clock: Callable[[], float] = time.time) -> str:
    """The run id stored in `db`, creating the run on first start; refuses a state file of another run."""
    run_id = db.get_meta("run_id")
    if run_id is None:
        run_id = time.strftime("run-%Y%m%d-%H%M%S-", time.gmtime(clock())) + secrets.token_hex(3)
        with db.transaction():
            db.set_meta("run_id", run_id)
            db.set_meta("spec", spec.as_json())
            db.set_meta("started_at", clock())
        return str(run_id)
    stored = db.get_meta("spec")
    if stored != spec.as_json():
        raise RunMismatch(
            f"{db.path} holds run {run_id}, created with other settings (model, data or training). "
            "Start it with the same settings, or point IOTA_ORCH_STATE_PATH at a new file for a new run."
        )
    return str(run_id)


class HotkeyRegistry:
    """Which hotkeys are registered on the subnet, refreshed from the chain in the background.

    The check runs inside request verification, so it must never wait on the chain: it reads a cached
    set, and a miss only asks the background loop to refresh sooner.
    """

    def __init__(self, chain: Chain, refresh_s: float) -> None:
        self.chain, self.refresh_s = chain, refresh_s
        self.hotkeys: frozenset[str] = frozenset()
        self.neurons: dict[str, Neuron] = {}
        self._wake = asyncio.Event()

    def refresh(self) -> None:
        neurons = {n.hotkey: n for n in self.chain.metagraph().neurons}
        self.neurons, self.hotkeys = neurons, frozenset(neurons)

    def validator_problem(self, hotkey: str, min_stake: float) -> str | None:
        """Why `hotkey` may not act as a validator (no permit, too little stake), or None."""
        neuron = self.neurons.get(hotkey)
        if neuron is None:
            return "this hotkey is not registered on the subnet"
        if not neuron.validator_permit:
            return "this hotkey has no validator permit"
        if neuron.stake < min_stake:
            return f"this hotkey has {neuron.stake:g} stake; validators need at least {min_stake:g}"
        return None

    def admit(self, hotkey: str) -> bool:
        if hotkey in self.hotkeys:
            return True
        self._wake.set()
        return False

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.refresh_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as error:  # the chain being unreachable must not stop the orchestrator
                log.warning("could not refresh the metagraph: %s", error)
            await asyncio.sleep(1.0)  # at most one refresh a second, however many misses


class Wakeups:
    """One event per long-polling miner, set when something that miner may take has arrived.

    A targeted wake-up (`notify`) is for work only that miner may do (its backward). Work any of many miners
    may take (a stage's forward) wakes just one miner that is parked in a long poll and wants it
    (`wake_one`): waking every miner of the stage for each item would have hundreds of them race for it.
    """

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._parked: dict[str, None] = {}  # insertion-ordered: the longest-waiting miner is woken first

    def event(self, hotkey: str) -> asyncio.Event:
        return self._events.setdefault(hotkey, asyncio.Event())

    def notify(self, hotkey: str) -> None:
        event = self._events.get(hotkey)
        if event is not None:
            event.set()

    @contextmanager
    def parked(self, hotkey: str) -> Iterator[None]:
        """While the caller's long poll waits for its event."""
        self._parked[hotkey] = None
        try:
            yield
        finally:
            self._parked.pop(hotkey, None)

    def wake_one(self, wants: Callable[[str], bool]) -> None:
        """Wake the longest-parked miner for which `wants(hotkey)` holds, if any is parked."""
        for hotkey in self._parked:
            if wants(hotkey):
                del self._parked[hotkey]  # the next item wakes another miner, not this one again
                self.notify(hotkey)
                return


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
            notify=self.wakeups.notify,
            wake_one=self.wakeups.wake_one,
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
            notify=self.wakeups.notify,
            collect=self.collect,
            on_epoch_end=self._epoch_ended,
            on_merge_closed=self._merge_closed,
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

    def _merge_closed(self, state: MergeState, start: StoredCheckpoint | None) -> None:
        self.metrics.merge_closed(state)
        if shadowed := self.validation.shadow(state, start, self.spec.seed):
            log.info("epoch %d stage %d: %d miners shadowed", state.epoch, state.stage, len(shadowed))

    def _epoch_ended(self) -> None:
        data = self.manifest().model_dump_json(indent=1).encode()
        task = asyncio.get_running_loop().create_task(self._write_manifest(data))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _write_manifest(self, data: bytes) -> None:
        for attempt in range(5):
            try:
                await asyncio.to_thread(self.store.put_bytes, manifest_key(self.run_id), data)
                return
            except StorageError as error:
                log.warning("could not write the checkpoint manifest (attempt %d): %s", attempt + 1, error)
                await asyncio.sleep(2.0 * (attempt + 1))

    def collect(self, keys: list[str]) -> None:
        """Delete these objects once the grace period has passed."""
        self.db.add_garbage(keys, self.clock() + self.settings.object_retention_s)

    # -- wire forms ---------------------------------------------------------------------------------------

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
            stage=it.stage,  # type: ignore[arg-type]
            forward_item=it.forward_item,
            samples=self.scheduler.samples_of(it),
            input=source,
            output=target,
            deadline_in_s=max(0.0, it.deadline - self.clock()),
        )

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

    # -- background loops ---------------------------------------------------------------------------------

    async def reap_loop(self) -> None:
        last_rebalance = self.clock()
        while True:
            await asyncio.sleep(1.0)
            try:
                self.scheduler.reap()
                self.epochs.tick()
                if self.clock() - last_rebalance >= self.settings.rebalance_interval_s:
                    last_rebalance = self.clock()
                    if move := self.scheduler.rebalance():
                        log.info(
                            "moving miner %s from stage %d to %d",
                            move.hotkey[:8],
                            move.from_stage,
                            move.to_stage,
                        )
            except Exception:
                log.exception("reaping failed; will try again")

    async def merge_loop(self) -> None:
        """Run each stage's finalize step (settle, outer step, checkpoint) off the event loop."""
        while True:
            await asyncio.sleep(0.2)
            for job, previous in self.epochs.finalize_jobs():
                task = asyncio.create_task(self._finalize(job, previous))
                self._jobs.add(task)  # the loop keeps only weak references to tasks
                task.add_done_callback(self._jobs.discard)

    async def _finalize(self, job: FinalizeJob, previous: StoredCheckpoint | None) -> None:
        s = job.state
        result: FinalizeResult | None = None
        try:
            result = await asyncio.to_thread(
                run_finalize,
                job,
                store=self.store,
                cfg=self.spec.model,
                seed=self.spec.seed,
                previous=previous,
                clip_factor=self.settings.merge_clip_factor,
                outer_lr=self.settings.outer_lr,
                outer_momentum=self.settings.outer_momentum,
            )
        except Exception:
            log.exception("finalizing the merge of stage %d failed; will try again", s.stage)
            await asyncio.sleep(2.0)
        self.epochs.finalized(s.stage, s.epoch, result)
        self.epochs.tick()

    async def garbage_loop(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            keys = self.db.due_garbage(self.clock())
            if not keys:
                continue
            try:
                await asyncio.to_thread(self.store.delete, keys)
            except StorageError as error:
                log.warning("could not delete %d objects (will retry): %s", len(keys), error)
                continue
            with self.db.transaction():
                self.db.remove_garbage(keys)


__all__ = ["Orchestrator", "RunMismatch", "RunSpec", "SchedulerError", "open_run", "run_spec"]
