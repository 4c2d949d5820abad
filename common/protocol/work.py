"""Work: a miner's long poll for an item, and its report of the item done or given up."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from common.data import SampleId
from common.protocol.merge import MergeTask
from common.protocol.registration import GlobalWeights
from common.protocol.wire import (
    MAX_LOSS,
    MAX_REASON_CHARS,
    ArtifactRef,
    DownloadSource,
    FiniteFloat,
    SessionRequest,
    UploadTarget,
    _finite,
    _Message,
)


class WorkRequest(SessionRequest):
    wait_s: float = Field(0.0, ge=0, le=60, description="Hold the request open this long for work.")


ItemKind = Literal["forward", "backward"]
# What an item does, which the wire's `kind` and `stage` say together: the tail is a forward at the last
# stage, which also computes the loss and runs its own backward at once (one optimizer step, no backward
# item, no forward state kept). Metrics, replays and the scheduler's rules all turn on it.
WorkKind = Literal["forward", "backward", "tail"]


def is_last_stage(stage: int, n_stages: int) -> bool:
    return stage == n_stages - 1


def work_kind(kind: ItemKind, stage: int, n_stages: int) -> WorkKind:
    """forward, backward, or tail (the last stage's combined forward, loss and backward)."""
    return "tail" if kind == "forward" and is_last_stage(stage, n_stages) else kind


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
