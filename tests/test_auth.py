"""Epistula v2 signing and verification: real sr25519 keys, a real uvicorn server, a real httpx client."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from bittensor.sp_core import Keypair
from fastapi import Depends, FastAPI

from common.auth import (
    HEADER_SIGNATURE,
    HEADER_SIGNED_BY,
    HEADER_TIMESTAMP,
    HEADER_UUID,
    HEADER_VERSION,
    REQUIRED_HEADERS,
    AuthError,
    EpistulaAuth,
    EpistulaVerifier,
    ReplayCache,
    ReplayCacheFull,
    VerifiedRequest,
    sign_request,
    signed_request_dependency,
)
from common.config import AuthSettings
from tests.http_server import serve_app

WINDOW_MS = 2_000
MAX_BODY = 4_096
SETTINGS = AuthSettings(freshness_window_ms=WINDOW_MS, max_body_bytes=MAX_BODY)


@dataclass(frozen=True)
class Keys:
    alice: Keypair
    bob: Keypair
    receiver: Keypair


def new_keypair() -> Keypair:
    return Keypair.create_from_mnemonic(Keypair.generate_mnemonic())


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def json_body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(alice=new_keypair(), bob=new_keypair(), receiver=new_keypair())


def build_app(receiver_ss58: str, small_cache: ReplayCache) -> FastAPI:
    """One route per verifier flavour; each returns the verified hotkey and the parsed body."""
    app = FastAPI()
    # Depends(...) objects made up front: FastAPI reads them from the defaults (B008 forbids calls there).
    open_signed = Depends(signed_request_dependency(EpistulaVerifier(SETTINGS)))
    receiver_signed = Depends(
        signed_request_dependency(EpistulaVerifier(SETTINGS, expected_receiver=receiver_ss58))
    )
    small_cache_signed = Depends(
        signed_request_dependency(EpistulaVerifier(SETTINGS, replay_cache=small_cache))
    )

    def echo(signed: VerifiedRequest) -> dict[str, Any]:
        return {"hotkey": signed.hotkey, "body": signed.json()}

    @app.post("/echo")
    async def open_route(signed: VerifiedRequest = open_signed) -> dict[str, Any]:
        return echo(signed)

    @app.post("/for-receiver")
    async def receiver_route(signed: VerifiedRequest = receiver_signed) -> dict[str, Any]:
        return echo(signed)

    @app.post("/small-cache")
    async def small_cache_route(signed: VerifiedRequest = small_cache_signed) -> dict[str, Any]:
        return echo(signed)

    return app


@pytest.fixture(scope="module")
def base_url(keys: Keys) -> Iterator[str]:
    with serve_app(build_app(keys.receiver.ss58_address, ReplayCache(max_entries=2))) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10.0) as http:
        yield http


def assert_unauthorized(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Epistula"
    detail = response.json()["detail"]
    assert reason in detail, detail


# --- accepted requests -----------------------------------------------------------------------------------


def test_signed_request_is_accepted_with_signer_hotkey(base_url: str, keys: Keys) -> None:
    with httpx.Client(base_url=base_url, auth=EpistulaAuth(keys.alice)) as signed_client:
        response = signed_client.post("/echo", json={"step": 1, "layer": "a"})
    assert response.status_code == 200, response.text
    assert response.json() == {"hotkey": keys.alice.ss58_address, "body": {"step": 1, "layer": "a"}}


def test_each_request_gets_a_fresh_uuid(base_url: str, keys: Keys) -> None:
    with httpx.Client(base_url=base_url, auth=EpistulaAuth(keys.bob)) as signed_client:
        responses = [signed_client.post("/echo", json={"same": "body"}) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert {r.json()["hotkey"] for r in responses} == {keys.bob.ss58_address}


def test_async_client_signs_too(base_url: str, keys: Keys) -> None:
    async def post() -> httpx.Response:
        async with httpx.AsyncClient(base_url=base_url, auth=EpistulaAuth(keys.alice)) as signed_client:
            return await signed_client.post("/echo", json={"async": True})

    response = asyncio.run(post())
    assert response.status_code == 200, response.text
    assert response.json()["hotkey"] == keys.alice.ss58_address


def test_request_signed_for_the_receiver_is_accepted(base_url: str, keys: Keys) -> None:
    auth = EpistulaAuth(keys.alice, signed_for=keys.receiver.ss58_address)
    with httpx.Client(base_url=base_url, auth=auth) as signed_client:
        response = signed_client.post("/for-receiver", json={"for": "receiver"})
    assert response.status_code == 200, response.text


def test_body_exactly_at_limit_is_accepted(client: httpx.Client, keys: Keys) -> None:
    body = json_body(pad="")
    body = json_body(pad="x" * (MAX_BODY - len(body)))
    assert len(body) == MAX_BODY
    response = client.post("/echo", content=body, headers=sign_request(keys.alice, body))
    assert response.status_code == 200, response.text


# --- rejected requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadRequest:
    """How to spoil a request (returns headers and body to send) and what the 401 should say."""

    make: Callable[[Keys], tuple[dict[str, str], bytes]]
    reason: str
    path: str = "/echo"


def _signed(keypair: Keypair, **overrides: str) -> tuple[dict[str, str], bytes]:
    body = json_body(step=7)
    return {**sign_request(keypair, body), **overrides}, body


def _tampered_body(k: Keys) -> tuple[dict[str, str], bytes]:
    return sign_request(k.alice, json_body(amount=1)), json_body(amount=1000)


def _wrong_key(k: Keys) -> tuple[dict[str, str], bytes]:
    return _signed(k.alice, **{HEADER_SIGNED_BY: k.bob.ss58_address})


def _at_time(timestamp_ms: Callable[[], int]) -> Callable[[Keys], tuple[dict[str, str], bytes]]:
    # The timestamp is taken when the request is made, not at collection, which may be long before.
    def make(k: Keys) -> tuple[dict[str, str], bytes]:
        body = json_body(step=8)
        return sign_request(k.alice, body, now_ms=timestamp_ms()), body

    return make


def _without(header: str) -> Callable[[Keys], tuple[dict[str, str], bytes]]:
    def make(k: Keys) -> tuple[dict[str, str], bytes]:
        headers, body = _signed(k.alice)
        del headers[header]
        return headers, body

    return make


def _with(header: str, value: str) -> Callable[[Keys], tuple[dict[str, str], bytes]]:
    return lambda k: _signed(k.alice, **{header: value})


def _other_ss58_prefix(k: Keys) -> tuple[dict[str, str], bytes]:
    # Same public key, Polkadot prefix: the signature is valid but the address is an alias.
    alias = Keypair(public_key=k.alice.public_key, ss58_format=0).ss58_address
    return _signed(k.alice, **{HEADER_SIGNED_BY: alias})


def _signed_for(receiver: Callable[[Keys], str]) -> Callable[[Keys], tuple[dict[str, str], bytes]]:
    def make(k: Keys) -> tuple[dict[str, str], bytes]:
        body = json_body(step=9)
        return sign_request(k.alice, body, signed_for=receiver(k)), body

    return make


BAD_REQUESTS: dict[str, BadRequest] = {
    "tampered-body": BadRequest(_tampered_body, "signature does not match"),
    "wrong-key": BadRequest(_wrong_key, "signature does not match"),
    "stale": BadRequest(_at_time(lambda: now_ms() - WINDOW_MS - 1_000), "stale request"),
    "future": BadRequest(_at_time(lambda: now_ms() + WINDOW_MS + 1_000), "in the future"),
    "seconds": BadRequest(_at_time(lambda: now_ms() // 1000), "looks like seconds"),
    "non-integer-timestamp": BadRequest(_with(HEADER_TIMESTAMP, "1.7e12"), "integer number of milliseconds"),
    "bad-version": BadRequest(_with(HEADER_VERSION, "1"), "unsupported Epistula-Version"),
    "bad-uuid": BadRequest(_with(HEADER_UUID, "not-a-uuid"), "not a UUID"),
    "invalid-ss58": BadRequest(_with(HEADER_SIGNED_BY, "bad"), "not a valid ss58 address"),
    "ss58-alias": BadRequest(_other_ss58_prefix, "must use ss58 prefix 42"),
    "signature-not-hex": BadRequest(_with(HEADER_SIGNATURE, "0x" + "zz" * 64), "hex digits"),
    "signature-no-0x": BadRequest(_with(HEADER_SIGNATURE, "ab" * 64), "hex digits"),
    "signature-too-short": BadRequest(_with(HEADER_SIGNATURE, "0x" + "ab" * 63), "hex digits"),
    "signed-for-someone-else": BadRequest(
        _signed_for(lambda k: k.bob.ss58_address), "Epistula-Signed-For", path="/for-receiver"
    ),
    "signed-for-nobody": BadRequest(_signed_for(lambda k: ""), "Epistula-Signed-For", path="/for-receiver"),
    **{
        f"missing-{header}": BadRequest(_without(header), f"missing header {header}")
        for header in REQUIRED_HEADERS
    },
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_is_unauthorized_with_reason(client: httpx.Client, keys: Keys, case: BadRequest) -> None:
    headers, body = case.make(keys)
    assert_unauthorized(client.post(case.path, content=body, headers=headers), case.reason)


def test_replayed_request_is_refused(client: httpx.Client, keys: Keys) -> None:
    body = json_body(step=10)
    headers = sign_request(keys.alice, body)
    assert client.post("/echo", content=body, headers=headers).status_code == 200
    assert_unauthorized(client.post("/echo", content=body, headers=headers), "replayed request")


def test_header_names_are_case_insensitive(client: httpx.Client, keys: Keys) -> None:
    body = json_body(step=11)
    headers = {name.lower(): value for name, value in sign_request(keys.alice, body).items()}
    assert client.post("/echo", content=body, headers=headers).status_code == 200


def test_bad_signature_does_not_burn_the_uuid(client: httpx.Client, keys: Keys) -> None:
    request_uuid = str(uuid.uuid4())
    body = json_body(step=12)
    forged = sign_request(keys.bob, body, uuid=request_uuid)
    forged[HEADER_SIGNED_BY] = keys.alice.ss58_address
    assert_unauthorized(client.post("/echo", content=body, headers=forged), "signature does not match")

    genuine = sign_request(keys.alice, body, uuid=request_uuid)
    assert client.post("/echo", content=body, headers=genuine).status_code == 200
    assert_unauthorized(client.post("/echo", content=body, headers=genuine), "replayed request")


def test_same_uuid_from_two_signers_does_not_collide(client: httpx.Client, keys: Keys) -> None:
    # Keying the cache by signer means one hotkey cannot pre-empt another's uuid.
    request_uuid = str(uuid.uuid4())
    body = json_body(step=13)
    for keypair in (keys.alice, keys.bob):
        headers = sign_request(keypair, body, uuid=request_uuid)
        assert client.post("/echo", content=body, headers=headers).status_code == 200


def _oversized_body() -> bytes:
    return json_body(pad="x" * MAX_BODY)


def test_oversized_body_with_content_length_is_413(client: httpx.Client, keys: Keys) -> None:
    body = _oversized_body()
    response = client.post("/echo", content=body, headers=sign_request(keys.alice, body))
    assert response.status_code == 413, response.text
    assert str(MAX_BODY) in response.json()["detail"]


def test_oversized_chunked_body_is_413(client: httpx.Client, keys: Keys) -> None:
    body = _oversized_body()
    chunks = [body[i : i + 1_000] for i in range(0, len(body), 1_000)]
    request = client.build_request(
        "POST", "/echo", content=iter(chunks), headers=sign_request(keys.alice, body)
    )
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    response = client.send(request)
    assert response.status_code == 413, response.text


def test_full_replay_cache_is_503_with_retry_after(client: httpx.Client, keys: Keys) -> None:
    # /small-cache remembers 2 requests; a third within the window must wait rather than evict.
    statuses = []
    for step in range(3):
        body = json_body(step=step)
        response = client.post("/small-cache", content=body, headers=sign_request(keys.alice, body))
        statuses.append(response.status_code)
    assert statuses == [200, 200, 503]
    assert 1 <= int(response.headers["retry-after"]) <= WINDOW_MS // 1000 + 1
    assert "retry later" in response.json()["detail"]


# --- verifier, without HTTP ------------------------------------------------------------------------------


class FakeClock:
    """A settable stand-in for time.time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self) -> float:
        return self.seconds


def test_freshness_window_is_inclusive_both_ways(keys: Keys) -> None:
    clock = FakeClock(1_700_000_000.0)
    verifier = EpistulaVerifier(SETTINGS, clock=clock)
    start_ms = 1_700_000_000_000
    body = b"{}"
    for offset in (-WINDOW_MS, WINDOW_MS):
        verifier.verify(sign_request(keys.alice, body, now_ms=start_ms + offset), body)
    for offset, reason in ((-WINDOW_MS - 1, "stale"), (WINDOW_MS + 1, "future")):
        with pytest.raises(AuthError) as error:
            verifier.verify(sign_request(keys.alice, body, now_ms=start_ms + offset), body)
        assert error.value.status_code == 401
        assert reason in error.value.reason


def test_replay_is_refused_until_the_request_is_stale(keys: Keys) -> None:
    clock = FakeClock(1_700_000_000.0)
    verifier = EpistulaVerifier(SETTINGS, clock=clock)
    body = b"{}"
    headers = sign_request(keys.alice, body, now_ms=1_700_000_000_000)
    verifier.verify(headers, body)
    for seconds_later in (0.0, 1.0, WINDOW_MS / 1000):
        clock.seconds = 1_700_000_000.0 + seconds_later
        with pytest.raises(AuthError, match="replayed request"):
            verifier.verify(headers, body)
    clock.seconds += 0.001
    with pytest.raises(AuthError, match="stale request"):
        verifier.verify(headers, body)


def test_verify_refuses_oversized_body(keys: Keys) -> None:
    body = b"x" * (MAX_BODY + 1)
    with pytest.raises(AuthError) as error:
        EpistulaVerifier(SETTINGS).verify(sign_request(keys.alice, body), body)
    assert error.value.status_code == 413


def test_verified_request_fields(keys: Keys) -> None:
    body = json_body(hello="world")
    headers = sign_request(keys.alice, body, signed_for=keys.receiver.ss58_address)
    verified = EpistulaVerifier(SETTINGS, expected_receiver=keys.receiver.ss58_address).verify(headers, body)
    assert verified.hotkey == keys.alice.ss58_address
    assert verified.uuid == headers[HEADER_UUID]
    assert verified.timestamp_ms == int(headers[HEADER_TIMESTAMP])
    assert verified.signed_for == keys.receiver.ss58_address
    assert verified.json() == {"hello": "world"}


# --- replay cache ----------------------------------------------------------------------------------------


def test_cache_rejects_a_key_it_holds() -> None:
    cache = ReplayCache(max_entries=10)
    assert cache.add("a", expires_at_ms=100, now_ms=0)
    assert not cache.add("a", expires_at_ms=100, now_ms=50)
    assert cache.add("b", expires_at_ms=100, now_ms=50)


def test_expiry_frees_entries() -> None:
    cache = ReplayCache(max_entries=1)
    assert cache.add("a", expires_at_ms=100, now_ms=0)
    with pytest.raises(ReplayCacheFull) as full:
        cache.add("b", expires_at_ms=200, now_ms=40)
    assert full.value.retry_after_ms == 60
    assert cache.add("b", expires_at_ms=200, now_ms=100)
    assert len(cache) == 1


def test_full_cache_refuses_and_never_evicts_unexpired_entries() -> None:
    cache = ReplayCache(max_entries=2)
    assert cache.add("a", expires_at_ms=1_000, now_ms=0)
    assert cache.add("b", expires_at_ms=1_000, now_ms=0)
    with pytest.raises(ReplayCacheFull):
        cache.add("c", expires_at_ms=1_000, now_ms=10)
    assert not cache.add("a", expires_at_ms=1_000, now_ms=10)
    assert not cache.add("b", expires_at_ms=1_000, now_ms=10)
    assert len(cache) == 2


def test_entries_are_never_forgotten_before_their_expiry() -> None:
    # b arrives after a but expires first; it is kept at least until its own expiry (here, until a's).
    cache = ReplayCache(max_entries=10)
    assert cache.add("a", expires_at_ms=300, now_ms=0)
    assert cache.add("b", expires_at_ms=100, now_ms=0)
    assert not cache.add("b", expires_at_ms=100, now_ms=99)
    assert cache.add("c", expires_at_ms=400, now_ms=300)
    assert len(cache) == 1


def test_clock_stepping_back_does_not_reopen_replays() -> None:
    cache = ReplayCache(max_entries=10)
    assert cache.add("a", expires_at_ms=100, now_ms=0)
    assert cache.add("x", expires_at_ms=300, now_ms=200)  # purges a
    assert not cache.add("a", expires_at_ms=100, now_ms=50)  # the clock went back; a is still refused


def test_cache_is_thread_safe() -> None:
    keys = [str(uuid.uuid4()) for _ in range(2_000)]
    threads_count = 8
    barrier = threading.Barrier(threads_count)
    cache = ReplayCache(max_entries=len(keys))
    accepted: list[list[str]] = [[] for _ in range(threads_count)]

    def worker(index: int) -> None:
        order = keys[:]
        random.Random(index).shuffle(order)
        barrier.wait()
        for key in order:
            if cache.add(key, expires_at_ms=10_000, now_ms=0):
                accepted[index].append(key)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    all_accepted = [key for per_thread in accepted for key in per_thread]
    assert sorted(all_accepted) == sorted(keys)
    assert len(cache) == len(keys)


def test_admit_hook_refuses_unregistered_hotkeys_before_the_replay_cache(keys: Keys, tmp_path: Any) -> None:
    from common.chain import LocalChain

    chain = LocalChain(tmp_path / "chain.json", netuid=9, block_time_s=12.0)
    chain.register(keys.alice.ss58_address)
    cache = ReplayCache(1_000)
    verifier = EpistulaVerifier(SETTINGS, replay_cache=cache, admit=chain.is_registered)
    app = FastAPI()
    signed = Depends(signed_request_dependency(verifier))

    @app.post("/registered-only")
    def registered_only(request: VerifiedRequest = signed) -> dict[str, str]:
        return {"hotkey": request.hotkey}

    with serve_app(app) as base_url:
        with httpx.Client(base_url=base_url, auth=EpistulaAuth(keys.alice)) as alice:
            ok = alice.post("/registered-only", json={"x": 1})
        with httpx.Client(base_url=base_url, auth=EpistulaAuth(keys.bob)) as bob:
            refused = bob.post("/registered-only", json={"x": 1})
    assert ok.status_code == 200 and ok.json() == {"hotkey": keys.alice.ss58_address}
    assert refused.status_code == 403
    assert "registered" in refused.json()["detail"]
    assert len(cache) == 1  # only alice's request took a slot


def test_a_client_that_hangs_up_mid_body_gets_a_quiet_400_not_a_server_error() -> None:
    """A caller that disconnects while sending (a timeout, a restart) is not a server error: the dependency
    answers 400 instead of letting starlette log a traceback as an unhandled exception."""
    from fastapi import HTTPException
    from starlette.requests import Request

    async def hang_up() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
    dependency = signed_request_dependency(EpistulaVerifier(SETTINGS))
    with pytest.raises(HTTPException) as raised:
        asyncio.run(dependency(Request(scope, hang_up)))
    assert raised.value.status_code == 400 and "disconnected" in str(raised.value.detail)
