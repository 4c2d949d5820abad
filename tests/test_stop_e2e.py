"""Every daemon, and `iota devnet`, is gone within 10 s of SIGTERM or SIGINT, whatever it is doing, and what
the orchestrator acknowledged stays acknowledged (common/stopping.py says how). Real processes throughout:
`iota devnet` run as a user runs it, daemons started as `python -m iota.cli`, networks driven by `Devnet`.

Processes are followed by pid through /proc (Linux): a process that has exited, or is a zombie nobody has
reaped yet, counts as gone.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from bench.netproxy import LoopbackProxy
from common.protocol import RunStatus
from common.stopping import STOP_PROMISE_S
from iota.devnet import Devnet, DevnetOptions
from tests.faults import assigned_items, completed_by, events, freeze_holding, thaw
from tests.operator_env import base_settings, dead_port, registered_hotkey
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WAIT_S, POLL_S = 120.0, 0.25  # how long a wait lasts unless it says, and how often it looks again

if not sys.platform.startswith("linux"):
    pytest.skip("follows processes through /proc", allow_module_level=True)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def seconds_until_gone(pids: list[int], limit_s: float = 30.0) -> float:
    """How long until none of `pids` is alive (polling every 50 ms), or `limit_s` if some outlive it."""
    started = time.monotonic()
    while any(alive(pid) for pid in pids) and time.monotonic() - started < limit_s:
        time.sleep(0.05)
    return time.monotonic() - started


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


# ---------------------------------------------------------------------------------------------------------
# `iota devnet`


class DevnetProcess:
    """`iota devnet` as a user runs it, in its own session, training the tiny preset until stopped."""

    def __init__(self, tmp: Path, validators: int) -> None:
        self.workdir, self.summary = tmp / "net", tmp / "summary.json"
        command = [sys.executable, "-m", "iota.cli", "devnet", "--duration", "900", "--batch-size", "2",
                   "--seq-len", "32", "--validators", str(validators), "--workdir", str(self.workdir),
                   "--summary", str(self.summary)]  # fmt: skip
        self.log = (tmp / "devnet.log").open("wb")
        self.proc = subprocess.Popen(
            command,
            cwd=tmp,
            env=clean_env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def status(self) -> RunStatus | None:
        try:
            url = json.loads((self.workdir / "endpoints.json").read_text())["orchestrator"]
            return RunStatus.model_validate_json(httpx.get(f"{url}/v1/status", timeout=5).content)
        except (OSError, ValueError, httpx.HTTPError):
            return None

    def wait(self, what: str, condition: Callable[[RunStatus], bool]) -> None:
        def met() -> bool:
            assert self.proc.poll() is None, (self.workdir.parent / "devnet.log").read_text()
            status = self.status()
            return status is not None and condition(status)

        wait_for(what, met, WAIT_S, POLL_S)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_devnet_stops_every_process_of_its_network(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM (a supervisor, a CI timeout) and SIGINT (Ctrl-C) alike: training ends, the validators are not
    waited for, and the devnet and every process it started are gone within the promise."""
    devnet = DevnetProcess(tmp_path, validators=1)
    try:
        devnet.wait("the network trains", lambda s: s.samples_completed >= 1)
        network = children_of(devnet.proc.pid)
        assert len(network) == 5, network  # the orchestrator, a miner per stage, the validator
        devnet.proc.send_signal(sig)
        took = seconds_until_gone([devnet.proc.pid, *network])
    finally:
        devnet.close()
    assert took < STOP_PROMISE_S, f"{took:.1f} s"
    # It stopped by itself, not at its deadline (which exits 128 + the signal): the summary is written
    # (about 3.5 s after the signal here).
    assert devnet.proc.returncode == 0
    assert json.loads(devnet.summary.read_text())["samples_completed"] >= 1


def test_the_network_stops_when_the_devnet_is_killed(tmp_path: Path) -> None:
    devnet = DevnetProcess(tmp_path, validators=0)
    try:
        devnet.wait("the miners are registered", lambda s: sum(m.state == "active" for m in s.miners) == 3)
        network = children_of(devnet.proc.pid)
        assert len(network) == 4, network
        devnet.proc.send_signal(signal.SIGKILL)  # no handler runs: the kernel tells the children
        took = seconds_until_gone(network)
    finally:
        devnet.close()
    assert took < STOP_PROMISE_S, f"{took:.1f} s"


# ---------------------------------------------------------------------------------------------------------
# A daemon whose orchestrator is gone


@pytest.mark.parametrize("role", ["miner", "validator"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_daemon_retrying_an_unreachable_orchestrator_stops_at_once(
    tmp_path: Path, role: str, sig: signal.Signals
) -> None:
    """Its retries (120 s per request by default) end at the signal: it exits by itself (status 0), well
    before the deadline that would force it."""
    registered_hotkey(tmp_path, stake=100.0, validator_permit=True)
    metrics = dead_port()
    settings = base_settings(tmp_path, f"http://127.0.0.1:{dead_port()}")
    env = clean_env(**settings, **{f"IOTA_{role.upper()}_METRICS_PORT": str(metrics)})
    log = tmp_path / f"{role}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iota.cli", role],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def retrying() -> bool:
            # Its metrics answer once its loop runs; from then on it is retrying the orchestrator.
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(f"the {role} runs", retrying, timeout_s=90, poll_s=POLL_S)
        time.sleep(1.0)  # into the backoff of the retries
        started = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()
    # Not the deadline's forced exit (8 s): the retry loop itself gave up.
    assert took < 5.0, f"{took:.1f} s\n{log.read_text()}"
    assert "not retried, this process is stopping" in log.read_text()


# ---------------------------------------------------------------------------------------------------------
# A network at work


def done_items(net: Devnet, hotkey: str) -> set[str]:
    conn = sqlite3.connect(f"file:{net.workdir / 'orchestrator.sqlite'}?mode=ro", uri=True, timeout=5.0)
    try:
        rows = conn.execute("SELECT item_id FROM items WHERE miner = ? AND status = 'done'", (hotkey,))
        return {str(item) for (item,) in rows.fetchall()}
    finally:
        conn.close()


def stop_and_time(proc: subprocess.Popen[bytes]) -> tuple[int, float]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    return code, time.monotonic() - started


def item_status(net: Devnet, item: str) -> str:
    conn = sqlite3.connect(f"file:{net.workdir / 'orchestrator.sqlite'}?mode=ro", uri=True, timeout=5.0)
    try:
        return str(conn.execute("SELECT status FROM items WHERE item_id = ?", (item,)).fetchone()[0])
    finally:
        conn.close()


def test_a_miner_stops_mid_item_and_the_orchestrator_keeps_what_it_acknowledged(tmp_path: Path) -> None:
    """Stopped mid-item, a miner finishes the item or gives it up (reported failed, so it is requeued at
    once) and exits by itself; stopped while blocked on a stalled S3, the deadline ends it. Its completed
    items stay completed either way. Two replicas of stage 1, so that work flows after the first stop."""
    # Items of 8 x 128 tokens: a forward takes long enough (tens of ms on a fast core) to be caught holding
    # one; at 2 x 32 an idle machine finished each before the freeze could find it.
    options = DevnetOptions(
        batch_size=8, seq_len=128, workdir=tmp_path, merge_every=0,
        extra_env={"IOTA_ORCH_REBALANCE_INTERVAL_S": "3600"},  # the replicas stay where they are put
    )  # fmt: skip
    with Devnet(options) as net:
        s3 = LoopbackProxy(urlsplit(net.s3.endpoint_url).netloc)
        options.extra_env["IOTA_S3_ENDPOINT_URL"] = s3.url  # the presigned URLs point at the proxy
        try:
            net.start_orchestrator()
            for stage in (0, 1, 1, 2):
                net.add_miner(stage=stage)
            net.wait_for(lambda s: sum(m.state == "active" for m in s.miners) == 4, timeout_s=90)
            net.wait_for(lambda s: s.samples_completed >= 2, timeout_s=90)

            # Mid-item: frozen while it holds a forward, signalled, then let run on.
            name, hotkey = "miner1", net.hotkeys["miner1"]
            item = freeze_holding(net, name, "forward")
            acknowledged = done_items(net, hotkey)
            net.miners[name].send_signal(signal.SIGTERM)
            started = time.monotonic()
            thaw(net, name)
            code = net.miners[name].wait(30)
            took = time.monotonic() - started
            assert code == 0 and took < STOP_PROMISE_S, (code, took)
            if item_status(net, item) != "done":  # not finished: given up, and said so at once
                gave_up = [
                    e["detail"] for e in events(net, "attempt_failed") if f"gave up on {item}" in e["detail"]
                ]
                assert gave_up and "the miner is stopping" in gave_up[0], events(net, "attempt_failed")
            assert acknowledged and acknowledged <= done_items(net, hotkey)

            # Blocked: every transfer hangs, and so does every report (the orchestrator checks each upload in
            # the same S3); a miner holding an item is stuck in one blocking call, which the deadline ends.
            net.wait_for(lambda s: s.samples_completed >= 4, timeout_s=90)  # the other replica carries on
            s3.set_mode("stall")
            stuck: list[str] = []

            def someone_stuck() -> bool:
                stuck[:] = [n for n in ("miner0", "miner2", "miner3") if any(
                    time.time() - at > 1.0 for _, _, at in assigned_items(net, net.hotkeys[n]))]  # fmt: skip
                return bool(stuck)

            wait_for("a miner stuck holding an item", someone_stuck, timeout_s=30, poll_s=POLL_S)
            name, hotkey = stuck[0], net.hotkeys[stuck[0]]
            before, acknowledged = completed_by(net.status(), hotkey), done_items(net, hotkey)
            code, took = stop_and_time(net.miners[name])
            assert code == 128 + signal.SIGTERM and took < STOP_PROMISE_S, (code, took)
            assert completed_by(net.status(), hotkey) >= before
            assert acknowledged <= done_items(net, hotkey)
        finally:
            s3.set_mode("pass")
            net.stop()
            s3.close()


def test_the_orchestrator_stops_with_long_polls_parked_and_restarts_whole(tmp_path: Path) -> None:
    """Every miner parked in a 30 s long poll: the orchestrator still exits within 10 s of SIGTERM, and,
    restarted, it has the same run with every completed sample."""
    options = DevnetOptions(
        batch_size=2, seq_len=32, workdir=tmp_path, merge_every=0, samples=3,
        extra_env={"IOTA_ORCH_POLL_WAIT_S": "30", "IOTA_MINER_POLL_WAIT_S": "30"},
    )  # fmt: skip
    with Devnet(options) as net:
        net.launch(["honest"] * 3, threads=1, timeout_s=90)
        before = net.wait_for(lambda s: s.samples_completed >= 3 and s.samples_in_flight == 0, timeout_s=90)
        time.sleep(1.0)  # every miner back in its long poll, with no work to hand out
        assert net.orchestrator is not None
        code, took = stop_and_time(net.orchestrator)
        assert took < STOP_PROMISE_S, f"{took:.1f} s"
        assert code == 0  # it stopped by itself, not at its deadline (which exits 128 + the signal)
        with sqlite3.connect(net.workdir / "orchestrator.sqlite") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        net.start_orchestrator()
        after = net.status()
        assert (after.run_id, after.samples_completed, after.samples_dropped) == (
            before.run_id,
            before.samples_completed,
            before.samples_dropped,
        )
        assert {m.hotkey: m.items_completed for m in after.miners} == {
            m.hotkey: m.items_completed for m in before.miners
        }
