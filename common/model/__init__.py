"""The Llama-style decoder, its presets, and its split into pipeline stages with bottlenecks."""

from .config import BYTE_VOCAB_SIZE, PRESETS, ModelConfig, get_preset
from .stages import (
    IotaModel,
    PipelineStage,
    StageSize,
    boundary_payload_limit,
    boundary_shape,
    build_stage,
    next_token_loss,
    stage_sizes,
)

__all__ = [
    "BYTE_VOCAB_SIZE",
    "PRESETS",
    "IotaModel",
    "ModelConfig",
    "PipelineStage",
    "StageSize",
    "boundary_payload_limit",
    "boundary_shape",
    "build_stage",
    "get_preset",
    "next_token_loss",
    "stage_sizes",
]
