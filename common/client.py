"""The signed HTTP client that miners and validators use to talk to the orchestrator.

Transient failures (connection refused while the orchestrator restarts, timeouts, 5xx, 429, 503) are
retried with jittered exponential backoff, until the client's stop event is set: then a request gets no
further try and raises `Stopping` (`common.stopping`), so a daemon told to stop does not sit out the retry
budget against an orchestrator that is gone. A 409 about the run or the session raises `Resync`: the caller
registers again rather than exiting. A 401 `clock_skew` raises `ClockSkew`, which says how far this
machine's clock is off. Any other 4xx raises `ApiError` with the orchestrator's reason.
"""

from __future__ import annotations

import logging
import threading
import time
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
from bittensor.sp_core import Keypair
from pydantic import BaseModel, TypeAdapter, ValidationError
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential, wait_random

from common.auth import CLOCK_SKEW, EpistulaAuth
from common.protocol import HEADER_PROTOCOL, PROTOCOL_VERSION
from common.stopping import pause

log = logging.getLogger("iota.client")

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

RESYNC_CODES = frozenset({"run_mismatch", "stale_session", "not_registered"})


class ApiError(Exception):
    """The orchestrator refused a request; `code` is stable, `detail` is for humans."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"HTTP {status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


class Resync(ApiError):
    """The orchestrator's run or our session changed: register again and carry on."""


class ClockSkew(ApiError):
    """The orchestrator refused the request's timestamp: this machine's clock is off. `offset_s` is this
    clock minus the orchestrator's, estimated to about a second from the answer's `Date` header (None when
    it has none); the signature's timestamp comes from the same clock."""

    def __init__(self, status: int, code: str, detail: str, offset_s: float | None) -> None:
        super().__init__(status, code, detail)
        self.offset_s = offset_s


class Unavailable(Exception):
    """The orchestrator could not be reached (or kept failing) for the whole retry budget."""


class _Transient(Exception):
    pass


class OrchestratorClient:
    def __init__(
        self,
        base_url: str,
        keypair: Keypair,
        *,
        timeout_s: float = 30.0,
        retry_for_s: float = 120.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.retry_for_s = retry_for_s
        # Once set, no request is retried. The first try of a request still goes out, so that a stopping
        # miner can report the item it finished or gives up (the orchestrator then requeues it at once).
        self.stop = stop or threading.Event()
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            auth=EpistulaAuth(keypair),
            timeout=timeout_s,
            headers={HEADER_PROTOCOL: str(PROTOCOL_VERSION), "content-type": "application/json"},
        )

    def close(self) -> None:
        self._http.close()

    def post(self, path: str, body: BaseModel, response: type[M], *, extra_timeout_s: float = 0.0) -> M:
        """POST `body` (signed afresh on every try) and parse the answer as `response`."""
        content = body.model_dump_json().encode()
        timeout = self._http.timeout.read + extra_timeout_s if self._http.timeout.read else None
        resp = self._send("POST", path, content=content, timeout=timeout)
        try:
            return response.model_validate_json(resp.content)
        except ValidationError as error:
            raise ApiError(resp.status_code, "bad_response", f"{path}: {error}") from None

    def get(self, path: str, response: TypeAdapter[T], params: dict[str, Any] | None = None) -> T:
        """GET a public, read-only route and parse the answer with `response`."""
        resp = self._send("GET", path, params=params)
        try:
            return response.validate_json(resp.content)
        except ValidationError as error:
            raise ApiError(resp.status_code, "bad_response", f"{path}: {error}") from None

    def _send(self, method: str, path: str, **request: Any) -> httpx.Response:
        def attempt() -> httpx.Response:
            try:
                resp = self._http.request(method, path, **request)
            except (httpx.TransportError, httpx.TimeoutException) as error:
                log.debug("%s %s: %s; retrying", method, path, error)
                raise _Transient(str(error)) from error
            if resp.status_code >= 500 or resp.status_code in (426, 429):
                # 426: this client is older or newer than the orchestrator; keep trying while an operator
                # upgrades one side, instead of exiting.
                log.warning("%s %s: HTTP %d %s; retrying", method, path, resp.status_code, resp.text[:200])
                raise _Transient(resp.text[:200])
            return resp

        retrying = Retrying(
            stop=stop_after_delay(self.retry_for_s),
            wait=wait_exponential(multiplier=0.1, max=2.0) + wait_random(0, 0.1),
            retry=retry_if_exception_type(_Transient),
            sleep=pause(self.stop, f"{method} {path}"),
            reraise=True,
        )
        try:
            resp = retrying(attempt)
        except _Transient as error:
            waited = f"no success within {self.retry_for_s:.0f} s"
            raise Unavailable(f"{method} {path}: {waited}: {error}") from None
        if resp.status_code >= 400:
            raise _api_error(resp)
        return resp


def _api_error(resp: httpx.Response) -> ApiError:
    try:
        payload = resp.json()
        code, detail = str(payload.get("code", "")), str(payload.get("detail", resp.text[:300]))
    except ValueError:
        code, detail = "", resp.text[:300]
    if code == CLOCK_SKEW:
        return ClockSkew(resp.status_code, code, detail, _clock_offset_s(resp))
    cls = Resync if resp.status_code == 409 and code in RESYNC_CODES else ApiError
    return cls(resp.status_code, code or f"http_{resp.status_code}", detail)


def _clock_offset_s(resp: httpx.Response) -> float | None:
    """This machine's clock minus the server's, from the answer's `Date` header (whole seconds, so the
    server's time lies within the second it names: its middle is the best guess)."""
    try:
        server_s = parsedate_to_datetime(resp.headers["date"]).timestamp() + 0.5
    except (KeyError, TypeError, ValueError):
        return None
    return time.time_ns() / 1e9 - server_s
