"""The signed HTTP client that miners and validators use to talk to the orchestrator: `call(ENDPOINT, body)`
with an endpoint of `common.protocol.endpoints` answers that endpoint's response model.

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
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar, cast, overload

import httpx
from bittensor.sp_core import Keypair
from pydantic import BaseModel, ValidationError
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential, wait_random

from common.auth import CLOCK_SKEW, EpistulaAuth
from common.protocol import HEADER_PROTOCOL, PROTOCOL_VERSION, Endpoint
from common.protocol.endpoints import JSON
from common.stopping import pause

log = logging.getLogger("iota.client")

Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp")

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

    @overload
    def call(self, endpoint: Endpoint[None, Resp], *, params: Mapping[str, Any] | None = None) -> Resp: ...

    @overload
    def call(self, endpoint: Endpoint[Req, Resp], body: Req, *, extra_timeout_s: float = 0.0) -> Resp: ...

    def call(
        self,
        endpoint: Endpoint[Any, Resp],
        body: BaseModel | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        extra_timeout_s: float = 0.0,
    ) -> Resp:
        """Call `endpoint` (`common.protocol.endpoints`) and parse its answer as the endpoint's response.

        A signed endpoint takes its request model as `body`, signed afresh on every try; `extra_timeout_s`
        lengthens the read timeout for a long poll. A public read takes its query string as `params`.
        """
        if endpoint.request is None:
            if body is not None:
                raise TypeError(f"{endpoint} takes no body")
            resp = self._send(endpoint.method, endpoint.path, params=params)
        else:
            if not isinstance(body, endpoint.request):
                raise TypeError(f"{endpoint} takes a {endpoint.request.__name__}, not {type(body).__name__}")
            timeout = self._http.timeout.read + extra_timeout_s if self._http.timeout.read else None
            content = body.model_dump_json().encode()
            resp = self._send(endpoint.method, endpoint.path, content=content, timeout=timeout)
        if endpoint.media_type != JSON:  # the Prometheus text, the dashboard's page
            return cast(Resp, resp.text)
        try:
            return endpoint.answer.validate_json(resp.content)
        except ValidationError as error:
            raise ApiError(resp.status_code, "bad_response", f"{endpoint.path}: {error}") from None

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
