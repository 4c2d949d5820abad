"""Metrics, status lines and JSON logs, each through the real thing: the orchestrator's /metrics over HTTP
while a sample goes through the pipeline, a miner's and a validator's metrics server on loopback, and the
log settings as `iota` applies them."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.chain import LocalChain
from common.keys import generate_keypair
from common.metrics import human_bytes, serve_metrics
from common.protocol import MinerScoreEntry, ScoresReport
from iota.cli import _log_options
from miner.merge_participant import Traffic
from miner.metrics import MinerMetrics, MinerStatusLine, MinerView
from orchestrator.metrics import StatusLine
from tests.harness import BATCH, NETUID, SEQ, Net, boundary_payload, upload
from validator.daemon import ValidatorDaemon, WeightsRound
from validator.scoring import MinerScore
from validator.settings import ValidatorSettings

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scrape(url: str) -> Samples:
    resp = httpx.get(url, timeout=10.0)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return parse(resp.text)


# ---------------------------------------------------------------------------------------------------------
# The orchestrator


def test_orchestrator_metrics_follow_a_sample_through_the_pipeline(net: Net) -> None:  # noqa: F811
    orch = net.orch
    url = f"{net.base_url}/metrics"  # public: no signature
    before = scrape(url)
    assert value(before, "iota_samples_completed_total") == 0
    assert value(before, "iota_miners", stage="0", state="active") == 0
    assert value(before, "iota_epoch_phase", phase="training") == 1
    assert value(before, "iota_merge_phase", stage="1", phase="idle") == 1
    assert ("iota_loss", ()) not in before  # no loss reported yet: no made-up value

    head, body, tail = net.pipeline()
    f0 = head.next_item()
    assert f0.output is not None
    act0 = upload(f0.output, boundary_payload(orch, 0))
    assert head.complete(f0.item_id, act0).status_code == 200
    waiting = scrape(url)
    assert value(waiting, "iota_queue_depth", stage="1", kind="forward") == 1  # for the body, not taken yet
    assert value(waiting, "iota_queue_depth", stage="2", kind="forward") == 0
    assert value(waiting, "iota_samples_in_flight") == 1
    assert value(waiting, "iota_miners", stage="1", state="active") == 1

    f1 = body.next_item()
    assert f1.output is not None
    act1 = upload(f1.output, boundary_payload(orch, 1))
    assert body.complete(f1.item_id, act1).status_code == 200
    f2 = tail.next_item()
    assert f2.output is not None
    grad2 = upload(f2.output, boundary_payload(orch, 2))
    assert tail.complete(f2.item_id, grad2, loss=4.5).status_code == 200
    b1 = body.next_item()
    assert b1.output is not None
    grad1 = upload(b1.output, boundary_payload(orch, 3))
    assert body.complete(b1.item_id, grad1).status_code == 200
    b0 = head.next_item()
    assert head.complete(b0.item_id).status_code == 200

    after = scrape(url)
    assert value(after, "iota_samples_completed_total") == 1
    assert value(after, "iota_tokens_processed_total") == BATCH * SEQ
    assert value(after, "iota_samples_in_flight") == 0
    assert value(after, "iota_items_completed_total", kind="forward") == 2
    assert value(after, "iota_items_completed_total", kind="backward") == 2
    assert value(after, "iota_items_completed_total", kind="tail") == 1
    assert value(after, "iota_item_latency_seconds_count", kind="forward") == 2
    assert value(after, "iota_item_latency_seconds_count", kind="tail") == 1
    assert 0 < value(after, "iota_item_latency_seconds_sum", kind="forward") < 60
    assert value(after, "iota_loss") == 4.5
    assert value(after, "iota_sample_loss_count") == 1
    for stage in ("0", "1", "2"):
        assert value(after, "iota_miners", stage=stage, state="active") == 1
        for kind in ("forward", "backward"):
            assert value(after, "iota_queue_depth", stage=stage, kind=kind) == 0
    assert value(after, "iota_merges_total", result="completed") == 0
    assert value(after, "iota_validations_total", result="passed") == 0
    assert value(after, "iota_run_info", run_id=orch.run_id, preset="tiny", stages="3") == 1

    line = StatusLine(orch).render()  # the orchestrator's periodic log line, from the same state
    assert line.startswith("miners 1/1/1 per stage | ")
    assert (
        "1 done, 0 in flight, 0 to retry, 0 dropped | epoch 0 training | 0 merges" in line
        and line.endswith("loss 4.500")
    )


def test_orchestrator_metrics_carry_the_validators_latest_scores(net: Net, chain_path: Path) -> None:  # noqa: F811
    url = f"{net.base_url}/metrics"
    before = scrape(url)
    assert value(before, "iota_validator_reports") == 0
    assert not [k for k in before if k[0] == "iota_miner_score"]

    staked = generate_keypair()
    LocalChain(chain_path, NETUID).register(staked.ss58_address, stake=10.0, validator_permit=True)
    net.orch.registry.refresh()
    neurons = net.orch.registry.neurons
    paid, penalized = (k.ss58_address for k in net.keys.registered[:2])
    report = ScoresReport(
        run_id=net.orch.run_id,
        epoch=2,
        at=time.time(),
        scores={paid: MinerScoreEntry(score=12.0), penalized: MinerScoreEntry(score=0.0, penalized=True)},
        weights={neurons[paid].uid: 1.0},
    )
    assert net.caller(staked).post("/v1/validators/scores", report).status_code == 200

    after = scrape(url)
    assert value(after, "iota_validator_reports") == 1
    paid_uid, penalized_uid = str(neurons[paid].uid), str(neurons[penalized].uid)
    assert value(after, "iota_miner_score", hotkey=paid, uid=paid_uid) == 12.0
    assert value(after, "iota_miner_score", hotkey=penalized, uid=penalized_uid) == 0.0
    assert value(after, "iota_miner_weight", hotkey=paid, uid=paid_uid) == 1.0
    assert value(after, "iota_miner_weight", hotkey=penalized, uid=penalized_uid) == 0.0


# ---------------------------------------------------------------------------------------------------------
# A miner


def test_miner_metrics_server_and_status_line_tell_the_same_story() -> None:
    traffic = Traffic()
    metrics = MinerMetrics("5Fminer", "cpu", "honest", traffic)
    metrics.view = lambda: MinerView(stage=2, outstanding=0, version=3)
    line = MinerStatusLine(metrics)
    port = serve_metrics(metrics.registry, "127.0.0.1", 0)

    for loss in (3.5, 3.25):
        metrics.item_done("tail", tokens=BATCH * SEQ, loss=loss)
        metrics.item_seconds.labels("tail").observe(0.2)
    metrics.counts.work_uploaded += 1_500_000
    metrics.counts.work_downloaded += 400_000
    traffic.downloaded += 500_000  # a checkpoint load: counted with the work downloads
    metrics.counts.transfer_errors["download"] += 1
    metrics.counts.failed += 1
    metrics.counts.merges += 3

    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(samples, "iota_miner_stage") == 2
    assert value(samples, "iota_miner_items_total", kind="tail") == 2
    assert value(samples, "iota_miner_items_total", kind="forward") == 0
    assert value(samples, "iota_miner_samples_total") == 2
    assert value(samples, "iota_miner_tokens_total") == 2 * BATCH * SEQ
    assert value(samples, "iota_miner_loss") == 3.25
    assert value(samples, "iota_miner_item_seconds_count", kind="tail") == 2
    assert value(samples, "iota_miner_upload_bytes_total") == 1_500_000
    assert value(samples, "iota_miner_download_bytes_total") == 900_000
    assert value(samples, "iota_miner_transfer_errors_total", direction="download") == 1
    assert value(samples, "iota_miner_merges_total") == 3
    assert value(samples, "iota_miner_info", hotkey="5Fminer", device="cpu", behavior="honest") == 1

    text = line.render()
    assert text.startswith("stage 2 | 2 items (tail 2) | ")
    assert "up 1.5 MB, down 900.0 kB" in text
    assert "1 failed, 1 transfer errors" in text
    assert "3 merges, weights v3" in text and text.endswith("loss 3.250")


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 999, 1000, 1_234_567, 5e12)] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "1.2 MB",
        "5.0 TB",
    ]


# ---------------------------------------------------------------------------------------------------------
# A validator


def test_validator_metrics_show_replays_and_the_latest_weights_round(tmp_path: Path) -> None:
    keypair = generate_keypair()
    chain = LocalChain(tmp_path / "chain.json", 9)
    daemon = ValidatorDaemon(ValidatorSettings(_env_file=None, device="cpu", metrics_port=0), keypair, chain)
    try:
        before = parse(generate_latest(daemon.metrics.registry).decode())
        assert value(before, "iota_validator_replays_total", result="passed") == 0
        assert ("iota_validator_flagged_miners", ()) not in before  # no round yet
        assert "no weights set yet" in daemon.status_line.render()

        daemon.replays["passed"] += 2
        daemon.replays["failed"] += 1
        daemon.metrics.replay_seconds.observe(4.0)
        daemon.last_round = WeightsRound(
            at=time.time(),
            epoch=3,
            scores={
                "5Fhonest": MinerScore("5Fhonest", 10.0, 1.0, False, [], 10.0),
                "5Fcheat": MinerScore("5Fcheat", 10.0, 1.0, True, ["failed replay"], 0.0),
            },
            weights={0: 0.1, 1: 0.9},
            clasp_flagged=["5Fcheat"],
        )
        daemon.metrics.rounds += 1

        samples = parse(generate_latest(daemon.metrics.registry).decode())
        assert value(samples, "iota_validator_replays_total", result="passed") == 2
        assert value(samples, "iota_validator_replays_total", result="failed") == 1
        assert value(samples, "iota_validator_replay_seconds_count") == 1
        assert value(samples, "iota_validator_weight_rounds_total") == 1
        assert value(samples, "iota_validator_miner_score", hotkey="5Fhonest") == 10.0
        assert value(samples, "iota_validator_miner_score", hotkey="5Fcheat") == 0.0
        assert value(samples, "iota_validator_miner_weight", uid="1") == 0.9
        assert value(samples, "iota_validator_flagged_miners") == 1
        assert value(samples, "iota_validator_penalized_miners") == 1
        text = daemon.status_line.render()
        assert text.startswith("replays 2 passed, 1 failed, 0 unreplayable | weights: 1 rounds")
        assert "after epoch 3 on 2 uids (1 penalized, 1 flagged)" in text
    finally:
        daemon.client.close()


# ---------------------------------------------------------------------------------------------------------
# Logs


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, put back as it was after the test (setup_logging reconfigures it)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_are_one_object_per_line_from_the_settings(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOTA_LOG_JSON", "true")
    monkeypatch.setenv("IOTA_LOG_LEVEL", "info")
    _log_options(False, None, "miner")  # no flags: the settings decide
    log = logging.getLogger("iota.test")
    log.debug("not shown at INFO")
    log.info("stage %d | %s", 1, 'quotes " and\nnewlines')
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    lines = capsys.readouterr().err.splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) == 2
    for entry in entries:
        assert {"ts", "level", "msg", "logger", "role"} <= set(entry)
        assert math.isclose(entry["ts"], time.time(), abs_tol=60)
        assert entry["role"] == "miner" and entry["logger"] == "iota.test"
    assert (entries[0]["level"], entries[0]["msg"]) == ("info", 'stage 1 | quotes " and\nnewlines')
    assert entries[1]["level"] == "error" and "ValueError: boom" in entries[1]["exc"]


def test_command_line_log_flags_win_over_the_settings(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IOTA_LOG_JSON", "false")
    monkeypatch.setenv("IOTA_LOG_LEVEL", "ERROR")
    _log_options(True, "warning", "validator")
    logging.getLogger("iota.test").warning("shown: the flag says WARNING")
    entry = json.loads(capsys.readouterr().err)
    assert (entry["level"], entry["role"]) == ("warning", "validator")

    monkeypatch.setenv("IOTA_LOG_JSON", "0")
    _log_options(False, None, "validator")
    logging.getLogger("iota.test").warning("hidden: IOTA_LOG_LEVEL=ERROR")
    logging.getLogger("iota.test").error("plain text")
    err = capsys.readouterr().err
    assert "hidden" not in err and err.rstrip().endswith("validator ERROR plain text")
