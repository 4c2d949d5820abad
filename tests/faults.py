"""Helpers of the fault-injection tests (`tests/test_faults_e2e.py`): what a miner holds in the orchestrator's
state, freezing a miner at the moment it holds an item of a kind, a miner on a wrong clock, and the checks
every fault must pass. The proxy that cuts, fails and stalls connections is `bench.netproxy.LoopbackProxy`
(`bench/wire.py` counts bytes with it)."""

from __future__ import annotations

import random
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.protocol import LossRecord, RunStatus
from iota.devnet import Devnet
from orchestrator.db import StateDB
from tests.skewed_miner import OFFSET_FILE_ENV, set_offset

SKEWED_MINER = Path(__file__).resolve().parent / "skewed_miner.py"


def skewed_entry() -> list[str]:
    """The command that starts `iota ...` on a clock shifted by an offset file (tests/skewed_miner.py)."""
    return [sys.executable, str(SKEWED_MINER)]


def skewed_env(offset_file: Path) -> dict[str, str]:
    set_offset(offset_file, 0.0)  # the clock starts right
    return {OFFSET_FILE_ENV: str(offset_file)}


@contextmanager
def state_file(net: Devnet) -> Iterator[StateDB]:
    """The orchestrator's state file (WAL: reading beside the live orchestrator, or after it died, is safe
    and sees its last commit)."""
    db = StateDB(net.workdir / "orchestrator.sqlite")
    try:
        yield db
    finally:
        db.close()


def assigned_items(net: Devnet, hotkey: str) -> list[tuple[str, str, float]]:
    """(item id, kind, when it was handed out) of the items handed to `hotkey` and not yet completed or
    failed."""
    conn = sqlite3.connect(f"file:{net.workdir / 'orchestrator.sqlite'}?mode=ro", uri=True, timeout=5.0)
    try:
        rows = conn.execute(
            "SELECT item_id, kind, assigned_at FROM items WHERE miner = ? AND status = 'assigned'", (hotkey,)
        ).fetchall()
    finally:
        conn.close()
    return [(str(item), str(kind), float(at)) for item, kind, at in rows]


def events(net: Devnet, kind: str) -> list[dict[str, object]]:
    """The orchestrator's events of `kind` (registered, attempt_failed, miner_inactive, ...), oldest first."""
    with state_file(net) as db:
        return db.events(kind)


def persisted_epoch(net: Devnet) -> tuple[str, int]:
    """The epoch phase and the samples completed, as the state file has them: after a SIGKILL, what the
    orchestrator had committed when it died."""
    with state_file(net) as db:
        return str(db.get_meta("epoch")["phase"]), db.count_samples().get("done", 0)


def _stopped(pid: int, timeout_s: float = 2.0) -> None:
    """Wait until the kernel has stopped `pid` (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + timeout_s
    stat = Path(f"/proc/{pid}/stat")
    while time.monotonic() < deadline:
        try:
            # The state follows the command name, which is in parentheses and may hold spaces.
            if stat.read_text().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        except (OSError, IndexError):
            return  # no /proc (not Linux): a short sleep has to do
        time.sleep(0.005)


def freeze_holding(net: Devnet, name: str, kind: str, timeout_s: float = 30.0) -> str:
    """SIGSTOP miner `name` at a moment when it holds an uncompleted `kind` item (forward or backward) and
    return that item's id; the miner stays frozen. A frozen miner sends nothing, so the item stays assigned
    to it: a SIGKILL now kills it mid-item."""
    proc, hotkey = net.miners[name], net.hotkeys[name]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc.send_signal(signal.SIGSTOP)
        _stopped(proc.pid)
        stopped_at = time.time()
        # Handed out a moment before the stop, so that the answer reached the miner: it is working on it.
        held = [item for item, k, at in assigned_items(net, hotkey) if k == kind and at < stopped_at - 0.05]
        if held:
            # A completion sent just before the stop may still be on its way: it must not land.
            time.sleep(0.5)
            if held[0] in {item for item, _, _ in assigned_items(net, hotkey)}:
                return held[0]
        proc.send_signal(signal.SIGCONT)
        time.sleep(random.uniform(0.02, 0.25))
    raise TimeoutError(f"{name} never held a {kind} item within {timeout_s} s")


def sample_of(item_id: str) -> int:
    """The sample an item id (`<sample>.<attempt>.<stage><kind>`) belongs to."""
    return int(item_id.split(".")[0])


def thaw(net: Devnet, name: str) -> None:
    """Let a miner frozen by `freeze_holding` run on."""
    net.miners[name].send_signal(signal.SIGCONT)


def log_of(net: Devnet, name: str) -> str:
    return (net.workdir / "logs" / f"{name}.log").read_text(errors="replace")


def completed_by(status: RunStatus, hotkey: str) -> int:
    return next(m.items_completed for m in status.miners if m.hotkey == hotkey)


def state_of(status: RunStatus, hotkey: str) -> str:
    """`active` or `inactive`."""
    return next(m.state for m in status.miners if m.hotkey == hotkey)


def completing_attempts(net: Devnet) -> dict[int, int]:
    """Sample -> the attempt that completed it, for every completed sample."""
    with state_file(net) as db:
        return {s.sample: s.attempts for s in db.load_samples(("done",))}


def assert_exact_accounting(
    status: RunStatus, losses: list[LossRecord], completing: dict[int, int], n: int
) -> None:
    """Every one of the `n` samples issued was completed exactly once: none dropped, none in flight or
    waiting, and the loss log holds each completing attempt's loss once.

    The log may also hold the loss of an attempt that failed after its tail (a backward's miner died, say):
    that is a real measurement of that attempt's pathway, which CLASP uses, so it stays; it is told apart by
    its attempt number, and it never counts the sample as completed."""
    assert status.samples_issued == n, status
    assert status.samples_dropped == 0 and status.samples_completed == n, status
    assert status.samples_in_flight == 0 and status.samples_waiting_retry == 0, status
    logged = Counter((r.sample, r.attempt) for r in losses)
    assert not [key for key, k in logged.items() if k > 1], "a loss recorded twice"
    assert sorted(completing) == list(range(n))
    assert all(logged[(sample, attempt)] == 1 for sample, attempt in completing.items())
    # Any other record of a sample is from an earlier attempt, abandoned after its tail.
    assert all(
        r.attempt < completing[r.sample] for r in losses if (r.sample, r.attempt) not in completing.items()
    )
