"""common/optim.py: the factored optimizer of the vocabulary matrices, and that the miner, the validator's
replay and the memory estimate all follow the model config's `vocab_optimizer`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.replay_sim import TRAINING, simulate_epoch, torch_threads
from common import optim
from common.model import build_stage, get_preset
from common.optim import (
    CombinedOptimizer,
    FactoredSecondMoment,
    build_inner_optimizer,
    embedding_table_names,
    optimizer_state_bytes,
    vocab_parameter_names,
)
from common.training import StageTrainer
from iota.preflight import count_stage_parameters, stage_optimizer_bytes
from validator.replay import EXACT_TOLERANCES

FACTORED = get_preset("tiny", max_seq_len=64, vocab_optimizer="factored")


def _toy_problem(seed: int) -> tuple[nn.Embedding, torch.Tensor, torch.Tensor]:
    """A lookup table fitted to random targets for random ids: the shape of an embedding's training."""
    generator = torch.Generator().manual_seed(seed)
    table = nn.Embedding(50, 16)
    with torch.no_grad():
        table.weight.copy_(torch.randn(50, 16, generator=generator) * 0.02)
    ids = torch.randint(0, 40, (64,), generator=generator)  # rows 40..49 never get a gradient
    targets = torch.randn(40, 16, generator=generator)[ids]
    return table, ids, targets


def _train_toy(seed: int, steps: int, **kwargs: float) -> tuple[nn.Embedding, list[float]]:
    table, ids, targets = _toy_problem(seed)
    opt = FactoredSecondMoment(table.parameters(), lr=kwargs.pop("lr", 3e-2), beta2=0.95, **kwargs)
    losses = []
    for _ in range(steps):
        loss = (table(ids) - targets).square().mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return table, losses


def test_the_factored_optimizer_decreases_the_loss() -> None:
    _, losses = _train_toy(0, 200)
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_the_factored_optimizer_is_deterministic_to_the_bit() -> None:
    a, _ = _train_toy(1, 20, weight_decay=0.1)
    b, _ = _train_toy(1, 20, weight_decay=0.1)
    assert torch.equal(a.weight, b.weight)


def test_rows_without_a_gradient_only_decay() -> None:
    table, ids, targets = _toy_problem(2)
    before = table.weight.detach().clone()
    opt = FactoredSecondMoment(table.parameters(), lr=1e-2, beta2=0.95, weight_decay=0.1)
    (table(ids) - targets).square().mean().backward()
    opt.step()
    unused = torch.ones(50, dtype=torch.bool)
    unused[ids] = False
    assert unused[40:].all()
    torch.testing.assert_close(table.weight[unused], before[unused] * (1 - 1e-2 * 0.1), rtol=0, atol=0)
    assert not torch.allclose(table.weight[~unused], before[~unused] * (1 - 1e-2 * 0.1))


def test_a_step_is_adafactor_with_the_update_clipped_to_rms_lr() -> None:
    """One step against the formula written out densely: the chunked, two-pass step computes the same."""
    generator = torch.Generator().manual_seed(3)
    w = nn.Parameter(torch.randn(37, 11, generator=generator))
    g = torch.randn(37, 11, generator=generator)
    g[5] = 0  # a row with no gradient, as an embedding's
    w0 = w.detach().clone()
    w.grad = g.clone()
    lr, beta2, eps = 0.1, 0.9, 1e-30
    FactoredSecondMoment([w], lr=lr, beta2=beta2).step()
    sq = g.square() + eps
    row, col = (1 - beta2) * sq.mean(1), (1 - beta2) * sq.mean(0)
    v = torch.outer(row / row.mean(), col) / (1 - beta2)
    update = g / v.clamp(min=eps).sqrt()
    update = update / max(1.0, update.square().mean().sqrt().item())
    torch.testing.assert_close(w.detach(), w0 - lr * update, rtol=1e-5, atol=1e-6)
    # The clip holds the step's RMS to lr, and the step does not depend on the gradient's scale.
    assert (w0 - w.detach()).square().mean().sqrt().item() <= lr * (1 + 1e-6)
    scaled = nn.Parameter(w0.clone())
    scaled.grad = g * 1000
    FactoredSecondMoment([scaled], lr=lr, beta2=beta2).step()
    torch.testing.assert_close(scaled.detach(), w.detach(), rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    def trained(chunk: int) -> torch.Tensor:
        monkeypatch.setattr(optim, "FACTORED_CHUNK_ELEMENTS", chunk)
        table, _ = _train_toy(4, 5)
        return table.weight.detach()

    # 16 columns: chunks of 1, 3 and all 50 rows.
    whole, rows3, rows1 = trained(2**22), trained(48), trained(16)
    torch.testing.assert_close(rows3, whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rows1, whole, rtol=1e-6, atol=1e-7)


def test_the_factored_state_is_a_row_and_a_column_per_matrix() -> None:
    table, ids, targets = _toy_problem(5)
    opt = FactoredSecondMoment(table.parameters(), lr=1e-2, beta2=0.95)
    (table(ids) - targets).square().mean().backward()
    opt.step()
    assert optimizer_state_bytes(opt) == 4 * (50 + 16)
    adamw = torch.optim.AdamW(table.parameters(), lr=1e-2)
    adamw.step()
    assert optimizer_state_bytes(adamw) == 8 * 50 * 16


# ---------------------------------------------------------------------------------------------------------
# From the config to the trainer, the replay and the estimate


def test_the_vocabulary_matrices_of_each_stage() -> None:
    head, body, tail = (build_stage(FACTORED, s, device="meta") for s in range(3))
    assert vocab_parameter_names(head) == ["embed.weight"]
    assert vocab_parameter_names(body) == ["tokens.embed.weight"]
    assert vocab_parameter_names(tail) == ["lm_head.weight", "tokens.embed.weight"]
    # The LM head's backward reads its weight (for the input's gradient): it is the one table stashed.
    assert embedding_table_names(tail) == ["tokens.embed.weight"]


def test_the_config_chooses_the_optimizer() -> None:
    module = build_stage(FACTORED, 2, seed=1)
    spec = TRAINING
    adamw = build_inner_optimizer(module, get_preset("tiny"), spec)
    assert type(adamw) is torch.optim.AdamW
    combined = build_inner_optimizer(module, FACTORED, spec)
    assert isinstance(combined, CombinedOptimizer)
    inner, factored = combined.optimizers
    assert isinstance(inner, torch.optim.AdamW) and isinstance(factored, FactoredSecondMoment)
    names = {id(p): n for n, p in module.named_parameters()}
    # Sorted by name, so that two builds order (and step) the parameters alike.
    assert [names[id(p)] for p in factored.param_groups[0]["params"]] == [
        "lm_head.weight",
        "tokens.embed.weight",
    ]
    block_names = [names[id(p)] for p in inner.param_groups[0]["params"]]
    assert block_names == sorted(block_names) and len(block_names) == len(names) - 2
    assert inner.param_groups[0]["betas"] == (spec.beta1, spec.beta2)
    # A trainer of each config builds the same, and the factored one keeps far less state.
    trainers = [StageTrainer(cfg, 2, spec, seed=1) for cfg in (get_preset("tiny", max_seq_len=64), FACTORED)]
    assert type(trainers[0].optimizer) is torch.optim.AdamW
    assert isinstance(trainers[1].optimizer, CombinedOptimizer)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_the_estimate_counts_the_optimizer_the_trainer_builds(stage: int) -> None:
    trainer = StageTrainer(FACTORED, stage, TRAINING, seed=2)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 16), generator=generator)
    boundary = torch.randn(2, 16, FACTORED.bottleneck_dim, generator=generator)
    if stage == 2:
        trainer.tail_step(boundary, tokens)
    else:
        out = trainer.forward("a", tokens if stage == 0 else boundary, None if stage == 0 else tokens)
        trainer.backward("a", torch.ones_like(out))
    assert trainer.commit()
    size = count_stage_parameters(FACTORED)[stage]
    assert stage_optimizer_bytes(FACTORED, size) - optim.FACTORED_WORKSPACE_BYTES == optimizer_state_bytes(
        trainer.optimizer
    )
    plain = get_preset("tiny", max_seq_len=64)
    assert stage_optimizer_bytes(plain, count_stage_parameters(plain)[stage]) == 8 * size.parameters


def test_outstanding_forwards_share_the_live_embedding_table() -> None:
    trainer = StageTrainer(FACTORED, 0, TRAINING, seed=3)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    trainer.forward("a", tokens)
    stash = trainer._stash
    assert stash is not None
    params = dict(trainer.module.named_parameters())
    assert stash["embed.weight"].data_ptr() == params["embed.weight"].data_ptr()
    assert stash["encoder.proj.weight"].data_ptr() != params["encoder.proj.weight"].data_ptr()


def _pipelined_head_grads(share_table: bool) -> list[torch.Tensor]:
    """The head's embedding gradients of two pipelined forwards with a step between their backwards."""
    trainer = StageTrainer(FACTORED, 0, TRAINING, seed=4)
    if not share_table:  # the stash of every weight, as before tables were shared
        trainer_forward = trainer.forward

        def cloning_forward(
            item_id: str, x: torch.Tensor, tokens: torch.Tensor | None = None
        ) -> torch.Tensor:
            if trainer._stash is None:
                trainer._stash = {
                    n: p.detach().clone().requires_grad_(True) for n, p in trainer.module.named_parameters()
                }
            return trainer_forward(item_id, x, tokens)

        trainer.forward = cloning_forward  # type: ignore[method-assign]
    generator = torch.Generator().manual_seed(2)
    outs = {i: trainer.forward(i, torch.randint(0, 256, (2, 16), generator=generator)) for i in ("a", "b")}
    grads = []
    for item_id, out in outs.items():
        trainer.backward(item_id, torch.randn(out.shape, generator=generator))
        grads.append(trainer.module.embed.weight.grad.clone())
        assert trainer.commit()
    grads.append(trainer.module.embed.weight.detach().clone())
    return grads


def test_sharing_the_table_changes_no_bit_of_a_pipelined_backward() -> None:
    for shared, cloned in zip(_pipelined_head_grads(True), _pipelined_head_grads(False), strict=True):
        assert torch.equal(shared, cloned)


@pytest.mark.parametrize("stage", [0, 2])
def test_a_replay_of_a_stage_trained_with_the_factored_optimizer_matches(stage: int) -> None:
    with torch_threads(1):
        sim = simulate_epoch(stage, samples=6, model={"vocab_optimizer": "factored"})
        assert sim.cfg.vocab_optimizer == "factored"
        verdict = sim.replay(EXACT_TOLERANCES)
    assert verdict.passed is True, verdict


def test_a_replay_with_the_other_optimizer_does_not_match() -> None:
    """The replay follows the run's config: replaying factored work as AdamW fails it (so the test above
    could fail), on the first weights it compares."""
    with torch_threads(1):
        sim = simulate_epoch(2, samples=6, model={"vocab_optimizer": "factored"})
        sim.cfg = sim.cfg.with_overrides(vocab_optimizer="adamw")
        verdict = sim.replay(EXACT_TOLERANCES)
    assert verdict.passed is False, verdict


def test_the_tiny_tail_learns_with_factored_tables() -> None:
    """A few steps of the tail on one batch: the loss falls with the factored LM head as with AdamW."""
    generator = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 256, (2, 32), generator=generator)
    x = torch.randn(2, 32, FACTORED.bottleneck_dim, generator=generator)
    for cfg in (get_preset("tiny", max_seq_len=64), FACTORED):
        trainer = StageTrainer(cfg, 2, TRAINING, seed=5)
        losses = []
        for _ in range(15):
            loss, _ = trainer.tail_step(x, tokens)
            losses.append(loss)
            assert trainer.commit()
        assert losses[-1] < losses[0] - 0.5, (cfg.vocab_optimizer, losses)


def test_the_quality_bench_quick_run_pairs_both_optimizers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from bench import optim_quality

    out = tmp_path / "optim_quality.json"
    monkeypatch.setattr(sys, "argv", ["optim_quality.py", "--quick", "--json", "--out", str(out)])
    threads = torch.get_num_threads()
    try:  # in this process: a second torch import costs seconds
        optim_quality.main()
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result
    assert result["seeds"] == [0, 1] and len(result["runs"]) == 2
    for r in result["runs"]:
        adamw, factored = r["settings"]["adamw"], r["settings"]["factored"]
        # Same init and samples: the first loss is the same; the training differs.
        assert adamw["first_train_loss"] == factored["first_train_loss"]
        assert adamw["heldout_loss"] != factored["heldout_loss"]
        gap = 100 * (factored["heldout_loss"] - adamw["heldout_loss"]) / adamw["heldout_loss"]
        assert r["heldout_gap_pct"] == pytest.approx(gap, abs=1e-3)
    interval = result["heldout_gap_pct"]
    assert interval["ci95_low"] <= interval["mean"] <= interval["ci95_high"]
    assert result["step_timing"]["factored_step_s"] > 0 and result["step_timing"]["adamw_step_s"] > 0
