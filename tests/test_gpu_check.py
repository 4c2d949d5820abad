"""scripts/gpu_check.sh: its CPU dry run end to end, its refusal without CUDA, and what it decides with."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import stage_memory
from iota.devnet import Devnet, DevnetOptions
from scripts import gpu_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
# In the order they run: what matters most first, so a short budget drops the least.
STEPS = [
    "environment",
    "model",
    "stages",
    "check_miner",
    "devnet",
    "model_compiled",
    "stages_15b",
    "model_large",
    "model_large_compiled",
]
DRY_RUN_OK = {"environment", "model", "stages", "check_miner", "devnet"}


def script_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHON=str(REPO / ".venv/bin/python"))
    return env


def run_script(cwd: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`scripts/gpu_check.sh ARGS` as an operator runs it, from `cwd`, without the caller's IOTA_ settings."""
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=cwd,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def numbers(value: Any) -> list[float]:
    """Every int and float anywhere in a JSON value (booleans are not figures)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_dry_run_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = run_script(tmp_path, "--dry-run", "--out", str(out), timeout=540)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["ok"] is True
    assert [s["name"] for s in report["steps"]] == STEPS
    steps = {s["name"]: s for s in report["steps"]}
    for name, step in steps.items():
        assert step["status"] == ("ok" if name in DRY_RUN_OK else "skipped"), step
        assert math.isfinite(step["wall_s"]) and step["wall_s"] >= 0
        if step["status"] == "skipped":
            assert step["reason"], f"{name} skipped without saying why"
        else:
            assert step["wall_s"] > 0 and step["commands"], step
            assert all(math.isfinite(n) for n in numbers(step["figures"])), name
    # What the dry run shrank, step by step.
    assert all(steps[name]["shrunk"] for name in DRY_RUN_OK - {"environment"})

    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["cuda_available"] is False
    assert env["miner_defaults"]["batch_size"] > 0

    model = steps["model"]["figures"]
    assert (model["preset"], model["device"], model["dtype"]) == ("tiny", "cpu", "fp32")
    assert model["ours_step_s"] > 0 and model["hf_step_s"] > 0

    stages = steps["stages"]["figures"]
    assert [r["stage"] for r in stages["results"]] == [0, 1, 2]
    for result in stages["results"]:
        assert result["preset"] == "tiny" and result["tokens_per_s"] > 0 and result["peak_rss_gib"] > 0
        assert result["in_flight"] == (1 if result["role"] == "tail" else stages["in_flight"])
        search = result["max_batch"]
        # No memory to cap on the CPU: the search runs up to its cap, 1, 2, 4.
        assert search["batch"] == 4 and search["capped"] is True
        assert [t["batch"] for t in search["trials"]] == [1, 2, 4]

    check = steps["check_miner"]["figures"]
    assert check["report"]["ok"] is True
    assert [c["name"] for c in check["report"]["checks"]][-2:] == ["gpu", "gpu memory"]
    compared = check["estimate_vs_measured"]
    assert [row["stage"] for row in compared] == [0, 1, 2]
    for row in compared:
        assert row["measured"] == "peak_rss_gib" and row["total_gib"] > 0
        assert row["ratio"] == pytest.approx(row["total_gib"] / row["measured_gib"], abs=1e-3)
        assert row["without_stash_gib"] <= row["total_gib"]

    devnet = steps["devnet"]["figures"]
    assert devnet["samples_completed"] >= 16
    assert devnet["validation"]["replays"] > 0 and devnet["validation"]["false_positives"] == 0
    assert "5 ok, 0 failed" in done.stdout


@pytest.mark.timeout(120)
def test_without_cuda_the_real_check_refuses_to_start(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "gpu_check.json"
    done = run_script(tmp_path, "--out", str(out), timeout=100)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "gpu_check: no CUDA device" in done.stderr and "--dry-run" in done.stderr
    assert not out.exists()


def test_the_batch_search_finds_the_largest_batch_that_fits() -> None:
    largest_batch = stage_memory.largest_batch
    for cap in (1, 7, 64, 256):
        for limit in (0, 1, 2, 3, 5, 8, 13, 64, 100, 300):
            tried: list[int] = []

            def fits(batch: int, limit: int = limit, tried: list[int] = tried) -> bool:
                tried.append(batch)
                return batch <= limit

            assert largest_batch(fits, cap) == min(limit, cap), (cap, limit)
            assert len(tried) == len(set(tried)) <= 2 * math.ceil(math.log2(cap + 1)) + 1, (cap, tried)
            assert all(1 <= b <= cap for b in tried)


def test_a_timed_out_step_is_stopped_with_its_process_group() -> None:
    start = time.monotonic()
    finished = gpu_check.run_process(["bash", "-c", "sleep 60 & sleep 60; echo never"], timeout_s=1)
    assert finished.code is None and "never" not in finished.stdout
    assert time.monotonic() - start < gpu_check.GRACE_S + 5


def test_the_devnet_step_fails_on_any_honest_miner_failed() -> None:
    clean = {
        "samples_completed": 64,
        "behaviors": {"h1": "honest", "h2": "honest", "a1": "scaled-output"},
        "validation": {
            "finished": True,
            "replays": 6,
            "replays_failed": {"a1": "output"},
            "false_positives": 0,
            "replay_false_positives": 0,
            "clasp_false_positives": 0,
            "penalized": ["a1"],
            "honest_penalized": [],
        },
    }
    figures, problems = gpu_check.devnet_verdict(clean)
    assert problems == [] and figures["adversaries"] == 1 and figures["adversaries_caught"] == 1

    wronged = json.loads(json.dumps(clean))
    wronged["validation"].update(
        replays_failed={"a1": "output", "h2": "output"},
        false_positives=1,
        replay_false_positives=1,
        honest_penalized=["h2"],
    )
    _, problems = gpu_check.devnet_verdict(wronged)
    assert problems == ["1 false positives (replay 1, CLASP 0)", "honest miners penalized: ['h2']"]

    unjudged = json.loads(json.dumps(clean))
    unjudged["validation"].update(finished=False, replays=0)
    _, problems = gpu_check.devnet_verdict(unjudged)
    assert problems == ["the validators did not finish judging", "no replay was judged"]
    assert gpu_check.devnet_verdict({"samples_completed": 0})[1] == [
        "no sample completed",
        "no validation summary (no validator ran)",
    ]


def test_stages_of_one_shape_are_measured_once() -> None:
    plan = [
        {"stage": 0, "role": "head", "blocks": 0, "parameters": 10},
        *({"stage": s, "role": "body", "blocks": 1, "parameters": 20} for s in range(1, 5)),
        {"stage": 5, "role": "tail", "blocks": 1, "parameters": 30},
    ]
    groups = gpu_check.distinct_stages(plan)
    assert [(stage["stage"], stands_for) for stage, stands_for in groups] == [
        (0, [0]),
        (1, [1, 2, 3, 4]),
        (5, [5]),
    ]


def test_the_devnet_puts_its_miners_on_the_device_it_is_given(tmp_path: Path) -> None:
    for device in ("cpu", "cuda"):
        with Devnet(DevnetOptions(workdir=tmp_path / device, miner_device=device)) as net:
            assert net.env()["IOTA_MINER_DEVICE"] == device
            assert "IOTA_VALIDATOR_DEVICE" not in net.env()  # add_validator sets cpu for the validators
