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
    norms = torch.stack([t.norm() for t in tensors])
    limit = clip_factor * norms.median()
    total = torch.zeros(shape, dtype=torch.float32)
    for t, norm, w in zip(tensors, norms, weights, strict=True):
        scale = min(1.0, float(limit / norm)) if norm > 0 else 1.0
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
