"""Pipeline stages of the model, their seeded initialisation, and the whole model as their composition.

Stage 0 (the head) embeds tokens; the last stage (the tail) ends with the final norm and the LM head; every
stage but the tail ends with a bottleneck encoder and every stage but the head starts with a decoder. Only
the encoder's b-wide output crosses the network. At bottleneck_ratio 1 there is neither: the d-wide residual
stream crosses as it is. Behind a bottleneck, every stage after the head also embeds the token ids itself
(`token_dim`, `StageTokens`), which each miner loads by sample id like the tail's labels: they cost nothing
on the wire.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import (
    Block,
    BottleneckDecoder,
    BottleneckEncoder,
    RMSNorm,
    StageTokens,
    rotary_tables,
)

# Output projections that write into the residual stream; GPT-2 style, their init is scaled down with depth.
_RESIDUAL_OUTPUTS = ("attn.wo.weight", "mlp.w2.weight")


class PipelineStage(nn.Module):
    """One contiguous slice of the model: what a single miner trains."""

    def __init__(self, cfg: ModelConfig, stage: int) -> None:
        super().__init__()
        cfg.check_stage(stage)
        self.cfg, self.stage = cfg, stage
        self.is_head, self.is_tail = stage == 0, stage == cfg.n_stages - 1
        if self.is_head:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        elif cfg.has_bottleneck:
            self.decoder = BottleneckDecoder(cfg)
            if cfg.stage_tokens:
                self.tokens = StageTokens(cfg)
        self.needs_tokens = not self.is_head and cfg.stage_tokens  # forward(x, tokens) then
        self.blocks = nn.ModuleList(Block(cfg) for _ in cfg.block_range(stage))
        if self.is_tail:
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        elif cfg.has_bottleneck:
            self.encoder = BottleneckEncoder(cfg)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Head: token ids (B, T) -> (B, T, b). Body: (B, T, b) -> (B, T, b). Tail: (B, T, b) -> logits.
        Where `needs_tokens`, `tokens` are the sample's token ids (B, T)."""
        seq = x.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len {self.cfg.max_seq_len}")
        if self.is_head:
            h = self.embed(x)
        else:
            h = self.decoder(x) if self.cfg.has_bottleneck else x
            if self.needs_tokens:
                if tokens is None or tokens.shape != x.shape[:2]:
                    got = None if tokens is None else tuple(tokens.shape)
                    raise ValueError(
                        f"stage {self.stage} needs the token ids {tuple(x.shape[:2])}, got {got}"
                    )
                h = h + self.tokens(tokens)
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        for block in self.blocks:
            h = block(h, cos, sin)
        if self.is_tail:
            return self.lm_head(self.norm(h))
        return self.encoder(h) if self.cfg.has_bottleneck else h


def stage_seed(seed: int, stage: int) -> int:
    """A per-stage seed, so that a stage built alone equals the same stage built inside the whole model."""
    digest = hashlib.sha256(f"iota-init:{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_stage_weights(module: PipelineStage, seed: int) -> None:
    """Deterministic init from (seed, stage), drawn on the CPU so that every device gets the same bits."""
    cfg = module.cfg
    generator = torch.Generator(device="cpu").manual_seed(stage_seed(seed, module.stage))
    residual_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    for name, param in module.named_parameters():
        if name.endswith("norm.weight"):
            values = torch.ones(param.shape)
        elif name == "encoder.proj.weight":
            # Starts as a pure pass-through of the first b residual channels; learns what to add.
            values = torch.zeros(param.shape)
        else:
            std = residual_std if name.endswith(_RESIDUAL_OUTPUTS) else cfg.init_std
            values = torch.empty(param.shape).normal_(0.0, std, generator=generator)
        param.copy_(values)


def build_stage(
    cfg: ModelConfig, stage: int, seed: int = 0, device: torch.device | str = "cpu"
) -> PipelineStage:
    """A stage with seeded fp32 weights on `device` (`meta` builds the shapes only, for counting)."""
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return PipelineStage(cfg, stage)
    module = PipelineStage(cfg, stage)
    init_stage_weights(module, seed)
    return module.to(device)


class IotaModel(nn.Module):
    """The whole model as one module: the stages in order. Used for export, sampling and tests."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.stages = nn.ModuleList(build_stage(cfg, s, seed, device) for s in range(cfg.n_stages))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        for stage in self.stages:
            x = stage(x, tokens)
        return x

    def stage_state_dict(self, stage: int) -> dict[str, torch.Tensor]:
        return self.stages[stage].state_dict()


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1], computed in fp32."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


@dataclass(frozen=True)
class StageSize:
    stage: int
    role: str
    blocks: int
    parameters: int


def stage_sizes(cfg: ModelConfig) -> list[StageSize]:
    """Parameters per stage, counted on the meta device (no memory, instant even for 15b)."""
    sizes = []
    for s in range(cfg.n_stages):
        module = build_stage(cfg, s, device="meta")
        role = "head" if module.is_head else "tail" if module.is_tail else "body"
        count = sum(p.numel() for p in module.parameters())
        sizes.append(StageSize(stage=s, role=role, blocks=cfg.stage_blocks[s], parameters=count))
    return sizes


def boundary_shape(cfg: ModelConfig, batch: int, seq: int) -> tuple[int, int, int]:
    """The shape of the tensor that crosses every stage boundary, both ways (activation and gradient)."""
    return (batch, seq, cfg.bottleneck_dim)


# Room for the codec's header and safetensors' JSON header on top of the values.
_WIRE_HEADER_BYTES = 64 * 1024


def boundary_payload_limit(cfg: ModelConfig, batch: int, seq: int) -> int:
    """The most bytes a boundary tensor may take on the wire: fp32 values (the widest wire dtype) plus
    headers. The orchestrator refuses larger uploads and miners larger downloads."""
    b, t, w = boundary_shape(cfg, batch, seq)
    return b * t * w * 4 + _WIRE_HEADER_BYTES
