"""The honest compute of one pipeline stage: forward, backward and the inner AdamW step, with no networking.

The miner and the validator must compute the same bits from the same inputs: a validator replays a miner's
epoch op by op (`validator.replay`) and compares what it gets with what the miner uploaded. So both run this
one class; the miner's deliberate misbehaviour, for tests and the devnet, wraps it from `miner/`
(`miner.trainer.MinerTrainer`) and never reaches the validator. Keeping the arithmetic here, free of I/O,
also lets the tests check it against the whole model in one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import functional_call

from common.model.config import ModelConfig
from common.model.stages import PipelineStage, build_stage, next_token_loss
from common.optim import InnerOptimizer, build_inner_optimizer, embedding_table_names
from common.protocol import TrainingSpec


class TrainerError(RuntimeError):
    """A request the trainer refuses: an unknown item, too many outstanding forwards, a malformed tensor."""


@dataclass
class _Saved:
    """What one forward keeps until its backward."""

    weights: dict[str, torch.Tensor]  # the stashed parameters this forward ran with (shared, see below)
    x: torch.Tensor | None  # the input, requiring grad; None at the head, whose input is tokens
    out: torch.Tensor  # the output, with its graph


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    # Always a copy: the caller may encode or modify it in place, and it must not alias saved state.
    return t.detach().to("cpu", torch.float32, copy=True)


class StageTrainer:
    """Trains one stage: fp32 master weights and fp32 AdamW state, bf16 autocast on CUDA.

    Forwards are pipelined: several may await their backward while the backwards of older ones step the
    optimizer. The step updates the parameters in place, which would corrupt (or, through the version
    counter, refuse) the graphs of the outstanding forwards, and their gradients would come from weights
    they did not run with. So each forward uses weight stashing (PipeDream): it runs through
    `functional_call` on a detached clone of the parameters at the current weight version, and its backward
    differentiates with respect to that clone, then moves the gradients onto the master parameters and steps.
    A backward therefore uses exactly the weights of its forward. All forwards made between two steps share
    one clone, and a clone is freed when no outstanding forward uses it, so at most `max_outstanding` copies
    of the weights are alive (none when nothing is outstanding).

    A backward (or the tail's step) leaves its gradients pending: `commit` takes the optimizer step once the
    orchestrator has accepted the item, and `discard` drops them if it did not. So the miner's weights
    follow exactly the sequence of steps the orchestrator recorded, which is what lets a validator replay
    them (`validator.replay`) from the start-of-epoch weights and a fresh AdamW.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        stage: int,
        training: TrainingSpec,
        *,
        seed: int,
        device: str | torch.device = "cpu",
        autocast: bool | None = None,
    ) -> None:
        self.cfg, self.stage, self.training = cfg, stage, training
        self.device = torch.device(device)
        # bf16 autocast: on CUDA by default; forced on or off to measure replay tolerances.
        self.autocast = self.device.type == "cuda" if autocast is None else autocast
        self.module: PipelineStage = build_stage(cfg, stage, seed, self.device)
        self.optimizer = self._new_optimizer()
        self.steps = 0
        self.pending = False  # gradients of an uncommitted backward sit in the parameters' .grad
        self._saved: dict[str, _Saved] = {}
        self._stash: dict[str, torch.Tensor] | None = None  # the current version's clone, if taken

    @property
    def outstanding(self) -> int:
        return len(self._saved)

    # -----------------------------------------------------------------------------------------------------
    # Training

    def forward(self, item_id: str, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) at the head, activations (B, T, b) elsewhere -> (B, T, b), fp32 on the CPU.
        A stage after the head that `needs_tokens` also takes the sample's token ids (B, T)."""
        if self.module.is_tail:
            raise TrainerError("the tail has no separate forward; use tail_step")
        if item_id in self._saved:
            raise TrainerError(f"item {item_id} already has an outstanding forward")
        if len(self._saved) >= self.training.max_outstanding:
            raise TrainerError(
                f"{len(self._saved)} forwards already await their backward (max_outstanding "
                f"{self.training.max_outstanding}); drop or finish one first"
            )
        args: tuple[torch.Tensor, ...]
        if self.module.is_head:
            inp, x_grad = self._tokens(x, "head input"), None
            args = (inp,)
        else:
            inp = x_grad = self._activation(x, "input").requires_grad_(True)
            args = (inp, self._stage_tokens(tokens, inp)) if self.module.needs_tokens else (inp,)
        if self._stash is None:
            # Embedding tables are not cloned: their backward never reads them (common.optim), so the
            # forwards may share the live table, and a 15b head does not hold 4 copies of 2.6 GB.
            tables = set(embedding_table_names(self.module))
            self._stash = {
                name: (p.detach() if name in tables else p.detach().clone()).requires_grad_(True)
                for name, p in self.module.named_parameters()
            }
        with self._autocast():
            out = functional_call(self.module, self._stash, args)
        self._saved[item_id] = _Saved(weights=self._stash, x=x_grad, out=out)
        return _to_cpu(out)

    def backward(self, item_id: str, grad: torch.Tensor) -> torch.Tensor | None:
        """d loss / d output -> d loss / d input (fp32 CPU; None at the head), with the step pending."""
        saved, grad = self._take_forward(item_id, grad)
        params = list(saved.weights.values())
        inputs = params if saved.x is None else [*params, saved.x]
        grads = torch.autograd.grad(saved.out, inputs, grad, allow_unused=True)
        for p, g in zip(self.module.parameters(), grads[: len(params)], strict=True):
            p.grad = g
        self.pending = True
        return None if saved.x is None else _to_cpu(grads[-1])

    def tail_step(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Forward, loss and backward at once (last stage), the step pending: the loss and d loss / d x,
        fp32 CPU."""
        value, loss, x = self._tail_loss(x, tokens, with_grad=True)
        loss.backward()
        self.pending = True
        assert x.grad is not None
        return value, _to_cpu(x.grad)

    def commit(self) -> bool:
        """Take the pending optimizer step (the item was accepted); False if none was pending or the
        gradient was not finite (then no step is taken, the same on every replay)."""
        if not self.pending:
            return False
        self.pending = False
        return self._step()

    def discard(self) -> None:
        """Drop the pending gradients (the item was not accepted): the weights stay as they were."""
        self.pending = False
        self.optimizer.zero_grad(set_to_none=True)

    def drop(self, item_id: str) -> bool:
        """Free a forward's saved state (its item was cancelled); False if there was none."""
        saved = self._saved.pop(item_id, None)
        if saved is None:
            return False
        if self._stash is not None and all(s.weights is not self._stash for s in self._saved.values()):
            self._stash = None
        return True

    def drop_oldest(self) -> str | None:
        """Drop the forward held longest (its backward is likeliest never to come); its item id, if any."""
        oldest = next(iter(self._saved), None)  # dicts keep insertion order
        if oldest is not None:
            self.drop(oldest)
        return oldest

    def drop_all(self) -> None:
        self._saved.clear()
        self._stash = None
        self.discard()

    # -----------------------------------------------------------------------------------------------------
    # Weights

    def weights(self) -> dict[str, torch.Tensor]:
        """Detached fp32 CPU copies of the stage's state dict."""
        return {name: _to_cpu(t) for name, t in self.module.state_dict().items()}

    def assign_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the weights in place, as after a merge; exactly the stage's names and shapes. Drops
        outstanding work and restarts AdamW: every epoch starts from the global weights and a fresh inner
        optimiser, a state any validator can rebuild without the miner's moments."""
        params = dict(self.module.named_parameters())
        if set(weights) != set(params) or any(weights[n].shape != p.shape for n, p in params.items()):
            raise TrainerError(f"weights do not fit stage {self.stage}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
        self.drop_all()
        self.optimizer = self._new_optimizer()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace the weights (exactly the stage's keys and shapes); resets AdamW, drops outstanding work."""
        try:
            self.module.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise TrainerError(f"weights do not fit stage {self.stage}: {e}") from None
        self.drop_all()
        # Fresh moments: AdamW state belongs to the trajectory that led to the old weights, not to these.
        self.optimizer = self._new_optimizer()
        self.steps = 0

    # -----------------------------------------------------------------------------------------------------
    # Internals

    def _new_optimizer(self) -> InnerOptimizer:
        return build_inner_optimizer(self.module, self.cfg, self.training)

    def _take_forward(self, item_id: str, grad: torch.Tensor) -> tuple[_Saved, torch.Tensor]:
        """The checks of a backward: its forward's saved state (freed here) and the gradient, checked and
        on the device in the output's dtype."""
        self._no_pending()
        saved = self._saved.get(item_id)
        if saved is None:
            raise TrainerError(f"no outstanding forward for item {item_id}")
        if tuple(grad.shape) != tuple(saved.out.shape):
            raise TrainerError(
                f"gradient shape {tuple(grad.shape)} differs from the output's {tuple(saved.out.shape)}"
            )
        grad = self._finite(grad, "gradient").to(saved.out.dtype)
        self.drop(item_id)
        return saved, grad

    def _tail_loss(
        self, x: torch.Tensor, tokens: torch.Tensor, *, with_grad: bool
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """The tail's forward and loss: its value, the loss tensor (with its graph if `with_grad`) and the
        checked input on the device (requiring grad if `with_grad`)."""
        self._no_pending()
        if not self.module.is_tail:
            raise TrainerError("tail_step is for the last stage only")
        x = self._activation(x, "input").requires_grad_(with_grad)
        tokens = self._stage_tokens(tokens, x)
        if tokens.shape[1] < 2:
            raise TrainerError(f"tokens {tuple(tokens.shape)} must have seq >= 2")
        # The tail needs no stash: nothing else touches its weights between its forward and its backward.
        with self._autocast(), torch.set_grad_enabled(with_grad):
            logits = self.module(x, tokens)
        loss = next_token_loss(logits, tokens)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainerError(f"non-finite loss {value}; no step taken")
        return value, loss, x

    def _no_pending(self) -> None:
        if self.pending:
            raise TrainerError("the previous step is neither committed nor discarded")

    def _step(self) -> bool:
        if self.training.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.training.grad_clip)
            if not torch.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        # Outstanding forwards keep their own reference to the old clone; the next forward needs a new one.
        self._stash = None
        return True

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _check_seq(self, shape: torch.Size, what: str) -> None:
        batch, seq = shape[0], shape[1]
        if batch < 1 or not 1 <= seq <= self.cfg.max_seq_len:
            raise TrainerError(
                f"{what} has batch {batch} and seq {seq}; need batch >= 1, 1 <= seq <= {self.cfg.max_seq_len}"
            )

    def _stage_tokens(self, tokens: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """The sample's token ids for a stage after the head, checked against its input activation."""
        if tokens is None:
            raise TrainerError(f"stage {self.stage} needs the sample's token ids with its input")
        tokens = self._tokens(tokens, "tokens")
        if tokens.shape != x.shape[:2]:
            raise TrainerError(
                f"tokens {tuple(tokens.shape)} must be (batch, seq) of the input {tuple(x.shape)}"
            )
        return tokens

    def _tokens(self, tokens: torch.Tensor, what: str) -> torch.Tensor:
        integer = not (tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool)
        if tokens.dim() != 2 or not integer:
            raise TrainerError(
                f"{what} must be (batch, seq) integer token ids, got {tuple(tokens.shape)} {tokens.dtype}"
            )
        self._check_seq(tokens.shape, what)
        low, high = tokens.min().item(), tokens.max().item()
        if low < 0 or high >= self.cfg.vocab_size:
            raise TrainerError(f"{what} hold ids in [{low}, {high}], outside [0, {self.cfg.vocab_size})")
        return tokens.to(self.device, torch.long)

    def _activation(self, x: torch.Tensor, what: str) -> torch.Tensor:
        b = self.cfg.bottleneck_dim
        if x.dim() != 3 or x.shape[-1] != b or not x.is_floating_point():
            raise TrainerError(f"{what} must be floating (batch, seq, {b}), got {tuple(x.shape)} {x.dtype}")
        self._check_seq(x.shape, what)
        return self._finite(x, what)

    def _finite(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if not t.is_floating_point():
            raise TrainerError(f"{what} must be floating, got {t.dtype}")
        t = t.detach().to(self.device, torch.float32)
        if not torch.isfinite(t).all():
            raise TrainerError(f"{what} holds NaN or infinite values")
        return t
