"""Bytes per pipeline hop: the boundary tensor through the real codec, against its theoretical minimum.

A hop carries one (batch, seq, b) tensor forward (the activation) and one of the same shape backward (its
gradient). For each preset and bottleneck ratio this prints the theoretical size (b x seq x batch x bytes per
element), what the codec actually produces (fp32, bf16, int8, each with and without lz4), and what an
uncompressed pipeline (d channels, bf16) would send.

Activations come from a real forward of the head stage on Python standard-library source bytes for the
presets whose head runs quickly on a CPU (`--real`, default tiny and 100m); the larger presets use a
Gaussian tensor of the same shape, since codec sizes without lz4 depend only on the shape.

    python bench/wire.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.codec import encode_tensor  # noqa: E402
from common.model import PRESETS, boundary_shape, build_stage, get_preset  # noqa: E402


def stdlib_tokens(batch: int, seq: int) -> torch.Tensor:
    """Byte tokens from the standard library's own source, present on every machine."""
    source = Path(json.__file__).read_bytes() + Path(argparse.__file__).read_bytes()
    need = batch * seq
    data = (source * (need // len(source) + 1))[:need]
    return torch.tensor(list(data), dtype=torch.long).view(batch, seq)


def boundary_tensor(preset: str, ratio: int, batch: int, seq: int, real: bool) -> torch.Tensor:
    cfg = get_preset(preset, bottleneck_ratio=ratio)
    if real:
        with torch.no_grad():
            return build_stage(cfg, 0, seed=0)(stdlib_tokens(batch, seq) % cfg.vocab_size)
    return torch.randn(boundary_shape(cfg, batch, seq), generator=torch.Generator().manual_seed(0))


def measure(preset: str, ratio: int, batch: int, seq: int, real: bool) -> dict[str, object]:
    cfg = get_preset(preset, bottleneck_ratio=ratio)
    x = boundary_tensor(preset, ratio, batch, seq, real)
    elements = x.numel()
    encoded = {
        "fp32": len(encode_tensor(x.float())),
        "fp32_lz4": len(encode_tensor(x.float(), compress=True)),
        "bf16": len(encode_tensor(x.bfloat16())),
        "bf16_lz4": len(encode_tensor(x.bfloat16(), compress=True)),
        "int8": len(encode_tensor(x.float(), int8=True)),
        "int8_lz4": len(encode_tensor(x.float(), int8=True, compress=True)),
    }
    return {
        "preset": preset,
        "ratio": f"{ratio}x",
        "d_model": cfg.d_model,
        "b": cfg.bottleneck_dim,
        "batch": batch,
        "seq": seq,
        "activations": "head forward" if real else "gaussian",
        "theoretical_fp32_bytes": elements * 4,
        "theoretical_bf16_bytes": elements * 2,
        "encoded_bytes": encoded,
        "bf16_overhead_bytes": encoded["bf16"] - elements * 2,
        "uncompressed_pipeline_bf16_bytes": batch * seq * cfg.d_model * 2,
        "reduction_vs_uncompressed_bf16": round(batch * seq * cfg.d_model * 2 / encoded["bf16"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--ratios", default="64,128")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=0, help="0: each preset's max_seq_len")
    parser.add_argument("--real", default="tiny,100m", help="presets whose activations come from a forward")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    real = set(args.real.split(",")) if args.real else set()
    rows = []
    for preset in args.presets.split(","):
        seq = args.seq or get_preset(preset).max_seq_len
        for ratio in (int(r) for r in args.ratios.split(",")):
            rows.append(measure(preset, ratio, args.batch, seq, preset in real))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'preset':6} {'ratio':>5} {'b':>3} {'batch x seq':>11} {'min bf16':>9} {'bf16':>9} {'bf16+lz4':>9} "
        f"{'int8':>9} {'fp32':>9} {'no bottleneck':>13} {'reduction':>9}"
    )
    for r in rows:
        e = r["encoded_bytes"]
        print(
            f"{r['preset']:6} {r['ratio']:>5} {r['b']:>3} {str(r['batch']) + 'x' + str(r['seq']):>11} "
            f"{r['theoretical_bf16_bytes']:>9,} {e['bf16']:>9,} {e['bf16_lz4']:>9,} {e['int8']:>9,} "
            f"{e['fp32']:>9,} {r['uncompressed_pipeline_bf16_bytes']:>13,} "
            f"{r['reduction_vs_uncompressed_bf16']:>8}x"
        )


if __name__ == "__main__":
    main()
