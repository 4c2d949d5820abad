"""Peak memory and throughput of each pipeline stage, trained as a miner trains it.

fp32 master weights, fp32 AdamW state, bf16 autocast on CUDA (fp32 on CPU). Each step runs forward on a
boundary tensor (tokens for the head), backward from the tail's loss or from a gradient of the boundary's
shape, and an optimizer step. `--in-flight K` keeps K forwards' autograd state alive before their backwards,
as a miner with K outstanding items does.

    python bench/stage_memory.py --preset 1.5b --batch 1 --seq 1024 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.model import build_stage, get_preset, next_token_loss  # noqa: E402

GIB = 2**30


def measure_stage(
    preset: str, stage: int, batch: int, seq: int, in_flight: int, steps: int, device: torch.device
) -> dict[str, float | int | str]:
    cfg = get_preset(preset)
    module = build_stage(cfg, stage, seed=0, device=device)
    params = sum(p.numel() for p in module.parameters())
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    generator = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator).to(device)
    boundary = torch.randn(batch, seq, cfg.bottleneck_dim, generator=generator).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def one_step() -> None:
        pending = []
        for _ in range(in_flight):
            x = tokens if module.is_head else boundary.clone().requires_grad_(True)
            with autocast:
                out = module(x, tokens)
            pending.append(out)
        for out in pending:
            if module.is_tail:
                next_token_loss(out, tokens).backward()
            else:
                out.backward(torch.ones_like(out) * 1e-3)
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

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


def main() -> None:
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
    args = parser.parse_args()

    cfg = get_preset(args.preset)
    stages = range(cfg.n_stages) if args.stages == "all" else [int(s) for s in args.stages.split(",")]
    device = torch.device(args.device)
    results = []
    for stage in stages:
        r = measure_stage(args.preset, stage, args.batch, args.seq, args.in_flight, args.steps, device)
        results.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the stage's tensors died with measure_stage's frame
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
    if args.json:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(json.dumps({"device": device_name, "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
