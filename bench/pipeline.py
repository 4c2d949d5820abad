"""Pipeline efficiency: tokens/s of the whole devnet against one process training the same model.

Three figures, taken one after the other on the same machine (never concurrently):

1. devnet tokens/s: `run_devnet` (embedded S3, local chain, orchestrator and one process per miner, real
   HTTP) for `--duration` seconds, timed from when every miner is registered. The first sample's pipeline
   fill falls inside that window, so short runs understate the steady-state rate.
2. single-process tokens/s: `IotaModel` (all stages in one module) trained with one AdamW (the orchestrator's
   default lr 1e-3, weight decay 0.1, betas (0.9, 0.95), per-stage gradient clip 1.0 as the miners do) on
   the same batches (`batch_tokens` of the run's `SampleSchedule`), with torch using every core. It runs in
   a subprocess before the devnet starts; building each batch from the corpus is inside the timed loop.
3. efficiency ratio = devnet / single-process.

Then where the miners' time went, from their timings files (`<workdir>/logs/minerN.timings.json`, written at
exit): compute, S3 download and upload, codec (encode, decode and hash), orchestrator calls
(`/v1/work/complete`, including the orchestrator's check of the upload) and waiting for work (time inside
`/v1/work/next`, which includes its round trips), each in seconds and as a share of the miners' wall time.
A miner's wall time runs from its start (before registration) to its exit, so it is longer than the
measured window. CPU seconds per process within the window come from /proc.

    python bench/pipeline.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if not __package__:  # run as `python bench/<name>.py`, not `-m bench.<name>`: see bench/_repo_root.py
    import _repo_root  # noqa: F401

from bench.report import emit
from common.config import DataSettings, ModelSettings
from common.data import SampleSchedule, batch_tokens, make_corpus
from common.model import IotaModel, get_preset, next_token_loss
from iota.devnet import DevnetOptions, default_threads, run_devnet
from orchestrator.settings import OrchestratorSettings

OUT_DIR = Path(__file__).resolve().parent / "out"
CATEGORIES = ("compute", "download", "upload", "codec", "report", "poll")
LABELS = {
    "compute": "compute (forward, backward, optimizer)",
    "download": "S3 download",
    "upload": "S3 upload",
    "codec": "codec (encode, decode, hash)",
    "report": "orchestrator calls (complete, incl. its upload check)",
    "poll": "waiting for work (includes poll round trips)",
    "other": "other (startup, registration, head tokens, loop)",
}
# The defaults the devnet's processes run with (it strips IOTA_ variables from their environment), so
# `model_construct`: the fields' defaults, whatever this process's environment says.
RUN = OrchestratorSettings.model_construct()  # the miners' inner AdamW
SCHEDULE_SEED = ModelSettings.model_construct().seed  # the seed of the orchestrator's SampleSchedule


def data_settings(batch: int, seq: int) -> DataSettings:
    """The devnet's data: the local corpus (the standard library's sources) read as bytes."""
    return DataSettings(
        source="local",
        local_root=None,
        local_pattern="**/*.py",
        tokenizer="byte",
        batch_size=batch,
        seq_len=seq,
    )


# -- single process -----------------------------------------------------------------------------------------


def single_process(
    preset: str, batch: int, seq: int, warmup: int, seconds: float, steps: int, threads: int
) -> dict[str, Any]:
    """Train the whole model in this process; tokens/s over `steps` steps, or over about `seconds`."""
    torch.set_num_threads(threads)
    cfg = get_preset(preset)
    model = IotaModel(cfg, seed=0)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=RUN.lr, betas=(RUN.beta1, RUN.beta2), weight_decay=RUN.weight_decay
    )
    corpus = make_corpus(data_settings(batch, seq))
    schedule = SampleSchedule(corpus, seed=SCHEDULE_SEED)
    losses: list[float] = []

    def one_step(index: int) -> None:
        tokens = batch_tokens(corpus, schedule.batch(index, batch), seq)  # as the orchestrator hands it out
        loss = next_token_loss(model(tokens), tokens)
        loss.backward()
        for stage in model.stages:
            torch.nn.utils.clip_grad_norm_(stage.parameters(), RUN.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    for i in range(warmup):
        one_step(i)
    done = 0
    start = time.perf_counter()
    while (done < steps) if steps else (done == 0 or time.perf_counter() - start < seconds):
        one_step(warmup + done)
        done += 1
    elapsed = time.perf_counter() - start
    return {
        "tokens_per_s": round(done * batch * seq / elapsed, 1),
        "steps": done,
        "warmup_steps": warmup,
        "seconds": round(elapsed, 2),
        "step_s": round(elapsed / done, 4),
        "torch_threads": threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
    }


def single_process_subprocess(args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--single-process-only", "--preset", args.preset,
        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--warmup", str(args.warmup),
        "--single-seconds", str(args.single_seconds), "--single-steps", str(args.single_steps),
        "--single-threads", str(args.single_threads),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the single-process benchmark failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- CPU seconds of the devnet's processes -----------------------------------------------------------------


def _cpu_seconds(pid: int | str) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a process, from /proc/<pid>/stat; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on; the name may hold spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_name(pid: str) -> str:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return f"pid{pid}"
    for entry in environ:
        if entry.startswith(b"IOTA_WALLET_HOTKEY="):
            return entry.split(b"=", 1)[1].decode()
    return "orchestrator"


class CpuSampler:
    """CPU seconds of this process (embedded S3, the devnet's loop) and of its children, sampled over time."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.first_t = self.last_t = 0.0
        self.last_wall = 0.0  # wall-clock time of the last sample, about a second before the window closes
        self.names: dict[str, str] = {}

    def sample(self) -> None:
        me = os.getpid()
        now: dict[str, float] = {}
        own = _cpu_seconds("self")
        if own is not None:
            now["bench (embedded S3, devnet loop)"] = own[1]
        if Path("/proc").is_dir():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                info = _cpu_seconds(entry.name)
                if info is None or info[0] != me:
                    continue
                name = self.names.setdefault(entry.name, _process_name(entry.name))
                now[name] = info[1]
        if not self.first:
            self.first, self.first_t = now, time.monotonic()
        self.last, self.last_t, self.last_wall = now, time.monotonic(), time.time()

    def result(self) -> dict[str, Any] | None:
        window = self.last_t - self.first_t
        if not self.first or window <= 0:
            return None
        processes = {
            name: {
                "cpu_s": round(self.last[name] - self.first.get(name, 0.0), 2),
                "cores_busy": round((self.last[name] - self.first.get(name, 0.0)) / window, 2),
            }
            for name in sorted(self.last)
        }
        total = sum(p["cpu_s"] for p in processes.values())
        return {
            "window_s": round(window, 2),
            "processes": processes,
            "total_cpu_s": round(total, 2),
            "cores_busy": round(total / window, 2),
        }


# -- the miners' timings -----------------------------------------------------------------------------------


def _breakdown(files: list[dict[str, Any]]) -> dict[str, Any]:
    wall = sum(float(f["wall_s"]) for f in files)
    seconds = {k: sum(float(f["seconds"].get(k, 0.0)) for f in files) for k in CATEGORIES}
    counts = {k: sum(int(f["counts"].get(k, 0)) for f in files) for k in CATEGORIES}
    seconds["other"] = max(0.0, wall - sum(seconds.values()))
    return {
        "miners": len(files),
        "wall_s": round(wall, 2),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "share": {k: round(v / wall, 4) if wall else 0.0 for k, v in seconds.items()},
        "counts": counts,
        "per_call_ms": {k: round(1000 * seconds[k] / counts[k], 1) for k in CATEGORIES if counts[k]},
    }


def time_breakdown(workdir: Path, window_end: float) -> dict[str, Any]:
    """Per stage and in total: the miners' seconds per category and their share of the miners' wall time.

    A file last written before `window_end` (wall clock) missed the miner's final write at exit: it covers
    only part of the run, and is listed under `stale_files`.
    """
    paths = sorted((workdir / "logs").glob("miner*.timings.json"))
    files = [json.loads(p.read_text()) for p in paths]
    stages = sorted({f["stage"] for f in files if f["stage"] is not None})
    return {
        "per_stage": {str(s): _breakdown([f for f in files if f["stage"] == s]) for s in stages},
        "total": _breakdown(files),
        "miner_stage": {p.name.split(".")[0]: f["stage"] for p, f in zip(paths, files, strict=True)},
        "stale_files": [p.name for p in paths if p.stat().st_mtime < window_end],
        "labels": LABELS,
    }


# -- the run ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    cpu_count = os.cpu_count() or 1

    def progress(text: str) -> None:
        if not args.json:
            print(text, file=sys.stderr, flush=True)

    progress(f"single process: {args.preset} B={args.batch_size} T={args.seq_len}, {cpu_count} threads...")
    single = single_process_subprocess(args)
    progress(f"single process: {single['tokens_per_s']:,.0f} tokens/s; starting the devnet...")

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="iota-pipeline-bench-"))
    if (workdir / "logs").exists() and any((workdir / "logs").glob("miner*.timings.json")):
        raise SystemExit(f"{workdir} holds an earlier run's timings; give an empty or new --workdir")
    options = DevnetOptions(
        preset=args.preset,
        miners_per_stage=args.miners_per_stage,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        duration_s=args.duration,
        workdir=workdir,
        torch_threads=args.miner_threads or None,
        merge_every=0,  # the pipeline alone; what a merge costs is bench/merge.py's to measure
        validators=0,  # validators replay beside training, on their own machines; bench/validation.py
    )
    sampler = CpuSampler()

    def on_progress(status: Any, loss: float | None, elapsed: float) -> None:
        sampler.sample()
        if int(elapsed) % 10 == 0 or elapsed < 1.5:
            loss_text = f"{loss:.3f}" if loss is not None else "-"
            progress(f"[{elapsed:4.0f} s] {status.samples_completed} samples done, loss {loss_text}")

    summary = run_devnet(options, on_progress)  # returns after every process has stopped
    breakdown = time_breakdown(workdir, sampler.last_wall)
    n_stages = int(summary["stages"])
    devnet_rate, single_rate = float(summary["tokens_per_s"]), float(single["tokens_per_s"])
    miner_threads = args.miner_threads or default_threads(n_stages * args.miners_per_stage)
    result: dict[str, Any] = {
        "devnet_tokens_per_s": devnet_rate,
        "single_process_tokens_per_s": single_rate,
        "efficiency_ratio": round(devnet_rate / single_rate, 4) if single_rate else None,
        "time_breakdown": breakdown,
        "cpu": sampler.result(),
        "single_process": single,
        "config": {
            "preset": args.preset,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "duration_s": args.duration,
            "miners_per_stage": args.miners_per_stage,
            "stages": n_stages,
            "cpu_count": cpu_count,
            "torch_threads_per_miner": miner_threads,
            "torch_threads_single_process": single["torch_threads"],
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "devnet_summary": summary,
        "notes": [
            "devnet tokens/s is timed from when every miner is registered; the first sample's pipeline fill "
            "is inside the window",
            "miners' wall time runs from process start to exit, so it includes startup and registration",
            "compute and transfer seconds are wall clock: CPU contention (more busy threads than cores) "
            "inflates them; the cpu section shows the CPU each process actually got",
        ],
    }
    if breakdown["stale_files"]:
        result["notes"].append(f"stale timings (no final write): {', '.join(breakdown['stale_files'])}")
    cpu = result["cpu"]
    if cpu:
        for name, entry in cpu["processes"].items():
            if name in breakdown["miner_stage"]:
                entry["stage"] = breakdown["miner_stage"][name]
    if not args.keep_workdir and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
        result["devnet_summary"]["workdir"] = None
    return result


def print_table(r: dict[str, Any]) -> None:
    c = r["config"]
    print(
        f"{c['preset']} B={c['batch_size']} T={c['seq_len']}, {c['stages']} stages x {c['miners_per_stage']} "
        f"miner(s), {c['duration_s']:g} s, {c['cpu_count']} CPUs, torch {c['torch']} "
        f"({c['torch_threads_per_miner']} thread(s) per miner, {c['torch_threads_single_process']} single)"
    )
    s, d = r["single_process"], r["devnet_summary"]
    print(f"{'devnet':16} {r['devnet_tokens_per_s']:>10,.0f} tok/s  ({d['samples_completed']} samples in "
          f"{d['duration_s']} s, incl. pipeline fill; {d['dropped_samples']} dropped)")  # fmt: skip
    print(f"{'single process':16} {r['single_process_tokens_per_s']:>10,.0f} tok/s  ({s['steps']} steps in "
          f"{s['seconds']} s, {s['step_s'] * 1000:.0f} ms/step)")  # fmt: skip
    print(f"{'efficiency':16} {r['efficiency_ratio']:>10.3f}")
    print()
    stages = r["time_breakdown"]["per_stage"]
    columns = [*(f"stage {k}" for k in stages), "total"]
    parts = [*stages.values(), r["time_breakdown"]["total"]]
    print(f"{'miner time (s, % of wall)':54}" + "".join(f"{col:>16}" for col in columns))
    for key in (*CATEGORIES, "other"):
        cells = "".join(f"{p['seconds'][key]:>9.1f} {100 * p['share'][key]:>5.1f}%" for p in parts)
        print(f"{LABELS[key]:54}{cells}")
    print(f"{'wall':54}" + "".join(f"{p['wall_s']:>9.1f}       " for p in parts))
    for key in ("compute", "report", "upload", "download"):
        cells = "".join(f"{p['per_call_ms'].get(key, 0.0):>13.1f} ms" for p in parts)
        print(f"{'  per call: ' + key:54}{cells}")
    cpu = r["cpu"]
    if cpu:
        print()
        print(
            f"CPU seconds over {cpu['window_s']} s of the measured window ({cpu['cores_busy']} cores busy):"
        )
        for name, p in cpu["processes"].items():
            label = f"{name} (stage {p['stage']})" if "stage" in p else name
            print(f"  {label:34} {p['cpu_s']:>8.1f} s  {p['cores_busy']:>5.2f} cores")
    for note in r["notes"][3:]:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--duration", type=float, default=60.0, help="devnet seconds, once all registered")
    parser.add_argument("--miners-per-stage", type=int, default=1)
    parser.add_argument("--miner-threads", type=int, default=0, help="torch threads per miner (0: devnet's)")
    parser.add_argument("--warmup", type=int, default=3, help="single-process steps before timing")
    parser.add_argument("--single-seconds", type=float, default=20.0, help="single-process timed seconds")
    parser.add_argument("--single-steps", type=int, default=0, help="time this many steps instead (0: off)")
    parser.add_argument("--single-threads", type=int, default=0, help="single-process torch threads (0: all)")
    parser.add_argument("--workdir", default=None, help="devnet state and logs (default: a temp folder)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp workdir and its logs")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "pipeline.json", help="where to write the JSON")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--single-process-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.single_process_only:
        result = single_process(
            args.preset,
            args.batch_size,
            args.seq_len,
            args.warmup,
            args.single_seconds,
            args.single_steps,
            args.single_threads or os.cpu_count() or 1,
        )
        print(json.dumps(result))
        return
    emit(run(args), args.out, as_json=args.json, print_table=print_table)


if __name__ == "__main__":
    main()
