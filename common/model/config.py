"""Model shapes and the named presets, each with its pipeline-stage split.

A preset fixes the transformer's shape and how its blocks are divided among stages. The bottleneck width at
stage boundaries is derived from `bottleneck_ratio` (d_model / b), so one knob moves every boundary; a
ratio of 1 means no bottleneck at all (the whole residual stream crosses), the compression benchmark's
baseline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

# The byte-level tokenizer's 256 bytes plus BOS/EOS/PAD, padded to a multiple of 64 for efficient matmuls.
BYTE_VOCAB_SIZE = 320


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-style decoder split into pipeline stages."""

    name: str
    vocab_size: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    stage_blocks: tuple[int, ...]
    max_seq_len: int
    bottleneck_ratio: int = 128
    # Width of the token embedding that every stage after the head adds to its decoded input (0: none).
    # The token ids cost nothing on the wire (each miner loads them by sample id, as the tail does for its
    # labels), so the bottleneck only has to carry context; a width below d_model is projected up.
    token_dim: int = 0
    # How the inner optimizer trains the vocabulary matrices (token embeddings, LM head): `adamw` as every
    # other parameter, or `factored` (common/optim.py: Adafactor's row and column statistics, ~0 bytes of
    # state instead of AdamW's 8 per parameter) where a 128k x d matrix would not fit a stage otherwise.
    vocab_optimizer: Literal["adamw", "factored"] = "adamw"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        if len(self.stage_blocks) < 2:
            raise ValueError("a pipeline needs at least two stages (a head and a tail)")
        if any(n < 0 for n in self.stage_blocks):
            raise ValueError(f"stage_blocks must be non-negative, got {self.stage_blocks}")
        if not 0 <= self.token_dim <= self.d_model:
            raise ValueError(f"token_dim {self.token_dim} must be between 0 and d_model {self.d_model}")
        if self.bottleneck_ratio < 1 or self.d_model % self.bottleneck_ratio:
            raise ValueError(f"bottleneck_ratio {self.bottleneck_ratio} must divide d_model {self.d_model}")
        if self.vocab_optimizer not in ("adamw", "factored"):
            raise ValueError(f"vocab_optimizer must be 'adamw' or 'factored', got {self.vocab_optimizer!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_layers(self) -> int:
        return sum(self.stage_blocks)

    @property
    def n_stages(self) -> int:
        return len(self.stage_blocks)

    @property
    def has_bottleneck(self) -> bool:
        """False at ratio 1: stages then hand the d-wide residual stream on with no encoder or decoder."""
        return self.bottleneck_ratio > 1

    @property
    def stage_tokens(self) -> bool:
        """Whether the stages after the head take the token ids too (only behind a bottleneck)."""
        return self.has_bottleneck and self.token_dim > 0

    @property
    def bottleneck_dim(self) -> int:
        """b: the channels that cross a stage boundary."""
        return self.d_model // self.bottleneck_ratio

    def block_range(self, stage: int) -> range:
        """The global indices of the transformer blocks that `stage` holds."""
        self.check_stage(stage)
        start = sum(self.stage_blocks[:stage])
        return range(start, start + self.stage_blocks[stage])

    def check_stage(self, stage: int) -> None:
        if not 0 <= stage < self.n_stages:
            raise ValueError(f"stage {stage} is out of range for {self.name} ({self.n_stages} stages)")

    def with_overrides(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stage_blocks"] = list(self.stage_blocks)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        data["stage_blocks"] = tuple(data["stage_blocks"])
        return cls(**data)


def _ffn(d_model: int, multiple: int = 64) -> int:
    """SwiGLU hidden size: 8/3 * d rounded up to a multiple, as in Llama."""
    hidden = int(8 * d_model / 3)
    return multiple * ((hidden + multiple - 1) // multiple)


PRESETS: dict[str, ModelConfig] = {
    # CPU tests and the local network: a few million parameters, byte-level vocabulary.
    # At d=256, 128x leaves b=2 channels, so tiny defaults to 64x (b=4); 128x is one override away.
    "tiny": ModelConfig(
        name="tiny",
        vocab_size=BYTE_VOCAB_SIZE,
        d_model=256,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=_ffn(256),
        stage_blocks=(2, 2, 2),
        max_seq_len=256,
        bottleneck_ratio=64,
        token_dim=256,
    ),
    # A small GPU model for experiments, with a 32k vocabulary (Llama-2 / Mistral sized tokenizers).
    "100m": ModelConfig(
        name="100m",
        vocab_size=32000,
        d_model=768,
        n_heads=12,
        n_kv_heads=4,
        ffn_hidden=_ffn(768),
        stage_blocks=(3, 4, 3),
        max_seq_len=1024,
        token_dim=256,
    ),
    # The reference network's production size: 3 stages, whose fp32 weights, gradients and AdamW state fit
    # a 16 GB GPU; with the run's default 4 outstanding forwards of 8 x 256, the head and body do not
    # (docs/miner.md), with 1 they do.
    # Head and tail carry the 128k-vocabulary embedding and LM head, so they hold fewer blocks.
    "1.5b": ModelConfig(
        name="1.5b",
        vocab_size=128256,
        d_model=2048,
        n_heads=16,
        n_kv_heads=8,
        ffn_hidden=5632,
        stage_blocks=(6, 10, 6),
        max_seq_len=1024,
        rope_theta=500000.0,
        token_dim=128,
    ),
    # d=5120, 50 blocks, 128k vocabulary, as the reference's 15B run, split to fit a 16 GB GPU at the run's
    # default batch (8 x 256) and 4 outstanding forwards, each of which may stash its own fp32 copy of the
    # stage's weights. One 275M-parameter block per body stage (about 12 GiB by iota/preflight.py's estimate);
    # the head holds only the 657M embedding (not stashed: its backward does not read it), the tail one block
    # and the 657M LM head (the tail stashes nothing), both matrices with the factored optimizer.
    "15b": ModelConfig(
        name="15b",
        vocab_size=128256,
        d_model=5120,
        n_heads=40,
        n_kv_heads=8,
        ffn_hidden=13824,
        stage_blocks=(0,) + (1,) * 50,
        max_seq_len=1024,
        rope_theta=500000.0,
        token_dim=128,
        vocab_optimizer="factored",
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with optional field overrides (e.g. bottleneck_ratio=128)."""
    try:
        config = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}") from None
    return config.with_overrides(**overrides) if overrides else config


def split_blocks(n_layers: int, n_stages: int) -> tuple[int, ...]:
    """`n_layers` blocks over `n_stages` stages as evenly as possible, the extra blocks going to the middle.

    The head and tail also carry the embedding and the LM head, so they are the ones that get fewer blocks.
    """
    if not 2 <= n_stages <= n_layers + 2:
        raise ValueError(f"{n_layers} blocks split into 2..{n_layers + 2} stages, not {n_stages}")
    base, extra = divmod(n_layers, n_stages)
    counts = [base] * n_stages
    # Hand out the remainder from the middle outwards.
    order = sorted(range(n_stages), key=lambda s: (abs(s - (n_stages - 1) / 2), s))
    for s in order[:extra]:
        counts[s] += 1
    return tuple(counts)
