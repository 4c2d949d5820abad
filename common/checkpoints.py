"""A stage's weights at version v: the seeded init at version 0, after that the checkpoint of merge v.

Every role meets these weights: the orchestrator's finalize job takes the outer step from them and stores
the next version, the orchestrator hands them out (`GlobalWeights`) to miners that join or reload and to
validators in a replay task, a miner loads them, a validator replays an epoch from them, and `iota export`
assembles the model from the manifest that names each stage's latest. This module is their one home: the
stage's names and shapes, the seeded init, where a checkpoint is stored and what the orchestrator records
of it, the messages that announce it, and reading it back.

Reading is always bounded and checked: an object is refused before the download if it claims more bytes
than the stage can take, then unless it is exactly the size and sha256 that were announced (the bucket is
shared, and a presigned PUT cannot pin the content), then unless it decodes to exactly the stage's names
and shapes, fp32 and finite (`common.merge.decode_state`, never unpickled).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from common.codec import CodecError, content_hash
from common.merge import decode_state, state_limit
from common.model import ModelConfig
from common.model.stages import build_stage
from common.protocol import ArtifactRef, Checkpoint, DownloadSource, GlobalWeights, StageCheckpoint

if TYPE_CHECKING:
    from common.storage import ObjectStore

Shapes = Mapping[str, tuple[int, ...]]


class CheckpointError(RuntimeError):
    """A checkpoint object is too large for the stage, missing, not the object announced, or not the
    stage's weights. The message names the object's key."""


def stage_shapes(cfg: ModelConfig, stage: int) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the stage's state dict (built on meta: no memory, no init)."""
    module = build_stage(cfg, stage, device="meta")
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def start_weights(cfg: ModelConfig, stage: int, seed: int) -> dict[str, torch.Tensor]:
    """Version 0 of the stage: the seeded init that every replica draws alike, on the CPU."""
    return build_stage(cfg, stage, seed, "cpu").state_dict()


# ---------------------------------------------------------------------------------------------------------
# Where a checkpoint is stored, and the orchestrator's record of it


class StoredCheckpoint(BaseModel):
    """The orchestrator's record of the checkpoint it stored for one stage at `version`."""

    model_config = ConfigDict(extra="forbid")

    version: int
    weights: ArtifactRef
    momentum: ArtifactRef
    digest: str = Field(description="`weights_digest` of the flattened weights.")

    def manifest_entry(self, stage: int) -> StageCheckpoint:
        return StageCheckpoint(
            stage=stage, version=self.version, weights=self.weights, momentum=self.momentum
        )


def checkpoint_keys(run_id: str, stage: int, version: int) -> tuple[str, str]:
    """The keys of the stage's weights and outer momentum at `version`."""
    base = f"runs/{run_id}/checkpoints/s{stage}/v{version}"
    return f"{base}/weights.iotc", f"{base}/momentum.iotc"


def manifest_key(run_id: str) -> str:
    """The key of the run's `CheckpointManifest`, which names each stage's latest checkpoint."""
    return f"runs/{run_id}/checkpoints/manifest.json"


def global_weights(
    version: int,
    seed: int,
    stored: StoredCheckpoint | None,
    download_source: Callable[[ArtifactRef], DownloadSource],
) -> GlobalWeights:
    """The message announcing a stage's weights at `version`: the seed alone at version 0 (no checkpoint
    stored), else presigned downloads of the stored checkpoint."""
    checkpoint = None
    if stored is not None:
        checkpoint = Checkpoint(
            weights=download_source(stored.weights), momentum=download_source(stored.momentum)
        )
    return GlobalWeights(version=version, seed=seed, checkpoint=checkpoint)


# ---------------------------------------------------------------------------------------------------------
# Reading a checkpoint back


class Announced(Protocol):
    """What an object's producer announced: an `ArtifactRef` or a `DownloadSource`."""

    @property
    def key(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str: ...


R = TypeVar("R", bound=Announced)


def fetch_state(fetch: Callable[[R], bytes | None], ref: R, shapes: Shapes) -> dict[str, torch.Tensor]:
    """The stage state dict behind `ref`, or CheckpointError. `fetch` downloads the object (None if it is
    missing); it is called only once `ref`'s size fits the stage, and its own errors propagate."""
    if ref.size > state_limit(shapes):
        raise CheckpointError(
            f"checkpoint object {ref.key} claims {ref.size} bytes, more than the stage can take"
        )
    data = fetch(ref)
    if data is None or len(data) != ref.size or content_hash(data) != ref.sha256:
        raise CheckpointError(
            f"checkpoint object {ref.key} is missing, or not the {ref.size} bytes and sha256 announced"
        )
    try:
        return decode_state(data, shapes)
    except CodecError as error:
        raise CheckpointError(f"checkpoint object {ref.key} is not the stage's weights: {error}") from error


def read_state(store: ObjectStore, ref: ArtifactRef, shapes: Shapes) -> dict[str, torch.Tensor]:
    """`fetch_state` from the bucket itself (the orchestrator, `iota export`); StorageError propagates."""
    return fetch_state(lambda r: store.get_exact(r.key, r.size), ref, shapes)


def read_checkpoint(
    store: ObjectStore, stored: StoredCheckpoint, shapes: Shapes
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A stored checkpoint's weights and outer momentum, from the bucket."""
    return read_state(store, stored.weights, shapes), read_state(store, stored.momentum, shapes)
