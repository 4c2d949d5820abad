"""The orchestrator over real HTTP, as miners and attackers see it.

Everything is real: uvicorn on loopback, requests signed with generated sr25519 hotkeys, the local chain
file deciding who may call, and an embedded S3 server (moto over HTTP) that miners upload to and download
from through the presigned URLs the orchestrator hands out. Each test gets a fresh orchestrator (its own
state file and bucket), so tests never see each other's miners, samples or objects. The harness is
tests/harness.py, its fixtures (`net`, `start`, `keys`, `chain_path`, `s3`) are in tests/conftest.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.auth import HEADER_SIGNED_BY, sign_request
from common.chain import LocalChain
from common.client import ApiError, OrchestratorClient
from common.codec import content_hash
from common.keys import generate_keypair
from common.model import ModelConfig
from common.protocol import (
    HEADER_PROTOCOL,
    HEADER_RUN,
    MINERS_REGISTER,
    PROTOCOL_VERSION,
    WORK_COMPLETE,
    WORK_NEXT,
    ArtifactRef,
    CompleteRequest,
    CompleteResponse,
    FailRequest,
    LossPage,
    RegisterRequest,
    RegisterResponse,
    ReplayVerdict,
    UploadTarget,
    ValidatorRegisterRequest,
    ValidatorTaskRequest,
    VerdictRequest,
    WorkItem,
    WorkRequest,
    WorkResponse,
)
from common.storage import download_from_url, upload_to_url
from tests.harness import (
    BATCH,
    NETUID,
    POLL_WAIT_S,
    PROTOCOL_HEADERS,
    SEQ,
    Net,
    assert_error,
    boundary_payload,
    register_body,
    upload,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------------------------------------------
# 1. Registration


def test_registration_returns_the_run_and_fills_stages_in_order(net: Net) -> None:
    orch = net.orch
    callers = [net.caller(k) for k in net.keys.registered[:3]]
    regs = [c.register(orch.spec.data.fingerprint) for c in callers]

    assert [r.stage for r in regs] == [0, 1, 2]
    for reg in regs:
        assert reg.run_id == orch.run_id
        assert reg.session == 1
        assert ModelConfig.from_dict(reg.model) == orch.spec.model
        assert reg.model["name"] == "tiny"
        assert reg.data.fingerprint == orch.spec.data.fingerprint
        assert (reg.data.batch_size, reg.data.seq_len) == (BATCH, SEQ)
        assert reg.training == orch.spec.training
        assert reg.weights.version == 0 and reg.weights.seed == orch.spec.seed
        assert reg.weights.checkpoint is None
        assert reg.poll_wait_s == POLL_WAIT_S
    assert {hk: m.stage for hk, m in orch.scheduler.miners.items()} == {
        c.hotkey: stage for stage, c in enumerate(callers)
    }
    assert [s.miners for s in net.status().stages] == [1, 1, 1]


def test_registration_with_another_corpus_is_refused(net: Net) -> None:
    miner = net.caller(net.keys.registered[0])
    resp = miner.post("/v1/miners/register", register_body("0" * 64))
    assert_error(resp, 409, "corpus_mismatch", "IOTA_DATA_")
    assert miner.hotkey not in net.orch.scheduler.miners
    assert net.orch.db.count_events("registered") == 0


# ---------------------------------------------------------------------------------------------------------
# 2. Authentication: nothing but a fresh request signed by a registered hotkey gets through


def assert_nobody_registered(net: Net) -> None:
    assert net.orch.scheduler.miners == {}
    assert net.orch.db.count_events("registered") == 0


def test_unsigned_request_is_refused(net: Net) -> None:
    body = register_body(net.orch.spec.data.fingerprint)
    resp = httpx.post(f"{net.base_url}/v1/miners/register", content=body, headers=PROTOCOL_HEADERS)
    assert_error(resp, 401, "unauthorized", "missing header")
    assert resp.headers["www-authenticate"] == "Epistula"
    assert_nobody_registered(net)


def test_signature_by_another_key_than_the_claimed_one_is_refused(net: Net) -> None:
    victim, attacker = net.keys.registered[0], net.keys.stranger
    body = register_body(net.orch.spec.data.fingerprint)
    headers = {**sign_request(attacker, body), **PROTOCOL_HEADERS, HEADER_SIGNED_BY: victim.ss58_address}
    resp = httpx.post(f"{net.base_url}/v1/miners/register", content=body, headers=headers)
    assert_error(resp, 401, "unauthorized", "signature does not match")
    assert resp.headers["www-authenticate"] == "Epistula"
    assert_nobody_registered(net)


def test_body_changed_after_signing_is_refused(net: Net) -> None:
    head, _, _ = net.pipeline()
    item = head.next_item()
    # Someone on the path rewrites a signed completion (say, to point at other bytes): refused as a whole.
    assert item.output is not None
    signed = CompleteRequest(**head.session(), item_id=item.item_id).model_dump_json().encode()
    forged = ArtifactRef(key=item.output.key, size=1, sha256="a" * 64)
    tampered = CompleteRequest(**head.session(), item_id=item.item_id, output=forged)
    headers = {**sign_request(head.keypair, signed), **PROTOCOL_HEADERS}
    resp = httpx.post(
        f"{net.base_url}/v1/work/complete", content=tampered.model_dump_json().encode(), headers=headers
    )
    assert_error(resp, 401, "unauthorized", "signature does not match")
    assert net.orch.scheduler.assigned[head.hotkey] == item.item_id
    assert net.orch.scheduler.items_completed == 0
    assert net.orch.db.count_events("bad_upload") == 0


def test_validly_signed_but_unregistered_hotkey_is_forbidden(net: Net) -> None:
    stranger = net.caller(net.keys.stranger)
    resp = stranger.post("/v1/miners/register", register_body(net.orch.spec.data.fingerprint))
    assert_error(resp, 403, "forbidden", "registered on the subnet")
    assert_nobody_registered(net)
    # Refused before the replay cache: unregistered keys cannot fill it.
    assert len(net.orch.verifier.replay_cache) == 0


def test_chain_membership_is_followed_within_seconds(net: Net, chain_path: Path) -> None:
    chain = LocalChain(chain_path, NETUID)
    late = generate_keypair()
    miner = net.caller(late)
    body = register_body(net.orch.spec.data.fingerprint)
    assert_error(miner.post("/v1/miners/register", body), 403, "forbidden")

    # Registering on the subnet after the orchestrator started is enough: a retry soon gets in.
    chain.register(late.ss58_address)
    assert wait_until(lambda: miner.post("/v1/miners/register", body).status_code == 200, timeout_s=5.0)
    assert late.ss58_address in net.orch.scheduler.miners

    # And a hotkey that leaves the subnet loses access, without a restart.
    chain.deregister(late.ss58_address)
    poll = WorkRequest(run_id=net.orch.run_id, session=net.orch.scheduler.miners[late.ss58_address].session)
    assert wait_until(lambda: miner.post("/v1/work/next", poll).status_code == 403, timeout_s=5.0)


def test_validator_routes_need_a_permit_and_stake(net: Net, chain_path: Path) -> None:
    chain = LocalChain(chain_path, NETUID)
    poor, staked = generate_keypair(), generate_keypair()
    chain.register(poor.ss58_address, stake=0.5, validator_permit=True)
    chain.register(staked.ss58_address, stake=10.0, validator_permit=True)
    net.orch.registry.refresh()
    fingerprint = net.orch.spec.data.fingerprint
    join = ValidatorRegisterRequest(device="cpu", corpus_fingerprint=fingerprint)
    ask = ValidatorTaskRequest(run_id=net.orch.run_id)
    verdict = VerdictRequest(
        run_id=net.orch.run_id, task_id="v0.1.x", verdict=ReplayVerdict(passed=False, ops=0, checks=0)
    )

    miner = net.caller(net.keys.registered[0])
    miner.register(fingerprint)
    for path, body in [
        ("/v1/validators/register", join),
        ("/v1/validators/task", ask),
        ("/v1/validators/verdict", verdict),
    ]:
        assert_error(miner.post(path, body), 403, "not_a_validator", "no validator permit")
        assert_error(net.caller(poor).post(path, body), 403, "not_a_validator", "at least 1")
        assert_error(net.caller(net.keys.stranger).post(path, body), 403, "forbidden", "registered")

    validator = net.caller(staked)
    assert validator.post("/v1/validators/register", join).status_code == 200
    resp = validator.post("/v1/validators/task", ask)
    assert resp.status_code == 200 and resp.json() == {"task": None}
    # A verdict on a task nobody leased to it is refused and leaves no trace.
    assert_error(validator.post("/v1/validators/verdict", verdict), 403, "not_your_task")
    assert net.orch.validation.counts() == {} and net.orch.db.count_events("replay_failed") == 0
    assert httpx.get(f"{net.base_url}/v1/ledger").json() == []


def test_replayed_request_is_refused_and_changes_nothing(net: Net) -> None:
    keypair = net.keys.registered[0]
    body = register_body(net.orch.spec.data.fingerprint)
    headers = {**sign_request(keypair, body), **PROTOCOL_HEADERS}
    first = httpx.post(f"{net.base_url}/v1/miners/register", content=body, headers=headers)
    assert first.status_code == 200, first.text
    assert RegisterResponse.model_validate_json(first.content).session == 1

    again = httpx.post(f"{net.base_url}/v1/miners/register", content=body, headers=headers)
    assert_error(again, 401, "unauthorized", "replayed")
    # A replayed registration would have opened session 2 and thrown away the miner's work.
    assert net.orch.scheduler.miners[keypair.ss58_address].session == 1
    assert net.orch.db.count_events("registered") == 1


def test_oversized_body_is_refused(net: Net) -> None:
    keypair = net.keys.registered[0]
    limit = net.orch.verifier.max_body_bytes
    body = register_body(net.orch.spec.data.fingerprint)
    body = body[:-1] + b" " * (limit + 1 - len(body)) + b"}"  # still valid JSON, one byte over the limit
    resp = net.caller(keypair).post("/v1/miners/register", body)
    assert_error(resp, 413, "too_large", str(limit))
    # Without a Content-Length (chunked), the server stops reading once the limit is passed.
    headers = {**sign_request(keypair, body), **PROTOCOL_HEADERS}
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    resp = httpx.post(f"{net.base_url}/v1/miners/register", content=chunks, headers=headers)
    assert "content-length" not in resp.request.headers
    assert_error(resp, 413, "too_large", str(limit))
    assert_nobody_registered(net)


def test_stale_request_is_refused(net: Net) -> None:
    keypair = net.keys.registered[0]
    body = register_body(net.orch.spec.data.fingerprint)
    minute_ago = time.time_ns() // 1_000_000 - 60_000
    headers = {**sign_request(keypair, body, now_ms=minute_ago), **PROTOCOL_HEADERS}
    resp = httpx.post(f"{net.base_url}/v1/miners/register", content=body, headers=headers)
    assert_error(resp, 401, "clock_skew", "stale request")
    assert_nobody_registered(net)


# ---------------------------------------------------------------------------------------------------------
# 3. Protocol version and identifying headers


def test_other_protocol_version_is_told_to_upgrade(net: Net) -> None:
    miner = net.caller(net.keys.registered[0])
    miner.http.headers[HEADER_PROTOCOL] = "999"
    resp = miner.post("/v1/miners/register", register_body(net.orch.spec.data.fingerprint))
    assert_error(resp, 426, "protocol_mismatch", f"speaks protocol {PROTOCOL_VERSION}")
    assert_nobody_registered(net)
    resp = httpx.get(f"{net.base_url}/health", headers={HEADER_PROTOCOL: "999"})
    assert_error(resp, 426, "protocol_mismatch", "999")


def test_every_response_names_the_protocol_and_the_run(net: Net) -> None:
    miner = net.caller(net.keys.registered[0])
    responses = {
        "health": httpx.get(f"{net.base_url}/health"),
        "status": httpx.get(f"{net.base_url}/v1/status"),
        "losses": httpx.get(f"{net.base_url}/v1/losses"),
        "register": miner.post("/v1/miners/register", register_body(net.orch.spec.data.fingerprint)),
        "unsigned": httpx.post(f"{net.base_url}/v1/work/next", content=b"{}"),
        "bad query": httpx.get(f"{net.base_url}/v1/losses", params={"after": -1}),
        "no route": httpx.get(f"{net.base_url}/v1/nothing-here"),
        "old client": httpx.get(f"{net.base_url}/health", headers={HEADER_PROTOCOL: "0"}),
    }
    statuses = {name: r.status_code for name, r in responses.items()}
    assert statuses == {
        "health": 200,
        "status": 200,
        "losses": 200,
        "register": 200,
        "unsigned": 401,
        "bad query": 422,
        "no route": 404,
        "old client": 426,
    }
    for name, resp in responses.items():
        assert resp.headers[HEADER_PROTOCOL] == str(PROTOCOL_VERSION), name
        assert resp.headers[HEADER_RUN] == net.orch.run_id, name
        if resp.status_code >= 400:
            assert set(resp.json()) == {"code", "detail"}, name
    assert responses["health"].json() == {"status": "ok", "run_id": net.orch.run_id}


# ---------------------------------------------------------------------------------------------------------
# 4. One sample through three miners, with real uploads and downloads


def test_one_sample_through_the_pipeline_over_http(net: Net) -> None:
    orch = net.orch
    fingerprint = orch.spec.data.fingerprint
    clients = [OrchestratorClient(net.base_url, k, timeout_s=30.0) for k in net.keys.registered[:3]]
    for client in clients:
        net.callers.callback(client.close)
    head, body, tail = clients
    hk = [k.ss58_address for k in net.keys.registered[:3]]
    regs = [
        c.call(MINERS_REGISTER, RegisterRequest(device="cpu", corpus_fingerprint=fingerprint))
        for c in clients
    ]
    assert [r.stage for r in regs] == [0, 1, 2]

    def next_item(i: int) -> WorkItem:
        req = WorkRequest(run_id=regs[i].run_id, session=regs[i].session, wait_s=0)
        item = clients[i].call(WORK_NEXT, req).item
        assert item is not None, f"stage {i} got no work"
        return item

    def complete(i: int, item: WorkItem, out: ArtifactRef | None, loss: float | None = None) -> bool:
        req = CompleteRequest(
            run_id=regs[i].run_id, session=regs[i].session, item_id=item.item_id, output=out, loss=loss
        )
        return clients[i].call(WORK_COMPLETE, req).sample_completed

    def fetch(item: WorkItem, expected: ArtifactRef) -> None:
        """The input is exactly what the producer reported: same key, size and hash, and the bytes match."""
        assert item.input is not None
        assert (item.input.key, item.input.size, item.input.sha256) == (
            expected.key,
            expected.size,
            expected.sha256,
        )
        data = download_from_url(item.input.url, max_bytes=item.input.size)
        assert len(data) == item.input.size and content_hash(data) == item.input.sha256

    # Forward: head embeds the sample's token sequences.
    f0 = next_item(0)
    assert (f0.kind, f0.stage, f0.sample, f0.attempt) == ("forward", 0, 0, 1)
    assert f0.samples == orch.sample_ids(0) and len(f0.samples) == BATCH
    assert f0.input is None and f0.output is not None and f0.deadline_in_s > 0
    assert f0.output.key.startswith(net.prefix(hk[0]))
    assert (
        body.call(WORK_NEXT, WorkRequest(run_id=regs[1].run_id, session=regs[1].session)).item is None
    )  # nothing for stage 1 until the head has delivered
    act0 = upload(f0.output, boundary_payload(orch, 0))
    assert complete(0, f0, act0) is False

    f1 = next_item(1)
    assert (f1.kind, f1.stage, f1.sample, f1.samples) == ("forward", 1, 0, orch.sample_ids(0))  # re-embedded
    fetch(f1, act0)
    assert f1.output is not None and f1.output.key.startswith(net.prefix(hk[1]))
    act1 = upload(f1.output, boundary_payload(orch, 1))
    assert complete(1, f1, act1) is False

    # The tail scores against the same token sequences and sends back the gradient of its input.
    f2 = next_item(2)
    assert (f2.kind, f2.stage, f2.samples) == ("forward", 2, orch.sample_ids(0))
    fetch(f2, act1)
    assert f2.output is not None
    grad2 = upload(f2.output, boundary_payload(orch, 2))
    with pytest.raises(ApiError) as refused:
        complete(2, f2, grad2)  # the tail must report the loss
    assert (refused.value.status, refused.value.code) == (422, "missing_loss")
    assert complete(2, f2, grad2, loss=5.25) is False

    # Backward: each gradient goes to the miner that ran that stage's forward.
    b1 = next_item(1)
    assert (b1.kind, b1.stage, b1.forward_item) == ("backward", 1, f1.item_id)
    fetch(b1, grad2)
    assert b1.output is not None
    grad1 = upload(b1.output, boundary_payload(orch, 3))
    with pytest.raises(ApiError) as refused:
        complete(1, b1, grad1, loss=1.0)  # only the tail reports a loss
    assert (refused.value.status, refused.value.code) == (422, "unexpected_loss")
    assert complete(1, b1, grad1) is False

    b0 = next_item(0)
    assert (b0.kind, b0.stage, b0.forward_item, b0.output) == ("backward", 0, f0.item_id, None)
    fetch(b0, grad1)
    objects = sorted(orch.store.list_keys("runs/"))
    assert objects == sorted(r.key for r in (act0, act1, grad2, grad1))
    assert complete(0, b0, None) is True

    status = net.status()
    assert (status.samples_completed, status.samples_in_flight, status.samples_waiting_retry) == (1, 0, 0)
    assert (status.items_completed, status.attempts_failed, status.samples_dropped) == (5, 0, 0)
    assert {m.hotkey: m.items_completed for m in status.miners} == {hk[0]: 2, hk[1]: 2, hk[2]: 1}
    page = LossPage.model_validate_json(httpx.get(f"{net.base_url}/v1/losses").content)
    assert len(page.records) == 1 and page.next_after == page.records[0].seq
    record = page.records[0]
    assert (record.sample, record.attempt, record.loss, record.pathway) == (0, 1, 5.25, hk)

    # A finished sample's objects leave the bucket: it does not grow with the number of samples trained.
    assert wait_until(lambda: orch.store.list_keys("runs/") == [], timeout_s=10.0), orch.store.list_keys(
        "runs/"
    )
    assert wait_until(lambda: orch.db.count_garbage() == 0, timeout_s=5.0)  # and the to-do list empties


# ---------------------------------------------------------------------------------------------------------
# 5. Uploads: only your own output key, and only what you really uploaded is accepted


def test_presign_only_for_the_callers_current_output(net: Net) -> None:
    head, body, _ = net.pipeline()
    item = head.next_item()
    assert item.output is not None
    own = item.output.key

    assert_error(head.presign(net.prefix(body.hotkey) + item.item_id), 403, "foreign_key")
    assert_error(head.presign("checkpoints/stage0.safetensors"), 403, "foreign_key")
    assert_error(body.presign(own), 403, "foreign_key")  # the head's key, asked for by another miner
    assert_error(head.presign(net.prefix(head.hotkey) + "0.1.1f"), 403, "unexpected_key")
    assert_error(head.presign(own + "x"), 403, "unexpected_key")
    assert_error(body.presign(net.prefix(body.hotkey) + "0.1.1f"), 403, "unexpected_key")  # holds nothing

    resp = head.presign(own)
    assert resp.status_code == 200, resp.text
    target = UploadTarget.model_validate_json(resp.content)
    assert target.key == own and target.expires_in_s >= 60
    data = boundary_payload(net.orch, 0)
    upload(target, data)
    stored = net.orch.store.head(own)
    assert stored is not None and stored.size == len(data)
    assert net.orch.store.list_keys("runs/") == [own]  # refused presigns left nothing behind


def test_bad_uploads_are_refused_and_the_miner_can_recover(net: Net) -> None:
    orch = net.orch
    head, body, _ = net.pipeline()
    item = head.next_item()
    assert item.output is not None
    data = boundary_payload(orch, 0)
    good = ArtifactRef(key=item.output.key, size=len(data), sha256=content_hash(data))

    def unchanged() -> None:
        assert orch.scheduler.assigned[head.hotkey] == item.item_id
        assert orch.scheduler.items_completed == 0
        assert body.next().item is None  # nothing reached stage 1

    # (d) Reporting completion before uploading anything.
    assert_error(head.complete(item.item_id, good), 422, "bad_upload", "upload it before")
    unchanged()

    upload_to_url(item.output.url, data)
    # (b) The object is there, but the reported hash is not its hash.
    assert_error(
        head.complete(item.item_id, good.model_copy(update={"sha256": "0" * 64})), 422, "bad_upload", "sha256"
    )
    unchanged()
    # (c) The reported size is not its size, either way.
    assert_error(
        head.complete(item.item_id, good.model_copy(update={"size": len(data) - 1})), 422, "bad_upload"
    )
    assert_error(
        head.complete(item.item_id, good.model_copy(update={"size": len(data) + 1})), 422, "bad_upload"
    )
    unchanged()
    # An output anywhere but the item's own key.
    other = ArtifactRef(key=net.prefix(head.hotkey) + "elsewhere", size=len(data), sha256=good.sha256)
    assert_error(head.complete(item.item_id, other), 422, "wrong_output", item.output.key)
    unchanged()

    events = orch.db.events("bad_upload")
    assert len(events) == 4
    assert {(e["miner"], e["sample"], e["attempt"]) for e in events} == {(head.hotkey, 0, 1)}

    # (e) Another miner cannot complete (or fail) the head's item, even with the right reference.
    assert_error(body.complete(item.item_id, good), 403, "not_your_item")
    fail = FailRequest(**body.session(), item_id=item.item_id, reason="not mine", blame_input=True)
    assert_error(body.post("/v1/work/fail", fail), 403, "not_your_item")
    unchanged()
    assert orch.db.count_events("attempt_failed") == 0

    # (f) The honest completion still goes through, and stage 1 gets the head's output.
    resp = head.complete(item.item_id, good)
    assert resp.status_code == 200, resp.text
    assert CompleteResponse.model_validate_json(resp.content).sample_completed is False
    assert orch.scheduler.items_completed == 1
    forward = body.next_item()
    assert forward.input is not None and forward.input.key == good.key and forward.input.sha256 == good.sha256
    # A repeated completion (its first answer lost) is accepted once, not counted twice.
    again = head.complete(item.item_id, good)
    assert again.status_code == 200, again.text
    assert orch.scheduler.items_completed == 1


# ---------------------------------------------------------------------------------------------------------
# 6. Runs, sessions and malformed bodies


def test_requests_for_another_run_or_an_old_session_are_told_to_resync(net: Net) -> None:
    head, _, _ = net.pipeline()
    resp = head.post("/v1/work/next", WorkRequest(run_id="run-somewhere-else", session=1))
    assert_error(resp, 409, "run_mismatch", net.orch.run_id)
    # On the chain but never registered with this orchestrator (say, it restarted with a new state file).
    newcomer = net.caller(net.keys.registered[3])
    resp = newcomer.post("/v1/work/next", WorkRequest(run_id=net.orch.run_id, session=1))
    assert_error(resp, 409, "not_registered")
    assert newcomer.hotkey not in net.orch.scheduler.miners

    item = head.next_item()
    old = head.session()
    second = head.register(net.orch.spec.data.fingerprint)
    assert second.session == old["session"] + 1 and second.stage == 0
    stale = head.post("/v1/work/next", WorkRequest(**old))
    assert_error(stale, 409, "stale_session", "register again")
    stale = head.post("/v1/work/complete", CompleteRequest(**old, item_id=item.item_id))
    assert_error(stale, 409, "stale_session")
    # The new session carries on; what the old one held was failed and the sample is retried.
    retried = head.next_item()
    assert (retried.sample, retried.attempt) == (item.sample, item.attempt + 1)


def test_malformed_bodies_get_invalid_body(net: Net) -> None:
    fingerprint = net.orch.spec.data.fingerprint
    newcomer = net.caller(net.keys.registered[3])
    bad_registrations = {
        b"{not json": "",
        b"[]": "",
        b'{"device": "cpu"}': "corpus_fingerprint",
        (b'{"device": "cpu", "corpus_fingerprint": "' + fingerprint.encode() + b'", "stage": 2}'): "stage",
    }
    for body, field in bad_registrations.items():
        assert_error(newcomer.post("/v1/miners/register", body), 422, "invalid_body", field)
    assert newcomer.hotkey not in net.orch.scheduler.miners

    head, _, _ = net.pipeline()
    session = head.session()
    for body, field in {
        b"": "",
        b'{"run_id": "x"}': "session",
        WorkRequest(**session).model_dump_json()[:-1].encode() + b', "priority": 1}': "priority",
        WorkRequest(**session).model_dump_json().replace('"wait_s":0.0', '"wait_s":3600').encode(): "wait_s",
    }.items():
        assert_error(head.post("/v1/work/next", body), 422, "invalid_body", field)
    loss = CompleteRequest(**session, item_id="0.1.2f").model_dump_json().replace('"loss":null', '"loss":NaN')
    assert_error(head.post("/v1/work/complete", loss.encode()), 422, "invalid_body", "loss")
    assert net.orch.scheduler.next_sample == 0  # no request above handed out work


# ---------------------------------------------------------------------------------------------------------
# 7. Long-polling


def test_long_poll_with_nothing_to_do_returns_empty_after_the_wait(net: Net) -> None:
    _, body, _ = net.pipeline()
    started = time.monotonic()
    resp = body.next(wait_s=1.0)
    took = time.monotonic() - started
    assert resp == WorkResponse()
    assert 0.9 <= took < 3.0, took


def test_waiting_miner_is_woken_as_soon_as_work_arrives(net: Net) -> None:
    head, body, _ = net.pipeline()
    answer: dict[str, Any] = {}

    def poll() -> None:
        started = time.monotonic()
        answer["response"] = body.next(wait_s=POLL_WAIT_S)
        answer["returned_at"] = time.monotonic()
        answer["took"] = answer["returned_at"] - started

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(0.5)  # the stage-1 request is now held open
    assert waiter.is_alive()
    item = head.next_item()
    assert item.output is not None
    resp = head.complete(item.item_id, upload(item.output, boundary_payload(net.orch, 0)))
    assert resp.status_code == 200, resp.text
    completed_at = time.monotonic()
    waiter.join(POLL_WAIT_S + 5)
    assert not waiter.is_alive()

    got = answer["response"].item
    assert got is not None and (got.kind, got.stage, got.sample) == ("forward", 1, item.sample)
    # A poll that was not woken would return about 4 s after the completion (POLL_WAIT_S less the 0.5 s
    # sleep and the upload); 3 s leaves room for a loaded machine.
    assert answer["returned_at"] - completed_at < 3.0, answer
    assert answer["took"] < POLL_WAIT_S - 1.0, answer


# ---------------------------------------------------------------------------------------------------------
# 8. Giving up on an item


def test_giving_up_with_blame_retries_the_sample_and_names_the_producer(net: Net) -> None:
    orch = net.orch
    head, body, _ = net.pipeline()
    f0 = head.next_item()
    assert f0.output is not None
    act0 = upload(f0.output, boundary_payload(orch, 0))
    assert head.complete(f0.item_id, act0).status_code == 200
    f1 = body.next_item()
    assert f1.input is not None and f1.input.key == act0.key

    reason = "input activation decodes to NaN"
    resp = body.post(
        "/v1/work/fail", FailRequest(**body.session(), item_id=f1.item_id, reason=reason, blame_input=True)
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"ok": True}

    status = net.status()
    assert (status.samples_waiting_retry, status.attempts_failed) == (1, 1)
    assert (status.samples_in_flight, status.samples_completed, status.samples_dropped) == (0, 0, 0)
    blamed = orch.db.events("input_blamed")
    assert [(e["miner"], e["sample"], e["attempt"], e["detail"]) for e in blamed] == [
        (head.hotkey, 0, 1, reason)
    ]

    # The head is told to drop the abandoned forward's state and gets the same sample again.
    again = head.next()
    assert again.cancelled == [f0.item_id]
    assert again.item is not None
    assert (again.item.kind, again.item.sample, again.item.attempt) == ("forward", 0, 2)
    assert again.item.samples == f0.samples
    assert net.status().samples_issued == 1
    # The abandoned attempt's objects are deleted too.
    assert wait_until(lambda: act0.key not in orch.store.list_keys("runs/"), timeout_s=10.0)
