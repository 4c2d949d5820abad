"""The start scripts fail fast, with a plain message, on each missing prerequisite.

Each test runs the real `start_miner.sh`, `start_validator.sh` or `start_orchestrator.sh` as an operator
does, with IOTA_ENV_FILE pointing at a settings file in a temporary folder, and expects a non-zero exit
within seconds (not a daemon retrying for minutes) and the message that says what to do. Wallets, the local
chain, S3 and the orchestrator are real; only GPU memory, which this CPU machine cannot run short of, is
tested on the pure function (tests/test_preflight.py).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from common.chain import LocalChain
from common.keys import create_hotkey
from iota.devnet import Devnet, DevnetOptions
from tests.operator_env import NETUID, base_settings, dead_port, registered_hotkey

REPO = Path(__file__).resolve().parents[1]
# A failing start must end before a daemon's own retries would (IOTA_*_RETRY_FOR_S is 120 s): it checks
# once and exits. Idle, a start takes about 6 s; a loaded 2-core machine has taken 30 s.
FAST_S = 90.0


@dataclass
class Outcome:
    code: int
    output: str  # stdout and stderr together, as an operator sees them
    seconds: float


def write_env(path: Path, **settings: str) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    return path


def run(command: list[str], env_file: Path, **extra: str) -> Outcome:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}
    env.update(IOTA_ENV_FILE=str(env_file), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    start = time.monotonic()
    done = subprocess.run(
        command, cwd=env_file.parent, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    return Outcome(done.returncode, done.stdout + done.stderr, time.monotonic() - start)


def start(role: str, env_file: Path, **extra: str) -> Outcome:
    return run(["bash", str(REPO / f"start_{role}.sh")], env_file, **extra)


def assert_refused(outcome: Outcome, role: str, message: str) -> None:
    assert outcome.code != 0, outcome.output
    assert outcome.seconds < FAST_S, outcome.output
    assert message in outcome.output, outcome.output
    assert f"not starting the {role}" in outcome.output


# ---------------------------------------------------------------------------------------------------------
# Each missing prerequisite


def test_no_settings_file(tmp_path: Path) -> None:
    env_file = tmp_path / "settings.env"
    outcome = start("miner", env_file)
    assert outcome.code != 0 and outcome.seconds < FAST_S, outcome.output
    assert f"created {env_file} from .env.example; edit it" in outcome.output
    # setup.sh wrote the example there, and nothing ran on its untouched defaults.
    assert env_file.read_text() == (REPO / ".env.example").read_text()
    assert "✓" not in outcome.output


def test_no_wallet_or_hotkey(tmp_path: Path) -> None:
    env_file = write_env(tmp_path / ".env", **base_settings(tmp_path, f"http://127.0.0.1:{dead_port()}"))
    outcome = start("validator", env_file)
    assert_refused(outcome, "validator", f"hotkey file {tmp_path}/wallets/ops/hotkeys/hot does not exist")
    assert "btcli wallet new-hotkey" in outcome.output
    assert "IOTA_WALLET_NAME / IOTA_WALLET_HOTKEY / IOTA_WALLET_PATH" in outcome.output


def test_hotkey_not_registered(tmp_path: Path) -> None:
    ss58 = create_hotkey("ops", "hot", tmp_path / "wallets").ss58_address
    LocalChain(tmp_path / "chain.json", NETUID)  # the subnet exists; this hotkey is not on it
    env_file = write_env(tmp_path / ".env", **base_settings(tmp_path, f"http://127.0.0.1:{dead_port()}"))
    outcome = start("miner", env_file)
    assert_refused(
        outcome, "miner", f"hotkey {ss58} (wallet 'ops', hotkey 'hot') is not registered on the local chain"
    )


def test_orchestrator_unreachable(tmp_path: Path) -> None:
    registered_hotkey(tmp_path, stake=100.0, validator_permit=True)
    url = f"http://127.0.0.1:{dead_port()}"
    env_file = write_env(tmp_path / ".env", **base_settings(tmp_path, url))
    outcome = start("validator", env_file)
    assert_refused(outcome, "validator", f"cannot reach the orchestrator at {url} (GET /health: ConnectError")
    assert "set IOTA_VALIDATOR_ORCHESTRATOR_URL to its address" in outcome.output


def test_s3_unreachable(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{dead_port()}"
    env_file = write_env(
        tmp_path / ".env",
        IOTA_S3_ENDPOINT_URL=endpoint,
        IOTA_CHAIN_LOCAL_PATH=str(tmp_path / "chain.json"),
        IOTA_ORCH_STATE_PATH=str(tmp_path / "state.sqlite"),
    )
    outcome = start("orchestrator", env_file)
    assert_refused(outcome, "orchestrator", f"cannot use S3 at {endpoint} (bucket 'iota')")
    assert "Check IOTA_S3_ENDPOINT_URL" in outcome.output
    assert not (tmp_path / "state.sqlite").exists()


# ---------------------------------------------------------------------------------------------------------
# With a running orchestrator (embedded S3, a local chain)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devnet]:
    with Devnet(DevnetOptions(workdir=tmp_path_factory.mktemp("network"))) as net:
        net.start_orchestrator()
        yield net


def network_settings(tmp: Path, net: Devnet) -> dict[str, str]:
    return base_settings(tmp, net.url) | {"IOTA_CHAIN_LOCAL_PATH": str(net.chain.path)}


def test_no_gpu_where_one_is_required(tmp_path: Path, network: Devnet) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    network.chain.register(create_hotkey("ops", "hot", tmp_path / "wallets").ss58_address)
    settings = network_settings(tmp_path, network) | {"IOTA_MINER_DEVICE": "cuda"}
    outcome = start("miner", write_env(tmp_path / ".env", **settings))
    assert_refused(outcome, "miner", "no GPU: IOTA_MINER_DEVICE=cuda but torch sees no CUDA device")


def test_the_miner_check_passes_when_everything_is_in_place(tmp_path: Path, network: Devnet) -> None:
    ss58 = create_hotkey("ops", "hot", tmp_path / "wallets").ss58_address
    uid = network.chain.register(ss58).uid
    env_file = write_env(tmp_path / ".env", **network_settings(tmp_path, network))
    outcome = run([str(REPO / ".venv/bin/iota"), "check", "miner"], env_file)
    assert outcome.code == 0, outcome.output
    lines = outcome.output.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "✓ settings",
        "✓ wallet",
        "✓ registration",
        "✓ orchestrator",
        "✓ gpu",
        "- gpu memory",
    ]
    assert f"hotkey {ss58} is registered as uid {uid}" in outcome.output
    assert f"{network.url} answers: run " in outcome.output
    assert "training on the CPU (IOTA_MINER_DEVICE=cpu)" in outcome.output


def test_skip_checks_goes_straight_to_the_daemon(tmp_path: Path) -> None:
    env_file = write_env(tmp_path / ".env", **base_settings(tmp_path, f"http://127.0.0.1:{dead_port()}"))
    outcome = start("miner", env_file, IOTA_SKIP_CHECKS="1")
    # The miner itself refuses to start without its hotkey; no check ran before it.
    assert outcome.code != 0 and outcome.seconds < FAST_S, outcome.output
    assert "cannot start the miner" in outcome.output
    assert "✗" not in outcome.output and "not starting the miner" not in outcome.output
