"""Load: N simulated miners against one orchestrator on loopback, with real signed HTTP.

Three processes, so none steals another's interpreter:

- this one: the embedded S3 server (moto) and the local chain, on which it registers N hotkeys;
- the orchestrator (`iota orchestrator`, as the devnet starts it; merges and validation off, so the work
  routes are what is measured);
- the load generator (this script with `--worker`): one asyncio task per simulated miner, each signing its
  requests with its own sr25519 hotkey and following the miner's request mix: register, then forever
  `POST /v1/work/next` (long poll) -> wait `--compute-ms` (the miner's compute) -> `PUT` the output to its
  presigned URL (a real encoded boundary tensor of the run's shape) -> `POST /v1/work/complete` (the tail
  also reports its loss). Head miners' forwards carry no input; the simulated miners do not download
  inputs, which is traffic between miners and S3, not the orchestrator.

Figures, over `--duration` seconds after every miner has registered and `--warmup` seconds have passed:

- `rps`: orchestrator requests answered per second (every route, long polls included);
- `p50_ms`, `p99_ms`: latency of those requests as the client sees it, less the time a long poll was
  parked waiting for work (the orchestrator reports it in a `Server-Timing: wait` header): what a request
  costs, not how long there was nothing to do;
- `errors`: answers other than 2xx, and requests that failed on the way, over the whole run;
- `lost_items`: completions the orchestrator acknowledged that its state file does not hold as done, plus
  samples it dropped;
- `items_per_s` and the requests by route; with `--profile`, the orchestrator runs under cProfile and the
  functions where its event loop spends the most time are printed.

    python bench/load.py --miners 1000 --duration 30 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as `python bench/<name>.py`, not `-m bench.<name>`: see bench/_repo_root.py
    import _repo_root  # noqa: F401

import httpx
from bittensor.sp_core import Keypair

from bench.report import emit
from common.auth import EpistulaAuth
from common.model import ModelConfig
from common.protocol import (
    HEADER_PROTOCOL,
    MINERS_REGISTER,
    PROTOCOL_VERSION,
    WORK_COMPLETE,
    WORK_NEXT,
    ArtifactRef,
    CompleteRequest,
    RegisterRequest,
    RegisterResponse,
    WorkItem,
    WorkRequest,
    WorkResponse,
)

OUT = Path(__file__).resolve().parent / "out" / "load.json"
SERVER_WAIT = "wait;dur="


def hotkey(index: int) -> Keypair:
    """The i-th simulated miner's hotkey: derived, so both processes know it without a wallet on disk."""
    return Keypair.create_from_uri(f"//iota-load/{index}")


# ---------------------------------------------------------------------------------------------------------
# The load generator (`--worker`): simulated miners in one asyncio loop


@dataclass
class Tally:
    """What the simulated miners saw; latencies only inside the measured window."""

    window: tuple[float, float]
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    answered_in_window: int = 0
    items_in_window: int = 0
    acked_completions: int = 0
    registered: int = 0
    retried: int = 0

    def inside(self, t: float) -> bool:
        return self.window[0] <= t < self.window[1]


class SimulatedMiner:
    def __init__(self, keypair: Keypair, args: argparse.Namespace, tally: Tally) -> None:
        # A client (two connections: the orchestrator and S3) per miner, as each real miner has: one pool of
        # a thousand connections costs httpx time linear in its size on every request.
        self.http = httpx.AsyncClient(
            base_url=args.url,
            headers={HEADER_PROTOCOL: str(PROTOCOL_VERSION), "content-type": "application/json"},
            limits=httpx.Limits(max_connections=2),
            verify=False,  # plain HTTP on loopback; skips loading the CA bundle a thousand times
        )
        self.args, self.tally = args, tally
        self.auth = EpistulaAuth(keypair)
        self.run_id, self.session, self.n_stages = "", 0, 0

    async def post(self, path: str, body: Any) -> httpx.Response | None:
        started = time.monotonic()
        content = body.model_dump_json().encode()
        for attempt in range(2):
            try:
                resp = await self.http.post(path, content=content, auth=self.auth, timeout=60.0)
                break
            except httpx.TransportError as error:
                # A kept-alive connection the server closed as the request went out: the real client retries
                # (signed afresh), and so does this one, once. Counted, but not as an error.
                if attempt == 0 and isinstance(error, (httpx.ReadError, httpx.RemoteProtocolError)):
                    self.tally.retried += 1
                    continue
                self.tally.errors[f"{path} {type(error).__name__}"] += 1
                return None
            except httpx.HTTPError as error:
                self.tally.errors[f"{path} {type(error).__name__}"] += 1
                return None
        done = time.monotonic()
        if resp.status_code >= 300:
            self.tally.errors[f"{path} {resp.status_code} {resp.text[:80]}"] += 1
        if self.tally.inside(done):
            parked_ms = 0.0
            timing = resp.headers.get("server-timing", "")
            if timing.startswith(SERVER_WAIT):
                parked_ms = float(timing[len(SERVER_WAIT) :])
            latency_ms = max(0.0, (done - started) * 1000 - parked_ms)
            self.tally.latencies_ms.setdefault(path, []).append(latency_ms)
            self.tally.answered_in_window += 1
        return resp if resp.status_code < 300 else None

    async def register(self) -> bool:
        request = RegisterRequest(device="cpu", corpus_fingerprint=self.args.fingerprint)
        resp = await self.post(MINERS_REGISTER.path, request)
        if resp is None:
            return False
        reg = RegisterResponse.model_validate_json(resp.content)
        self.run_id, self.session, self.n_stages = (
            reg.run_id,
            reg.session,
            ModelConfig.from_dict(reg.model).n_stages,
        )
        self.tally.registered += 1
        return True

    async def run(self, stop: asyncio.Event, payload: bytes, payload_ref: tuple[int, str]) -> None:
        async with self.http:
            await self.loop(stop, payload, payload_ref)

    async def loop(self, stop: asyncio.Event, payload: bytes, payload_ref: tuple[int, str]) -> None:
        while not await self.register():
            await asyncio.sleep(1.0)
        while not stop.is_set():  # an item in hand is finished and reported first
            resp = await self.post(
                WORK_NEXT.path, WorkRequest(run_id=self.run_id, session=self.session, wait_s=5.0)
            )
            if resp is None:
                await asyncio.sleep(1.0)
                continue
            item = WorkResponse.model_validate_json(resp.content).item
            if item is not None:
                await self.work(item, payload, payload_ref)

    async def work(self, item: WorkItem, payload: bytes, payload_ref: tuple[int, str]) -> None:
        await asyncio.sleep(self.args.compute_ms / 1000)
        output = None
        if item.output is not None:
            try:
                put = await self.http.put(item.output.url, content=payload, timeout=60.0)
            except httpx.HTTPError as error:
                self.tally.errors[f"S3 PUT {type(error).__name__}"] += 1
                return
            if put.status_code != 200:
                self.tally.errors[f"S3 PUT {put.status_code}"] += 1
                return
            output = ArtifactRef(key=item.output.key, size=payload_ref[0], sha256=payload_ref[1])
        tail_forward = item.kind == "forward" and item.stage == self.n_stages - 1
        request = CompleteRequest(
            run_id=self.run_id,
            session=self.session,
            item_id=item.item_id,
            output=output,
            loss=4.0 if tail_forward else None,
            compute_s=self.args.compute_ms / 1000,
        )
        if await self.post(WORK_COMPLETE.path, request) is not None:
            self.tally.acked_completions += 1
            if self.tally.inside(time.monotonic()):
                self.tally.items_in_window += 1


def boundary_payload(batch: int, seq: int) -> bytes:
    """One real encoded boundary activation of the tiny preset, as a miner uploads it."""
    import torch

    from common.codec import encode_tensors
    from common.model import get_preset

    cfg = get_preset("tiny")
    activation = torch.randn(batch, seq, cfg.bottleneck_dim, generator=torch.Generator().manual_seed(0))
    return encode_tensors({"activation": activation.to(torch.bfloat16)})


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def crashed(tasks: list[asyncio.Task[None]]) -> None:
    """Raise the first exception a simulated miner died of: a bug in the bench must not read as load."""
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError("a simulated miner crashed") from task.exception()


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    from common.codec import content_hash

    keys = [hotkey(i) for i in range(args.miners)]
    payload = boundary_payload(args.batch_size, args.seq_len)
    payload_ref = (len(payload), content_hash(payload))
    start = time.monotonic()
    # The window opens after registration (a burst no steady network sees) and the warm-up.
    tally = Tally(window=(float("inf"), float("inf")))
    miners = [SimulatedMiner(key, args, tally) for key in keys]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(m.run(stop, payload, payload_ref)) for m in miners]
    while tally.registered < len(miners):
        await asyncio.sleep(0.2)
        crashed(tasks)
        if time.monotonic() - start > args.register_timeout:
            raise TimeoutError(
                f"only {tally.registered} of {len(miners)} miners registered in "
                f"{args.register_timeout} s; "
                f"errors: {dict(tally.errors.most_common(5))}"
            )
    registered_s = time.monotonic() - start
    opens = time.monotonic() + args.warmup
    tally.window = (opens, opens + args.duration)
    await asyncio.sleep(args.warmup)
    cpu_at_open = cpu_seconds(args.orchestrator_pid), cpu_seconds(os.getpid()), cpu_seconds(os.getppid())
    if args.profile:
        os.kill(args.orchestrator_pid, signal.SIGUSR1)
    await asyncio.sleep(args.duration)
    orchestrator_cores = (cpu_seconds(args.orchestrator_pid) - cpu_at_open[0]) / args.duration
    generator_cores = (cpu_seconds(os.getpid()) - cpu_at_open[1]) / args.duration
    s3_cores = (cpu_seconds(os.getppid()) - cpu_at_open[2]) / args.duration  # the harness serves S3
    if args.profile:
        os.kill(args.orchestrator_pid, signal.SIGUSR2)
    crashed(tasks)
    # Every miner finishes the item it holds and reports it, so each completion the orchestrator recorded
    # was acknowledged to its miner and the two counts must agree exactly.
    stop.set()
    _, stuck = await asyncio.wait(tasks, timeout=120)
    crashed(tasks)
    if stuck:
        raise RuntimeError(f"{len(stuck)} simulated miners did not finish their item within 120 s")
    everything = sorted(ms for route in tally.latencies_ms.values() for ms in route)
    return {
        "rps": tally.answered_in_window / args.duration,
        "p50_ms": percentile(everything, 0.50),
        "p99_ms": percentile(everything, 0.99),
        "errors": sum(tally.errors.values()),
        "retried_transport_errors": tally.retried,
        "error_kinds": dict(tally.errors.most_common(10)),
        "items_per_s": tally.items_in_window / args.duration,
        "requests_by_route": {
            route: {
                "per_s": len(ms) / args.duration,
                "p50_ms": percentile(sorted(ms), 0.50),
                "p99_ms": percentile(sorted(ms), 0.99),
            }
            for route, ms in sorted(tally.latencies_ms.items())
        },
        "acked_completions": tally.acked_completions,
        "register_all_s": registered_s,
        "orchestrator_cpu_cores": orchestrator_cores,
        "generator_cpu_cores": generator_cores,
        "s3_cpu_cores": s3_cores,
        "payload_bytes": payload_ref[0],
    }


# ---------------------------------------------------------------------------------------------------------
# The orchestrator, profiled only inside the measured window


def serve_profiled(out: Path) -> None:
    """`iota orchestrator`, with cProfile on the event loop's thread between SIGUSR1 and SIGUSR2.

    Start-up (imports, schema building) and the registration burst stay out of the profile. Work the
    orchestrator hands to threads (reading uploads back from S3, finalizing merges) is not in it either.
    """
    import cProfile
    import logging

    from orchestrator.server import build_orchestrator, serve

    logging.basicConfig(level=logging.WARNING)
    profiler = cProfile.Profile()
    signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())
    signal.signal(signal.SIGUSR2, lambda *_: (profiler.disable(), profiler.dump_stats(str(out))))
    orch = build_orchestrator()
    serve(orch, orch.settings.host, orch.settings.port)


# ---------------------------------------------------------------------------------------------------------
# The harness: S3, chain, orchestrator, then the generator in its own process


def register_hotkeys(chain_path: Path, n: int) -> None:
    from common.chain.local import LocalChain
    from iota.devnet import NETUID

    chain = LocalChain(chain_path, NETUID, block_time_s=1.0)
    for i in range(n):
        chain.register(hotkey(i).ss58_address)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def profile_top(path: Path, n: int = 25) -> list[dict[str, Any]]:
    stats = pstats.Stats(str(path))
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({name})",
                "calls": calls,
                "tottime_s": tottime,
                "cumtime_s": cumtime,
            }
        )
    return sorted(rows, key=lambda r: -r["tottime_s"])[:n]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from common.config import DataSettings
    from common.data import make_corpus
    from iota.devnet import Devnet, DevnetOptions

    workdir = Path(tempfile.mkdtemp(prefix="iota-load-"))
    options = DevnetOptions(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        workdir=workdir,
        merge_every=0,
        validation_fraction=0.0,
        extra_env={
            "IOTA_LOG_LEVEL": "WARNING",
            "IOTA_ORCH_POLL_WAIT_S": "5",
            "IOTA_ORCH_MINER_TIMEOUT_S": "60",
            "IOTA_ORCH_ITEM_TIMEOUT_S": "120",
            "IOTA_ORCH_STATUS_INTERVAL_S": "3600",
        },
    )
    fingerprint = make_corpus(DataSettings(_env_file=None)).fingerprint
    with Devnet(options) as net:
        started = time.monotonic()
        register_hotkeys(workdir / "chain.json", args.miners)
        chain_s = time.monotonic() - started
        profile = args.out.with_name("load-orchestrator.prof")  # kept: open it with pstats or snakeviz
        command = [sys.executable, "-m", "iota.cli", "orchestrator"]
        if args.profile:
            command = [sys.executable, __file__, "--serve-profiled", str(profile)]
        log = (workdir / "logs" / "orchestrator.log").open("ab")
        net.orchestrator = subprocess.Popen(command, cwd=workdir, env=net.env(), stdout=log, stderr=log)
        net.wait_healthy()
        worker = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--url",
                net.url,
                "--fingerprint",
                fingerprint,
                f"--orchestrator-pid={net.orchestrator.pid}",
                *(["--profile"] if args.profile else []),
                *(
                    f"--{k.replace('_', '-')}={v}"
                    for k, v in vars(args).items()
                    if k
                    in (
                        "miners",
                        "duration",
                        "warmup",
                        "compute_ms",
                        "batch_size",
                        "seq_len",
                        "register_timeout",
                    )
                ),
            ],
            stdout=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        out, _ = worker.communicate(timeout=args.duration + args.warmup + 600)
        if worker.returncode != 0:
            raise RuntimeError(f"the load generator failed (exit {worker.returncode})")
        result: dict[str, Any] = json.loads(out)
        status = net.status()
        net.orchestrator.send_signal(signal.SIGTERM)
        net.orchestrator.wait(60)
        from orchestrator.db import StateDB

        db = StateDB(workdir / "orchestrator.sqlite")
        try:
            recorded = db.count_items("done")
        finally:
            db.close()
    result.update(
        miners=args.miners,
        duration_s=args.duration,
        compute_ms=args.compute_ms,
        lost_items=max(0, result["acked_completions"] - recorded) + status.samples_dropped,
        recorded_completions=recorded,
        samples_completed=status.samples_completed,
        chain_register_s=chain_s,
        cores=os.cpu_count(),
    )
    if args.profile:
        result["profile_top"] = profile_top(profile)
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def print_table(r: dict[str, Any]) -> None:
    print(
        f"{r['miners']} simulated miners, {r['duration_s']:.0f} s measured, "
        f"{r['compute_ms']:.0f} ms compute/item"
    )
    print(
        f"  rps {r['rps']:.0f}   p50 {r['p50_ms']:.1f} ms   p99 {r['p99_ms']:.1f} ms   errors {r['errors']}"
        f"   lost items {r['lost_items']}"
    )
    print(
        f"  items/s {r['items_per_s']:.0f}   orchestrator CPU {r['orchestrator_cpu_cores']:.2f} cores"
        f"   load generator {r['generator_cpu_cores']:.2f}   S3 {r['s3_cpu_cores']:.2f}"
        f"   registering all took {r['register_all_s']:.1f} s"
    )
    for route, row in r["requests_by_route"].items():
        print(
            f"    {route:<24} {row['per_s']:8.1f} /s"
            f"   p50 {row['p50_ms']:7.1f} ms   p99 {row['p99_ms']:7.1f} ms"
        )
    for kind, n in r["error_kinds"].items():
        print(f"  error x{n}: {kind}")
    for row in r.get("profile_top", []):
        print(f"    {row['tottime_s']:7.2f} s {row['cumtime_s']:7.2f} s {row['calls']:>9} {row['function']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--miners", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=30.0, help="Measured seconds.")
    parser.add_argument("--warmup", type=float, default=10.0, help="Seconds after registration, unmeasured.")
    parser.add_argument("--compute-ms", type=float, default=1000.0, help="Simulated compute per item.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--register-timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="Run the orchestrator under cProfile.")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT, help="Where the JSON result is written.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--fingerprint", help=argparse.SUPPRESS)
    parser.add_argument("--orchestrator-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-profiled", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_profiled:
        serve_profiled(args.serve_profiled)
        return
    if args.worker:
        print(json.dumps(asyncio.run(generate(args))))
        return
    emit(run(args), args.out, as_json=args.json, print_table=print_table)


if __name__ == "__main__":
    main()
