"""The stage trainer: chained stages train as the whole model does, stashing, guards, and misbehaviour."""

from __future__ import annotations

import pytest
import torch

from common.model import IotaModel, build_stage, get_preset, next_token_loss
from common.protocol import TrainingSpec
from common.training import StageTrainer, TrainerError
from miner.behaviors import BEHAVIORS, SCALE, Behavior, BehaviorPolicy
from miner.trainer import MinerTrainer

CFG = get_preset("tiny", max_seq_len=64)
B, T = 2, 32
SEED = 5
SPEC = TrainingSpec(
    lr=1e-3,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    # Low enough that the reference below really clips, so per-stage clipping is checked too.
    grad_clip=0.5,
    max_outstanding=4,
    wire_dtype="float32",
    wire_int8=False,
    wire_compress=False,
    outer_lr=0.7,
    outer_momentum=0.9,
)


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def _boundary(seed: int) -> torch.Tensor:
    return torch.randn(B, T, CFG.bottleneck_dim, generator=torch.Generator().manual_seed(seed))


def _pipeline(spec: TrainingSpec = SPEC) -> list[StageTrainer]:
    return [StageTrainer(CFG, s, spec, seed=SEED) for s in range(CFG.n_stages)]


def _train_step(trainers: list[StageTrainer], tokens: torch.Tensor, item_id: str) -> float:
    head, body, tail = trainers
    z1 = head.forward(item_id, tokens)
    z2 = body.forward(item_id, z1, tokens)
    loss, g2 = tail.tail_step(z2, tokens)
    g1 = body.backward(item_id, g2)
    assert g1 is not None and g1.shape == z1.shape
    assert head.backward(item_id, g1) is None
    assert all(t.commit() for t in trainers)
    return loss


def _adamw(params: object, spec: TrainingSpec = SPEC) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params, lr=spec.lr, betas=(spec.beta1, spec.beta2), weight_decay=spec.weight_decay
    )


# ---------------------------------------------------------------------------------------------------------
# Equivalence with the whole model


def test_chained_trainers_match_the_whole_model_with_one_adamw_per_stage() -> None:
    trainers = _pipeline()
    whole = IotaModel(CFG, seed=SEED)
    optimizers = [_adamw(stage.parameters()) for stage in whole.stages]
    clipped = 0
    for k in range(4):
        tokens = _tokens(k)
        pipeline_loss = _train_step(trainers, tokens, f"sample-{k}")
        loss = next_token_loss(whole(tokens), tokens)
        loss.backward()
        for stage, opt in zip(whole.stages, optimizers, strict=True):
            norm = torch.nn.utils.clip_grad_norm_(stage.parameters(), SPEC.grad_clip)
            clipped += int(norm > SPEC.grad_clip)
            opt.step()
            opt.zero_grad()
        assert pipeline_loss == pytest.approx(loss.item(), abs=1e-5)
    assert clipped > 0
    # Same fp32 ops, only grouped differently (separate graphs joined at the boundaries, autograd.grad on
    # stashed clones): differences stay at rounding level, far below one AdamW step (lr 1e-3).
    for s, trainer in enumerate(trainers):
        assert trainer.steps == 4 and trainer.outstanding == 0
        reference = whole.stages[s].state_dict()
        for name, tensor in trainer.weights().items():
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-5, msg=name)


def test_training_lowers_the_loss_and_is_bitwise_reproducible() -> None:
    tokens = _tokens(99)
    spec = SPEC.model_copy(update={"lr": 3e-3})
    trainers, replay = _pipeline(spec), _pipeline(spec)
    losses = [_train_step(trainers, tokens, f"step-{i}") for i in range(3)]
    assert [_train_step(replay, tokens, f"step-{i}") for i in range(3)] == losses
    for trainer, other in zip(trainers, replay, strict=True):
        for (name, a), b in zip(trainer.weights().items(), other.weights().values(), strict=True):
            assert torch.equal(a, b), name

    losses += [_train_step(trainers, tokens, f"step-{i}") for i in range(3, 20)]
    assert losses[-1] < losses[0] - 1.0, losses


# ---------------------------------------------------------------------------------------------------------
# Pipelining


def test_weight_stashing_gives_each_backward_the_weights_of_its_forward() -> None:
    xa, xb, ga, gb = (_boundary(seed) for seed in range(4))
    # What "b" would give with the weights after the step of "a": the pipelined trainer must not match it.
    late = StageTrainer(CFG, 1, SPEC, seed=SEED)
    late.forward("a", xa, _tokens(0))
    late.backward("a", ga)
    late.commit()
    late_out = late.forward("b", xb, _tokens(1))
    late_grad = late.backward("b", gb)
    late.commit()

    body = StageTrainer(CFG, 1, SPEC, seed=SEED)
    out_b = body.forward("b", xb, _tokens(1))
    body.forward("a", xa, _tokens(0))
    body.backward("a", ga)
    body.commit()  # steps the optimizer while "b" still holds its graph
    assert body.steps == 1 and body.outstanding == 1
    # A forward after the step runs with the new weights, while "b" keeps the old ones.
    assert torch.equal(body.forward("c", xb, _tokens(1)), late_out)
    grad_b = body.backward("b", gb)
    assert body.commit()
    assert grad_b is not None and body.steps == 2
    assert not torch.allclose(grad_b, late_grad, rtol=0, atol=1e-6)

    fresh = StageTrainer(CFG, 1, SPEC, seed=SEED)
    assert torch.equal(fresh.forward("b", xb, _tokens(1)), out_b)
    torch.testing.assert_close(fresh.backward("b", gb), grad_b, rtol=0, atol=0)
    body.drop("c")

    # Parameter gradients: both steps must use gradients taken at the initial weights.
    module = build_stage(CFG, 1, SEED)
    stale = []
    for x, tokens, g in ((xa, _tokens(0), ga), (xb, _tokens(1), gb)):
        module.zero_grad()
        module(x, tokens).backward(g)
        stale.append([p.grad.clone() for p in module.parameters()])
    opt = _adamw(module.parameters())
    for grads in stale:
        for p, g in zip(module.parameters(), grads, strict=True):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(module.parameters(), SPEC.grad_clip)
        opt.step()
    reference = module.state_dict()
    for name, tensor in body.weights().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------
# Guards and state


def test_outstanding_forwards_are_bounded_and_dropped() -> None:
    head = StageTrainer(CFG, 0, SPEC.model_copy(update={"max_outstanding": 2}), seed=SEED)
    head.forward("a", _tokens(0))
    with pytest.raises(TrainerError, match="already has"):
        head.forward("a", _tokens(0))
    head.forward("b", _tokens(1))
    with pytest.raises(TrainerError, match="max_outstanding"):
        head.forward("c", _tokens(2))
    assert head.outstanding == 2

    assert head.drop("a") and not head.drop("a") and head.outstanding == 1
    with pytest.raises(TrainerError, match="no outstanding forward"):
        head.backward("a", _boundary(0))
    head.forward("c", _tokens(2))
    assert head.drop_oldest() == "b" and head.outstanding == 1
    head.forward("d", _tokens(3))
    head.drop_all()
    assert head.drop_oldest() is None
    assert head.outstanding == 0 and head.steps == 0
    with pytest.raises(TrainerError, match="no outstanding forward"):
        head.backward("c", _boundary(0))


def test_malformed_inputs_are_refused() -> None:
    head, body, tail = _pipeline()
    bad_tokens = {
        "integer token ids": _tokens(0).float(),
        "outside": torch.full((B, T), CFG.vocab_size),
        "seq": torch.zeros(B, CFG.max_seq_len + 1, dtype=torch.long),
    }
    for match, tokens in bad_tokens.items():
        with pytest.raises(TrainerError, match=match):
            head.forward("x", tokens)
    nan = _boundary(0)
    nan[0, 3, 1] = float("nan")
    bad_activations = {
        "floating": torch.zeros(B, T, CFG.bottleneck_dim, dtype=torch.long),
        "batch, seq, 4": torch.zeros(B, T, CFG.bottleneck_dim + 1),
        "got \\(2, 32\\)": torch.zeros(B, T),
        "NaN": nan,
    }
    for match, x in bad_activations.items():
        with pytest.raises(TrainerError, match=match):
            body.forward("x", x, _tokens(0))
        with pytest.raises(TrainerError, match=match):
            tail.tail_step(x, _tokens(0))
    with pytest.raises(TrainerError, match="tokens"):
        tail.tail_step(_boundary(0), _tokens(0)[:, :-1])
    with pytest.raises(TrainerError, match="tail_step"):
        tail.forward("x", _boundary(0), _tokens(0))
    with pytest.raises(TrainerError, match="last stage"):
        body.tail_step(_boundary(0), _tokens(0))

    body.forward("x", _boundary(0), _tokens(0))
    with pytest.raises(TrainerError, match="shape"):
        body.backward("x", _boundary(0)[:, :-1])
    with pytest.raises(TrainerError, match="NaN"):
        body.backward("x", nan)
    # A bad gradient leaves the forward in place, to be retried or dropped.
    assert body.outstanding == 1 and body.steps == 0
    assert body.backward("x", _boundary(1)) is not None
    assert head.outstanding == 0 and tail.steps == 0


def test_load_weights_round_trips_and_resets_the_optimizer() -> None:
    trained, fresh = (StageTrainer(CFG, 1, SPEC, seed=SEED) for _ in range(2))
    trained.forward("a", _boundary(0), _tokens(0))
    trained.backward("a", _boundary(1))
    trained.forward("b", _boundary(2), _tokens(2))
    weights = trained.weights()
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in weights.values())

    fresh.load_weights(weights)
    assert all(torch.equal(t, weights[name]) for name, t in fresh.weights().items())
    assert torch.equal(
        fresh.forward("c", _boundary(3), _tokens(3)), trained.forward("c", _boundary(3), _tokens(3))
    )

    trained.load_weights(weights)
    assert trained.outstanding == 0 and trained.steps == 0 and not trained.optimizer.state
    # The returned copies are the caller's: changing them does not touch the trainer.
    next(iter(weights.values())).add_(1.0)
    assert not torch.equal(next(iter(trained.weights().values())), next(iter(weights.values())))

    missing = dict(weights)
    missing.pop("decoder.proj.weight")
    with pytest.raises(TrainerError, match="decoder.proj.weight"):
        fresh.load_weights(missing)
    with pytest.raises(TrainerError, match="embed.weight"):
        fresh.load_weights(StageTrainer(CFG, 0, SPEC, seed=SEED).weights())


# ---------------------------------------------------------------------------------------------------------
# Behaviours


def _trainer(stage: int, behavior: Behavior = "honest") -> MinerTrainer:
    return MinerTrainer(CFG, stage, SPEC, seed=SEED, behavior=behavior)


def test_random_output_is_seeded_noise_with_the_honest_statistics() -> None:
    honest = _trainer(0).forward("item-1", _tokens(0))
    noise = _trainer(0, "random-output").forward("item-1", _tokens(0))
    assert noise.shape == honest.shape and noise.dtype == honest.dtype
    assert not torch.allclose(noise, honest, atol=1e-3)
    assert noise.std().item() == pytest.approx(honest.std().item(), rel=0.2)
    assert torch.equal(noise, _trainer(0, "random-output").forward("item-1", _tokens(0)))
    assert not torch.equal(noise, _trainer(0, "random-output").forward("item-2", _tokens(0)))

    # Its backward is honest.
    liar, truthful = _trainer(1, "random-output"), _trainer(1)
    liar.forward("a", _boundary(0), _tokens(0))
    truthful.forward("a", _boundary(0), _tokens(0))
    assert torch.equal(liar.backward("a", _boundary(1)), truthful.backward("a", _boundary(1)))


def test_scaled_output_multiplies_the_honest_output() -> None:
    honest = _trainer(1).forward("a", _boundary(0), _tokens(0))
    scaled = _trainer(1, "scaled-output").forward("a", _boundary(0), _tokens(0))
    assert torch.equal(scaled, honest * SCALE) and SCALE != 1.0


def test_zero_grad_sends_zeros_and_takes_no_step() -> None:
    for stage in (0, 1):
        lazy, honest = _trainer(stage, "zero-grad"), _trainer(stage)
        before = lazy.weights()
        x = _tokens(0) if stage == 0 else _boundary(0)
        tokens = None if stage == 0 else _tokens(0)
        assert torch.equal(lazy.forward("a", x, tokens), honest.forward("a", x, tokens))
        grad = lazy.backward("a", _boundary(1))
        if stage == 0:
            assert grad is None
        else:
            assert grad is not None and grad.shape == x.shape and not grad.any()
        assert lazy.steps == 0 and lazy.outstanding == 0
        assert all(torch.equal(t, before[name]) for name, t in lazy.weights().items())

    lazy, honest = _trainer(2, "zero-grad"), _trainer(2)
    before = lazy.weights()
    loss, grad = lazy.tail_step(_boundary(0), _tokens(0))
    honest_loss, honest_grad = honest.tail_step(_boundary(0), _tokens(0))
    assert loss == honest_loss and honest_grad.any()
    assert grad.shape == honest_grad.shape and not grad.any()
    assert lazy.steps == 0 and all(torch.equal(t, before[name]) for name, t in lazy.weights().items())


def test_copy_input_passes_its_input_through() -> None:
    x = _boundary(0)
    body = _trainer(1, "copy-input")
    assert torch.equal(body.forward("a", x, _tokens(0)), x)
    assert body.backward("a", _boundary(1)) is not None and body.commit() and body.steps == 1

    head = _trainer(0, "copy-input").forward("a", _tokens(0))
    assert head.shape == (B, T, CFG.bottleneck_dim) and not head.any()

    loss, grad = _trainer(2, "copy-input").tail_step(x, _tokens(0))
    assert loss == _trainer(2).tail_step(x, _tokens(0))[0]
    assert grad.shape == x.shape and not grad.any()


def test_wrong_loss_halves_the_reported_loss_and_trains_honestly() -> None:
    x, tokens = _boundary(0), _tokens(0)
    liar, honest = _trainer(2, "wrong-loss"), _trainer(2)
    (lie, lie_grad), (truth, grad) = liar.tail_step(x, tokens), honest.tail_step(x, tokens)
    assert lie == pytest.approx(truth / 2) and torch.equal(lie_grad, grad)


def test_a_step_waits_for_commit_and_discard_leaves_the_weights() -> None:
    body = _trainer(1)
    before = body.weights()
    body.forward("a", _boundary(0), _tokens(0))
    body.backward("a", _boundary(1))
    assert body.pending and body.steps == 0
    body.forward("b", _boundary(2), _tokens(2))
    with pytest.raises(TrainerError, match="neither committed nor discarded"):
        body.backward("b", _boundary(3))
    body.discard()
    assert not body.pending and not body.commit()
    assert all(torch.equal(t, before[name]) for name, t in body.weights().items())
    body.backward("b", _boundary(3))
    assert body.commit() and body.steps == 1
    assert any(not torch.equal(t, before[name]) for name, t in body.weights().items())


def test_every_behavior_is_known_and_unknown_ones_are_refused() -> None:
    assert set(BEHAVIORS) == {
        "honest", "random-output", "zero-grad", "scaled-output", "copy-input", "wrong-loss",
        "wrong-reduce",
    }  # fmt: skip
    for behavior in BEHAVIORS:
        assert BehaviorPolicy(behavior).takes_step == (behavior != "zero-grad")
    with pytest.raises(ValueError, match="unknown behaviour"):
        BehaviorPolicy("lazy")  # type: ignore[arg-type]
