"""A file-backed chain for the one-command local network and for tests.

The whole state is one small JSON file. Several processes (orchestrator, miners, validators) share it:
every read re-reads the file, which is replaced atomically so a reader never sees half a write, and
every mutation holds an exclusive flock on a sidecar lock file across read-modify-write so concurrent
writers cannot lose each other's updates.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from bittensor.sp_core import Keypair, verify
from pydantic import BaseModel, Field, ValidationError

from common.chain.base import Chain, ChainError, Metagraph, Neuron, normalize_weights
from common.keys import check_ss58

_T = TypeVar("_T")

# Older weight records are dropped so the file, which every read parses, stays small.
WEIGHTS_HISTORY_LIMIT = 256


class WeightsRecord(BaseModel):
    """One accepted set_weights call."""

    validator_uid: int
    hotkey: str
    block: int
    weights: dict[int, float]


class _State(BaseModel):
    netuid: int
    genesis_time: float
    next_uid: int = 0
    neurons: list[Neuron] = Field(default_factory=list)
    # validator uid -> its latest record; history keeps the recent ones in order.
    weights: dict[int, WeightsRecord] = Field(default_factory=dict)
    weights_history: list[WeightsRecord] = Field(default_factory=list)

    def find(self, hotkey: str) -> Neuron | None:
        return next((n for n in self.neurons if n.hotkey == hotkey), None)

    def require(self, hotkey: str) -> Neuron:
        neuron = self.find(hotkey)
        if neuron is None:
            raise ChainError(f"hotkey {hotkey} is not registered on local netuid {self.netuid}")
        return neuron

    def replace(self, neuron: Neuron) -> None:
        self.neurons = [neuron if n.uid == neuron.uid else n for n in self.neurons]


def _check_ss58(address: str, what: str) -> None:
    try:
        check_ss58(address)
    except ValueError as exc:
        raise ChainError(f"{what}: {exc}") from None


def _check_stake(stake: float) -> float:
    value = float(stake)
    if not math.isfinite(value) or value < 0:
        raise ChainError(f"stake must be a finite non-negative number of TAO, got {stake!r}")
    return value


def weights_payload(netuid: int, hotkey: str, weights: Mapping[int, float]) -> bytes:
    """The canonical bytes a validator signs to set weights on the local chain."""
    body = {"netuid": netuid, "hotkey": hotkey, "weights": [[u, w] for u, w in sorted(weights.items())]}
    return json.dumps(body, separators=(",", ":")).encode()


class LocalChain(Chain):
    """A subnet in a JSON file; uids are handed out in order and never reused."""

    def __init__(self, path: Path | str, netuid: int, block_time_s: float = 12.0) -> None:
        if block_time_s <= 0:
            raise ValueError(f"block_time_s must be positive, got {block_time_s}")
        self.path = Path(path)
        self.netuid = netuid
        self.block_time_s = block_time_s
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Creating under the lock makes the first process to arrive fix genesis_time for everyone.
        with self._locked():
            if not self.path.exists():
                self._write(_State(netuid=netuid, genesis_time=time.time()))
        self._read()  # fail now, not on first use, if the file belongs to another subnet

    # --- file plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _read(self) -> _State:
        try:
            state = _State.model_validate_json(self.path.read_bytes())
        except FileNotFoundError as exc:
            raise ChainError(f"local chain state {self.path} has disappeared") from exc
        except ValidationError as exc:
            raise ChainError(f"local chain state {self.path} is corrupt: {exc}") from exc
        if state.netuid != self.netuid:
            raise ChainError(f"{self.path} holds netuid {state.netuid}, not {self.netuid}")
        return state

    def _write(self, state: _State) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(state.model_dump_json(indent=1).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _mutate(self, change: Callable[[_State], _T]) -> _T:
        with self._locked():
            state = self._read()
            result = change(state)
            self._write(state)
            return result

    def _block_of(self, state: _State) -> int:
        return max(0, int((time.time() - state.genesis_time) / self.block_time_s))

    # --- Chain -----------------------------------------------------------------------------------

    def block(self) -> int:
        return self._block_of(self._read())

    def metagraph(self) -> Metagraph:
        state = self._read()
        return Metagraph(netuid=self.netuid, block=self._block_of(state), neurons=state.neurons)

    def set_weights(self, hotkey: Keypair, weights: Mapping[int, float]) -> None:
        normalised = normalize_weights(weights)
        address = hotkey.ss58_address
        # Signing and verifying proves the caller holds the private key rather than just naming it.
        payload = weights_payload(self.netuid, address, normalised)
        try:
            signature = hotkey.sign(payload)
        except ValueError as exc:
            raise ChainError(f"cannot sign weights with {address}: {exc}") from exc
        if not verify(payload, signature, address):
            raise ChainError(f"signature by {address} over its weights does not verify")

        def record(state: _State) -> None:
            validator = state.require(address)
            if not validator.validator_permit:
                raise ChainError(f"hotkey {address} (uid {validator.uid}) has no validator permit")
            known = {n.uid for n in state.neurons}
            unknown = sorted(set(normalised) - known)
            if unknown:
                raise ChainError(f"weights name uids that are not registered: {unknown}")
            entry = WeightsRecord(
                validator_uid=validator.uid, hotkey=address, block=self._block_of(state), weights=normalised
            )
            state.weights[validator.uid] = entry
            state.weights_history = [*state.weights_history, entry][-WEIGHTS_HISTORY_LIMIT:]

        self._mutate(record)

    # --- local-only administration ---------------------------------------------------------------

    def register(
        self, hotkey: str, *, coldkey: str = "", stake: float = 0.0, validator_permit: bool = False
    ) -> Neuron:
        """Register `hotkey`; registering it again returns its existing neuron unchanged."""
        _check_ss58(hotkey, "hotkey")
        if coldkey:
            _check_ss58(coldkey, "coldkey")
        value = _check_stake(stake)

        def add(state: _State) -> Neuron:
            existing = state.find(hotkey)
            if existing is not None:
                return existing
            neuron = Neuron(
                uid=state.next_uid,
                hotkey=hotkey,
                coldkey=coldkey,
                stake=value,
                validator_permit=validator_permit,
            )
            state.next_uid += 1
            state.neurons = [*state.neurons, neuron]
            return neuron

        return self._mutate(add)

    def deregister(self, hotkey: str) -> bool:
        """Remove `hotkey` and its weights row; False if it was not registered."""

        def remove(state: _State) -> bool:
            neuron = state.find(hotkey)
            if neuron is None:
                return False
            state.neurons = [n for n in state.neurons if n.uid != neuron.uid]
            state.weights.pop(neuron.uid, None)
            return True

        return self._mutate(remove)

    def set_stake(self, hotkey: str, stake: float) -> Neuron:
        value = _check_stake(stake)

        def update(state: _State) -> Neuron:
            neuron = state.require(hotkey).model_copy(update={"stake": value})
            state.replace(neuron)
            return neuron

        return self._mutate(update)

    def set_validator_permit(self, hotkey: str, permit: bool) -> Neuron:
        def update(state: _State) -> Neuron:
            neuron = state.require(hotkey).model_copy(update={"validator_permit": permit})
            state.replace(neuron)
            return neuron

        return self._mutate(update)

    def weights(self) -> dict[int, dict[int, float]]:
        """Each validator uid's latest weights, {validator_uid: {uid: weight}}, each summing to 1."""
        return {uid: dict(record.weights) for uid, record in self._read().weights.items()}

    def weights_history(self) -> list[WeightsRecord]:
        """The most recent accepted set_weights calls, oldest first (bounded)."""
        return list(self._read().weights_history)
