"""The orchestrator's own part of a merge: settle what the reducers did not agree on, take the outer step,
and store the checkpoint. Blocking (S3 transfers and tensor arithmetic): the service runs it in a thread."""

from __future__ import annotations

import torch

from common.checkpoints import StoredCheckpoint, read_checkpoint, stage_shapes, start_weights
from common.codec import CodecError, content_hash
from common.merge import (
    decode_slice,
    encode_slice,
    encode_state,
    flatten,
    nesterov_step,
    robust_weighted_mean,
    unflatten,
    weights_digest,
)
from common.model import ModelConfig
from common.protocol import ArtifactRef, MergeFlag
from common.storage import ObjectStore
from orchestrator.stage_merge import FinalizeJob, FinalizeResult

# A reducer whose result differs in bits but lies this close to the orchestrator's is honest: float sums
# in another order (another CPU's vector width) round differently. Anything further is a wrong partition.
RTOL, ATOL = 1e-5, 1e-8


def fetch_slice(store: ObjectStore, ref: ArtifactRef, numel: int) -> torch.Tensor | None:
    """The slice behind `ref`, or None if the object is missing, is not what `ref` says, or is not a
    finite fp32 vector of `numel` values."""
    data = store.get_verified(ref.key, ref.size, ref.sha256)
    if data is None:
        return None
    try:
        return decode_slice(data, numel)
    except CodecError:
        return None


def run_finalize(
    job: FinalizeJob,
    *,
    store: ObjectStore,
    cfg: ModelConfig,
    seed: int,
    previous: StoredCheckpoint | None,
    clip_factor: float,
    outer_lr: float,
    outer_momentum: float,
) -> FinalizeResult:
    s = job.state
    result = FinalizeResult()
    merged: dict[int, torch.Tensor] = {}
    recompute = list(job.recompute)
    for p, candidates in sorted(job.agreed.items()):
        numel = s.partitions[p].end - s.partitions[p].start
        for ref in candidates:
            values = fetch_slice(store, ref, numel)
            if values is not None:
                merged[p], result.canonical[p] = values, ref
                break
        else:
            recompute.append(p)

    for p in sorted(recompute):
        span = s.partitions[p]
        slices = {}
        for h in job.members:
            values = fetch_slice(store, s.pg[h][p], span.end - span.start)
            if values is None:
                result.bad_participants[h] = f"its pseudo-gradient partition {p} is not what it announced"
            else:
                slices[h] = values
        if result.bad_participants:
            continue
        mean = robust_weighted_mean(slices, job.members, clip_factor=clip_factor)
        merged[p] = mean
        result.canonical[p] = _settle(store, job, p, mean, result.flags)
        result.settled.append(p)
    if result.bad_participants:
        return result  # the merge starts its reduce phase again without them

    if previous is None:
        start = start_weights(cfg, s.stage, seed)
        momentum = None
    else:
        start, mom = read_checkpoint(store, previous, stage_shapes(cfg, s.stage))
        momentum = flatten(mom)
    pseudo_grad = torch.cat([merged[p.index] for p in s.partitions])
    new, buf = nesterov_step(flatten(start), pseudo_grad, momentum, lr=outer_lr, mu=outer_momentum)
    refs = []
    for key, flat in zip(job.checkpoint_keys, (new, buf), strict=True):
        data = encode_state(unflatten(flat, start))
        store.put_bytes(key, data)
        refs.append(ArtifactRef(key=key, size=len(data), sha256=content_hash(data)))
    result.checkpoint = StoredCheckpoint(
        version=s.version + 1, weights=refs[0], momentum=refs[1], digest=weights_digest(new)
    )
    return result


def _settle(
    store: ObjectStore, job: FinalizeJob, p: int, mean: torch.Tensor, flags: list[MergeFlag]
) -> ArtifactRef:
    """The canonical object for a partition the orchestrator recomputed; flags reducers that were wrong."""
    s = job.state
    data = encode_slice(mean)
    digest = content_hash(data)
    canonical = None
    for h, ref in sorted(s.results.get(p, {}).items()):
        if ref.sha256 == digest and fetch_slice(store, ref, mean.numel()) is not None:
            canonical = canonical or ref
            continue
        theirs = fetch_slice(store, ref, mean.numel())
        if theirs is None or not torch.allclose(theirs, mean, rtol=RTOL, atol=ATOL):
            flags.append(MergeFlag(hotkey=h, reason=f"uploaded a wrong result for partition {p}"))
    if canonical is None:
        key = job.settled_keys[p]
        store.put_bytes(key, data)
        canonical = ArtifactRef(key=key, size=len(data), sha256=digest)
    return canonical
