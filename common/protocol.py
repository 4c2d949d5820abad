"""The orchestrator's HTTP protocol: every message that crosses a process, in one place.

Both the orchestrator's routes and the miners' client import these models, so a field can change in only
one place. Every request body is signed (Epistula, see `common.auth`); every request after registration
carries the run id and the session it was given, so that a client talking to a restarted or re-created
orchestrator finds out at once and re-syncs instead of acting on stale state.

Units: sizes in bytes, times in seconds, sample ids as in `common.data`.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from common.data import SampleId

PROTOCOL_VERSION = 1
# Sent on every request and response. A client whose version differs from the server's gets 426 and a
# reason; a server answers with its own version and run id so that clients can tell what they talk to.
HEADER_PROTOCOL = "Iota-Protocol"
HEADER_RUN = "Iota-Run"

MAX_REASON_CHARS = 500
MAX_LOSS = 100.0  # A per-token cross-entropy above this is a lie or a broken model; ln(128256) is 11.8.
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Uids as JSON object keys (strings): 0 to 65535, no sign, no leading zeros.
_UID_KEY = "^(0|[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"


def _sha256_hex(value: str) -> str:
    if not _SHA256_HEX.fullmatch(value):
        raise ValueError("must be a lowercase hex sha256 digest (64 characters)")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be finite")
    return value


# The schema states what the validators check, so that a client (or a fuzzer) that follows it is accepted.
Sha256Hex = Annotated[
    str, AfterValidator(_sha256_hex), WithJsonSchema({"type": "string", "pattern": "^[0-9a-f]{64}$"})
]
FiniteFloat = Annotated[float, AfterValidator(_finite)]


class _Message(BaseModel):
    # Unknown fields are refused, so a typo or a field from another version fails loudly.
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------------------
# Objects in the bucket


class ArtifactRef(_Message):
    """An uploaded object as its producer announced it: the orchestrator checks all three before accepting."""

    key: str = Field(min_length=1, max_length=512)
    size: int = Field(ge=1)
    sha256: Sha256Hex


class UploadTarget(_Message):
    """A presigned PUT for exactly one key, chosen by the orchestrator under the caller's own prefix."""

    key: str
    url: str
    expires_in_s: int


class DownloadSource(_Message):
    """A presigned GET plus what the downloaded bytes must be; the receiver checks size and hash."""

    key: str
    url: str
    size: int
    sha256: str


# ---------------------------------------------------------------------------------------------------------
# Registration


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


# ---------------------------------------------------------------------------------------------------------
# Work


class SessionRequest(_Message):
    """Fields every request after registration carries."""

    run_id: str = Field(max_length=64)
    session: int = Field(ge=0)


class WorkRequest(SessionRequest):
    wait_s: float = Field(0.0, ge=0, le=60, description="Hold the request open this long for work.")


ItemKind = Literal["forward", "backward"]


class WorkItem(_Message):
    """One hop of one sample at one stage.

    - forward at the head: `samples` names the token sequences; output is the activation.
    - forward elsewhere: `input` is the previous stage's activation and `samples` the token sequences, which
      the stage embeds again (`ModelConfig.token_dim`); output is the activation, except at the tail, which
      also computes the loss against the tokens, runs backward at once, and uploads the gradient with
      respect to its input.
    - backward: `input` is the gradient from the next stage; it goes to the miner that ran the forward of
      `forward_item`; output is the gradient with respect to its input (none at the head).
    """

    item_id: str
    kind: ItemKind
    sample: int
    attempt: int
    stage: int
    forward_item: str | None = None
    samples: list[SampleId] | None = None
    input: DownloadSource | None = None
    output: UploadTarget | None = None
    deadline_in_s: float


class WorkResponse(_Message):
    item: WorkItem | None = None
    cancelled: list[str] = Field(
        default_factory=list, description="Forward items whose saved state the miner should drop."
    )
    move_to_stage: int | None = Field(
        None, description="Set when the orchestrator moves this miner; it must register again."
    )
    merge: MergeTask | None = Field(None, description="A step of the current merge for this miner to do.")
    reload: GlobalWeights | None = Field(
        None, description="Load these global weights before more work (a merge finished without you)."
    )


class CompleteRequest(SessionRequest):
    item_id: str = Field(max_length=128)
    output: ArtifactRef | None = None
    # Bounds before the finiteness check: after it, pydantic leaves them out of the schema (as "ge", "le").
    loss: Annotated[float, Field(ge=0, le=MAX_LOSS), AfterValidator(_finite)] | None = Field(
        None, description="The tail's mean loss."
    )
    compute_s: FiniteFloat = Field(0.0, ge=0, le=86400)


class CompleteResponse(_Message):
    sample_completed: bool = False


class FailRequest(SessionRequest):
    """A miner giving up on an item: its own fault, or a bad input from the stage before (`blame_input`)."""

    item_id: str = Field(max_length=128)
    reason: str = Field(max_length=MAX_REASON_CHARS)
    blame_input: bool = False


class PresignRequest(SessionRequest):
    """A fresh upload URL for a key the caller owns (for example after the first one expired)."""

    key: str = Field(min_length=1, max_length=512)


class Ack(_Message):
    ok: bool = True


# ---------------------------------------------------------------------------------------------------------
# Merging (see common.merge for the arithmetic and orchestrator.merging for the state machine)

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


# ---------------------------------------------------------------------------------------------------------
# Validation (see validator/ for the replay, CLASP and scoring)

ReplayKind = Literal["forward", "backward", "tail"]
CheckKind = Literal["forward", "backward", "tail_grad", "loss", "pseudo_gradient", "steps"]


class ValidatorRegisterRequest(_Message):
    """A validator announcing itself; the hotkey that signed it needs a validator permit and stake."""

    device: str = Field(max_length=64)
    corpus_fingerprint: str = Field(max_length=128)


class ValidatorRegisterResponse(_Message):
    run_id: str
    model: dict[str, Any] = Field(description="`ModelConfig.to_dict()` of the run's model.")
    data: DataSpec
    training: TrainingSpec
    seed: int
    poll_wait_s: float


class ReplayOp(_Message):
    """One accepted item of the shadowed miner, in the order the miner completed them.

    - forward: `input` is the activation it received (None at the head), `samples` names the tokens;
      `output` is what it uploaded. `backward_follows` says whether its backward comes later in the list
      (otherwise the miner dropped its saved state when the attempt was cancelled).
    - tail: the last stage's forward+loss+backward: `input` activation, `samples` tokens, `loss` reported,
      `output` the gradient it uploaded. One optimizer step.
    - backward: `input` is the gradient it received for `forward_item`; `output` the gradient it uploaded
      (None at the head). One optimizer step.
    """

    item_id: str
    kind: ReplayKind
    forward_item: str | None = None
    samples: list[SampleId] | None = None
    input: DownloadSource | None = None
    output: DownloadSource | None = None
    loss: float | None = None
    backward_follows: bool = False


class ValidationTask(_Message):
    """Replay one miner's epoch: from the stage's start-of-epoch global weights and a fresh inner AdamW,
    every op in order, then compare the pseudo-gradient it uploaded for the merge (if it uploaded one)."""

    task_id: str
    epoch: int
    stage: int
    miner: str
    device: str = Field(description="The device the miner registered with (cpu, cuda).")
    weights: GlobalWeights
    ops: list[ReplayOp]
    partitions: list[PartitionSpan] = Field(default_factory=list)
    pseudo_gradient: list[DownloadSource] = Field(default_factory=list)
    claimed_steps: int | None = None
    deadline_in_s: float


class ValidatorTaskRequest(_Message):
    run_id: str = Field(max_length=64)
    wait_s: float = Field(0.0, ge=0, le=60)


class ValidatorTaskResponse(_Message):
    task: ValidationTask | None = None


class ReplayVerdict(_Message):
    """What a replay found. `worst` holds the largest error of each kind of check (relative L2 error for
    tensors, absolute difference for losses, count difference for steps)."""

    passed: bool
    ops: int = Field(ge=0, description="Ops replayed.")
    checks: int = Field(ge=0, description="Comparisons made.")
    worst: dict[CheckKind, FiniteFloat] = Field(default_factory=dict)
    failure: str | None = Field(None, max_length=MAX_REASON_CHARS)
    replay_s: FiniteFloat = Field(0.0, ge=0)
    horizon: int | None = Field(
        None, ge=0, description="Optimizer steps the replay checked up to (cross-regime replay); None: all."
    )


class VerdictRequest(_Message):
    run_id: str = Field(max_length=64)
    task_id: str = Field(max_length=128)
    verdict: ReplayVerdict


class MinerEpochWork(_Message):
    """One miner's accepted work in one epoch, as the orchestrator recorded it."""

    hotkey: str
    stage: int
    items: int = Field(
        description="Passes accepted: 1 per forward or backward item, 2 per tail item (forward and backward)."
    )
    partitions: int = Field(description="Partitions it reduced whose result the merge used.")
    merged: bool = Field(description="Its pseudo-gradient entered the merge.")
    flags: list[str] = Field(description="Why the merge flagged it (wrong partition, wrong weights, ...).")


class VerdictRecord(_Message):
    task_id: str
    validator: str
    miner: str
    epoch: int
    stage: int
    verdict: ReplayVerdict
    at: float


class EpochLedger(_Message):
    """Everything scores are computed from, per finished epoch; public so that anyone can audit weights."""

    epoch: int
    finished_at: float
    miners: list[MinerEpochWork]
    verdicts: list[VerdictRecord]


# A subnet has at most a few thousand hotkeys; a report naming more is refused rather than stored.
MAX_SCORE_ENTRIES = 4096
Hotkey = Annotated[str, Field(min_length=1, max_length=64)]
Uid = Annotated[int, Field(ge=0, le=65535)]
NonNegativeFloat = Annotated[float, Field(ge=0), AfterValidator(_finite)]


class MinerScoreEntry(_Message):
    """One miner's score in one validator's round (see `validator.scoring`)."""

    score: NonNegativeFloat
    penalized: bool = Field(False, description="A failed replay or a merge flag inside the score window.")
    flagged: bool = Field(False, description="CLASP found its losses harmful this round.")


class ScoresReport(_Message):
    """A validator's latest scoring round, posted after it set those weights on the chain. The
    orchestrator only displays it (the dashboard); weights take effect through the chain alone."""

    run_id: str = Field(max_length=64)
    epoch: int = Field(ge=0, description="The latest finished epoch the round scored.")
    at: NonNegativeFloat = Field(description="When the round was computed (unix seconds).")
    scores: dict[Hotkey, MinerScoreEntry] = Field(max_length=MAX_SCORE_ENTRIES)
    weights: dict[Uid, NonNegativeFloat] = Field(
        max_length=MAX_SCORE_ENTRIES,
        description="uid -> weight, as set on the chain (summing to 1).",
        # JSON keys are strings: the schema says which ones parse as a uid (pydantic leaves that out).
        json_schema_extra={"propertyNames": {"pattern": _UID_KEY}},
    )


# ---------------------------------------------------------------------------------------------------------
# Public, read-only status


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


# ---------------------------------------------------------------------------------------------------------
# The dashboard (GET /v1/dashboard): public and read-only, like /v1/status, which it embeds


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


class ErrorBody(_Message):
    """The body of every 4xx/5xx: a stable machine-readable code and a reason for humans."""

    code: str
    detail: str


WorkResponse.model_rebuild()
