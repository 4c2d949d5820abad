"""Replay calibration: a miner's epoch simulated in one process, then replayed by `validator.replay`.

`simulate_epoch` runs a whole pipeline (tiny preset, 3 `StageTrainer`s, one per stage) for a number of
samples, the miner under test at one stage with a given behaviour, bf16 autocast and torch thread count,
the other stages honest fp32. It follows the network's rules without S3 or HTTP:

- sample ids from the run's `SampleSchedule`, tokens rebuilt from the local corpus (the stdlib sources);
- pipelined: up to `depth` samples in flight, each advancing one hop per round, oldest first, so a stage
  runs the forward of a newer sample before the backward of an older one (weight stashing matters);
- every tensor that crosses a stage goes through the codec in the run's wire format, and is stored in a
  dict under a fake key with its size and sha256 (so `fetch` is a dict lookup, checked like a download);
- a miner commits its step only when its item is accepted: 1 sample in `cancel_every` is cancelled after
  its forwards (every stage drops its saved state; those forwards stay accepted, with no backward), and
  1 in `reject_every` has the miner's backward (or tail step) refused, so it discards the gradients;
- at the end the miner's pseudo-gradient is cut into `common.merge.partitions` and uploaded, and its step
  count claimed, as `miner.merge_participant` does.

It returns the `ValidationTask` the orchestrator would build for that miner (ops in completion order).

`calibrate` measures, for each stage, the worst errors of honest work under several conditions (same
settings; the miner on 1 torch thread against a 2-thread replay; the miner under bf16 autocast; bf16
autocast with a bf16 + int8 wire) and the errors each cheat produces, all replayed in fp32 on the CPU with
infinite tolerances so that every check is measured. Its "cost" section (`replay_cost`) times, per stage,
a replay of honest work against the miner's own compute for the same epoch (`Simulation.miner_compute_s`).

    python bench/replay_sim.py            # the table
    python bench/replay_sim.py --json     # the figures as JSON (also written to bench/out/replay.json)
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import torch

if not __package__:  # run as `python bench/<name>.py`, not `-m bench.<name>`: see bench/_repo_root.py
    import _repo_root  # noqa: F401

from bench.report import emit
from common.codec import content_hash
from common.config import DataSettings
from common.data import Corpus, SampleSchedule, batch_tokens, make_corpus
from common.merge import encode_slice, encode_state, flatten, partitions
from common.model import ModelConfig, build_stage, get_preset
from common.protocol import (
    CheckKind,
    Checkpoint,
    DataSpec,
    DownloadSource,
    GlobalWeights,
    PartitionSpan,
    ReplayOp,
    ReplayVerdict,
    TrainingSpec,
    ValidationTask,
)
from common.wire import BoundaryWire
from miner.behaviors import Behavior
from miner.trainer import MinerTrainer
from orchestrator.settings import OrchestratorSettings, training_spec
from validator.replay import CROSS_REGIME_HORIZON, DEFAULT_TOLERANCES, Tolerances, replay

OUT_DIR = Path(__file__).resolve().parent / "out"
SEED = 7
# The run's default inner AdamW and wire (fp32, no int8, no lz4): the orchestrator's field defaults.
TRAINING = training_spec(OrchestratorSettings.model_construct())
INFINITE = Tolerances(forward=math.inf, backward=math.inf, loss=math.inf, pseudo_gradient=math.inf)
T = TypeVar("T")


@cache
def default_corpus() -> Corpus:
    """The offline corpus (the standard library's sources as bytes), read once per process."""
    return make_corpus(DataSettings(_env_file=None, source="local", local_root=None, tokenizer="byte"))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch threads (None: unchanged), then restore the count."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Simulation:
    """A simulated epoch: the task for the miner under test and the objects it names."""

    task: ValidationTask
    objects: dict[str, bytes]
    cfg: ModelConfig
    training: TrainingSpec
    data: DataSpec
    corpus: Corpus
    # Seconds the miner under test spent in its own StageTrainer calls (forward, backward, tail_step,
    # commit): its compute, without the other stages, the codec or the bookkeeping.
    miner_compute_s: float = 0.0

    def fetch(self, source: DownloadSource) -> bytes:
        return self.objects[source.key]

    def replay(
        self,
        tolerances: Tolerances = DEFAULT_TOLERANCES,
        *,
        task: ValidationTask | None = None,
        horizon: int | None = None,
        on_check: Callable[[int, CheckKind, float], None] | None = None,
    ) -> ReplayVerdict:
        """Replay the task (or a tampered copy of it) in fp32 on the CPU."""
        return replay(
            task or self.task,
            cfg=self.cfg,
            training=self.training,
            data=self.data,
            corpus=self.corpus,
            fetch=self.fetch,
            tolerances=tolerances,
            horizon=horizon,
            on_check=on_check,
        )

    def put(self, data: bytes) -> DownloadSource:
        """Store an object (say, a tampered copy); its download source."""
        return _put(self.objects, data)


def _put(objects: dict[str, bytes], data: bytes) -> DownloadSource:
    """Store an object; its download source: a fake key and URL, the real size and sha256."""
    key = f"sim/{len(objects)}"
    objects[key] = data
    return DownloadSource(key=key, url=f"memory://{key}", size=len(data), sha256=content_hash(data))


@dataclass
class _Sample:
    index: int
    tokens: torch.Tensor
    samples: list[Any]
    hop: int = 0
    carry: DownloadSource | None = None  # what the last hop uploaded
    fate: str = "done"  # done, cancel (after its forwards), reject (the miner's backward refused)
    ids: dict[int, str] = field(default_factory=dict)  # stage -> forward item id


def simulate_epoch(
    stage: int,
    *,
    samples: int = 32,
    behavior: Behavior = "honest",
    autocast: bool = False,
    threads: int | None = None,
    batch_size: int = 2,
    seq_len: int = 32,
    depth: int = 2,
    cancel_every: int = 8,
    reject_every: int = 8,
    n_partitions: int = 4,
    checkpoint: bool = False,
    training: TrainingSpec = TRAINING,
    seed: int = SEED,
    model: dict[str, Any] | None = None,
) -> Simulation:
    """One epoch of a 3-stage tiny pipeline, the miner at `stage` running as told; see the module doc.

    `checkpoint`: start from a checkpoint (the init of another seed, as version 1) instead of the seeded
    init, so that a replay which ignored it would fail."""
    cfg = get_preset("tiny", max_seq_len=max(seq_len, 64), **(model or {}))  # model: field overrides
    corpus = default_corpus()
    data = DataSpec(
        source="local",
        fingerprint=corpus.fingerprint,
        tokenizer="byte",
        batch_size=batch_size,
        seq_len=seq_len,
    )
    n, last = cfg.n_stages, cfg.n_stages - 1
    objects: dict[str, bytes] = {}
    trainers = [
        MinerTrainer(
            cfg,
            s,
            training,
            seed=seed,
            behavior=behavior if s == stage else "honest",
            autocast=autocast if s == stage else False,
        )
        for s in range(n)
    ]
    weights = GlobalWeights(version=0, seed=seed)
    if checkpoint:
        stages = [build_stage(cfg, s, seed + 1).state_dict() for s in range(n)]
        for trainer, state in zip(trainers, stages, strict=True):
            trainer.load_weights(state)
        own = stages[stage]
        momentum = encode_state({name: torch.zeros_like(t) for name, t in own.items()})
        weights = GlobalWeights(
            version=1,
            seed=seed,
            checkpoint=Checkpoint(weights=_put(objects, encode_state(own)), momentum=_put(objects, momentum)),
        )
    miner = trainers[stage]
    start = flatten(miner.weights())

    wire = BoundaryWire.of(cfg, batch_size, seq_len, training)

    def upload(t: torch.Tensor) -> DownloadSource:
        return _put(objects, wire.encode(t))

    def download(source: DownloadSource) -> torch.Tensor:
        return wire.decode(objects[source.key])

    compute_s = 0.0

    def run(s: int, call: Callable[[], T]) -> T:
        nonlocal compute_s
        if s != stage:
            return call()
        with torch_threads(threads):
            began = time.perf_counter()
            try:
                return call()
            finally:
                compute_s += time.perf_counter() - began

    ops: list[ReplayOp] = []
    schedule = SampleSchedule(corpus, seed)
    # Hops of a sample: the forwards of stages 0..n-2, the tail, the backwards of stages n-2..0.
    hops = (
        [("forward", s) for s in range(last)]
        + [("tail", last)]
        + [("backward", s) for s in range(last - 1, -1, -1)]
    )

    def hop(smp: _Sample) -> bool:
        """Run the sample's next hop; False once the sample is finished or dropped."""
        kind, s = hops[smp.hop]
        trainer = trainers[s]
        item_id = f"{smp.index}.{s}.{'b' if kind == 'backward' else 'f'}"
        if kind == "forward":
            x = smp.tokens if s == 0 else download(smp.carry)  # type: ignore[arg-type]
            tokens = smp.tokens if s > 0 and trainer.module.needs_tokens else None
            out = upload(run(s, lambda: trainer.forward(item_id, x, tokens)))
            smp.ids[s] = item_id
            if s == stage:
                ops.append(
                    ReplayOp(
                        item_id=item_id,
                        kind="forward",
                        samples=smp.samples,
                        input=None if s == 0 else smp.carry,
                        output=out,
                    )
                )
            smp.carry = out
            if s == last - 1 and smp.fate == "cancel":
                # Cancelled before the tail (say, its tail miner died): every stage drops its saved state.
                for d in range(last):
                    trainers[d].drop(smp.ids[d])
                return False
        else:
            x = download(smp.carry)  # type: ignore[arg-type]
            if kind == "tail":
                loss, grad = run(s, lambda: trainer.tail_step(x, smp.tokens))
                out = upload(grad)
                op = ReplayOp(
                    item_id=item_id, kind="tail", samples=smp.samples, input=smp.carry, output=out, loss=loss
                )
            else:
                g = run(s, lambda: trainer.backward(smp.ids[s], x))
                out = None if g is None else upload(g)
                op = ReplayOp(
                    item_id=item_id, kind="backward", forward_item=smp.ids[s], input=smp.carry, output=out
                )
            if s == stage and smp.fate == "reject":
                # The orchestrator refuses the miner's item (its deadline passed): no step, and the sample
                # is dropped, so the stages before this one drop their saved forwards.
                trainer.discard()
                for d in range(s):
                    trainers[d].drop(smp.ids[d])
                return False
            run(s, trainer.commit)
            if s == stage:
                ops.append(op)
            smp.carry = out
        smp.hop += 1
        return smp.hop < len(hops)

    active: list[_Sample] = []
    started = 0
    while started < samples or active:
        if started < samples and len(active) < depth:
            ids = schedule.batch(started, batch_size)
            fate = "done"
            if cancel_every and started % cancel_every == cancel_every - 1:
                fate = "cancel"
            elif reject_every and started % reject_every == reject_every // 2:
                fate = "reject"
            active.append(_Sample(started, batch_tokens(corpus, ids, seq_len), ids, fate=fate))
            started += 1
        active = [smp for smp in active if hop(smp)]
    assert all(t.outstanding == 0 and not t.pending for t in trainers)

    backed = {op.forward_item for op in ops if op.kind == "backward"}
    ops = [op.model_copy(update={"backward_follows": op.item_id in backed}) for op in ops]
    pg = start - flatten(miner.weights())
    spans = [
        PartitionSpan(index=p.index, start=p.start, end=p.end) for p in partitions(pg.numel(), n_partitions)
    ]
    uploads = [_put(objects, encode_slice(pg[p.start : p.end])) for p in spans]
    task = ValidationTask(
        task_id=f"sim-{stage}-{behavior}",
        epoch=0,
        stage=stage,
        miner="sim-miner",
        device="cpu",
        weights=weights,
        ops=ops,
        partitions=spans,
        pseudo_gradient=uploads,
        claimed_steps=miner.steps,
        deadline_in_s=600.0,
    )
    return Simulation(task, objects, cfg, training, data, corpus, miner_compute_s=compute_s)


# ---------------------------------------------------------------------------------------------------------
# Cost


def replay_cost(stage: int, samples: int = 32, repeats: int = 1, *, threads: int = 2) -> dict[str, Any]:
    """What a replay costs a validator against what the work cost the miner, for honest fp32 work at
    `stage`, the miner and the replay both on `threads` torch threads, the same CPU.

    `miner_compute_s`: the miner's own StageTrainer calls (`Simulation.miner_compute_s`); `replay_s`: the
    whole replay (`ReplayVerdict.replay_s`: fetching, size and sha256 checks, decoding, the trainer's
    work, re-encoding through the wire and the comparisons). Each is the smallest over `repeats` epochs
    (after an unmeasured 2-sample warm-up), and `ratio` is replay_s / miner_compute_s."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    miner, replayed, ops = math.inf, math.inf, 0
    with torch_threads(threads):
        simulate_epoch(stage, samples=2).replay()  # warm-up: lazy init of torch and the corpus
        for _ in range(repeats):
            sim = simulate_epoch(stage, samples=samples)
            verdict = sim.replay()
            if not verdict.passed:
                raise RuntimeError(f"honest work failed its replay: {verdict.failure}")
            miner, replayed, ops = (
                min(miner, sim.miner_compute_s),
                min(replayed, verdict.replay_s),
                verdict.ops,
            )
    return {
        "stage": stage,
        "samples": samples,
        "ops": ops,
        "miner_compute_s": miner,
        "replay_s": replayed,
        "ratio": replayed / miner,
    }


# ---------------------------------------------------------------------------------------------------------
# Calibration

STAGE_NAMES = {0: "head", 1: "body", 2: "tail"}
# name -> (miner's autocast, miner's torch threads, wire overrides)
CONDITIONS: dict[str, tuple[bool, int | None, dict[str, Any]]] = {
    "same": (False, None, {}),
    "threads": (False, 1, {}),
    "bf16": (True, None, {}),
    "bf16+int8wire": (True, None, {"wire_dtype": "bfloat16", "wire_int8": True}),
}
CHEATS: tuple[Behavior, ...] = ("random-output", "scaled-output", "copy-input", "zero-grad", "wrong-loss")
KINDS: tuple[CheckKind, ...] = ("forward", "backward", "tail_grad", "loss", "pseudo_gradient", "steps")


def measure(sim: Simulation, horizon: int | None = None) -> dict[str, dict[str, float]]:
    """Replay with infinite tolerances; per kind the smallest and largest error of its checks."""
    errors: dict[str, list[float]] = {}
    sim.replay(INFINITE, horizon=horizon, on_check=lambda _i, kind, e: errors.setdefault(kind, []).append(e))
    return {kind: {"min": min(v), "max": max(v), "checks": len(v)} for kind, v in errors.items()}


def steps_within_tolerance(sim: Simulation, tolerances: Tolerances = DEFAULT_TOLERANCES) -> int | None:
    """Replaying the whole epoch, the optimizer steps the replay had taken before the first op whose error
    passed its tolerance: how far honest drift lets a replay check (None: the whole epoch passed)."""
    limits = {
        "forward": tolerances.forward,
        "backward": tolerances.backward,
        "tail_grad": tolerances.backward,
        "loss": tolerances.loss,
    }
    first: list[int] = []

    def on_check(index: int, kind: CheckKind, error: float) -> None:
        if index >= 0 and kind in limits and error > limits[kind]:
            first.append(index)

    sim.replay(INFINITE, on_check=on_check)
    if not first:
        return None
    return sum(op.kind != "forward" for op in sim.task.ops[: min(first)])


def calibrate(
    *,
    samples: int = 32,
    stages: Sequence[int] = (0, 1, 2),
    conditions: Sequence[str] = tuple(CONDITIONS),
    cheats: Sequence[Behavior] = CHEATS,
    replay_threads: int = 2,
    tolerances: Tolerances = DEFAULT_TOLERANCES,
    cost: bool = True,
) -> dict[str, Any]:
    """Worst honest errors per condition, stage and kind; per cheat and stage the errors of every kind, and
    which check fails it under `tolerances`. Replays run in fp32 on `replay_threads` torch threads.
    `cost`: also time a replay against the miner's compute per stage (`replay_cost`)."""
    began = time.perf_counter()
    honest: dict[str, dict[str, dict[str, float]]] = {}
    drift: dict[str, dict[str, int | None]] = {}
    cheat: dict[str, dict[str, Any]] = {}
    with torch_threads(replay_threads):
        for name in conditions:
            autocast, threads, wire = CONDITIONS[name]
            training = TRAINING.model_copy(update=wire)
            honest[name] = {}
            # A bf16 miner against an fp32 replay is a cross-regime replay: checked up to the horizon.
            horizon = CROSS_REGIME_HORIZON if autocast else None
            for stage in stages:
                sim = simulate_epoch(
                    stage, samples=samples, autocast=autocast, threads=threads, training=training
                )
                stats = measure(sim, horizon)
                honest[name][STAGE_NAMES[stage]] = {kind: s["max"] for kind, s in stats.items()}
                drift.setdefault(name, {})[STAGE_NAMES[stage]] = steps_within_tolerance(sim, tolerances)
        for behavior in cheats:
            cheat[behavior] = {}
            for stage in stages:
                sim = simulate_epoch(stage, samples=samples, behavior=behavior)
                verdict = sim.replay(tolerances)
                cheat[behavior][STAGE_NAMES[stage]] = {
                    "caught_by": None if verdict.passed else (verdict.failure or "").split(":", 1)[0],
                    "errors": measure(sim),
                }
    costs = {}
    if cost:
        for stage in stages:
            costs[STAGE_NAMES[stage]] = replay_cost(stage, samples=samples, threads=replay_threads)
    return {
        "settings": {
            "preset": "tiny",
            "stages": 3,
            "samples": samples,
            "batch_size": 2,
            "seq_len": 32,
            "depth": 2,
            "training": TRAINING.model_dump(),
            "replay": f"fp32 on the CPU, {replay_threads} torch threads",
            "torch": torch.__version__,
        },
        "tolerances": asdict(tolerances),
        "honest": honest,
        "honest_worst": {
            name: {kind: max(h.get(kind, 0.0) for h in per_stage.values()) for kind in KINDS}
            for name, per_stage in honest.items()
        },
        "cross_regime_horizon": CROSS_REGIME_HORIZON,
        # per condition and stage: steps a whole-epoch replay stayed within tolerance (None: all of them)
        "steps_within_tolerance": drift,
        "cheats": cheat,
        **({"cost": costs} if cost else {}),
        "elapsed_s": time.perf_counter() - began,
    }


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.2g}"


def print_table(result: dict[str, Any]) -> None:
    kinds = KINDS
    tol = result["tolerances"]
    limits = {
        "forward": tol["forward"],
        "backward": tol["backward"],
        "tail_grad": tol["backward"],
        "loss": tol["loss"],
        "pseudo_gradient": tol["pseudo_gradient"],
        "steps": 0.0,
    }
    print("Worst honest error (relative L2; loss: nats; steps: count), replayed in fp32:")
    print(f"{'condition':<16}{'stage':<7}" + "".join(f"{k:>17}" for k in kinds))
    for name, per_stage in result["honest"].items():
        for stage, worst in per_stage.items():
            print(f"{name:<16}{stage:<7}" + "".join(f"{_fmt(worst.get(k)):>17}" for k in kinds))
    print(f"{'tolerance':<23}" + "".join(f"{_fmt(limits[k]):>17}" for k in kinds))
    print(
        f"\nOptimizer steps a whole-epoch replay stays within tolerance (bf16 rows above are replayed up to "
        f"the cross-regime horizon, {result['cross_regime_horizon']} steps; '-': the whole epoch):"
    )
    for name, per_stage in result["steps_within_tolerance"].items():
        print(
            f"{name:<16}"
            + "".join(f"{stage}: {'-' if n is None else n:<8}" for stage, n in per_stage.items())
        )
    print("\nCheats (smallest error of each kind over the epoch; * = above tolerance):")
    print(f"{'behaviour':<16}{'stage':<7}{'caught by':<17}" + "".join(f"{k:>17}" for k in kinds))
    for behavior, per_stage in result["cheats"].items():
        for stage, found in per_stage.items():
            cells = []
            for k in kinds:
                s = found["errors"].get(k)
                mark = "*" if s is not None and s["max"] > limits[k] else ""
                cells.append(f"{(_fmt(s['min']) if s else '-') + mark:>17}")
            print(f"{behavior:<16}{stage:<7}{found['caught_by'] or 'PASSED':<17}" + "".join(cells))
    if "cost" in result:
        print("\nCost of a replay (honest fp32 work, the miner and the replay on the same CPU and threads):")
        print(f"{'stage':<7}{'ops':>6}{'miner compute s':>17}{'replay s':>11}{'ratio':>8}")
        for stage, c in result["cost"].items():
            print(
                f"{stage:<7}{c['ops']:>6}{c['miner_compute_s']:>17.3f}{c['replay_s']:>11.3f}{c['ratio']:>8.2f}"
            )
    print(f"\n{result['elapsed_s']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=32, help="Samples per simulated epoch.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    args = parser.parse_args(argv)
    result = calibrate(samples=args.samples)
    emit(result, OUT_DIR / "replay.json", as_json=args.json, print_table=print_table)


if __name__ == "__main__":
    main()
