"""bench/merge.py end to end for 2 and 4 replicas of tiny stage 1: real presigned transfers, embedded S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import merge
from tests.benches import run_bench


@pytest.mark.timeout(120)
def test_merge_bench_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "merge.json"
    result = run_bench(merge, ["--json", "--ns", "2,4", "--out", str(out)], capsys)
    assert json.loads(out.read_text()) == result
    assert result["config"]["preset"] == "tiny" and result["config"]["stage"] == 1
    assert set(result["results"]) == {"2", "4"}
    for n, r in result["results"].items():
        assert r["phase"] == "done" and r["replicas_identical"] is True, r
        assert r["partitions"] == int(n) and r["flagged"] == []
        assert r["stage_parameters"] > 0 and r["wall_s"] > 0
        # Each miner moves the design's 4 - 2/n weights' worth, plus the codec's headers.
        assert r["design_ratio"] <= r["per_miner_traffic_ratio"] <= r["design_ratio"] + 0.01
        assert r["per_miner_traffic_ratio"] <= r["per_miner_traffic_ratio_max"] <= 4.2
    assert result["target"] == {"per_miner_traffic_ratio_max": 4.2}
    assert result["meets_target"] is True
