"""A stop event cuts short the retries of the orchestrator client and of the URL transfers (fast tests,
against a real closed port: every try is refused at once, so only the retry loop could keep them going).

The processes themselves stopping on SIGTERM and SIGINT are tests/test_stop_e2e.py's.
"""

from __future__ import annotations

import threading
import time

import pytest
from bittensor.sp_core import Keypair

from common.client import OrchestratorClient
from common.protocol import MINERS_REGISTER, RegisterRequest
from common.stopping import Stopping
from common.storage import RetryPolicy, download_from_url, upload_to_url
from tests.operator_env import dead_port

# What a retry budget would allow without the stop: far longer than the test waits.
LONG_BUDGET_S = 120.0
STOP_AFTER_S = 0.3
# Stopping must follow within this long of the stop: the one wait under way is cut short, no try follows.
PROMPT_S = 2.0


def stop_soon() -> threading.Event:
    stop = threading.Event()
    threading.Timer(STOP_AFTER_S, stop.set).start()
    return stop


def test_the_client_gives_up_its_retries_when_stopped() -> None:
    stop = threading.Event()
    client = OrchestratorClient(
        f"http://127.0.0.1:{dead_port()}",
        Keypair.create_from_uri("//Alice"),
        retry_for_s=LONG_BUDGET_S,
        stop=stop,
    )
    started = time.monotonic()
    threading.Timer(STOP_AFTER_S, stop.set).start()
    with pytest.raises(Stopping, match="POST /v1/miners/register: not retried"):
        client.call(MINERS_REGISTER, RegisterRequest(device="cpu", corpus_fingerprint=""))
    assert STOP_AFTER_S <= time.monotonic() - started < STOP_AFTER_S + PROMPT_S  # it did retry until then
    client.close()


def test_transfers_give_up_their_retries_when_stopped() -> None:
    url = f"http://127.0.0.1:{dead_port()}/bucket/key"
    patient = RetryPolicy(attempts=1000, initial_wait_s=0.05, max_wait_s=0.2)
    for transfer in (
        lambda stop: download_from_url(url, max_bytes=10, retry=patient, stop=stop),
        lambda stop: upload_to_url(url, b"data", retry=patient, stop=stop),
    ):
        started = time.monotonic()
        stop = stop_soon()
        with pytest.raises(Stopping, match="this process is stopping"):
            transfer(stop)
        assert STOP_AFTER_S <= time.monotonic() - started < STOP_AFTER_S + PROMPT_S


def test_a_transfer_asked_after_the_stop_makes_no_try() -> None:
    stop = threading.Event()
    stop.set()
    # A refused connection would be a StorageError after the one try; Stopping says none was made.
    with pytest.raises(Stopping, match="not started"):
        download_from_url(
            f"http://127.0.0.1:{dead_port()}/b/k", max_bytes=10, retry=RetryPolicy(attempts=1), stop=stop
        )
