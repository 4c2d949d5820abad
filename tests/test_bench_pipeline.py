"""bench/pipeline.py end to end in a tiny configuration: a short devnet and a few single-process steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import pipeline
from tests.benches import run_bench


@pytest.mark.slow
@pytest.mark.timeout(300)  # a loaded 2-core CI machine has taken over 110 s
def test_pipeline_bench_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pipeline.json"
    argv = [
        "--json", "--duration", "5", "--batch-size", "2", "--seq-len", "32", "--warmup", "1",
        "--single-steps", "2", "--workdir", str(tmp_path / "devnet"), "--out", str(out),
    ]  # fmt: skip
    result = run_bench(pipeline, argv, capsys)
    assert json.loads(out.read_text()) == result
    for key in (
        "devnet_tokens_per_s",
        "single_process_tokens_per_s",
        "efficiency_ratio",
        "time_breakdown",
        "config",
        "devnet_summary",
    ):
        assert key in result
    assert result["single_process_tokens_per_s"] > 0
    assert result["single_process"]["steps"] == 2
    assert result["config"]["preset"] == "tiny" and result["config"]["seq_len"] == 32
    assert result["devnet_summary"]["batch_size"] == 2
    breakdown = result["time_breakdown"]
    assert set(breakdown["per_stage"]) == {"0", "1", "2"}
    assert breakdown["stale_files"] == []
    total = breakdown["total"]
    assert total["miners"] == 3 and total["wall_s"] > 0
    assert set(total["seconds"]) >= {"compute", "download", "upload", "codec", "report", "poll", "other"}
