"""CLASP calibration: how many loss records it takes to flag a miner that corrupts its outputs, and how often
an honest miner is flagged.

Semi-synthetic, with real losses. `loss_pool` trains the tiny preset (3 `StageTrainer`s chained, batch 2,
seq 32, on the offline corpus) for a few hundred steps, then measures the loss of a pool of fresh samples
(the next indices of the run's `SampleSchedule`, as the loss log would see them) honestly and with stage
1's output (the body's) replaced by each cheating `BehaviorPolicy`: the paired per-sample losses give the
honest loss distribution and each behaviour's damage.

`detection_table` then simulates loss logs (`LossRecord`s): 3 stages, k miners per stage, each sample
routed to a uniformly random miner per stage, its loss a resampled honest pool loss plus a linear downward
trend across the log (`trend_drop` nats from first to last record); miner 0 of stage 1 corrupts a fraction
f of its samples (their loss is the same pool sample's corrupted loss). Per trial CLASP runs on the log
(`validator.clasp.estimate_effects`, default config). Detection: the share of trials in which the bad miner
is flagged. False positives: the share of honest (miner, trial) pairs flagged, counting only miners that
can be flagged (stages 0 and 1: the tail is never flagged). An all-honest sweep measures false positives
with no cheat at all.

    python bench/clasp_sim.py            # the table
    python bench/clasp_sim.py --json     # the figures as JSON (also written to bench/out/clasp.json)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

if not __package__:  # run as `python bench/<name>.py`, not `-m bench.<name>`: see bench/_repo_root.py
    import _repo_root  # noqa: F401

from bench.replay_sim import SEED, TRAINING, default_corpus, torch_threads
from bench.report import emit
from common.data import SampleSchedule, batch_tokens
from common.model import get_preset
from common.protocol import LossRecord
from common.training import StageTrainer
from miner.behaviors import Behavior, BehaviorPolicy
from validator.clasp import ClaspConfig, estimate_effects

OUT_DIR = Path(__file__).resolve().parent / "out"
N_STAGES = 3
BAD_STAGE = 1  # the body: not the tail (whose miner reports the loss) and its input is activations
BAD_MINER = f"s{BAD_STAGE}m0"
BATCH, SEQ = 2, 32
CHEATS: tuple[Behavior, ...] = ("random-output", "scaled-output", "copy-input")
SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
FRACTIONS = (1.0, 0.5, 0.25, 0.1)


@dataclass(frozen=True)
class LossPool:
    """Per-sample losses of the same pool of samples, honest and under each cheat at `BAD_STAGE`."""

    honest: np.ndarray
    corrupted: dict[str, np.ndarray]
    train_steps: int
    final_train_loss: float
    elapsed_s: float


def _train(trainers: list[StageTrainer], schedule: SampleSchedule, steps: int) -> float:
    """Plain sequential pipeline training (no pipelining: CLASP needs a model, not a schedule); the last
    step's loss."""
    corpus = schedule.corpus
    loss = float("nan")
    for i in range(steps):
        tokens = batch_tokens(corpus, schedule.batch(i, BATCH), SEQ)
        h0 = trainers[0].forward(f"{i}.0", tokens)
        h1 = trainers[1].forward(f"{i}.1", h0, tokens)
        loss, grad = trainers[2].tail_step(h1, tokens)
        trainers[2].commit()
        g1 = trainers[1].backward(f"{i}.1", grad)
        trainers[1].commit()
        assert g1 is not None
        trainers[0].backward(f"{i}.0", g1)
        trainers[0].commit()
    return loss


def _pool_losses(
    trainers: list[StageTrainer], tokens: torch.Tensor, first: int, behavior: Behavior
) -> np.ndarray:
    """Loss of each sample of `tokens` (pool, batch, seq) with the body's output sent as `behavior` would;
    the behaviour sees one network sample at a time, as a miner does (random-output's std and seed are
    per item)."""
    pool = tokens.shape[0]
    flat = tokens.reshape(-1, SEQ)
    policy = BehaviorPolicy(behavior)
    with torch.inference_mode():
        h0 = trainers[0].module(flat)
        h1 = trainers[1].module(h0, flat)
        sent = torch.cat(
            [
                policy.forward_output(
                    f"{first + j}.{BAD_STAGE}.f",
                    h0[j * BATCH : (j + 1) * BATCH],
                    h1[j * BATCH : (j + 1) * BATCH],
                )
                for j in range(pool)
            ]
        )
        logits = trainers[2].module(sent, flat)
        ce = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), flat[:, 1:].reshape(-1), reduction="none"
        )
    # The mean over the sample's BATCH rows, as the tail's `next_token_loss` reports it.
    return ce.reshape(pool, -1).mean(dim=1).double().numpy()


@cache
def loss_pool(steps: int = 200, pool: int = 512, threads: int = 1, seed: int = SEED) -> LossPool:
    """Train, then measure the pool's losses (cached per process, so several benches share one). One torch
    thread by default: on a 2-core machine shared with another busy process, 2 threads took 800 s against
    72 s for 1 (the same losses).

    Reproducible run to run on one machine, but not across machines: the training's floating-point
    rounding depends on the CPU kernels torch picks (AVX-512, AVX2, ...) and on the torch version, and the
    training amplifies it. With seed 7 and 200 steps the mean damage of random outputs (on the first 96
    samples) was 1.54 nats on AVX-512 kernels, 0.71 on AVX2 and 1.48 on the scalar ones
    (`ATEN_CPU_CAPABILITY`); seeds 1 to 5 gave 0.73 to 2.18. After 40 steps it ranged from 0.06 to 1.12:
    the body's output matters little that early (the tail embeds the tokens itself), so a pool from a
    short run can show almost no damage."""
    began = time.perf_counter()
    torch.manual_seed(seed)
    cfg = get_preset("tiny", max_seq_len=64)
    corpus = default_corpus()
    schedule = SampleSchedule(corpus, seed)
    trainers = [StageTrainer(cfg, s, TRAINING, seed=seed) for s in range(N_STAGES)]
    with torch_threads(threads):
        final = _train(trainers, schedule, steps)
        tokens = torch.stack(
            [batch_tokens(corpus, schedule.batch(steps + j, BATCH), SEQ) for j in range(pool)]
        )
        honest = _pool_losses(trainers, tokens, steps, "honest")
        corrupted = {b: _pool_losses(trainers, tokens, steps, b) for b in CHEATS}
    return LossPool(honest, corrupted, steps, final, time.perf_counter() - began)


def simulate_log(
    rng: np.random.Generator,
    pool: LossPool,
    n: int,
    *,
    miners: int,
    behavior: Behavior = "honest",
    fraction: float = 0.0,
    trend_drop: float = 1.0,
) -> list[LossRecord]:
    """A loss log of `n` records; see the module doc. Hotkeys are `s{stage}m{index}`."""
    routes = rng.integers(miners, size=(n, N_STAGES))
    drawn = rng.integers(len(pool.honest), size=n)
    loss = pool.honest[drawn].copy()
    if behavior != "honest":
        bad = (routes[:, BAD_STAGE] == 0) & (rng.random(n) < fraction)
        loss[bad] = pool.corrupted[behavior][drawn[bad]]
    loss += trend_drop * (1.0 - np.arange(n) / max(n - 1, 1))
    names = [[f"s{s}m{m}" for m in range(miners)] for s in range(N_STAGES)]
    # model_construct: the values are built right here, and validating millions of records would dominate.
    return [
        LossRecord.model_construct(
            seq=i,
            sample=i,
            attempt=0,
            loss=value,
            at=1.7e9 + i,
            pathway=[names[s][m] for s, m in enumerate(route)],
        )
        for i, (value, route) in enumerate(zip(loss.tolist(), routes.tolist(), strict=True))
    ]


def _rates(
    rng: np.random.Generator,
    pool: LossPool,
    n: int,
    trials: int,
    miners: int,
    behavior: Behavior,
    fraction: float,
    config: ClaspConfig,
    trend_drop: float,
) -> dict[str, float]:
    detected = false_pos = honest_pairs = 0
    flaggable = {f"s{s}m{m}" for s in range(N_STAGES - 1) for m in range(miners)} - {BAD_MINER}
    if behavior == "honest":
        flaggable.add(BAD_MINER)
    for _ in range(trials):
        records = simulate_log(
            rng, pool, n, miners=miners, behavior=behavior, fraction=fraction, trend_drop=trend_drop
        )
        flagged = {e.hotkey for e in estimate_effects(records, N_STAGES, config) if e.flagged}
        detected += behavior != "honest" and BAD_MINER in flagged
        # Hotkeys seen in the log only; a miner a short log never routed to cannot be flagged or counted.
        false_pos += len(flagged & flaggable)
        honest_pairs += len(flaggable)
    return {
        "detection": detected / trials if behavior != "honest" else None,
        "false_positive": false_pos / honest_pairs,
    }


def _scenarios(
    behaviors: Sequence[Behavior], fractions: Sequence[float], *, all_cheats: bool
) -> list[tuple[Behavior, float]]:
    """random-output over every fraction; the other cheats on every forward (only when `all_cheats`, to
    keep the bench short); then the all-honest case."""
    out: list[tuple[Behavior, float]] = []
    for behavior in behaviors:
        if behavior == "random-output":
            out += [(behavior, f) for f in fractions]
        elif all_cheats:
            out.append((behavior, 1.0))
    return [*out, ("honest", 0.0)]


def detection_table(
    *,
    sizes: Sequence[int] = SIZES,
    fractions: Sequence[float] = FRACTIONS,
    behaviors: Sequence[Behavior] = CHEATS,
    miners_per_stage: Sequence[int] = (2, 3),
    trials: int = 30,
    seed: int = 0,
    config: ClaspConfig | None = None,
    trend_drop: float = 1.0,
    pool: LossPool | None = None,
) -> dict[str, Any]:
    """Detection and false-positive rates per (miners per stage, behaviour, fraction, records); deterministic
    given `seed` and the pool (which is not the same on every machine: see `loss_pool`). The cheats other than
    random-output run only with the first entry of `miners_per_stage`. Rows: a list of dicts with keys
    miners, behavior, fraction, records, detection (None for the all-honest rows), false_positive."""
    pool = pool or loss_pool()
    config = config or ClaspConfig()
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for k in miners_per_stage:
        for behavior, fraction in _scenarios(behaviors, fractions, all_cheats=k == miners_per_stage[0]):
            for n in sizes:
                # One stream per cell, so a cell's figures do not depend on which other cells ran.
                rng = np.random.default_rng([seed, k, n, int(fraction * 1000), _code(behavior)])
                rates = _rates(rng, pool, n, trials, k, behavior, fraction, config, trend_drop)
                rows.append({"miners": k, "behavior": behavior, "fraction": fraction, "records": n, **rates})
    return {
        "settings": {
            "preset": "tiny",
            "stages": N_STAGES,
            "bad_stage": BAD_STAGE,
            "batch_size": BATCH,
            "seq_len": SEQ,
            "train_steps": pool.train_steps,
            "pool": len(pool.honest),
            "trials": trials,
            "seed": seed,
            "trend_drop_nats": trend_drop,
            "clasp": asdict(config),
            "torch": torch.__version__,
            # the CPU kernels the pool was trained with: they change its losses (see `loss_pool`)
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "losses": _loss_summary(pool),
        "rows": rows,
        "elapsed_s": {"pool": pool.elapsed_s, "table": time.perf_counter() - began},
    }


def _code(behavior: str) -> int:
    return sum(behavior.encode())


def _loss_summary(pool: LossPool) -> dict[str, Any]:
    honest = pool.honest
    summary: dict[str, Any] = {
        "final_train_loss": pool.final_train_loss,
        "honest": {"mean": float(honest.mean()), "sd": float(honest.std())},
    }
    for behavior, losses in pool.corrupted.items():
        damage = losses - honest
        summary[behavior] = {
            "mean": float(losses.mean()),
            "damage_mean": float(damage.mean()),
            "damage_sd": float(damage.std()),
        }
    return summary


def records_needed(result: dict[str, Any], rate: float = 0.9) -> dict[str, dict[str, int | None]]:
    """Per miners-per-stage and scenario, the fewest records with detection >= `rate` (None: not reached)."""
    needed: dict[str, dict[str, int | None]] = {}
    for row in result["rows"]:
        if row["behavior"] == "honest":
            continue
        cell = needed.setdefault(str(row["miners"]), {})
        key = f"{row['behavior']} f={row['fraction']:g}"
        if row["detection"] >= rate and cell.get(key) is None:
            cell[key] = row["records"]
        else:
            cell.setdefault(key, None)
    return needed


def print_table(result: dict[str, Any]) -> None:
    losses = result["losses"]
    s = result["settings"]
    print(
        f"Loss pool: tiny preset after {s['train_steps']} steps, {s['pool']} samples "
        f"(batch {s['batch_size']}, seq {s['seq_len']}); "
        f"honest loss {losses['honest']['mean']:.3f} +- {losses['honest']['sd']:.3f} nats"
    )
    for behavior in CHEATS:
        if behavior in losses:
            d = losses[behavior]
            print(
                f"  {behavior:<14} at stage {s['bad_stage']}: "
                f"damage {d['damage_mean']:+.3f} +- {d['damage_sd']:.3f} nats"
            )
    sizes = sorted({r["records"] for r in result["rows"]})
    print(f"\nDetection rate (FP rate) over {s['trials']} trials; records in the log:")
    print(f"{'miners':<8}{'behaviour':<16}{'f':>6}" + "".join(f"{n:>14}" for n in sizes))
    cells: dict[tuple[int, str, float], dict[int, dict[str, float]]] = {}
    for r in result["rows"]:
        cells.setdefault((r["miners"], r["behavior"], r["fraction"]), {})[r["records"]] = r
    for (k, behavior, f), by_n in cells.items():
        line = f"{k:<8}{behavior:<16}{f:>6g}"
        for n in sizes:
            r = by_n.get(n)
            if r is None:
                line += f"{'-':>14}"
            elif behavior == "honest":
                line += f"{'FP ' + format(r['false_positive'], '.3f'):>14}"
            else:
                line += f"{r['detection']:>7.2f} ({r['false_positive']:.3f})"
        print(line)
    print(f"\npool {result['elapsed_s']['pool']:.0f} s, table {result['elapsed_s']['table']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=30, help="Simulated logs per cell.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the simulated logs.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    args = parser.parse_args(argv)
    result = detection_table(trials=args.trials, seed=args.seed)
    result["records_for_90pct"] = records_needed(result)
    emit(result, OUT_DIR / "clasp.json", as_json=args.json, print_table=print_table)


if __name__ == "__main__":
    main()
