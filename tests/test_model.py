"""The staged model: the pipeline equals the whole model, seeded init is identical, presets as documented."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.model import (
    PRESETS,
    IotaModel,
    ModelConfig,
    boundary_shape,
    build_stage,
    get_preset,
    next_token_loss,
    stage_sizes,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = get_preset("tiny")
# Four stages so that the chain has two body stages between head and tail.
TINY4 = TINY.with_overrides(stage_blocks=(1, 2, 2, 1))


def _tokens(batch: int = 2, seq: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _state_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("cfg", [TINY, TINY4], ids=["3-stages", "4-stages"])
def test_stages_built_alone_equal_the_whole_model(cfg: ModelConfig) -> None:
    whole = IotaModel(cfg, seed=7)
    for s in range(cfg.n_stages):
        alone = build_stage(cfg, s, seed=7)
        assert _state_digest(alone) == _state_digest(whole.stages[s])
    assert _state_digest(build_stage(cfg, 1, seed=8)) != _state_digest(whole.stages[1])


@pytest.mark.parametrize("cfg", [TINY, TINY4], ids=["3-stages", "4-stages"])
def test_pipeline_forward_and_backward_match_the_whole_model(cfg: ModelConfig) -> None:
    tokens = _tokens()
    whole = IotaModel(cfg, seed=3)
    whole_loss = next_token_loss(whole(tokens), tokens)
    whole_loss.backward()

    stages = [build_stage(cfg, s, seed=3) for s in range(cfg.n_stages)]
    # Forward as miners do it: each stage receives a detached copy of the tensor that crossed the network.
    inputs: list[torch.Tensor] = [tokens]
    outputs: list[torch.Tensor] = []
    for stage in stages:
        out = stage(inputs[-1], tokens)
        outputs.append(out)
        if not stage.is_tail:
            assert out.shape == boundary_shape(cfg, *tokens.shape)
            inputs.append(out.detach().requires_grad_(True))
    pipeline_loss = next_token_loss(outputs[-1], tokens)
    assert torch.allclose(pipeline_loss, whole_loss, rtol=0, atol=1e-6)

    # Backward as miners do it: the tail starts from the loss; each earlier stage from the gradient that
    # came back across its boundary.
    pipeline_loss.backward()
    for s in range(cfg.n_stages - 2, -1, -1):
        outputs[s].backward(inputs[s + 1].grad)

    for s, stage in enumerate(stages):
        for (name, p_pipe), (_, p_whole) in zip(
            stage.named_parameters(), whole.stages[s].named_parameters(), strict=True
        ):
            assert p_pipe.grad is not None, name
            torch.testing.assert_close(p_pipe.grad, p_whole.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_seeded_init_is_bitwise_identical_across_processes() -> None:
    script = (
        "import hashlib, torch\n"
        "from common.model import build_stage, get_preset\n"
        "m = build_stage(get_preset('tiny'), 1, seed=11)\n"
        "h = hashlib.sha256()\n"
        "for k, v in sorted(m.state_dict().items()):\n"
        "    h.update(k.encode()); h.update(v.contiguous().view(torch.uint8).numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert digests == {_state_digest(build_stage(TINY, 1, seed=11))}


def test_training_through_the_pipeline_lowers_the_loss() -> None:
    tokens = _tokens(batch=4, seq=64, seed=1)
    stages = [build_stage(TINY, s, seed=0) for s in range(TINY.n_stages)]
    optimizers = [torch.optim.AdamW(s.parameters(), lr=3e-3) for s in stages]
    losses = []
    for _ in range(15):
        x: torch.Tensor = tokens
        crossings, outs = [], []
        for stage in stages:
            out = stage(x, tokens)
            outs.append(out)
            if not stage.is_tail:
                x = out.detach().requires_grad_(True)
                crossings.append(x)
        loss = next_token_loss(outs[-1], tokens)
        loss.backward()
        for s in range(len(stages) - 2, -1, -1):
            outs[s].backward(crossings[s].grad)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


def test_only_b_channels_cross_a_boundary_and_start_as_a_residual_pass_through() -> None:
    head = build_stage(TINY, 0, seed=0)
    tokens = _tokens()
    z = head(tokens)
    assert z.shape[-1] == TINY.bottleneck_dim == TINY.d_model // TINY.bottleneck_ratio
    # At init the encoder adds nothing: the first b residual channels flow through untouched.
    h = head.embed(tokens)
    cos, sin = head.rope_cos[: tokens.shape[1]], head.rope_sin[: tokens.shape[1]]
    for block in head.blocks:
        h = block(h, cos, sin)
    torch.testing.assert_close(z, h[..., : TINY.bottleneck_dim])


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_offers_at_least_128x(name: str) -> None:
    cfg = get_preset(name, bottleneck_ratio=128)
    assert cfg.bottleneck_dim >= 1
    assert get_preset(name).bottleneck_ratio >= 64


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="bottleneck_ratio"):
        get_preset("tiny", bottleneck_ratio=3)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("7b")
    with pytest.raises(ValueError, match="at least two stages"):
        TINY.with_overrides(stage_blocks=(6,))
    with pytest.raises(ValueError, match="max_seq_len"):
        build_stage(TINY, 0)(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        build_stage(TINY, 3)


def _documented_counts() -> dict[str, list[int]]:
    """Per-stage parameter counts from the table in docs/model.md."""
    counts: dict[str, list[int]] = {}
    for line in (ROOT / "docs" / "model.md").read_text().splitlines():
        match = re.match(r"\|\s*`([\w.]+)`\s*\|.*\|\s*([\d,\s/]+)\s*\|\s*$", line)
        if match:
            counts[match.group(1)] = [int(c.replace(",", "")) for c in match.group(2).split("/")]
    return counts


def test_parameter_counts_are_as_documented() -> None:
    documented = _documented_counts()
    assert set(documented) == set(PRESETS)
    for name, cfg in PRESETS.items():
        assert [s.parameters for s in stage_sizes(cfg)] == documented[name], name
