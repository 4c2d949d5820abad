"""validator/replay.py against simulated epochs (bench/replay_sim.py): honest work passes, cheats and
tampered uploads fail on the right check, and tasks that cannot be replayed raise `ReplayError`."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import torch

from bench.replay_sim import (
    CONDITIONS,
    TRAINING,
    Simulation,
    calibrate,
    replay_cost,
    simulate_epoch,
    torch_threads,
)
from common.data import LocalTextCorpus
from common.merge import decode_slice, encode_slice
from common.model import boundary_shape
from common.protocol import CheckKind, DownloadSource, GlobalWeights, ReplayVerdict, ValidationTask
from common.wire import BoundaryWire
from miner.behaviors import Behavior
from validator.replay import (
    CROSS_REGIME_HORIZON,
    DEFAULT_TOLERANCES,
    EXACT_TOLERANCES,
    ReplayError,
    ReplayMode,
    Tolerances,
    regime,
    relative_error,
    replay,
    replay_mode,
)

# Small epochs keep the file fast. 8 samples still cover every case the simulation has: two forwards in
# flight, sample 4's miner item rejected (no step) and sample 7 cancelled after its forwards.
SAMPLES = 8
STAGES = (0, 1, 2)
HEAD, BODY, TAIL = STAGES


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Simulations and replays on 1 torch thread (but where a test says otherwise): a second thread buys
    little on this tiny model, and under any other load on the machine (another test worker, say)
    oversubscribed torch threads make the file many times slower."""
    with torch_threads(1):
        yield


@cache
def simulation(stage: int, condition: str = "same", behavior: Behavior = "honest") -> Simulation:
    """One simulated epoch per (stage, condition, behaviour), shared by the whole module. Tests only add
    objects (`Simulation.put`) and replay tampered copies of the task, never change what is there."""
    autocast, threads, wire = CONDITIONS[condition]
    training = TRAINING.model_copy(update=wire)
    return simulate_epoch(
        stage, samples=SAMPLES, behavior=behavior, autocast=autocast, threads=threads, training=training
    )


def run(
    sim: Simulation,
    task: ValidationTask | None = None,
    *,
    threads: int | None = None,
    horizon: int | None = None,
    tolerances: Tolerances = DEFAULT_TOLERANCES,
) -> ReplayVerdict:
    with torch_threads(threads):
        return sim.replay(tolerances, task=task, horizon=horizon)


def assert_fails(
    sim: Simulation, kind: CheckKind, task: ValidationTask | None = None, *, op: int | None = None
) -> ReplayVerdict:
    """The replay fails the miner on a check of `kind` (at op `op`, if given); the verdict."""
    verdict = run(sim, task)
    assert verdict.passed is False, verdict
    assert verdict.failure is not None
    assert verdict.failure.split(":", 1)[0] == kind, verdict.failure
    if op is not None:
        assert verdict.failure.startswith(f"{kind}: op {op} "), verdict.failure
        assert verdict.ops == op  # every op before it replayed and passed
    return verdict


def replace_op(task: ValidationTask, index: int, **update: object) -> ValidationTask:
    ops = list(task.ops)
    ops[index] = ops[index].model_copy(update=update)
    return task.model_copy(update={"ops": ops})


def first_op(task: ValidationTask, kind: str) -> int:
    return next(i for i, op in enumerate(task.ops) if op.kind == kind)


def boundary_bytes(sim: Simulation, t: torch.Tensor) -> bytes:
    """`t` encoded in the run's wire format: a well-formed upload of a boundary tensor."""
    return BoundaryWire.of(sim.cfg, sim.data.batch_size, sim.data.seq_len, sim.training).encode(t)


def random_boundary(sim: Simulation, seed: int) -> torch.Tensor:
    shape = boundary_shape(sim.cfg, sim.data.batch_size, sim.data.seq_len)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# The simulation itself: what the other tests rely on


@pytest.mark.parametrize("stage", STAGES)
def test_simulated_task_has_the_expected_shape(stage: int) -> None:
    task = simulation(stage).task
    kinds = {op.kind for op in task.ops}
    assert kinds == ({"tail"} if stage == TAIL else {"forward", "backward"})
    steps = sum(op.kind != "forward" for op in task.ops)
    assert task.claimed_steps == steps > 0
    if stage != TAIL:
        # The cancelled sample's forward stays accepted without a backward; so does the rejected one's.
        assert any(op.kind == "forward" and not op.backward_follows for op in task.ops)
    assert len(task.pseudo_gradient) == len(task.partitions) > 1


# ---------------------------------------------------------------------------------------------------------
# Honest work passes


@pytest.mark.parametrize("stage", STAGES)
def test_honest_same_settings_is_exact(stage: int) -> None:
    sim = simulation(stage)
    verdict = run(sim)
    assert verdict.passed, verdict.failure
    assert verdict.ops == len(sim.task.ops)
    assert verdict.failure is None
    # Same code, same settings: bit for bit, every kind of check that applies was made.
    expected: set[str] = {"pseudo_gradient", "steps"}
    expected |= {"loss", "tail_grad"} if stage == TAIL else {"forward"}
    expected |= {"backward"} if stage == BODY else set()
    assert set(verdict.worst) == expected
    assert all(e == 0 for e in verdict.worst.values()), verdict.worst
    # One check per uploaded output (two per tail op: loss and gradient), per partition, the whole
    # pseudo-gradient and the step count.
    per_op = {"forward": 1, "backward": 1 if stage == BODY else 0, "tail": 2}
    outputs = sum(per_op[op.kind] for op in sim.task.ops)
    assert verdict.checks == outputs + len(sim.task.partitions) + 2
    assert verdict.replay_s > 0


@pytest.mark.parametrize("stage", STAGES)
def test_honest_miner_on_one_thread_passes_a_two_thread_replay(stage: int) -> None:
    sim = simulation(stage, "threads")
    verdict = run(sim, threads=2)
    assert verdict.passed, verdict.failure


def test_only_cpu_fp32_on_both_sides_gets_a_whole_epoch_replay_with_exact_tolerances() -> None:
    assert replay_mode("cpu", "cpu") == ReplayMode(autocast=False, horizon=None, tolerances=EXACT_TOLERANCES)
    assert replay_mode("cpu:0", "cpu").horizon is None
    bounded = ReplayMode(autocast=False, horizon=CROSS_REGIME_HORIZON, tolerances=DEFAULT_TOLERANCES)
    assert replay_mode("cuda:0", "cpu") == bounded
    assert replay_mode("cpu", "cuda") == bounded
    assert replay_mode("unknown", "cpu") == bounded  # an unreported device is never taken for exact
    assert replay_mode("mps", "cpu") == bounded
    # CUDA against CUDA: the miner's regime (bf16 autocast), but not measured without a GPU: bounded.
    assert replay_mode("cuda", "cuda:1") == ReplayMode(True, CROSS_REGIME_HORIZON, DEFAULT_TOLERANCES)
    assert regime("cuda:3") == "cuda-bf16" and regime("cpu") == "cpu-fp32" and regime("") == "other"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("condition", ["same", "threads"])
def test_honest_cpu_work_passes_the_exact_tolerances(stage: int, condition: str) -> None:
    verdict = run(simulation(stage, condition), threads=2, tolerances=EXACT_TOLERANCES)
    assert verdict.passed, verdict.failure


def test_exact_tolerances_catch_a_slightly_scaled_pseudo_gradient_the_loose_ones_let_through() -> None:
    """Why the exact regime has its own tolerances: a miner that shrinks its merge contribution by 10%
    would pass the cross-regime tolerances (0.3), but not a replay that is exact."""
    sim = simulation(BODY)
    span, source = sim.task.partitions[0], sim.task.pseudo_gradient[0]
    values = decode_slice(sim.objects[source.key], span.end - span.start)
    sources = [sim.put(encode_slice(values * 0.9)), *sim.task.pseudo_gradient[1:]]
    task = sim.task.model_copy(update={"pseudo_gradient": sources})
    assert run(sim, task).passed
    verdict = run(sim, task, tolerances=EXACT_TOLERANCES)
    assert not verdict.passed and (verdict.failure or "").startswith("pseudo_gradient:"), verdict.failure


@pytest.mark.parametrize("stage", STAGES)
def test_honest_bf16_autocast_miner_passes_an_fp32_replay(stage: int) -> None:
    verdict = run(simulation(stage, "bf16"), horizon=CROSS_REGIME_HORIZON)
    assert verdict.passed, verdict.failure
    assert max(verdict.worst.values()) > 0  # the rounding is really there, else this would test nothing


@cache
def long_bf16_epoch(stage: int) -> Simulation:
    return simulate_epoch(stage, samples=16, autocast=True)  # more steps than the horizon


@pytest.mark.parametrize("stage", STAGES)
def test_a_long_bf16_epoch_passes_a_cross_regime_replay_up_to_the_horizon(stage: int) -> None:
    """Honest bf16 work drifts from an fp32 replay as the steps add up (tail_grad past its tolerance after
    about 12 steps, measured by bench/replay_sim.py); a cross-regime replay checks the first
    `CROSS_REGIME_HORIZON` steps, and skips the whole-epoch checks."""
    sim = long_bf16_epoch(stage)
    verdict = run(sim, horizon=CROSS_REGIME_HORIZON)
    assert verdict.passed, verdict.failure
    assert verdict.horizon == CROSS_REGIME_HORIZON
    assert 0 < verdict.ops < len(sim.task.ops)
    assert sum(op.kind != "forward" for op in sim.task.ops[: verdict.ops]) == CROSS_REGIME_HORIZON
    assert "pseudo_gradient" not in verdict.worst and "steps" not in verdict.worst


@pytest.mark.parametrize(
    ("behavior", "stage", "kind"), [("random-output", BODY, "forward"), ("wrong-loss", TAIL, "loss")]
)
def test_a_cross_regime_replay_still_catches_cheats(behavior: Behavior, stage: int, kind: CheckKind) -> None:
    verdict = run(simulation(stage, behavior=behavior), horizon=CROSS_REGIME_HORIZON)
    assert verdict.passed is False and verdict.failure is not None
    assert verdict.failure.startswith(f"{kind}: op 0 "), verdict.failure


@pytest.mark.parametrize("stage", STAGES)
def test_honest_bf16_miner_with_int8_wire_passes(stage: int) -> None:
    verdict = run(simulation(stage, "bf16+int8wire"), horizon=CROSS_REGIME_HORIZON)
    assert verdict.passed, verdict.failure


def test_honest_work_from_a_checkpoint_passes_and_needs_the_checkpoint() -> None:
    sim = simulate_epoch(BODY, samples=4, checkpoint=True)
    assert sim.task.weights.version == 1
    assert run(sim).passed
    # Replaying from the seeded init instead (a task that forgot the checkpoint) fails the very first op.
    wrong_start = sim.task.model_copy(
        update={"weights": GlobalWeights(version=0, seed=sim.task.weights.seed)}
    )
    assert_fails(sim, "forward", wrong_start, op=0)


# ---------------------------------------------------------------------------------------------------------
# Cheats fail on the check of the right kind


@pytest.mark.parametrize(
    ("behavior", "stage", "kind"),
    [
        ("random-output", HEAD, "forward"),
        ("random-output", BODY, "forward"),
        ("scaled-output", HEAD, "forward"),
        ("scaled-output", BODY, "forward"),
        ("copy-input", HEAD, "forward"),  # zeros: the head's input is tokens
        ("copy-input", BODY, "forward"),
        ("copy-input", TAIL, "tail_grad"),  # the tail has no output to fake: a zero input gradient
        # The head uploads no gradient; but skipping its steps leaves its weights at the start of the
        # epoch, so its first forward after a (skipped) step differs from the replay's.
        ("zero-grad", HEAD, "forward"),
        ("zero-grad", BODY, "backward"),
        ("zero-grad", TAIL, "tail_grad"),
        ("wrong-loss", TAIL, "loss"),
    ],
)
def test_cheat_fails_on_the_right_check(behavior: Behavior, stage: int, kind: CheckKind) -> None:
    sim = simulation(stage, behavior=behavior)
    ops = sim.task.ops
    if behavior == "zero-grad" and stage == HEAD:
        first = next(
            i for i, op in enumerate(ops) if op.kind == "forward" and i > first_op(sim.task, "backward")
        )
    else:
        # Caught on the first op of the faked kind: the work is wrong every time, not now and then.
        first = first_op(
            sim.task, "backward" if kind == "backward" else "tail" if stage == TAIL else "forward"
        )
    assert_fails(sim, kind, op=first)


def test_lazy_head_is_caught_by_its_pseudo_gradient() -> None:
    # A zero-grad head whose skipped steps no later forward of the task reveals (the task cut after its
    # first backward): only the pseudo-gradient it uploaded (all zeros: it never stepped) shows it.
    sim = simulation(HEAD, behavior="zero-grad")
    cut = first_op(sim.task, "backward") + 1
    task = sim.task.model_copy(update={"ops": sim.task.ops[:cut], "claimed_steps": 1})
    verdict = assert_fails(sim, "pseudo_gradient", task)
    assert verdict.ops == cut
    assert verdict.worst["pseudo_gradient"] == pytest.approx(1.0)


def test_cheat_that_does_not_apply_to_the_stage_passes() -> None:
    # The tail reports its loss honestly under every behaviour but wrong-loss, and has no forward output
    # to randomise: a random-output miner at the tail is doing honest work there.
    assert run(simulation(TAIL, behavior="random-output")).passed


# ---------------------------------------------------------------------------------------------------------
# Uploads tampered with after the fact


def _tamper_partition(sim: Simulation, index: int, how: str) -> ValidationTask:
    span, source = sim.task.partitions[index], sim.task.pseudo_gradient[index]
    values = decode_slice(sim.objects[source.key], span.end - span.start)
    if how == "zeros":
        data = encode_slice(torch.zeros_like(values))
    elif how == "scaled":
        data = encode_slice(values * 2)
    elif how == "random":
        noise = torch.randn(values.shape, generator=torch.Generator().manual_seed(index))
        data = encode_slice(noise * values.std() + values.mean())
    elif how == "garbage":
        data = b"not a tensor" * 10
    elif how == "short":
        data = encode_slice(values[:-1])
    else:
        raise AssertionError(how)
    sources = list(sim.task.pseudo_gradient)
    sources[index] = sim.put(data)
    return sim.task.model_copy(update={"pseudo_gradient": sources})


# The check is the same at every stage: each way at the body, and zeros at the head and tail.
PG_TAMPERING = [(BODY, how) for how in ("zeros", "scaled", "random", "garbage", "short")]
PG_TAMPERING += [(HEAD, "zeros"), (TAIL, "zeros")]


@pytest.mark.parametrize(("stage", "how"), PG_TAMPERING)
def test_tampered_pseudo_gradient_partition_fails(stage: int, how: str) -> None:
    sim = simulation(stage)
    index = 1
    verdict = assert_fails(sim, "pseudo_gradient", _tamper_partition(sim, index, how))
    assert verdict.ops == len(sim.task.ops)
    assert f"partition {index}" in (verdict.failure or "")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("delta", [-1, 1])
def test_claimed_steps_off_by_one_fails(stage: int, delta: int) -> None:
    sim = simulation(stage)
    task = sim.task.model_copy(update={"claimed_steps": sim.task.claimed_steps + delta})  # type: ignore[operator]
    verdict = assert_fails(sim, "steps", task)
    assert verdict.worst["steps"] == 1
    assert verdict.worst["pseudo_gradient"] == 0  # the work itself was right


def test_no_claimed_steps_and_no_pseudo_gradient_skip_those_checks() -> None:
    sim = simulation(BODY)
    task = sim.task.model_copy(update={"claimed_steps": None, "pseudo_gradient": [], "partitions": []})
    verdict = run(sim, task)
    assert verdict.passed, verdict.failure
    assert "steps" not in verdict.worst and "pseudo_gradient" not in verdict.worst


# (stage, op kind, check kind): each kind of op whose output the miner uploads.
OUTPUTS = [(HEAD, "forward", "forward"), (BODY, "forward", "forward"), (BODY, "backward", "backward")]
OUTPUTS += [(TAIL, "tail", "tail_grad")]


@pytest.mark.parametrize(("stage", "op_kind", "kind"), OUTPUTS)
@pytest.mark.parametrize("garbage", ["undecodable", "wrong-values"])
def test_tampered_output_fails_that_ops_check(
    stage: int, op_kind: str, kind: CheckKind, garbage: str
) -> None:
    sim = simulation(stage)
    # The second op of its kind: ops before it, of both kinds, must still replay and pass.
    index = [i for i, op in enumerate(sim.task.ops) if op.kind == op_kind][1]
    if garbage == "undecodable":
        data = b"\x00garbage" * 64
    else:  # well formed, the right shape, but not the work
        data = boundary_bytes(sim, random_boundary(sim, seed=index))
    # A new object with its true size and sha256: the orchestrator vouches for what the miner uploaded.
    task = replace_op(sim.task, index, output=sim.put(data))
    verdict = assert_fails(sim, kind, task, op=index)
    if garbage == "undecodable":
        assert "does not decode" in (verdict.failure or "")


def test_output_of_another_item_fails() -> None:
    # A miner that re-sends an earlier output (well formed, plausible values) is caught too.
    sim = simulation(BODY)
    forwards = [i for i, op in enumerate(sim.task.ops) if op.kind == "forward"]
    first, second = forwards[0], forwards[1]
    task = replace_op(sim.task, second, output=sim.task.ops[first].output)
    assert_fails(sim, "forward", task, op=second)


# ---------------------------------------------------------------------------------------------------------
# Tasks that cannot be replayed: ReplayError, nobody blamed


def _unannounced(source: DownloadSource, field: str) -> DownloadSource:
    if field == "sha256":
        return source.model_copy(update={"sha256": "0" * 64})
    return source.model_copy(update={"size": source.size + 1})


@pytest.mark.parametrize("field", ["sha256", "size"])
@pytest.mark.parametrize("where", ["input", "output", "pseudo_gradient"])
def test_object_not_as_announced_is_unreplayable(field: str, where: str) -> None:
    sim = simulation(BODY)
    if where == "pseudo_gradient":
        sources = list(sim.task.pseudo_gradient)
        sources[0] = _unannounced(sources[0], field)
        task = sim.task.model_copy(update={"pseudo_gradient": sources})
    else:
        index = first_op(sim.task, "backward")
        source = getattr(sim.task.ops[index], where)
        task = replace_op(sim.task, index, **{where: _unannounced(source, field)})
    with pytest.raises(ReplayError, match="not the object the orchestrator announced"):
        run(sim, task)


def test_local_corpus_with_another_fingerprint_is_unreplayable(tmp_path: Path) -> None:
    (tmp_path / "other.py").write_text("print('another corpus')\n" * 50)
    other = LocalTextCorpus(tmp_path)
    sim = simulation(HEAD)
    assert other.fingerprint != sim.data.fingerprint
    with pytest.raises(ReplayError, match="fingerprints differ"):
        replay(sim.task, cfg=sim.cfg, training=sim.training, data=sim.data, corpus=other, fetch=sim.fetch)


@pytest.mark.parametrize("stage", [-1, 3])
def test_stage_out_of_range_is_unreplayable(stage: int) -> None:
    sim = simulation(TAIL)
    with pytest.raises(ReplayError, match="out of range"):
        run(sim, sim.task.model_copy(update={"stage": stage}))


def test_backward_without_forward_item_is_unreplayable() -> None:
    sim = simulation(BODY)
    task = replace_op(sim.task, first_op(sim.task, "backward"), forward_item=None)
    with pytest.raises(ReplayError, match="needs a forward item"):
        run(sim, task)


def test_ops_that_do_not_fit_together_are_unreplayable() -> None:
    body, tail = simulation(BODY), simulation(TAIL)
    b = first_op(body.task, "backward")
    # A backward whose forward was never run (its forward missing from the list).
    ops = [op for op in body.task.ops if op.item_id != body.task.ops[b].forward_item]
    with pytest.raises(ReplayError, match="no outstanding forward"):
        run(body, body.task.model_copy(update={"ops": ops}))
    # A tail op at the body, a forward at the tail.
    with pytest.raises(ReplayError, match="only the last stage"):
        run(body, body.task.model_copy(update={"ops": [tail.task.ops[0]]}))
    forward = body.task.ops[first_op(body.task, "forward")]
    with pytest.raises(ReplayError, match="the last stage has tail ops"):
        run(tail, tail.task.model_copy(update={"ops": [forward]}))
    # A head forward without its sample ids; a body op without its input.
    head = simulation(HEAD)
    with pytest.raises(ReplayError, match="sample ids"):
        run(head, replace_op(head.task, 0, samples=None))
    with pytest.raises(ReplayError, match="no input"):
        run(body, replace_op(body.task, 0, input=None))


def test_undecodable_input_is_unreplayable() -> None:
    # The miner was given (and accepted) bytes the orchestrator vouched for: not the miner's fault.
    sim = simulation(BODY)
    task = replace_op(sim.task, 0, input=sim.put(b"\x00garbage" * 64))
    with pytest.raises(ReplayError, match="input does not decode"):
        run(sim, task)


def test_partitions_that_do_not_cover_the_stage_are_unreplayable() -> None:
    sim = simulation(BODY)
    task = sim.task.model_copy(update={"partitions": sim.task.partitions[:-1]})
    with pytest.raises(ReplayError, match="consecutive pieces"):
        run(sim, task)
    last = sim.task.partitions[-1]
    short = [*sim.task.partitions[:-1], last.model_copy(update={"end": last.end - 1})]
    with pytest.raises(ReplayError, match="consecutive pieces"):
        run(sim, sim.task.model_copy(update={"partitions": short}))


def test_later_version_without_checkpoint_is_unreplayable() -> None:
    sim = simulation(BODY)
    task = sim.task.model_copy(update={"weights": GlobalWeights(version=3, seed=sim.task.weights.seed)})
    with pytest.raises(ReplayError, match="without a checkpoint"):
        run(sim, task)


# ---------------------------------------------------------------------------------------------------------
# relative_error


def test_relative_error_basics() -> None:
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    assert relative_error(x, x.clone()) == 0
    assert relative_error(torch.zeros(5), torch.zeros(5)) == 0
    assert relative_error(2 * x, x) == pytest.approx(1.0)
    assert relative_error(torch.zeros_like(x), x) == pytest.approx(1.0)
    assert relative_error(x.to(torch.bfloat16), x) > 0  # compared in float64, not the inputs' dtype
    assert relative_error(x, torch.zeros_like(x)) > 1e6  # anything against an all-zero reference
    with pytest.raises(ValueError, match="cannot compare"):
        relative_error(x, x[:1])


# ---------------------------------------------------------------------------------------------------------
# The bench's figures


def test_replay_cost_reports_both_sides() -> None:
    cost = replay_cost(BODY, samples=4, threads=1)
    assert set(cost) == {"stage", "samples", "ops", "miner_compute_s", "replay_s", "ratio"}
    assert (cost["stage"], cost["samples"]) == (BODY, 4)
    assert cost["ops"] > 0 and cost["miner_compute_s"] > 0 and cost["replay_s"] > 0
    assert cost["ratio"] == pytest.approx(cost["replay_s"] / cost["miner_compute_s"])
    with pytest.raises(ValueError):
        replay_cost(BODY, samples=4, repeats=0)


def test_calibrate_smoke() -> None:
    result = calibrate(
        samples=4, stages=(TAIL,), conditions=("same",), cheats=("wrong-loss",), replay_threads=1
    )
    assert set(result) == {
        "settings", "tolerances", "honest", "honest_worst", "cross_regime_horizon", "steps_within_tolerance",
        "cheats", "cost", "elapsed_s",
    }  # fmt: skip
    assert result["honest"]["same"]["tail"]["loss"] == 0
    assert result["steps_within_tolerance"]["same"]["tail"] is None  # exact: the whole epoch passes
    assert result["cheats"]["wrong-loss"]["tail"]["caught_by"] == "loss"
    assert result["cost"]["tail"]["ratio"] > 0
    assert "cost" not in calibrate(
        samples=4, stages=(TAIL,), conditions=(), cheats=(), replay_threads=1, cost=False
    )
