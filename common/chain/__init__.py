"""Chain access: identities, stake and weights, over a local file or the real bittensor subnet."""

from __future__ import annotations

from common.chain.base import Chain, ChainError, Metagraph, Neuron, normalize_weights
from common.chain.local import LocalChain, WeightsRecord
from common.chain.subtensor import BittensorChain, metagraph_from_sdk
from common.config import ChainSettings, WalletSettings

__all__ = [
    "BittensorChain",
    "Chain",
    "ChainError",
    "LocalChain",
    "Metagraph",
    "Neuron",
    "WeightsRecord",
    "make_chain",
    "metagraph_from_sdk",
    "normalize_weights",
]


def make_chain(settings: ChainSettings, wallet: WalletSettings | None = None) -> Chain:
    """The chain `settings.backend` names. The bittensor backend signs weights with `wallet`'s hotkey
    (default wallet settings when omitted); the local backend takes the keypair given to set_weights."""
    if settings.backend == "local":
        return LocalChain(settings.local_path, settings.netuid, settings.local_block_time_s)
    return BittensorChain(
        settings.network,
        settings.netuid,
        wallet or WalletSettings(),
        metagraph_ttl_s=settings.metagraph_ttl_s,
    )
