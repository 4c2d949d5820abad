"""The chain layer: the file-backed local chain, the SDK mapping, the bittensor backend, keys."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import bittensor as bt
import pytest
from bittensor.sp_core import Keypair

from common.chain import (
    BittensorChain,
    Chain,
    ChainError,
    LocalChain,
    Metagraph,
    Neuron,
    make_chain,
    metagraph_from_sdk,
)
from common.config import ChainSettings, WalletSettings
from common.keys import WalletError, create_hotkey, generate_keypair, load_hotkey

REPO = Path(__file__).resolve().parents[1]
NETUID = 9
# A closed port on loopback: connecting fails at once and nothing leaves the machine.
UNREACHABLE = "ws://127.0.0.1:9"


@pytest.fixture
def chain(tmp_path: Path) -> LocalChain:
    return LocalChain(tmp_path / "chain.json", NETUID, block_time_s=12.0)


def _validator(chain: LocalChain, stake: float = 1000.0) -> Keypair:
    kp = generate_keypair()
    chain.register(kp.ss58_address, stake=stake, validator_permit=True)
    return kp


# --- LocalChain: registry ---------------------------------------------------------------------------------


def test_register_assigns_sequential_uids_and_fills_the_metagraph(chain: LocalChain) -> None:
    cold = generate_keypair()
    keys = [generate_keypair() for _ in range(3)]
    neurons = [
        chain.register(k.ss58_address, coldkey=cold.ss58_address, stake=float(i)) for i, k in enumerate(keys)
    ]

    assert [n.uid for n in neurons] == [0, 1, 2]
    mg = chain.metagraph()
    assert isinstance(mg, Metagraph)
    assert mg.netuid == NETUID
    assert mg.hotkeys == [k.ss58_address for k in keys]
    assert mg.uids == [0, 1, 2]
    assert mg.by_hotkey(keys[1].ss58_address) == Neuron(
        uid=1, hotkey=keys[1].ss58_address, coldkey=cold.ss58_address, stake=1.0, validator_permit=False
    )
    assert mg.by_hotkey(generate_keypair().ss58_address) is None
    assert mg.by_uid(2) is not None and mg.by_uid(2).hotkey == keys[2].ss58_address


def test_register_is_idempotent(chain: LocalChain) -> None:
    kp = generate_keypair()
    first = chain.register(kp.ss58_address, stake=5.0)
    again = chain.register(kp.ss58_address, stake=99.0, validator_permit=True)
    assert again == first
    assert len(chain.metagraph().neurons) == 1


def test_register_rejects_bad_addresses_and_stake(chain: LocalChain) -> None:
    with pytest.raises(ChainError, match="ss58"):
        chain.register("not-an-address")
    with pytest.raises(ChainError, match="coldkey"):
        chain.register(generate_keypair().ss58_address, coldkey="bad")
    with pytest.raises(ChainError, match="stake"):
        chain.register(generate_keypair().ss58_address, stake=-1.0)
    # The same key under another ss58 prefix is an alias, not a second identity.
    alias = Keypair(public_key=generate_keypair().public_key, ss58_format=0).ss58_address
    with pytest.raises(ChainError, match="prefix 42"):
        chain.register(alias)
    assert chain.metagraph().neurons == []


def test_is_registered_neuron_and_deregister(chain: LocalChain) -> None:
    a, b, c = (generate_keypair() for _ in range(3))
    chain.register(a.ss58_address)
    chain.register(b.ss58_address)
    assert chain.is_registered(a.ss58_address)
    assert not chain.is_registered(c.ss58_address)
    assert chain.neuron(b.ss58_address) is not None and chain.neuron(b.ss58_address).uid == 1

    assert chain.deregister(a.ss58_address) is True
    assert chain.deregister(a.ss58_address) is False
    assert not chain.is_registered(a.ss58_address)
    # uids are not reused: the next registration gets a fresh one.
    assert chain.register(c.ss58_address).uid == 2
    assert chain.metagraph().uids == [1, 2]


def test_set_stake_and_permit(chain: LocalChain) -> None:
    kp = generate_keypair()
    chain.register(kp.ss58_address)
    assert chain.set_stake(kp.ss58_address, 42.5).stake == 42.5
    assert chain.set_validator_permit(kp.ss58_address, True).validator_permit
    assert chain.neuron(kp.ss58_address) == Neuron(
        uid=0, hotkey=kp.ss58_address, coldkey="", stake=42.5, validator_permit=True
    )
    with pytest.raises(ChainError, match="not registered"):
        chain.set_stake(generate_keypair().ss58_address, 1.0)
    with pytest.raises(ChainError, match="stake"):
        chain.set_stake(kp.ss58_address, math.nan)


def test_state_persists_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "chain.json"
    first = LocalChain(path, NETUID, block_time_s=12.0)
    kp = generate_keypair()
    first.register(kp.ss58_address, stake=3.0, validator_permit=True)

    second = LocalChain(path, NETUID, block_time_s=12.0)
    assert second.metagraph().neurons == first.metagraph().neurons
    # Reads go to the file, so a write through one instance is seen by the other at once.
    other = generate_keypair()
    second.register(other.ss58_address)
    assert first.is_registered(other.ss58_address)


def test_state_file_of_another_subnet_is_refused(tmp_path: Path) -> None:
    LocalChain(tmp_path / "chain.json", NETUID)
    with pytest.raises(ChainError, match="netuid"):
        LocalChain(tmp_path / "chain.json", NETUID + 1)


_REGISTER_MANY = """
import json, sys, time
from common.chain import LocalChain
from common.keys import generate_keypair
path, netuid, count, start_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
keys = [generate_keypair().ss58_address for _ in range(count)]
chain = LocalChain(path, netuid)
time.sleep(max(0.0, start_at - time.time()))  # start together so the writers really contend
for key in keys:
    chain.register(key)
print(json.dumps(keys))
"""


def test_concurrent_processes_do_not_lose_registrations(tmp_path: Path) -> None:
    path = tmp_path / "chain.json"
    processes, per_process = 4, 10
    start_at = time.time() + 1.5  # past interpreter start-up and imports in every child
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _REGISTER_MANY, str(path), str(NETUID), str(per_process), str(start_at)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    registered: list[str] = []
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        registered += json.loads(out)

    assert len(set(registered)) == processes * per_process
    mg = LocalChain(path, NETUID).metagraph()
    assert sorted(mg.hotkeys) == sorted(registered)
    assert sorted(mg.uids) == list(range(processes * per_process))


# --- LocalChain: weights ----------------------------------------------------------------------------------


def test_validator_sets_normalised_weights(chain: LocalChain) -> None:
    validator = _validator(chain)
    miners = [generate_keypair() for _ in range(2)]
    uids = [chain.register(m.ss58_address).uid for m in miners]

    chain.set_weights(validator, {uids[0]: 3.0, uids[1]: 1.0})
    assert chain.weights() == {0: {uids[0]: 0.75, uids[1]: 0.25}}
    # A later call replaces the row; the history keeps both.
    chain.set_weights(validator, {uids[1]: 2})
    assert chain.weights() == {0: {uids[1]: 1.0}}
    history = chain.weights_history()
    assert [h.weights for h in history] == [{1: 0.75, 2: 0.25}, {2: 1.0}]
    assert all(h.validator_uid == 0 and h.hotkey == validator.ss58_address for h in history)


def test_set_weights_needs_a_permit(chain: LocalChain) -> None:
    miner = generate_keypair()
    uid = chain.register(miner.ss58_address).uid
    with pytest.raises(ChainError, match="validator permit"):
        chain.set_weights(miner, {uid: 1.0})
    assert chain.weights() == {}


def test_set_weights_needs_registration(chain: LocalChain) -> None:
    _validator(chain)
    with pytest.raises(ChainError, match="not registered"):
        chain.set_weights(generate_keypair(), {0: 1.0})


def test_set_weights_needs_the_private_key(chain: LocalChain) -> None:
    validator = _validator(chain)
    public_only = Keypair(ss58_address=validator.ss58_address)
    with pytest.raises(ChainError, match="cannot sign"):
        chain.set_weights(public_only, {0: 1.0})
    assert chain.weights() == {}


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({0: 1.0, 7: 1.0}, "not registered"),
        ({0: -0.5, 1: 1.0}, "negative"),
        ({0: math.nan}, "not finite"),
        ({0: math.inf}, "not finite"),
        ({0: 0.0, 1: 0.0}, "all zero"),
        ({}, "all zero"),
    ],
)
def test_set_weights_rejects_bad_vectors(chain: LocalChain, weights: dict[int, float], match: str) -> None:
    validator = _validator(chain)
    chain.register(generate_keypair().ss58_address)
    with pytest.raises(ChainError, match=match):
        chain.set_weights(validator, weights)
    assert chain.weights() == {}


def test_deregistering_a_validator_drops_its_weights(chain: LocalChain) -> None:
    validator = _validator(chain)
    chain.set_weights(validator, {0: 1.0})
    chain.deregister(validator.ss58_address)
    assert chain.weights() == {}


def test_weights_rows_per_validator_through_the_chain_interface(tmp_path: Path) -> None:
    local = LocalChain(tmp_path / "chain.json", NETUID)
    first, second = _validator(local), _validator(local, stake=10.0)
    miner = local.register(generate_keypair().ss58_address).uid
    local.set_weights(first, {miner: 1.0})
    local.set_weights(second, {miner: 1.0, 0: 3.0})
    # What the orchestrator's dashboard reads, from another process's view of the same file.
    chain: Chain = LocalChain(tmp_path / "chain.json", NETUID)
    assert chain.weights() == {0: {miner: 1.0}, 1: {0: 0.75, miner: 0.25}}


def test_block_advances_with_time(tmp_path: Path) -> None:
    chain = LocalChain(tmp_path / "chain.json", NETUID, block_time_s=0.05)
    first = chain.block()
    time.sleep(0.3)
    later = chain.block()
    assert later >= first + 4
    assert chain.metagraph().block >= later
    # Another process's view of the same file agrees, because genesis_time lives in the file.
    assert abs(LocalChain(tmp_path / "chain.json", NETUID, block_time_s=0.05).block() - chain.block()) <= 1


def test_weights_record_the_block(tmp_path: Path) -> None:
    chain = LocalChain(tmp_path / "chain.json", NETUID, block_time_s=0.05)
    validator = _validator(chain)
    time.sleep(0.12)
    chain.set_weights(validator, {0: 1.0})
    assert chain.weights_history()[-1].block >= 2


def test_make_chain_local(tmp_path: Path) -> None:
    settings = ChainSettings(
        backend="local", netuid=3, local_path=tmp_path / "c.json", local_block_time_s=1.0
    )
    chain = make_chain(settings)
    assert isinstance(chain, LocalChain) and chain.netuid == 3 and chain.block_time_s == 1.0


# --- SDK mapping and the bittensor backend ------------------------------------------------------------------


def _sdk_neuron(uid: int, hotkey: str, coldkey: str, stake_rao: int, permit: bool) -> bt.MetagraphNeuron:
    zero = bt.Balance.from_rao(0, NETUID)
    return bt.MetagraphNeuron(
        uid=uid,
        hotkey=hotkey,
        coldkey=coldkey,
        active=True,
        validator_permit=permit,
        last_update=0,
        block_at_registration=0,
        rank=0.0,
        trust=0.0,
        consensus=0.0,
        incentive=0.0,
        dividends=0.0,
        pruning_score=0.0,
        emission=zero,
        alpha_stake=bt.Balance.from_rao(stake_rao, NETUID),
        tao_stake=bt.Balance.from_rao(0),
        # As the SDK decodes it: in the subnet's alpha (netuid != 0), where `.tao` would raise.
        total_stake=bt.Balance.from_rao(stake_rao, NETUID),
        axon=None,
        identity=None,
        commitment=None,
    )


def test_metagraph_from_sdk() -> None:
    cold = generate_keypair().ss58_address
    hot = [generate_keypair().ss58_address for _ in range(2)]
    sdk = bt.Metagraph(
        netuid=NETUID,
        mechid=0,
        name="iota",
        symbol="ι",
        block=1234,
        tempo=360,
        last_step=1000,
        blocks_since_last_step=234,
        owner_hotkey=hot[0],
        owner_coldkey=cold,
        network_registered_at=1,
        num_uids=2,
        max_uids=256,
        price=None,
        moving_price=None,
        identity=None,
        neurons=[
            _sdk_neuron(0, hot[0], cold, 2_500_000_000, True),
            _sdk_neuron(1, hot[1], cold, 0, False),
        ],
        commitments={},
        unregistered_commitments={},
        raw={},
    )
    mg = metagraph_from_sdk(sdk)
    assert mg == Metagraph(
        netuid=NETUID,
        block=1234,
        neurons=[
            Neuron(uid=0, hotkey=hot[0], coldkey=cold, stake=2.5, validator_permit=True),
            Neuron(uid=1, hotkey=hot[1], coldkey=cold, stake=0.0, validator_permit=False),
        ],
    )


@pytest.mark.timeout(60)
def test_bittensor_chain_unreachable_endpoint_raises_chain_error(tmp_path: Path) -> None:
    wallet = WalletSettings(name="w", hotkey="h", path=tmp_path)
    started = time.monotonic()
    chain = BittensorChain(UNREACHABLE, NETUID, wallet)  # construction is cold: no connection yet
    assert time.monotonic() - started < 1.0

    with pytest.raises(ChainError, match="127.0.0.1"):
        chain.metagraph()
    with pytest.raises(ChainError, match="127.0.0.1"):
        chain.is_registered(generate_keypair().ss58_address)
    with pytest.raises(ChainError):
        chain.block()
    hotkey = create_hotkey("w", "h", tmp_path)
    with pytest.raises(ChainError, match="set_weights"):
        chain.set_weights(hotkey, {0: 1.0})
    assert time.monotonic() - started < 20.0


@pytest.mark.timeout(60)
def test_bittensor_chain_weights_unreachable_raises_chain_error(tmp_path: Path) -> None:
    chain = BittensorChain(UNREACHABLE, NETUID, WalletSettings(name="w", hotkey="h", path=tmp_path))
    with pytest.raises(ChainError, match="reading the weights of netuid 9"):
        chain.weights()


class _WeightsReads:
    """Stands in for the SDK's `subtensor.weights` read namespace (no chain is reachable here)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def weights(self, netuid: int) -> dict[int, dict[int, float]]:
        self.calls.append(netuid)
        return {0: {1: 0.25, 2: 0.75}, 3: {}}


def test_bittensor_chain_weights_are_cached_like_the_metagraph(tmp_path: Path) -> None:
    wallet = WalletSettings(name="w", hotkey="h", path=tmp_path)
    chain = BittensorChain(UNREACHABLE, NETUID, wallet, metagraph_ttl_s=60.0)
    reads = _WeightsReads()
    chain._subtensor = type("Subtensor", (), {"weights": reads})()
    assert chain.weights() == {0: {1: 0.25, 2: 0.75}, 3: {}}
    assert chain.weights() == {0: {1: 0.25, 2: 0.75}, 3: {}}
    assert reads.calls == [NETUID]  # the second read came from the cache


def test_bittensor_chain_refuses_a_key_other_than_the_wallets(tmp_path: Path) -> None:
    create_hotkey("w", "h", tmp_path)
    chain = BittensorChain(UNREACHABLE, NETUID, WalletSettings(name="w", hotkey="h", path=tmp_path))
    with pytest.raises(ChainError, match="holds hotkey"):
        chain.set_weights(generate_keypair(), {0: 1.0})
    with pytest.raises(ChainError, match="not finite"):
        chain.set_weights(generate_keypair(), {0: math.nan})


def test_bittensor_chain_unknown_network_name() -> None:
    with pytest.raises(ChainError, match="Unknown network"):
        BittensorChain("no-such-network", NETUID, WalletSettings())


def test_make_chain_bittensor_is_cold(tmp_path: Path) -> None:
    chain = make_chain(
        ChainSettings(backend="bittensor", network=UNREACHABLE, netuid=NETUID),
        WalletSettings(name="w", hotkey="h", path=tmp_path),
    )
    assert isinstance(chain, BittensorChain) and chain.netuid == NETUID


# --- keys ---------------------------------------------------------------------------------------------------


def test_create_then_load_hotkey(tmp_path: Path) -> None:
    created = create_hotkey("miner", "default", tmp_path)
    wallet_dir = tmp_path / "miner"
    assert (wallet_dir / "hotkeys" / "default").is_file()
    assert (wallet_dir / "coldkeypub.txt").is_file()
    assert (wallet_dir / "coldkey").is_file()

    loaded = load_hotkey(WalletSettings(name="miner", hotkey="default", path=tmp_path))
    assert loaded.ss58_address == created.ss58_address
    # The loaded key holds the private half: what it signs verifies against the address.
    assert Keypair(ss58_address=created.ss58_address).verify(b"iota", loaded.sign(b"iota"))
    # Creating again keeps the existing key rather than replacing it.
    assert create_hotkey("miner", "default", tmp_path).ss58_address == created.ss58_address
    # A second hotkey in the same wallet shares the coldkey.
    assert create_hotkey("miner", "second", tmp_path).ss58_address != created.ss58_address


def test_load_missing_hotkey_explains_how_to_create_it(tmp_path: Path) -> None:
    settings = WalletSettings(name="nobody", hotkey="hk", path=tmp_path)
    with pytest.raises(WalletError) as info:
        load_hotkey(settings)
    message = str(info.value)
    assert str(tmp_path / "nobody" / "hotkeys" / "hk") in message
    assert "btcli wallet new-hotkey" in message


def test_generate_keypair_is_fresh_sr25519() -> None:
    a, b = generate_keypair(), generate_keypair()
    assert a.ss58_address != b.ss58_address
    assert a.crypto_type == 1  # sr25519
