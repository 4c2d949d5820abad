"""Bytes per pipeline hop: the boundary tensor through the real codec, against its theoretical minimum.

A hop carries one (batch, seq, b) tensor forward (the activation) and one of the same shape backward (its
gradient). For each preset and bottleneck ratio this prints the theoretical size (b x seq x batch x bytes per
element), what the codec actually produces (fp32, bf16, int8, each with and without lz4), and what an
uncompressed pipeline (d channels, bf16) would send.

Activations come from a real forward of the head stage on Python standard-library source bytes for the
presets whose head runs quickly on a CPU (`--real`, default tiny and 100m); the larger presets use a
Gaussian tensor of the same shape, since codec sizes without lz4 depend only on the shape.

`--s3` measures the bytes that actually cross the network for one hop: the encoded boundary tensor is PUT
to a presigned URL on the embedded S3 server with the miners' own client (`common.storage.upload_to_url`
on a keep-alive httpx client, as `miner/worker.py` holds one) and fetched back with `download_from_url`,
through a loopback TCP proxy (`bench/netproxy.py`) that counts every byte each way (HTTP request line,
headers and body; the response's status line, headers and body). TCP/IP framing below that is not counted.

    python bench/wire.py --json
    python bench/wire.py --s3 --json          # 128x, bf16 and int8, every preset
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import torch

if not __package__:  # run as `python bench/<name>.py`, not `-m bench.<name>`: see bench/_repo_root.py
    import _repo_root  # noqa: F401

from bench.netproxy import LoopbackProxy
from common.codec import encode_tensor
from common.model import PRESETS, boundary_shape, build_stage, get_preset
from common.protocol import TrainingSpec
from common.s3server import EmbeddedS3
from common.storage import ObjectStore, download_from_url, upload_to_url
from common.wire import BoundaryWire


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


# The wire settings measured through S3: bf16 values, or int8 with a float32 scale per token (row).
S3_MODES = {"bf16": (False, 2), "int8": (True, 1)}  # mode: (wire_int8, bytes per element of the minimum)
# A key shaped like the orchestrator's (`runs/<run id>/<hotkey>/<item id>`), so the presigned URL has a
# realistic length; the hotkey is the well-known development address //Alice.
HOP_KEY = "runs/run-20261130-120000-0a1b2c/5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY/1234.0.1f"


def hop_wire(preset: str, ratio: int, batch: int, seq: int) -> dict[str, BoundaryWire]:
    cfg = get_preset(preset, bottleneck_ratio=ratio)
    wires = {}
    for mode, (int8, _) in S3_MODES.items():
        # Only the wire fields matter here; the optimiser's are placeholders.
        training = TrainingSpec(
            lr=1e-4,
            weight_decay=0.0,
            beta1=0.9,
            beta2=0.95,
            grad_clip=1.0,
            max_outstanding=1,
            wire_dtype="bfloat16",
            wire_int8=int8,
            wire_compress=False,
            outer_lr=0.7,
            outer_momentum=0.9,
        )
        wires[mode] = BoundaryWire.of(cfg, batch, seq, training)
    return wires


def measure_s3(
    store: ObjectStore,
    proxy: LoopbackProxy,
    http: httpx.Client,
    preset: str,
    ratio: int,
    batch: int,
    seq: int,
    real: bool,
) -> list[dict[str, Any]]:
    """One hop's upload and download through the proxy, per wire mode, with the bytes counted each way."""
    cfg = get_preset(preset, bottleneck_ratio=ratio)
    x = boundary_tensor(preset, ratio, batch, seq, real)
    rows = []
    for mode, wire in hop_wire(preset, ratio, batch, seq).items():
        payload = wire.encode(x)
        minimum = x.numel() * S3_MODES[mode][1]
        proxy.reset()
        upload_to_url(store.presign_put(HOP_KEY), payload, client=http)
        put_sent, put_received = proxy.reset()
        data = download_from_url(store.presign_get(HOP_KEY), max_bytes=wire.max_bytes, client=http)
        get_sent, get_received = proxy.reset()
        if data != payload:
            raise RuntimeError(f"{preset} {mode}: S3 gave back different bytes")
        wire.decode(data)  # the receiver's checks pass on what came back
        upload, download = put_sent + put_received, get_sent + get_received
        rows.append(
            {
                "preset": preset,
                "ratio": f"{ratio}x",
                "mode": mode,
                "b": cfg.bottleneck_dim,
                "batch": batch,
                "seq": seq,
                "minimum_bytes": minimum,
                "payload_bytes": len(payload),
                "put_request_bytes": put_sent,
                "put_response_bytes": put_received,
                "get_request_bytes": get_sent,
                "get_response_bytes": get_received,
                "upload_bytes": upload,
                "download_bytes": download,
                # Each side's link carries the tensor once: the sender's PUT, the receiver's GET.
                "upload_ratio": round(upload / minimum, 3),
                "download_ratio": round(download / minimum, 3),
                "http_overhead_bytes": upload + download - 2 * len(payload),
            }
        )
    return rows


@contextmanager
def counted_store(
    s3: EmbeddedS3, bucket: str = "wire-bench", *, keep: bool = False
) -> Iterator[tuple[ObjectStore, LoopbackProxy]]:
    """A store on `s3` whose presigned URLs lead through a counting proxy."""
    proxy = LoopbackProxy(urlsplit(s3.endpoint_url).netloc, keep=keep)
    try:
        # The store presigns for the proxy's address, so the signed Host is the one the client sends.
        settings = s3.settings(bucket=bucket).model_copy(
            update={"endpoint_url": f"http://127.0.0.1:{proxy.port}"}
        )
        store = ObjectStore.from_settings(settings)
        store.ensure_bucket()
        proxy.reset()
        proxy.requests.clear()  # boto3's own requests, not the miners'
        yield store, proxy
    finally:
        proxy.close()


def run_s3(
    presets: list[str], ratios: list[int], batch: int, seq_override: int, real: set[str]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with EmbeddedS3(port=0) as s3, counted_store(s3) as (store, proxy):
        # A client as the miner holds one (miner/worker.py): keep-alive, httpx's defaults.
        with httpx.Client(timeout=60.0) as http:
            for preset in presets:
                seq = seq_override or get_preset(preset).max_seq_len
                for ratio in ratios:
                    rows += measure_s3(store, proxy, http, preset, ratio, batch, seq, preset in real)
    return rows


def print_s3(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'preset':6} {'ratio':>5} {'mode':4} {'b':>3} {'batch x seq':>11} {'minimum':>9} {'payload':>9} "
        f"{'PUT req':>9} {'PUT resp':>8} {'GET req':>7} {'GET resp':>9} {'up/min':>7} {'down/min':>8}"
    )
    for r in rows:
        print(
            f"{r['preset']:6} {r['ratio']:>5} {r['mode']:4} {r['b']:>3} "
            f"{str(r['batch']) + 'x' + str(r['seq']):>11} {r['minimum_bytes']:>9,} {r['payload_bytes']:>9,} "
            f"{r['put_request_bytes']:>9,} {r['put_response_bytes']:>8,} {r['get_request_bytes']:>7,} "
            f"{r['get_response_bytes']:>9,} {r['upload_ratio']:>7.3f} {r['download_ratio']:>8.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--ratios", default=None, help="default 64,128; with --s3, 128")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=0, help="0: each preset's max_seq_len")
    parser.add_argument("--real", default="tiny,100m", help="presets whose activations come from a forward")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--s3", action="store_true", help="count the bytes of one hop through S3 (128x)")
    args = parser.parse_args(argv)

    real = set(args.real.split(",")) if args.real else set()
    ratios = [int(r) for r in (args.ratios or ("128" if args.s3 else "64,128")).split(",")]
    if args.s3:
        s3_rows = run_s3(args.presets.split(","), ratios, args.batch, args.seq, real)
        if args.json:
            print(json.dumps(s3_rows, indent=2))
        else:
            print_s3(s3_rows)
        return
    rows = []
    for preset in args.presets.split(","):
        seq = args.seq or get_preset(preset).max_seq_len
        for ratio in ratios:
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
