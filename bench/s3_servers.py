"""The two local S3 servers side by side: moto (embedded, checks no signature) and nanio (a child process
that verifies SigV4), for the choice of the devnet's default (common/s3server.py says which and why).

For each server: the time to start it, and the median and 90th percentile of a presigned PUT and of a
presigned GET of one object, through the miners' own client (`common.storage.upload_to_url` and
`download_from_url` on one keep-alive httpx client, as a miner holds one), after a few warm-up requests.

    python bench/s3_servers.py --json
    python bench/s3_servers.py --requests 500 --size 65536
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

if not __package__:  # run as `python bench/<name>.py`, not `-m bench.<name>`: see bench/_repo_root.py
    import _repo_root  # noqa: F401

from bench.report import emit
from common.s3server import EmbeddedS3, NanioS3
from common.storage import ObjectStore, download_from_url, upload_to_url

WARMUP = 10


def _quantiles_ms(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 3),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 3),
    }


def measure(server: EmbeddedS3 | NanioS3, requests: int, size: int) -> dict[str, Any]:
    started = time.perf_counter()
    with server:
        start_s = time.perf_counter() - started
        store = ObjectStore.from_settings(server.settings(bucket="bench"))
        store.ensure_bucket()
        payload = os.urandom(size)
        puts: list[float] = []
        gets: list[float] = []
        with httpx.Client() as http:
            for i in range(WARMUP + requests):
                key = f"bench/object-{i % 16}"
                put_url, get_url = store.presign_put(key), store.presign_get(key)
                t0 = time.perf_counter()
                upload_to_url(put_url, payload, client=http)
                t1 = time.perf_counter()
                data = download_from_url(get_url, max_bytes=size, client=http)
                t2 = time.perf_counter()
                if data != payload:
                    raise RuntimeError(f"{type(server).__name__} returned other bytes than were stored")
                if i >= WARMUP:
                    puts.append(t1 - t0)
                    gets.append(t2 - t1)
    return {"start_s": round(start_s, 3), "put": _quantiles_ms(puts), "get": _quantiles_ms(gets)}


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['requests']} presigned PUTs and GETs of {result['size']:,} bytes each")
    print(f"{'server':<8} {'start s':>8} {'PUT p50':>9} {'PUT p90':>9} {'GET p50':>9} {'GET p90':>9}  (ms)")
    for name, r in result["servers"].items():
        print(
            f"{name:<8} {r['start_s']:>8.3f} {r['put']['median_ms']:>9.2f} {r['put']['p90_ms']:>9.2f} "
            f"{r['get']['median_ms']:>9.2f} {r['get']['p90_ms']:>9.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="Timed PUT+GET pairs per server.")
    parser.add_argument("--size", type=int, default=64 * 1024, help="Bytes per object.")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    parser.add_argument("--out", type=Path, default=Path("bench/out/s3_servers.json"))
    args = parser.parse_args(argv)
    servers = {"moto": EmbeddedS3(), "nanio": NanioS3()}
    result = {
        "requests": args.requests,
        "size": args.size,
        "servers": {name: measure(server, args.requests, args.size) for name, server in servers.items()},
    }
    emit(result, args.out, as_json=args.json, print_table=print_table)


if __name__ == "__main__":
    main()
