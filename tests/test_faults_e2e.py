"""Faults inflicted one after another on one network run (`iota devnet`: separate processes, real HTTP, real
S3 behind a fault-injecting proxy), two replicas of every stage. After each fault the run goes on; at the end
every sample issued was completed exactly once and the last merge leaves both replicas of every stage in
sync. The faults, in order:

1. the orchestrator SIGKILLed mid-training and restarted: same run, same sessions, counters kept;
2. two miners SIGKILLed, one while it holds a forward (mid-forward) and one while it holds a backward
   (mid-backward): their work is requeued, they are marked inactive, and, restarted, they rejoin;
3. one miner (of the third stage) cut off from the orchestrator for longer than the miner timeout, then
   reconnected, while the two killed ones restart;
4. the same miner's clock set beyond the freshness window: it says so in one clear line, completes nothing,
   and is back at work once the clock is right;
5. S3 answering 503 for a while, then holding connections without answering, then healthy again;
6. the orchestrator SIGKILLed mid-merge and restarted: the merge completes or rolls back cleanly.

A miner killed during a merge is `tests/test_merge_e2e.py`'s; the run replaced by a new state file is
`tests/test_network_e2e.py`'s.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench.netproxy import LoopbackProxy
from common.protocol import MergeRecord, RunStatus
from iota.devnet import Devnet, DevnetOptions
from tests.faults import (
    assert_exact_accounting,
    completed_by,
    completing_attempts,
    events,
    freeze_holding,
    log_of,
    persisted_epoch,
    sample_of,
    skewed_entry,
    skewed_env,
    state_of,
    thaw,
)
from tests.skewed_miner import set_offset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MERGE_EVERY = 12  # samples per epoch: merges come often enough to kill the orchestrator inside one
MINER_TIMEOUT_S = 4.0
FRESHNESS_WINDOW_S = 5.0
CLOCK_OFFSET_S = 20.0  # well beyond the window, so the refusal cannot be network delay


class Faults:
    """The run under test: the devnet, its proxies, the miner behind them, and what the checks need."""

    def __init__(self, tmp_path: Path) -> None:
        options = DevnetOptions(
            miners_per_stage=2, batch_size=4, seq_len=64, workdir=tmp_path, merge_every=MERGE_EVERY,
            extra_env={
                "IOTA_ORCH_MINER_TIMEOUT_S": str(MINER_TIMEOUT_S),
                "IOTA_ORCH_MERGE_PHASE_TIMEOUT_S": "6",
                "IOTA_ORCH_DRAIN_TIMEOUT_S": "6",
                # Faults in quick succession may fail one sample's attempts several times; it must still
                # be completed, not dropped, so the run allows it more attempts than the default three.
                "IOTA_ORCH_MAX_ATTEMPTS": "20",
                # Two replicas per stage throughout, so every merge has a pair to compare.
                "IOTA_ORCH_REBALANCE_INTERVAL_S": "3600",
                "IOTA_AUTH_FRESHNESS_WINDOW_MS": str(int(FRESHNESS_WINDOW_S * 1000)),
            },
        )  # fmt: skip
        self.net = Devnet(options).__enter__()
        # Everybody's S3 traffic goes through `s3`: the orchestrator's endpoint is also the host of every
        # presigned URL it hands out.
        self.s3 = LoopbackProxy(urlsplit(self.net.s3.endpoint_url).netloc)
        options.extra_env["IOTA_S3_ENDPOINT_URL"] = self.s3.url
        # One miner reaches the orchestrator through `link` and runs on a clock the test sets.
        self.link = LoopbackProxy(f"127.0.0.1:{self.net.port}")
        self.clock_file = tmp_path / "clock-offset"
        self.odd = ""  # that miner's name, once launched
        self.stage_of: dict[str, int] = {}  # miner name -> stage
        self.fault_epochs: set[int] = set()  # epochs a fault touched: a rollback there is explained

    def launch(self) -> None:
        net = self.net
        # Stages chosen here, not balanced by measured speed, so that each has exactly two replicas. The
        # miners start first and keep trying until the orchestrator answers: their start-up and its overlap.
        for stage in (0, 0, 1, 1, 2):
            net.add_miner(stage=stage)
        self.odd = net.add_miner(
            stage=2,
            env={"IOTA_MINER_ORCHESTRATOR_URL": self.link.url, **skewed_env(self.clock_file)},
            entry=skewed_entry(),
        )
        net.start_orchestrator()
        net.wait_for(lambda s: sum(m.state == "active" for m in s.miners) == 6, timeout_s=90)
        self.stage_of = {name: next(m.stage for m in net.status().miners if m.hotkey == hk)
                         for name, hk in net.hotkeys.items()}  # fmt: skip
        assert sorted(self.stage_of.values()) == [0, 0, 1, 1, 2, 2]

    def stop(self) -> None:
        # Healthy links first, so that no miner is left waiting on a held connection while it stops.
        self.s3.set_mode("pass")
        self.link.set_mode("pass")
        self.net.stop()
        self.s3.close()
        self.link.close()

    def wait(self, until: Callable[[RunStatus], bool], timeout_s: float, poll_s: float = 0.5) -> RunStatus:
        return self.net.wait_for(until, timeout_s, poll_s)

    def goes_on(self, timeout_s: float = 60.0, samples: int = 3) -> RunStatus:
        """Wait until `samples` more samples complete: the run continues."""
        start = self.net.status().samples_completed
        return self.wait(lambda s: s.samples_completed >= start + samples, timeout_s)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Print how long `phase` took (pytest shows it with -s or on a failure): where CI time goes."""
        start = time.monotonic()
        yield
        print(f"{phase}: {time.monotonic() - start:.1f} s (epoch {self.net.status().epoch})")

    def during_fault(self) -> None:
        """Note the epoch now running as one that a fault touched."""
        self.fault_epochs.add(self.net.status().epoch)

    def replica(self, stage: int) -> str:
        """A miner of `stage` other than the odd one."""
        return next(name for name, s in self.stage_of.items() if s == stage and name != self.odd)

    def failed_mentioning(self, name: str) -> list[dict[str, object]]:
        """The attempts failed because of miner `name`, oldest first."""
        key = self.net.hotkeys[name][:8]
        return [e for e in events(self.net, "attempt_failed") if key in str(e["detail"])]


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Faults]:
    faults = Faults(tmp_path)
    try:
        with faults.timed("launch"):
            faults.launch()
        yield faults
    finally:
        faults.stop()


def kill_mid_item(run: Faults, victim: str, kind: str) -> None:
    """SIGKILL `victim` while it holds a `kind` item; its work, that item included, is requeued once the
    orchestrator finds it silent, and it is marked inactive."""
    net, hotkey = run.net, run.net.hotkeys[victim]
    before = len(run.failed_mentioning(victim))
    item = freeze_holding(net, victim, kind)  # frozen first (SIGSTOP), so it dies holding this item
    net.kill_miner(victim)
    net.wait_for(
        lambda s: state_of(s, hotkey) == "inactive" and len(run.failed_mentioning(victim)) > before,
        timeout_s=30,
    )
    requeued = run.failed_mentioning(victim)[before:]
    assert any(e["sample"] == sample_of(item) for e in requeued), (victim, item, requeued)


def kill_miners_mid_forward_and_mid_backward(run: Faults) -> None:
    """Leaves both victims restarting (as PM2 would restart them): they rejoin during the next fault."""
    net = run.net
    run.during_fault()
    forward_victim, backward_victim = run.replica(1), run.replica(0)
    kill_mid_item(run, forward_victim, "forward")
    net.restart_miner(forward_victim)  # it comes back while the next one dies
    kill_mid_item(run, backward_victim, "backward")
    net.restart_miner(backward_victim)


def kill_the_orchestrator_mid_training(run: Faults) -> None:
    net = run.net
    before = run.wait(
        lambda s: s.epoch_phase == "training" and s.samples_completed >= 3, timeout_s=60, poll_s=0.1
    )
    registrations = len(events(net, "registered"))
    run.during_fault()
    net.kill_orchestrator()  # SIGKILL: no chance to flush or say goodbye
    time.sleep(2.0)  # the miners notice and retry
    net.start_orchestrator()
    after = net.status()
    assert after.run_id == before.run_id
    assert after.samples_completed >= before.samples_completed
    assert after.samples_issued >= before.samples_issued
    run.goes_on()
    # The miners carried on with their sessions: nobody had to register again.
    assert len(events(net, "registered")) == registrations
    run.during_fault()


def fail_then_stall_s3(run: Faults) -> None:
    run.during_fault()
    run.s3.set_mode("error")
    time.sleep(3.0)
    run.during_fault()
    run.s3.set_mode("stall")
    time.sleep(5.0)  # longer than the miner timeout: a miner stuck in a transfer is found silent
    run.during_fault()
    run.s3.set_mode("pass")
    run.goes_on(timeout_s=60)
    run.during_fault()


def cut_a_miner_off(run: Faults) -> None:
    """Also waits for the miners killed before to be back: every miner is active after it."""
    net, odd = run.net, run.odd
    hotkey = net.hotkeys[odd]
    before = len(run.failed_mentioning(odd))
    run.during_fault()
    # Cut while it works on an item (frozen meanwhile, so that it cannot finish first): work to requeue.
    item = freeze_holding(net, odd, "forward")
    run.link.set_mode("cut")
    thaw(net, odd)
    net.wait_for(lambda s: state_of(s, hotkey) == "inactive", timeout_s=20)
    requeued = run.failed_mentioning(odd)[before:]
    assert any(e["sample"] == sample_of(item) for e in requeued), (item, requeued)
    run.goes_on()  # without it
    run.during_fault()
    run.link.set_mode("pass")
    back = net.wait_for(lambda s: state_of(s, hotkey) == "active", timeout_s=30)
    done = completed_by(back, hotkey)
    net.wait_for(lambda s: completed_by(s, hotkey) > done, timeout_s=30)  # and works again
    net.wait_for(lambda s: all(m.state == "active" for m in s.miners), timeout_s=60)
    run.during_fault()


def skew_a_miners_clock(run: Faults) -> None:
    net, odd = run.net, run.odd
    hotkey = net.hotkeys[odd]
    run.during_fault()
    set_offset(run.clock_file, CLOCK_OFFSET_S)
    deadline = time.monotonic() + 20
    while "clock is off" not in log_of(net, odd) and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = [line for line in log_of(net, odd).splitlines() if "clock is off" in line]
    assert len(lines) == 1, lines  # one clear line, not one per retry
    off = re.search(r"off by about (\d+) s against the orchestrator \(ahead of its clock\)", lines[0])
    assert off and abs(int(off.group(1)) - CLOCK_OFFSET_S) <= 2, lines[0]
    refused = completed_by(net.status(), hotkey)
    run.goes_on()  # the others go on...
    time.sleep(2.0)
    assert completed_by(net.status(), hotkey) == refused  # ...while it completes nothing
    run.during_fault()
    set_offset(run.clock_file, 0.0)
    net.wait_for(lambda s: completed_by(s, hotkey) > refused, timeout_s=40)
    assert "accepts this machine's clock again" in log_of(net, odd)
    assert net.miners[odd].poll() is None  # it never exited
    run.during_fault()


def kill_the_orchestrator_mid_merge(run: Faults) -> int:
    """SIGKILL the orchestrator while a merge runs and restart it; returns the samples the run ends with."""
    net = run.net
    run_id = net.status().run_id
    for _ in range(3):
        merging = run.wait(lambda s: s.epoch_phase == "merging", timeout_s=60, poll_s=0.05)
        run.during_fault()
        net.kill_orchestrator()
        # The state file says whether it died inside the merge (it may have just finished); while merging
        # no sample completes, so the next epoch starts from the samples done now.
        phase, done = persisted_epoch(net)
        if phase == "merging":
            break
        net.start_orchestrator()
    else:
        pytest.fail("the orchestrator was never killed inside a merge")
    # The restart also bounds the run: one epoch more, so that it ends with a merge after every fault.
    n = done + MERGE_EVERY
    net.options.extra_env["IOTA_ORCH_MAX_SAMPLES"] = str(n)
    net.start_orchestrator()
    restarted = net.status()
    assert restarted.run_id == run_id and restarted.samples_completed == done
    assert restarted.samples_issued <= n
    # The interrupted merge finishes, one way or the other, for every stage.
    net.wait_for(lambda s: s.epoch > merging.epoch, timeout_s=60)
    closed = {r.stage: r for r in net.merges() if r.epoch == merging.epoch}
    assert sorted(closed) == [0, 1, 2]
    assert all(r.outcome in ("merged", "rolled_back") for r in closed.values())
    assert not any(f.hotkey for r in closed.values() for f in r.flagged)  # nobody blamed for it
    return n


def test_the_run_survives_each_fault_and_its_accounting_stays_exact(run: Faults) -> None:
    net = run.net
    for fault in (
        kill_the_orchestrator_mid_training,
        kill_miners_mid_forward_and_mid_backward,
        cut_a_miner_off,
        skew_a_miners_clock,
        fail_then_stall_s3,
    ):
        with run.timed(fault.__name__):
            fault(run)
    with run.timed("kill_the_orchestrator_mid_merge"):
        n = kill_the_orchestrator_mid_merge(run)
    last_epoch = net.status().epoch
    with run.timed("last epoch"):
        final = net.wait_for(
            lambda s: s.samples_completed + s.samples_dropped >= n and s.epoch > last_epoch, timeout_s=90
        )
    records = net.merges()
    losses = net.losses()
    assert_exact_accounting(final, losses, completing_attempts(net), n)
    assert final.attempts_failed >= 1

    # Replicas are consistent after the faults: the last merge of every stage took both, and both report
    # the merged weights.
    replicas = {s: sorted(net.hotkeys[m] for m, st in run.stage_of.items() if st == s) for s in range(3)}
    last: dict[int, MergeRecord] = {r.stage: r for r in records if r.epoch == last_epoch}
    assert sorted(last) == [0, 1, 2]
    for stage, record in last.items():
        assert record.outcome == "merged" and not record.flagged, record
        assert sorted(record.participants) == replicas[stage], record
        assert sorted(record.in_sync) == replicas[stage], record
    # Only the faults explain a rollback (a stage whose miners were all silent when its merge began has
    # nothing to merge: its record says so in a flag naming nobody), and no miner was flagged.
    assert final.merges_rolled_back == sum(r.outcome == "rolled_back" for r in records)
    assert all(r.epoch in run.fault_epochs for r in records if r.outcome == "rolled_back")
    assert not [(r.epoch, r.stage, f) for r in records for f in r.flagged if f.hotkey]
    # Pathways varied across both replicas of every stage.
    for stage, keys in replicas.items():
        assert {r.pathway[stage] for r in losses} == set(keys), stage
