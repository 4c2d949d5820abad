"""The inner optimizer of a stage, as the model config chooses it: the miner and the validator's replay both
build it here, so both step the same way from the same config.

`vocab_optimizer="adamw"` (the default) is one `torch.optim.AdamW` over every parameter, as it always was.
`"factored"` keeps AdamW for the blocks but trains the vocabulary matrices (the token embeddings and the LM
head) with `FactoredSecondMoment`: Adafactor's row and column statistics of the squared gradient instead of
AdamW's two full-size moments. For the 15b preset's 128256 x 5120 matrices that is 0.5 MB of state instead
of 5.3 GB, which is what lets its head and tail train on a 16 GB card (docs/model.md, docs/miner.md).

Everything here is deterministic: fixed parameter order (names sorted), fixed chunking, no data-dependent
control flow, so a replay on the same machine reproduces a miner's steps bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, Protocol

import torch
from torch import nn

from common.model.config import ModelConfig
from common.protocol import TrainingSpec

VocabOptimizer = Literal["adamw", "factored"]
VOCAB_OPTIMIZERS: tuple[str, ...] = ("adamw", "factored")

# Elements per chunk of a factored step: the step's temporaries (the squared gradient, the second-moment
# estimate and the update) are this big, never matrix-sized, so they do not add 3 x 2.6 GB to a 15b head's
# peak. A constant, so that the chunking, and with it every reduction's order, is the same on every run.
FACTORED_CHUNK_ELEMENTS = 2**22
# Live fp32 temporaries of one chunk at a time (squared gradient, estimate, update), for the memory estimate.
FACTORED_WORKSPACE_BYTES = 3 * 4 * FACTORED_CHUNK_ELEMENTS


class InnerOptimizer(Protocol):
    """What the trainer needs of its optimizer: both torch's optimizers and `CombinedOptimizer` are one."""

    def step(self) -> Any: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...


class FactoredSecondMoment(torch.optim.Optimizer):
    """Adafactor (Shazeer and Stern, 2018) without relative step sizes, on the run's lr and beta2.

    For a matrix gradient G (rows x cols) it keeps exponential averages of the row means and the column
    means of G^2 + eps, estimates the second moment as V = row col^T / mean(row) (a rank-1 fit that is
    exact when G^2 is), and steps by lr * G / sqrt(V), bias-corrected as Adam's second moment is. There is
    no first moment: instead each update is scaled down to an RMS of at most `clip` (Adafactor's update
    clipping), which keeps the steps of a stale estimate from blowing up. Weight decay is decoupled, as in
    AdamW, so the two optimizers of a stage shrink their weights alike. Vectors (not used for the
    vocabulary, but allowed) keep a full second moment.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        *,
        lr: float,
        beta2: float,
        weight_decay: float = 0.0,
        eps: float = 1e-30,
        clip: float = 1.0,
    ) -> None:
        if not 0 <= beta2 < 1:
            raise ValueError(f"beta2 {beta2} must be in [0, 1)")
        defaults = {"lr": lr, "beta2": beta2, "weight_decay": weight_decay, "eps": eps, "clip": clip}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("FactoredSecondMoment takes no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        lr, beta2, eps, clip = group["lr"], group["beta2"], group["eps"], group["clip"]
        grad = p.grad
        assert grad is not None
        if grad.is_sparse:
            raise ValueError("FactoredSecondMoment does not take sparse gradients")
        state = self.state[p]
        if not state:
            state["step"] = 0
            if p.dim() == 2:
                state["row"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                state["col"] = torch.zeros(p.shape[1], dtype=torch.float32, device=p.device)
            else:
                state["sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        correction = 1 - beta2 ** state["step"]
        if p.dim() == 2:
            chunks = _row_chunks(p.shape[0], p.shape[1])
            row, col = state["row"], state["col"]
            # The column means accumulate over row chunks in a fixed order; the row means are per chunk.
            col_sum = torch.zeros_like(col)
            for start, stop in chunks:
                sq = grad[start:stop].float().square().add_(eps)
                row[start:stop].mul_(beta2).add_(sq.mean(dim=1), alpha=1 - beta2)
                col_sum.add_(sq.sum(dim=0))
            col.mul_(beta2).add_(col_sum.div_(p.shape[0]), alpha=1 - beta2)
            row_mean = row.mean()

            def chunk_update(start: int, stop: int) -> torch.Tensor:
                v = (row[start:stop] / row_mean).unsqueeze(1) * col.unsqueeze(0)
                return grad[start:stop].float() / v.div_(correction).clamp_(min=eps).sqrt_()

            # Two passes: the RMS of the whole update first (for the clip), then the update itself.
            total = torch.zeros((), dtype=torch.float32, device=p.device)
            for start, stop in chunks:
                total.add_(chunk_update(start, stop).square().sum())
            scale = lr / torch.clamp(total.div(p.numel()).sqrt() / clip, min=1.0)
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            for start, stop in chunks:
                p[start:stop].sub_(chunk_update(start, stop).mul_(scale).to(p.dtype))
        else:
            sq_avg = state["sq"]
            sq_avg.mul_(beta2).add_(grad.float().square().add_(eps), alpha=1 - beta2)
            update = grad.float() / sq_avg.div(correction).clamp_(min=eps).sqrt_()
            rms = update.square().mean().sqrt()
            scale = lr / torch.clamp(rms / clip, min=1.0)
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            p.sub_(update.mul_(scale).to(p.dtype))


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    per_chunk = max(1, FACTORED_CHUNK_ELEMENTS // max(cols, 1))
    return [(start, min(start + per_chunk, rows)) for start in range(0, rows, per_chunk)]


class CombinedOptimizer:
    """Several optimizers over disjoint parameters, stepped and cleared in a fixed order as one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def vocab_parameter_names(module: nn.Module) -> list[str]:
    """The parameters with a vocabulary-sized dimension: every token embedding table and the LM head."""
    names = []
    for prefix, child in module.named_modules():
        if isinstance(child, nn.Embedding) or prefix.split(".")[-1] == "lm_head":
            names.extend(f"{prefix}.{name}" if prefix else name for name, _ in child.named_parameters())
    return sorted(names)


def embedding_table_names(module: nn.Module) -> list[str]:
    """The weights of the embedding lookups. Their backward never reads them (the gradient of a row lookup
    is the output gradient scattered into those rows), so a forward needs no stashed copy of them: the
    trainer lets outstanding forwards share the live table instead of one clone per weight version, which
    at a 15b head would be 2.6 GB each."""
    names = []
    for prefix, child in module.named_modules():
        if isinstance(child, nn.Embedding):
            names.append(f"{prefix}.weight" if prefix else "weight")
    return sorted(names)


def build_inner_optimizer(module: nn.Module, cfg: ModelConfig, spec: TrainingSpec) -> InnerOptimizer:
    """A fresh inner optimizer for `module` (a stage of `cfg`) with the run's hyperparameters."""
    fused = next(module.parameters()).device.type == "cuda"
    adamw_args: dict[str, Any] = {
        "lr": spec.lr,
        "betas": (spec.beta1, spec.beta2),
        "weight_decay": spec.weight_decay,
        "fused": fused,
    }
    if cfg.vocab_optimizer == "adamw":
        # Exactly the construction every run before the choice used, so their replays keep their bits.
        return torch.optim.AdamW(module.parameters(), **adamw_args)
    if cfg.vocab_optimizer != "factored":
        raise ValueError(f"unknown vocab_optimizer {cfg.vocab_optimizer!r}; choose one of {VOCAB_OPTIMIZERS}")
    vocab = set(vocab_parameter_names(module))
    named = sorted(module.named_parameters(), key=lambda item: item[0])
    blocks = [p for name, p in named if name not in vocab]
    tables = [p for name, p in named if name in vocab]
    optimizers: list[torch.optim.Optimizer] = []
    if blocks:
        optimizers.append(torch.optim.AdamW(blocks, **adamw_args))
    if tables:
        optimizers.append(
            FactoredSecondMoment(tables, lr=spec.lr, beta2=spec.beta2, weight_decay=spec.weight_decay)
        )
    return CombinedOptimizer(optimizers)


def optimizer_state_bytes(optimizer: InnerOptimizer) -> int:
    """Bytes of tensor state the optimizer holds (after its first step: torch allocates state lazily),
    step counters aside."""
    optimizers = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    total = 0
    for opt in optimizers:
        assert isinstance(opt, torch.optim.Optimizer)
        for state in opt.state.values():
            for value in state.values():
                # Not AdamW's 0-d step counters: bytes per tensor, not per parameter, as the estimate.
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    total += value.numel() * value.element_size()
    return total


def optimizer_state_per_matrix(rows: int, cols: int, choice: str) -> int:
    """Bytes of optimizer state for one fp32 rows x cols matrix: AdamW's two moments, or the factored
    row and column statistics. The estimator in iota/preflight.py counts with this."""
    if choice == "factored":
        return 4 * (rows + cols)
    return 8 * rows * cols
