"""What a run is (its data, its training settings, a stage's global weights) and a miner's registration."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from common.protocol.wire import DownloadSource, _Message


class DataSpec(_Message):
    """What a sample is: the corpus (by fingerprint), and the batch shape every stage works on."""

    source: Literal["local", "hf"]
    fingerprint: str
    tokenizer: str = Field(description="`byte`, or the Hugging Face tokenizer's name or path.")
    batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=2)


class TrainingSpec(_Message):
    """Hyperparameters of the inner optimiser and of the wire, fixed per run."""

    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    beta1: float = Field(ge=0, lt=1)
    beta2: float = Field(ge=0, lt=1)
    grad_clip: float = Field(ge=0, description="Per-stage gradient norm clip; 0 disables it.")
    max_outstanding: int = Field(ge=1, description="Forwards a miner may hold awaiting their backward.")
    wire_dtype: Literal["float32", "bfloat16"]
    wire_int8: bool
    wire_compress: bool
    outer_lr: float = Field(gt=0, description="Learning rate of the outer Nesterov step at each merge.")
    outer_momentum: float = Field(ge=0, lt=1, description="Momentum of the outer Nesterov step.")


class Checkpoint(_Message):
    """A stage's global weights after a merge, written by the orchestrator: the stage's state dict and the
    outer optimiser's momentum (same names), each fp32 in the wire format of `common.codec`."""

    weights: DownloadSource
    momentum: DownloadSource


class GlobalWeights(_Message):
    """A stage's current global weights: the seeded init (version 0) or the checkpoint of merge `version`."""

    version: int = Field(ge=0)
    seed: int
    checkpoint: Checkpoint | None = None


class RegisterRequest(_Message):
    """A miner announcing itself. The hotkey is the one that signed the request."""

    device: str = Field(max_length=64, description="`cpu`, `cuda` or `cuda:N`.")
    gpu_memory_gb: float | None = Field(None, ge=0, le=1e5)
    corpus_fingerprint: str = Field(max_length=128, description="The miner's local corpus, checked.")
    preferred_stage: int | None = Field(
        None, ge=0, le=4096, description="Stage to join if this hotkey is new to the run; None: balanced."
    )


class RegisterResponse(_Message):
    run_id: str
    session: int = Field(description="Echo it in every later request; a re-registration replaces it.")
    stage: int
    model: dict[str, Any] = Field(description="`ModelConfig.to_dict()` of the run's model.")
    data: DataSpec
    training: TrainingSpec
    weights: GlobalWeights
    poll_wait_s: float = Field(description="How long the orchestrator holds a work request open.")
