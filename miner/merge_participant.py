"""The miner's side of a merge: it keeps the start-of-epoch weights and the outer momentum, and does the
three phases the orchestrator hands it (see `orchestrator.stage_merge` for the whole protocol).

Every download is checked against the size and sha256 the orchestrator vouched for, then decoded by the
codec (shape, dtype, finiteness); a participant's slice that fails is reported as a bad source rather than
averaged in. All merge arithmetic is `common.merge`, on the CPU in fp32, so every replica and the
orchestrator get the same bits.
"""

from __future__ import annotations

import logging
import threading

import httpx
import torch

from common.checkpoints import CheckpointError, fetch_state, stage_shapes, start_weights
from common.codec import CodecError, content_hash
from common.merge import (
    decode_slice,
    encode_slice,
    flatten,
    nesterov_step,
    robust_weighted_mean,
    unflatten,
    weights_digest,
)
from common.protocol import (
    ApplyReport,
    ArtifactRef,
    DownloadSource,
    GlobalWeights,
    MergeTask,
    ReducedPartition,
    ReduceReport,
    TrainingSpec,
    UploadReport,
    UploadTarget,
)
from common.storage import StorageError, download_from_url, upload_to_url
from common.training import StageTrainer
from miner.behaviors import BehaviorPolicy

log = logging.getLogger("iota.miner")


class MergeFailed(RuntimeError):
    """This miner cannot do its part of the merge (it will reload the checkpoint afterwards)."""


class Traffic:
    """Bytes this miner moved through the bucket for merging and checkpoints."""

    def __init__(self) -> None:
        self.uploaded = 0
        self.downloaded = 0


class MergeParticipant:
    def __init__(
        self,
        trainer: StageTrainer,
        training: TrainingSpec,
        *,
        hotkey: str,
        http: httpx.Client,
        policy: BehaviorPolicy | None = None,
        traffic: Traffic | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.trainer, self.training, self.hotkey, self.http = trainer, training, hotkey, http
        # A stopping miner's transfers end with `Stopping`, which no handler here takes for a bad source.
        self.stop = stop
        self.policy = policy or BehaviorPolicy()
        self.traffic = traffic or Traffic()
        self.like = trainer.weights()  # names and shapes (values unused)
        self.version = -1
        self.start = flatten(self.like)
        self.momentum: torch.Tensor | None = None
        self.steps_at_start = trainer.steps
        self._pg: torch.Tensor | None = None
        self._reduced: dict[int, tuple[str, torch.Tensor]] = {}

    # -- global weights ------------------------------------------------------------------------------------

    def snapshot(self, version: int, momentum: torch.Tensor | None) -> None:
        """The trainer's current weights become the start of an epoch at global `version`."""
        self.version, self.momentum = version, momentum
        self.start = flatten(self.trainer.weights())
        self.steps_at_start = self.trainer.steps
        self._pg, self._reduced = None, {}

    def load(self, weights: GlobalWeights) -> None:
        """Load a stage's global weights: from the local start-of-epoch copy when it is that version, the
        seeded init at version 0, or the checkpoint."""
        trainer = self.trainer
        if weights.version == self.version:
            trainer.load_weights(unflatten(self.start, self.like))
            self.snapshot(self.version, self.momentum)
            return
        if weights.checkpoint is None:
            if weights.version != 0:
                raise MergeFailed(f"version {weights.version} comes without a checkpoint")
            if self.version != -1 or trainer.steps:  # a fresh trainer already holds the seeded init
                trainer.load_weights(start_weights(trainer.cfg, trainer.stage, weights.seed))
            self.snapshot(0, None)
            return
        shapes = stage_shapes(trainer.cfg, trainer.stage)
        try:
            state = fetch_state(self._transfer, weights.checkpoint.weights, shapes)
            momentum = fetch_state(self._transfer, weights.checkpoint.momentum, shapes)
        except CheckpointError as error:
            raise MergeFailed(str(error)) from error
        trainer.load_weights(state)
        self.snapshot(weights.version, flatten(momentum))
        log.info("loaded the checkpoint of stage %d, version %d", trainer.stage, weights.version)

    # -- the phases ----------------------------------------------------------------------------------------

    def upload(self, task: MergeTask) -> UploadReport:
        """Upload the pseudo-gradient (start-of-epoch weights minus current), one object per partition."""
        if task.version != self.version:
            raise MergeFailed(
                f"the merge starts from version {task.version}; this miner holds {self.version}"
            )
        if len(task.uploads) != len(task.partitions):
            raise MergeFailed("the task names an upload for every partition")
        self.trainer.drop_all()
        self._pg = self.start - flatten(self.trainer.weights())
        parts = []
        for span, target in zip(task.partitions, task.uploads, strict=True):
            parts.append(self._upload(target, encode_slice(self._pg[span.start : span.end])))
        return UploadReport(steps=self.trainer.steps - self.steps_at_start, parts=parts)

    def reduce(self, task: MergeTask) -> ReduceReport:
        """Reduce each assigned partition; a source that is not as announced is reported, not averaged."""
        results, bad = [], set()
        for job in task.reduce:
            span = task.partitions[job.partition]
            numel = span.end - span.start
            slices, work = {}, {}
            for src in job.sources:
                own = src.hotkey == self.hotkey and self._pg is not None
                if own:
                    assert self._pg is not None
                    values: torch.Tensor | None = self._pg[span.start : span.end].clone()
                else:
                    values = self._fetch(src.source, numel)
                if values is None:
                    bad.add(src.hotkey)
                    continue
                slices[src.hotkey], work[src.hotkey] = values, src.work
            if any(src.hotkey in bad for src in job.sources):
                continue
            mean = self.policy.reduced(robust_weighted_mean(slices, work, clip_factor=task.clip_factor))
            ref = self._upload(job.output, encode_slice(mean))
            self._reduced[job.partition] = (ref.sha256, mean)
            results.append(ReducedPartition(partition=job.partition, output=ref))
        return ReduceReport(results=results, bad_sources=sorted(bad))

    def apply(self, task: MergeTask) -> ApplyReport:
        """The outer Nesterov step from the start-of-epoch weights with the merged pseudo-gradient."""
        if task.version != self.version:
            raise MergeFailed(
                f"the merge starts from version {task.version}; this miner holds {self.version}"
            )
        pieces = []
        for span, part in zip(task.partitions, task.merged, strict=True):
            numel = span.end - span.start
            mine = self._reduced.get(part.partition)
            if part.source is None:
                if mine is None or mine[0] != part.sha256:
                    raise MergeFailed(f"partition {part.partition} has no source and this miner has no copy")
                pieces.append(mine[1])
                continue
            values = self._fetch(part.source, numel)
            if values is None:
                raise MergeFailed(f"merged partition {part.partition} is not what the orchestrator announced")
            pieces.append(values)
        merged = torch.cat(pieces)
        new, buf = nesterov_step(
            self.start, merged, self.momentum, lr=self.training.outer_lr, mu=self.training.outer_momentum
        )
        self.trainer.assign_weights(unflatten(new, self.like))
        self.snapshot(task.version + 1, buf)
        return ApplyReport(version=self.version, weights_sha256=weights_digest(new))

    # -- transfers -----------------------------------------------------------------------------------------

    def _upload(self, target: UploadTarget, data: bytes) -> ArtifactRef:
        upload_to_url(target.url, data, client=self.http, stop=self.stop)
        self.traffic.uploaded += len(data)
        return ArtifactRef(key=target.key, size=len(data), sha256=content_hash(data))

    def _transfer(self, source: DownloadSource) -> bytes:
        data = download_from_url(source.url, max_bytes=source.size, client=self.http, stop=self.stop)
        self.traffic.downloaded += len(data)
        return data

    def _download(self, source: DownloadSource) -> bytes:
        data = self._transfer(source)
        if len(data) != source.size or content_hash(data) != source.sha256:
            raise MergeFailed(f"{source.key} is not the object the orchestrator announced")
        return data

    def _fetch(self, source: DownloadSource, numel: int) -> torch.Tensor | None:
        """A slice, or None if it is missing, not as announced, or not `numel` finite fp32 values."""
        try:
            return decode_slice(self._download(source), numel)
        except (MergeFailed, StorageError, CodecError) as error:
            log.warning("merge input %s refused: %s", source.key, error)
            return None
