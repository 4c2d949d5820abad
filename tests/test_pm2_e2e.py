"""The miner and the validator under a real PM2, the way docs/miner.md and docs/validator.md run them.

`pm2 start pm2/<role>.config.js` with a settings file (IOTA_ENV_FILE) pointing at a devnet's orchestrator,
S3 and local chain: each daemon passes its start checks, registers and works; killed with SIGKILL, PM2
starts it again and it registers again and keeps working; `pm2 stop` ends each by itself within its
kill_timeout; the log files are where the docs say. PM2 is the pinned one setup.sh installs into
.venv/node, with its own PM2_HOME in a temporary folder, so no operator's PM2 daemon is touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.keys import create_hotkey
from iota.devnet import WALLET, Devnet, DevnetOptions
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
PM2 = REPO / ".venv/node/node_modules/.bin/pm2"
ROLES = ("miner", "validator")
# What the daemon logs once it has registered (miner/worker.py, validator/daemon.py).
REGISTERED = {"miner": "registered with run ", "validator": "validating run "}
# A start is setup.sh (about a second), the preflight checks and the daemon's own start: about 10 s idle,
# several times that on a loaded 2-core machine.
START_S = 120.0
POLL_S = 0.5  # how often a wait looks again

pytestmark = pytest.mark.slow


class Pm2:
    """The pm2 command line with its own PM2_HOME and the environment the daemons are started with."""

    def __init__(self, home: Path, log_dir: Path) -> None:
        self.home, self.log_dir = home, log_dir
        # Nothing of the caller's IOTA_ settings: the daemons read theirs from the settings file only.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}
        self.env.update(PM2_HOME=str(home), IOTA_PM2_LOG_DIR=str(log_dir), OMP_NUM_THREADS="1")

    def __call__(self, *args: str, **env: str) -> str:
        done = subprocess.run(
            [str(PM2), *args],
            cwd=REPO,
            env=self.env | env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"pm2 {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def apps(self) -> dict[str, dict[str, Any]]:
        """`pm2 jlist`: each app's name -> its pid and PM2's record of it."""
        return {app["name"]: app for app in json.loads(self("jlist"))}

    def daemon_log(self) -> str:
        return (self.home / "pm2.log").read_text()


@pytest.fixture(scope="session")
def pm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pm2]:
    if not PM2.is_file():
        pytest.fail(f"PM2 is not installed at {PM2}: run ./setup.sh --role dev")
    cli = Pm2(tmp_path_factory.mktemp("pm2home"), tmp_path_factory.mktemp("pm2logs"))
    try:
        yield cli
    finally:
        cli("kill")  # stops every app this session started, and the daemon


def settings_file(path: Path, net: Devnet, **settings: str) -> Path:
    """An operator's .env for a daemon of `net`: its S3, chain and orchestrator (what Devnet.env sets)."""
    values = {k: v for k, v in net.env(**settings).items() if k.startswith("IOTA_")}
    path.write_text("".join(f"{k}={v}\n" for k, v in sorted(values.items())))
    return path


def test_pm2_starts_restarts_and_stops_the_miner_and_the_validator(tmp_path: Path, pm2: Pm2) -> None:
    options = DevnetOptions(workdir=tmp_path / "net", stages=2, batch_size=2, seq_len=32, merge_every=0)
    with Devnet(options) as net:
        net.start_orchestrator()
        # Two stages is the least a model has; a devnet miner holds stage 0 and PM2's miner takes stage 1.
        net.add_miner(stage=0)
        wallets = net.workdir / "wallets"
        miner_key = create_hotkey(WALLET, "pm2miner", wallets).ss58_address
        net.chain.register(miner_key)
        net.chain.register(
            create_hotkey(WALLET, "pm2validator", wallets).ss58_address, stake=1000.0, validator_permit=True
        )
        report = tmp_path / "validator.report.json"
        env_files = {
            "miner": settings_file(
                tmp_path / "miner.env",
                net,
                IOTA_WALLET_HOTKEY="pm2miner",
                IOTA_MINER_TORCH_THREADS="1",
                IOTA_MINER_METRICS_PORT="0",
            ),
            "validator": settings_file(
                tmp_path / "validator.env",
                net,
                IOTA_WALLET_HOTKEY="pm2validator",
                IOTA_VALIDATOR_ORCHESTRATOR_URL=net.url,
                IOTA_VALIDATOR_DEVICE="cpu",
                IOTA_VALIDATOR_TORCH_THREADS="1",
                IOTA_VALIDATOR_METRICS_PORT="0",
                IOTA_VALIDATOR_WEIGHTS_INTERVAL_S="2",
                IOTA_VALIDATOR_REPORT_FILE=str(report),
            ),
        }
        err_log = {role: pm2.log_dir / f"{role}.err.log" for role in ROLES}

        def registrations(role: str) -> int:
            return err_log[role].read_text().count(REGISTERED[role]) if err_log[role].exists() else 0

        def report_at() -> float:
            try:
                return float(json.loads(report.read_text())["at"])
            except (OSError, ValueError, KeyError):
                return 0.0

        def samples() -> int:
            return net.status().samples_completed

        def miner_active() -> bool:
            return any(m.hotkey == miner_key and m.state == "active" for m in net.status().miners)

        # Started the documented way, with the checks of the start scripts.
        for role in ROLES:
            pm2("start", f"pm2/{role}.config.js", IOTA_ENV_FILE=str(env_files[role]))
        for role in ROLES:
            wait_for(f"the {role} registers", lambda role=role: registrations(role) == 1, START_S, POLL_S)
        wait_for("the miner trains", lambda: miner_active() and samples() >= 2, START_S, POLL_S)
        wait_for("the validator sets weights", lambda: report_at() > 0, START_S, POLL_S)

        # SIGKILL each daemon's python process (the start script exec'd it: it is PM2's pid).
        apps = pm2.apps()
        for role in ROLES:
            pid = apps[f"iota-{role}"]["pid"]
            argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            assert "python" in Path(argv[0]).name and argv[1:3] == [str(REPO / ".venv/bin/iota"), role], argv
            os.kill(pid, signal.SIGKILL)
        killed_at, before = time.time(), samples()
        for role in ROLES:
            wait_for(
                f"PM2 restarts the {role} and it registers again",
                lambda role=role: registrations(role) == 2,
                START_S,
                POLL_S,
            )
        apps = pm2.apps()
        for role in ROLES:
            assert apps[f"iota-{role}"]["pm2_env"]["restart_time"] == 1
            assert apps[f"iota-{role}"]["pm2_env"]["status"] == "online"
        wait_for("the restarted miner trains", lambda: miner_active() and samples() > before, START_S, POLL_S)
        wait_for("the restarted validator sets weights", lambda: report_at() > killed_at, START_S, POLL_S)

        # `pm2 stop`, one app at a time: each daemon finishes by itself well within its kill_timeout.
        for role in ROLES:
            seen, logged = len(pm2.daemon_log()), len(err_log[role].read_text())
            started = time.monotonic()
            pm2("stop", f"iota-{role}")
            took = time.monotonic() - started
            env = pm2.apps()[f"iota-{role}"]["pm2_env"]
            daemon_log = pm2.daemon_log()[seen:]  # what PM2 logged about this stop
            assert env["status"] == "stopped"
            assert took < env["kill_timeout"] / 1000
            # PM2 writes "still alive after <kill_timeout>ms, sending SIGKILL" when it has to kill an app, and
            # the exit code, which is 0 also for a process a signal ended: the daemon's exit by itself, not
            # os._exit(130) after its stop deadline, nor Python's death by KeyboardInterrupt (a traceback).
            assert f"App [iota-{role}:{env['pm_id']}] exited with code [0]" in daemon_log, daemon_log
            assert "still alive after" not in daemon_log, daemon_log
            assert "Traceback" not in err_log[role].read_text()[logged:]
            # The log files are in the folder app.js names (<repository>/logs unless IOTA_PM2_LOG_DIR, checked
            # by tests/test_docs.py): the start script's checks on stdout, the daemon's log lines on stderr.
            assert Path(env["pm_out_log_path"]) == pm2.log_dir / f"{role}.out.log"
            assert Path(env["pm_err_log_path"]) == err_log[role]
            assert "✓ registration" in (pm2.log_dir / f"{role}.out.log").read_text()
