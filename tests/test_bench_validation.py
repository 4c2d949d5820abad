"""bench/validation.py --quick end to end: replay cost per stage and CLASP's detection table, as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import validation
from tests.benches import run_bench


@pytest.mark.timeout(300)
def test_validation_bench_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "validation.json"
    result = run_bench(validation, ["--json", "--quick", "--out", str(out)], capsys)
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
    # A miner sending random outputs on every forward is caught within half the validator's 4096-record
    # window. The trials are seeded, so the figure is fixed given the loss pool; but the pool differs
    # between machines (CPU kernels, torch version: see `bench.clasp_sim.loss_pool`), which is how a
    # 40-step pool once passed and once failed this at 512 records on the same commit. At 2048 records the
    # bad miner's z averaged 44 to 51 times the damage (nats), spread 1.2 (100 trials on each of two
    # pools). 2 or more misses (z < 4) in 10 trials have a chance under 45 p^2 = 1e-4 while p, the
    # per-trial miss rate, is under 1.5e-3: a mean z above 4 + 3 * 1.2, a damage of 0.17 nats or more,
    # 4x below the least of the 8 200-step pools measured (0.71 to 2.18 nats, 6 seeds and 3 kernel sets).
    full = [r for r in cheats if r["fraction"] == 1.0 and r["records"] == 2048]
    assert full and full[0]["detection"] >= 0.9, full
