"""The orchestrator's own settings (`IOTA_ORCH_`): where it listens, where its state lives, and the run's
training and scheduling knobs. Shared groups (S3, chain, auth, model, data) come from `common.config`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings

from common.config import settings_config
from common.protocol import TrainingSpec


class OrchestratorSettings(BaseSettings):
    model_config = settings_config("IOTA_ORCH_")

    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 to serve other machines.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port).")
    state_path: Path = Field(
        Path(".iota/orchestrator.sqlite"), description="SQLite file holding the run's state (WAL mode)."
    )
    # -- the run's inner optimiser and wire format (fixed when the run is created) --
    lr: float = Field(1e-3, gt=0, description="Miners' inner AdamW learning rate.")
    weight_decay: float = Field(0.1, ge=0, description="Inner AdamW weight decay.")
    beta1: float = Field(0.9, ge=0, lt=1, description="Inner AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="Inner AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Per-stage gradient norm clip; 0 disables it.")
    wire_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of activations and gradients between stages."
    )
    wire_int8: bool = Field(False, description="Quantise activations and gradients to int8 on the wire.")
    wire_compress: bool = Field(False, description="lz4-compress activations and gradients on the wire.")
    # -- merging: the outer optimiser (fixed when the run is created) and the epoch clock --
    outer_lr: float = Field(
        0.7, gt=0, description="Outer Nesterov learning rate at each merge (DiLoCo: 0.7)."
    )
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="Outer Nesterov momentum (DiLoCo: 0.9).")
    merge_every_samples: int = Field(
        256, ge=0, description="Merge once this many samples have been trained in the epoch (0: no limit)."
    )
    epoch_max_s: float = Field(
        1800.0,
        ge=0,
        description="Merge this long after the epoch's first sample even if fewer (0: no limit).",
    )
    drain_timeout_s: float = Field(
        60.0, gt=0, description="Before a merge, how long samples in flight get to finish; then carried over."
    )
    merge_phase_timeout_s: float = Field(
        60.0, gt=0, description="Deadline of each merge phase; late miners are left out or replaced."
    )
    merge_clip_factor: float = Field(
        2.0, gt=0, description="Reducers clip each pseudo-gradient slice to this times the median norm."
    )
    # -- scheduling --
    max_outstanding: int = Field(
        4, ge=1, le=64, description="Forwards a miner may hold awaiting their backward (its memory bound)."
    )
    item_timeout_s: float = Field(
        60.0, gt=0, description="Deadline of one work item, from when it is queued or handed out."
    )
    miner_timeout_s: float = Field(
        30.0, gt=0, description="A miner not heard from for this long is inactive; its work is requeued."
    )
    poll_wait_s: float = Field(
        5.0, ge=0, le=60, description="Longest time a miner's request for work is held open."
    )
    max_attempts: int = Field(
        3, ge=1, description="Attempts per sample before it is dropped (and recorded as dropped)."
    )
    rebalance_interval_s: float = Field(
        30.0, gt=0, description="How often stage assignment is checked for a starving stage."
    )
    garbage_delay_s: float = Field(
        30.0, ge=0, description="Grace before a finished sample's objects are deleted from the bucket."
    )
    max_samples: int | None = Field(
        None, ge=1, description="Stop handing out new samples after this many (empty: no limit)."
    )
    # -- validation --
    validation_fraction: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Chance that a miner's epoch is shadowed: replayed by a validator (0: no validation).",
    )
    validation_retention_s: float = Field(
        3600.0,
        ge=0,
        description="How long objects a replay may need (activations, gradients, pseudo-gradients, the"
        " start-of-epoch checkpoint) are kept, and how long a replay task waits for a validator.",
    )
    validation_lease_s: float = Field(
        600.0, gt=0, description="How long a validator has to report a replay before it goes to another."
    )
    validator_min_stake: float = Field(
        1.0, ge=0, description="Stake a hotkey with a validator permit needs to call the validator routes."
    )
    # -- operating --
    status_interval_s: float = Field(
        30.0, ge=0, description="How often the orchestrator logs a one-line status of the run (0: never)."
    )

    @property
    def object_retention_s(self) -> float:
        """Grace before a finished object is deleted: long enough for a replay when validation is on."""
        if self.validation_fraction > 0:
            return max(self.garbage_delay_s, self.validation_retention_s)
        return self.garbage_delay_s


def training_spec(settings: OrchestratorSettings) -> TrainingSpec:
    """The run's optimiser and wire settings as miners receive them."""
    return TrainingSpec(
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        beta1=settings.beta1,
        beta2=settings.beta2,
        grad_clip=settings.grad_clip,
        max_outstanding=settings.max_outstanding,
        wire_dtype=settings.wire_dtype,
        wire_int8=settings.wire_int8,
        wire_compress=settings.wire_compress,
        outer_lr=settings.outer_lr,
        outer_momentum=settings.outer_momentum,
    )
