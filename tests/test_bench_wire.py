"""bench/wire.py --s3: the bytes one hop really puts on the wire through S3, against the minimum."""

from __future__ import annotations

import httpx
import pytest

from bench import wire
from common.s3server import EmbeddedS3


@pytest.mark.timeout(60)
def test_hop_bytes_through_s3(s3: EmbeddedS3) -> None:
    with wire.counted_store(s3, "test-bench-wire", keep=True) as (store, proxy), httpx.Client() as http:
        rows = wire.measure_s3(store, proxy, http, "1.5b", 128, 1, 1024, real=False)
        tiny = wire.measure_s3(store, proxy, http, "tiny", 128, 1, 256, real=False)
        requests = bytes(proxy.requests)

    assert [r["mode"] for r in rows] == ["bf16", "int8"]
    for r in rows + tiny:
        # Bytes on the wire >= the encoded payload >= the theoretical minimum, each way.
        assert r["upload_bytes"] >= r["put_request_bytes"] > r["payload_bytes"] >= r["minimum_bytes"]
        assert r["download_bytes"] >= r["get_response_bytes"] > r["payload_bytes"]
        assert r["minimum_bytes"] == r["b"] * r["seq"] * r["batch"] * (2 if r["mode"] == "bf16" else 1)
        # HTTP costs a fixed amount per request: the presigned URL, a few headers, the store's reply.
        assert r["http_overhead_bytes"] < 2_500
    bf16 = rows[0]
    assert bf16["b"] == 16 and bf16["minimum_bytes"] == 32_768
    # A 1.5b hop in bf16 at 128x: within 4% of the minimum on each side.
    assert bf16["upload_ratio"] < 1.04 and bf16["download_ratio"] < 1.04

    # The transfers leave out httpx's default headers that S3 does not need.
    head = requests.lower()
    assert b"put /test-bench-wire/" in head and b"get /test-bench-wire/" in head
    for needless in (b"user-agent:", b"accept-encoding:", b"accept:", b"connection:"):
        assert needless not in head
    assert b"content-length:" in head  # a presigned PUT needs its length
