"""bench/merge.py end to end for 2 and 4 replicas of tiny stage 1: real presigned transfers, embedded S3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_merge_bench_json(tmp_path: Path) -> None:
    out = tmp_path / "merge.json"
    command = [sys.executable, str(ROOT / "bench" / "merge.py"), "--json", "--ns", "2,4", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
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
