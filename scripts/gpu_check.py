"""`scripts/gpu_check.sh`: one prepared check of the whole CUDA path, for the minutes a GPU is lent.

On one H100 or H200 it runs, each step in its own process with its own timeout, within one time budget
(default 450 s, so the run ends within 8 minutes):

- `environment`: torch and CUDA versions, the device, its memory, the miners' default batch shape;
- `model`, `model_compiled`: bench/model.py on 100m, bf16 autocast on CUDA, our model against transformers'
  Llama of the same shape, without and with torch.compile; `model_large`, `model_large_compiled`: the same
  on 1.5b, last, only if the budget still has room;
- `stages`: each stage of 1.5b trained as a miner trains it (bench/stage_memory.py: fp32 master weights,
  the preset's inner optimizer, bf16 autocast) at the miners' default batch, seq and outstanding forwards:
  peak memory, tokens/s, and the largest batch whose step fits a 16 GB card; `stages_15b`: the same for
  each distinct stage shape of 15b;
- `check_miner`: `iota check miner --json` on the GPU against an orchestrator of the 1.5b run, with its
  memory estimate per stage set against the peak `stages` measured;
- `devnet`: a short `iota devnet` with every miner on the one GPU and the validator replaying on the CPU,
  so real CUDA numerics meet the calibrated cross-regime tolerances: no honest miner may be failed.

It writes ONE JSON file (`--out`, default bench/out/gpu_check.json), rewritten after every step, so a run
cut short still leaves what it measured: each step's status (ok; failed, with the tail of its output;
skipped, with the reason), wall time, command and figures.

`--dry-run` runs the same steps on the CPU with tiny sizes (the tiny preset, fp32, a step or two, a devnet
of a few samples), each saying what it shrank or skipped, so the plumbing is proven without a GPU (CI runs
it: tests/test_gpu_check.py). Without `--dry-run` and without CUDA it exits 2 before running anything.

    scripts/gpu_check.sh                     # on the GPU machine
    scripts/gpu_check.sh --dry-run --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "out" / "gpu_check.json"
# 8 minutes of wall time at most, with room for the interpreter, the transfers and the last step's grace.
DEFAULT_BUDGET_S = 450.0
# A step past its timeout gets SIGTERM (a devnet then stops at once and still writes its summary), then
# SIGKILL this long after.
GRACE_S = 12.0
# A 16 GB card as torch sees it: about 16 GiB, of which the CUDA context and the driver take roughly half a
# GiB before the first tensor. The batch search caps the allocator at what is left.
CARD_GIB = 16.0
CONTEXT_GIB = 0.5
ERROR_TAIL_CHARS = 4000
Status = Literal["ok", "failed", "skipped"]


class StepResult(BaseModel):
    """One step's outcome as the JSON file holds it."""

    name: str
    status: Status
    wall_s: float = 0.0
    reason: str = ""  # skipped: why; failed: what went wrong, in one line
    error_tail: str = ""  # failed: the end of the step's output
    shrunk: str = ""  # dry run: what this step made smaller than the real run
    commands: list[list[str]] = Field(default_factory=list)
    figures: dict[str, Any] = Field(default_factory=dict)


class Report(BaseModel):
    dry_run: bool
    started_at: str
    budget_s: float
    wall_s: float = 0.0
    ok: bool = True  # no step failed (skipped steps do not count)
    environment: dict[str, Any] = Field(default_factory=dict)
    steps: list[StepResult] = Field(default_factory=list)


@dataclass(frozen=True)
class ModelRun:
    preset: str
    compile: bool
    args: list[str]  # bench/model.py's shape and step arguments
    timeout_s: float
    min_s: float  # skipped when less of the budget is left


@dataclass(frozen=True)
class Plan:
    """Every size the check uses: the real run's, or the dry run's (`shrunk` says how they differ)."""

    dry_run: bool
    device: str
    dtype: str
    models: dict[str, ModelRun | None]  # step name -> run; None: skipped in this mode
    model_skips: dict[str, str]
    stage_preset: str
    stage_large_preset: str | None
    stage_seq: int | None  # None: the miners' default
    stage_batch: int | None
    stage_steps: int
    batch_cap: int
    stage_timeout_s: float
    devnet_args: list[str]
    devnet_timeout_s: float
    check_timeout_s: float
    shrunk: dict[str, str] = field(default_factory=dict)


def real_plan() -> Plan:
    return Plan(
        dry_run=False,
        device="cuda",
        dtype="bf16",
        models={
            "model": ModelRun("100m", False, ["--batch", "8", "--seq", "1024", *_steps(3, 10)], 120, 45),
            # Compiling both models takes most of this; the warm-up steps absorb the compilation.
            "model_compiled": ModelRun(
                "100m", True, ["--batch", "8", "--seq", "1024", *_steps(3, 10)], 240, 90
            ),
            "model_large": ModelRun("1.5b", False, _steps(2, 6), 180, 90),
            "model_large_compiled": ModelRun("1.5b", True, _steps(2, 6), 300, 180),
        },
        model_skips={},
        stage_preset="1.5b",
        stage_large_preset="15b",
        stage_seq=None,
        stage_batch=None,
        stage_steps=3,
        batch_cap=256,
        stage_timeout_s=120,
        devnet_args=[
            *("--preset", "tiny", "--miners-per-stage", "1", "--batch-size", "8", "--seq-len", "256"),
            *("--samples", "64", "--duration", "100", "--merge-every", "16", "--validators", "1"),
            *("--validation-fraction", "1.0", "--adversaries", "scaled-output:1", "--miner-device", "cuda"),
        ],
        devnet_timeout_s=200,
        check_timeout_s=120,
    )


def dry_plan() -> Plan:
    cpu_compile = "torch.compile on the CPU builds C++ kernels for minutes; it runs on CUDA only"
    return Plan(
        dry_run=True,
        device="cpu",
        dtype="fp32",
        models={
            "model": ModelRun("tiny", False, ["--quick"], 120, 10),
            "model_compiled": None,
            "model_large": None,
            "model_large_compiled": None,
        },
        model_skips={
            "model_compiled": cpu_compile,
            "model_large": "1.5b holds both models with fp32 weights and AdamW (about 50 GB): CUDA only",
            "model_large_compiled": "1.5b and torch.compile: CUDA only",
        },
        stage_preset="tiny",
        stage_large_preset=None,
        stage_seq=32,
        stage_batch=2,
        stage_steps=1,
        batch_cap=4,
        stage_timeout_s=90,
        devnet_args=[
            *("--preset", "tiny", "--stages", "2", "--miners-per-stage", "1", "--batch-size", "2"),
            *("--seq-len", "32", "--samples", "16", "--duration", "60", "--merge-every", "8"),
            *("--validators", "1", "--validation-fraction", "1.0", "--miner-device", "cpu"),
        ],
        devnet_timeout_s=180,
        check_timeout_s=120,
        shrunk={
            "model": "tiny instead of 100m, fp32 on the CPU, batch 2 x 64, 1 warm-up and 2 timed steps",
            "stages": "tiny instead of 1.5b, fp32 on the CPU, batch 2 x 32, 1 step; the batch search has no "
            "memory to cap on the CPU and stops at batch 4",
            "check_miner": "tiny instead of 1.5b at batch 2 x 32, miner on the CPU: the GPU memory check "
            "skips itself; the estimate is set against peak RSS, which also counts the interpreter",
            "devnet": "2 stages of tiny, batch 2 x 32, 16 samples, miners on the CPU, no adversary",
        },
    )


def _steps(warmup: int, steps: int) -> list[str]:
    return ["--warmup", str(warmup), "--steps", str(steps)]


# ---------------------------------------------------------------------------------------------------------
# Running a step's processes


@dataclass
class Finished:
    code: int | None  # None: killed at its timeout
    stdout: str
    stderr: str
    seconds: float

    @property
    def tail(self) -> str:
        return (self.stdout + "\n" + self.stderr).strip()[-ERROR_TAIL_CHARS:]


def child_env(**extra: str) -> dict[str, str]:
    """The caller's environment without its IOTA_ settings (a `.env` or shell of the GPU machine must not
    change what is measured), with the repository importable from any folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_process(
    command: list[str], timeout_s: float, cwd: Path = REPO, env: dict[str, str] | None = None
) -> Finished:
    """Run `command` in its own process group; past `timeout_s`, SIGTERM the group, then SIGKILL it
    GRACE_S later. Never raises for the command's own failure."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env or child_env(), stdout=out, stderr=err, start_new_session=True
        )
        code: int | None
        try:
            code = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            code = None
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        err.seek(0)
        return Finished(
            code,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            time.monotonic() - start,
        )


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the step's own group: start_new_session made its leader `pid`
    except ProcessLookupError:
        pass


def parse_json_output(text: str) -> Any:
    """The JSON document a bench prints with --json, even after lines of other output."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "{":
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON document in the output")


# ---------------------------------------------------------------------------------------------------------
# The steps


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    @property
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, step_timeout_s: float) -> float:
        """A step's timeout within what is left, leaving its grace inside the budget."""
        return min(step_timeout_s, self.left - GRACE_S)


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _failed(name: str, reason: str, finished: Finished | None = None, **fields: Any) -> StepResult:
    return StepResult(
        name=name, status="failed", reason=reason, error_tail=finished.tail if finished else "", **fields
    )


def _outcome(finished: Finished, timeout_s: float) -> str:
    if finished.code is None:
        return f"timed out after {timeout_s:.0f} s"
    return f"exited with {finished.code}"


def step_environment(plan: Plan, budget: Budget) -> StepResult:
    command = _python("-m", "scripts.gpu_check", "--internal", "environment")
    timeout = budget.timeout(60)
    finished = run_process(command, timeout)
    if finished.code != 0:
        return _failed("environment", _outcome(finished, timeout), finished, commands=[command])
    return StepResult(
        name="environment",
        status="ok",
        wall_s=round(finished.seconds, 1),
        commands=[command],
        figures=parse_json_output(finished.stdout),
    )


def step_model(name: str, plan: Plan, budget: Budget) -> StepResult:
    run = plan.models[name]
    if run is None:
        return StepResult(name=name, status="skipped", reason=plan.model_skips[name])
    command = _python(
        *("-m", "bench.model", "--preset", run.preset, "--device", plan.device, "--dtype", plan.dtype),
        *(["--compile"] if run.compile else []),
        *run.args,
        "--json",
    )
    timeout = budget.timeout(run.timeout_s)
    if timeout < run.min_s:
        return _no_time(name, budget, run.min_s)
    finished = run_process(command, timeout)
    if finished.code != 0:
        return _failed(name, _outcome(finished, timeout), finished, commands=[command])
    result = parse_json_output(finished.stdout)
    return StepResult(
        name=name, status="ok", commands=[command], shrunk=plan.shrunk.get(name, ""), figures=result
    )


def _no_time(name: str, budget: Budget, needs_s: float) -> StepResult:
    return StepResult(
        name=name,
        status="skipped",
        reason=f"{max(0.0, budget.left):.0f} s of the {budget.seconds:.0f} s budget left; this step needs "
        f"about {needs_s:.0f} s",
    )


def distinct_stages(stages: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[int]]]:
    """One stage per distinct shape (role, blocks, parameters) and the stages it stands for: 15b's 49 body
    stages are one shape, measured once."""
    groups: dict[tuple[Any, ...], tuple[dict[str, Any], list[int]]] = {}
    for stage in stages:
        key = (stage["role"], stage["blocks"], stage["parameters"])
        if key in groups:
            groups[key][1].append(stage["stage"])
        else:
            groups[key] = (stage, [stage["stage"]])
    return list(groups.values())


def step_stages(name: str, preset: str | None, plan: Plan, env: dict[str, Any], budget: Budget) -> StepResult:
    if preset is None:
        return StepResult(
            name=name,
            status="skipped",
            reason="15b stages only on CUDA: its head alone holds a 657M embedding",
        )
    plans = env.get("stage_plans", {})
    if preset not in plans:
        return StepResult(name=name, status="skipped", reason=f"the environment step gave no {preset} stages")
    miner = env["miner_defaults"]
    batch = plan.stage_batch or miner["batch_size"]
    seq = plan.stage_seq or miner["seq_len"]
    in_flight = miner["max_outstanding"]
    budget_gib = CARD_GIB - CONTEXT_GIB
    results: list[dict[str, Any]] = []
    commands: list[list[str]] = []
    failures: list[str] = []
    tails: list[str] = []
    for stage, stands_for in distinct_stages(plans[preset]):
        held = 1 if stage["role"] == "tail" else in_flight  # the miner's tail runs one item at a time
        command = _python(
            *("-m", "bench.stage_memory", "--preset", preset, "--stages", str(stage["stage"])),
            *("--batch", str(batch), "--seq", str(seq), "--in-flight", str(held)),
            *("--steps", str(plan.stage_steps), "--device", plan.device),
            *("--max-batch-under", str(budget_gib), "--batch-cap", str(plan.batch_cap), "--json"),
        )
        commands.append(command)
        timeout = budget.timeout(plan.stage_timeout_s)
        if timeout < 30:
            failures.append(
                f"stage {stage['stage']}: not run, {max(0.0, budget.left):.0f} s of the budget left"
            )
            continue
        finished = run_process(command, timeout)
        if finished.code != 0:
            failures.append(f"stage {stage['stage']}: {_outcome(finished, timeout)}")
            tails.append(f"--- stage {stage['stage']} ---\n{finished.tail}")
            continue
        result = parse_json_output(finished.stdout)["results"][0]
        result["stands_for"] = stands_for
        result["wall_s"] = round(finished.seconds, 1)
        results.append(result)
    figures = {
        "preset": preset,
        "device": plan.device,
        "batch": batch,
        "seq": seq,
        "in_flight": in_flight,
        "tail_in_flight": 1,
        "max_batch_budget_gib": budget_gib,
        "max_batch_budget_why": f"a {CARD_GIB:.0f} GiB card less about {CONTEXT_GIB} GiB of CUDA context",
        "results": results,
    }
    common = {"commands": commands, "figures": figures, "shrunk": plan.shrunk.get("stages", "")}
    if failures:
        result = _failed(name, "; ".join(failures), **common)
        result.error_tail = "\n".join(tails)[-ERROR_TAIL_CHARS:]
        return result
    return StepResult(name=name, status="ok", **common)


def step_check_miner(plan: Plan, env: dict[str, Any], stages: StepResult, budget: Budget) -> StepResult:
    name = "check_miner"
    miner = env["miner_defaults"]
    batch = plan.stage_batch or miner["batch_size"]
    seq = plan.stage_seq or miner["seq_len"]
    command = _python(
        *("-m", "scripts.gpu_check", "--internal", "check-miner", "--preset", plan.stage_preset),
        *("--device", plan.device, "--batch", str(batch), "--seq", str(seq)),
    )
    timeout = budget.timeout(plan.check_timeout_s)
    if timeout < 40:
        return _no_time(name, budget, 40)
    finished = run_process(command, timeout)
    if finished.code != 0:
        return _failed(name, _outcome(finished, timeout), finished, commands=[command])
    figures = parse_json_output(finished.stdout)
    figures["estimate_vs_measured"] = compare_memory(figures["estimates"], stages)
    common = {"commands": [command], "figures": figures, "shrunk": plan.shrunk.get(name, "")}
    report = figures["report"]
    if not report["ok"]:
        failed = [c for c in report["checks"] if c["status"] == "fail"]
        return _failed(name, "; ".join(f"{c['name']}: {c['message']}" for c in failed), finished, **common)
    return StepResult(name=name, status="ok", **common)


def compare_memory(estimates: list[dict[str, Any]], stages: StepResult) -> list[dict[str, Any]]:
    """Per stage, iota check miner's estimate against the peak bench/stage_memory.py measured at the same
    batch, seq and outstanding forwards. The bench keeps no stashed weight copies (the miner's trainer
    may keep one per weight version in flight), so the estimate is also given without the stash."""
    measured = {r["stage"]: r for r in stages.figures.get("results", [])}
    rows = []
    for estimate in estimates:
        row = dict(estimate)
        found = measured.get(estimate["stage"])
        if found is None:
            row["measured"] = None
            row["note"] = f"not measured: the stages step is {stages.status}"
        else:
            kind = "peak_allocated_gib" if "peak_allocated_gib" in found else "peak_rss_gib"
            value = float(found[kind])
            row["measured"] = kind
            row["measured_gib"] = value
            if value > 0:
                row["ratio"] = round(estimate["total_gib"] / value, 3)
                row["ratio_without_stash"] = round(estimate["without_stash_gib"] / value, 3)
            if kind == "peak_rss_gib":
                row["note"] = (
                    "CPU: peak RSS counts the interpreter and torch too; not the estimate's quantity"
                )
        rows.append(row)
    return rows


def step_devnet(plan: Plan, budget: Budget) -> StepResult:
    name = "devnet"
    timeout = budget.timeout(plan.devnet_timeout_s)
    if timeout < 90:
        return _no_time(name, budget, 90)
    with tempfile.TemporaryDirectory(prefix="iota-gpu-check-") as tmp:
        summary_path = Path(tmp) / "summary.json"
        command = _python(
            *("-m", "iota.cli", "devnet", *plan.devnet_args),
            *("--workdir", str(Path(tmp) / "net"), "--summary", str(summary_path), "--status-interval", "10"),
        )
        finished = run_process(command, timeout, cwd=Path(tmp))
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    common = {"commands": [command], "shrunk": plan.shrunk.get(name, "")}
    if summary is None:
        return _failed(name, f"{_outcome(finished, timeout)}, no summary", finished, **common)
    figures, problems = devnet_verdict(summary)
    if finished.code != 0:
        problems.insert(0, _outcome(finished, timeout))
    if problems:
        return _failed(name, "; ".join(problems), finished, figures=figures, **common)
    return StepResult(name=name, status="ok", figures=figures, **common)


def devnet_verdict(summary: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The summary's figures, and what makes the step fail: no training, no replay judged, the validators'
    wait cut short, or any honest miner failed by a replay, flagged by CLASP or penalized."""
    behaviors: dict[str, str] = summary.get("behaviors", {})
    validation: dict[str, Any] = summary.get("validation", {})
    adversaries = sorted(h for h, b in behaviors.items() if b != "honest")
    failed = set(validation.get("replays_failed", {}))
    penalized = set(validation.get("penalized", []))
    figures = {
        key: summary.get(key)
        for key in (
            "preset",
            "stages",
            "miners",
            "batch_size",
            "seq_len",
            "samples_completed",
            "tokens_per_s",
            "loss_first",
            "loss_last",
            "merges_completed",
            "merges_rolled_back",
            "epochs",
            "dropped_samples",
            "attempts_failed",
            "duration_s",
        )
    }
    figures["behaviors"] = behaviors
    figures["validation"] = validation
    figures["adversaries"] = len(adversaries)
    # Informational: a short run may not replay every adversary; a false positive is what fails the step.
    figures["adversaries_caught"] = sum(h in failed or h in penalized for h in adversaries)
    problems = []
    if not summary.get("samples_completed"):
        problems.append("no sample completed")
    if not validation:
        problems.append("no validation summary (no validator ran)")
    else:
        if not validation.get("finished"):
            problems.append("the validators did not finish judging")
        if not validation.get("replays"):
            problems.append("no replay was judged")
        if validation.get("false_positives"):
            replay, clasp = validation.get("replay_false_positives"), validation.get("clasp_false_positives")
            problems.append(
                f"{validation['false_positives']} false positives (replay {replay}, CLASP {clasp})"
            )
        if validation.get("honest_penalized"):
            problems.append(f"honest miners penalized: {validation['honest_penalized']}")
    return figures, problems


# ---------------------------------------------------------------------------------------------------------
# Steps that run inside a child process (`--internal NAME`), so that a hung CUDA call has a timeout


def internal_environment() -> dict[str, Any]:
    import platform

    import torch

    from common.config import DataSettings
    from iota.preflight import count_stage_parameters
    from orchestrator.settings import OrchestratorSettings

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "host_memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    try:
        import transformers

        facts["transformers"] = transformers.__version__
    except ImportError:
        facts["transformers"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            device_count=torch.cuda.device_count(),
            device_name=props.name,
            device_total_memory_gib=round(props.total_memory / 2**30, 2),
            device_capability=f"{props.major}.{props.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
            driver=_nvidia_driver(),
        )
    facts["miner_defaults"] = {
        "batch_size": DataSettings.model_fields["batch_size"].default,
        "seq_len": DataSettings.model_fields["seq_len"].default,
        "max_outstanding": OrchestratorSettings.model_fields["max_outstanding"].default,
    }
    from common.model import PRESETS, get_preset

    facts["stage_plans"] = {
        name: [
            {"stage": s.stage, "role": s.role, "blocks": s.blocks, "parameters": s.parameters}
            for s in count_stage_parameters(get_preset(name))
        ]
        for name in ("tiny", "1.5b", "15b")
        if name in PRESETS
    }
    return facts


def _nvidia_driver() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


_NEEDS = re.compile(r"needs about ([\d,.]+) GiB")


def internal_check_miner(preset: str, device: str, batch: int, seq: int) -> dict[str, Any]:
    """`iota check miner --json` as a miner of a `preset` run runs it (an orchestrator of that run, a
    registered hotkey on its local chain), and the check's own memory estimate for every stage."""
    from common.keys import create_hotkey
    from common.model import get_preset
    from iota.devnet import WALLET, Devnet, DevnetOptions
    from iota.preflight import GIB, MEMORY_MARGIN, count_stage_parameters, estimate_stage_memory
    from orchestrator.settings import OrchestratorSettings

    with tempfile.TemporaryDirectory(prefix="iota-gpu-check-miner-") as tmp:
        options = DevnetOptions(preset=preset, batch_size=batch, seq_len=seq, workdir=Path(tmp))
        with Devnet(options) as net:
            net.start_orchestrator()
            hotkey = create_hotkey(WALLET, "gpucheck", net.workdir / "wallets")
            net.chain.register(hotkey.ss58_address)
            env = net.env(IOTA_WALLET_HOTKEY="gpucheck", IOTA_MINER_DEVICE=device)
            start = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "iota.cli", "check", "miner", "--json"],
                cwd=net.workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            check_s = time.monotonic() - start
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise SystemExit(
            f"iota check miner printed no JSON (exit {done.returncode}):\n{done.stderr}"
        ) from None
    memory = next((c for c in report["checks"] if c["name"] == "gpu memory"), None)
    match = _NEEDS.search(memory["message"]) if memory else None

    cfg = get_preset(preset)
    in_flight = OrchestratorSettings.model_fields["max_outstanding"].default
    estimates = []
    for size in count_stage_parameters(cfg):
        e = estimate_stage_memory(cfg, size, batch, seq, in_flight)
        without_stash = e.states + e.activations
        estimates.append(
            {
                "stage": e.stage,
                "role": e.role,
                "parameters": e.parameters,
                "held_forwards": e.held_forwards,
                "total_gib": round(e.total / GIB, 3),
                "states_gib": round(e.states / GIB, 3),
                "optimizer_gib": round(e.optimizer / GIB, 3),
                "stash_gib": round(e.stash / GIB, 3),
                "activations_gib": round(e.activations / GIB, 3),
                "margin_gib": round(e.margin / GIB, 3),
                "without_stash_gib": round(math.ceil(without_stash * (1 + MEMORY_MARGIN)) / GIB, 3),
            }
        )
    return {
        "preset": preset,
        "device": device,
        "batch": batch,
        "seq": seq,
        "in_flight": in_flight,
        "check_s": round(check_s, 1),
        "exit_code": done.returncode,
        "report": report,
        # What the check itself printed for the stage it chose (the largest, no IOTA_MINER_STAGE set).
        "check_estimate_gib": float(match.group(1).replace(",", "")) if match else None,
        "estimates": estimates,
    }


def internal_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="gpu_check --internal")
    parser.add_argument("--internal", required=True, choices=("environment", "check-miner"))
    parser.add_argument("--preset", default="1.5b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args(argv)
    if args.internal == "environment":
        result = internal_environment()
    else:
        result = internal_check_miner(args.preset, args.device, args.batch, args.seq)
    print(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------------------------------------
# The whole check


def write_report(report: Report, out: Path) -> None:
    """Atomically, so a reader (or a run cut short) never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(report.model_dump_json(indent=2) + "\n")
    tmp.replace(out)


def run_check(plan: Plan, budget_s: float, out: Path, log: Callable[[str], None]) -> Report:
    """Every step in order of what matters most, within `budget_s`; raises NoCuda (having written
    nothing) when the real check finds no CUDA device."""
    budget = Budget(budget_s)
    report = Report(dry_run=plan.dry_run, started_at=datetime.now(UTC).isoformat(), budget_s=budget_s)
    started = time.monotonic()

    def record(name: str, step: Callable[[], StepResult]) -> StepResult:
        start = time.monotonic()
        try:
            result = step()
        except Exception as error:  # a step's own bug or an output it could not read: the rest still run
            result = StepResult(name=name, status="failed", reason=f"{type(error).__name__}: {error}")
        result.wall_s = max(result.wall_s, round(time.monotonic() - start, 1))
        report.steps.append(result)
        report.ok = not any(s.status == "failed" for s in report.steps)
        report.wall_s = round(time.monotonic() - started, 1)
        write_report(report, out)
        why = f": {result.reason}" if result.reason else ""
        log(f"[{report.wall_s:5.0f} s] {result.name}: {result.status} ({result.wall_s:.0f} s){why}")
        return result

    environment = step_environment(plan, budget)
    facts = environment.figures
    if environment.status == "ok" and not plan.dry_run and not facts.get("cuda_available"):
        raise NoCuda(facts)
    report.environment = {k: v for k, v in facts.items() if k != "stage_plans"}
    record("environment", lambda: environment)
    if environment.status != "ok":
        return report
    record("model", lambda: step_model("model", plan, budget))
    stages = record("stages", lambda: step_stages("stages", plan.stage_preset, plan, facts, budget))
    record("check_miner", lambda: step_check_miner(plan, facts, stages, budget))
    record("devnet", lambda: step_devnet(plan, budget))
    record("model_compiled", lambda: step_model("model_compiled", plan, budget))
    record("stages_15b", lambda: step_stages("stages_15b", plan.stage_large_preset, plan, facts, budget))
    record("model_large", lambda: step_model("model_large", plan, budget))
    record("model_large_compiled", lambda: step_model("model_large_compiled", plan, budget))
    return report


class NoCuda(Exception):
    def __init__(self, facts: dict[str, Any]) -> None:
        super().__init__("no CUDA device")
        self.facts = facts


def cuda_missing_message(facts: dict[str, Any]) -> str:
    build = (
        f"torch {facts.get('torch')} built for CUDA {facts['torch_cuda']}"
        if facts.get("torch_cuda")
        else (f"torch {facts.get('torch')} is a CPU build")
    )
    return (
        f"gpu_check: no CUDA device ({build}): this check measures the CUDA path and needs one H100 or "
        "H200. Run it on a GPU machine, or pass --dry-run to prove the script's plumbing on the CPU."
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--internal" in argv:
        internal_main(argv)
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="scripts/gpu_check.sh"
    )
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny sizes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON file to write")
    parser.add_argument(
        "--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall time for all steps together"
    )
    args = parser.parse_args(argv)
    plan = dry_plan() if args.dry_run else real_plan()

    def log(line: str) -> None:
        print(line, flush=True)

    mode = "dry run on the CPU" if args.dry_run else "CUDA"
    log(f"gpu_check ({mode}): budget {args.budget_s:.0f} s, writing {args.out}")
    try:
        report = run_check(plan, args.budget_s, args.out, log)
    except NoCuda as missing:
        print(cuda_missing_message(missing.facts), file=sys.stderr)
        return 2
    failed = [s.name for s in report.steps if s.status == "failed"]
    skipped = [s.name for s in report.steps if s.status == "skipped"]
    log(
        f"gpu_check: {len(report.steps) - len(failed) - len(skipped)} ok, {len(failed)} failed "
        f"({', '.join(failed) or '-'}), {len(skipped)} skipped ({', '.join(skipped) or '-'}) in "
        f"{report.wall_s:.0f} s; {args.out}"
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
