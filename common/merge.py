"""The arithmetic of a merge (DiLoCo-style Butterfly All-Reduce), as pure functions.

Miners acting as reducers, the orchestrator settling disagreements and validators replaying a merge all
call these, so every party computes the same bits: participants are always taken in hotkey order, and
every reduction runs in fp32 on the CPU in that order.

- A stage's weights flatten (by parameter name) into one fp32 vector, cut into contiguous partitions.
- Each partition goes to `redundancy` reducers, spread so that no participant reduces much more than
  another; the orchestrator compares the reducers' results.
- A reducer clips each participant's slice of the pseudo-gradient to a multiple of the median norm (one
  participant cannot drag the mean), then takes the mean weighted by validated work.
- Every replica applies the same outer Nesterov step to the start-of-epoch weights.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from common.codec import TensorSpec, decode_tensor, decode_tensors, encode_tensor, encode_tensors

_HEADER_ROOM = 64 * 1024  # the codec's and safetensors' headers on top of the values


@dataclass(frozen=True)
class Partition:
    index: int
    start: int
    end: int

    @property
    def numel(self) -> int:
        return self.end - self.start


def flatten(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The weights as one fp32 CPU vector, parameters in name order."""
    return torch.cat(
        [weights[name].detach().to("cpu", torch.float32).reshape(-1) for name in sorted(weights)]
    )


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `flatten`, shaped and typed as `like`."""
    total = sum(t.numel() for t in like.values())
    if flat.numel() != total:
        raise ValueError(f"vector has {flat.numel()} values; the weights need {total}")
    out, offset = {}, 0
    for name in sorted(like):
        ref = like[name]
        out[name] = flat[offset : offset + ref.numel()].reshape(ref.shape).to(ref.dtype).clone()
        offset += ref.numel()
    return out


def partitions(numel: int, count: int) -> list[Partition]:
    """`numel` values cut into `count` contiguous partitions whose sizes differ by at most one."""
    if not 1 <= count <= max(1, numel):
        raise ValueError(f"cannot cut {numel} values into {count} partitions")
    base, extra = divmod(numel, count)
    bounds, start = [], 0
    for i in range(count):
        end = start + base + (1 if i < extra else 0)
        bounds.append(Partition(i, start, end))
        start = end
    return bounds


def assign_reducers(
    n_partitions: int, participants: Sequence[str], *, redundancy: int = 2, seed: str = ""
) -> dict[int, list[str]]:
    """Each partition's `redundancy` distinct reducers, spread evenly and varied by `seed` (say, the epoch),
    so that which two miners check each other changes from merge to merge."""
    members = sorted(set(participants))
    if len(members) < redundancy:
        raise ValueError(f"{len(members)} participants cannot give each partition {redundancy} reducers")
    digest = hashlib.sha256(f"reducers:{seed}".encode()).digest()
    shift = int.from_bytes(digest[:8], "little") % len(members)
    # The reducers of a partition sit evenly round the ring (two: half-way round), so they are never
    # neighbours; (redundancy - 1) * step < len(members) keeps them distinct.
    step = len(members) // redundancy
    plan = {}
    for p in range(n_partitions):
        first = (p + shift) % len(members)
        plan[p] = [members[(first + k * step) % len(members)] for k in range(redundancy)]
    return plan


def robust_weighted_mean(
    slices: Mapping[str, torch.Tensor], work: Mapping[str, float], *, clip_factor: float = 2.0
) -> torch.Tensor:
    """The work-weighted mean of the participants' slices, each first clipped to `clip_factor` times
    the median slice norm. Deterministic: participants in hotkey order, fp32 on the CPU."""
    if not slices:
        raise ValueError("no participants")
    names = sorted(slices)
    if set(names) != set(work):
        raise ValueError("every participant needs a work weight, and only participants")
    weights = [float(work[n]) for n in names]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("work weights must be finite, non-negative and not all zero")
    tensors = [slices[n].to("cpu", torch.float32) for n in names]
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        raise ValueError("participants' slices differ in shape")
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError("a participant's slice has NaN or Inf")
    # Norms are reductions, whose last bits depend on thread count and memory alignment; in float64 those
    # differences stay far below fp32 resolution, so reducers on different machines still agree bit for bit.
    norms = [float(torch.linalg.vector_norm(t, dtype=torch.float64)) for t in tensors]
    limit = clip_factor * sorted(norms)[(len(norms) - 1) // 2]  # the lower median
    total = torch.zeros(shape, dtype=torch.float32)
    for t, norm, w in zip(tensors, norms, weights, strict=True):
        scale = min(1.0, limit / norm) if norm > 0 else 1.0
        total += t * (scale * w)
    return total / sum(weights)


def nesterov_step(
    start: torch.Tensor, pseudo_grad: torch.Tensor, momentum: torch.Tensor | None, *, lr: float, mu: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The outer step on the start-of-epoch weights: buf = mu * buf + g; w = start - lr * (g + mu * buf).

    `pseudo_grad` is start-of-epoch weights minus trained weights (averaged), so lr=1, mu=0 lands exactly on
    the average of the replicas. Returns the new weights and the new momentum buffer.
    """
    if start.shape != pseudo_grad.shape:
        raise ValueError("weights and pseudo-gradient differ in shape")
    buf = pseudo_grad.clone() if momentum is None else momentum * mu + pseudo_grad
    return start - lr * (pseudo_grad + mu * buf), buf


# ---------------------------------------------------------------------------------------------------------
# Wire forms: partitions and checkpoints travel in the codec's format (bounded, checked, never unpickled).


def weights_digest(flat: torch.Tensor) -> str:
    """SHA-256 of a flattened fp32 weight vector: replicas that hold the same bits report the same digest."""
    return hashlib.sha256(flat.to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def slice_limit(numel: int) -> int:
    """The most bytes an encoded slice of `numel` fp32 values may take."""
    return numel * 4 + _HEADER_ROOM


def encode_slice(values: torch.Tensor) -> bytes:
    return encode_tensor(values.detach().to("cpu", torch.float32).contiguous())


def decode_slice(data: bytes, numel: int) -> torch.Tensor:
    """A 1-D fp32 slice of exactly `numel` finite values; raises CodecError otherwise."""
    return decode_tensor(
        data, TensorSpec(shape=(numel,), dtype="float32"), max_bytes=slice_limit(numel), max_abs=None
    )


def state_limit(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values()) * 4 + _HEADER_ROOM + 256 * len(shapes)


def encode_state(state: Mapping[str, torch.Tensor]) -> bytes:
    return encode_tensors({n: t.detach().to("cpu", torch.float32).contiguous() for n, t in state.items()})


def decode_state(data: bytes, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A stage state dict of exactly these names and shapes, fp32 and finite, or CodecError."""
    spec = {n: TensorSpec(shape=tuple(s), dtype="float32") for n, s in shapes.items()}
    return decode_tensors(data, spec, max_bytes=state_limit(shapes), max_abs=None)
