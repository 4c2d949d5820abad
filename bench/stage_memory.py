"""Peak memory and throughput of each pipeline stage, trained as a miner trains it.

fp32 master weights, the run's inner optimizer as the preset chooses it (common/optim.py: AdamW, with the
vocabulary matrices of a `factored` preset on factored statistics), bf16 autocast on CUDA (fp32 on CPU), with
the orchestrator's default lr, betas and weight decay. Each step runs forward on a
boundary tensor (tokens for the head), backward from the tail's loss or from a gradient of the boundary's
shape, and an optimizer step. `--in-flight K` keeps K forwards' autograd state alive before their backwards,
as a miner with K outstanding items does.

    python bench/stage_memory.py --preset 1.5b --batch 1 --seq 1024 --json

`--max-batch-under GIB` also searches for the largest batch (at `--seq`) whose training step runs with the
CUDA allocator capped at GIB (`torch.cuda.set_per_process_memory_fraction`): what fits a smaller card. The
search builds the stage once, doubles the batch until a step runs out of memory or reaches `--batch-cap`,
then bisects. On the CPU there is no allocator to cap: every batch up to the cap "fits", which proves only
the plumbing (scripts/gpu_check.sh --dry-run).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from collections.abc import Callable
from typing import Any

import torch

if not __package__:  # run as `python bench/<name>.py`, not `-m bench.<name>`: see bench/_repo_root.py
    import _repo_root  # noqa: F401

from common.model import build_stage, get_preset, next_token_loss
from common.optim import build_inner_optimizer
from orchestrator.settings import OrchestratorSettings, training_spec

GIB = 2**30


def measure_stage(
    preset: str, stage: int, batch: int, seq: int, in_flight: int, steps: int, device: torch.device
) -> dict[str, float | int | str]:
    cfg = get_preset(preset)
    module = build_stage(cfg, stage, seed=0, device=device)
    params = sum(p.numel() for p in module.parameters())
    # The miner's own construction (fused AdamW on CUDA), from the orchestrator's default hyperparameters.
    optimizer = build_inner_optimizer(module, cfg, training_spec(OrchestratorSettings.model_construct()))
    generator = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator).to(device)
    boundary = torch.randn(batch, seq, cfg.bottleneck_dim, generator=generator).to(device)

    def one_step() -> None:
        train_step(module, optimizer, tokens, boundary, in_flight)

    one_step()  # warm-up: allocates optimizer state and autotunes kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result: dict[str, float | int | str] = {
        "preset": preset,
        "stage": stage,
        "role": "head" if module.is_head else "tail" if module.is_tail else "body",
        "parameters": params,
        "vocab_optimizer": cfg.vocab_optimizer,
        "batch": batch,
        "seq": seq,
        "in_flight": in_flight,
        "tokens_per_s": round(steps * in_flight * batch * seq / elapsed, 1),
        "step_s": round(elapsed / steps, 4),
    }
    if device.type == "cuda":
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    else:
        # The process's peak resident memory (Linux reports KiB): run one stage per process to read it.
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return result


# How an allocation failure reads when it does not come from torch's own allocator.
_OTHER_OOM = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def largest_batch(fits: Callable[[int], bool], cap: int) -> int:
    """The largest batch in 1..cap for which `fits` holds, for a `fits` that holds up to some batch and not
    above it: double from 1 until a batch does not fit (or the cap is reached), then bisect between the
    last batch that fit and the first that did not. 0 when batch 1 does not fit."""
    if cap < 1 or not fits(1):
        return 0
    good = 1
    while good < cap:
        trial = min(2 * good, cap)
        if not fits(trial):
            bad = trial
            break
        good = trial
    else:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def train_step(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    boundary: torch.Tensor,
    in_flight: int,
) -> None:
    """One training step as a miner runs it: `in_flight` forwards, their backwards, one step."""
    device = tokens.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    pending = []
    for _ in range(in_flight):
        x = tokens if module.is_head else boundary.clone().requires_grad_(True)
        with autocast:
            pending.append(module(x, tokens))
    for out in pending:
        if module.is_tail:
            next_token_loss(out, tokens).backward()
        else:
            out.backward(torch.ones_like(out) * 1e-3)
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def max_batch_under(
    preset: str, stage: int, seq: int, in_flight: int, budget_gib: float, cap: int, device: torch.device
) -> dict[str, Any]:
    """The largest batch of `seq` tokens whose training step runs within `budget_gib` of CUDA memory."""
    cfg = get_preset(preset)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        # The cap binds the caching allocator: a step that needs more raises OutOfMemoryError, as on a card
        # of that size (whose CUDA context is not counted here).
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GIB / total), device)
    module = build_stage(cfg, stage, seed=0, device=device)
    optimizer = build_inner_optimizer(module, cfg, training_spec(OrchestratorSettings.model_construct()))
    generator = torch.Generator(device="cpu").manual_seed(0)
    trials: list[dict[str, Any]] = []

    def fits(batch: int) -> bool:
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator).to(device)
        boundary = torch.randn(batch, seq, cfg.bottleneck_dim, generator=generator).to(device)
        if on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        out_of_memory = False
        try:
            train_step(module, optimizer, tokens, boundary, in_flight)
            if on_cuda:
                torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True  # the traceback (and the step's tensors it holds) goes with this block
        except RuntimeError as error:
            # A library that allocates outside the caching allocator (cuBLAS, cuDNN) says so in its own words.
            if not on_cuda or not any(s in str(error) for s in _OTHER_OOM):
                raise
            out_of_memory = True
        trial: dict[str, Any] = {"batch": batch, "fits": not out_of_memory}
        if out_of_memory:
            optimizer.zero_grad(set_to_none=True)
            del tokens, boundary
            gc.collect()
        else:
            trial["step_s"] = round(time.perf_counter() - start, 4)
        if on_cuda:
            trial["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
            torch.cuda.empty_cache()
        trials.append(trial)
        return not out_of_memory

    batch = largest_batch(fits, cap)
    if on_cuda:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return {
        "budget_gib": budget_gib,
        "batch": batch,
        "seq": seq,
        "in_flight": in_flight,
        "cap": cap,
        "capped": batch == cap,
        "criterion": (
            "a step runs with the CUDA allocator capped at budget_gib"
            if on_cuda
            else "cpu: no allocator to cap, every batch up to the cap fits (plumbing only)"
        ),
        "trials": trials,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="1.5b")
    parser.add_argument("--stages", default="all", help="comma-separated stage indices, or 'all'")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--max-batch-under",
        type=float,
        default=None,
        metavar="GIB",
        help="also find the largest batch at --seq whose step fits GIB of CUDA memory",
    )
    parser.add_argument("--batch-cap", type=int, default=256, help="the largest batch the search tries")
    args = parser.parse_args(argv)

    cfg = get_preset(args.preset)
    stages = range(cfg.n_stages) if args.stages == "all" else [int(s) for s in args.stages.split(",")]
    device = torch.device(args.device)
    results = []
    for stage in stages:
        r: dict[str, Any] = dict(
            measure_stage(args.preset, stage, args.batch, args.seq, args.in_flight, args.steps, device)
        )
        results.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the stage's tensors died with measure_stage's frame
        if args.max_batch_under is not None:
            search = max_batch_under(
                args.preset, stage, args.seq, args.in_flight, args.max_batch_under, args.batch_cap, device
            )
            r["max_batch"] = search
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        if not args.json:
            mem = (
                f"peak {r['peak_allocated_gib']} GiB allocated"
                if "peak_allocated_gib" in r
                else f"peak RSS {r['peak_rss_gib']} GiB"
            )
            print(
                f"{r['preset']} stage {r['stage']} ({r['role']}, {r['parameters'] / 1e6:.0f}M params) "
                f"batch {r['batch']}x{r['seq']} in-flight {r['in_flight']}: "
                f"{r['tokens_per_s']:,.0f} tok/s {mem}",
                flush=True,
            )
            if "max_batch" in r:
                m = r["max_batch"]
                print(f"  largest batch x {m['seq']} under {m['budget_gib']} GiB: {m['batch']}", flush=True)
    if args.json:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(json.dumps({"device": device_name, "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
