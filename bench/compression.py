"""Compression against loss: how much the stage-boundary bottleneck and int8 on the wire cost the model.

Each setting trains the whole 3-stage model from the same seed on the same samples in the same order, for
the same token budget, then evaluates it on a fixed number of batches from the corpus's held-out shards.
Settings: no bottleneck ("none": bottleneck_ratio 1, the d-wide residual stream crosses) and ratios 32x,
64x, 128x and 256x, each with ("-int8") and without int8 quantisation on the wire.

Everything runs in ONE process. The pipeline's loss is the same computation as the whole model's (the
network only moves tensors: tests/test_model.py checks that stages trained as miners train them give the
whole model's loss and gradients), so the network itself adds nothing to the loss. What the wire does to
the numbers is kept: at every stage boundary the activation goes through the run's real wire path
(`common.wire.BoundaryWire`: the codec, fp32 or int8, then lz4) and is decoded on the other side, and on the
way back its gradient does the same. Bytes per hop are the lengths of those real payloads.

The optimiser is the miners' inner AdamW with the orchestrator's defaults (lr, weight decay, betas) and the
per-stage gradient clip. Final training loss is the mean over the last tenth of the steps; step time is
the mean wall time of an optimizer step (forward, both wire round trips, backward, step), data excluded.

The 128x investigation's variants of the bottleneck (a faster decoder, a random encoder start, pure
projections without the pass-through, an RMSNorm on z) are options here, not in the model: none of them
helped beyond the noise between seeds (docs/benchmarks.md), so the model keeps its design.

    python bench/compression.py --json          # the full sweep on tiny (about 23 min of one idle core)
    python bench/compression.py --quick --json  # a smoke run of a few seconds
    python bench/compression.py --settings none,128x --seeds 0-7 --json   # paired gaps over 8 seeds

With `--seeds`, every setting runs once per seed (the same seed for every setting, so each seed's runs are a
pair), and the result adds, per setting, the paired held-out gap against "none" on each seed, its mean and a
95% confidence interval (Student's t over the seeds). Single runs at this budget differ by several percent
between seeds, so only the interval says whether a gap is real.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

if not __package__:  # run as `python bench/<name>.py`, not `-m bench.<name>`: see bench/_repo_root.py
    import _repo_root  # noqa: F401

from bench.report import emit
from common.data import LocalTextCorpus, SampleSchedule, batch_tokens, stdlib_source_dir
from common.model import IotaModel, ModelConfig, get_preset, next_token_loss
from common.model.layers import BottleneckDecoder, BottleneckEncoder, RMSNorm
from common.wire import BoundaryWire
from orchestrator.settings import OrchestratorSettings, training_spec

OUT = Path(__file__).resolve().parent / "out" / "compression.json"
RATIOS = ("none", "32x", "64x", "128x", "256x")
ALL_SETTINGS = tuple(f"{r}{suffix}" for r in RATIOS for suffix in ("", "-int8"))
# The run defaults miners train with; `model_construct` so this process's IOTA_ environment cannot move them.
RUN = OrchestratorSettings.model_construct()


def parse_setting(key: str) -> tuple[int, bool]:
    """'128x-int8' -> (128, True); 'none' -> (1, False): ratio 1 is the model without a bottleneck."""
    ratio, _, suffix = key.partition("-")
    if suffix not in ("", "int8") or not (ratio == "none" or ratio.endswith("x") and ratio[:-1].isdigit()):
        raise ValueError(f"unknown setting {key!r}; settings look like none, 128x or 128x-int8")
    return (1 if ratio == "none" else int(ratio[:-1])), suffix == "int8"


def make_wire(cfg: ModelConfig, batch: int, seq: int, int8: bool) -> BoundaryWire:
    """The boundary wire of a run with the default wire dtype (fp32), lz4 on, and int8 on or off."""
    settings = RUN.model_copy(update={"wire_int8": int8, "wire_compress": True})
    return BoundaryWire.of(cfg, batch, seq, training_spec(settings))


@dataclass
class Meter:
    fwd_bytes: list[int] = field(default_factory=list)
    bwd_bytes: list[int] = field(default_factory=list)


class WireHop(torch.autograd.Function):
    """Identity in the maths, but the tensor really crosses the wire: encoded and decoded going forward,
    and its gradient encoded and decoded coming back, so int8's rounding reaches the loss and the weights."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, wire: BoundaryWire, meter: Meter | None) -> torch.Tensor:
        ctx.wire, ctx.meter = wire, meter
        data = wire.encode(x)
        if meter is not None:
            meter.fwd_bytes.append(len(data))
        return wire.decode(data)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        data = ctx.wire.encode(grad)
        if ctx.meter is not None:
            ctx.meter.bwd_bytes.append(len(data))
        return ctx.wire.decode(data), None, None


def forward_over_wire(
    model: IotaModel, tokens: torch.Tensor, wire: BoundaryWire, meter: Meter | None
) -> torch.Tensor:
    """The logits, with every boundary tensor (and, in backward, its gradient) sent through `wire`."""
    x: torch.Tensor = tokens
    for i, stage in enumerate(model.stages):
        x = stage(x, tokens)
        if i < len(model.stages) - 1:
            x = WireHop.apply(x, wire, meter)
    return x


# -- variants of the bottleneck for the 128x investigation (options of the bench, not of the model) ---


class NormedDecoder(nn.Module):
    """The decoder with an RMSNorm on z before its projection: the expansion sees z at a fixed scale,
    whatever the residual stream's magnitude does upstream."""

    def __init__(self, decoder: BottleneckDecoder, cfg: ModelConfig) -> None:
        super().__init__()
        self.inner, self.norm = decoder, RMSNorm(cfg.bottleneck_dim, cfg.norm_eps)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.pad(z, (0, self.inner.pad)) + self.inner.proj(self.norm(z))


class ProjectionEncoder(nn.Module):
    """A pure projection, no pass-through of the first b residual channels."""

    def __init__(self, encoder: BottleneckEncoder) -> None:
        super().__init__()
        self.inner = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.proj(self.inner.norm(x))


class ProjectionDecoder(nn.Module):
    def __init__(self, decoder: BottleneckDecoder) -> None:
        super().__init__()
        self.inner = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner.proj(z)


@dataclass(frozen=True)
class Variant:
    decoder_lr_mult: float = 1.0
    # "zero": the model's init, a pure pass-through at the start; "normal": N(0, init_std).
    encoder_init: str = "zero"
    passthrough: bool = True
    z_norm: bool = False
    stage_tokens: bool = True  # the model's design: later stages embed the token ids again

    def describe(self) -> str:
        parts = [f"decoder lr x{self.decoder_lr_mult:g}"] if self.decoder_lr_mult != 1 else []
        parts += [] if self.encoder_init == "zero" else [f"encoder init {self.encoder_init}"]
        parts += [] if self.passthrough else ["pure projection"]
        parts += ["RMSNorm on z"] if self.z_norm else []
        parts += [] if self.stage_tokens else ["no token embedding after the head"]
        return ", ".join(parts) or "default"


def apply_variant(model: IotaModel, variant: Variant, seed: int) -> None:
    cfg = model.cfg
    if not cfg.has_bottleneck:
        return
    generator = torch.Generator().manual_seed(seed)
    for stage in model.stages:
        if hasattr(stage, "encoder"):
            if variant.encoder_init == "normal" or not variant.passthrough:
                # A pure projection from zero would send zeros: it needs a random start.
                with torch.no_grad():
                    stage.encoder.proj.weight.normal_(0.0, cfg.init_std, generator=generator)
            if not variant.passthrough:
                stage.encoder = ProjectionEncoder(stage.encoder)
        if hasattr(stage, "decoder"):
            if not variant.passthrough:
                stage.decoder = ProjectionDecoder(stage.decoder)
            elif variant.z_norm:
                stage.decoder = NormedDecoder(stage.decoder, cfg)


def optimizer_for(model: IotaModel, variant: Variant) -> torch.optim.Optimizer:
    decoder = [p for n, p in model.named_parameters() if ".decoder." in n]
    rest = [p for n, p in model.named_parameters() if ".decoder." not in n]
    groups = [{"params": rest}]
    if decoder:
        groups.append({"params": decoder, "lr": RUN.lr * variant.decoder_lr_mult})
    return torch.optim.AdamW(groups, lr=RUN.lr, betas=(RUN.beta1, RUN.beta2), weight_decay=RUN.weight_decay)


# -- one setting ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    corpus: LocalTextCorpus
    schedule: SampleSchedule  # the same samples in the same order for every setting
    batch: int
    seq: int

    def train(self, index: int) -> torch.Tensor:
        return batch_tokens(self.corpus, self.schedule.batch(index, self.batch), self.seq)

    def heldout(self, index: int) -> torch.Tensor:
        return batch_tokens(self.corpus, self.schedule.batch(index, self.batch, split="heldout"), self.seq)


def run_setting(
    key: str, preset: str, data: Data, steps: int, eval_batches: int, variant: Variant, seed: int
) -> dict[str, Any]:
    ratio, int8 = parse_setting(key)
    cfg = get_preset(preset, bottleneck_ratio=ratio, **({} if variant.stage_tokens else {"token_dim": 0}))
    torch.manual_seed(seed)
    model = IotaModel(cfg, seed=seed)
    apply_variant(model, variant, seed)
    optimizer = optimizer_for(model, variant)
    wire = make_wire(cfg, data.batch, data.seq, int8)
    meter, losses, seconds, cpu_seconds = Meter(), [], 0.0, 0.0
    for index in range(steps):
        tokens = data.train(index)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = next_token_loss(forward_over_wire(model, tokens, wire, meter), tokens)
        loss.backward()
        for stage in model.stages:  # each miner clips its own stage
            torch.nn.utils.clip_grad_norm_(stage.parameters(), RUN.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start
        losses.append(loss.item())
    heldout = []
    with torch.no_grad():
        for index in range(eval_batches):
            tokens = data.heldout(index)
            heldout.append(next_token_loss(forward_over_wire(model, tokens, wire, None), tokens).item())
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "ratio": ratio,
        "int8": int8,
        "b": cfg.bottleneck_dim,
        "steps": len(losses),
        "first_train_loss": round(losses[0], 4),
        "final_train_loss": round(sum(tail) / len(tail), 4),
        "heldout_loss": round(sum(heldout) / len(heldout), 4),
        "fwd_bytes_per_hop": round(sum(meter.fwd_bytes) / len(meter.fwd_bytes)),
        "bwd_bytes_per_hop": round(sum(meter.bwd_bytes) / len(meter.bwd_bytes)),
        "step_s": round(seconds / len(losses), 4),
        # This process's CPU time per step: with one torch thread, what the step costs on a core of its own
        # even when other work shares the machine and stretches the wall time.
        "step_cpu_s": round(cpu_seconds / len(losses), 4),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    variant = Variant(
        args.decoder_lr_mult,
        args.encoder_init,
        not args.no_passthrough,
        args.z_norm,
        not args.no_stage_tokens,
    )
    steps = max(1, args.tokens // (args.batch_size * args.seq_len))
    keys = args.settings.split(",")
    for key in keys:
        parse_setting(key)
    started = time.perf_counter()
    corpus = LocalTextCorpus(stdlib_source_dir())
    data = Data(corpus, SampleSchedule(corpus, seed=args.seed), args.batch_size, args.seq_len)
    results: dict[str, dict[str, Any]] = {}
    for key in keys:
        results[key] = run_setting(key, args.preset, data, steps, args.eval_batches, variant, args.seed)
        if not args.json:
            print(f"  {key}: held-out {results[key]['heldout_loss']} ({time.perf_counter() - started:.0f} s)")
    baseline = results["none"]["heldout_loss"] if "none" in results else args.baseline_heldout
    for r in results.values():
        gap = 100 * (r["heldout_loss"] - baseline) / baseline if baseline else None
        r["heldout_gap_pct"] = None if gap is None else round(gap, 2)
    return {
        "preset": args.preset,
        "stages": get_preset(args.preset).n_stages,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens": steps * args.batch_size * args.seq_len,
        "steps": steps,
        "eval_batches": args.eval_batches,
        "seed": args.seed,
        "torch_threads": args.threads,
        "optimizer": {
            "lr": RUN.lr,
            "weight_decay": RUN.weight_decay,
            "betas": [RUN.beta1, RUN.beta2],
            "grad_clip": RUN.grad_clip,
        },
        "wire": "fp32 (or int8) + lz4 through common.wire.BoundaryWire, forward and backward",
        "variant": variant.describe(),
        "baseline_heldout": baseline,
        "wall_s": round(time.perf_counter() - started, 1),
        "settings": results,
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{result['preset']}, {result['stages']} stages, {result['tokens']:,} tokens "
        f"({result['steps']} steps of {result['batch_size']} x {result['seq_len']}), "
        f"variant: {result['variant']}, {result['wall_s']} s"
    )
    print(
        f"{'setting':10} {'b':>4} {'train loss':>10} {'held-out':>9} {'gap %':>7} {'fwd B/hop':>10} "
        f"{'bwd B/hop':>10} {'step s':>7} {'CPU s':>6}"
    )
    for key, r in result["settings"].items():
        gap = "-" if r["heldout_gap_pct"] is None else f"{r['heldout_gap_pct']:+.2f}"
        print(
            f"{key:10} {r['b']:>4} {r['final_train_loss']:>10.4f} {r['heldout_loss']:>9.4f} {gap:>7} "
            f"{r['fwd_bytes_per_hop']:>10,} {r['bwd_bytes_per_hop']:>10,} {r['step_s']:>7.3f} "
            f"{r['step_cpu_s']:>6.3f}"
        )


def parse_seeds(text: str) -> list[int]:
    """'0-7' -> [0..7]; '0,3,5' -> [0, 3, 5]."""
    seeds: list[int] = []
    for part in text.split(","):
        low, dash, high = part.partition("-")
        seeds += list(range(int(low), int(high) + 1)) if dash else [int(low)]
    if len(seeds) != len(set(seeds)) or not seeds:
        raise ValueError(f"seeds {text!r} must name distinct seeds")
    return seeds


# Two-sided 95% Student's t quantiles by degrees of freedom; past 30 the normal's 1.96 is within 4%.
T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    25: 2.060,
    30: 2.042,
}


def mean_interval(values: list[float]) -> dict[str, float | None]:
    """The mean of `values` and its two-sided 95% t interval (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": round(mean, 3), "ci95_low": None, "ci95_high": None, "sd": None}
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    t = T95.get(n - 1) or T95[max(k for k in T95 if k <= n - 1)]
    half = t * sd / n**0.5
    return {
        "mean": round(mean, 3),
        "ci95_low": round(mean - half, 3),
        "ci95_high": round(mean + half, 3),
        "sd": round(sd, 3),
    }


def run_seeds(args: argparse.Namespace, seeds: list[int]) -> dict[str, Any]:
    """Each setting on each seed, and its paired held-out gap against "none" with a 95% interval."""
    if "none" not in args.settings.split(","):
        raise SystemExit("--seeds compares against 'none': include it in --settings")
    started = time.perf_counter()
    runs = []
    for seed in seeds:
        args.seed = seed
        runs.append(run(args))
        if not args.json:
            print(
                f"seed {seed}: "
                + ", ".join(f"{k} {r['heldout_loss']}" for k, r in runs[-1]["settings"].items())
            )
    summary: dict[str, dict[str, Any]] = {}
    for key in runs[0]["settings"]:
        gaps = [r["settings"][key]["heldout_gap_pct"] for r in runs]
        losses = [r["settings"][key]["heldout_loss"] for r in runs]
        summary[key] = {
            "heldout_loss_per_seed": losses,
            "heldout_gap_pct_per_seed": gaps,
            "heldout_loss": mean_interval(losses),
            "heldout_gap_pct": mean_interval(gaps),
        }
    return {
        "preset": args.preset,
        "seeds": seeds,
        "tokens": runs[0]["tokens"],
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "wall_s": round(time.perf_counter() - started, 1),
        "summary": summary,
        "runs": runs,
    }


def print_seeds_table(result: dict[str, Any]) -> None:
    print(
        f"{result['preset']}, seeds {result['seeds']}, {result['tokens']:,} tokens per run, "
        f"{result['wall_s']} s"
    )
    print(f"{'setting':10} {'held-out mean':>13} {'gap % mean':>10} {'gap 95% CI':>18} {'gap sd':>7}")
    for key, s in result["summary"].items():
        g = s["heldout_gap_pct"]
        ci = "-" if g["ci95_low"] is None else f"[{g['ci95_low']:+.2f}, {g['ci95_high']:+.2f}]"
        sd = "-" if g["sd"] is None else f"{g['sd']:.2f}"
        print(f"{key:10} {s['heldout_loss']['mean']:>13.4f} {g['mean']:>+10.2f} {ci:>18} {sd:>7}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--settings", default=",".join(ALL_SETTINGS), help="comma-separated, e.g. none,128x")
    parser.add_argument("--tokens", type=int, default=163_840, help="training tokens per setting")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out batches evaluated at the end")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--seed", type=int, default=0, help="model init and sample order (the same for every setting)"
    )
    parser.add_argument(
        "--seeds", default=None, help="run every setting on each seed (e.g. 0-7) and report paired gaps"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument(
        "--baseline-heldout",
        type=float,
        default=None,
        help="held-out loss of 'none' from an earlier run, for gaps when 'none' is not run",
    )
    variants = parser.add_argument_group("bottleneck variants (the 128x investigation)")
    variants.add_argument("--decoder-lr-mult", type=float, default=1.0)
    variants.add_argument("--encoder-init", choices=("zero", "normal"), default="zero")
    variants.add_argument("--no-passthrough", action="store_true", help="pure projections, no pass-through")
    variants.add_argument("--z-norm", action="store_true", help="RMSNorm on z in the decoder")
    variants.add_argument(
        "--no-stage-tokens", action="store_true", help="the earlier design: only the head embeds the tokens"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.batch_size, args.seq_len, args.eval_batches = 3 * 2 * 32, 2, 32, 1
    if args.seeds is not None:
        emit(
            run_seeds(args, parse_seeds(args.seeds)),
            args.out,
            as_json=args.json,
            print_table=print_seeds_table,
        )
        return
    emit(run(args), args.out, as_json=args.json, print_table=print_table)


if __name__ == "__main__":
    main()
