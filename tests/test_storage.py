"""Object storage over real HTTP: an embedded S3 server on 127.0.0.1 and presigned URLs fetched with httpx.

A few cases need misbehaviour no S3 server shows on demand (5xx, a body with no Content-Length); those use a
small scripted HTTP server, also on 127.0.0.1.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from common import storage
from common.codec import content_hash
from common.s3server import EmbeddedS3
from common.storage import (
    CompletedPart,
    ObjectStore,
    RetryPolicy,
    StorageError,
    download_from_url,
    part_count,
    upload_multipart,
    upload_to_url,
    validate_key,
)

MIB = 1024 * 1024
# Backoff short enough that retry tests take milliseconds, with the same number of attempts as production.
FAST_RETRY = RetryPolicy(attempts=4, initial_wait_s=0.01, max_wait_s=0.02)


class RequestCounter:
    """An httpx event hook that counts the requests actually sent, retries included."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, request: httpx.Request) -> None:
        self.count += 1

    def client(self) -> httpx.Client:
        return httpx.Client(event_hooks={"request": [self]})


# ---------------------------------------------------------------------------------------------------------
# Scripted HTTP server for failures S3 does not produce on demand


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True  # False: HTTP/1.0 style, the body ends when the connection closes.


class ScriptedServer:
    """Answers request i with replies[i] (the last one repeats) and counts requests."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.count = 0
        script = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                script.answer(self)

            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                script.answer(self)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output clean

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/obj?X-Amz-Signature=secret"

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        reply = self.replies[min(self.count, len(self.replies) - 1)]
        self.count += 1
        handler.send_response(reply.status)
        for name, value in reply.headers.items():
            handler.send_header(name, value)
        if reply.content_length:
            handler.send_header("Content-Length", str(len(reply.body)))
        else:
            handler.close_connection = True
        handler.end_headers()
        handler.wfile.write(reply.body)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, so connecting is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---------------------------------------------------------------------------------------------------------
# ObjectStore and presigned URLs against the embedded S3 server


def test_ensure_bucket_is_idempotent(s3: EmbeddedS3) -> None:
    store = ObjectStore.from_settings(s3.settings(bucket="test-storage-idempotent"))
    store.ensure_bucket()
    store.ensure_bucket()
    store.put_bytes("probe", b"ok")
    assert store.list_keys("") == ["probe"]


def test_presigned_put_then_head_then_get(store: ObjectStore) -> None:
    key = "run-1/5F3sa2TJAWMqDhXG6jhV4N8ko9SxwGy8TpaNS1repo5EYjQX/act_00012.bin"
    data = bytes(range(256)) * 40

    etag = upload_to_url(store.presign_put(key), data)

    info = store.head(key)
    assert info is not None
    assert (info.key, info.size, info.etag) == (key, len(data), etag)
    assert download_from_url(store.presign_get(key), max_bytes=len(data)) == data


def test_head_of_missing_key_is_none(store: ObjectStore) -> None:
    assert store.head("nothing/here") is None


def test_download_over_limit_raises(store: ObjectStore) -> None:
    store.put_bytes("limits/download", b"x" * 1000)
    with pytest.raises(StorageError, match="limit"):
        download_from_url(store.presign_get("limits/download"), max_bytes=999)


def test_get_bytes_refuses_object_over_limit(store: ObjectStore) -> None:
    store.put_bytes("limits/get", b"y" * 1000)
    assert store.get_bytes("limits/get", max_bytes=1000) == b"y" * 1000
    with pytest.raises(StorageError, match="limit"):
        store.get_bytes("limits/get", max_bytes=999)


def test_get_bytes_of_missing_key_raises(store: ObjectStore) -> None:
    with pytest.raises(StorageError) as info:
        store.get_bytes("nothing/here", max_bytes=10)
    assert info.value.status == 404


def test_multipart_upload_completes_to_the_concatenation(store: ObjectStore) -> None:
    key = "multipart/weights.bin"
    part_size = 5 * MIB  # S3's minimum for every part but the last
    data = b"a" * part_size + b"b" * 1024
    upload_id = store.create_multipart(key)
    urls = [store.presign_part(key, upload_id, n) for n in range(1, part_count(len(data), part_size) + 1)]
    assert len(urls) == 2

    parts = upload_multipart(urls, data, part_size)

    assert [p.part_number for p in parts] == [1, 2]
    # Parts cross processes in protocol messages; a JSON round trip must keep them usable.
    parts = [CompletedPart.model_validate_json(p.model_dump_json()) for p in parts]
    store.complete_multipart(key, upload_id, list(reversed(parts)))
    info = store.head(key)
    assert info is not None and info.size == len(data)
    assert download_from_url(store.presign_get(key), max_bytes=len(data)) == data


def test_multipart_abort_leaves_no_object(store: ObjectStore) -> None:
    key = "multipart/aborted.bin"
    upload_id = store.create_multipart(key)
    upload_multipart([store.presign_part(key, upload_id, 1)], b"partial", 5 * MIB)

    store.abort_multipart(key, upload_id)

    assert store.head(key) is None
    with pytest.raises(StorageError):
        store.complete_multipart(key, upload_id, [CompletedPart(part_number=1, etag="0" * 32)])


def test_upload_multipart_checks_url_count() -> None:
    with pytest.raises(StorageError, match="part URLs"):
        upload_multipart(["http://127.0.0.1:1/a"], b"z" * 11, part_size=5)


def test_delete_and_list_keys(store: ObjectStore) -> None:
    doomed = [f"listing/doomed/{i}" for i in range(5)]
    kept = ["listing/kept/0", "listing-other/0"]
    for key in doomed + kept:
        store.put_bytes(key, key.encode())
    assert sorted(store.list_keys("listing/")) == sorted(doomed + ["listing/kept/0"])

    store.delete(doomed + ["listing/doomed/never-existed"])

    assert store.list_keys("listing/doomed/") == []
    assert store.list_keys("listing/") == ["listing/kept/0"]
    assert store.head("listing-other/0") is not None


@pytest.mark.parametrize("key", ["../x", "a/../b", "/abs", "", "a b", "k" * 600, "a//b", "./a", "a?b"])
def test_invalid_keys_raise(store: ObjectStore, key: str) -> None:
    with pytest.raises(StorageError):
        validate_key(key)
    with pytest.raises(StorageError):
        store.presign_put(key)
    with pytest.raises(StorageError):
        store.head(key)


def test_longest_key_is_accepted() -> None:
    assert validate_key("k" * 512) == "k" * 512


# ---------------------------------------------------------------------------------------------------------
# Client-side retry behaviour


def test_4xx_raises_without_retry(store: ObjectStore) -> None:
    counter = RequestCounter()
    with counter.client() as client, pytest.raises(StorageError) as info:
        download_from_url(store.presign_get("nothing/here"), max_bytes=10, client=client, retry=FAST_RETRY)
    assert info.value.status == 404
    assert "NoSuchKey" in str(info.value)
    assert counter.count == 1


def test_connection_errors_are_retried_a_bounded_number_of_times() -> None:
    counter = RequestCounter()
    url = f"http://127.0.0.1:{closed_port()}/bucket/key?X-Amz-Signature=secret"
    with counter.client() as client, pytest.raises(StorageError, match="ConnectError") as info:
        upload_to_url(url, b"data", client=client, retry=FAST_RETRY)
    assert counter.count == FAST_RETRY.attempts
    assert "secret" not in str(info.value)  # presigned signatures stay out of error messages


def test_5xx_is_retried_until_success() -> None:
    replies = [Reply(503, b"SlowDown"), Reply(500), Reply(200, headers={"ETag": '"abc123"'})]
    with ScriptedServer(replies) as server:
        assert upload_to_url(server.url, b"data", retry=FAST_RETRY) == "abc123"
        assert server.count == 3


def test_5xx_gives_up_after_the_last_attempt() -> None:
    with ScriptedServer([Reply(502, b"Bad Gateway")]) as server, pytest.raises(StorageError) as info:
        download_from_url(server.url, max_bytes=10, retry=FAST_RETRY)
    assert info.value.status == 502
    assert server.count == FAST_RETRY.attempts


def test_download_limit_holds_without_content_length() -> None:
    reply = Reply(200, b"q" * 5000, content_length=False)
    with ScriptedServer([reply]) as server:
        assert download_from_url(server.url, max_bytes=5000) == b"q" * 5000
        with pytest.raises(StorageError, match="limit"):
            download_from_url(server.url, max_bytes=4999)


# ---------------------------------------------------------------------------------------------------------
# Progress of long transfers


class SpyProgress(storage.TransferProgress):
    """The real reporter, also keeping the sum of every step it was given (before clamping)."""

    made: list[SpyProgress] = []

    def __init__(self, verb: str, label: str, total: int) -> None:
        super().__init__(verb, label, total)
        self.net = 0
        SpyProgress.made.append(self)

    def advance(self, n: int) -> None:
        self.net += n
        super().advance(n)


@pytest.fixture
def progress_spy(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> list[SpyProgress]:
    """Progress from 1 MiB up (instead of 16), spied on, with its INFO lines captured."""
    monkeypatch.setattr(storage, "PROGRESS_MIN_BYTES", MIB)
    monkeypatch.setattr(storage, "TransferProgress", SpyProgress)
    monkeypatch.setattr(SpyProgress, "made", [])
    caplog.set_level(logging.INFO, logger="common.storage")
    return SpyProgress.made


def _progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "common.storage"]


def test_progress_line_and_when_to_log() -> None:
    line = storage.progress_line("uploading", "checkpoint stage 1", 64 * MIB, 256 * MIB, 3.0)
    assert line == "uploading checkpoint stage 1: 64/256 MiB, 21.3 MiB/s"
    total = 100 * MIB
    assert storage.progress_log_due(25 * MIB, total, 0, 0.1)  # reached the first quarter
    assert not storage.progress_log_due(30 * MIB, total, 25 * MIB, 0.1)  # same quarter, soon after
    assert storage.progress_log_due(30 * MIB, total, 25 * MIB, storage.PROGRESS_LOG_EVERY_S)  # a while later
    assert not storage.progress_log_due(30 * MIB, total, 30 * MIB, 60.0)  # nothing new to say


def test_object_store_transfers_report_progress_and_arrive_intact(
    store: ObjectStore, progress_spy: list[SpyProgress], caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(3 * MIB + 123)
    etag = store.put_bytes("progress/checkpoint.bin", data, label="checkpoint stage 1")
    assert store.get_verified("progress/checkpoint.bin", len(data), content_hash(data)) == data
    assert store.get_bytes("progress/checkpoint.bin", max_bytes=len(data)) == data

    info = store.head("progress/checkpoint.bin")
    assert info is not None and info.etag == etag
    # boto3's Callback counted every byte of the upload, and the chunked reads every byte of both reads.
    assert [(p.verb, p.net) for p in progress_spy] == [
        ("uploading", len(data)),
        ("downloading", len(data)),
        ("downloading", len(data)),
    ]
    lines = _progress_lines(caplog)
    assert any(line.startswith("uploading checkpoint stage 1: 3/3 MiB, ") for line in lines)
    assert any(line.startswith("downloading progress/checkpoint.bin: 3/3 MiB, ") for line in lines)


def test_url_transfers_report_progress_and_arrive_intact(
    store: ObjectStore, progress_spy: list[SpyProgress], caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(2 * MIB + 7)
    upload_to_url(store.presign_put("progress/weights.bin"), data, label="weights stage 2")
    got = download_from_url(store.presign_get("progress/weights.bin"), max_bytes=len(data))
    assert got == data

    key = "progress/multipart.bin"
    big = os.urandom(5 * MIB + 1024)
    upload_id = store.create_multipart(key)
    urls = [store.presign_part(key, upload_id, n) for n in (1, 2)]
    store.complete_multipart(key, upload_id, upload_multipart(urls, big, 5 * MIB))
    assert store.get_exact(key, len(big)) == big

    # One reporter per transfer, the multipart upload's two parts sharing one.
    assert [p.net for p in progress_spy] == [len(data), len(data), len(big), len(big)]
    lines = _progress_lines(caplog)
    assert any(line.startswith("uploading weights stage 2: 2/2 MiB") for line in lines)
    assert any(line.startswith("downloading test-storage/progress/weights.bin: 2/2 MiB") for line in lines)
    # Quarters, not every chunk: a handful of lines per transfer.
    assert len(lines) <= 4 * 5


def test_a_retried_upload_counts_its_bytes_once(progress_spy: list[SpyProgress]) -> None:
    data = b"r" * (2 * MIB)
    replies = [Reply(503, b"SlowDown"), Reply(200, headers={"ETag": '"abc123"'})]
    with ScriptedServer(replies) as server:
        assert upload_to_url(server.url, data, retry=FAST_RETRY) == "abc123"
        assert server.count == 2
    assert [p.net for p in progress_spy] == [len(data)]


def test_small_transfers_take_the_plain_path(
    store: ObjectStore, progress_spy: list[SpyProgress], caplog: pytest.LogCaptureFixture
) -> None:
    small = b"s" * (MIB - 1)  # just under the (lowered) threshold: an activation's path
    store.put_bytes("progress/small.bin", small)
    assert store.get_exact("progress/small.bin", len(small)) == small
    upload_to_url(store.presign_put("progress/small2.bin"), small)
    assert download_from_url(store.presign_get("progress/small2.bin"), max_bytes=len(small)) == small
    assert progress_spy == []
    assert _progress_lines(caplog) == []


def test_a_terminal_gets_a_bar_and_no_log_lines(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    caplog.set_level(logging.INFO, logger="common.storage")
    with storage.TransferProgress("uploading", "checkpoint stage 0", 4 * MIB) as progress:
        for _ in range(4):
            progress.advance(MIB)
        # A second transfer at the same time does not fight over the terminal: it logs instead.
        with storage.TransferProgress("downloading", "other", MIB) as other:
            other.advance(MIB)
    assert progress.done == 4 * MIB
    lines = _progress_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("downloading other: 1/1 MiB, ")
    assert "uploading checkpoint stage 0" in terminal.getvalue()
    assert not storage._BAR_LOCK.locked()  # released for the next transfer
