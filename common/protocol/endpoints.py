"""Every endpoint of the orchestrator, in one table: its method, path, body, answer, and who may call it.

The routers serve these (`orchestrator.deps.serve`, `orchestrator.deps.SignedBody`), the clients call them
(`common.client.OrchestratorClient.call`), and docs/protocol.md is generated from them
(scripts/protocol_doc.py), so a path or a model is named once, here. Query parameters of the public reads
are declared by their routes (FastAPI checks them); the clients pass them as a mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any, Generic, Literal, TypeVar

from pydantic import TypeAdapter

from common.protocol.dashboard import DashboardData
from common.protocol.merge import MergeRecord, MergeReportRequest
from common.protocol.registration import RegisterRequest, RegisterResponse
from common.protocol.status import LossPage, RunStatus
from common.protocol.validators import (
    EpochLedger,
    ScoresReport,
    ValidatorRegisterRequest,
    ValidatorRegisterResponse,
    ValidatorTaskRequest,
    ValidatorTaskResponse,
    VerdictRequest,
)
from common.protocol.wire import Ack, UploadTarget
from common.protocol.work import (
    CompleteRequest,
    CompleteResponse,
    FailRequest,
    PresignRequest,
    WorkRequest,
    WorkResponse,
)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

JSON = "application/json"


class Auth(StrEnum):
    """Who may call an endpoint. Signed ones take a JSON body signed with the caller's hotkey (Epistula);
    every parameter travels in it."""

    PUBLIC = "public"  # no signature; read-only GETs that show nothing a miner could use against another
    SIGNED = "signed"  # a hotkey registered on the subnet: the miners' routes
    VALIDATOR = "validator"  # a hotkey with a validator permit and enough stake


@dataclass(frozen=True)
class Endpoint(Generic[Req, Resp]):
    """One route. `request` is the signed body's model (None for a public GET); `response` the type the
    answer parses as (a model, a list of one, or plain text where `media_type` says so)."""

    method: Literal["GET", "POST"]
    path: str
    request: type[Req] | None
    response: type[Resp]
    auth: Auth
    media_type: str = JSON

    def __post_init__(self) -> None:
        # Signed routes carry everything in the signed body, public ones change nothing: no other shape.
        signed = self.auth is not Auth.PUBLIC
        if signed != (self.method == "POST") or signed != (self.request is not None):
            raise ValueError(f"{self.method} {self.path}: a signed POST with a body, or a public GET")

    @cached_property
    def answer(self) -> TypeAdapter[Resp]:
        """Parses the answer's JSON as `response`."""
        return TypeAdapter(self.response)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


# ---------------------------------------------------------------------------------------------------------
# Public reads

HEALTH: Endpoint[None, dict[str, str]] = Endpoint("GET", "/health", None, dict[str, str], Auth.PUBLIC)
STATUS: Endpoint[None, RunStatus] = Endpoint("GET", "/v1/status", None, RunStatus, Auth.PUBLIC)
LOSSES: Endpoint[None, LossPage] = Endpoint("GET", "/v1/losses", None, LossPage, Auth.PUBLIC)
MERGES: Endpoint[None, list[MergeRecord]] = Endpoint(
    "GET", "/v1/merges", None, list[MergeRecord], Auth.PUBLIC
)
LEDGER: Endpoint[None, list[EpochLedger]] = Endpoint(
    "GET", "/v1/ledger", None, list[EpochLedger], Auth.PUBLIC
)
METRICS: Endpoint[None, str] = Endpoint("GET", "/metrics", None, str, Auth.PUBLIC, "text/plain")
DASHBOARD_DATA: Endpoint[None, DashboardData] = Endpoint(
    "GET", "/v1/dashboard", None, DashboardData, Auth.PUBLIC
)
DASHBOARD_PAGE: Endpoint[None, str] = Endpoint("GET", "/dashboard", None, str, Auth.PUBLIC, "text/html")

# ---------------------------------------------------------------------------------------------------------
# Miners

MINERS_REGISTER: Endpoint[RegisterRequest, RegisterResponse] = Endpoint(
    "POST", "/v1/miners/register", RegisterRequest, RegisterResponse, Auth.SIGNED
)
WORK_NEXT: Endpoint[WorkRequest, WorkResponse] = Endpoint(
    "POST", "/v1/work/next", WorkRequest, WorkResponse, Auth.SIGNED
)
WORK_COMPLETE: Endpoint[CompleteRequest, CompleteResponse] = Endpoint(
    "POST", "/v1/work/complete", CompleteRequest, CompleteResponse, Auth.SIGNED
)
WORK_FAIL: Endpoint[FailRequest, Ack] = Endpoint("POST", "/v1/work/fail", FailRequest, Ack, Auth.SIGNED)
WORK_PRESIGN: Endpoint[PresignRequest, UploadTarget] = Endpoint(
    "POST", "/v1/work/presign", PresignRequest, UploadTarget, Auth.SIGNED
)
MERGE_REPORT: Endpoint[MergeReportRequest, Ack] = Endpoint(
    "POST", "/v1/merge/report", MergeReportRequest, Ack, Auth.SIGNED
)

# ---------------------------------------------------------------------------------------------------------
# Validators

VALIDATORS_REGISTER: Endpoint[ValidatorRegisterRequest, ValidatorRegisterResponse] = Endpoint(
    "POST", "/v1/validators/register", ValidatorRegisterRequest, ValidatorRegisterResponse, Auth.VALIDATOR
)
VALIDATORS_TASK: Endpoint[ValidatorTaskRequest, ValidatorTaskResponse] = Endpoint(
    "POST", "/v1/validators/task", ValidatorTaskRequest, ValidatorTaskResponse, Auth.VALIDATOR
)
VALIDATORS_VERDICT: Endpoint[VerdictRequest, Ack] = Endpoint(
    "POST", "/v1/validators/verdict", VerdictRequest, Ack, Auth.VALIDATOR
)
VALIDATORS_SCORES: Endpoint[ScoresReport, Ack] = Endpoint(
    "POST", "/v1/validators/scores", ScoresReport, Ack, Auth.VALIDATOR
)

ENDPOINTS: tuple[Endpoint[Any, Any], ...] = (
    HEALTH,
    STATUS,
    LOSSES,
    MERGES,
    LEDGER,
    METRICS,
    DASHBOARD_DATA,
    DASHBOARD_PAGE,
    MINERS_REGISTER,
    WORK_NEXT,
    WORK_COMPLETE,
    WORK_FAIL,
    WORK_PRESIGN,
    MERGE_REPORT,
    VALIDATORS_REGISTER,
    VALIDATORS_TASK,
    VALIDATORS_VERDICT,
    VALIDATORS_SCORES,
)


def signed_endpoints() -> list[Endpoint[Any, Any]]:
    """The endpoints that take a signed body, in table order."""
    return [e for e in ENDPOINTS if e.request is not None]
