"""What the factored vocabulary optimizer costs: held-out loss and step time against AdamW.

Trains `tiny` in one process twice per seed, once with `vocab_optimizer="adamw"` (AdamW on every parameter)
and once with `"factored"` (AdamW on the blocks, common/optim.py's FactoredSecondMoment on the token
embeddings and the LM head), from the same init on the same samples in the same order, and evaluates both
on the same held-out batches. Each stage steps its own inner optimizer, built by `build_inner_optimizer`
exactly as a miner builds it, after its own gradient clip; the wire is left out (fp32 on the wire is
lossless: bench/compression.py measures what a bottleneck or int8 costs). The data, the sample schedule and
the run's hyperparameters are bench/compression.py's.

The result gives, per seed, the paired held-out gap of factored against AdamW in percent, and its mean with
a 95% Student's t interval over the seeds: single runs at this budget differ by a few percent between seeds,
so only the interval says whether a gap is real. It also times one optimizer step of each kind on a
128256-row matrix (the 128k vocabulary, `--step-cols` wide) to give the speed cost per element.

    python bench/optim_quality.py --seeds 0-7 --json      # the comparison (tens of minutes of a core)
    python bench/optim_quality.py --quick --json          # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

if not __package__:  # run as `python bench/<name>.py`, not `-m bench.<name>`: see bench/_repo_root.py
    import _repo_root  # noqa: F401

from bench.compression import RUN, Data, mean_interval, parse_seeds
from bench.report import emit
from common.data import LocalTextCorpus, SampleSchedule, stdlib_source_dir
from common.model import IotaModel, get_preset, next_token_loss
from common.optim import FactoredSecondMoment, build_inner_optimizer
from orchestrator.settings import training_spec

OUT = Path(__file__).resolve().parent / "out" / "optim_quality.json"
SETTINGS = ("adamw", "factored")
SPEC = training_spec(RUN)


def run_setting(
    choice: str, preset: str, data: Data, steps: int, eval_batches: int, seed: int
) -> dict[str, Any]:
    cfg = get_preset(preset, vocab_optimizer=choice)
    torch.manual_seed(seed)
    model = IotaModel(cfg, seed=seed)
    optimizers = [build_inner_optimizer(stage, cfg, SPEC) for stage in model.stages]
    losses, seconds = [], 0.0
    for index in range(steps):
        tokens = data.train(index)
        start = time.perf_counter()
        loss = next_token_loss(model(tokens), tokens)
        loss.backward()
        for stage, optimizer in zip(model.stages, optimizers, strict=True):  # each miner its own stage
            torch.nn.utils.clip_grad_norm_(stage.parameters(), SPEC.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        losses.append(loss.item())
    with torch.no_grad():
        heldout = [next_token_loss(model(t), t).item() for t in map(data.heldout, range(eval_batches))]
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "first_train_loss": round(losses[0], 4),
        "final_train_loss": round(sum(tail) / len(tail), 4),
        "heldout_loss": round(sum(heldout) / len(heldout), 4),
        "step_s": round(seconds / len(losses), 4),
    }


def time_steps(rows: int, cols: int, repeats: int) -> dict[str, float]:
    """Seconds per optimizer step of a rows x cols matrix (a dense gradient), best of `repeats`."""
    generator = torch.Generator().manual_seed(0)
    result = {}
    for choice in SETTINGS:
        weight = torch.nn.Parameter(torch.randn(rows, cols, generator=generator) * 0.02)
        weight.grad = torch.randn(rows, cols, generator=generator)
        optimizer: torch.optim.Optimizer
        if choice == "adamw":
            betas = (SPEC.beta1, SPEC.beta2)
            optimizer = torch.optim.AdamW([weight], lr=SPEC.lr, betas=betas, weight_decay=SPEC.weight_decay)
        else:
            optimizer = FactoredSecondMoment(
                [weight], lr=SPEC.lr, beta2=SPEC.beta2, weight_decay=SPEC.weight_decay
            )
        optimizer.step()  # allocates the state
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            optimizer.step()
            best = min(best, time.perf_counter() - start)
        result[f"{choice}_step_s"] = round(best, 4)
        del optimizer, weight
    result["factored_over_adamw"] = round(result["factored_step_s"] / result["adamw_step_s"], 2)
    return result


def run(args: argparse.Namespace, seeds: list[int]) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    steps = max(1, args.tokens // (args.batch_size * args.seq_len))
    corpus = LocalTextCorpus(stdlib_source_dir())
    started = time.perf_counter()
    runs = []
    for seed in seeds:
        data = Data(corpus, SampleSchedule(corpus, seed=seed), args.batch_size, args.seq_len)
        settings = {c: run_setting(c, args.preset, data, steps, args.eval_batches, seed) for c in SETTINGS}
        base = settings["adamw"]["heldout_loss"]
        gap = round(100 * (settings["factored"]["heldout_loss"] - base) / base, 3)
        runs.append({"seed": seed, "settings": settings, "heldout_gap_pct": gap})
        if not args.json:
            print(
                f"seed {seed}: adamw {base}, factored {settings['factored']['heldout_loss']} ({gap:+.2f}%), "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
    summary = {
        choice: {
            "heldout_loss": mean_interval([r["settings"][choice]["heldout_loss"] for r in runs]),
            "step_s": mean_interval([r["settings"][choice]["step_s"] for r in runs]),
        }
        for choice in SETTINGS
    }
    return {
        "preset": args.preset,
        "seeds": seeds,
        "tokens": steps * args.batch_size * args.seq_len,
        "steps": steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "eval_batches": args.eval_batches,
        "torch_threads": args.threads,
        "optimizer": {
            "lr": SPEC.lr,
            "weight_decay": SPEC.weight_decay,
            "betas": [SPEC.beta1, SPEC.beta2],
            "grad_clip": SPEC.grad_clip,
        },
        "heldout_gap_pct": mean_interval([r["heldout_gap_pct"] for r in runs]),
        "summary": summary,
        "step_timing": {
            "rows": args.step_rows,
            "cols": args.step_cols,
            **time_steps(args.step_rows, args.step_cols, args.step_repeats),
        },
        "wall_s": round(time.perf_counter() - started, 1),
        "runs": runs,
    }


def print_table(result: dict[str, Any]) -> None:
    gap = result["heldout_gap_pct"]
    ci = "-" if gap["ci95_low"] is None else f"[{gap['ci95_low']:+.2f}, {gap['ci95_high']:+.2f}]"
    print(
        f"{result['preset']}, seeds {result['seeds']}, {result['tokens']:,} tokens per run, "
        f"{result['wall_s']} s"
    )
    for choice, s in result["summary"].items():
        print(f"  {choice:9} held-out {s['heldout_loss']['mean']:.4f}, step {s['step_s']['mean']:.3f} s")
    print(f"  factored - adamw held-out gap: {gap['mean']:+.2f}% (95% CI {ci})")
    t = result["step_timing"]
    print(
        f"  one step of a {t['rows']} x {t['cols']} matrix: adamw {t['adamw_step_s']} s, factored "
        f"{t['factored_step_s']} s ({t['factored_over_adamw']}x)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seeds", default="0-7", help="e.g. 0-7 or 0,3,5: one paired run of each per seed")
    parser.add_argument("--tokens", type=int, default=163_840, help="training tokens per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--step-rows", type=int, default=128_256, help="rows of the timed matrix")
    parser.add_argument("--step-cols", type=int, default=512, help="columns of the timed matrix")
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.tokens, args.batch_size, args.seq_len, args.eval_batches = (
            "0,1",
            3 * 2 * 32,
            2,
            32,
            1,
        )
        args.step_rows, args.step_cols, args.step_repeats = 1024, 64, 1
    emit(run(args, parse_seeds(args.seeds)), args.out, as_json=args.json, print_table=print_table)


if __name__ == "__main__":
    main()
