"""bench/s3_servers.py end to end: both local S3 servers started, every object read back as stored, figures
for each in the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import s3_servers
from tests.benches import run_bench


@pytest.mark.timeout(120)
def test_s3_servers_bench_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s3_servers.json"
    result = run_bench(s3_servers, ["--json", "--requests", "5", "--size", "4096", "--out", str(out)], capsys)
    assert json.loads(out.read_text()) == result
    assert set(result["servers"]) == {"moto", "nanio"}
    for figures in result["servers"].values():
        assert figures["start_s"] >= 0
        for verb in ("put", "get"):
            assert 0 < figures[verb]["median_ms"] <= figures[verb]["p90_ms"], figures
