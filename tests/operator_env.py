"""A miner's or validator's settings as an operator writes them, in a temporary folder: a wallet, a local
chain, and an orchestrator URL (often one where nothing listens). For the tests that start the daemons as
processes (test_start_scripts, test_stop_e2e) and the ones that need a refused connection (test_stopping).
"""

from __future__ import annotations

import socket
from pathlib import Path

from common.chain import LocalChain
from common.keys import create_hotkey

NETUID = 9


def dead_port() -> int:
    """A loopback port with nothing listening: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def base_settings(tmp: Path, orchestrator_url: str) -> dict[str, str]:
    """A miner's or validator's settings with a wallet folder and a local chain in `tmp`."""
    return {
        "IOTA_WALLET_PATH": str(tmp / "wallets"),
        "IOTA_WALLET_NAME": "ops",
        "IOTA_WALLET_HOTKEY": "hot",
        "IOTA_CHAIN_BACKEND": "local",
        "IOTA_CHAIN_LOCAL_PATH": str(tmp / "chain.json"),
        "IOTA_CHAIN_NETUID": str(NETUID),
        "IOTA_MINER_ORCHESTRATOR_URL": orchestrator_url,
        "IOTA_MINER_DEVICE": "cpu",
        "IOTA_VALIDATOR_ORCHESTRATOR_URL": orchestrator_url,
        "IOTA_VALIDATOR_DEVICE": "cpu",
    }


def registered_hotkey(tmp: Path, **neuron: float | bool) -> str:
    """The `ops/hot` hotkey in tmp's wallets, registered on tmp's local chain."""
    ss58 = create_hotkey("ops", "hot", tmp / "wallets").ss58_address
    LocalChain(tmp / "chain.json", NETUID).register(ss58, **neuron)  # type: ignore[arg-type]
    return ss58
