"""The scheduler's state machine on a real SQLite file: routing, exact accounting, failures, restarts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from common.data import SampleId
from common.protocol import ArtifactRef, CompleteRequest
from common.storage import ObjectStore
from orchestrator.db import StateDB
from orchestrator.epochs import EpochClock
from orchestrator.errors import RequestRejected
from orchestrator.links import StoreLinks
from orchestrator.scheduler import Scheduler
from orchestrator.settings import OrchestratorSettings

RUN = "run-test"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def settings(**overrides: object) -> OrchestratorSettings:
    values: dict[str, object] = dict(
        max_outstanding=2,
        item_timeout_s=10.0,
        miner_timeout_s=5.0,
        max_attempts=2,
        garbage_delay_s=0.0,
        validation_fraction=0.0,
    )
    values.update(overrides)
    return OrchestratorSettings(**values)  # type: ignore[arg-type]


def make(path: Path, clock: Clock, n_stages: int = 3, **overrides: object) -> Scheduler:
    return Scheduler(
        StateDB(path),
        run_id=RUN,
        n_stages=n_stages,
        settings=settings(**overrides),
        sample_ids=lambda n: [SampleId(shard=0, offset=n)],
        clock=clock,
    )


def ref(key: str | None) -> ArtifactRef | None:
    return None if key is None else ArtifactRef(key=key, size=10, sha256="ab" * 32)


def finish(s: Scheduler, hotkey: str, loss: float | None = None) -> bool:
    """Complete whatever `hotkey` is working on, as an honest miner would."""
    miner = s.miners[hotkey]
    it = s.items[s.assigned[hotkey]]
    is_tail = it.kind == "forward" and it.stage == s.n_stages - 1
    req = CompleteRequest(
        run_id=RUN,
        session=miner.session,
        item_id=it.item_id,
        output=ref(it.output_key),
        loss=(loss if loss is not None else 2.0) if is_tail else None,
    )
    return s.complete(miner, req)


def register_pipeline(s: Scheduler, n: int = 3) -> list[str]:
    hotkeys = [f"hk{i}" for i in range(n)]
    for hk in hotkeys:
        s.register(hk, "cpu")
    return hotkeys


def check_accounting(s: Scheduler) -> None:
    """Every issued sample is in exactly one state, and the counters agree with the durable record."""
    counts = s.db.count_samples()
    assert sum(counts.values()) == s.next_sample
    assert counts.get("done", 0) == s.completed
    assert counts.get("dropped", 0) == s.dropped
    assert counts.get("in_flight", 0) == s.in_flight()
    assert counts.get("retry", 0) == s.waiting_retry()


def test_one_sample_flows_forward_then_back_to_the_miners_that_ran_the_forwards(tmp_path: Path) -> None:
    clock = Clock()
    s = make(tmp_path / "s.db", clock)
    head, body, tail = register_pipeline(s)
    assert [s.miners[h].stage for h in (head, body, tail)] == [0, 1, 2]

    first = s.next_item(s.miners[head])
    assert first is not None and (first.kind, first.stage) == ("forward", 0)
    assert s.samples_of(first) == [SampleId(shard=0, offset=0)]
    assert first.output_key == f"runs/{RUN}/{head}/{first.item_id}"
    assert s.next_item(s.miners[body]) is None  # nothing for stage 1 yet
    assert not finish(s, head)
    fwd1 = s.next_item(s.miners[body])
    assert fwd1 is not None and fwd1.input == ref(first.output_key)
    finish(s, body)
    tail_item = s.next_item(s.miners[tail])
    assert tail_item is not None and s.samples_of(tail_item) is not None
    finish(s, tail, loss=3.5)
    back1 = s.next_item(s.miners[body])
    assert back1 is not None and back1.kind == "backward" and back1.forward_item == fwd1.item_id
    finish(s, body)
    back0 = s.next_item(s.miners[head])
    assert back0 is not None and back0.kind == "backward" and back0.output_key is None
    assert finish(s, head) is True
    assert s.completed == 1 and s.in_flight() == 0
    ((seq, sample, attempt, loss, _, pathway),) = s.db.losses_after(0, 10)
    assert (sample, attempt, loss, pathway) == (0, 1, 3.5, [head, body, tail])
    # Every object of the finished sample is queued for deletion.
    assert s.db.count_garbage() == 4
    check_accounting(s)


def test_outstanding_forwards_per_miner_are_bounded(tmp_path: Path) -> None:
    s = make(tmp_path / "s.db", Clock())
    head, _, _ = register_pipeline(s)
    for _ in range(2):
        assert s.next_item(s.miners[head]) is not None
        finish(s, head)
    assert len(s.miners[head].holding) == 2
    assert s.next_item(s.miners[head]) is None


def test_a_lost_answer_is_redelivered_and_a_retried_completion_is_idempotent(tmp_path: Path) -> None:
    s = make(tmp_path / "s.db", Clock())
    head, _, _ = register_pipeline(s)
    item = s.next_item(s.miners[head])
    assert item is not None
    assert s.next_item(s.miners[head]) is item  # the miner asks again: it never got the first answer
    req = CompleteRequest(run_id=RUN, session=1, item_id=item.item_id, output=ref(item.output_key))
    s.complete(s.miners[head], req)
    s.complete(s.miners[head], req)  # the retry of a completion whose answer was lost
    assert s.items_completed == 1
    assert len(s.stage_queue[1]) == 1


def test_ownership_of_items_and_upload_keys(tmp_path: Path) -> None:
    s = make(tmp_path / "s.db", Clock())
    head, body, _ = register_pipeline(s)
    item = s.next_item(s.miners[head])
    assert item is not None and item.output_key is not None
    assert s.may_upload(s.miners[head], item.output_key) is item
    with pytest.raises(RequestRejected) as foreign:
        s.may_upload(s.miners[body], item.output_key)
    assert (foreign.value.status, foreign.value.code) == (403, "foreign_key")
    with pytest.raises(RequestRejected) as other:
        s.may_upload(s.miners[head], f"runs/{RUN}/{head}/something-else")
    assert other.value.code == "unexpected_key"
    stolen = CompleteRequest(run_id=RUN, session=1, item_id=item.item_id, output=ref(item.output_key))
    with pytest.raises(RequestRejected) as not_yours:
        s.complete(s.miners[body], stolen)
    assert not_yours.value.status == 403
    wrong_key = CompleteRequest(
        run_id=RUN, session=1, item_id=item.item_id, output=ref(f"runs/{RUN}/{head}/x")
    )
    with pytest.raises(RequestRejected) as wrong:
        s.complete(s.miners[head], wrong_key)
    assert wrong.value.code == "wrong_output"
    with pytest.raises(RequestRejected) as loss_lie:
        s.complete(
            s.miners[head],
            CompleteRequest(
                run_id=RUN, session=1, item_id=item.item_id, output=ref(item.output_key), loss=1.0
            ),
        )
    assert loss_lie.value.code == "unexpected_loss"
    with pytest.raises(RequestRejected) as stale:
        s.session_miner(head, RUN, 7)
    assert stale.value.code == "stale_session"
    with pytest.raises(RequestRejected) as other_run:
        s.session_miner(head, "run-other", 1)
    assert other_run.value.code == "run_mismatch"


def test_deadline_requeues_the_sample_and_cancels_saved_forwards(tmp_path: Path) -> None:
    clock = Clock()
    s = make(tmp_path / "s.db", clock)
    head, body, tail = register_pipeline(s)
    s.next_item(s.miners[head])
    finish(s, head)
    s.next_item(s.miners[body])  # stage 1 takes it and then hangs
    clock.now += 11
    for hk in (head, body, tail):
        s.miners[hk].last_seen = clock.now  # everyone is alive; only the item is late
    s.reap()
    assert s.attempts_failed == 1 and s.waiting_retry() == 1
    assert s.take_cancelled(s.miners[head]) == ["0.1.0f"]
    assert not s.miners[head].holding
    retry = s.next_item(s.miners[head])
    assert retry is not None and (retry.sample, retry.attempt) == (0, 2)
    check_accounting(s)


def test_a_silent_miner_is_deactivated_and_samples_are_dropped_after_max_attempts(tmp_path: Path) -> None:
    clock = Clock()
    s = make(tmp_path / "s.db", clock)
    head, body, tail = register_pipeline(s)
    for _attempt in range(2):
        s.next_item(s.miners[head])
        finish(s, head)
        s.next_item(s.miners[body])
        clock.now += 6  # body stops talking; head and tail keep polling
        s.miners[head].last_seen = s.miners[tail].last_seen = clock.now
        s.reap()
        assert not s.miners[body].active
        s.session_miner(body, RUN, 1)  # it comes back
    assert s.dropped == 1 and s.completed == 0
    assert [e["sample"] for e in s.db.events("sample_dropped")] == [0]
    check_accounting(s)


def test_restart_resumes_the_same_run_with_state_and_counters(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "s.db"
    s = make(path, clock)
    head, body, tail = register_pipeline(s)

    def run(hotkey: str) -> None:
        assert s.next_item(s.miners[hotkey]) is not None
        finish(s, hotkey)

    for hotkey in (head, body, tail, body, head):  # sample 0 all the way
        run(hotkey)
    for hotkey in (head, body, tail):  # sample 1 up to its backward
        run(hotkey)
    body_item = s.next_item(s.miners[body])  # assigned when the orchestrator dies
    assert body_item is not None and body_item.kind == "backward"
    before = (s.next_sample, s.completed, s.items_completed, dict(s.db.count_samples()))
    s.db.close()

    clock.now += 100  # down for a while; deadlines are extended so the miners can carry on
    r = make(path, clock)
    assert (r.next_sample, r.completed, r.items_completed, dict(r.db.count_samples())) == before
    assert r.miners[body].session == 1 and r.miners[head].holding == {"1.1.0f"}
    again = r.next_item(r.miners[body])
    assert again is not None and again.item_id == body_item.item_id  # redelivered
    r.reap()
    assert r.attempts_failed == 0
    finish(r, body)
    back = r.next_item(r.miners[head])
    assert back is not None and back.forward_item == "1.1.0f"
    assert finish(r, head) is True and r.completed == 2
    check_accounting(r)


def test_accounting_stays_exact_under_random_faults(tmp_path: Path) -> None:
    rng = random.Random(7)
    clock = Clock()
    s = make(tmp_path / "s.db", clock, max_attempts=3, max_outstanding=3)
    hotkeys = register_pipeline(s, 6)  # two miners per stage
    for _ in range(1500):
        hk = rng.choice(hotkeys)
        miner = s.miners[hk]
        roll = rng.random()
        clock.now += rng.random() * 0.5
        if roll < 0.02:
            s.register(hk, "cpu")  # restarted: loses its state
            continue
        if roll < 0.05:
            clock.now += 6  # a stall long enough for deadlines and silence
        try:
            s.session_miner(hk, RUN, miner.session)
        except RequestRejected:
            continue
        for other in hotkeys:
            if other != hk and rng.random() < 0.9:
                s.miners[other].last_seen = clock.now
        if hk in s.assigned:
            it = s.items[s.assigned[hk]]
            if rng.random() < 0.05:
                s.fail_item(miner, it.item_id, "chaos", blame_input=rng.random() < 0.5)
            else:
                finish(s, hk, loss=rng.random() * 5)
        else:
            s.take_cancelled(miner)
            s.next_item(miner)
        s.reap()
        check_accounting(s)
    assert s.completed > 20 and s.attempts_failed > 0
    # No sample is ever completed twice: one loss per completed attempt at most, and done rows are unique.
    losses = s.db.losses_after(0, 100_000)
    assert len({(sample, attempt) for _, sample, attempt, *_ in losses}) == len(losses)


def test_a_starving_stage_gets_a_miner_moved_to_it(tmp_path: Path) -> None:
    clock = Clock()
    s = make(tmp_path / "s.db", clock)
    head, body, tail, spare = register_pipeline(s, 4)  # the fourth joins stage 0
    assert s.miners[spare].stage == 0
    for hk in (head, spare):
        s.miners[hk].forward_s = s.miners[hk].backward_s = 0.5
    s.next_item(s.miners[spare])
    finish(s, spare)  # it holds a forward that the move will cancel
    clock.now += 6
    for hk in (head, spare, tail):
        s.miners[hk].last_seen = clock.now
    s.reap()  # the only stage-1 miner went silent: stage 1 starves
    assert not s.miners[body].active
    move = s.rebalance()
    assert move is not None and move.to_stage == 1 and move.from_stage == 0
    moved = s.miners[move.hotkey]
    assert moved.move_to == 1 and s.next_item(moved) is None
    assert s.rebalance() is None  # one move at a time, and not twice for the same miner
    s.register(move.hotkey, "cpu")  # the miner reacts to `move_to_stage` by registering again
    assert (moved.stage, moved.move_to, moved.session) == (1, None, 2)
    assert [e["miner"] for e in s.db.events("miner_moved")] == [move.hotkey]
    check_accounting(s)


def test_a_paused_epoch_starts_no_sample_and_carries_running_ones_over_without_counting_them(
    tmp_path: Path,
) -> None:
    clock = Clock()
    s = make(tmp_path / "s.db", clock)  # max_attempts=2
    head, body, tail = register_pipeline(s)
    for h in (head, body, tail, body, head):  # one whole sample: one optimizer step per stage
        s.next_item(s.miners[h])
        finish(s, h)
    assert [s.miners[h].epoch_steps for h in (head, body, tail)] == [1, 1, 1]

    s.next_item(s.miners[head])
    finish(s, head)  # sample 1 is now waiting for stage 1
    s.pause()
    assert s.next_item(s.miners[head]) is None  # no new sample while the epoch drains
    assert s.next_item(s.miners[body]) is not None  # but the running one goes on
    for _ in range(3):  # carried over again and again: never dropped, never counted as a failure
        assert s.carry_over("epoch ended") == 1
        s.resume()
        s.next_item(s.miners[head])
        s.pause()
    assert s.dropped == 0 and s.attempts_failed == 0 and s.in_flight() == 1
    check_accounting(s)
    assert s.db.count_events("attempt_carried_over") == 3


def test_a_queued_forward_wakes_one_parked_miner_that_can_take_it(tmp_path: Path) -> None:
    """With hundreds of miners per stage, waking all of them for each item makes them race for it; one
    parked miner of the item's stage that would take it is woken, the longest-waiting first."""
    from orchestrator.wakeups import Wakeups

    wakeups = Wakeups()
    s = Scheduler(
        StateDB(tmp_path / "state.sqlite"),
        run_id=RUN,
        n_stages=3,
        settings=settings(),
        sample_ids=lambda n: [SampleId(shard=0, offset=n)],
        clock=Clock(),
        wakeups=wakeups,
    )
    for hk, stage in [("head", 0), ("busy", 1), ("first", 1), ("second", 1), ("tail", 2)]:
        s.register(hk, "cpu", preferred_stage=stage)
    events = {hk: wakeups.event(hk) for hk in s.miners if hk != "head"}  # the head is told after each item
    s.next_item(s.miners["head"])
    s.miners["busy"].holding.update({"x", "y"})  # at max_outstanding: it would not take a forward
    with wakeups.parked("busy"), wakeups.parked("first"), wakeups.parked("second"), wakeups.parked("tail"):
        finish(s, "head")  # queues the stage-1 forward
        assert {hk for hk, e in events.items() if e.is_set()} == {"first"}
        s.next_item(s.miners["head"])
        finish(s, "head")  # a second forward wakes the next parked miner, not "first" again
        assert {hk for hk, e in events.items() if e.is_set()} == {"first", "second"}


def epoch_clock(s: Scheduler, clock: Clock, store: ObjectStore) -> EpochClock:
    return EpochClock(
        s.db, s, s.settings, n_stages=3, stage_numel=[100, 100, 100], seed=0,
        links=StoreLinks(store, upload_expires_s=60), clock=clock,
    )  # fmt: skip


def run_one_sample(s: Scheduler, head: str, body: str, tail: str) -> None:
    """Hand out the next sample and finish it at every stage, forward and back."""
    for hk in [head, body, tail, body, head]:
        assert s.next_item(s.miners[hk]) is not None
        finish(s, hk)


def test_the_epoch_time_limit_counts_from_the_epochs_first_sample(tmp_path: Path, store: ObjectStore) -> None:
    """Miners that take longer than `epoch_max_s` to start (or to reload a checkpoint) do not end the epoch at
    its first sample: the limit runs from when training began, so every replica gets its share of the epoch.
    The merges it ends in name any miner of a stage that did not train, with the reason."""
    clock = Clock()
    s = make(tmp_path / "state.sqlite", clock, epoch_max_s=10.0, merge_every_samples=0)
    epochs = epoch_clock(s, clock, store)
    clock.now += 60  # nobody has trained yet: the epoch's clock has not started
    head, body, tail = register_pipeline(s, 3)
    s.register("idle", "cpu", preferred_stage=1)  # a second replica of stage 1 that never gets an item
    run_one_sample(s, head, body, tail)
    epochs.tick()
    assert epochs.state.phase == "training" and epochs.state.training_began
    clock.now += 9
    epochs.tick()
    assert epochs.state.phase == "training"  # 9 s after the first sample, 69 s after the epoch started
    clock.now += 1
    epochs.tick()
    assert epochs.state.phase == "merging"  # drained at once: nothing was in flight
    left_out = epochs.merges[1].state.excluded
    assert left_out == {"idle": "no optimizer steps this epoch"}
    assert sorted(epochs.merges[1].state.accepted) == [body]


def test_a_run_that_reaches_max_samples_merges_its_last_epoch_at_once(
    tmp_path: Path, store: ObjectStore
) -> None:
    clock = Clock()
    s = make(tmp_path / "state.sqlite", clock, epoch_max_s=0.0, merge_every_samples=100, max_samples=2)
    epochs = epoch_clock(s, clock, store)
    head, body, tail = register_pipeline(s, 3)
    run_one_sample(s, head, body, tail)
    epochs.tick()
    assert epochs.state.phase == "training"  # one more sample to go
    run_one_sample(s, head, body, tail)
    assert s.next_item(s.miners[head]) is None
    epochs.tick()
    assert epochs.state.phase == "merging"
