"""The live dashboard: its data (GET /v1/dashboard), the validators' score reports it shows
(POST /v1/validators/scores), the page itself (GET /dashboard), and the page rendered in headless chromium.

The orchestrator is the real one over HTTP, built by tests/harness.py (through tests/conftest.py's
fixtures); miners are driven by hand through the signed HTTP API with real uploads to the embedded S3.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from bittensor.sp_core import Keypair

from common.chain import LocalChain
from common.client import OrchestratorClient
from common.keys import generate_keypair
from common.protocol import DashboardData, MinerScoreEntry, RunStatus, ScoresReport
from orchestrator import dashboard_state, service
from orchestrator.dashboard_state import DashboardState, LossCurve, ThroughputHistory
from orchestrator.db import StateDB
from tests.browser import check_dashboard, render_dashboard, require_chromium
from tests.harness import NETUID, PROTOCOL_HEADERS, Keys, Net, assert_error, boundary_payload, upload
from tests.waiting import wait_until
from validator.daemon import ValidatorDaemon
from validator.settings import ValidatorSettings

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def chain_path(tmp_path: Path, keys: Keys) -> Path:
    """A fresh chain per test (validators and weights from one test never show in another)."""
    path = tmp_path / "chain.json"
    chain = LocalChain(path, NETUID)
    for keypair in keys.registered:
        chain.register(keypair.ss58_address)
    return path


@pytest.fixture
def net(start: Callable[..., Net], monkeypatch: pytest.MonkeyPatch) -> Net:
    """An orchestrator whose dashboard samples throughput every 0.1 s and reads the chain every 0.2 s."""

    def fast(*args: Any, **kwargs: Any) -> DashboardState:
        return DashboardState(*args, **{**kwargs, "sample_every_s": 0.1, "chain_every_s": 0.2})

    monkeypatch.setattr(service, "DashboardState", fast)
    return start()


def dashboard(net: Net) -> DashboardData:
    resp = httpx.get(f"{net.base_url}/v1/dashboard")
    assert resp.status_code == 200, resp.text
    return DashboardData.model_validate_json(resp.content)


def train(net: Net, losses: list[float]) -> None:
    """Run one sample per loss through a three-miner pipeline (registering it first if needed)."""
    callers = [net.caller(k) for k in net.keys.registered[:3]]
    for stage, miner in enumerate(callers):
        assert miner.register(net.orch.spec.data.fingerprint).stage == stage
    head, body, tail = callers
    for i, loss in enumerate(losses):
        f0 = head.next_item()
        assert f0.output is not None
        assert head.complete(f0.item_id, upload(f0.output, boundary_payload(net.orch, i))).status_code == 200
        f1 = body.next_item()
        assert f1.output is not None
        assert body.complete(f1.item_id, upload(f1.output, boundary_payload(net.orch, i))).status_code == 200
        f2 = tail.next_item()
        assert f2.output is not None
        grad = upload(f2.output, boundary_payload(net.orch, i))
        assert tail.complete(f2.item_id, grad, loss=loss).status_code == 200
        b1 = body.next_item()
        assert b1.output is not None
        assert body.complete(b1.item_id, upload(b1.output, boundary_payload(net.orch, i))).status_code == 200
        b0 = head.next_item()
        assert head.complete(b0.item_id).status_code == 200


def add_validator(chain_path: Path, stake: float) -> Keypair:
    keypair = generate_keypair()
    LocalChain(chain_path, NETUID).register(keypair.ss58_address, stake=stake, validator_permit=True)
    return keypair


def report(net: Net, *, epoch: int = 0, scores: dict[str, float], weights: dict[int, float]) -> ScoresReport:
    return ScoresReport(
        run_id=net.orch.run_id,
        epoch=epoch,
        at=time.time(),
        scores={hotkey: MinerScoreEntry(score=score) for hotkey, score in scores.items()},
        weights=weights,
    )


# ---------------------------------------------------------------------------------------------------------
# GET /v1/dashboard


def test_dashboard_shows_the_run_its_miners_losses_and_throughput(net: Net) -> None:
    losses = [5.0, 4.0, 3.5, 3.0]
    train(net, losses)

    # Snapshots are taken on a clock; on a slow machine some are taken before training ends, so wait for one
    # taken after it.
    def caught_up() -> bool:
        points = dashboard(net).throughput
        return len(points) >= 3 and points[-1].samples_completed == 4

    assert wait_until(caught_up, timeout_s=10.0)
    data = dashboard(net)

    # The run at a glance is /v1/status itself.
    status = RunStatus.model_validate_json(httpx.get(f"{net.base_url}/v1/status").content)
    assert data.status == status
    assert (data.status.preset, data.status.n_stages, data.status.batch_size, data.status.seq_len) == (
        "tiny",
        3,
        2,
        32,
    )
    assert data.status.samples_completed == 4 and data.status.epoch == 0

    # Miners by stage with their uid and measured throughput.
    hotkeys = [k.ss58_address for k in net.keys.registered[:3]]
    assert [(m.hotkey, m.stage, m.state, m.uid) for m in data.miners] == [
        (hk, stage, "active", stage) for stage, hk in enumerate(hotkeys)
    ]
    assert [m.items_completed for m in data.miners] == [8, 8, 4]
    for m in data.miners:
        seconds = net.orch.scheduler.seconds_per_sample(net.orch.scheduler.miners[m.hotkey])
        assert seconds is not None and m.samples_per_s == pytest.approx(1 / seconds)
        assert m.tokens_per_s == pytest.approx(m.samples_per_s * 2 * 32)

    # Every loss is on the curve (one bin per sample this early).
    assert [(p.sample, p.loss, p.count) for p in data.loss] == [
        (float(i), x, 1) for i, x in enumerate(losses)
    ]
    assert data.losses_recorded == 4

    # Throughput: snapshots of the completion count with their rates, ending at the current count.
    points = data.throughput
    assert [p.at for p in points] == sorted(p.at for p in points)
    assert points[-1].samples_completed == 4
    assert all(p.samples_per_s >= 0 and p.tokens_per_s == pytest.approx(p.samples_per_s * 64) for p in points)

    assert data.progress.epoch == 0 and data.progress.phase == "training"
    assert data.progress.samples_trained == 4
    assert data.progress.merge_every_samples == net.orch.settings.merge_every_samples
    assert data.merges == [] and data.validators == [] and data.weights_source == "none"


def test_throughput_history_measures_the_rate_and_stays_bounded() -> None:
    history = ThroughputHistory(interval_s=1.0, max_points=10)
    for t in range(25):
        history.record(float(t), 3 * t)  # 3 samples a second, steadily
        history.record(t + 0.5, 3 * t)  # too soon after the last snapshot: ignored
    points = history.rates(tokens_per_sample=100)
    assert len(history.points) <= 10
    assert history.points[0][0] == 0.0 and history.points[-1][0] >= 20.0  # still spans the whole run
    assert all(p.samples_per_s == pytest.approx(3.0) for p in points)
    assert all(p.tokens_per_s == pytest.approx(300.0) for p in points)
    assert ThroughputHistory(interval_s=1.0).rates(100) == []  # one snapshot has no rate yet


def test_loss_curve_is_binned_to_a_bounded_number_of_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard_state, "_LOSS_PAGE", 500)
    db = StateDB(tmp_path / "state.sqlite")
    try:
        for sample in range(1200):
            db.add_loss(sample, 1, 10.0 - sample / 200, float(sample), ["a", "b", "c"])
        curve = LossCurve(max_bins=100)
        assert [curve.update(db) for _ in range(3)] == [True, True, False]  # pages of 500
        points = curve.points()
        assert 50 <= len(points) <= 100 and curve.count == 1200
        assert sum(p.count for p in points) == 1200
        assert [p.sample for p in points] == sorted(p.sample for p in points)
        assert points[0].loss > points[-1].loss  # the curve falls as the losses did
        mean = sum(p.loss * p.count for p in points) / 1200
        assert mean == pytest.approx(sum(10.0 - s / 200 for s in range(1200)) / 1200)

        # Later losses are read incrementally from where the last read stopped.
        db.add_loss(1200, 1, 0.5, 1200.0, ["a", "b", "c"])
        assert curve.update(db) is False
        assert curve.count == 1201 and curve.points()[-1].loss < points[-1].loss
    finally:
        db.close()


# ---------------------------------------------------------------------------------------------------------
# POST /v1/validators/scores


def test_validators_report_scores_and_the_dashboard_weighs_them_by_stake(net: Net, chain_path: Path) -> None:
    big, small = add_validator(chain_path, stake=30.0), add_validator(chain_path, stake=10.0)
    net.orch.registry.refresh()
    miners = [k.ss58_address for k in net.keys.registered[:2]]  # uids 0 and 1

    first = report(net, scores={miners[0]: 1.0, miners[1]: 1.0}, weights={0: 0.5, 1: 0.5})
    assert net.caller(big).post("/v1/validators/scores", first).status_code == 200
    # A later report from the same validator replaces its earlier one.
    latest = report(net, epoch=2, scores={miners[0]: 3.0, miners[1]: 1.0}, weights={0: 0.75, 1: 0.25})
    assert net.caller(big).post("/v1/validators/scores", latest).status_code == 200
    other = report(net, epoch=2, scores={miners[0]: 1.0, miners[1]: 3.0}, weights={0: 0.25, 1: 0.75})
    assert net.caller(small).post("/v1/validators/scores", other).status_code == 200

    data = dashboard(net)
    assert {v.hotkey: (v.report, v.stake) for v in data.validators} == {
        big.ss58_address: (latest, 30.0),
        small.ss58_address: (other, 10.0),
    }
    rows = {c.uid: c for c in data.consensus}
    assert set(rows) == {0, 1} and rows[0].hotkey == miners[0] and rows[0].stage is None
    # Stake 30 against 10: three quarters of the say.
    assert rows[0].score == pytest.approx(0.75 * 3.0 + 0.25 * 1.0)
    assert rows[0].weight == pytest.approx(0.75 * 0.75 + 0.25 * 0.25)
    assert rows[1].weight == pytest.approx(0.75 * 0.25 + 0.25 * 0.75)
    assert math.fsum(c.weight for c in data.consensus) == pytest.approx(1.0)
    assert rows[0].by_validator == {big.ss58_address: 3.0, small.ss58_address: 1.0}
    assert data.weights_source == "validators"  # nothing on the chain yet

    # Once the chain holds weight rows, the dashboard shows them too.
    chain = LocalChain(chain_path, NETUID)
    chain.set_weights(big, {0: 1.0})
    chain.set_weights(small, {1: 1.0})
    assert wait_until(lambda: dashboard(net).weights_source == "chain", timeout_s=5.0)
    rows = {c.uid: c for c in dashboard(net).consensus}
    assert rows[0].chain_weight == pytest.approx(0.75) and rows[1].chain_weight == pytest.approx(0.25)


def test_scores_route_is_for_validators_and_refuses_bad_reports(net: Net, chain_path: Path) -> None:
    validator = add_validator(chain_path, stake=10.0)
    net.orch.registry.refresh()
    good = report(net, scores={net.keys.registered[0].ss58_address: 1.0}, weights={0: 1.0})
    body = good.model_dump_json().encode()

    miner = net.caller(net.keys.registered[0])
    assert_error(miner.post("/v1/validators/scores", good), 403, "not_a_validator", "no validator permit")
    resp = httpx.post(f"{net.base_url}/v1/validators/scores", content=body, headers=PROTOCOL_HEADERS)
    assert_error(resp, 401, "unauthorized")

    caller = net.caller(validator)
    nan = body.replace(b'"score":1.0', b'"score":NaN')
    assert nan != body
    assert_error(caller.post("/v1/validators/scores", nan), 422, "invalid_body", "score")
    negative = good.model_copy(update={"weights": {0: -1.0}}).model_dump_json().encode()
    assert_error(caller.post("/v1/validators/scores", negative), 422, "invalid_body", "weights")
    huge = good.model_copy(update={"weights": {uid: 1.0 for uid in range(5000)}}).model_dump_json().encode()
    assert_error(caller.post("/v1/validators/scores", huge), 422, "invalid_body", "at most 4096")
    other_run = good.model_copy(update={"run_id": "run-other"})
    assert_error(caller.post("/v1/validators/scores", other_run), 409, "run_mismatch")
    assert net.orch.dashboard.scores == {}  # nothing refused was kept

    assert caller.post("/v1/validators/scores", good).status_code == 200
    assert net.orch.dashboard.scores[validator.ss58_address].report == good


def test_validator_posts_its_scores_after_setting_weights(net: Net, chain_path: Path) -> None:
    keypair = add_validator(chain_path, stake=10.0)
    net.orch.registry.refresh()
    chain = LocalChain(chain_path, NETUID)
    settings = ValidatorSettings(
        _env_file=None, orchestrator_url=net.base_url, device="cpu", metrics_port=0, retry_for_s=2.0
    )
    daemon = ValidatorDaemon(settings, keypair, chain)
    try:
        daemon.register()
        result = daemon.set_weights()
        received = net.orch.dashboard.scores[keypair.ss58_address].report
        assert received.weights == result.weights == {0: 1.0}  # no work yet: all to the burn uid
        neuron = chain.neuron(keypair.ss58_address)
        assert neuron is not None and chain.weights()[neuron.uid] == {0: 1.0}  # and it is on the chain
        assert (received.run_id, received.epoch) == (net.orch.run_id, 0)
    finally:
        daemon.client.close()

    # An orchestrator that cannot be reached costs the report, never the round.
    daemon.client = OrchestratorClient("http://127.0.0.1:9", keypair, retry_for_s=0.5)
    try:
        assert daemon.report_scores(result) is False
    finally:
        daemon.client.close()


# ---------------------------------------------------------------------------------------------------------
# GET /dashboard


def test_dashboard_page_is_one_self_contained_html_file(net: Net) -> None:
    resp = httpx.get(f"{net.base_url}/dashboard")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    # Nothing from another host: no absolute or protocol-relative URL anywhere, and the CSP forbids it.
    assert re.findall(r"https?://|(?:src|href)\s*=\s*[\"']?//", html) == []
    assert "default-src 'none'" in resp.headers["content-security-policy"]
    assert "connect-src 'self'" in resp.headers["content-security-policy"]
    for element in ("loss-chart", "throughput-chart", "miners-table", "scores-table", "epoch"):
        assert f'id="{element}"' in html
    assert 'data-points="0"' in html  # the charts say how many points they plot


def test_dashboard_renders_with_data_in_chromium(net: Net, chain_path: Path, tmp_path: Path) -> None:
    require_chromium()  # before any work: skip (or, under CI, fail) at once without a browser
    validator = add_validator(chain_path, stake=10.0)
    net.orch.registry.refresh()
    train(net, [5.0, 4.0, 3.0])
    hotkeys = [k.ss58_address for k in net.keys.registered[:3]]
    scores = report(net, scores=dict.fromkeys(hotkeys, 2.0), weights={0: 0.3, 1: 0.3, 2: 0.4})
    assert net.caller(validator).post("/v1/validators/scores", scores).status_code == 200
    assert wait_until(lambda: len(dashboard(net).throughput) >= 2, timeout_s=5.0)

    dom = render_dashboard(f"{net.base_url}/dashboard", tmp_path / "dashboard.png", wait_ms=3000)
    view = check_dashboard(dom, scores=True)
    assert view.chart_points["loss-chart"] == 3
    assert view.miner_rows == 3 and view.score_rows == 3
    assert (tmp_path / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
