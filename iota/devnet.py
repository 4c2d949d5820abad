"""`iota devnet`: the whole network on loopback, in one command.

An S3 server (moto, embedded in this process; or any store given by `--s3-endpoint`), a local chain with
fresh hotkeys (uid 0 is the subnet owner, who receives the burn), the orchestrator, N miners per stage, extra
misbehaving miners, and validators (each its own process, talking real HTTP), live progress, and a summary
JSON at the end. The `Devnet` class is also what the end-to-end tests and `bench/pipeline.py` drive, so they
exercise exactly what a user runs.

Stopping: every child gets SIGTERM when the devnet process dies, however it dies (PR_SET_PDEATHSIG, on
Linux), and `Devnet.stop` SIGKILLs what has not exited by its deadline. `run_devnet` takes SIGTERM and Ctrl-C
(SIGINT) alike as a stop at once (`_signals_stop`): the training ends, the wait for the validators is
skipped, and the summary is still written.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import torch
from safetensors import safe_open

from common.chain import LocalChain
from common.config import S3Settings
from common.keys import create_hotkey
from common.model import get_preset
from common.protocol import (
    HEALTH,
    LEDGER,
    LOSSES,
    MERGES,
    STATUS,
    EpochLedger,
    LossPage,
    LossRecord,
    MergeRecord,
    RunStatus,
)
from common.s3server import EmbeddedS3, ExternalS3, free_port, settings_env
from common.stopping import force_exit
from common.storage import ObjectStore

NETUID = 9
BUCKET = "iota-devnet"
WALLET = "devnet"
_S3_SECRETS = ("IOTA_S3_ACCESS_KEY_ID", "IOTA_S3_SECRET_ACCESS_KEY")
# Where the store is: all of the devnet's S3 settings its processes get (the caller's other IOTA_S3_*, say a
# size limit from a `.env`, stay out, as every other IOTA_ setting of the caller's does).
_S3_PLACE = ("IOTA_S3_ENDPOINT_URL", "IOTA_S3_BUCKET", "IOTA_S3_REGION")
# The daemons promise to be gone within 10 s of SIGTERM (common.stopping); a process still there after
# this long is SIGKILLed.
STOP_TIMEOUT_S = 10.0
# Once `iota devnet` itself gets SIGTERM, it is gone, with every process it started, within this long.
DEVNET_STOP_DEADLINE_S = 9.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# The epoch clock ticks about once a second: a state that holds this long has seen at least two ticks.
SETTLE_S = 3.0
# How long a run bounded by `samples` waits for its last merge (the devnet's drain and merge phase
# timeouts, 20 s each, and some).
LAST_MERGE_TIMEOUT_S = 90.0


@dataclass
class DevnetOptions:
    preset: str = "tiny"
    stages: int | None = None
    miners_per_stage: int = 1
    batch_size: int = 8
    seq_len: int = 256
    duration_s: float | None = 120.0
    samples: int | None = None
    workdir: Path | None = None
    torch_threads: int | None = None  # per miner; default: the cores shared among the miners
    behaviors: list[str] = field(default_factory=list)  # extra misbehaving miners
    extra_env: dict[str, str] = field(default_factory=dict)
    snapshots: bool = False  # miners save their stage's weights to logs/<name>.safetensors on exit
    merge_every: int = 64  # samples per epoch; 0: never merge
    validators: int = 0  # `iota devnet` runs one; tests that need none save the CPU
    validation_fraction: float = 0.25  # chance that a miner's epoch is replayed
    burn_fraction: float = 0.0  # share of the weights validators set on the owner's uid 0
    weights_interval_s: float = 5.0
    # An external store (`--s3-endpoint`), its bucket created if missing; None: embedded moto, bucket BUCKET.
    s3: S3Settings | None = None
    # Where the miners train (IOTA_MINER_DEVICE): `cuda` puts every miner on the one GPU, while the
    # validators still replay on the CPU, so CUDA numerics meet the cross-regime tolerances.
    miner_device: str = "cpu"


# Each misbehaviour where it does something: a tail that lies about its loss at the tail; one that corrupts
# its forward outputs at the last stage that has forward outputs (the tail has none); zero-grad anywhere.
_BEHAVIOR_STAGE = {"wrong-loss": -1, "random-output": -2, "scaled-output": -2, "copy-input": -2}


def parse_adversaries(spec: str) -> list[str]:
    """`random-output:1,scaled-output:2` -> one behaviour per extra miner."""
    from miner.behaviors import BEHAVIORS

    behaviors: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        if name not in BEHAVIORS or name == "honest":
            raise ValueError(f"unknown misbehaviour '{name}'; choose from {', '.join(BEHAVIORS[1:])}")
        if count and not count.isdigit():
            raise ValueError(f"'{part}': the count after ':' must be a whole number")
        behaviors += [name] * int(count or 1)
    return behaviors


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send the child SIGTERM when the devnet process dies, even by
    SIGKILL (None off Linux). prctl is looked up here, in the parent, so the forked child makes one plain C
    call before exec. The signal comes when the *thread* that spawned the child exits: the devnet spawns
    from its main thread."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent, sig = os.getpid(), int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the devnet died before the call: nobody would signal this child
            os._exit(1)

    return preexec


class Devnet:
    """The processes of a local network; a context manager that always stops them all."""

    def __init__(self, options: DevnetOptions) -> None:
        self.options = options
        self.workdir = Path(options.workdir or tempfile.mkdtemp(prefix="iota-devnet-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.s3: EmbeddedS3 | ExternalS3 = ExternalS3(options.s3) if options.s3 else EmbeddedS3("127.0.0.1")
        self.chain = LocalChain(self.workdir / "chain.json", NETUID, block_time_s=1.0)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.orchestrator: subprocess.Popen[bytes] | None = None
        self.miners: dict[str, subprocess.Popen[bytes]] = {}  # hotkey name -> process
        self.validators: dict[str, subprocess.Popen[bytes]] = {}
        self.hotkeys: dict[str, str] = {}  # hotkey name -> ss58
        self.behaviors: dict[str, str] = {}  # ss58 -> behavior
        self.stages: dict[str, int] = {}  # hotkey name -> the stage it asks for
        self.metrics_ports: dict[str, int] = {}  # miner or validator name -> its Prometheus port
        # Per miner, what a test changed in how it starts (kept across restarts): extra environment (say, its
        # orchestrator URL through a fault proxy) and the command that replaces `python -m iota.cli`.
        self.miner_env: dict[str, dict[str, str]] = {}
        self.miner_entry: dict[str, list[str]] = {}
        self.owner = ""
        self.http = httpx.Client(base_url=self.url, timeout=10.0)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def __enter__(self) -> Devnet:
        try:
            self.s3.start()  # an external store: fails here on a wrong endpoint or credentials
        except BaseException:
            self.http.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def s3_settings(self) -> S3Settings:
        """The devnet's store: the external one as configured, else the embedded server and BUCKET."""
        if isinstance(self.s3, ExternalS3):
            return self.s3.settings()
        return self.s3.settings(bucket=BUCKET)

    def s3_credentials(self) -> dict[str, str]:
        """The store's credentials as IOTA_S3_* variables, for the orchestrator alone: everyone else moves
        bytes with the presigned URLs it hands out (`env` leaves them out)."""
        env = settings_env(self.s3_settings)
        return {k: env[k] for k in _S3_SECRETS}

    def stop(self) -> None:
        """Miners and validators first (each reports or gives up its item, and writes its files, while the
        orchestrator still answers), then the orchestrator; each group SIGKILLed after STOP_TIMEOUT_S."""
        _terminate([*self.miners.values(), *self.validators.values()])
        _terminate([self.orchestrator] if self.orchestrator else [])
        self.http.close()
        self.s3.stop()

    def kill_all(self) -> None:
        """SIGKILL every process of the network at once (the devnet's own stop ran past its deadline)."""
        for proc in [*self.miners.values(), *self.validators.values(), self.orchestrator]:
            if proc is not None and proc.poll() is None:
                proc.kill()

    def env(self, **extra: str) -> dict[str, str]:
        """The environment every devnet process gets: its own S3 (without the credentials, which only the
        orchestrator gets: `s3_credentials`), chain and state, nothing from `.env`."""
        o = self.options
        # IOTA_LOG_* (JSON logs, the level) carries through; nothing else of the caller's IOTA_ settings does.
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_") or k.startswith("IOTA_LOG_")}
        env.update({k: v for k, v in settings_env(self.s3_settings).items() if k in _S3_PLACE})
        env.update(
            IOTA_CHAIN_BACKEND="local",
            IOTA_CHAIN_LOCAL_PATH=str(self.workdir / "chain.json"),
            IOTA_CHAIN_NETUID=str(NETUID),
            IOTA_CHAIN_METAGRAPH_TTL_S="2",
            IOTA_WALLET_NAME=WALLET,
            IOTA_WALLET_PATH=str(self.workdir / "wallets"),
            IOTA_MODEL_PRESET=o.preset,
            IOTA_DATA_BATCH_SIZE=str(o.batch_size),
            IOTA_DATA_SEQ_LEN=str(o.seq_len),
            IOTA_ORCH_STATE_PATH=str(self.workdir / "orchestrator.sqlite"),
            IOTA_ORCH_PORT=str(self.port),
            IOTA_ORCH_ITEM_TIMEOUT_S="30",
            IOTA_ORCH_MINER_TIMEOUT_S="10",
            IOTA_ORCH_POLL_WAIT_S="2",
            IOTA_ORCH_GARBAGE_DELAY_S="2",
            IOTA_ORCH_MERGE_EVERY_SAMPLES=str(o.merge_every),
            IOTA_ORCH_EPOCH_MAX_S="0",
            IOTA_ORCH_DRAIN_TIMEOUT_S="20",
            IOTA_ORCH_MERGE_PHASE_TIMEOUT_S="20",
            IOTA_ORCH_VALIDATION_FRACTION=str(o.validation_fraction),
            IOTA_ORCH_VALIDATION_RETENTION_S="900",
            IOTA_ORCH_VALIDATION_LEASE_S="120",
            IOTA_MINER_ORCHESTRATOR_URL=self.url,
            IOTA_MINER_POLL_WAIT_S="2",
            IOTA_MINER_DEVICE=o.miner_device,
            PYTHONUNBUFFERED="1",
        )
        if o.stages:
            env["IOTA_MODEL_STAGES"] = str(o.stages)
        if o.samples:
            env["IOTA_ORCH_MAX_SAMPLES"] = str(o.samples)
        env.update(o.extra_env)
        env.update(extra)
        return env

    def _spawn(
        self, name: str, args: list[str], env: dict[str, str], entry: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.workdir / "logs" / f"{name}.log").open("ab")
        # cwd is the workdir, so no `.env` of the user's checkout leaks into the devnet.
        # Its own session: a Ctrl-C in the terminal reaches only the devnet, which stops the processes in
        # order. _die_with_parent: none outlives the devnet.
        return subprocess.Popen(
            [*(entry or [sys.executable, "-m", "iota.cli"]), *args],
            cwd=self.workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )

    def start_orchestrator(self, timeout_s: float = 60.0) -> None:
        self.orchestrator = self._spawn("orchestrator", ["orchestrator"], self.env(**self.s3_credentials()))
        self.wait_healthy(timeout_s)
        self.write_endpoints()

    @property
    def endpoints_path(self) -> Path:
        return self.workdir / "endpoints.json"

    def endpoints(self) -> dict[str, Any]:
        """Where to look: the orchestrator, its dashboard, and every process's Prometheus metrics."""
        metrics = {"orchestrator": f"{self.url}/metrics"}
        metrics.update(
            {name: f"http://127.0.0.1:{port}/metrics" for name, port in self.metrics_ports.items()}
        )
        return {"orchestrator": self.url, "dashboard": f"{self.url}/dashboard", "metrics": metrics}

    def write_endpoints(self) -> None:
        """Rewritten whenever a process joins, atomically, so a reader never sees half a file."""
        tmp = self.endpoints_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.endpoints(), indent=2) + "\n")
        tmp.replace(self.endpoints_path)

    def _metrics_env(self, role: str, name: str) -> dict[str, str]:
        port = self.metrics_ports.setdefault(name, free_port())  # a restarted process keeps its port
        return {f"IOTA_{role}_METRICS_PORT": str(port), f"IOTA_{role}_METRICS_HOST": "127.0.0.1"}

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.orchestrator is not None and self.orchestrator.poll() is not None:
                raise RuntimeError(f"the orchestrator exited; see {self.workdir / 'logs/orchestrator.log'}")
            try:
                if self.http.get(HEALTH.path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the orchestrator did not become healthy within {timeout_s} s")

    def launch(
        self,
        behaviors: list[str],
        threads: int,
        timeout_s: float = 120.0,
        on_orchestrator: Callable[[Devnet], None] | None = None,
    ) -> None:
        """Start the orchestrator (then call `on_orchestrator`), one miner per behaviour and the
        validators, and wait until every miner is active."""
        self.owner = create_hotkey(WALLET, "owner", self.workdir / "wallets").ss58_address
        self.chain.register(self.owner)  # uid 0: the subnet owner, who receives the burn
        self.start_orchestrator()
        if on_orchestrator is not None:
            on_orchestrator(self)
        n_stages = self.options.stages or get_preset(self.options.preset).n_stages
        for behavior in behaviors:
            stage = _BEHAVIOR_STAGE.get(behavior)
            self.add_miner(behavior, threads, stage=None if stage is None else stage % n_stages)
        for _ in range(self.options.validators):
            self.add_validator(threads)
        self.wait_for(lambda s: sum(m.state == "active" for m in s.miners) >= len(behaviors), timeout_s)

    def add_validator(self, threads: int = 1) -> str:
        """A hotkey with a validator permit and stake, and a validator process signing with it."""
        name = f"validator{len(self.validators)}"
        keypair = create_hotkey(WALLET, name, self.workdir / "wallets")
        self.chain.register(keypair.ss58_address, stake=1000.0, validator_permit=True)
        env = self.env(
            IOTA_WALLET_HOTKEY=name,
            IOTA_VALIDATOR_ORCHESTRATOR_URL=self.url,
            IOTA_VALIDATOR_DEVICE="cpu",
            IOTA_VALIDATOR_POLL_WAIT_S="2",
            IOTA_VALIDATOR_TORCH_THREADS=str(threads),
            IOTA_VALIDATOR_WEIGHTS_INTERVAL_S=str(self.options.weights_interval_s),
            IOTA_VALIDATOR_BURN_FRACTION=str(self.options.burn_fraction),
            IOTA_VALIDATOR_BURN_UID="0",
            IOTA_VALIDATOR_REPORT_FILE=str(self.report_path(name)),
            **self._metrics_env("VALIDATOR", name),
        )
        self.validators[name] = self._spawn(name, ["validator"], env)
        self.write_endpoints()
        return name

    def report_path(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.report.json"

    def kill_orchestrator(self) -> None:
        assert self.orchestrator is not None
        self.orchestrator.send_signal(signal.SIGKILL)
        self.orchestrator.wait()

    def add_miner(
        self,
        behavior: str = "honest",
        threads: int = 1,
        stage: int | None = None,
        env: dict[str, str] | None = None,
        entry: list[str] | None = None,
    ) -> str:
        """Create and register a hotkey, start a miner process with it (asking for `stage`, if given);
        returns its hotkey name. `env` adds to its environment and `entry` replaces `python -m iota.cli`
        in its command, for this miner only and across restarts (tests put it behind a proxy, say)."""
        name = f"miner{len(self.miners)}"
        keypair = create_hotkey(WALLET, name, self.workdir / "wallets")
        self.chain.register(keypair.ss58_address)
        self.hotkeys[name], self.behaviors[keypair.ss58_address] = keypair.ss58_address, behavior
        if stage is not None:
            self.stages[name] = stage
        self.miner_env[name] = dict(env or {})
        if entry:
            self.miner_entry[name] = list(entry)
        self._start_miner(name, behavior, threads)
        return name

    def restart_miner(self, name: str, threads: int = 1) -> None:
        """Start a stopped or killed miner again with its own hotkey (as PM2 would)."""
        self._start_miner(name, self.behaviors[self.hotkeys[name]], threads)

    def _start_miner(self, name: str, behavior: str, threads: int) -> None:
        env = self.env(
            IOTA_WALLET_HOTKEY=name,
            IOTA_MINER_BEHAVIOR=behavior,
            IOTA_MINER_TORCH_THREADS=str(threads),
            IOTA_MINER_TIMINGS_FILE=str(self.workdir / "logs" / f"{name}.timings.json"),
            IOTA_MINER_SNAPSHOT_FILE=str(self.snapshot_path(name)) if self.options.snapshots else "",
            IOTA_MINER_STAGE=str(self.stages.get(name, "")),
            **self._metrics_env("MINER", name),
        )
        env.update(self.miner_env.get(name, {}))
        self.miners[name] = self._spawn(name, ["miner"], env, self.miner_entry.get(name))
        self.write_endpoints()

    def snapshot_path(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.safetensors"

    def snapshots(self) -> dict[str, tuple[int, dict[str, torch.Tensor]]]:
        """Stop every miner at once (each writes its weights; stopped one by one, the last ones could be
        moved to a stage the first ones left) and read each one's stage and weights."""
        self.stop_miners()
        out = {}
        for name in self.miners:
            with safe_open(self.snapshot_path(name), framework="pt") as f:
                out[name] = (int(f.metadata()["stage"]), {k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        return out

    def stop_miner(self, name: str, timeout_s: float = 30.0) -> None:
        """SIGTERM, the way an operator stops it: the miner finishes its item and writes its files."""
        self.miners[name].send_signal(signal.SIGTERM)
        self.miners[name].wait(timeout_s)

    def stop_miners(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        _terminate(list(self.miners.values()), timeout_s)

    def finish_validation(self, stall_s: float = 180.0, give_up: threading.Event | None = None) -> bool:
        """Wait until every replay task is judged (or expired), then for each validator's next round of
        weights; False if a validator died, `stall_s` passed without a task judged, or `give_up` was set."""
        give_up = give_up or threading.Event()
        deadline = time.monotonic() + stall_s
        judged = -1
        while time.monotonic() < deadline and not give_up.is_set():
            if any(proc.poll() is not None for proc in self.validators.values()):
                return False  # a validator died: its log says why; nobody will judge the rest
            counts = self.status().validations
            pending = counts.get("queued", 0) + counts.get("leased", 0)
            if not pending:
                break
            if sum(counts.values()) - pending > judged:  # progress: validators catch up once miners stop
                judged = sum(counts.values()) - pending
                deadline = time.monotonic() + stall_s
            time.sleep(1.0)
        else:
            return False
        deadline = time.monotonic() + stall_s
        mark = time.time()
        while time.monotonic() < deadline and not give_up.is_set():
            if any(proc.poll() is not None for proc in self.validators.values()):
                return False
            rounds = [self.validator_report(name) for name in self.validators]
            if all(r is not None and r["at"] > mark for r in rounds):
                return True
            time.sleep(0.5)
        return False

    def validator_report(self, name: str) -> dict[str, Any] | None:
        try:
            report: dict[str, Any] = json.loads(self.report_path(name).read_text())
        except (OSError, ValueError):
            return None
        return report

    def chain_weights(self) -> dict[str, float]:
        """Hotkey -> weight: every validator's latest weights on the local chain, averaged by stake (as
        Yuma consensus weighs validators), summing to 1."""
        metagraph = self.chain.metagraph()
        combined: dict[int, float] = {}
        total = 0.0
        for validator_uid, weights in self.chain.weights().items():
            neuron = metagraph.by_uid(validator_uid)
            stake = neuron.stake if neuron else 0.0
            total += stake
            for uid, weight in weights.items():
                combined[uid] = combined.get(uid, 0.0) + stake * weight
        hotkeys = {n.uid: n.hotkey for n in metagraph.neurons}
        return {hotkeys[uid]: w / total for uid, w in sorted(combined.items()) if uid in hotkeys and total}

    def ledger(self) -> list[EpochLedger]:
        resp = self.http.get(LEDGER.path, params={"limit": 1000})
        return [EpochLedger.model_validate(e) for e in resp.json()]

    def kill_miner(self, name: str) -> None:
        self.miners[name].send_signal(signal.SIGKILL)
        self.miners[name].wait()

    # -- observing ----------------------------------------------------------------------------------------

    def status(self) -> RunStatus:
        return RunStatus.model_validate_json(self.http.get(STATUS.path).content)

    def loss_page(self, after: int = 0) -> LossPage:
        """The loss records after position `after` (at most 10,000), and where the next page starts."""
        resp = self.http.get(LOSSES.path, params={"after": after, "limit": 10_000})
        return LossPage.model_validate_json(resp.content)

    def export_model(self, run_id: str) -> str | None:
        """The latest checkpoint as `<workdir>/model.safetensors` (the devnet's bucket dies with it)."""
        from iota.export import ExportError, export_model

        store = ObjectStore.from_settings(self.s3_settings)
        out = self.workdir / "model.safetensors"
        try:
            export_model(store, run_id, out)
        except ExportError as error:
            print(f"could not export the model: {error}")
            return None
        return str(out)

    def merges(self) -> list[MergeRecord]:
        resp = self.http.get(MERGES.path, params={"limit": 1000})
        return [MergeRecord.model_validate(r) for r in resp.json()]

    def losses(self) -> list[LossRecord]:
        records: list[LossRecord] = []
        page = self.loss_page()
        while page.records:
            records.extend(page.records)
            page = self.loss_page(page.next_after)
        return records

    def wait_for_last_merge(self, samples: int, timeout_s: float) -> RunStatus:
        """Once the `samples` of a bounded run are done, the orchestrator merges the epoch that holds the
        last of them at once; wait until that merge is over: nothing in flight, training, every epoch
        before the current one merged (or rolled back), and all of it still so SETTLE_S later. The wait
        covers the race where the epoch clock has not yet ended an epoch that trained its last samples:
        it does so at its next tick, about a second later."""

        def settled(s: RunStatus) -> bool:
            return (
                s.samples_completed + s.samples_dropped >= samples
                and not s.samples_in_flight + s.samples_waiting_retry
                and s.epoch_phase == "training"
                and s.merges_completed + s.merges_rolled_back >= s.n_stages * s.epoch
            )

        deadline = time.monotonic() + timeout_s
        while True:
            first = self.wait_for(settled, max(0.0, deadline - time.monotonic()))
            time.sleep(SETTLE_S)
            again = self.status()
            if settled(again) and again.epoch == first.epoch:
                return again
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run's last merge did not settle within {timeout_s} s: {again}")

    def wait_for(
        self, predicate: Callable[[RunStatus], bool], timeout_s: float, poll_s: float = 0.5
    ) -> RunStatus:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout_s} s; last status: {status}")
            for name, proc in self.miners.items():
                if proc.poll() not in (None, -signal.SIGKILL):
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see its log in {self.workdir}")
            time.sleep(poll_s)


def _terminate(procs: list[subprocess.Popen[bytes]], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every process of `procs` at once, and SIGKILL those still running after `timeout_s`."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summarize(
    options: DevnetOptions, status: RunStatus, losses: list[LossRecord], duration_s: float, miners: int
) -> dict[str, Any]:
    """The summary JSON: what ran, how much, how fast, and whether the loss fell."""
    values = [r.loss for r in losses]
    tenth = max(1, len(values) // 10)
    tokens = status.samples_completed * status.batch_size * status.seq_len
    return {
        "preset": options.preset,
        "stages": status.n_stages,
        "miners": miners,
        "miners_per_stage": options.miners_per_stage,
        "batch_size": status.batch_size,
        "seq_len": status.seq_len,
        "samples_completed": status.samples_completed,
        "samples_issued": status.samples_issued,
        "tokens_per_s": round(tokens / duration_s, 1) if duration_s > 0 else 0.0,
        "loss_first": round(statistics.fmean(values[:tenth]), 4) if values else None,
        "loss_last": round(statistics.fmean(values[-tenth:]), 4) if values else None,
        "losses_recorded": len(values),
        "merges_completed": status.merges_completed,
        "merges_rolled_back": status.merges_rolled_back,
        "epochs": status.epoch,
        "dropped_samples": status.samples_dropped,
        "attempts_failed": status.attempts_failed,
        "duration_s": round(duration_s, 2),
        "run_id": status.run_id,
    }


def validation_summary(net: Devnet, finished: bool) -> dict[str, Any]:
    """Weights per hotkey, what the replays found, and how many honest miners were wrongly failed."""
    verdicts = [v for epoch in net.ledger() for v in epoch.verdicts]
    failed = [v for v in verdicts if not v.verdict.passed]
    honest = {h for h, b in net.behaviors.items() if b == "honest"}
    reports = {name: net.validator_report(name) for name in net.validators}
    penalized = sorted({h for r in reports.values() if r for h, s in r["scores"].items() if s["penalized"]})
    flagged = sorted({h for r in reports.values() if r for h in r.get("clasp_flagged_ever", [])})
    replay_false_positives = sum(v.miner in honest for v in failed)
    clasp_false_positives = len(set(flagged) & honest)
    return {
        "weights": net.chain_weights(),
        "owner": net.owner,
        "validation": {
            "finished": finished,
            "tasks": net.status().validations,
            "replays": len(verdicts),
            "replays_failed": {v.miner: v.verdict.failure for v in failed},
            # Honest miners wrongly failed by a replay, plus honest miners flagged by CLASP.
            "false_positives": replay_false_positives + clasp_false_positives,
            "replay_false_positives": replay_false_positives,
            "clasp_false_positives": clasp_false_positives,
            "penalized": penalized,
            "honest_penalized": sorted(set(penalized) & honest),
            "clasp_flagged": flagged,
        },
    }


def default_threads(total_miners: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, total_miners))


def run_devnet(
    options: DevnetOptions,
    on_progress: Callable[[RunStatus, float | None, float], None] | None = None,
    on_start: Callable[[Devnet], None] | None = None,
) -> dict[str, Any]:
    """Run a devnet to its duration or sample count and return the summary. `on_start` is called once
    the orchestrator answers (its dashboard and `endpoints.json` exist), before the miners join."""
    skip = threading.Event()  # set: do not wait for the validators
    with _signals_stop(skip) as term, Devnet(options) as net:
        term.net = net
        n_stages = options.stages or get_preset(options.preset).n_stages
        behaviors = ["honest"] * (n_stages * options.miners_per_stage) + options.behaviors
        threads = options.torch_threads or default_threads(len(behaviors))
        net.launch(behaviors, threads, on_orchestrator=on_start)
        start = time.monotonic()
        after, recent = 0, []
        try:
            while True:
                elapsed = time.monotonic() - start
                status = net.status()
                if options.samples and status.samples_completed + status.samples_dropped >= options.samples:
                    if options.merge_every:  # the summary and the export hold all the run's work
                        _wait_for_last_merge(net, options.samples)
                    break
                if options.duration_s and elapsed >= options.duration_s:
                    break
                page = net.loss_page(after)
                recent = (recent + [r.loss for r in page.records])[-20:]
                after = page.next_after
                if on_progress:
                    on_progress(status, statistics.fmean(recent) if recent else None, elapsed)
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        term.training = False
        duration = time.monotonic() - start
        status = net.status()
        net.stop_miners()
        summary = summarize(options, status, net.losses(), duration, len(behaviors))
        summary["behaviors"] = dict(net.behaviors)
        if options.validators:
            if not skip.is_set():
                print(
                    "waiting for the validators to judge the last replays and set weights (Ctrl-C skips)",
                    flush=True,
                )
            summary.update(validation_summary(net, net.finish_validation(give_up=skip)))
        summary["workdir"] = str(net.workdir)
        summary["export"] = net.export_model(status.run_id) if status.merges_completed else None
        return summary


def _wait_for_last_merge(net: Devnet, samples: int) -> None:
    """Wait for the run's last merge; a merge that does not come (or a miner that died) ends the wait, not
    the run: the summary says what was merged."""
    try:
        net.wait_for_last_merge(samples, LAST_MERGE_TIMEOUT_S)
    except (TimeoutError, RuntimeError) as error:
        print(f"not waiting for the run's last merge: {error}", flush=True)


class _Terminate:
    """What SIGTERM or SIGINT does to a running devnet: stop at once, as an operator at the terminal, a
    supervisor or a CI timeout asking it to expects. During the training it ends the training; in any case
    the wait for the validators is skipped, and if the devnet has not exited DEVNET_STOP_DEADLINE_S later,
    or a second signal comes, every process is SIGKILLed and the devnet exits."""

    def __init__(self, skip: threading.Event) -> None:
        self.skip, self.training, self.received = skip, True, False
        self.net: Devnet | None = None
        self.deadline: threading.Timer | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received:
            self.kill(signum, f"a second signal ({name}) while stopping")
        self.received = True
        self.skip.set()
        why = f"still running {DEVNET_STOP_DEADLINE_S:.0f} s after {name}"
        self.deadline = threading.Timer(DEVNET_STOP_DEADLINE_S, self.kill, (signum, why))
        self.deadline.daemon = True
        self.deadline.start()
        if self.training:
            raise KeyboardInterrupt

    def kill(self, signum: int, why: str) -> None:
        if self.net is not None:
            self.net.kill_all()
        force_exit("devnet", signum, why)


@contextmanager
def _signals_stop(skip: threading.Event) -> Iterator[_Terminate]:
    """Inside, SIGTERM and SIGINT stop the devnet (`_Terminate`); only the main thread takes signals, so
    elsewhere they keep their defaults."""
    term = _Terminate(skip)
    if threading.current_thread() is not threading.main_thread():
        yield term
        return
    previous = {sig: signal.signal(sig, term.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield term
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # Every process of the network has stopped: the deadline has nothing left to bound, and a caller
        # that runs the devnet in its own process (a bench, a test) must not be killed after it returns.
        if term.deadline is not None:
            term.deadline.cancel()


def write_summary(summary: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
