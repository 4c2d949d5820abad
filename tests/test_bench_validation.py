"""bench/validation.py --quick end to end: replay cost per stage and CLASP's detection table, as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_validation_bench_json(tmp_path: Path) -> None:
    out = tmp_path / "validation.json"
    command = [sys.executable, str(ROOT / "bench" / "validation.py"), "--json", "--quick", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert json.loads(out.read_text()) == result

    cost = result["replay_cost"]
    assert [s["stage"] for s in cost["stages"]] == [0, 1, 2]
    for s in cost["stages"]:
        assert s["ops"] > 0 and s["miner_compute_s"] > 0 and s["replay_s"] > 0
        assert s["ratio"] == pytest.approx(s["replay_s"] / s["miner_compute_s"])
    assert cost["network_share"] == pytest.approx(cost["validation_fraction"] * cost["mean_ratio"])

    rows = result["clasp"]["rows"]
    honest = [r for r in rows if r["behavior"] == "honest"]
    cheats = [r for r in rows if r["behavior"] != "honest"]
    assert honest and cheats
    assert all(0 <= r["false_positive"] <= 1 for r in rows)
    assert all(0 <= r["detection"] <= 1 for r in cheats)
    # A miner sending random outputs on every forward is caught from 512 records on.
    full = [r for r in cheats if r["fraction"] == 1.0 and r["records"] == 512]
    assert full and full[0]["detection"] >= 0.9, full
