"""The training clock's state machine: samples, their attempts, and the work items that carry them.

A sample (one micro-batch of sequences, named by its index in the run's schedule) flows through the
pipeline as items: a forward at every stage, the tail's combined forward+backward, then a backward at every
stage but the tail, each going back to the miner that ran that stage's forward (it holds the autograd state).
If any item of an attempt fails (deadline, dead miner, bad upload, a miner giving up) the whole attempt is
abandoned, the miners holding its state are told to drop it, and the sample is retried from the head, or
dropped and recorded after `max_attempts`. So every issued sample is always in exactly one state:

    in_flight -> done | retry -> in_flight ... | dropped

and `samples_completed` counts each sample once. The scheduler does no I/O beyond its `StateDB`; the HTTP
layer presigns URLs, checks uploads and wakes long-polling miners through its `Waker`.

The epoch clock drives it through `pause`, `resume` and `start_epoch`, and it is the one owner of every
miner record, including the weights version a miner holds (`set_weights_version`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from common.data import SampleId
from common.protocol import ArtifactRef, CompleteRequest, ItemKind, is_last_stage, work_kind
from orchestrator.assignment import MinerLoad, Move, assign_stage, plan_move
from orchestrator.db import Item, Miner, Sample, StateDB
from orchestrator.errors import RequestRejected
from orchestrator.settings import OrchestratorSettings

_EWMA = 0.2  # weight of the newest measurement in a miner's speed estimate


def _ewma(previous: float | None, latest: float) -> float:
    return latest if previous is None else (1 - _EWMA) * previous + _EWMA * latest


class Waker(Protocol):
    """Tells long-polling miners that something they may take has arrived (the service's `Wakeups`)."""

    def notify(self, hotkey: str) -> None:
        """Work only this miner may do (its backward, a cancellation, a merge task)."""

    def wake_one(self, wants: Callable[[str], bool]) -> None:
        """Work any of many miners may take: one that `wants` it."""


class NoWaker:
    """Nobody long-polls (a scheduler driven directly, as in tests and benchmarks)."""

    def notify(self, hotkey: str) -> None:
        pass

    def wake_one(self, wants: Callable[[str], bool]) -> None:
        pass


def item_id(sample: int, attempt: int, stage: int, kind: ItemKind) -> str:
    return f"{sample}.{attempt}.{stage}{kind[0]}"


@dataclass
class _Attempt:
    sample: int
    attempt: int
    items: list[str]
    pathway: list[str | None]


class Scheduler:
    def __init__(
        self,
        db: StateDB,
        *,
        run_id: str,
        n_stages: int,
        settings: OrchestratorSettings,
        sample_ids: Callable[[int], list[SampleId]],
        clock: Callable[[], float] = time.time,
        wakeups: Waker | None = None,
        on_item_done: Callable[[Item], None] = lambda it: None,
    ) -> None:
        self.db, self.run_id, self.n_stages, self.settings = db, run_id, n_stages, settings
        self.sample_ids, self.clock = sample_ids, clock
        self.wakeups: Waker = wakeups or NoWaker()
        self.on_item_done = on_item_done  # metrics: every accepted item, once
        self.miners: dict[str, Miner] = {}
        self.samples: dict[int, Sample] = {}  # in_flight and retry only
        self.items: dict[str, Item] = {}  # items of running attempts
        self.attempts: dict[tuple[int, int], _Attempt] = {}
        self.retry: deque[int] = deque()
        self.stage_queue: list[deque[str]] = [deque() for _ in range(n_stages)]
        self.backward_queue: dict[str, deque[str]] = {}
        self.assigned: dict[str, str] = {}  # hotkey -> the item it is working on
        self.next_sample = 0
        self._paused = False  # no new attempts (the epoch is draining or merging); running ones go on
        self._epoch = 0  # the epoch clock's (`start_epoch`); stamped on every accepted item
        self.completed = 0
        self.dropped = 0
        self.attempts_failed = 0
        self.items_completed = 0
        self._load()

    # ------------------------------------------------------------------------------------------------
    # What the epoch clock drives

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def epoch(self) -> int:
        return self._epoch

    def pause(self) -> None:
        """Start no new attempt (the epoch is draining or merging); the running ones go on."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def restore_epoch(self, epoch: int, *, paused: bool) -> None:
        """The epoch clock's state after a restart."""
        self._epoch, self._paused = epoch, paused

    def start_epoch(self, epoch: int) -> None:
        """A new epoch: every miner's optimizer steps count from zero again, and training resumes.

        Inside the caller's transaction, so that the epoch and the reset counts are saved together."""
        for m in self.miners.values():
            m.epoch_steps = 0
            self.db.save_miner(m)
        self._epoch = epoch
        self.resume()

    def set_weights_version(self, miner: Miner, version: int) -> None:
        """The global weights version `miner` holds from now on (-1: none the orchestrator knows of)."""
        miner.weights_version = version
        self.db.save_miner(miner)

    def notify(self, hotkey: str) -> None:
        self.wakeups.notify(hotkey)

    def notify_all(self) -> None:
        for hotkey in list(self.miners):
            self.notify(hotkey)

    def collect(self, keys: list[str], now: float | None = None) -> None:
        """Delete these objects once the grace period (from `now`) has passed."""
        self.db.add_garbage(keys, (self.clock() if now is None else now) + self.settings.object_retention_s)

    # ------------------------------------------------------------------------------------------------
    # Loading after a restart

    def _load(self) -> None:
        now = self.clock()
        # Miners and items get the downtime back, so a restart does not expire work the miners still hold.
        grace = now + max(self.settings.item_timeout_s, self.settings.miner_timeout_s)
        self.next_sample = int(self.db.get_meta("next_sample") or 0)
        counts = self.db.count_samples()
        self.completed, self.dropped = counts.get("done", 0), counts.get("dropped", 0)
        self.attempts_failed = self.db.count_events("attempt_failed")
        self.items_completed = self.db.count_items("done")
        for miner in self.db.load_miners():
            if miner.active:
                miner.last_seen = now
            self.miners[miner.hotkey] = miner
            self.backward_queue[miner.hotkey] = deque()
        for sample in self.db.load_samples(("in_flight", "retry")):
            self.samples[sample.sample] = sample
            if sample.state == "retry":
                self.retry.append(sample.sample)
                continue
            items = sorted(self.db.load_items(sample.sample, sample.attempts), key=lambda i: i.created_at)
            attempt = _Attempt(sample.sample, sample.attempts, [], [None] * self.n_stages)
            self.attempts[(sample.sample, sample.attempts)] = attempt
            for it in items:
                it.deadline = max(it.deadline, grace) if it.status in ("queued", "assigned") else it.deadline
                self._index_item(attempt, it)

    def _index_item(self, attempt: _Attempt, it: Item) -> None:
        self.items[it.item_id] = it
        attempt.items.append(it.item_id)
        if it.kind == "forward" and it.miner:
            attempt.pathway[it.stage] = it.miner
        if it.status == "assigned" and it.miner:
            self.assigned[it.miner] = it.item_id
        elif it.status == "queued" and it.kind == "forward":
            self.stage_queue[it.stage].append(it.item_id)
        elif it.status == "queued" and it.miner:
            self.backward_queue.setdefault(it.miner, deque()).append(it.item_id)
        if work_kind(it.kind, it.stage, self.n_stages) == "forward" and it.status == "done" and it.miner:
            if not self._backward_done(attempt, it.stage):
                self.miners[it.miner].holding.add(it.item_id)

    def _backward_done(self, attempt: _Attempt, stage: int) -> bool:
        bid = item_id(attempt.sample, attempt.attempt, stage, "backward")
        return bid in self.items and self.items[bid].status == "done"

    # ------------------------------------------------------------------------------------------------
    # Miners

    def register(self, hotkey: str, device: str, preferred_stage: int | None = None) -> Miner:
        """A miner (re)joining: a new session; whatever its previous session held is lost with it. A new
        miner gets the stage it prefers, if any, else the one that balances the pipeline best."""
        if preferred_stage is not None and preferred_stage >= self.n_stages:
            raise RequestRejected(
                422, "no_such_stage", f"stage {preferred_stage} does not exist; this run has {self.n_stages}"
            )
        now = self.clock()
        with self.db.transaction():
            old = self.miners.get(hotkey)
            if old is not None:
                self._fail_miner_work(old, "the miner registered again (restarted)")
                stage = old.move_to if old.move_to is not None else old.stage
                old.session += 1
                old.stage, old.move_to, old.device = stage, None, device
                old.last_seen, old.registered_at, old.active = now, now, True
                old.holding.clear()
                old.cancelled.clear()
                miner = old
            else:
                stage = (
                    preferred_stage
                    if preferred_stage is not None
                    else assign_stage(self.loads(), self.n_stages)
                )
                miner = Miner(
                    hotkey=hotkey, session=1, stage=stage, device=device, registered_at=now, last_seen=now
                )
                self.miners[hotkey] = miner
                self.backward_queue[hotkey] = deque()
            self.db.save_miner(miner)
            self.db.add_event(now, "registered", f"stage {miner.stage} session {miner.session}", miner=hotkey)
        return miner

    def loads(self) -> list[MinerLoad]:
        return [
            MinerLoad(m.hotkey, m.stage, self.seconds_per_sample(m)) for m in self.miners.values() if m.active
        ]

    def seconds_per_sample(self, m: Miner) -> float | None:
        if m.forward_s is None:
            return None
        return m.forward_s + (m.backward_s or 0.0)

    def session_miner(self, hotkey: str, run_id: str, session: int) -> Miner:
        """The miner behind a request, after checking it talks about this run and its current session."""
        if run_id != self.run_id:
            raise RequestRejected(
                409, "run_mismatch", f"this orchestrator runs {self.run_id}; register again"
            )
        miner = self.miners.get(hotkey)
        if miner is None:
            raise RequestRejected(409, "not_registered", "this hotkey has not registered with this run")
        if session != miner.session:
            raise RequestRejected(409, "stale_session", f"session {session} was replaced; register again")
        now = self.clock()
        miner.last_seen = now
        if not miner.active:
            miner.active = True
            self.db.save_miner(miner)
        return miner

    # ------------------------------------------------------------------------------------------------
    # Handing out work

    def next_item(self, miner: Miner) -> Item | None:
        """The item this miner should work on now, or None. Re-delivers an item whose answer was lost."""
        if miner.move_to is not None:
            return None
        current = self.assigned.get(miner.hotkey)
        if current is not None:
            return self.items[current]
        now = self.clock()
        if backward := self._pop_queued(self.backward_queue[miner.hotkey]):
            return self._assign(backward, miner, now)
        if not self._has_room(miner):
            return None
        if miner.stage == 0:
            if self.paused:
                return None
            sample = self._take_sample(now)
            if sample is None:
                return None
            return self._assign(self._new_attempt(sample, now), miner, now)
        if forward := self._pop_queued(self.stage_queue[miner.stage]):
            return self._assign(forward, miner, now)
        return None

    def _wants_work_of(self, stage: int) -> Callable[[str], bool]:
        """Whether a miner would take a new item of `stage` now (see `next_item`)."""

        def wants(hotkey: str) -> bool:
            m = self.miners.get(hotkey)
            if m is None or not m.active or m.stage != stage or m.move_to is not None:
                return False
            return hotkey not in self.assigned and self._has_room(m)

        return wants

    def _has_room(self, miner: Miner) -> bool:
        """Whether the miner may take another forward: the tail keeps no forward state, the others at most
        `max_outstanding` awaiting their backward."""
        tail = is_last_stage(miner.stage, self.n_stages)
        return tail or len(miner.holding) < self.settings.max_outstanding

    def _pop_queued(self, queue: deque[str]) -> Item | None:
        """The first item of `queue` still waiting; entries of failed attempts are skipped and dropped."""
        while queue:
            candidate = self.items.get(queue.popleft())
            if candidate is not None and candidate.status == "queued":
                return candidate
        return None

    def _take_sample(self, now: float) -> Sample | None:
        while self.retry:
            sample = self.samples.get(self.retry.popleft())
            if sample is not None and sample.state == "retry":
                return sample
        if self.settings.max_samples is not None and self.next_sample >= self.settings.max_samples:
            return None
        sample = Sample(sample=self.next_sample, state="in_flight", attempts=0)
        self.next_sample += 1
        self.db.set_meta("next_sample", self.next_sample)
        self.samples[sample.sample] = sample
        return sample

    def _new_attempt(self, sample: Sample, now: float) -> Item:
        sample.state, sample.attempts = "in_flight", sample.attempts + 1
        self.db.save_sample(sample, now)
        attempt = _Attempt(sample.sample, sample.attempts, [], [None] * self.n_stages)
        self.attempts[(sample.sample, sample.attempts)] = attempt
        return self._new_item(attempt, 0, "forward", None, None, now)  # assigned at once, never queued

    def _assign(self, it: Item, miner: Miner, now: float) -> Item:
        with self.db.transaction():
            it.status, it.miner, it.session = "assigned", miner.hotkey, miner.session
            it.assigned_at, it.deadline = now, now + self.settings.item_timeout_s
            it.output_key = self.output_key(it, miner.hotkey)
            if it.kind == "forward":
                self.attempts[(it.sample, it.attempt)].pathway[it.stage] = miner.hotkey
            self.assigned[miner.hotkey] = it.item_id
            self.db.save_item(it)
        return it

    def output_key(self, it: Item, hotkey: str) -> str | None:
        """The one key the item's output may be uploaded to, under the miner's own prefix."""
        if it.kind == "backward" and it.stage == 0:
            return None  # the head's backward has no output: its input is tokens
        return f"{self.miner_prefix(hotkey)}{it.item_id}"

    def miner_prefix(self, hotkey: str) -> str:
        return f"runs/{self.run_id}/{hotkey}/"

    def samples_of(self, it: Item) -> list[SampleId] | None:
        """Token sequences a forward needs: the head embeds them, the stages after it embed them again
        (`ModelConfig.token_dim`), and the tail also scores against them."""
        return self.sample_ids(it.sample) if it.kind == "forward" else None

    def take_cancelled(self, miner: Miner) -> list[str]:
        cancelled, miner.cancelled = miner.cancelled, []
        return cancelled

    def assigned_item(self, miner: Miner, item: str) -> Item:
        """The item `item`, which must be this miner's current assignment."""
        it = self.items.get(item)
        if it is None or it.miner != miner.hotkey or it.session != miner.session:
            raise RequestRejected(403, "not_your_item", f"item {item} is not assigned to this miner")
        if it.status != "assigned":
            raise RequestRejected(409, "item_closed", f"item {item} is {it.status}, not in progress")
        return it

    def may_upload(self, miner: Miner, key: str) -> Item:
        """The item whose output `key` is; only the miner it is assigned to may upload there."""
        if not key.startswith(self.miner_prefix(miner.hotkey)):
            raise RequestRejected(403, "foreign_key", "upload keys must be under your own prefix")
        current = self.assigned.get(miner.hotkey)
        it = self.items.get(current) if current else None
        if it is None or it.output_key != key:
            raise RequestRejected(403, "unexpected_key", f"{key} is not the output of an item you hold")
        return it

    # ------------------------------------------------------------------------------------------------
    # Completing work

    def check_complete(self, miner: Miner, req: CompleteRequest) -> Item | None:
        """Validate a completion before its upload is checked; None means it was already accepted."""
        done = self.items.get(req.item_id) or self.db.get_item(req.item_id)
        if done is not None and done.status == "done" and done.miner == miner.hotkey:
            if done.output == req.output:
                return None  # a retried request whose first answer was lost
        it = self.assigned_item(miner, req.item_id)
        is_tail = work_kind(it.kind, it.stage, self.n_stages) == "tail"
        if it.output_key is None:
            if req.output is not None:
                raise RequestRejected(422, "unexpected_output", "this item has no output to upload")
        elif req.output is None or req.output.key != it.output_key:
            raise RequestRejected(422, "wrong_output", f"the output must be uploaded to {it.output_key}")
        if is_tail and req.loss is None:
            raise RequestRejected(422, "missing_loss", "the tail must report the sample's loss")
        if not is_tail and req.loss is not None:
            raise RequestRejected(422, "unexpected_loss", "only the tail reports a loss")
        return it

    def complete(self, miner: Miner, req: CompleteRequest) -> bool:
        """Apply a checked completion; returns whether the sample is now complete."""
        it = self.check_complete(miner, req)
        if it is None:
            return req.item_id.endswith(".0b")  # the head's backward is the one that completes a sample
        now = self.clock()
        attempt = self.attempts[(it.sample, it.attempt)]
        sample_done = False
        with self.db.transaction():
            self.items_completed += 1
            it.status, it.output, it.completed_at, it.loss = "done", req.output, now, req.loss
            it.epoch, it.done_seq = self.epoch, self.items_completed
            del self.assigned[miner.hotkey]
            self._measure(miner, it, now)
            miner.items_completed += 1
            kind = work_kind(it.kind, it.stage, self.n_stages)
            if kind != "forward":
                miner.epoch_steps += 1  # each backward (and the tail's forward) is one optimizer step
            self.db.save_item(it)
            self.db.save_miner(miner)
            if kind == "forward":
                miner.holding.add(it.item_id)
                self._queue(attempt, it.stage + 1, "forward", it.output, None, now)
            elif kind == "tail":
                assert req.loss is not None
                pathway = [m or "" for m in attempt.pathway]
                self.db.add_loss(it.sample, it.attempt, req.loss, now, pathway)
                self._queue_backward(attempt, it.stage - 1, it.output, now)
            else:
                miner.holding.discard(it.forward_item or "")
                if it.stage > 0:
                    self._queue_backward(attempt, it.stage - 1, it.output, now)
                else:
                    self._finish_attempt(attempt, now)
                    sample_done = True
        self.on_item_done(it)
        if sample_done:
            return True
        self.notify(miner.hotkey)
        return False

    def _measure(self, miner: Miner, it: Item, now: float) -> None:
        took = now - (it.assigned_at or now)
        if it.kind == "forward":
            miner.forward_s = _ewma(miner.forward_s, took)
        else:
            miner.backward_s = _ewma(miner.backward_s, took)

    def _new_item(
        self,
        attempt: _Attempt,
        stage: int,
        kind: ItemKind,
        input: ArtifactRef | None,
        miner: str | None,
        now: float,
    ) -> Item:
        """A new queued item of `attempt`, indexed in memory (the caller persists or assigns it)."""
        new = Item(
            item_id=item_id(attempt.sample, attempt.attempt, stage, kind),
            sample=attempt.sample,
            attempt=attempt.attempt,
            stage=stage,
            kind=kind,
            status="queued",
            created_at=now,
            deadline=now + self.settings.item_timeout_s,
            miner=miner,
            input=input,
            forward_item=item_id(attempt.sample, attempt.attempt, stage, "forward")
            if kind == "backward"
            else None,
        )
        self.items[new.item_id] = new
        attempt.items.append(new.item_id)
        return new

    def _queue(
        self,
        attempt: _Attempt,
        stage: int,
        kind: ItemKind,
        input: ArtifactRef | None,
        miner: str | None,
        now: float,
    ) -> Item:
        """A new item waiting for a miner: of its stage (forward) or the forward's own (backward)."""
        new = self._new_item(attempt, stage, kind, input, miner, now)
        self.db.save_item(new)
        if kind == "forward":
            self.stage_queue[stage].append(new.item_id)
            self.wakeups.wake_one(self._wants_work_of(stage))
        else:
            assert miner is not None
            self.backward_queue[miner].append(new.item_id)
            self.notify(miner)
        return new

    def _queue_backward(self, attempt: _Attempt, stage: int, grad: ArtifactRef | None, now: float) -> None:
        owner = attempt.pathway[stage]
        assert owner is not None, "a backward always follows a forward at the same stage"
        self._queue(attempt, stage, "backward", grad, owner, now)

    def _finish_attempt(self, attempt: _Attempt, now: float) -> None:
        sample = self.samples.pop(attempt.sample)
        sample.state = "done"
        self.db.save_sample(sample, now)
        self.completed += 1
        self._retire(attempt, now)

    def _retire(self, attempt: _Attempt, now: float) -> None:
        """Forget a finished attempt and schedule its objects for deletion."""
        keys = []
        for iid in attempt.items:
            it = self.items.pop(iid, None)
            if it is not None and it.output_key:
                keys.append(it.output_key)
        self.attempts.pop((attempt.sample, attempt.attempt), None)
        self.collect(keys, now)

    # ------------------------------------------------------------------------------------------------
    # Failures

    def fail_item(self, miner: Miner, item: str, reason: str, *, blame_input: bool) -> None:
        """A miner giving up on its item; blaming the input records it against the previous producer."""
        it = self.assigned_item(miner, item)
        now = self.clock()
        with self.db.transaction():
            if blame_input:
                producer = self._producer_of(it)
                self.db.add_event(
                    now, "input_blamed", reason, sample=it.sample, attempt=it.attempt, miner=producer
                )
            self.fail_attempt(it.sample, it.attempt, f"{miner.hotkey[:8]} gave up on {item}: {reason}")

    def _producer_of(self, it: Item) -> str | None:
        attempt = self.attempts[(it.sample, it.attempt)]
        if it.kind == "forward":
            return attempt.pathway[it.stage - 1] if it.stage > 0 else None
        return attempt.pathway[it.stage + 1]

    def record_bad_upload(self, miner: Miner, it: Item, reason: str) -> None:
        self.db.add_event(
            self.clock(), "bad_upload", reason, sample=it.sample, attempt=it.attempt, miner=miner.hotkey
        )

    def carry_over(self, reason: str) -> int:
        """Abandon every running attempt without counting it against its sample (the epoch is ending): each
        sample is retried from the head once training resumes. Returns how many were carried over."""
        running = sorted(self.attempts)
        for sample, attempt in running:
            self.fail_attempt(sample, attempt, reason, counts=False)
        return len(running)

    def fail_attempt(self, sample_index: int, attempt_no: int, reason: str, *, counts: bool = True) -> None:
        """Abandon an attempt: free the miners' state, delete its objects, retry or drop the sample."""
        attempt = self.attempts.get((sample_index, attempt_no))
        if attempt is None:
            return
        now = self.clock()
        with self.db.transaction():
            for iid in attempt.items:
                it = self.items[iid]
                if it.miner and self.assigned.get(it.miner) == iid:
                    del self.assigned[it.miner]
                if it.miner and it.miner in self.miners and iid in self.miners[it.miner].holding:
                    self.miners[it.miner].holding.discard(iid)
                    self.miners[it.miner].cancelled.append(iid)
                    self.notify(it.miner)
                if it.status in ("queued", "assigned"):
                    it.status = "failed"
                    self.db.save_item(it)
            if counts:
                self.attempts_failed += 1
            self.db.add_event(
                now,
                "attempt_failed" if counts else "attempt_carried_over",
                reason,
                sample=sample_index,
                attempt=attempt_no,
            )
            sample = self.samples[sample_index]
            if counts and sample.attempts >= self.settings.max_attempts:
                sample.state = "dropped"
                self.samples.pop(sample_index)
                self.dropped += 1
                self.db.add_event(
                    now,
                    "sample_dropped",
                    f"after {sample.attempts} attempts: {reason}",
                    sample=sample_index,
                    attempt=attempt_no,
                )
            else:
                sample.state = "retry"
                self.retry.append(sample_index)
                self.wakeups.wake_one(self._wants_work_of(0))
            self.db.save_sample(sample, now)
            self._retire(attempt, now)

    def _fail_miner_work(self, miner: Miner, reason: str) -> None:
        """Fail every running attempt that needs this miner: it is gone or lost its memory."""
        involved = {
            (it.sample, it.attempt)
            for it in self.items.values()
            if it.miner == miner.hotkey
            and (it.status in ("queued", "assigned") or it.item_id in miner.holding)
        }
        for sample, attempt in sorted(involved):
            self.fail_attempt(sample, attempt, f"miner {miner.hotkey[:8]}: {reason}")

    def reap(self) -> None:
        """Expire silent miners and items past their deadline; called about once a second."""
        now = self.clock()
        for miner in self.miners.values():
            if miner.active and now - miner.last_seen > self.settings.miner_timeout_s:
                with self.db.transaction():
                    miner.active = False
                    self.db.save_miner(miner)
                    self.db.add_event(
                        now, "miner_inactive", "no request within miner_timeout_s", miner=miner.hotkey
                    )
                    self._fail_miner_work(miner, "stopped responding")
        expired = {
            (it.sample, it.attempt, it.item_id)
            for it in self.items.values()
            if it.status in ("queued", "assigned") and it.deadline < now
        }
        for sample, attempt, iid in sorted(expired):
            self.fail_attempt(sample, attempt, f"item {iid} passed its deadline")

    def rebalance(self) -> Move | None:
        """Move one miner to a starving stage, if the measured capacities call for it."""
        move = plan_move(self.loads(), self.n_stages)
        if move is None:
            return None
        miner = self.miners[move.hotkey]
        if miner.move_to is not None:
            return None
        with self.db.transaction():
            miner.move_to = move.to_stage
            self.db.save_miner(miner)
            self.db.add_event(
                self.clock(), "miner_moved", f"stage {move.from_stage} -> {move.to_stage}", miner=miner.hotkey
            )
            self._fail_miner_work(miner, f"moved to stage {move.to_stage}")
        self.notify(miner.hotkey)
        return move

    # ------------------------------------------------------------------------------------------------
    # Accounting

    def in_flight(self) -> int:
        return sum(s.state == "in_flight" for s in self.samples.values())

    def waiting_retry(self) -> int:
        return sum(s.state == "retry" for s in self.samples.values())

    def out_of_samples(self) -> bool:
        """`max_samples` were all handed out and none is running or waiting to be retried."""
        limit = self.settings.max_samples
        return limit is not None and self.next_sample >= limit and not self.in_flight() + self.waiting_retry()
