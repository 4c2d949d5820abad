"""The real subnet, through the bittensor v11 SDK."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import bittensor as bt
from bittensor.sp_core import Keypair

from common.chain.base import Chain, ChainError, Metagraph, Neuron, normalize_weights
from common.config import WalletSettings


def metagraph_from_sdk(mg: bt.Metagraph) -> Metagraph:
    """Map the SDK's metagraph onto ours, keeping only what IOTA uses."""
    return Metagraph(
        netuid=mg.netuid,
        block=mg.block,
        neurons=[
            Neuron(
                uid=n.uid,
                hotkey=n.hotkey,
                coldkey=n.coldkey,
                # total_stake is denominated in the subnet's alpha, on which `.tao` raises; `.amount`
                # is the number in its own unit, which is what stake-weighting compares.
                stake=n.total_stake.amount,
                validator_permit=n.validator_permit,
            )
            for n in mg.neurons
        ],
    )


class BittensorChain(Chain):
    """A bittensor subnet. Building one opens no connection; the first read or write does."""

    def __init__(
        self,
        network: str,
        netuid: int,
        wallet_settings: WalletSettings,
        *,
        metagraph_ttl_s: float = 60.0,
    ) -> None:
        self.network = network
        self.netuid = netuid
        self.wallet_settings = wallet_settings
        self.metagraph_ttl_s = metagraph_ttl_s
        # Subtensor construction is cold (no socket until first use), so this keeps our promise; it
        # does resolve the network name, which is the one mistake worth reporting before first use.
        try:
            self._subtensor = bt.Subtensor(network)
        except ValueError as exc:
            raise ChainError(str(exc)) from exc
        self._lock = threading.Lock()
        self._cached: Metagraph | None = None
        self._cached_at = 0.0
        self._weights: dict[int, dict[int, float]] | None = None
        self._weights_at = 0.0

    def _where(self) -> str:
        return f"netuid {self.netuid} on {self.network}"

    def metagraph(self) -> Metagraph:
        # The metagraph is one (large) runtime-API call; neuron lookups between refreshes reuse it.
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached_at < self.metagraph_ttl_s:
                return self._cached
            try:
                mg = self._subtensor.subnets.metagraph(self.netuid, commitments=False)
            except Exception as exc:  # the SDK raises BittensorError subclasses and transport errors
                raise ChainError(f"reading the metagraph of {self._where()} failed: {exc}") from exc
            if mg is None:
                raise ChainError(f"subnet {self.netuid} does not exist on {self.network}")
            self._cached = metagraph_from_sdk(mg)
            self._cached_at = time.monotonic()
            return self._cached

    def weights(self) -> dict[int, dict[int, float]]:
        # One map query over the subnet's weight rows; cached like the metagraph, since only dashboards
        # and audits read it and the chain changes it once per tempo at most.
        with self._lock:
            if self._weights is not None and time.monotonic() - self._weights_at < self.metagraph_ttl_s:
                return self._weights
            try:
                rows = self._subtensor.weights.weights(self.netuid)
            except Exception as exc:
                raise ChainError(f"reading the weights of {self._where()} failed: {exc}") from exc
            self._weights = {
                int(validator): {int(uid): float(w) for uid, w in row.items()}
                for validator, row in rows.items()
            }
            self._weights_at = time.monotonic()
            return self._weights

    def block(self) -> int:
        try:
            return int(self._subtensor.block)
        except Exception as exc:
            raise ChainError(f"reading the current block of {self.network} failed: {exc}") from exc

    def _wallet(self) -> bt.Wallet:
        ws = self.wallet_settings
        return bt.Wallet(ws.name, ws.hotkey, str(ws.path.expanduser()))

    def set_weights(self, hotkey: Keypair, weights: Mapping[int, float]) -> None:
        normalised = normalize_weights(weights)
        wallet = self._wallet()
        # bt.set_weights signs with the wallet's hotkey file; refuse if that is not the key the caller
        # holds, or the chain would record weights under an identity the caller did not intend.
        try:
            signing_address = wallet.hotkey.ss58_address
        except Exception as exc:
            raise ChainError(f"cannot load the hotkey of {wallet!r}: {exc}") from exc
        if signing_address != hotkey.ss58_address:
            raise ChainError(
                f"{wallet!r} holds hotkey {signing_address}, but weights were requested for "
                f"{hotkey.ss58_address}"
            )
        try:
            bt.set_weights(self.netuid, normalised, wallet=wallet, network=self.network)
        except Exception as exc:
            who = hotkey.ss58_address
            raise ChainError(f"set_weights by {who} on {self._where()} failed: {exc}") from exc
