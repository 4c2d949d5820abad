"""Replaying a shadowed miner's epoch and comparing what it uploaded with what honest work gives.

A `ValidationTask` lists the miner's accepted items in the order it completed them. The replay builds a
fresh `StageTrainer` (`common.training`) for the stage, loads the start-of-epoch global weights, and runs
every op in that order, feeding it the very inputs the miner was given (the bytes the orchestrator kept)
and rebuilding tokens from sample ids. Each output the miner uploaded is compared with the replayed one,
then the pseudo-gradient it uploaded for the merge and the number of optimizer steps it claimed.

Why the replay is exact up to floating-point noise:

- Lazy commit: a miner takes its optimizer step only when the orchestrator accepts the item
  (`StageTrainer.commit`), and works on one item at a time. So its weights are exactly the start-of-epoch
  weights plus one AdamW step per accepted backward / tail item, in completion order: the ops of the task.
- Fresh AdamW each epoch: every epoch starts from the global weights and a new inner optimizer
  (`StageTrainer.load_weights` / `assign_weights`), so no hidden optimizer state is needed.
- Weight stashing: a forward runs on the weights of the moment it ran, and its backward differentiates
  those. The replay uses the same `StageTrainer` class and the same op order, so every forward sees the
  same weight version as the miner's did, and every backward the same stashed weights. (The miner's
  `MinerTrainer` is that class with its behaviour on top; honest, it returns the very same bits.)
- The wire: a replayed output goes through the run's wire format (dtype, int8, lz4) before comparison, so
  quantisation affects both sides alike.

What remains is rounding. In the miner's own numeric regime (fp32 on the CPU, against an fp32 CPU replay,
whatever the thread counts) the replay is exact: every error measured 0. Across regimes (bf16 autocast on
the miner's GPU against an fp32 replay) each op differs by rounding, and training amplifies it: two
trajectories that start equal drift apart step by step, until an honest miner's tail gradient no longer
resembles the replay's (measured: past 0.15 relative error after 12 optimizer steps on the tiny preset).
So a cross-regime replay checks only the first `horizon` optimizer steps of the epoch
(`CROSS_REGIME_HORIZON`), where `Tolerances` bounds the drift, and skips the checks that need the whole
epoch (pseudo-gradient, step count); see `regime` and the `Tolerances` docstring for the calibration.

Failures are the miner's: an output that does not match, does not decode, or a wrong loss, pseudo-gradient
or step count. A task that cannot be replayed (an object the orchestrator vouched for is missing or not
as announced, ops that do not fit together) raises `ReplayError`, which blames nobody. Exceptions raised
by `fetch` itself (say, `StorageError`) propagate unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch

from common.checkpoints import CheckpointError, fetch_state, stage_shapes
from common.codec import CodecError, content_hash
from common.data import Corpus, batch_tokens
from common.merge import decode_slice, flatten
from common.model import ModelConfig
from common.protocol import (
    MAX_REASON_CHARS,
    CheckKind,
    DataSpec,
    DownloadSource,
    ReplayOp,
    ReplayVerdict,
    TrainingSpec,
    ValidationTask,
    is_last_stage,
)
from common.training import StageTrainer, TrainerError
from common.wire import BoundaryWire

_TINY = 1e-12  # the floor of a reference norm in `relative_error`


@dataclass(frozen=True)
class Tolerances:
    """How far a miner's uploads may sit from the replay's before the replay fails it.

    Calibrated with `python bench/replay_sim.py` (tiny preset, 3 stages, batch 2, seq 32, epochs of 32
    samples with up to 2 forwards in flight, 1 sample in 8 cancelled and 1 backward in 8 rejected, the
    default training spec with fp32 wire; replay in fp32 on the CPU, 2 threads). Worst error over the head,
    body and tail of honest work, by how the miner ran (bf16: up to the cross-regime horizon, 8 steps):

    ==================  ==========  ==========  =========  ===============
    miner               forward     backward*   loss       pseudo_gradient
    ==================  ==========  ==========  =========  ===============
    same settings       0           0           0          0
    1 thread (vs 2)     0           0           0          0
    bf16 autocast       1.1e-2      1.5e-2      1.4e-3     6.0e-2 (**)
    bf16 + int8 wire    1.1e-2      1.9e-2      3.6e-3     -
    ==================  ==========  ==========  =========  ===============

    (* the larger of backward and tail_grad. ** epochs of 4 to 12 samples, 4 to 10 steps: the
    pseudo-gradient is checked only when the whole epoch is inside the horizon.) Past the horizon honest
    bf16 drifts out: a whole-epoch replay passed a tolerance after 16 steps at the head and 12 at the tail.

    The smallest error of the check that catches each cheat: random-output 1.2 (forward), scaled-output 3.0
    (forward), copy-input 0.53 (forward at the body; 1.0 at the head) and 1.0 (tail_grad at the tail),
    zero-grad 1.0 (backward, tail_grad; at the head its stale weights fail the next forward), wrong-loss
    0.97 nats (loss).

    The tolerances sit 2.7x (forward), 8x (backward), 5x (loss and pseudo-gradient) above the worst honest
    bf16 figure inside the horizon, and at least 3x below the smallest cheat.
    """

    forward: float  # relative L2 error of a forward output
    backward: float  # relative L2 error of an input gradient (backward and tail)
    loss: float  # absolute difference of the tail's loss, nats
    pseudo_gradient: float  # relative L2 error of the whole pseudo-gradient (and per partition)


DEFAULT_TOLERANCES = Tolerances(forward=0.03, backward=0.15, loss=0.02, pseudo_gradient=0.3)
# In the miner's own regime (fp32 on the CPU) every honest error measured exactly 0; these leave room for
# another CPU's kernels only, and fail a pseudo-gradient scaled by 0.99 or a loss off by 0.001 nats.
EXACT_TOLERANCES = Tolerances(forward=1e-3, backward=1e-2, loss=1e-3, pseudo_gradient=1e-2)

# Optimizer steps a cross-regime replay checks: the honest bf16-vs-fp32 drift first passed a tolerance
# after 12 steps (tiny preset, tail_grad); 8 keeps a margin. Every cheat we know fails at its first op.
CROSS_REGIME_HORIZON = 8


def regime(device: str) -> str:
    """How a miner on `device` computes (`StageTrainer`'s rule): bf16 autocast on CUDA, fp32 on the CPU;
    anything else (an unknown or unreported device) is "other", which is never taken for exact."""
    if device.startswith("cuda"):
        return "cuda-bf16"
    return "cpu-fp32" if device == "cpu" or device.startswith("cpu:") else "other"


@dataclass(frozen=True)
class ReplayMode:
    autocast: bool  # replay under bf16 autocast (the miner's regime, where this machine can run it)
    horizon: int | None  # optimizer steps checked; None: the whole epoch
    tolerances: Tolerances


def replay_mode(miner_device: str, validator_device: str) -> ReplayMode:
    """How to replay a miner's work on this validator: the whole epoch with `EXACT_TOLERANCES` where the
    replay is measured exact (fp32 on the CPU on both sides); otherwise up to `CROSS_REGIME_HORIZON` with
    `DEFAULT_TOLERANCES`, under bf16 autocast when both are on CUDA (CUDA against CUDA: not measured)."""
    miner, validator = regime(miner_device), regime(validator_device)
    if miner == validator == "cpu-fp32":
        return ReplayMode(autocast=False, horizon=None, tolerances=EXACT_TOLERANCES)
    both_cuda = miner == validator == "cuda-bf16"
    return ReplayMode(autocast=both_cuda, horizon=CROSS_REGIME_HORIZON, tolerances=DEFAULT_TOLERANCES)


def relative_error(claimed: torch.Tensor, replayed: torch.Tensor) -> float:
    """||claimed - replayed|| / max(||replayed||, tiny), in float64; 0 when both are equal (say, zero)."""
    c = claimed.detach().to("cpu", torch.float64).reshape(-1)
    r = replayed.detach().to("cpu", torch.float64).reshape(-1)
    if c.shape != r.shape:
        raise ValueError(f"cannot compare {c.numel()} values with {r.numel()}")
    diff = float(torch.linalg.vector_norm(c - r))
    return 0.0 if diff == 0 else diff / max(float(torch.linalg.vector_norm(r)), _TINY)


class ReplayError(Exception):
    """The task cannot be replayed (an object the orchestrator vouched for is missing or not as announced,
    or the ops do not fit together): nobody's fault that a validator could prove."""


class _Stop(Exception):
    """A check failed: the replay stops there."""


# Called for every comparison: (op index, or -1 after the ops), the kind, the error.
CheckHook = Callable[[int, CheckKind, float], None]


def replay(
    task: ValidationTask,
    *,
    cfg: ModelConfig,
    training: TrainingSpec,
    data: DataSpec,
    corpus: Corpus,
    fetch: Callable[[DownloadSource], bytes],
    device: str = "cpu",
    autocast: bool = False,
    tolerances: Tolerances = DEFAULT_TOLERANCES,
    horizon: int | None = None,
    on_check: CheckHook | None = None,
) -> ReplayVerdict:
    """Replay `task` and judge it; stops at the first failing check. `fetch` returns an object's raw
    bytes (size and sha256 are checked here); `on_check` sees every comparison (for calibration).

    With `horizon` (a cross-regime replay, see above), the replay stops before the first backward or tail
    op once it has taken `horizon` optimizer steps, and then skips the pseudo-gradient and step checks;
    an epoch that fits inside the horizon is checked whole."""
    return _Replay(
        task, cfg, training, data, corpus, fetch, device, autocast, tolerances, horizon, on_check
    ).run()


class _Replay:
    def __init__(
        self,
        task: ValidationTask,
        cfg: ModelConfig,
        training: TrainingSpec,
        data: DataSpec,
        corpus: Corpus,
        fetch: Callable[[DownloadSource], bytes],
        device: str,
        autocast: bool,
        tolerances: Tolerances,
        horizon: int | None,
        on_check: CheckHook | None,
    ) -> None:
        if not 0 <= task.stage < cfg.n_stages:
            raise ReplayError(f"stage {task.stage} is out of range ({cfg.n_stages} stages)")
        if corpus.fingerprint != data.fingerprint:
            raise ReplayError("the local corpus is not the run's (fingerprints differ)")
        self.task, self.training, self.data, self.corpus = task, training, data, corpus
        self.fetch, self.tol, self.on_check, self.horizon = fetch, tolerances, on_check, horizon
        self.is_head, self.is_tail = task.stage == 0, is_last_stage(task.stage, cfg.n_stages)
        self.wire = BoundaryWire.of(cfg, data.batch_size, data.seq_len, training)
        self.trainer = StageTrainer(
            cfg, task.stage, training, seed=task.weights.seed, device=device, autocast=autocast
        )
        self.worst: dict[CheckKind, float] = {}
        self.checks = 0
        self.failure: str | None = None

    def run(self) -> ReplayVerdict:
        started = time.perf_counter()
        start = self._load_start()
        done = 0
        try:
            for index, op in enumerate(self.task.ops):
                if self.horizon is not None and op.kind != "forward" and self.trainer.steps >= self.horizon:
                    break
                self._op(index, op)
                done += 1
            else:
                self._pseudo_gradient(start)
                self._steps()
        except _Stop:
            pass
        return ReplayVerdict(
            passed=self.failure is None,
            ops=done,
            checks=self.checks,
            worst=self.worst,
            failure=self.failure,
            replay_s=time.perf_counter() - started,
            horizon=self.horizon,
        )

    # -- ops -------------------------------------------------------------------------------------------------

    def _op(self, index: int, op: ReplayOp) -> None:
        where = f"op {index} ({op.kind} {op.item_id})"
        try:
            if op.kind == "forward":
                self._forward(index, op, where)
            elif op.kind == "tail":
                self._tail(index, op, where)
            else:
                self._backward(index, op, where)
        except TrainerError as error:
            raise ReplayError(f"{where}: {error}") from None

    def _forward(self, index: int, op: ReplayOp, where: str) -> None:
        if self.is_tail:
            raise ReplayError(f"{where}: the last stage has tail ops, not forwards")
        if self.is_head:
            out = self.trainer.forward(op.item_id, self._tokens(op, where))
        else:
            tokens = self._tokens(op, where) if self.trainer.module.needs_tokens else None
            out = self.trainer.forward(op.item_id, self._input(op, where), tokens)
        if not op.backward_follows:
            self.trainer.drop(op.item_id)
        claimed = self._claimed(op.output, index, "forward", where)
        self._check(
            index, "forward", relative_error(claimed, self._wire(out, where)), self.tol.forward, where
        )

    def _tail(self, index: int, op: ReplayOp, where: str) -> None:
        if not self.is_tail:
            raise ReplayError(f"{where}: only the last stage has tail ops")
        if op.loss is None or not math.isfinite(op.loss):
            raise ReplayError(f"{where}: no finite loss recorded")
        x, tokens = self._input(op, where), self._tokens(op, where)
        loss, grad = self.trainer.tail_step(x, tokens)
        self.trainer.commit()
        self._check(index, "loss", abs(op.loss - loss), self.tol.loss, where)
        claimed = self._claimed(op.output, index, "tail_grad", where)
        error = relative_error(claimed, self._wire(grad, where))
        self._check(index, "tail_grad", error, self.tol.backward, where)

    def _backward(self, index: int, op: ReplayOp, where: str) -> None:
        if self.is_tail or op.forward_item is None:
            raise ReplayError(f"{where}: a backward needs a forward item, and the last stage has none")
        grad = self.trainer.backward(op.forward_item, self._input(op, where))
        self.trainer.commit()
        if self.is_head:
            return  # nothing to compare; the step counts, and the pseudo-gradient checks it
        claimed = self._claimed(op.output, index, "backward", where)
        assert grad is not None
        self._check(
            index, "backward", relative_error(claimed, self._wire(grad, where)), self.tol.backward, where
        )

    # -- after the ops ---------------------------------------------------------------------------------------

    def _steps(self) -> None:
        claimed = self.task.claimed_steps
        if claimed is not None:
            where = f"the miner claimed {claimed} steps, the replay took {self.trainer.steps}"
            self._check(-1, "steps", float(abs(claimed - self.trainer.steps)), 0.0, where)

    def _pseudo_gradient(self, start: torch.Tensor) -> None:
        sources, spans = self.task.pseudo_gradient, self.task.partitions
        if not sources:
            return
        bounds = [(p.start, p.end) for p in spans]
        consecutive = all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        if (
            len(sources) != len(spans)
            or not consecutive
            or bounds[0][0] != 0
            or bounds[-1][1] != start.numel()
        ):
            raise ReplayError(
                f"the partitions must cut the stage's {start.numel()} values into consecutive pieces,"
                " one per upload"
            )
        replayed = start - flatten(self.trainer.weights())
        claimed = []
        for span, source in zip(spans, sources, strict=True):
            data = self._fetch(source)
            try:
                claimed.append(decode_slice(data, span.end - span.start))
            except CodecError as error:
                self._fail("pseudo_gradient", f"partition {span.index} does not decode: {error}")
        worst, where = relative_error(torch.cat(claimed), replayed), "the whole pseudo-gradient"
        for span, values in zip(spans, claimed, strict=True):
            error = relative_error(values, replayed[span.start : span.end])
            if error > worst:
                worst, where = error, f"partition {span.index}"
        self.checks += len(spans)  # one per partition, plus the whole in `_check`
        self._check(-1, "pseudo_gradient", worst, self.tol.pseudo_gradient, where)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _load_start(self) -> torch.Tensor:
        """Load the start-of-epoch weights into the trainer; their flat vector."""
        weights = self.task.weights
        if weights.checkpoint is not None:
            shapes = stage_shapes(self.trainer.cfg, self.task.stage)
            try:
                self.trainer.load_weights(fetch_state(self.fetch, weights.checkpoint.weights, shapes))
            except (CheckpointError, TrainerError) as error:
                raise ReplayError(f"the start-of-epoch checkpoint cannot be loaded: {error}") from None
        elif weights.version != 0:
            raise ReplayError(f"version {weights.version} comes without a checkpoint")
        return flatten(self.trainer.weights())  # version 0: the fresh trainer holds the seeded init

    def _fetch(self, source: DownloadSource) -> bytes:
        data = self.fetch(source)
        if len(data) != source.size or content_hash(data) != source.sha256:
            raise ReplayError(f"{source.key} is not the object the orchestrator announced (size or sha256)")
        return data

    def _tokens(self, op: ReplayOp, where: str) -> torch.Tensor:
        if not op.samples or len(op.samples) != self.data.batch_size:
            raise ReplayError(f"{where}: needs {self.data.batch_size} sample ids")
        try:
            return batch_tokens(self.corpus, op.samples, self.data.seq_len)
        except ValueError as error:
            raise ReplayError(f"{where}: sample ids outside the corpus: {error}") from None

    def _input(self, op: ReplayOp, where: str) -> torch.Tensor:
        """The tensor the miner was given, which it accepted: one that does not decode is a bad task."""
        if op.input is None:
            raise ReplayError(f"{where}: no input")
        try:
            return self.wire.decode(self._fetch(op.input))
        except CodecError as error:
            raise ReplayError(f"{where}: its input does not decode: {error}") from None

    def _claimed(
        self, source: DownloadSource | None, index: int, kind: CheckKind, where: str
    ) -> torch.Tensor:
        """What the miner uploaded; one that does not decode fails the miner."""
        if source is None:
            raise ReplayError(f"{where}: no output recorded")
        try:
            return self.wire.decode(self._fetch(source))
        except CodecError as error:
            self._fail(kind, f"{where}: the uploaded output does not decode: {error}")

    def _wire(self, tensor: torch.Tensor, where: str) -> torch.Tensor:
        """`tensor` as it would arrive after the run's wire format, exactly as the miner encodes it."""
        try:
            return self.wire.decode(self.wire.encode(tensor))
        except CodecError as error:
            raise ReplayError(
                f"{where}: the replay's own output is not a valid boundary tensor: {error}"
            ) from None

    def _check(self, index: int, kind: CheckKind, error: float, tolerance: float, where: str) -> None:
        self.checks += 1
        if math.isfinite(error):  # the verdict carries finite figures; a non-finite error fails below
            self.worst[kind] = max(self.worst.get(kind, 0.0), error)
        if self.on_check is not None:
            self.on_check(index, kind, error)
        if not error <= tolerance:  # a NaN error fails too
            self._fail(kind, f"{where}: error {error:.3g} > tolerance {tolerance:.3g}")

    def _fail(self, kind: CheckKind, message: str) -> NoReturn:
        self.failure = f"{kind}: {message}"[:MAX_REASON_CHARS]
        raise _Stop
