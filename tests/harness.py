"""The orchestrator over real HTTP, as tests drive it: uvicorn on loopback, requests signed with generated
sr25519 hotkeys, the local chain file deciding who may call, and an embedded S3 server that miners upload
to and download from through the presigned URLs the orchestrator hands out.

tests/conftest.py makes fixtures of it (`keys`, `chain_path`, `start`, `net`); the modules that drive the
orchestrator by hand (test_orchestrator_http, test_security, test_fuzz, test_dashboard, test_metrics)
import the helpers from here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from bittensor.sp_core import Keypair
from pydantic import BaseModel

from common.auth import EpistulaAuth
from common.chain import LocalChain
from common.codec import content_hash, encode_tensor
from common.config import ChainSettings, DataSettings, ModelSettings
from common.keys import generate_keypair
from common.model.stages import boundary_shape
from common.protocol import (
    HEADER_PROTOCOL,
    MINERS_REGISTER,
    PROTOCOL_VERSION,
    STATUS,
    WORK_COMPLETE,
    WORK_NEXT,
    WORK_PRESIGN,
    ArtifactRef,
    CompleteRequest,
    PresignRequest,
    RegisterRequest,
    RegisterResponse,
    RunStatus,
    UploadTarget,
    WorkItem,
    WorkRequest,
    WorkResponse,
)
from common.s3server import EmbeddedS3
from common.storage import upload_to_url
from orchestrator.app import create_app
from orchestrator.server import build_orchestrator
from orchestrator.service import Orchestrator
from orchestrator.settings import OrchestratorSettings
from tests.http_server import serve_app

NETUID = 7
BATCH, SEQ = 2, 32
POLL_WAIT_S = 5.0
N_REGISTERED = 4
PROTOCOL_HEADERS = {HEADER_PROTOCOL: str(PROTOCOL_VERSION), "content-type": "application/json"}
_BUCKETS = itertools.count()


@dataclass(frozen=True)
class Keys:
    registered: list[Keypair]  # on the chain
    stranger: Keypair  # a valid key the chain has never heard of


class Caller:
    """One hotkey's signed HTTP client, and the session it registered (if it did)."""

    def __init__(self, base_url: str, keypair: Keypair) -> None:
        self.keypair = keypair
        self.hotkey = keypair.ss58_address
        self.http = httpx.Client(
            base_url=base_url, auth=EpistulaAuth(keypair), headers=PROTOCOL_HEADERS, timeout=30.0
        )
        self.reg: RegisterResponse | None = None

    def post(self, path: str, body: BaseModel | bytes) -> httpx.Response:
        content = body if isinstance(body, bytes) else body.model_dump_json().encode()
        return self.http.post(path, content=content)

    def register(self, fingerprint: str) -> RegisterResponse:
        resp = self.post(MINERS_REGISTER.path, RegisterRequest(device="cpu", corpus_fingerprint=fingerprint))
        assert resp.status_code == 200, resp.text
        self.reg = RegisterResponse.model_validate_json(resp.content)
        return self.reg

    def session(self) -> dict[str, Any]:
        assert self.reg is not None, "register first"
        return {"run_id": self.reg.run_id, "session": self.reg.session}

    def next(self, wait_s: float = 0.0) -> WorkResponse:
        resp = self.post(WORK_NEXT.path, WorkRequest(**self.session(), wait_s=wait_s))
        assert resp.status_code == 200, resp.text
        return WorkResponse.model_validate_json(resp.content)

    def next_item(self) -> WorkItem:
        item = self.next().item
        assert item is not None, f"{self.hotkey[:8]} expected work, got none"
        return item

    def complete(
        self, item_id: str, output: ArtifactRef | None = None, loss: float | None = None
    ) -> httpx.Response:
        return self.post(
            WORK_COMPLETE.path, CompleteRequest(**self.session(), item_id=item_id, output=output, loss=loss)
        )

    def presign(self, key: str) -> httpx.Response:
        return self.post(WORK_PRESIGN.path, PresignRequest(**self.session(), key=key))


@dataclass
class Net:
    """A served orchestrator, the registered keys and the one that is not."""

    base_url: str
    orch: Orchestrator
    keys: Keys
    callers: ExitStack

    def caller(self, keypair: Keypair) -> Caller:
        caller = Caller(self.base_url, keypair)
        self.callers.callback(caller.http.close)
        return caller

    def pipeline(self) -> tuple[Caller, Caller, Caller]:
        """Three registered miners, at stages 0, 1 and 2 (registration order fills the empty stages)."""
        head, body, tail = (self.caller(k) for k in self.keys.registered[:3])
        for stage, miner in enumerate((head, body, tail)):
            assert miner.register(self.orch.spec.data.fingerprint).stage == stage
        return head, body, tail

    def prefix(self, hotkey: str) -> str:
        return f"runs/{self.orch.run_id}/{hotkey}/"

    def status(self) -> RunStatus:
        resp = httpx.get(f"{self.base_url}{STATUS.path}")
        assert resp.status_code == 200, resp.text
        return RunStatus.model_validate_json(resp.content)


def new_keys() -> Keys:
    return Keys(registered=[generate_keypair() for _ in range(N_REGISTERED)], stranger=generate_keypair())


def new_chain(path: Path, keys: Keys) -> Path:
    """A local chain file at `path` with every one of `keys.registered` on it."""
    chain = LocalChain(path, NETUID)
    for keypair in keys.registered:
        chain.register(keypair.ss58_address)
    return path


def start_orchestrator(
    stack: ExitStack, s3: EmbeddedS3, chain_path: Path, keys: Keys, workdir: Path, **overrides: Any
) -> Net:
    """Serve a fresh orchestrator (its own bucket, its state in `workdir`) with these OrchestratorSettings
    overrides, until `stack` closes."""
    values: dict[str, Any] = dict(
        state_path=workdir / "orchestrator.sqlite",
        poll_wait_s=POLL_WAIT_S,
        item_timeout_s=60.0,
        garbage_delay_s=0.0,
        validation_fraction=0.0,
    )
    values.update(overrides)
    orch = build_orchestrator(
        OrchestratorSettings(**values),
        s3=s3.settings(f"iota-test-{next(_BUCKETS)}"),
        chain=ChainSettings(backend="local", local_path=chain_path, netuid=NETUID, metagraph_ttl_s=1),
        model=ModelSettings(preset="tiny"),
        data=DataSettings(batch_size=BATCH, seq_len=SEQ),
    )
    stack.callback(orch.db.close)
    base_url = stack.enter_context(serve_app(create_app(orch)))
    callers = stack.enter_context(ExitStack())
    return Net(base_url=base_url, orch=orch, keys=keys, callers=callers)


# ---------------------------------------------------------------------------------------------------------
# Helpers


def assert_error(resp: httpx.Response, status: int, code: str, detail_has: str = "") -> str:
    """The response is `status` with the one error format, `code`, and a detail mentioning `detail_has`."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"code", "detail"}, body
    assert body["code"] == code, body
    assert detail_has.lower() in body["detail"].lower(), body
    return str(body["detail"])


def boundary_payload(orch: Orchestrator, seed: int) -> bytes:
    """An encoded tensor of the shape that crosses every stage boundary (activation or gradient)."""
    shape = boundary_shape(orch.spec.model, BATCH, SEQ)
    return encode_tensor(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


def upload(target: UploadTarget, data: bytes) -> ArtifactRef:
    """PUT `data` to a presigned target; the reference an honest miner reports."""
    upload_to_url(target.url, data)
    return ArtifactRef(key=target.key, size=len(data), sha256=content_hash(data))


def register_body(fingerprint: str) -> bytes:
    return RegisterRequest(device="cpu", corpus_fingerprint=fingerprint).model_dump_json().encode()


# ---------------------------------------------------------------------------------------------------------
# The routes (tests/test_security.py holds each to its policy; tests/test_fuzz.py fuzzes them)


# The only routes anyone may call without a signature: GET (and the HEAD Starlette adds), read-only, and
# showing nothing a miner could use against another (no presigned URL, no credential, no session).
PUBLIC_ROUTES: dict[str, str] = {
    "/health": "liveness and the run id",
    "/metrics": "Prometheus counts and timings",
    "/dashboard": "the dashboard page (static HTML)",
    "/v1/dashboard": "the dashboard's data: status, loss curve, merges, validators' reports",
    "/v1/status": "the run at a glance",
    "/v1/losses": "the loss log with each sample's pathway",
    "/v1/merges": "what every merge did",
    "/v1/ledger": "per-epoch accepted work and replay verdicts",
    "/openapi.json": "the schema (docs/protocol.md is generated from it)",
    "/docs": "FastAPI's viewer of the schema",
    "/docs/oauth2-redirect": "part of that viewer",
    "/redoc": "FastAPI's other viewer of the schema",
}


def api_routes(app: Any) -> Iterator[tuple[str, set[str], Any]]:
    """(path, methods, route) of every route the app serves. Newer FastAPI keeps included routers lazy
    (reached through `iter_route_contexts`); older versions list every route in `app.routes`."""
    try:
        from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined]
    except ImportError:
        for route in app.routes:
            yield route.path, set(getattr(route, "methods", None) or ()), route
        return
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        yield context.path or route.path, set(context.methods or ()), route


def register_validator(net: Net, chain_path: Path) -> Keypair:
    """A fresh hotkey with a validator permit and stake, known to the orchestrator at once."""
    keypair = generate_keypair()
    LocalChain(chain_path, NETUID).register(keypair.ss58_address, stake=10.0, validator_permit=True)
    net.orch.registry.refresh()
    return keypair
