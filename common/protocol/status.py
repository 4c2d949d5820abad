"""Public, read-only status: the run at a glance and the loss log."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.protocol.wire import _Message


class StageStatus(_Message):
    stage: int
    miners: int
    version: int = Field(description="Global weights version (merges completed) of the stage.")
    merge_phase: str | None = Field(description="The phase of the stage's merge in progress, if any.")
    samples_per_s: float = Field(description="Estimated capacity of the stage's live miners.")


class MinerStatus(_Message):
    hotkey: str
    stage: int
    state: Literal["active", "inactive"]
    items_completed: int
    seconds_per_sample: float | None


class RunStatus(_Message):
    run_id: str
    protocol: int
    preset: str
    n_stages: int
    batch_size: int
    seq_len: int
    started_at: float
    samples_issued: int
    samples_completed: int
    samples_in_flight: int
    samples_waiting_retry: int
    samples_dropped: int
    attempts_failed: int
    items_completed: int
    epoch: int
    epoch_phase: Literal["training", "draining", "merging"]
    merges_completed: int
    merges_rolled_back: int
    validations: dict[str, int] = Field(
        default_factory=dict, description="Replay tasks by status: queued, leased, passed, failed, ..."
    )
    stages: list[StageStatus]
    miners: list[MinerStatus]


class LossRecord(_Message):
    seq: int = Field(description="Position in the loss log; ask for `after` it to page.")
    sample: int
    attempt: int
    loss: float
    at: float
    pathway: list[str] = Field(description="Hotkey of the miner at each stage.")


class LossPage(_Message):
    records: list[LossRecord]
    next_after: int
