"""The sr25519 hotkey that signs this process's requests, read from (or created in) a bittensor wallet."""

from __future__ import annotations

from pathlib import Path

import bittensor as bt
from bittensor.sp_core import KeyfileError, Keypair

from common.config import WalletSettings

# Bittensor's generic substrate prefix. One public key has an address per prefix; accepting only this one
# keeps one identity per key (in signatures, the replay cache and the chain's registry alike).
SS58_FORMAT = 42


def check_ss58(address: str) -> str:
    """`address` if it is a valid ss58 address in the canonical prefix, else ValueError saying why."""
    try:
        canonical = Keypair(ss58_address=address).ss58_address
    except ValueError:
        raise ValueError(f"{address!r} is not a valid ss58 address") from None
    if canonical != address:
        raise ValueError(f"{address!r} must use ss58 prefix {SS58_FORMAT}: {canonical}")
    return address


class WalletError(RuntimeError):
    """The configured wallet's hotkey could not be loaded; the message says what to do."""


def _wallet(name: str, hotkey: str, path: Path | str) -> bt.Wallet:
    return bt.Wallet(name, hotkey, str(Path(path).expanduser()))


def load_hotkey(settings: WalletSettings) -> Keypair:
    """The hotkey keypair named by `settings` (IOTA_WALLET_NAME / _HOTKEY / _PATH)."""
    wallet = _wallet(settings.name, settings.hotkey, settings.path)
    keyfile = Path(wallet.hotkey_file.path)
    if not keyfile.exists():
        raise WalletError(
            f"hotkey file {keyfile} does not exist (wallet {settings.name!r}, hotkey {settings.hotkey!r}). "
            f"Create it with `btcli wallet new-hotkey --wallet {settings.name} --wallet-hotkey "
            f"{settings.hotkey} --wallet-path {settings.path}` (`btcli wallet create` makes the coldkey "
            "too), or point IOTA_WALLET_NAME / IOTA_WALLET_HOTKEY / IOTA_WALLET_PATH at an existing one."
        )
    try:
        return wallet.hotkey
    except (KeyfileError, ValueError, OSError) as exc:
        # ValueError covers an unreadable key format and an empty password for an encrypted hotkey.
        raise WalletError(f"cannot load hotkey file {keyfile}: {exc}") from exc


def create_hotkey(name: str, hotkey: str, path: Path | str) -> Keypair:
    """Create an unencrypted hotkey (and the wallet's coldkey if missing) for local and devnet use.

    Nothing is printed: the mnemonics of throwaway devnet keys are not worth putting in logs. An
    existing hotkey of the same name is kept and returned rather than overwritten.
    """
    wallet = _wallet(name, hotkey, path)
    # A wallet with either coldkey file already has a coldkey; creating another would clobber it.
    if not any(Path(f.path).exists() for f in (wallet.coldkey_file, wallet.coldkeypub_file)):
        wallet.create_new_coldkey(use_password=False, overwrite=False, suppress=True)
    if not Path(wallet.hotkey_file.path).exists():
        wallet.create_new_hotkey(use_password=False, overwrite=False, suppress=True)
    return wallet.hotkey


def generate_keypair() -> Keypair:
    """A fresh in-memory sr25519 keypair (tests, throwaway identities)."""
    return Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
