"""Attacks on the orchestrator (issue 7): each fails with the right status and leaves no trace in its state.

Uses the harness of tests/harness.py: real uvicorn on loopback, real sr25519 keys, the local
chain file and an embedded S3 server. "No trace" is `state(orch)`: the scheduler's counters, assignments
and miners, the database's rows (events, losses, samples, items, validations, garbage) and the bucket's
objects, compared before and after the refused requests. docs/security.md maps each attack to its tests,
here and elsewhere.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_origin

import httpx
import pytest
import torch
from fastapi.routing import APIRoute
from pydantic import BaseModel

from common.auth import HEADER_SIGNED_BY, RateLimiter, sign_request
from common.codec import encode_tensor
from common.config import AuthSettings
from common.model.stages import boundary_shape
from common.protocol import (
    ArtifactRef,
    FailRequest,
    ReplayVerdict,
    ScoresReport,
    ValidatorRegisterRequest,
    ValidatorTaskRequest,
    VerdictRequest,
    WorkRequest,
)
from common.protocol.endpoints import ENDPOINTS, Auth, signed_endpoints
from common.s3server import EmbeddedS3
from orchestrator import deps
from orchestrator.app import create_app
from orchestrator.service import Orchestrator
from tests.harness import (
    BATCH,
    PROTOCOL_HEADERS,
    PUBLIC_ROUTES,
    SEQ,
    Net,
    api_routes,
    assert_error,
    boundary_payload,
    register_validator,
    upload,
)

pytestmark = pytest.mark.timeout(60)

# What a public route may answer to: the routes anyone may call unsigned are tests/harness.py's PUBLIC_ROUTES.
READ_METHODS = {"GET", "HEAD"}


def _dependencies(dependant: Any) -> Iterator[Any]:
    for dep in dependant.dependencies:
        yield dep.call
        yield from _dependencies(dep)


def state(orch: Orchestrator) -> dict[str, Any]:
    """Everything an accepted request could change (last-seen times aside)."""
    sched, db = orch.scheduler, orch.db
    return {
        "counters": (
            sched.next_sample,
            sched.completed,
            sched.items_completed,
            sched.attempts_failed,
            sched.dropped,
            sched.in_flight(),
            sched.waiting_retry(),
        ),
        "assigned": dict(sched.assigned),
        "epoch": (orch.epochs.state.epoch, orch.epochs.state.phase, orch.epochs.merges_completed),
        "miners": {
            hotkey: (m.session, m.stage, m.items_completed, m.epoch_steps, sorted(m.holding))
            for hotkey, m in sched.miners.items()
        },
        "events": db.events(),
        "losses": db.losses_after(0, 1_000_000),
        "samples": db.count_samples(),
        "items": {status: db.count_items(status) for status in ("queued", "assigned", "done", "failed")},
        "validations": db.count_validations(),
        "garbage": db.count_garbage(),
        "scores": dict(orch.dashboard.scores),
        "objects": orch.store.list_keys(""),
    }


# ---------------------------------------------------------------------------------------------------------
# Every route needs a signature from a registered hotkey, except the public reads


def test_every_route_but_the_public_reads_needs_a_signature(net: Net) -> None:
    routes = list(api_routes(create_app(net.orch)))
    served = {path for path, _, _ in routes}
    assert set(PUBLIC_ROUTES) <= served, set(PUBLIC_ROUTES) - served  # the allow-list names real routes
    guarded = []
    for path, methods, route in routes:
        assert "{" not in path, f"{path}: a route with path parameters; extend this test for it"
        if path in PUBLIC_ROUTES:
            # A public route that accepted POST (say) could change state without a signature.
            assert methods <= READ_METHODS, f"{path} is public but accepts {sorted(methods - READ_METHODS)}"
            continue
        # Anything else is an APIRoute whose dependencies verify the signature: by construction, not by
        # remembering to check in the handler.
        assert isinstance(route, APIRoute), f"{path} is neither public nor an API route"
        calls = set(_dependencies(route.dependant))
        assert calls & {deps.signed, deps.validator}, f"{sorted(methods)} {path} has no signature check"
        guarded += [(method, path) for method in sorted(methods)]
    assert len(guarded) >= 10  # the miner, work, merge and validator routes
    # The table (which the clients and docs/protocol.md use) says the same of each route.
    assert {e.path for e in ENDPOINTS if e.auth is Auth.PUBLIC} <= set(PUBLIC_ROUTES)
    assert {(e.method, e.path) for e in ENDPOINTS if e.auth is not Auth.PUBLIC} == set(guarded)

    before = state(net.orch)
    limit = net.orch.verifier.max_body_bytes
    with httpx.Client(base_url=net.base_url, headers=PROTOCOL_HEADERS) as http:
        for method, path in guarded:
            resp = http.request(method, path, content=b"{}")
            assert_error(resp, 401, "unauthorized", "missing header")
            assert resp.headers["www-authenticate"] == "Epistula"
            # Oversized bodies are refused from Content-Length alone, before the headers are looked at.
            assert_error(http.request(method, path, content=b" " * (limit + 1)), 413, "too_large", str(limit))
        for path in PUBLIC_ROUTES:
            for method in ("POST", "PUT", "PATCH", "DELETE"):
                assert_error(http.request(method, path, content=b"{}"), 405, "not_allowed")
    assert state(net.orch) == before


def test_public_reads_show_no_credentials(net: Net, s3: EmbeddedS3) -> None:
    head, _, _ = net.pipeline()
    item = head.next_item()  # a presigned upload URL now exists for the head's output
    assert item.output is not None and "X-Amz-Signature" in item.output.url
    secret = s3.settings("any").secret_access_key.get_secret_value()
    for path in PUBLIC_ROUTES:
        resp = httpx.get(f"{net.base_url}{path}")
        assert resp.status_code == 200, (path, resp.text)
        for leak in ("X-Amz-Signature", "X-Amz-Credential", secret, item.output.url):
            assert leak not in resp.text, f"GET {path} shows {leak!r}"


def test_public_cursors_beyond_sqlites_integers_are_refused_not_crashed(net: Net) -> None:
    """The fuzzer's find: a cursor past 2**63 - 1 made SQLite raise (a 500); now it is a 422."""
    for path in ("/v1/losses?after=", "/v1/merges?after_epoch=", "/v1/ledger?after_epoch="):
        assert httpx.get(f"{net.base_url}{path}{2**63 - 1}").status_code == 200, path
        resp = httpx.get(f"{net.base_url}{path}{2**63}")
        assert resp.status_code == 422 and resp.json()["code"] == "invalid_request", (path, resp.text)


# ---------------------------------------------------------------------------------------------------------
# Validator-only routes refuse miners


def test_every_validator_route_refuses_miners_and_leaves_no_trace(net: Net, chain_path: Path) -> None:
    run_id = net.orch.run_id
    bodies: dict[str, BaseModel] = {
        "/v1/validators/register": ValidatorRegisterRequest(
            device="cpu", corpus_fingerprint=net.orch.spec.data.fingerprint
        ),
        "/v1/validators/task": ValidatorTaskRequest(run_id=run_id),
        "/v1/validators/verdict": VerdictRequest(
            run_id=run_id, task_id="v0.1.x", verdict=ReplayVerdict(passed=True, ops=1, checks=1)
        ),
        "/v1/validators/scores": ScoresReport(run_id=run_id, epoch=0, at=1.0, scores={}, weights={0: 1.0}),
    }
    routes = list(api_routes(create_app(net.orch)))
    validator_routes = {
        path
        for path, _, route in routes
        if isinstance(route, APIRoute) and deps.validator in set(_dependencies(route.dependant))
    }
    # Every validator route is listed here (a new one must be added), and all of /v1/validators is guarded.
    assert validator_routes == set(bodies) == {e.path for e in ENDPOINTS if e.auth is Auth.VALIDATOR}
    assert {path for path, _, _ in routes if path.startswith("/v1/validators/")} == validator_routes

    miner = net.caller(net.keys.registered[0])
    miner.register(net.orch.spec.data.fingerprint)
    before = state(net.orch)
    for path, body in bodies.items():
        assert_error(miner.post(path, body), 403, "not_a_validator", "no validator permit")
    assert state(net.orch) == before
    # The same bodies from a validator are accepted (so the refusals above were about the caller alone),
    # except the verdict on a task nobody leased to it.
    validator = net.caller(register_validator(net, chain_path))
    for path, body in bodies.items():
        resp = validator.post(path, body)
        if path.endswith("/verdict"):
            assert_error(resp, 403, "not_your_task")
        else:
            assert resp.status_code == 200, (path, resp.text)


# ---------------------------------------------------------------------------------------------------------
# A miner cannot complete an item it was not given, or report a loss for a sample it did not finish


def test_completing_work_not_given_or_reporting_a_loss_not_earned_changes_nothing(net: Net) -> None:
    orch = net.orch
    head, body, tail = net.pipeline()
    f0 = head.next_item()
    assert f0.output is not None
    act0 = upload(f0.output, boundary_payload(orch, 0))
    assert head.complete(f0.item_id, act0).status_code == 200
    f1 = body.next_item()
    assert f1.output is not None
    act1 = upload(f1.output, boundary_payload(orch, 1))

    before = state(orch)
    assert_error(head.complete(f1.item_id, act1), 403, "not_your_item")  # the body's item
    assert_error(tail.complete(f1.item_id, act1, loss=0.5), 403, "not_your_item")
    assert_error(head.complete("7.1.1f"), 403, "not_your_item")  # never issued
    assert_error(body.complete(f1.item_id, act1, loss=0.5), 422, "unexpected_loss")  # not the tail
    forged = act0.model_copy(update={"sha256": "0" * 64})
    assert_error(head.complete(f0.item_id, forged), 409, "item_closed")  # done, now with other bytes
    give_up = FailRequest(**head.session(), item_id=f1.item_id, reason="not mine", blame_input=True)
    assert_error(head.post("/v1/work/fail", give_up), 403, "not_your_item")
    assert state(orch) == before

    assert body.complete(f1.item_id, act1).status_code == 200
    f2 = tail.next_item()
    assert f2.output is not None
    grad2 = upload(f2.output, boundary_payload(orch, 2))
    before = state(orch)
    # Only the tail, holding the sample's last forward, may report its loss.
    assert_error(body.complete(f2.item_id, grad2, loss=0.01), 403, "not_your_item")
    assert_error(head.complete(f2.item_id, grad2, loss=0.01), 403, "not_your_item")
    assert state(orch) == before

    assert tail.complete(f2.item_id, grad2, loss=5.25).status_code == 200
    before = state(orch)
    assert [r[3] for r in before["losses"]] == [5.25]
    # Sending the completion again (as a client whose answer was lost does) is accepted once: a second
    # loss for the same sample neither replaces the first nor adds a record.
    resp = tail.complete(f2.item_id, grad2, loss=0.01)
    assert resp.status_code == 200 and resp.json() == {"sample_completed": False}
    assert_error(
        tail.complete(f2.item_id, grad2.model_copy(update={"size": 1}), loss=0.01), 409, "item_closed"
    )
    b1 = next(i for i, it in orch.scheduler.items.items() if it.kind == "backward" and it.stage == 1)
    assert_error(tail.complete(b1, None, loss=0.01), 403, "not_your_item")  # queued for the body
    assert state(orch) == before


# ---------------------------------------------------------------------------------------------------------
# Oversized payloads are refused early


def test_upload_larger_than_any_boundary_tensor_is_refused_unread(net: Net) -> None:
    orch = net.orch
    head, _, _ = net.pipeline()
    item = head.next_item()
    assert item.output is not None
    before = state(orch)
    # Nothing was uploaded: the answer is about the size, so the object was never looked for, let alone read.
    huge = ArtifactRef(key=item.output.key, size=orch.max_payload_bytes + 1, sha256="0" * 64)
    assert_error(head.complete(item.item_id, huge), 422, "bad_upload", "more than a boundary tensor")
    after = state(orch)
    # The one trace is the audit record of the bad upload; the item is still the head's to redo.
    assert [(e["kind"], e["miner"]) for e in after.pop("events")[len(before["events"]) :]] == [
        ("bad_upload", head.hotkey)
    ]
    before.pop("events")
    assert after == before


# ---------------------------------------------------------------------------------------------------------
# Tensors with the wrong shape or dtype, or with NaN or Inf, are refused
#
# The orchestrator never decodes tensors: it checks an upload's size (at most a boundary tensor) and sha256,
# nothing more. The receiver decodes, against the spec it derives from its registration (`BoundaryWire`:
# shape, wire dtype, finite values, a magnitude bound), and refuses what does not fit, blaming the producer.
# So these run a real miner (`MinerWorker`) at stage 1 against inputs a hostile head uploaded. The codec's
# own checks, one by one: tests/test_codec.py.


def _bad_activations(orch: Orchestrator) -> dict[str, tuple[bytes, str]]:
    b, t, w = boundary_shape(orch.spec.model, BATCH, SEQ)
    nan, inf = torch.randn(b, t, w), torch.randn(b, t, w)
    nan[0, 0, 0], inf[1, 2, 3] = float("nan"), float("-inf")
    return {
        "shape": (encode_tensor(torch.randn(b, t - 1, w)), "has shape"),
        "dtype": (encode_tensor(torch.randn(b, t, w, dtype=torch.float16)), "has dtype float16"),
        "nan": (encode_tensor(nan), "NaN or Inf"),
        "inf": (encode_tensor(inf), "NaN or Inf"),
    }


def test_bad_tensors_are_refused_by_the_miner_that_downloads_them(
    start: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from miner.settings import MinerSettings
    from miner.worker import MinerWorker

    net = start(max_attempts=10)
    orch = net.orch
    # The miner's corpus is the orchestrator's (same settings, same fingerprint), not read from disk again.
    monkeypatch.setattr("miner.worker.make_corpus", lambda _settings: orch.corpus)
    head = net.caller(net.keys.registered[0])
    assert head.register(orch.spec.data.fingerprint).stage == 0
    settings = MinerSettings(
        _env_file=None, orchestrator_url=net.base_url, device="cpu", poll_wait_s=0.0, metrics_port=0
    )
    worker = MinerWorker(settings, net.keys.registered[1])
    try:
        assert worker.register().stage == 1
        miner_prefix = net.prefix(worker.keypair.ss58_address)
        for name, (payload, reason) in _bad_activations(orch).items():
            item = head.next_item()
            assert item.kind == "forward" and item.output is not None
            # The orchestrator accepts it: the size is within a boundary tensor's and the hash matches.
            assert len(payload) <= orch.max_payload_bytes
            ref = upload(item.output, payload)
            assert head.complete(item.item_id, ref).status_code == 200, name
            blamed = orch.db.count_events("input_blamed")
            worker.step()  # takes the forward, downloads the input, refuses it
            events = orch.db.events("input_blamed")
            assert len(events) == blamed + 1, name
            assert events[-1]["miner"] == head.hotkey and reason in events[-1]["detail"], (name, events[-1])
            assert orch.store.list_keys(miner_prefix) == [], name  # the miner produced nothing from it
            assert orch.scheduler.assigned.get(worker.keypair.ss58_address) is None
        assert orch.db.losses_after(0, 10) == []
        assert orch.scheduler.miners[worker.keypair.ss58_address].items_completed == 0
    finally:
        worker.client.close()
        worker._s3.close()


# ---------------------------------------------------------------------------------------------------------
# Rate limits are keyed on the verified hotkey


def test_token_bucket_allows_a_burst_then_the_rate_per_key() -> None:
    now = [100.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: now[0], max_keys=2)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)  # refused: half a second until the next token
    assert limiter.wait_s("a") == pytest.approx(0.5)  # asking takes nothing
    assert limiter.take("b") == 0.0  # another key has its own bucket
    now[0] += 0.5
    assert limiter.wait_s("a") == 0.0 and limiter.take("a") == 0.0 and limiter.take("a") > 0
    now[0] -= 50.0  # a clock stepping back neither refills nor drains
    assert limiter.take("a") > 0
    now[0] += 1000.0
    assert [limiter.take("a") for _ in range(4)][-1] > 0  # refilled to the burst, never beyond
    # Over max_keys, idle (full) buckets are dropped: forgetting a full bucket changes nothing.
    limiter.take("c")
    assert limiter.take("d") == 0.0 and len(limiter._buckets) <= 3
    with pytest.raises(ValueError):
        RateLimiter(rate_per_s=0.0, burst=1)


def test_default_limits_come_from_the_auth_settings(net: Net) -> None:
    limiter = net.orch.verifier.rate_limiter
    defaults = AuthSettings()
    assert limiter is not None
    assert (limiter.rate_per_s, limiter.burst) == (defaults.rate_per_s, defaults.rate_burst)
    assert defaults.rate_per_s >= 10 and defaults.rate_burst >= 100  # generous: miners long-poll


def _limit(net: Net, burst: int) -> None:
    # Practically no refill during the test: a hotkey gets `burst` requests, then 429.
    net.orch.verifier.rate_limiter = RateLimiter(rate_per_s=0.001, burst=burst)


def test_one_hotkey_over_its_limit_gets_429_while_another_is_served(net: Net) -> None:
    _limit(net, burst=3)
    flooder, other = net.caller(net.keys.registered[0]), net.caller(net.keys.registered[1])
    flooder.register(net.orch.spec.data.fingerprint)
    poll = WorkRequest(**flooder.session())
    assert [flooder.post("/v1/work/next", poll).status_code for _ in range(2)] == [200, 200]
    before, cached = state(net.orch), len(net.orch.verifier.replay_cache)
    resp = flooder.post("/v1/work/next", poll)
    assert_error(resp, 429, "rate_limited", "too many requests")
    assert int(resp.headers["retry-after"]) >= 1
    assert state(net.orch) == before
    assert len(net.orch.verifier.replay_cache) == cached  # refused before taking a replay-cache slot
    other.register(net.orch.spec.data.fingerprint)  # another hotkey is served as usual
    assert other.post("/v1/work/next", WorkRequest(**other.session())).status_code == 200


def test_forged_replayed_and_unsigned_requests_do_not_spend_a_victims_budget(net: Net) -> None:
    _limit(net, burst=4)
    victim, attacker = net.keys.registered[0], net.keys.stranger
    caller = net.caller(victim)
    caller.register(net.orch.spec.data.fingerprint)  # 1 of 4
    body = WorkRequest(**caller.session()).model_dump_json().encode()
    captured = {**sign_request(victim, body), **PROTOCOL_HEADERS}
    url = f"{net.base_url}/v1/work/next"
    assert httpx.post(url, content=body, headers=captured).status_code == 200  # 2 of 4
    for _ in range(10):
        # A replay of the victim's own request, a forgery claiming the victim's hotkey, an unsigned request.
        assert_error(httpx.post(url, content=body, headers=captured), 401, "unauthorized", "replayed")
        forged = {**sign_request(attacker, body), **PROTOCOL_HEADERS, HEADER_SIGNED_BY: victim.ss58_address}
        assert_error(httpx.post(url, content=body, headers=forged), 401, "unauthorized", "signature")
        assert_error(httpx.post(url, content=body, headers=PROTOCOL_HEADERS), 401, "unauthorized")
    # The victim still has exactly what it did not spend itself.
    assert [caller.post("/v1/work/next", WorkRequest(**caller.session())).status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]


# ---------------------------------------------------------------------------------------------------------
# Registering never makes the orchestrator call an address it was given

_ADDRESS_WORDS = {
    "url",
    "uri",
    "host",
    "hostname",
    "address",
    "addr",
    "endpoint",
    "callback",
    "webhook",
    "port",
}


def _models_in(model: type[BaseModel]) -> Iterator[type[BaseModel]]:
    yield model
    for field in model.model_fields.values():
        todo = [field.annotation]
        while todo:
            annotation = todo.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                yield from _models_in(annotation)
            elif get_origin(annotation) is not None:
                todo.extend(get_args(annotation))


def test_no_request_carries_an_address_and_unknown_fields_are_refused() -> None:
    # Every signed body (the table's, which the routes parse and declare) and every model inside one.
    models = {m for endpoint in signed_endpoints() for m in _models_in(endpoint.request)}
    assert {"RegisterRequest", "ValidatorRegisterRequest", "CompleteRequest"} <= {m.__name__ for m in models}
    for model in models:
        assert model.model_config.get("extra") == "forbid", f"{model.__name__} ignores unknown fields"
        properties = model.model_json_schema()["properties"]
        for name in model.model_fields:
            words = set(re.split(r"_+", name.lower()))
            assert not words & _ADDRESS_WORDS, f"{model.__name__}.{name} looks like an address"
            fmt = properties[name].get("format")
            assert fmt not in {"uri", "url", "hostname", "ipv4", "ipv6"}, f"{model.__name__}.{name}: {fmt}"


def test_registering_never_makes_the_orchestrator_connect_to_an_address_it_names(
    net: Net, chain_path: Path
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    address = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    validator = net.caller(register_validator(net, chain_path))
    miner = net.caller(net.keys.registered[0])
    fingerprint = net.orch.spec.data.fingerprint
    try:
        before = state(net.orch)
        for caller, path in ((validator, "/v1/validators/register"), (miner, "/v1/miners/register")):
            for extra in ("callback_url", "url", "endpoint", "address"):
                body = f'{{"device": "cpu", "corpus_fingerprint": "{fingerprint}", "{extra}": "{address}"}}'
                assert_error(caller.post(path, body.encode()), 422, "invalid_body", extra)
        assert state(net.orch) == before
        # An address where a string is allowed (the device name) is stored as text, never dialled.
        join = ValidatorRegisterRequest(device=address, corpus_fingerprint=fingerprint)
        assert validator.post("/v1/validators/register", join).status_code == 200
        assert net.orch.db.events("validator_registered")[-1]["detail"] == address
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                connection, peer = listener.accept()
            except TimeoutError:
                continue
            connection.close()
            pytest.fail(f"the orchestrator connected to the address in a request (from {peer})")
    finally:
        listener.close()
