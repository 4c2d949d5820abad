"""A stage's merge end to end in one process: the orchestrator's state machine and finalize step, real
replicas (`MergeParticipant` over `StageTrainer`), every transfer through presigned URLs against a real
S3 server. Faults are inflicted by not running a replica, tampering with its upload, or a lying reducer."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch

from bench.merge_in_process import run_merge_in_process
from common.checkpoints import StoredCheckpoint
from common.merge import flatten, nesterov_step, robust_weighted_mean, weights_digest
from common.model import get_preset
from common.protocol import Checkpoint, GlobalWeights
from common.storage import ObjectStore
from common.training import StageTrainer
from miner.behaviors import BehaviorPolicy
from miner.merge_participant import MergeParticipant
from miner.trainer import MinerTrainer
from orchestrator.links import StoreLinks
from orchestrator.merge_finalize import run_finalize
from orchestrator.settings import OrchestratorSettings, training_spec
from orchestrator.stage_merge import StageMerge

CFG = get_preset("tiny")
STAGE, SEED = 1, 3
SPEC = training_spec(OrchestratorSettings.model_construct(lr=1e-2))  # the run defaults, a faster inner lr


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def replicas(
    n: int, http: httpx.Client, *, steps: list[int] | None = None, bad: dict[int, str] | None = None
) -> dict[str, MergeParticipant]:
    """n replicas of the stage from the seeded init, each trained on its own data for a few steps."""
    out = {}
    for i in range(n):
        behavior = (bad or {}).get(i, "honest")
        trainer = MinerTrainer(CFG, STAGE, SPEC, seed=SEED, behavior=behavior)  # type: ignore[arg-type]
        hotkey = f"5replica{i:02d}"
        p = MergeParticipant(trainer, SPEC, hotkey=hotkey, http=http, policy=BehaviorPolicy(behavior))  # type: ignore[arg-type]
        p.load(GlobalWeights(version=0, seed=SEED))
        train(p, (steps or [2] * n)[i], seed=100 * i)
        out[hotkey] = p
    return out


def train(p: MergeParticipant, steps: int, *, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for k in range(steps):
        x = torch.randn(2, 16, CFG.bottleneck_dim, generator=g)
        tokens = torch.randint(0, CFG.vocab_size, x.shape[:2], generator=g)
        out = p.trainer.forward(f"i{seed}.{k}", x, tokens)
        p.trainer.backward(f"i{seed}.{k}", torch.randn(out.shape, generator=g) * 0.1)
        p.trainer.commit()


def steps_of(parts: dict[str, MergeParticipant]) -> dict[str, int]:
    return {h: p.trainer.steps - p.steps_at_start for h, p in parts.items()}


def pseudo_gradients(parts: dict[str, MergeParticipant]) -> dict[str, torch.Tensor]:
    return {h: p.start - flatten(p.trainer.weights()) for h, p in parts.items()}


def expected(
    start: torch.Tensor, pgs: dict[str, torch.Tensor], merge: StageMerge, momentum: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge computed directly: per partition, the clipped work-weighted mean of the replicas'
    pseudo-gradients; then one outer Nesterov step from the shared start."""
    work = merge.work()
    pieces = [
        robust_weighted_mean({h: pgs[h][s.start : s.end] for h in work}, work, clip_factor=2.0)
        for s in merge.state.partitions
    ]
    return nesterov_step(start, torch.cat(pieces), momentum, lr=SPEC.outer_lr, mu=SPEC.outer_momentum)


def weights(p: MergeParticipant) -> torch.Tensor:
    return flatten(p.trainer.weights())


def merge_all(parts: dict[str, MergeParticipant], store: ObjectStore, **kw: object) -> StageMerge:
    accepted = kw.pop("accepted", None) or steps_of(parts)
    return run_merge_in_process(
        parts,
        store=store,
        cfg=CFG,
        seed=SEED,
        stage=STAGE,
        epoch=int(kw.pop("epoch", 0)),
        accepted=accepted,
        **kw,
    ).merge  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [2, 4])
def test_after_a_merge_every_replica_holds_bitwise_identical_weights(
    n: int, store: ObjectStore, http: httpx.Client
) -> None:
    parts = replicas(n, http, steps=[1 + i for i in range(n)])
    start, pgs = next(iter(parts.values())).start.clone(), pseudo_gradients(parts)
    before = [weights(p) for p in parts.values()]
    assert not all(torch.equal(before[0], w) for w in before[1:])  # they really diverged

    merge = merge_all(parts, store, epoch=n)
    state = merge.state
    assert state.phase == "done" and not state.flagged and state.settled == []
    after = [weights(p) for p in parts.values()]
    assert all(torch.equal(after[0], w) for w in after[1:])
    assert state.checkpoint is not None and set(state.applied.values()) == {state.checkpoint.digest}
    assert weights_digest(after[0]) == state.checkpoint.digest
    # Work weights are the optimizer steps each replica took.
    assert merge.work() == {f"5replica{i:02d}": float(1 + i) for i in range(n)}
    # Equal to the direct computation of the same robust weighted mean and outer step, within fp32.
    want, _ = expected(start, pgs, merge)
    assert torch.allclose(after[0], want, rtol=1e-6, atol=1e-7)


def test_a_reducer_that_uploads_a_wrong_partition_is_caught_and_the_merge_is_still_right(
    store: ObjectStore, http: httpx.Client
) -> None:
    parts = replicas(4, http, bad={2: "wrong-reduce"})
    liar = "5replica02"
    start, pgs = next(iter(parts.values())).start.clone(), pseudo_gradients(parts)
    merge = merge_all(parts, store, epoch=10)
    state = merge.state
    assert state.phase == "done"
    # Every partition the liar reduced was settled by the orchestrator's recomputation, and it was flagged.
    lied_on = sorted(p for p, rs in state.reducers.items() if liar in rs)
    assert lied_on and sorted(state.settled) == lied_on
    assert {f.hotkey for f in state.flagged} == {liar}
    after = [weights(p) for p in parts.values()]
    assert all(torch.equal(after[0], w) for w in after[1:])
    want, _ = expected(start, pgs, merge)
    assert torch.allclose(after[0], want, rtol=1e-6, atol=1e-7)
    for p in lied_on:
        honest = next(h for h in state.reducers[p] if h != liar)
        assert state.canonical[p].sha256 == state.results[p][honest].sha256


def test_two_merges_in_a_row_carry_the_outer_momentum_and_a_new_replica_joins_from_the_checkpoint(
    store: ObjectStore, http: httpx.Client
) -> None:
    parts = replicas(2, http)
    first = merge_all(parts, store, epoch=20)
    ckpt = first.state.checkpoint
    assert ckpt is not None and ckpt.version == 1
    momentum = next(iter(parts.values())).momentum
    for i, p in enumerate(parts.values()):
        train(p, 2, seed=7 + i)
    second = run_merge_in_process(
        parts, store=store, cfg=CFG, seed=SEED, stage=STAGE, epoch=21, accepted=steps_of(parts), previous=ckpt
    ).merge
    assert second.state.phase == "done" and second.state.version == 1
    after = [weights(p) for p in parts.values()]
    assert torch.equal(after[0], after[1])
    assert second.state.checkpoint is not None and weights_digest(after[0]) == second.state.checkpoint.digest
    assert momentum is not None and not torch.equal(momentum, next(iter(parts.values())).momentum)  # type: ignore[arg-type]

    # A replica that joins now loads the checkpoint: the same weights and outer momentum as the others.
    links = StoreLinks(store, upload_expires_s=900)
    c2 = second.state.checkpoint
    newcomer = MergeParticipant(StageTrainer(CFG, STAGE, SPEC, seed=SEED), SPEC, hotkey="5late", http=http)
    newcomer.load(
        GlobalWeights(
            version=2,
            seed=SEED,
            checkpoint=Checkpoint(
                weights=links.download_source(c2.weights), momentum=links.download_source(c2.momentum)
            ),
        )
    )
    veteran = next(iter(parts.values()))
    assert torch.equal(weights(newcomer), after[0]) and newcomer.version == 2
    assert veteran.momentum is not None and torch.equal(newcomer.momentum, veteran.momentum)  # type: ignore[arg-type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drive(
    merge: StageMerge,
    parts: dict[str, MergeParticipant],
    store: ObjectStore,
    *,
    silent: set[str],
    previous: StoredCheckpoint | None = None,
) -> None:
    """Run the merge phase by phase with only the replicas not in `silent` answering."""
    links = StoreLinks(store, upload_expires_s=900)
    for _ in range(20):
        if merge.finished:
            return
        if merge.phase == "finalize":
            job = merge.finalize_job()
            merge.finalized(
                run_finalize(job, store=store, cfg=CFG, seed=SEED, previous=previous, clip_factor=2.0,
                             outer_lr=SPEC.outer_lr, outer_momentum=SPEC.outer_momentum)
            )  # fmt: skip
            continue
        acted = False
        for h, p in sorted(parts.items()):
            task = merge.task_for(h, links)
            if task is not None and h not in silent:
                merge.report(h, getattr(p, task.phase)(task))
                acted = True
        if not acted and not merge.finished and merge.phase != "finalize":
            merge.clock.now = merge.state.deadline + 1  # type: ignore[attr-defined]
            merge.tick()
    raise AssertionError(f"the merge did not finish; stuck in {merge.phase}")


def start(parts: dict[str, MergeParticipant], clock: FakeClock, epoch: int) -> StageMerge:
    first = next(iter(parts.values()))
    return StageMerge.start(
        run_id="faults", epoch=epoch, stage=STAGE, version=first.version, numel=first.start.numel(),
        accepted=steps_of(parts), timeout_s=30, clip_factor=2.0, clock=clock,
    )  # fmt: skip


def upload_all(merge: StageMerge, parts: dict[str, MergeParticipant], store: ObjectStore) -> None:
    links = StoreLinks(store, upload_expires_s=900)
    for h, p in sorted(parts.items()):
        task = merge.task_for(h, links)
        assert task is not None and task.phase == "upload"
        merge.report(h, p.upload(task))


def test_a_replica_dead_in_the_upload_phase_is_left_out_and_the_rest_merge(
    store: ObjectStore, http: httpx.Client
) -> None:
    parts = replicas(3, http)
    dead = "5replica01"
    merge = start(parts, FakeClock(), epoch=30)
    drive(merge, parts, store, silent={dead})
    state = merge.state
    assert state.phase == "done" and dead in state.excluded and dead not in merge.work()
    live = [weights(p) for h, p in parts.items() if h != dead]
    assert torch.equal(live[0], live[1]) and weights_digest(live[0]) == state.checkpoint.digest  # type: ignore[union-attr]
    assert dead not in merge.in_sync()


def test_a_reducer_that_dies_after_uploading_is_replaced_and_no_partition_is_left_unmerged(
    store: ObjectStore, http: httpx.Client
) -> None:
    parts = replicas(4, http)
    victim = "5replica03"
    merge = start(parts, FakeClock(), epoch=31)
    upload_all(merge, parts, store)  # everyone uploads, then the victim dies
    assigned_before = {p: list(rs) for p, rs in merge.state.reducers.items()}
    drive(merge, parts, store, silent={victim})
    state = merge.state
    assert state.phase == "done"
    assert victim in merge.work()  # its pseudo-gradient still counts: it was uploaded and sound
    for p, rs in assigned_before.items():
        if victim in rs:
            assert victim not in state.reducers[p] and len(state.reducers[p]) == 2  # reassigned
    assert len(state.canonical) == len(state.partitions)
    live = {h: weights(p) for h, p in parts.items() if h != victim}
    assert len({weights_digest(w) for w in live.values()}) == 1
    assert sorted(merge.in_sync()) == sorted(live)


def test_a_tampered_pseudo_gradient_gets_its_owner_thrown_out_and_the_merge_goes_on(
    store: ObjectStore, http: httpx.Client
) -> None:
    parts = replicas(3, http)
    cheat = "5replica00"
    merge = start(parts, FakeClock(), epoch=32)
    upload_all(merge, parts, store)
    # After reporting its hashes the cheat overwrites one partition with other values.
    store.put_bytes(merge.state.pg[cheat][0].key, b"IOTC garbage")
    drive(merge, parts, store, silent=set())
    state = merge.state
    assert state.phase == "done" and cheat in state.excluded and state.round == 1
    assert cheat in {f.hotkey for f in state.flagged}
    honest = [weights(p) for h, p in parts.items() if h != cheat]
    assert torch.equal(honest[0], honest[1])


def test_a_merge_nobody_can_do_rolls_back(store: ObjectStore, http: httpx.Client) -> None:
    parts = replicas(2, http)
    merge = start(parts, FakeClock(), epoch=33)
    drive(merge, parts, store, silent=set(parts))
    assert merge.state.phase == "rolled_back" and merge.record().outcome == "rolled_back"
    assert merge.record().version == 0
    empty = StageMerge.start(
        run_id="x",
        epoch=0,
        stage=0,
        version=0,
        numel=10,
        accepted={},
        timeout_s=1,
        clip_factor=2,
        clock=FakeClock(),
    )
    assert empty.state.phase == "rolled_back"


def test_a_lone_replica_merges_with_itself_checked_by_the_orchestrator(
    store: ObjectStore, http: httpx.Client
) -> None:
    parts = replicas(1, http)
    (only,) = parts.values()
    start_flat = only.start.clone()
    pg = start_flat - weights(only)
    merge = merge_all(parts, store, epoch=34)
    assert merge.state.phase == "done" and merge.state.reducers == {}
    want, _ = nesterov_step(start_flat, pg, None, lr=SPEC.outer_lr, mu=SPEC.outer_momentum)
    assert torch.equal(weights(only), want)
