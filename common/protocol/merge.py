"""Merging: a stage's merge task for one miner, its reports, the public record of what a merge did, and the
stored checkpoints (see common.merge for the arithmetic and orchestrator.stage_merge for the state
machine)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from common.protocol.registration import DataSpec
from common.protocol.wire import (
    ArtifactRef,
    DownloadSource,
    SessionRequest,
    Sha256Hex,
    UploadTarget,
    _Message,
)

MergePhase = Literal["upload", "reduce", "apply"]


class PartitionSpan(_Message):
    """Values [start, end) of the stage's flattened weights (parameters in name order)."""

    index: int = Field(ge=0)
    start: int = Field(ge=0)
    end: int = Field(ge=0)


class ReduceSource(_Message):
    """One participant's slice of a partition, and the weight its validated work earns it."""

    hotkey: str
    work: float
    source: DownloadSource


class ReduceJob(_Message):
    """Reduce one partition: the clipped, work-weighted mean of every participant's slice (yours is listed
    too; skip downloading it if you still hold it)."""

    partition: int
    sources: list[ReduceSource]
    output: UploadTarget


class MergedPartition(_Message):
    """The agreed mean of one partition (`source`), or None where you reduced it and your result agreed."""

    partition: int
    sha256: str
    source: DownloadSource | None = None


class MergeTask(_Message):
    """One phase of a stage's merge, for one miner.

    - upload: upload your pseudo-gradient (start-of-epoch weights minus current), one object per partition.
    - reduce: run the `reduce` jobs and upload each result.
    - apply: download the merged partitions, take the outer Nesterov step from the start-of-epoch weights
      to version `version + 1`, and report the digest of the new weights.

    A merge that cannot complete sends no task: its participants get a `reload` of the unchanged version,
    which they serve from their own start-of-epoch copy.
    """

    epoch: int
    stage: int
    phase: MergePhase
    version: int = Field(description="The global version the merge starts from.")
    partitions: list[PartitionSpan]
    clip_factor: float
    uploads: list[UploadTarget] = Field(default_factory=list)
    reduce: list[ReduceJob] = Field(default_factory=list)
    merged: list[MergedPartition] = Field(default_factory=list)
    deadline_in_s: float


def _phase_required(schema: dict[str, Any]) -> None:
    # `phase` tells the reports apart (MergeReportRequest.report): it has a default for Python callers, but
    # a body without it cannot be parsed, so the schema says it is required.
    schema["required"] = sorted({*schema.get("required", []), "phase"})


class UploadReport(_Message):
    model_config = ConfigDict(json_schema_extra=_phase_required)
    phase: Literal["upload"] = "upload"
    steps: int = Field(ge=0, le=10**9, description="Optimizer steps taken since the start-of-epoch weights.")
    parts: list[ArtifactRef] = Field(max_length=4096)


class ReducedPartition(_Message):
    partition: int = Field(ge=0)
    output: ArtifactRef


class ReduceReport(_Message):
    model_config = ConfigDict(json_schema_extra=_phase_required)
    phase: Literal["reduce"] = "reduce"
    results: list[ReducedPartition] = Field(default_factory=list, max_length=4096)
    bad_sources: list[str] = Field(
        default_factory=list, max_length=4096, description="Participants whose slice was not as announced."
    )


class ApplyReport(_Message):
    model_config = ConfigDict(json_schema_extra=_phase_required)
    phase: Literal["apply"] = "apply"
    version: int = Field(ge=1)
    weights_sha256: Sha256Hex = Field(description="`common.merge.weights_digest` of the new weights.")


class MergeReportRequest(SessionRequest):
    epoch: int = Field(ge=0)
    stage: int = Field(ge=0)
    report: Annotated[UploadReport | ReduceReport | ApplyReport, Field(discriminator="phase")]


class MergeFlag(_Message):
    hotkey: str
    reason: str


class MergeRecord(_Message):
    """What one stage's merge did; public, so that anyone can audit who contributed and who was caught."""

    epoch: int
    stage: int
    outcome: Literal["merged", "rolled_back"]
    version: int = Field(description="The stage's global version after the merge.")
    participants: dict[str, float] = Field(description="Hotkey to the work weight its pseudo-gradient had.")
    excluded: dict[str, str] = Field(
        description="Hotkey to why a miner of the stage was left out (inactive, idle, dead, late, bad data)."
    )
    in_sync: list[str] = Field(description="Miners that reported the new weights; the rest reload them.")
    flagged: list[MergeFlag]
    partitions: int
    settled: int = Field(description="Partitions the orchestrator recomputed (disagreement or no reducer).")
    reduced: dict[str, int] = Field(
        default_factory=dict, description="Hotkey to the partitions it reduced whose result the merge used."
    )
    weights_sha256: str | None
    started_at: float
    finished_at: float


class StageCheckpoint(_Message):
    stage: int
    version: int
    weights: ArtifactRef
    momentum: ArtifactRef


class CheckpointManifest(_Message):
    """`runs/<run>/checkpoints/manifest.json`, rewritten by the orchestrator after every epoch's merges:
    everything `iota export` needs to assemble the model from the bucket alone."""

    run_id: str
    epoch: int = Field(description="Epochs completed when it was written.")
    model: dict[str, Any] = Field(description="`ModelConfig.to_dict()` of the run's model.")
    seed: int
    data: DataSpec
    stages: list[StageCheckpoint | None] = Field(
        description="Each stage's latest checkpoint; None for a stage never merged (its seeded init)."
    )
