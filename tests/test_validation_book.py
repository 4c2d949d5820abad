"""The orchestrator's side of validation: whom it shadows, what a replay task holds, leases, verdicts and the
public ledger, on a real SQLite state (no network: the presigner is a plain function)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from common.data import SampleId
from common.protocol import ArtifactRef, DownloadSource, MergeFlag, MergeRecord, PartitionSpan, ReplayVerdict
from orchestrator.db import Item, StateDB
from orchestrator.errors import RequestRejected
from orchestrator.settings import OrchestratorSettings
from orchestrator.stage_merge import MergeState
from orchestrator.validation import ValidationBook

N_STAGES = 3
SHA = "ab" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ref(key: str) -> ArtifactRef:
    return ArtifactRef(key=key, size=10, sha256=SHA)


def source(r: ArtifactRef) -> DownloadSource:
    return DownloadSource(key=r.key, url=f"http://s3/{r.key}", size=r.size, sha256=r.sha256)


def book(tmp_path: Path, fraction: float = 1.0, **settings: object) -> tuple[ValidationBook, StateDB, Clock]:
    db, clock = StateDB(tmp_path / "state.sqlite"), Clock()
    values: dict[str, object] = {"validation_fraction": fraction, **settings}
    return (
        ValidationBook(
            db,
            OrchestratorSettings(**values),  # type: ignore[arg-type]
            n_stages=N_STAGES,
            download_source=source,
            sample_ids=lambda sample: [SampleId(shard=0, offset=sample)],
            device_of=lambda hotkey: "cpu",
            clock=clock,
            rng=random.Random(0),
        ),
        db,
        clock,
    )


def done(db: StateDB, item_id: str, *, miner: str, stage: int, kind: str, seq: int, **fields: object) -> None:
    sample = int(item_id.split(".")[0])
    db.save_item(
        Item(
            item_id=item_id,
            sample=sample,
            attempt=1,
            stage=stage,
            kind=kind,
            status="done",
            created_at=0.0,
            deadline=0.0,
            miner=miner,
            session=fields.pop("session", 1),  # type: ignore[arg-type]
            epoch=fields.pop("epoch", 0),  # type: ignore[arg-type]
            done_seq=seq,
            forward_item=f"{item_id[:-1]}f" if kind == "backward" else None,
            **fields,  # type: ignore[arg-type]
        )
    )


def merge_state(stage: int, accepted: dict[str, int], **fields: object) -> MergeState:
    return MergeState(
        run_id="run",
        epoch=0,
        stage=stage,
        version=0,
        numel=20,
        partitions=[PartitionSpan(index=0, start=0, end=10), PartitionSpan(index=1, start=10, end=20)],
        started_at=0.0,
        deadline=0.0,
        accepted=accepted,
        **fields,  # type: ignore[arg-type]
    )


def test_a_shadowed_body_miner_gets_its_accepted_items_in_order_from_its_last_session(tmp_path: Path) -> None:
    vb, db, _ = book(tmp_path)
    # An earlier session's work was thrown away with it (the miner restarted from the global weights).
    done(
        db, "0.1.1f", miner="m", stage=1, kind="forward", seq=1, session=1, input=ref("a0"), output=ref("o0")
    )
    done(
        db, "1.1.1f", miner="m", stage=1, kind="forward", seq=5, session=2, input=ref("a1"), output=ref("o1")
    )
    done(
        db, "2.1.1f", miner="m", stage=1, kind="forward", seq=6, session=2, input=ref("a2"), output=ref("o2")
    )
    done(
        db, "1.1.1b", miner="m", stage=1, kind="backward", seq=9, session=2, input=ref("g1"), output=ref("d1")
    )
    done(db, "3.1.1f", miner="m", stage=1, kind="forward", seq=7, epoch=1, input=ref("x"), output=ref("y"))
    state = merge_state(1, {"m": 1}, pg={"m": [ref("pg0"), ref("pg1")]}, claimed={"m": 1})
    assert len(vb.shadow(state, None, seed=3)) == 1

    task = vb.lease("validator")
    assert task is not None and task.miner == "m" and task.stage == 1 and task.epoch == 0
    assert [(op.item_id, op.kind, op.backward_follows) for op in task.ops] == [
        ("1.1.1f", "forward", True),
        ("2.1.1f", "forward", False),  # its backward never came: the replay drops it, as the miner did
        ("1.1.1b", "backward", False),
    ]
    assert task.ops[0].input is not None and task.ops[0].input.key == "a1"
    assert task.ops[0].samples  # a body stage embeds the tokens again, so its replay needs them too
    assert task.ops[2].forward_item == "1.1.1f" and task.ops[2].output is not None and not task.ops[2].samples
    assert task.weights.version == 0 and task.weights.seed == 3 and task.weights.checkpoint is None
    assert [s.key for s in task.pseudo_gradient] == ["pg0", "pg1"] and task.claimed_steps == 1
    assert vb.lease("another") is None  # leased once


def test_head_and_tail_ops_name_their_samples_and_the_tail_its_reported_loss(tmp_path: Path) -> None:
    vb, db, _ = book(tmp_path)
    done(db, "4.1.0f", miner="h", stage=0, kind="forward", seq=1, output=ref("o"))
    done(db, "4.1.0b", miner="h", stage=0, kind="backward", seq=3, input=ref("g"))
    done(db, "4.1.2f", miner="t", stage=2, kind="forward", seq=2, input=ref("x"), output=ref("gx"), loss=2.5)
    vb.shadow(merge_state(0, {"h": 1}), None, seed=0)
    vb.shadow(merge_state(2, {"t": 1}), None, seed=0)
    head, tail = vb.lease("v"), vb.lease("v")
    assert head is not None and tail is not None
    assert head.ops[0].samples == [SampleId(shard=0, offset=4)] and head.ops[0].input is None
    assert head.ops[1].kind == "backward" and head.ops[1].output is None
    assert tail.ops[0].kind == "tail" and tail.ops[0].loss == 2.5 and tail.ops[0].samples is not None


def test_only_a_share_is_shadowed_and_none_without_validation(tmp_path: Path) -> None:
    accepted = {f"m{i}": 1 for i in range(400)}
    vb, _, _ = book(tmp_path / "a", fraction=0.25)
    share = len(vb.shadow(merge_state(1, accepted), None, seed=0)) / len(accepted)
    assert 0.18 < share < 0.32
    off, _, _ = book(tmp_path / "b", fraction=0.0)
    assert off.shadow(merge_state(1, accepted), None, seed=0) == []


def test_leases_expire_to_another_validator_and_only_the_lessee_may_judge(tmp_path: Path) -> None:
    vb, db, clock = book(tmp_path, validation_lease_s=60.0)
    done(db, "0.1.1f", miner="m", stage=1, kind="forward", seq=1, input=ref("a"), output=ref("o"))
    vb.shadow(merge_state(1, {"m": 1}), None, seed=0)
    assert vb.lease("m") is None  # never a miner's own epoch
    first = vb.lease("v1")
    assert first is not None and vb.lease("v2") is None
    clock.now += 61
    second = vb.lease("v2")
    assert second is not None and second.task_id == first.task_id
    verdict = ReplayVerdict(passed=False, ops=1, checks=1, worst={"forward": 1.4}, failure="forward 1.4")
    with pytest.raises(RequestRejected) as refused:
        vb.verdict("v1", first.task_id, verdict)  # its lease expired
    assert refused.value.status == 403
    vb.verdict("v2", second.task_id, verdict)
    assert vb.counts() == {"failed": 1}
    with pytest.raises(RequestRejected):
        vb.verdict("v2", second.task_id, verdict)  # judged once
    assert [e["miner"] for e in db.events("replay_failed")] == ["m"]


def test_unclaimed_tasks_expire_with_their_objects(tmp_path: Path) -> None:
    vb, db, clock = book(tmp_path, validation_retention_s=100.0)
    done(db, "0.1.1f", miner="m", stage=1, kind="forward", seq=1, input=ref("a"), output=ref("o"))
    vb.shadow(merge_state(1, {"m": 1}), None, seed=0)
    clock.now += 101
    assert vb.lease("v") is None and vb.counts() == {"expired": 1}


def test_the_ledger_counts_accepted_work_partitions_flags_and_verdicts(tmp_path: Path) -> None:
    vb, db, _ = book(tmp_path)
    for seq, (item, miner, stage, kind) in enumerate(
        [
            ("0.1.0f", "h", 0, "forward"),
            ("0.1.1f", "b", 1, "forward"),
            ("0.1.1b", "b", 1, "backward"),
            ("0.1.2f", "t", 2, "forward"),
        ]
    ):
        done(db, item, miner=miner, stage=stage, kind=kind, seq=seq, output=ref(item))
    record = MergeRecord(
        epoch=0,
        stage=1,
        outcome="merged",
        version=1,
        participants={"b": 1.0, "r": 1.0},
        excluded={},
        in_sync=["b"],
        flagged=[MergeFlag(hotkey="r", reason="partition 0 differs from the recomputed mean")],
        partitions=2,
        settled=1,
        reduced={"b": 2},
        weights_sha256=None,
        started_at=0.0,
        finished_at=50.0,
    )
    db.add_merge(0, 1, record.model_dump_json())
    vb.shadow(merge_state(1, {"b": 1}), None, seed=0)
    task = vb.lease("v")
    assert task is not None
    vb.verdict("v", task.task_id, ReplayVerdict(passed=True, ops=2, checks=2))

    assert vb.ledger(0, 10, current_epoch=0) == []  # epoch 0 is still running
    [ledger] = vb.ledger(0, 10, current_epoch=1)
    work = {m.hotkey: m for m in ledger.miners}
    assert (work["b"].items, work["b"].partitions, work["b"].merged, work["b"].flags) == (2, 2, True, [])
    assert work["r"].items == 0 and work["r"].flags == ["partition 0 differs from the recomputed mean"]
    assert work["h"].items == 1 and not work["h"].merged  # stage 0 has no merge record here
    assert work["t"].items == 2  # a tail item is a forward and a backward: paid per sample like the others
    assert [(v.miner, v.validator, v.verdict.passed) for v in ledger.verdicts] == [("b", "v", True)]
