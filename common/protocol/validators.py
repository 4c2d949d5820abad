"""Validation: a validator's registration, its replay tasks and verdicts, the per-epoch ledger scores come
from, and its scores report (see validator/ for the replay, CLASP and scoring)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from common.data import SampleId
from common.protocol.merge import PartitionSpan
from common.protocol.registration import DataSpec, GlobalWeights, TrainingSpec
from common.protocol.wire import MAX_REASON_CHARS, DownloadSource, FiniteFloat, _finite, _Message
from common.protocol.work import WorkKind

# Uids as JSON object keys (strings): 0 to 65535, no sign, no leading zeros.
_UID_KEY = "^(0|[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"


ReplayKind = WorkKind  # a replay redoes one item, of the kind it was
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
