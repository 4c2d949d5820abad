"""Training-step speed of our model against Hugging Face transformers' Llama of the same size and shape.

Builds the whole `IotaModel` (every stage, bottlenecks included) and a `LlamaForCausalLM` from a
`LlamaConfig` mapped field by field from ours (random init; never from the Hub), then times a full training
step of each (forward, loss, backward, AdamW step, zero_grad) at the same batch x seq. The two models' steps
alternate (ABAB) so that noise from other processes on the machine hits both alike; the figure is the
median step after warm-up. The loss is the same function for both (`next_token_loss`, fp32 cross-entropy).
On the CPU it also reports process CPU time per step, and for both clocks the median of the per-round
ratios (each round's two steps ran back to back): steadier figures on a shared machine.

    python bench/model.py                                    # tiny, CPU fp32, 1 torch thread
    python bench/model.py --preset 100m --warmup 1 --steps 10 --json
    python bench/model.py --ratio 1                          # ours without bottlenecks: the same parameters
    python bench/model.py --preset 1.5b --device cuda --dtype bf16 [--compile]   # bf16 autocast on CUDA

The two parameter counts differ by the bottleneck layers alone: per stage boundary, the encoder's RMSNorm
(d) and projection (d x b), the decoder's projection (b x d), and the next stage's own token embedding
(vocab x token_dim, projected up to d when narrower). 1.5b holds both models with fp32 weights
and AdamW state at once (about 50 GB before activations), so it needs a large GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

if not __package__:  # run as `python bench/<name>.py`, not `-m bench.<name>`: see bench/_repo_root.py
    import _repo_root  # noqa: F401

from common.model import IotaModel, ModelConfig, get_preset, next_token_loss

# batch, seq per preset: what one CPU thread steps through in seconds (tiny: the devnet's batch shape).
DEFAULT_SHAPE = {"tiny": (8, 256), "100m": (2, 256), "1.5b": (4, 1024)}
QUICK_SHAPE = (2, 64)
CUDA_ONLY = {"1.5b"}


def hf_config(cfg: ModelConfig) -> Any:
    """Ours as a transformers LlamaConfig: same vocab, widths, depth, heads, RoPE, norm eps, untied head."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False,  # our LM head is untied
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        use_cache=False,
    )


def build_hf(cfg: ModelConfig, device: torch.device) -> nn.Module:
    from transformers import LlamaForCausalLM

    # sdpa: the same attention kernel family ours uses, so the comparison is of everything around it.
    model = LlamaForCausalLM._from_config(hf_config(cfg), attn_implementation="sdpa", dtype=torch.float32)
    return model.to(device)


def bottleneck_parameters(cfg: ModelConfig) -> int:
    """What our model holds beyond a plain Llama: per boundary an encoder norm + projection, a decoder and
    the next stage's token embedding."""
    if cfg.bottleneck_ratio == 1:  # no bottleneck: the stages hand on the residual stream as it is
        return 0
    d, b, e = cfg.d_model, cfg.bottleneck_dim, cfg.token_dim
    tokens = cfg.vocab_size * e + (e * d if e < d else 0) if cfg.stage_tokens else 0
    return (cfg.n_stages - 1) * (d + d * b + b * d + tokens)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def ours_shape(model: IotaModel) -> dict[str, Any]:
    """The shape read back from the built modules, not from the config, so a mismatch would show."""
    head, tail = model.stages[0], model.stages[-1]
    blocks = [block for stage in model.stages for block in stage.blocks]
    attn = blocks[0].attn
    return {
        "vocab": head.embed.num_embeddings,
        "d_model": head.embed.embedding_dim,
        "layers": len(blocks),
        "heads": attn.n_heads,
        "kv_heads": attn.wk.out_features // attn.head_dim,
        "head_dim": attn.head_dim,
        "ffn": blocks[0].mlp.w1.out_features,
        "rope_theta": model.cfg.rope_theta,
        "norm_eps": tail.norm.eps,
        "tied": tail.lm_head.weight.data_ptr() == head.embed.weight.data_ptr(),
    }


def hf_shape(model: nn.Module) -> dict[str, Any]:
    c = model.config
    layer = model.model.layers[0]
    return {
        "vocab": model.model.embed_tokens.num_embeddings,
        "d_model": model.model.embed_tokens.embedding_dim,
        "layers": len(model.model.layers),
        "heads": c.num_attention_heads,
        "kv_heads": layer.self_attn.k_proj.out_features // layer.self_attn.head_dim,
        "head_dim": layer.self_attn.head_dim,
        "ffn": layer.mlp.gate_proj.out_features,
        "rope_theta": c.rope_parameters["rope_theta"],
        "norm_eps": model.model.norm.variance_epsilon,
        "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
    }


class Trainer:
    """One model, its AdamW and its compiled-or-not forward: `step` runs and times one training step."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        logits_of: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        device: torch.device,
        dtype: str,
        compile_model: bool,
    ) -> None:
        self.name, self.model, self.device = name, model, device
        # fused AdamW where torch has it (CUDA); the same optimizer settings for both models either way.
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda"
        )
        self.forward = torch.compile(model) if compile_model else model
        self.logits_of = logits_of
        self.autocast = dtype == "bf16"
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []

    def step(self, tokens: torch.Tensor) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        ctx = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.autocast
            else contextlib.nullcontext()
        )
        with ctx:
            logits = self.logits_of(self.forward, tokens)
        loss = next_token_loss(logits, tokens)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        self.times.append(time.perf_counter() - start)
        # CPU seconds of this process: on a shared machine, time spent descheduled does not count.
        self.cpu_times.append(time.process_time() - cpu_start)
        self.losses.append(loss.item())


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.preset in CUDA_ONLY and device.type != "cuda":
        raise SystemExit(f"{args.preset} is only benchmarked on CUDA (--device cuda)")
    if args.dtype == "bf16" and device.type != "cuda":
        print(
            "note: bf16 autocast on the CPU is not the miners' regime; measuring it anyway", file=sys.stderr
        )
    torch.set_num_threads(args.threads)
    batch, seq = QUICK_SHAPE if args.quick else DEFAULT_SHAPE[args.preset]
    batch, seq = args.batch or batch, args.seq or seq
    cfg = get_preset(args.preset, **({"bottleneck_ratio": args.ratio} if args.ratio else {}))
    if seq > cfg.max_seq_len:
        raise SystemExit(f"--seq {seq} exceeds {args.preset}'s max_seq_len {cfg.max_seq_len}")

    torch.manual_seed(0)  # HF draws its init from the global generator; ours seeds its own per stage
    ours = IotaModel(cfg, seed=0, device=device)
    hf = build_hf(cfg, device)
    ours.train()
    hf.train()
    trainers = [
        Trainer("ours", ours, lambda m, t: m(t), device, args.dtype, args.compile),
        Trainer(
            "hf", hf, lambda m, t: m(input_ids=t, use_cache=False).logits, device, args.dtype, args.compile
        ),
    ]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator).to(device)
    # ABAB: each round steps both models back to back, so a burst of load on the machine hits both.
    for _ in range(args.warmup + args.steps):
        for trainer in trainers:
            trainer.step(tokens)

    on_cpu = device.type == "cpu"

    def summary(t: Trainer) -> dict[str, Any]:
        timed = t.times[args.warmup :]
        median = statistics.median(timed)
        return {
            "step_s": round(median, 5),
            "min_step_s": round(min(timed), 5),
            # On CUDA the host's CPU time says nothing about the step: wall time only.
            "cpu_step_s": round(statistics.median(t.cpu_times[args.warmup :]), 5) if on_cpu else None,
            "tokens_per_s": round(batch * seq / median, 1),
            "first_loss": round(t.losses[0], 4),
            "times_s": [round(x, 5) for x in timed],
            "cpu_times_s": [round(x, 5) for x in t.cpu_times[args.warmup :]] if on_cpu else None,
        }

    def paired(a: list[float], b: list[float]) -> float:
        """The median of the per-round ratios: a round's two steps ran back to back, under the same load."""
        return round(statistics.median(x / y for x, y in zip(a, b, strict=True)), 3)

    ours_summary, hf_summary = summary(trainers[0]), summary(trainers[1])
    ours_params, hf_params = count(ours), count(hf)
    return {
        "preset": args.preset,
        "bottleneck_ratio": cfg.bottleneck_ratio,
        "device": str(device),
        "dtype": args.dtype,
        "compile": args.compile,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "batch": batch,
        "seq": seq,
        "warmup": args.warmup,
        "steps": args.steps,
        "ours_shape": ours_shape(ours),
        "hf_shape": hf_shape(hf),
        "ours_params": ours_params,
        "hf_params": hf_params,
        "bottleneck_params": bottleneck_parameters(cfg),
        "ours": ours_summary,
        "hf": hf_summary,
        "ours_step_s": ours_summary["step_s"],
        "hf_step_s": hf_summary["step_s"],
        # < 1: ours is faster. The target is <= 1.
        "ratio": round(ours_summary["step_s"] / hf_summary["step_s"], 3),
        # The same on process CPU time, the steadier figure where other processes share the cores.
        "cpu_ratio": round(ours_summary["cpu_step_s"] / hf_summary["cpu_step_s"], 3) if on_cpu else None,
        "paired_ratio": paired(trainers[0].times[args.warmup :], trainers[1].times[args.warmup :]),
        "paired_cpu_ratio": (
            paired(trainers[0].cpu_times[args.warmup :], trainers[1].cpu_times[args.warmup :])
            if on_cpu
            else None
        ),
    }


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_table(r: dict[str, Any]) -> None:
    print(
        f"{r['preset']} ({r['bottleneck_ratio']}x bottleneck) on {r['device']} "
        f"({r['dtype']}{', compiled' if r['compile'] else ''}, "
        f"{r['threads']} torch thread{'s' if r['threads'] != 1 else ''}), batch {r['batch']} x {r['seq']}, "
        f"median of {r['steps']} steps after {r['warmup']} warm-up, steps interleaved"
    )
    print(f"torch {r['torch']}, transformers {r['transformers']}")
    print(
        f"{'model':6} {'parameters':>13} {'step s':>9} {'min s':>9} {'CPU s':>9} {'tokens/s':>10} "
        f"{'1st loss':>8}"
    )
    for name, params in (("ours", r["ours_params"]), ("hf", r["hf_params"])):
        s = r[name]
        print(
            f"{name:6} {params:>13,} {s['step_s']:>9.4f} {s['min_step_s']:>9.4f} {_fmt(s['cpu_step_s']):>9} "
            f"{s['tokens_per_s']:>10,.1f} {s['first_loss']:>8.4f}"
        )
    print(
        f"ratio ours/hf: {r['ratio']:.3f} wall, {_fmt(r['cpu_ratio'], 3)} CPU time; median of per-round "
        f"ratios {r['paired_ratio']:.3f} wall, {_fmt(r['paired_cpu_ratio'], 3)} CPU time"
    )
    print(
        f"(parameter difference {r['ours_params'] - r['hf_params']:,}: "
        f"the bottlenecks, {r['bottleneck_params']:,} expected)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(DEFAULT_SHAPE))
    parser.add_argument("--ratio", type=int, default=0, help="bottleneck ratio; 0: the preset's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=0, help="0: the preset's default")
    parser.add_argument("--seq", type=int, default=0, help="0: the preset's default")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help=f"batch x seq {QUICK_SHAPE}, for the tests")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
