"""Epistula v2: signing and verifying HTTP requests with a bittensor sr25519 hotkey.

Every request between the orchestrator, miners and validators carries these headers:

    Epistula-Version: 2
    Epistula-Timestamp: <int, ms since the epoch>
    Epistula-Uuid: <uuid4>
    Epistula-Signed-By: <sender's ss58 hotkey>
    Epistula-Request-Signature: 0x<hex of the 64-byte sr25519 signature>
    Epistula-Signed-For: <receiver's ss58 hotkey, optional, may be empty>

and the signature covers the UTF-8 message f"{sha256(body).hexdigest()}.{uuid}.{timestamp}.{signed_for}".
All parameters travel in the signed JSON body, never in unsigned query strings, so the body is all the
verifier needs to cover.

This module is about signatures (and a per-hotkey rate limit): whether a hotkey is registered or holds a
permit is for the caller.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
import uuid as uuid_lib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from bittensor.sp_core import Keypair, verify
from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect

from common.config import AuthSettings
from common.keys import check_ss58

VERSION = "2"
HEADER_VERSION = "Epistula-Version"
HEADER_TIMESTAMP = "Epistula-Timestamp"
HEADER_UUID = "Epistula-Uuid"
HEADER_SIGNED_BY = "Epistula-Signed-By"
HEADER_SIGNATURE = "Epistula-Request-Signature"
HEADER_SIGNED_FOR = "Epistula-Signed-For"
REQUIRED_HEADERS = (HEADER_VERSION, HEADER_TIMESTAMP, HEADER_UUID, HEADER_SIGNED_BY, HEADER_SIGNATURE)

SIGNATURE_BYTES = 64

_TIMESTAMP_RE = re.compile(r"[0-9]{1,20}")
_SIGNATURE_RE = re.compile(rf"0x[0-9a-fA-F]{{{2 * SIGNATURE_BYTES}}}")
# A timestamp this close to now once multiplied by 1000 was almost certainly sent in seconds.
_SECONDS_TOLERANCE_MS = 24 * 3600 * 1000


# The error code of a timestamp outside the freshness window: the sender's clock is off (or the request sat
# in a queue for longer than the window), which the sender can fix and then retry, unlike a bad signature.
CLOCK_SKEW = "clock_skew"


class AuthError(Exception):
    """A request that failed verification; `reason` is safe and useful to show the sender, `code` (if set)
    is a stable name for programs that is more specific than the status."""

    def __init__(
        self, status_code: int, reason: str, *, retry_after_s: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.code = code


def _unauthorized(reason: str) -> AuthError:
    return AuthError(401, reason)


def _too_large(limit: int) -> AuthError:
    return AuthError(413, f"request body larger than {limit} bytes")


@dataclass(frozen=True, slots=True)
class VerifiedRequest:
    """A request whose body was signed by `hotkey` within the freshness window and not seen before."""

    hotkey: str
    uuid: str
    timestamp_ms: int
    signed_for: str
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON (raises ValueError if it is not)."""
        return json.loads(self.body)


# --- signing ---------------------------------------------------------------------------------------------


def signing_message(body: bytes, uuid: str, timestamp: str, signed_for: str) -> bytes:
    """The exact bytes an Epistula v2 signature covers."""
    return f"{hashlib.sha256(body).hexdigest()}.{uuid}.{timestamp}.{signed_for}".encode()


def sign_request(
    keypair: Keypair,
    body: bytes,
    *,
    signed_for: str = "",
    now_ms: int | None = None,
    uuid: str | None = None,
) -> dict[str, str]:
    """Epistula v2 headers that sign `body` with `keypair`; a fresh uuid and the current time by default."""
    timestamp = str(time.time_ns() // 1_000_000 if now_ms is None else now_ms)
    request_uuid = str(uuid_lib.uuid4()) if uuid is None else uuid
    signature = bytes(keypair.sign(signing_message(body, request_uuid, timestamp, signed_for)))
    headers = {
        HEADER_VERSION: VERSION,
        HEADER_TIMESTAMP: timestamp,
        HEADER_UUID: request_uuid,
        HEADER_SIGNED_BY: keypair.ss58_address,
        HEADER_SIGNATURE: "0x" + signature.hex(),
    }
    if signed_for:
        headers[HEADER_SIGNED_FOR] = signed_for
    return headers


class EpistulaAuth(httpx.Auth):
    """httpx auth that signs each request's body; works with both `httpx.Client` and `httpx.AsyncClient`.

    Every send, a retried call included, gets a fresh uuid and timestamp: the receiver refuses repeats.
    """

    requires_request_body = True

    def __init__(self, keypair: Keypair, *, signed_for: str = "") -> None:
        self._keypair = keypair
        self._signed_for = signed_for

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.update(sign_request(self._keypair, request.content, signed_for=self._signed_for))
        yield request


# --- replay protection -----------------------------------------------------------------------------------


class ReplayCacheFull(Exception):
    """The cache holds its maximum of unexpired entries; nothing can be admitted until one expires."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"replay cache full; an entry expires in {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


class ReplayCache:
    """Thread-safe set of recently accepted request keys, each remembered until it can no longer be fresh.

    Entries sit in insertion order. Their expiries are made non-decreasing in that order (an entry's expiry
    is raised to its predecessor's), so purging pops from the front only: amortised O(1) per insert.
    Raising an expiry only keeps a key longer, never shorter, and since a fresh request's expiry is at most
    now + 2 * window, every entry still leaves within 2 * window of its insertion: memory stays bounded by
    request rate x 2 * window, the same bound exact expiries would give.

    When `max_entries` unexpired keys are held, new keys are refused (`ReplayCacheFull`) rather than
    evicting one: forgetting an unexpired key would let its request be replayed.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._entries: OrderedDict[str, int] = OrderedDict()
        self._last_expiry_ms = 0
        # Highest `now` used to purge. A key expiring at or before it may have been purged already, so it
        # can no longer be told apart from a replay; this keeps replays out even if the clock steps back.
        self._horizon_ms = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(self, key: str, *, expires_at_ms: int, now_ms: int) -> bool:
        """Remember `key` until `expires_at_ms` (the first instant its request is stale).

        Returns True if the key is new, False if it was seen (or is too old to tell). Raises
        `ReplayCacheFull` if the key is new but the cache is full of unexpired keys.
        """
        with self._lock:
            self._purge(now_ms)
            if key in self._entries or expires_at_ms <= self._horizon_ms:
                return False
            if len(self._entries) >= self._max_entries:
                oldest_expiry_ms = next(iter(self._entries.values()))
                raise ReplayCacheFull(retry_after_ms=oldest_expiry_ms - self._horizon_ms)
            self._last_expiry_ms = max(expires_at_ms, self._last_expiry_ms)
            self._entries[key] = self._last_expiry_ms
            return True

    def _purge(self, now_ms: int) -> None:
        self._horizon_ms = max(self._horizon_ms, now_ms)
        entries = self._entries
        while entries and next(iter(entries.values())) <= self._horizon_ms:
            entries.popitem(last=False)


# --- rate limiting ---------------------------------------------------------------------------------------


class RateLimiter:
    """Per-key token buckets: each key may make `burst` requests at once and `rate_per_s` on average.

    A key's bucket starts full and refills continuously; a request takes one token. `wait_s` and `take` return
    0.0 when a token is (or was) available, else the seconds until one will be. Thread-safe. Memory: one
    entry per key seen; once more than `max_keys` are held, the full (idle) ones are dropped, which forgets
    nothing, since a missing bucket is a full one.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be positive and burst at least 1")
        self.rate_per_s, self.burst = rate_per_s, burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when they were counted)
        self._lock = threading.Lock()

    def wait_s(self, key: str) -> float:
        """Seconds until `key` may make a request (0.0: now), taking nothing."""
        with self._lock:
            return self._shortfall_s(self._tokens(key, self._clock()))

    def take(self, key: str) -> float:
        """Take a token for `key`: 0.0 if there was one, else the seconds until there will be one."""
        with self._lock:
            now = self._clock()
            tokens = self._tokens(key, now)
            if tokens < 1.0:
                return self._shortfall_s(tokens)
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self._max_keys:
                self._drop_full(now)
            return 0.0

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        # max(0, ...): a clock that steps back must not drain a bucket.
        return min(float(self.burst), tokens + max(0.0, now - at) * self.rate_per_s)

    def _shortfall_s(self, tokens: float) -> float:
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate_per_s

    def _drop_full(self, now: float) -> None:
        for key in [k for k in self._buckets if self._tokens(k, now) >= self.burst]:
            del self._buckets[key]


# --- verification ----------------------------------------------------------------------------------------


class EpistulaVerifier:
    """Checks Epistula v2 headers against a body; cheap checks first, the replay cache last.

    `clock` returns seconds since the epoch (like `time.time`). With `expected_receiver` set, requests must
    be signed for that ss58 address, so a request meant for another receiver cannot be replayed here.
    Verifiers that guard the same endpoints should share one `replay_cache`. `admit(hotkey)`, if given,
    runs after the signature and before the replay cache: a hotkey it refuses (say, one not registered on
    the subnet) gets 403 and never takes a cache slot, so unregistered keys cannot fill the cache.

    `rate_limiter` (by default one from `settings.rate_per_s` and `rate_burst`; none if the rate is 0) is
    keyed on the verified hotkey. A hotkey out of tokens gets 429 before the replay cache (its flood takes no
    cache slot); a token is taken only after the cache accepted the request, so neither a forged request
    nor a replay of someone's captured request can spend that hotkey's budget.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        clock: Callable[[], float] = time.time,
        expected_receiver: str | None = None,
        replay_cache: ReplayCache | None = None,
        admit: Callable[[str], bool] | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.settings = settings
        self._admit = admit
        self._clock = clock
        self._expected_receiver = expected_receiver
        # `is None`, not `or`: an empty cache has len 0 and is falsy.
        self.replay_cache = ReplayCache(settings.replay_cache_size) if replay_cache is None else replay_cache
        if rate_limiter is None and settings.rate_per_s > 0:
            rate_limiter = RateLimiter(settings.rate_per_s, settings.rate_burst)
        self.rate_limiter = rate_limiter

    @property
    def max_body_bytes(self) -> int:
        return self.settings.max_body_bytes

    def verify(self, headers: Mapping[str, str], body: bytes) -> VerifiedRequest:
        """The verified request, or `AuthError` saying what is wrong with it."""
        if len(body) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        lowered = {name.lower(): value for name, value in headers.items()}
        version, timestamp, request_uuid, signed_by, signature = (
            _required(lowered, name) for name in REQUIRED_HEADERS
        )
        signed_for = lowered.get(HEADER_SIGNED_FOR.lower(), "")
        if version != VERSION:
            raise _unauthorized(f"unsupported {HEADER_VERSION} {version!r}; expected {VERSION!r}")
        now_ms = int(self._clock() * 1000)
        timestamp_ms = self._check_timestamp(timestamp, now_ms)
        canonical_uuid = _parse_uuid(request_uuid)
        _check_ss58(signed_by)
        signature_bytes = _parse_signature(signature)
        if self._expected_receiver is not None and signed_for != self._expected_receiver:
            raise _unauthorized(
                f"{HEADER_SIGNED_FOR} is {signed_for!r}; this receiver is {self._expected_receiver!r}"
            )
        message = signing_message(body, request_uuid, timestamp, signed_for)
        if not verify(message, signature_bytes, signed_by):
            raise _unauthorized(f"signature does not match the body and headers for {signed_by}")
        if self._admit is not None and not self._admit(signed_by):
            raise AuthError(403, f"hotkey {signed_by} is not allowed here (is it registered on the subnet?)")
        self._check_rate(signed_by, take=False)
        # Only a verified request reaches the cache, so forged requests cannot burn anyone's uuids.
        self._remember(f"{signed_by}:{canonical_uuid}", timestamp_ms, now_ms)
        self._check_rate(signed_by, take=True)
        return VerifiedRequest(
            hotkey=signed_by,
            uuid=canonical_uuid,
            timestamp_ms=timestamp_ms,
            signed_for=signed_for,
            body=body,
        )

    def _check_timestamp(self, timestamp: str, now_ms: int) -> int:
        if not _TIMESTAMP_RE.fullmatch(timestamp):
            raise _unauthorized(f"{HEADER_TIMESTAMP} must be an integer number of milliseconds")
        timestamp_ms = int(timestamp)
        window_ms = self.settings.freshness_window_ms
        age_ms = now_ms - timestamp_ms
        if abs(age_ms) <= window_ms:
            return timestamp_ms
        if abs(timestamp_ms * 1000 - now_ms) <= _SECONDS_TOLERANCE_MS:
            raise _unauthorized(f"{HEADER_TIMESTAMP} looks like seconds; Epistula v2 uses milliseconds")
        if age_ms > 0:
            reason = f"stale request: timestamp is {age_ms} ms old, window is {window_ms} ms"
        else:
            reason = f"timestamp is {-age_ms} ms in the future, window is {window_ms} ms"
        raise AuthError(401, f"{reason}; check the sender's clock", code=CLOCK_SKEW)

    def _check_rate(self, hotkey: str, *, take: bool) -> None:
        limiter = self.rate_limiter
        if limiter is None:
            return
        wait_s = limiter.take(hotkey) if take else limiter.wait_s(hotkey)
        if wait_s > 0:
            raise AuthError(
                429,
                f"too many requests from {hotkey}: at most {limiter.rate_per_s:g} a second on average, "
                f"{limiter.burst} at once; retry in {wait_s:.2f} s",
                retry_after_s=max(1, math.ceil(wait_s)),
            )

    def _remember(self, key: str, timestamp_ms: int, now_ms: int) -> None:
        # +1: a timestamp exactly `window` old is still fresh, so it expires the millisecond after.
        expires_at_ms = timestamp_ms + self.settings.freshness_window_ms + 1
        try:
            is_new = self.replay_cache.add(key, expires_at_ms=expires_at_ms, now_ms=now_ms)
        except ReplayCacheFull as full:
            # The whole server is over capacity, not this sender: 503 and a hint when to come back.
            raise AuthError(
                503,
                "server is receiving more requests than it can protect against replay; retry later",
                retry_after_s=max(1, math.ceil(full.retry_after_ms / 1000)),
            ) from None
        if not is_new:
            raise _unauthorized("replayed request: this uuid was already used")


def _required(lowered: Mapping[str, str], name: str) -> str:
    value = lowered.get(name.lower())
    if value is None:
        raise _unauthorized(f"missing header {name}")
    return value


def _parse_uuid(value: str) -> str:
    try:
        return str(uuid_lib.UUID(value))
    except ValueError:
        raise _unauthorized(f"{HEADER_UUID} is not a UUID") from None


def _check_ss58(address: str) -> None:
    try:
        check_ss58(address)
    except ValueError as exc:
        raise _unauthorized(f"{HEADER_SIGNED_BY}: {exc}") from None


def _parse_signature(value: str) -> bytes:
    if not _SIGNATURE_RE.fullmatch(value):
        raise _unauthorized(f"{HEADER_SIGNATURE} must be 0x followed by {2 * SIGNATURE_BYTES} hex digits")
    return bytes.fromhex(value[2:])


# --- FastAPI integration ---------------------------------------------------------------------------------


def signed_request_dependency(verifier: EpistulaVerifier) -> Callable[[Request], Awaitable[VerifiedRequest]]:
    """A FastAPI dependency that reads the body (at most `max_body_bytes`) and verifies it.

    Use it as `Depends(signed_request_dependency(verifier))` and parse `VerifiedRequest.body` in the route.
    Do not also declare a body parameter: FastAPI would read the body before this dependency could limit it.
    """

    async def verified_request(request: Request) -> VerifiedRequest:
        try:
            body = await _read_body(request, verifier.max_body_bytes)
            return verifier.verify(request.headers, body)
        except AuthError as error:
            raise _http_exception(error) from None
        except ClientDisconnect:
            # The caller hung up mid-body (a timeout, a restart): nobody reads the answer, and it is not a
            # server error worth a traceback in the log.
            raise HTTPException(400, "the client disconnected before sending its whole body") from None

    return verified_request


async def _read_body(request: Request, limit: int) -> bytes:
    # Content-Length lets us refuse before reading anything; without it, stop as soon as we pass the limit.
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


class AuthHTTPException(HTTPException):
    """The HTTP answer to an `AuthError`, keeping its `code` for an app that puts codes in its error bodies
    (the orchestrator's); FastAPI's default handler answers it as any HTTPException."""

    def __init__(self, error: AuthError, headers: dict[str, str] | None) -> None:
        super().__init__(status_code=error.status_code, detail=error.reason, headers=headers)
        self.code = error.code


def _http_exception(error: AuthError) -> HTTPException:
    headers: dict[str, str] = {}
    if error.status_code == 401:
        headers["WWW-Authenticate"] = "Epistula"
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    return AuthHTTPException(error, headers or None)
