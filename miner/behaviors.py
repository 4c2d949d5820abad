"""Deliberate misbehaviour for tests and the devnet: what a dishonest miner sends instead of its work.

A policy rewrites only what leaves the miner; skipping the work itself (zero-grad) is `MinerTrainer`'s part
(`miner.trainer`), through `takes_step`; the honest compute (`common.training`) knows nothing of these.
The tail's loss stays honest under every behaviour: lying about the loss is a separate attack.

- `honest`: sends what it computed.
- `random-output`: forward outputs become Gaussian noise with the honest output's shape, dtype, mean and
  std, seeded from the item id so a replay reproduces it; backward is honest (given the gradient it gets).
- `scaled-output`: forward outputs multiplied by `SCALE`; backward honest.
- `zero-grad`: forward honest; in backward (and at the tail) it does no work: no backward pass, no
  optimizer step, and all-zero input gradients.
- `copy-input`: body stages send their input as their output (the boundary shapes match); the head, whose
  input is tokens, sends zeros; the tail, which has no output to fake, sends a zero input gradient.
  Backward at the head and body is honest.
- `wrong-loss`: trains honestly, but the tail reports half the loss it computed (a lie that makes its
  pathways look good and the training look healthier than it is); elsewhere it is honest.
- `wrong-reduce`: trains honestly, but as a reducer in a merge uploads a wrong mean (scaled and shifted),
  the cheap lie of a reducer that skips the work or wants to steer the model.
"""

from __future__ import annotations

import hashlib
from typing import Literal, get_args

import torch

Behavior = Literal[
    "honest", "random-output", "zero-grad", "scaled-output", "copy-input", "wrong-loss", "wrong-reduce"
]
BEHAVIORS: tuple[Behavior, ...] = get_args(Behavior)
SCALE = 4.0


def item_seed(item_id: str) -> int:
    digest = hashlib.sha256(f"iota-behavior:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BehaviorPolicy:
    """Transforms a miner's outgoing tensors according to one behaviour (honest: untouched)."""

    def __init__(self, behavior: Behavior = "honest") -> None:
        if behavior not in BEHAVIORS:
            raise ValueError(f"unknown behaviour '{behavior}'; choose one of {', '.join(BEHAVIORS)}")
        self.behavior = behavior
        # False: the trainer skips backward and the optimizer step entirely.
        self.takes_step = behavior != "zero-grad"

    def forward_output(self, item_id: str, x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What to send instead of `out`, the honest output computed from `x_in`."""
        if self.behavior == "random-output":
            generator = torch.Generator().manual_seed(item_seed(item_id))
            noise = torch.randn(out.shape, generator=generator, dtype=out.dtype)
            return noise * out.std() + out.mean()
        if self.behavior == "scaled-output":
            return out * SCALE
        if self.behavior == "copy-input":
            if x_in.shape == out.shape:
                return x_in.detach().to(out.device, out.dtype, copy=True)
            return torch.zeros_like(out)
        return out

    def input_grad(self, grad: torch.Tensor, *, tail: bool) -> torch.Tensor:
        """What to send instead of `grad`, the honest gradient with respect to the stage's input."""
        if self.behavior == "zero-grad" or (tail and self.behavior == "copy-input"):
            return torch.zeros_like(grad)
        return grad

    def reported_loss(self, loss: float) -> float:
        """The loss the tail reports instead of `loss`, the one it computed."""
        return loss * 0.5 if self.behavior == "wrong-loss" else loss

    def reduced(self, values: torch.Tensor) -> torch.Tensor:
        """What to upload instead of `values`, the honest mean of a partition this miner reduced."""
        if self.behavior == "wrong-reduce":
            return values * 1.5 + 1e-3
        return values
