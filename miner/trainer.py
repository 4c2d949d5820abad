"""The miner's stage trainer: the honest `common.training.StageTrainer` with the miner's behaviour on top.

The compute itself stays in `common.training`, which the validator replays with; a `BehaviorPolicy`
(`miner.behaviors`) only rewrites what leaves this trainer, or, for `zero-grad`, skips the backward pass and
the step. Under `honest` every call returns exactly what the honest trainer returns, bit for bit.
"""

from __future__ import annotations

import torch

from common.model.config import ModelConfig
from common.protocol import TrainingSpec
from common.training import StageTrainer
from miner.behaviors import Behavior, BehaviorPolicy


class MinerTrainer(StageTrainer):
    """A `StageTrainer` whose outgoing tensors (and whether it does the work at all) follow `behavior`."""

    def __init__(
        self,
        cfg: ModelConfig,
        stage: int,
        training: TrainingSpec,
        *,
        seed: int,
        device: str | torch.device = "cpu",
        behavior: Behavior = "honest",
        autocast: bool | None = None,
    ) -> None:
        super().__init__(cfg, stage, training, seed=seed, device=device, autocast=autocast)
        self.policy = BehaviorPolicy(behavior)

    def forward(self, item_id: str, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.policy.forward_output(item_id, x, super().forward(item_id, x, tokens))

    def backward(self, item_id: str, grad: torch.Tensor) -> torch.Tensor | None:
        if self.policy.takes_step:
            honest = super().backward(item_id, grad)
            return None if honest is None else self.policy.input_grad(honest, tail=False)
        # No backward pass and no pending step, but the same checks and the forward freed as an honest one.
        saved, _ = self._take_forward(item_id, grad)
        return None if saved.x is None else self.policy.input_grad(torch.zeros(saved.x.shape), tail=False)

    def tail_step(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
        if self.policy.takes_step:
            loss, grad = super().tail_step(x, tokens)
        else:
            loss, _, checked = self._tail_loss(x, tokens, with_grad=False)
            grad = torch.zeros(checked.shape)
        return self.policy.reported_loss(loss), self.policy.input_grad(grad, tail=True)
