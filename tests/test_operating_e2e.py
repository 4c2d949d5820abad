"""Operating the network, end to end: the README's `./devnet.sh` runs as a user runs it, and while it trains,
every process's Prometheus endpoint (listed in `<workdir>/endpoints.json`) is scraped and must carry the
named series with values that agree with the run.

The module-scoped `live_devnet` fixture keeps one devnet up for every test in this module (the dashboard
is served by the same run), and stops it at the end: Ctrl-C once ends training, Ctrl-C again skips waiting
for the validators; the devnet must still exit 0 and write its summary.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.browser import check_dashboard, parse_dashboard, render_dashboard, require_chromium

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
# Seconds of training at most: the tests finish well before, and then Ctrl-C ends the run.
DURATION_S = 150
# Small samples (4 x 128 tokens) and epochs, so that a merge and then a replay of it (every epoch is
# shadowed) happen early even on a busy 2-core machine.
BATCH_SIZE, SEQ_LEN, MERGE_EVERY = 4, 128, 10
CHECK_WITHIN_S = 100.0  # after the first sample, for the merge and the replay to show in the metrics
START_TIMEOUT_S = 150.0  # setup.sh, then S3, chain, orchestrator, 3 miners and a validator on 2 cores


@dataclass
class LiveDevnet:
    workdir: Path
    endpoints: dict[str, Any]  # endpoints.json: orchestrator, dashboard, metrics {name: url}
    proc: subprocess.Popen[bytes]
    output: Path  # the devnet command's stdout and stderr
    started: float  # time.monotonic() when the first sample completed

    @property
    def url(self) -> str:
        return str(self.endpoints["orchestrator"])

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = httpx.get(f"{self.url}/v1/status", timeout=10.0).json()
        return status

    def tail(self) -> str:
        return self.output.read_text(errors="replace")[-3000:]


def _wait(condition: Callable[[], Any], timeout_s: float, proc: subprocess.Popen[bytes], what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the devnet exited with {proc.returncode} while waiting for {what}")
        try:
            if result := condition():
                return result
        except (OSError, ValueError, httpx.HTTPError):
            pass  # not there yet
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def live_devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDevnet]:
    base = tmp_path_factory.mktemp("operating")
    workdir, output = base / "devnet", base / "devnet.out"
    command = [
        "./devnet.sh",
        "--duration",
        str(DURATION_S),
        "--validators",
        "1",
        "--validation-fraction",
        "1",
        "--merge-every",
        str(MERGE_EVERY),
        "--batch-size",
        str(BATCH_SIZE),
        "--seq-len",
        str(SEQ_LEN),
        "--workdir",
        str(workdir),
        "--summary",
        str(base / "summary.json"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}
    env["PYTHONUNBUFFERED"] = "1"
    with output.open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        path = workdir / "endpoints.json"
        _wait(path.exists, START_TIMEOUT_S, proc, "endpoints.json")
        url = json.loads(path.read_text())["orchestrator"]
        _wait(
            lambda: httpx.get(f"{url}/v1/status", timeout=5.0).json()["samples_completed"] > 0,
            START_TIMEOUT_S,
            proc,
            "the first completed sample",
        )
        # Every miner and the validator joined before the first sample completed; read the file again.
        net = LiveDevnet(workdir, json.loads(path.read_text()), proc, output, time.monotonic())
        yield net
    finally:
        _stop(proc)
    assert proc.returncode == 0, output.read_text(errors="replace")[-3000:]
    summary = json.loads((base / "summary.json").read_text())
    assert summary["samples_completed"] > 0 and summary["merges_completed"] >= 3, summary
    # The run a user starts trains: no sample dropped, and from ln(320) = 5.8 at init the loss falls fast
    # (a byte-level model learns Python's character statistics within a few dozen samples).
    assert summary["dropped_samples"] == 0 and summary["merges_rolled_back"] == 0, summary
    assert summary["loss_last"] < summary["loss_first"] - 0.8, summary
    assert summary["stages"] == 3 and summary["miners"] == 3 and summary["tokens_per_s"] > 0, summary


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as a user at the terminal: the training ends and the devnet stops without waiting for the
    validators."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------------------
# Scraping

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    resp = httpx.get(url, timeout=10.0)
    resp.raise_for_status()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def labels_of(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(ls) for (n, ls), _ in samples.items() if n == name]


def problems_now(net: LiveDevnet) -> list[str]:
    """What is still missing or wrong in one scrape of every endpoint (empty when all is as it should be)."""
    status = net.status()
    stage_of = {m["hotkey"]: m["stage"] for m in status["miners"]}
    tokens_per_sample = status["batch_size"] * status["seq_len"]
    scraped: dict[str, Samples] = {}
    problems: list[str] = []
    for name, url in net.endpoints["metrics"].items():
        try:
            scraped[name] = scrape(url)
        except httpx.HTTPError as error:
            problems.append(f"{name}: cannot scrape {url}: {error!r}")
    if problems:
        return problems

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    # The orchestrator: the run's counts, consistent with each other.
    orch = scraped["orchestrator"]
    samples = get(orch, "iota_samples_completed_total")
    tokens = get(orch, "iota_tokens_processed_total")
    need(samples is not None and samples > 0, f"orchestrator: samples completed {samples}")
    need(
        samples is not None and tokens == samples * tokens_per_sample,
        f"orchestrator: tokens {tokens} != samples {samples} x {tokens_per_sample}",
    )
    need(total(orch, "iota_item_latency_seconds_count") > 0, "orchestrator: no item latency observed")
    for kind in ("forward", "backward", "tail"):
        need((get(orch, "iota_items_completed_total", kind=kind) or 0) > 0, f"orchestrator: no {kind} items")
    for stage in ("0", "1", "2"):
        depth = get(orch, "iota_queue_depth", stage=stage, kind="forward")
        need(depth is not None and depth >= 0, f"orchestrator: queue depth of stage {stage} is {depth}")
        need(get(orch, "iota_merge_phase", stage=stage, phase="idle") is not None, f"no merge phase {stage}")
        active = get(orch, "iota_miners", stage=stage, state="active")
        need(active == 1, f"orchestrator: stage {stage} has {active} active miners")
    need(total(orch, "iota_miners", state="active") == 3, "orchestrator: not 3 active miners")
    need(
        sum(total(orch, "iota_epoch_phase", phase=p) for p in ("training", "draining", "merging")) == 1,
        "orchestrator: the epoch is not in exactly one phase",
    )
    loss = get(orch, "iota_loss")
    need(loss is not None and math.isfinite(loss) and 0 < loss < 10, f"orchestrator: loss {loss}")
    # After the first merge.
    need(
        (get(orch, "iota_merges_total", result="completed") or 0) >= 3,
        "orchestrator: no merge of every stage",
    )
    need(total(orch, "iota_merge_duration_seconds_count") >= 3, "orchestrator: no merge duration observed")
    need(get(orch, "iota_epoch") is not None and (get(orch, "iota_epoch") or 0) >= 1, "orchestrator: epoch 0")

    # Each miner: it works, moves bytes, and says which stage it trains, as the orchestrator sees it.
    miners = [name for name in scraped if name.startswith("miner")]
    need(len(miners) == 3, f"endpoints.json lists miners {miners}")
    for name in miners:
        m = scraped[name]
        info = labels_of(m, "iota_miner_info")
        hotkey = info[0]["hotkey"] if info else None
        stage = get(m, "iota_miner_stage")
        need(
            hotkey in stage_of and stage == stage_of[hotkey],
            f"{name}: stage {stage}, orchestrator says {stage_of.get(hotkey or '')}",
        )
        need(total(m, "iota_miner_items_total") > 0, f"{name}: no items")
        need((get(m, "iota_miner_samples_total") or 0) > 0, f"{name}: no samples")
        need(
            get(m, "iota_miner_tokens_total")
            == (get(m, "iota_miner_samples_total") or 0) * tokens_per_sample,
            f"{name}: tokens are not samples x batch x seq",
        )
        up, down = get(m, "iota_miner_upload_bytes_total"), get(m, "iota_miner_download_bytes_total")
        need(up is not None and down is not None and up + down > 0, f"{name}: bytes up {up} down {down}")
        need(total(m, "iota_miner_item_seconds_count") > 0, f"{name}: no compute time observed")
        need(
            get(m, "iota_miner_transfer_errors_total", direction="upload") is not None,
            f"{name}: no transfer errors series",
        )
        need((get(m, "iota_miner_merges_total") or 0) >= 1, f"{name}: no merge applied")
        if stage == 2:
            miner_loss = get(m, "iota_miner_loss")
            need(
                miner_loss is not None and math.isfinite(miner_loss) and 0 < miner_loss < 10,
                f"{name}: tail loss {miner_loss}",
            )
            need(
                get(m, "iota_miner_items_total", kind="tail") == get(m, "iota_miner_samples_total"),
                f"{name}: the tail's samples are not its tail items",
            )

    # The validator: replays judged and passed, weights set and summing to 1.
    v = scraped["validator0"]
    passed = get(v, "iota_validator_replays_total", result="passed")
    need(get(v, "iota_validator_replays_total", result="failed") == 0, "validator0: an honest miner failed")
    need(passed is not None and passed >= 1, f"validator0: replays passed {passed}")
    need(get(v, "iota_validator_replay_seconds_count") == passed, "validator0: replay seconds count")
    need((get(v, "iota_validator_weight_rounds_total") or 0) >= 1, "validator0: no weights round")
    weights = total(v, "iota_validator_miner_weight")
    need(math.isclose(weights, 1.0, abs_tol=1e-6), f"validator0: weights sum to {weights}")
    # The validator's rounds reach the orchestrator: every miner has a score there, the weights sum to 1.
    need((get(orch, "iota_validator_reports") or 0) >= 1, "orchestrator: no scores report from a validator")
    scored = {ls["hotkey"] for ls in labels_of(orch, "iota_miner_score")}
    need(set(stage_of) <= scored, f"orchestrator: scores for {len(scored)} hotkeys, not every miner")
    reported = total(orch, "iota_miner_weight")
    need(math.isclose(reported, 1.0, abs_tol=1e-6), f"orchestrator: reported weights sum to {reported}")
    # Each verdict reaches the orchestrator before the validator counts it: scraped after, it has them all.
    recorded = get(
        scrape(net.endpoints["metrics"]["orchestrator"]), "iota_validations_total", result="passed"
    )
    need(recorded is not None and recorded >= (passed or 0), f"orchestrator: {recorded} replays passed")
    return problems


def test_every_endpoint_carries_the_named_series_with_sensible_values(live_devnet: LiveDevnet) -> None:
    net = live_devnet
    assert net.endpoints["dashboard"] == f"{net.url}/dashboard"
    assert set(net.endpoints["metrics"]) == {"orchestrator", "miner0", "miner1", "miner2", "validator0"}
    assert net.endpoints["metrics"]["orchestrator"] == f"{net.url}/metrics"

    # Poll while the devnet trains: a merge and then a replay of it take a while on a slow machine.
    deadline = net.started + CHECK_WITHIN_S
    problems = problems_now(net)
    while problems and time.monotonic() < deadline:
        assert net.proc.poll() is None, net.tail()
        time.sleep(2.0)
        problems = problems_now(net)
    assert not problems, problems


def test_the_dashboard_shows_the_live_run_in_a_browser(live_devnet: LiveDevnet, tmp_path: Path) -> None:
    """Headless chromium loads /dashboard from the running devnet: both charts plot points, every miner has a
    row, the epoch is shown, and (after the validator's first weights round) its scores are on the page."""
    require_chromium()
    net = live_devnet
    status = net.status()
    png = tmp_path / "dashboard.png"

    def rendered_with_scores() -> str | None:
        dom = render_dashboard(net.endpoints["dashboard"], png, wait_ms=4000)
        return dom if parse_dashboard(dom).score_rows > 0 else None

    dom = _wait(rendered_with_scores, 60.0, net.proc, "validator scores on the dashboard")
    view = check_dashboard(dom, scores=True)
    assert view.miner_rows == len(status["miners"]) == 3
    assert int(view.text_by_id["epoch"].strip()) >= 1  # the metrics test waited for the first merges
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
