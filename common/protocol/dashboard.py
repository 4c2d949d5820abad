"""The dashboard (GET /v1/dashboard): public and read-only, like /v1/status, which it embeds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.protocol.status import RunStatus
from common.protocol.validators import ScoresReport
from common.protocol.wire import _Message


class MinerThroughput(_Message):
    hotkey: str
    uid: int | None = Field(description="Its uid on the subnet; None if the chain no longer lists it.")
    stage: int
    state: Literal["active", "inactive"]
    items_completed: int
    samples_per_s: float | None = Field(
        description="1 / its measured seconds per sample; None until measured."
    )
    tokens_per_s: float | None = Field(description="samples_per_s times the tokens of one sample.")


class LossPoint(_Message):
    """The mean tail loss of the samples in one bin of sample ids."""

    sample: float = Field(description="Mean sample id of the bin.")
    loss: float
    count: int = Field(description="Losses in the bin.")


class ThroughputPoint(_Message):
    at: float = Field(description="Unix seconds.")
    samples_completed: int
    samples_per_s: float = Field(description="Completion rate over the few snapshots before this one.")
    tokens_per_s: float


class EpochProgress(_Message):
    epoch: int
    phase: Literal["training", "draining", "merging"]
    phase_since: float = Field(description="When the current phase began (unix seconds).")
    samples_trained: int = Field(description="Samples completed in this epoch so far.")
    merge_every_samples: int = Field(description="Samples that end the epoch (0: no limit).")
    epoch_max_s: float = Field(description="Seconds of training that end the epoch (0: no limit).")


class MergeSummary(_Message):
    """The gist of one `MergeRecord` (all of it: GET /v1/merges)."""

    epoch: int
    stage: int
    outcome: Literal["merged", "rolled_back"]
    version: int
    participants: int
    flagged: int
    finished_at: float


class ValidatorScores(_Message):
    """One validator's latest report, as received."""

    hotkey: str
    uid: int | None
    stake: float
    received_at: float
    report: ScoresReport


class MinerConsensus(_Message):
    """One uid or hotkey across the validators: stake-weighted means of what they reported and of the
    chain's weight rows. A validator with no stake weighs 0 unless none has any (then each weighs 1)."""

    hotkey: str | None
    uid: int | None
    stage: int | None = Field(description="Its stage in this run, if it is a miner of the run.")
    score: float | None = Field(description="Consensus score; None if no validator scored it.")
    weight: float = Field(description="Consensus of the weights validators reported setting.")
    chain_weight: float | None = Field(description="Consensus of the chain's weight rows; None if unread.")
    penalized_by: int = Field(description="Validators whose round penalized it.")
    flagged_by: int = Field(description="Validators whose CLASP flagged it.")
    by_validator: dict[str, float] = Field(description="Validator hotkey -> the score it gave.")


class DashboardData(_Message):
    at: float = Field(description="The orchestrator's clock when this was built.")
    status: RunStatus
    progress: EpochProgress
    miners: list[MinerThroughput]
    loss: list[LossPoint] = Field(description="The whole run's loss curve, at most a few hundred bins.")
    losses_recorded: int
    throughput: list[ThroughputPoint] = Field(description="Since the orchestrator started; bounded.")
    merges: list[MergeSummary] = Field(description="The most recent stage merges, oldest first.")
    validators: list[ValidatorScores]
    consensus: list[MinerConsensus]
    chain_weights: dict[int, dict[int, float]] | None = Field(
        description="The chain's weight rows, validator uid -> {uid: weight}; None if not read yet."
    )
    weights_source: Literal["chain", "validators", "none"] = Field(
        description="Where the weights shown come from: the chain when it has rows, else the reports."
    )
