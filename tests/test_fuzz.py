"""Fuzzing the orchestrator from its own OpenAPI schema (schemathesis), over real HTTP.

Every operation in the schema gets a bounded, deterministic number of generated requests, valid and
invalid ones, sent to a real uvicorn server on loopback, in two passes:

- unsigned: every route outside the public, read-only allow-list must answer 401;
- signed by a registered hotkey (a miner; a validator with permit and stake for the validator routes),
  with the run id and session of a real registration put into the bodies that carry them, so that the
  requests get past the signature and session checks and reach the handlers' own validation.

In both passes no answer may be a 5xx, and every answer must conform to the schema: a documented status
code and content type, and a body that fits the documented schema (errors are declared as ErrorBody for
4XX and 5XX on every route, so error bodies are checked too).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from bittensor.sp_core import Keypair
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from common.auth import sign_request
from common.protocol import (
    ENDPOINTS,
    HEADER_PROTOCOL,
    HEADER_RUN,
    MAX_LOSS,
    PROTOCOL_VERSION,
    ArtifactRef,
    CompleteRequest,
    ErrorBody,
    MergeReportRequest,
    ScoresReport,
    signed_endpoints,
)
from orchestrator import views
from orchestrator.app import create_app
from orchestrator.deps import BodyDependency
from tests.harness import PUBLIC_ROUTES, Net, api_routes, register_validator

pytestmark = pytest.mark.timeout(240)

MAX_EXAMPLES = 25  # generated requests per operation and pass (explicit examples come on top)
# Unsigned requests to a signed route stop at the signature, whatever the body: fewer of them say as much.
UNSIGNED_EXAMPLES = 8


def schema_valid_requests_parse(ctx: Any, response: Any, case: Case) -> None:
    """A request the schema calls valid is not refused as malformed: the schema states every rule the
    server's parsing enforces. (Other 4xx, such as 403 not_your_item, are about the state, not the form.)"""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return
    code = response.json().get("code")
    assert code not in {"invalid_body", "invalid_request"}, (
        f"the schema allows what the server refuses: {response.text}"
    )


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    schema_valid_requests_parse,
]


class EpistulaRequestsAuth(requests.auth.AuthBase):
    """Signs each request's body exactly as sent, with a fresh uuid each time (schemathesis sends with
    `requests`; `common.auth.EpistulaAuth` is the same for httpx)."""

    def __init__(self, keypair: Keypair) -> None:
        self.keypair = keypair

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        request.headers.update(sign_request(self.keypair, body.encode() if isinstance(body, str) else body))
        return request


def fuzz(
    net: Net, send: Callable[[Case], Any], *, with_public: bool, guarded_examples: int = MAX_EXAMPLES
) -> list[str]:
    """Fuzz every operation of the served schema (the public ones only `with_public`; `guarded_examples`
    requests for each of the others); one line per failing operation. Every operation runs even after a
    failure, so one run reports them all."""
    openapi = httpx.get(f"{net.base_url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(openapi)
    schema.config.update(base_url=net.base_url)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    for operation in operations:
        if not with_public and operation.path in PUBLIC_ROUTES:
            continue
        cases = st.one_of(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )

        @settings(
            max_examples=MAX_EXAMPLES if operation.path in PUBLIC_ROUTES else guarded_examples,
            derandomize=True,  # the same requests on every run: a failure in CI reproduces here
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time, raw reports
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
        )
        @given(case=cases)
        def run(case: Case) -> None:
            case.validate_response(send(case), checks=CHECKS)

        try:
            run()
        except (Exception, FailureGroup) as error:  # collected: every operation runs, all are reported
            failures.append(f"{operation.label}: {error}")
    return failures


def test_unsigned_requests_get_401_everywhere_but_the_public_reads(start: Callable[..., Net]) -> None:
    net = start(poll_wait_s=0.0)
    statuses: dict[str, set[int]] = {}

    def send(case: Case) -> Any:
        response = case.call(headers={HEADER_PROTOCOL: str(PROTOCOL_VERSION)})
        statuses.setdefault(case.operation.path, set()).add(response.status_code)
        return response

    failures = fuzz(net, send, with_public=True, guarded_examples=UNSIGNED_EXAMPLES)
    assert failures == [], "\n\n".join(failures)
    for path, seen in statuses.items():
        if path not in PUBLIC_ROUTES:
            assert seen == {401}, f"{path} answered {seen} to unsigned requests"
    assert net.orch.scheduler.miners == {} and net.orch.db.events() == []


def test_signed_requests_never_get_a_5xx_or_break_the_schema(
    start: Callable[..., Net], chain_path: Any
) -> None:
    # No long polls (they would only slow the fuzzer down) and no rate limit (tests/test_security.py
    # tests it; here it would only turn the fuzzer's requests into 429s).
    net = start(poll_wait_s=0.0)
    net.orch.verifier.rate_limiter = None
    validator = register_validator(net, chain_path)
    miner = net.caller(net.keys.registered[0])
    reg = miner.register(net.orch.spec.data.fingerprint)
    auth = {"miner": EpistulaRequestsAuth(miner.keypair), "validator": EpistulaRequestsAuth(validator)}
    statuses: dict[str, set[int]] = {}

    def send(case: Case) -> Any:
        if isinstance(case.body, dict):
            # Past the session check to the handler's own logic (a wrong run or session is one 409 that
            # tests/test_orchestrator_http.py covers), and about the item the miner holds, if any.
            real: dict[str, Any] = {"run_id": reg.run_id, "session": reg.session}
            if (held := net.orch.scheduler.assigned.get(miner.hotkey)) is not None:
                real["item_id"] = held
            case.body.update({k: v for k, v in real.items() if k in case.body})
        who = "validator" if case.operation.path.startswith("/v1/validators/") else "miner"
        response = case.call(headers={HEADER_PROTOCOL: str(PROTOCOL_VERSION)}, auth=auth[who])
        statuses.setdefault(case.operation.path, set()).add(response.status_code)
        return response

    failures = fuzz(net, send, with_public=False)
    assert failures == [], "\n\n".join(failures)
    # The fuzzer got through the signature: no operation saw only 401s.
    assert all(seen - {401} for seen in statuses.values()), statuses


# ---------------------------------------------------------------------------------------------------------
# Regressions: what the fuzzer found, each pinned down on its own


def test_schema_declares_each_signed_body_and_the_error_format(start: Callable[..., Net]) -> None:
    """Signed routes read their body themselves, so the schema declared none and the fuzzer sent none: each
    now declares the model it parses. Error answers were undeclared, except a 422 documented as FastAPI's
    `HTTPValidationError`, a body this app never sends: every route now declares ErrorBody for 4XX/5XX."""
    net = start()
    app = create_app(net.orch)
    openapi = app.openapi()
    table = {(e.method, e.path): e for e in ENDPOINTS}
    signed_bodies = {e.request.__name__ for e in signed_endpoints()}
    checked = 0
    served: set[tuple[str, str]] = set()
    for path, _, route in api_routes(app):
        if not isinstance(route, APIRoute):
            continue
        served |= {(method, path) for method in route.methods}
        for method in route.methods:
            if route.include_in_schema:
                responses = openapi["paths"][path][method.lower()]["responses"]
                for status in ("4XX", "5XX"):
                    schema = responses[status]["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
        if path in PUBLIC_ROUTES:
            continue
        # The model the route's body dependency (`SignedBody`) parses is the one it declares, the table's.
        parsed = {
            d.call.model.__name__ for d in route.dependant.dependencies if isinstance(d.call, BodyDependency)
        }
        declared = route.openapi_extra["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        name = declared.rsplit("/", 1)[-1]
        assert parsed == {name}, (path, parsed, declared)
        (method,) = route.methods
        assert table[(method, path)].request.__name__ == name, (path, table[(method, path)])
        assert name in signed_bodies and name in openapi["components"]["schemas"]
        checked += 1
    assert checked >= 10
    assert served == set(table), served ^ set(table)  # the table names every route, and only those
    assert "HTTPValidationError" not in openapi["components"]["schemas"]
    resp = httpx.get(f"{net.base_url}/v1/losses", params={"after": -1})
    assert resp.status_code == 422
    ErrorBody.model_validate_json(resp.content)


def test_an_unexpected_failure_is_a_500_error_body(
    start: Callable[..., Net], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug answered Starlette's plain-text 500, not the ErrorBody the schema declares for 5XX."""
    net = start()

    def broken(orch: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(views, "run_status", broken)
    resp = httpx.get(f"{net.base_url}/v1/status")
    assert resp.status_code == 500
    assert ErrorBody.model_validate_json(resp.content).code == "internal_error"
    assert "secret internals" not in resp.text
    assert (
        resp.headers[HEADER_PROTOCOL] == str(PROTOCOL_VERSION) and resp.headers[HEADER_RUN] == net.orch.run_id
    )
    assert httpx.get(f"{net.base_url}/health").status_code == 200  # and the server carries on


def _pattern(schema: dict[str, Any]) -> re.Pattern[str]:
    return re.compile(schema["pattern"])


def test_protocol_schemas_state_what_the_validators_check() -> None:
    """Requests the schema called valid were refused as malformed (`schema_valid_requests_parse`): a sha256
    of any characters, a merge report without its `phase`, a scores report with non-numeric uid keys, a
    negative loss (its bounds were in the schema under names JSON Schema does not know: "ge" and "le")."""
    # No pydantic constraint leaks into any schema under a name JSON Schema does not know.
    leaked = {"ge", "le", "gt", "lt", "min_length", "max_length", "multiple_of"}

    def keys_of(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield key
                yield from keys_of(value)
        elif isinstance(node, list):
            for value in node:
                yield from keys_of(value)

    for model in (e.request for e in signed_endpoints()):
        assert not set(keys_of(model.model_json_schema())) & leaked, model.__name__

    loss = CompleteRequest.model_json_schema()["properties"]["loss"]["anyOf"][0]
    assert (loss["minimum"], loss["maximum"]) == (0, MAX_LOSS)

    sha = _pattern(ArtifactRef.model_json_schema()["properties"]["sha256"])
    for value in ["a" * 64, "A" * 64, "a" * 63, "g" * 64, "0" * 65, ""]:
        ok = True
        try:
            ArtifactRef(key="k", size=1, sha256=value)
        except ValidationError:
            ok = False
        assert bool(sha.fullmatch(value)) == ok, value

    merge = MergeReportRequest.model_json_schema()["$defs"]
    for report in ("UploadReport", "ReduceReport", "ApplyReport"):
        assert "phase" in merge[report]["required"], report
    with pytest.raises(ValidationError, match="discriminator"):
        MergeReportRequest.model_validate({"run_id": "r", "session": 1, "epoch": 0, "stage": 0, "report": {}})

    uid = _pattern(ScoresReport.model_json_schema()["properties"]["weights"]["propertyNames"])
    for key in ["0", "7", "65535", "65536", "-1", "1.5", "x", "", "99999"]:
        body = {"run_id": "r", "epoch": 0, "at": 0.0, "scores": {}, "weights": {key: 0.5}}
        try:
            ScoresReport.model_validate_json(json.dumps(body))
            ok = True
        except ValidationError:
            ok = False
        # The schema may be stricter than the parser (no leading zeros), never looser.
        assert not uid.fullmatch(key) or ok, key
        assert uid.fullmatch(key) or not ok or key.startswith("0"), key
